"""
Generation speed: our engine against Hugging Face transformers' generate() and against a
nanoGPT-style loop without a KV cache, timed in one run on this machine.

$ python bench/generation.py               # needs transformers (pip install -r requirements-test.txt)
$ python bench/generation.py --repeat=5 --new_tokens=128
$ python bench/generation.py --parts=char   # part 2 only
$ python bench/generation.py --parts=qwen   # part 4: the Qwen2.5-0.5B shape
$ python bench/generation.py --parts=gpt2 --gpt2_size=gpt2-xl --device=cuda --compile=True
$ python bench/generation.py --parts=gpt2 --tiny=True --threads=1   # the overhead per token

1. A GPT-2 124M-shaped model (gpt2_size: another GPT-2 size's shape) with random weights;
   batch 1, a 16-token prompt, new_tokens greedy tokens. Ours with float32, bfloat16 and
   int8 weights; transformers' GPT2LMHeadModel (the same weights, float32); the no-cache loop.
   Also the quality cost of the smaller weights: their logits against float32's over a whole
   sequence.
2. A char-level model shaped as nanoGPT's Shakespeare one (6 layers, 384 wide, 256 context,
   65 characters): 10 samples of 500 characters, as one batch with our engine (exact, and with
   context_shift), and one after another with the no-cache loop.
3. With --quality_from=<out_dir>: the val loss of that run's model with float32, bfloat16 and
   int8 weights, on its dataset's val.bin.
4. --parts=qwen: Qwen2.5-0.5B's shape (896 wide, 24 layers, 14 query / 2 key-value heads,
   SwiGLU 4864, 151,936 tokens, tied embeddings) with random weights: batch 1, a 16-token
   prompt, qwen_tokens greedy tokens, float32; ours against transformers' Qwen2ForCausalLM
   generate() on the very same weights.

Each measurement is repeated; the best time counts (noise only ever adds time), and the spread
(worst / best) says how noisy the machine was. Ratios compare best times.
"""

import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from nanogpt import checkpoint  # noqa: E402
from nanogpt import engine  # noqa: E402
from nanogpt import hf as hf_format  # noqa: E402
from nanogpt import hardware  # noqa: E402
from nanogpt import quantize  # noqa: E402
from configurator import configure, run  # noqa: E402
from nanogpt.dataset import open_dataset  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from bench import shapes  # noqa: E402
from model import GPT, GPTConfig, build  # noqa: E402

# -----------------------------------------------------------------------------
repeat = 3  # timed runs of each measurement
new_tokens = 256  # GPT-2 part: tokens generated per run
prompt_tokens = 16
char_samples = 10
char_tokens = 500
seed = 0
quality_from = ""  # an out_dir: report its model's val loss with each kind of weights
parts = "gpt2,char"  # which of parts 1, 2 and 4 to run: gpt2, char, qwen
gpt2_size = "gpt2"  # part 1's shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl
# part 1 with the size's layers but every op tiny (width 64, 256 tokens): what is timed is the
# overhead per token (Python, dispatch, kernel launches), which bounds batch-1 decoding on a GPU
tiny = False
qwen_tokens = 64  # Qwen part: tokens generated per run
threads = 0  # CPU threads for every contender (torch.set_num_threads); 0 keeps torch's choice
device: str | None = None  # where to run: None (or 'auto') picks cuda, then mps, then cpu
dtype: str | None = None  # the weights' dtype on a GPU (None: its best); a CPU times float32, bfloat16 and int8
compile = False  # also time our engine with its compiled one-token step (generate(compile=True))
# -----------------------------------------------------------------------------


@torch.no_grad()
def no_cache_generate(model, idx, max_new_tokens, temperature=0.0, top_k=None):
    """nanoGPT's sampling loop: the whole (cropped) context goes through the model per token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        logits = logits[:, -1, :]
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def time_all(runs, tokens):
    """{name: [seconds, ...]}: each run(tokens) is timed `repeat` times after a short warm-up,
    the contenders taking turns so that a noisy moment does not fall on one of them only."""
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn(4)
    for _ in range(repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(tokens)
            times[name].append(time.perf_counter() - t0)
    return times


def report(times, tokens, baseline):
    best = {name: min(ts) for name, ts in times.items()}
    print(f"{'':28s} {'tok/s':>8s} {'spread':>7s} {'vs ' + baseline:>18s}")
    for name, ts in times.items():
        print(f"{name:28s} {tokens / best[name]:8.1f} {max(ts) / min(ts):6.2f}x "
              f"{best[baseline] / best[name]:17.2f}x")


def gpt2_part(dev, precision):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # no end-of-text token: every run generates all of its tokens
    n_layer, n_head, n_embd = shapes.GPT2[gpt2_size]
    vocab_size = 50257
    if tiny:
        n_head, n_embd, vocab_size = 1, 64, 256
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                    bos_token_id=None, eos_token_id=None)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        if tiny:  # a vocabulary not GPT-2's needs a tokenizer in the folder: any will do
            with open(os.path.join(folder, "tokenizer.json"), "w") as f:
                f.write(hf_format.char_tokenizer_json([chr(i) for i in range(256)]))
        ours = checkpoint.load_model(folder, dev, "float32" if on_cpu(dev) else precision)[0].eval()
    formats = weight_formats(ours) if on_cpu(dev) else {f"{precision} weights": ours}
    hf.to(dev, hardware.DTYPES["float32" if on_cpu(dev) else precision])
    prompt = torch.randint(vocab_size, (1, prompt_tokens), device=dev)

    def timed(fn):
        def run(n):
            fn(n)
            hardware.synchronize(dev)  # a GPU's queued work counts in the time
        return run

    runs = {f"ours, {name}": timed(lambda n, m=model: engine.generate(m, prompt, n, temperature=0))
            for name, model in formats.items()}
    if compile:
        runs["ours, compiled step"] = timed(lambda n: engine.generate(ours, prompt, n, temperature=0,
                                                                      compile=True))
    runs.update({
        "transformers generate": timed(lambda n: hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
            pad_token_id=0)),
        "no-cache loop (nanoGPT)": timed(lambda n: no_cache_generate(ours, prompt, n)),
    })
    shape = f"{gpt2_size}'s layers, width 64, 256 tokens" if tiny else f"{gpt2_size} shape"
    print(f"{shape}, random weights: batch 1, {prompt_tokens}-token prompt, {new_tokens} "
          f"new tokens, greedy, on {dev} ({torch.get_num_threads()} CPU threads)")
    times = time_all(runs, new_tokens)
    report(times, new_tokens, "transformers generate")
    bandwidth_use(ours, times, dev)
    if not on_cpu(dev):
        return

    # quality cost: logits over a whole sequence, against float32's
    text = engine.generate(ours, prompt, new_tokens, temperature=0)
    with torch.no_grad():
        ref = full_logits(ours, text)
        for name, model in list(formats.items())[1:]:
            logits = full_logits(model, text)
            err = (logits - ref).abs()
            agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"{name}: logit error max {err.max():.4f}, mean {err.mean():.4f} (logits' std "
                  f"{ref.std():.3f}); same top token at {100 * agree:.1f}% of positions")


def qwen_part(dev):
    """Part 4: batch-1 greedy decoding of the Qwen2.5-0.5B shape, ours and transformers', on
    the same random weights (ours are transformers' tensors, not copies)."""
    from nanogpt import hf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    # no end-of-text token: every run generates all of its tokens
    config = Qwen2Config(**shapes.QWEN2_5_0_5B, bos_token_id=None, eos_token_id=None)
    theirs = Qwen2ForCausalLM(config).eval()
    name = "the Qwen2.5-0.5B shape"
    ours_config = checkpoint.model_config(hf.model_args(config.to_dict(), name), name)
    tensors = ((k, list(v.shape), lambda out, transpose, v=v: out.set_(v.detach()))
               for k, v in theirs.state_dict().items())
    ours = checkpoint.fill_model(ours_config, tensors, hf.renamer(ours_config, name), "cpu",
                                 torch.float32, name).eval().to(dev)
    quantize.fast_cpu_linears(ours)  # as sample.py decodes on a CPU
    theirs.to(dev)
    prompt = torch.randint(config.vocab_size, (1, prompt_tokens), device=dev)
    params = sum(p.numel() for p in ours.parameters())
    print(f"\nQwen2.5-0.5B shape ({params / 1e6:.0f}M parameters, {4 * params / 1e9:.2f} GB in float32), "
          f"random weights: batch 1, {prompt_tokens}-token prompt, {qwen_tokens} new tokens, greedy, "
          f"float32, on {dev} ({torch.get_num_threads()} CPU threads)")
    same = engine.generate(ours, prompt, 8, temperature=0)
    with torch.no_grad():
        reference = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                    do_sample=False, pad_token_id=0)
    print(f"the same 8 greedy tokens as transformers: {torch.equal(same, reference)}")

    def timed(fn):
        def run(n):
            with torch.no_grad():
                fn(n)
            hardware.synchronize(dev)
        return run

    runs = {"ours, float32": timed(lambda n: engine.generate(ours, prompt, n, temperature=0)),
            "transformers generate": timed(lambda n: theirs.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                pad_token_id=0))}
    times = time_all(runs, qwen_tokens)
    report(times, qwen_tokens, "transformers generate")
    best = {k: min(v) for k, v in times.items()}
    print(f"ours / transformers: {best['transformers generate'] / best['ours, float32']:.2f}x the "
          f"decode speed (load average now {os.getloadavg()[0]:.1f})")


def on_cpu(dev):
    return torch.device(dev).type == "cpu"


def bandwidth_use(model, times, dev):
    """Decoding reads every weight and the whole cache once per token: how close to the
    device's memory bandwidth each run of ours comes (weights + cache bytes per token x tok/s)."""
    bandwidth = hardware.memory_bandwidth(dev)
    cfg = model.config
    mean_context = prompt_tokens + new_tokens / 2
    per_token = {name: 2 * cfg.n_layer * cfg.n_embd * mean_context * 4 + sum(
        p.numel() * (1 if "int8" in name else 2 if "bfloat16" in name else p.element_size())
        for p in model.parameters()) for name in times if name.startswith("ours")}
    for name, nbytes in per_token.items():
        rate = nbytes * new_tokens / min(times[name])
        print(f"{name}: reads {rate / 1e9:,.1f} GB/s, {100 * rate / bandwidth:.1f}% of the "
              f"device's {bandwidth / 1e9:,.0f} GB/s")


def weight_formats(model):
    """The model with float32, bfloat16 and int8 weights, each in the layout sample.py decodes
    with on a CPU (the float ones: quantize.fast_cpu_linears)."""
    def copy():
        c = build(model.config)
        c.load_state_dict(model.state_dict())
        return c.eval()
    return {"float32 weights": quantize.fast_cpu_linears(model),
            "bfloat16 weights": quantize.fast_cpu_linears(copy().to(torch.bfloat16)),
            "int8 weights": quantize.quantize_int8(copy())}


def full_logits(model, idx):
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits.float()


def char_part():
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)).eval()
    quantize.fast_cpu_linears(model)  # as sample.py decodes on a CPU
    prompt = torch.zeros(1, 1, dtype=torch.long)  # one character, as sample.py's default "\n"

    def batched(n, context_shift=False):
        engine.generate(model, prompt, n, temperature=0.8, top_k=200, context_shift=context_shift,
                        num_return_sequences=char_samples, seed=seed)

    def one_by_one(n):
        for _ in range(char_samples):
            no_cache_generate(model, prompt, n, temperature=0.8, top_k=200)

    shifted = {"ours, batch, context_shift": lambda n: batched(n, context_shift=True)}
    # past the 256-token context, exact decoding recomputes the whole context for every token,
    # as nanoGPT crops it (all positions shift, so cached keys and values go stale), for us and
    # the loop alike; context_shift drops the older half of the context at once instead. Within
    # the context the cache and the batch pay off in full, and context_shift changes nothing
    for tokens in (char_tokens, model.config.block_size - 1):
        print(f"\nchar model (6 x 384, context 256): {char_samples} samples of {tokens} tokens")
        runs = {"ours, one batch": batched,
                **(shifted if tokens > model.config.block_size else {}),
                "no-cache loop, one by one": one_by_one}
        report(time_all(runs, tokens), char_samples * tokens, "no-cache loop, one by one")


def quality_part():
    path = os.path.join(quality_from, "ckpt.pt")
    model, run = checkpoint.load_run(path)
    model.eval()
    T = model.config.block_size
    val = open_dataset(run["config"]["dataset"], T)[0]["val"]
    n = min(len(val) - 1, 200 * T) // T * T  # up to 200 windows of block_size tokens
    x = torch.from_numpy(val[:n].astype(np.int64)).view(-1, T)
    y = torch.from_numpy(val[1:n + 1].astype(np.int64)).view(-1, T)
    print(f"\nval loss of {path} over {n:,} tokens")
    with torch.no_grad():
        for name, m in weight_formats(model).items():
            losses = [F.cross_entropy(full_logits(m, xb).flatten(0, 1), yb.flatten())
                      for xb, yb in zip(x.split(16), y.split(16))]
            print(f"{name:18s} {torch.stack(losses).mean():.4f}")


def check_settings():
    """Refuse settings no measurement can come from, before anything is built."""
    for key in ("repeat", "new_tokens", "prompt_tokens", "char_samples", "char_tokens", "qwen_tokens"):
        if key in globals() and globals()[key] < 1:
            raise UserError(f"{key} must be at least 1, got {globals()[key]}")
    unknown = [p for p in parts.split(",") if p and p not in ("gpt2", "char", "qwen")]
    if unknown:
        raise UserError(f"parts must be a comma-separated list of gpt2, char and qwen, got {parts!r}")
    if gpt2_size not in shapes.GPT2:
        raise UserError(f"gpt2_size must be one of {', '.join(shapes.GPT2)}, got {gpt2_size!r}")
    if prompt_tokens >= 1024:
        raise UserError(f"prompt_tokens={prompt_tokens} does not fit GPT-2's 1024-token context "
                        "with room to generate: choose fewer")


def main():
    configure(globals(), nullable=())
    check_settings()
    dev, _, precision, _ = hardware.setup(device, dtype, training=False)
    if threads < 0:
        raise UserError(f"threads must be 0 (torch's choice) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}\n")
    if "gpt2" in parts.split(","):
        gpt2_part(dev, precision)
    if "char" in parts.split(","):
        char_part()
    if "qwen" in parts.split(","):
        qwen_part(dev)
    if quality_from:
        quality_part()


if __name__ == "__main__":
    run(main)
