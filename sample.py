"""
Sample from a trained model, or from pretrained GPT-2 weights:

$ python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --temperature=0.8 --top_k=50
$ python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9 --num_samples=3
$ python sample.py --init_from=gpt2 --start=FILE:prompts.txt --temperature=0 --stop=.    # one sentence each
$ python sample.py --init_from=gpt2 --num_beams=5 --temperature=0 --num_samples=1 --num_return_sequences=3

Decoding is engine.py's: a KV cache, Hugging Face's decoding options, and every sample of every
prompt in one batch. A lone sample is printed as it is produced.
The checkpoint carries its tokenizer, so no data folder is needed.
`python sample.py --help` lists every setting.
"""

import sys
import time

from configurator import configure, run  # first: Ctrl-C while the rest loads exits quietly

from nanogpt import checkpoint
from nanogpt import engine
from nanogpt.errors import UserError
from nanogpt.quantize import fast_cpu_linears, quantize_int8
from nanogpt.reading import parse_json, read_bytes

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' loads out_dir/ckpt.pt; or gpt2 ... gpt2-xl, a hub id, a folder, a nanoGPT ckpt.pt
out_dir = "out"
start = "\n"  # the prompt; "FILE:prompts.txt" has one prompt a line, "FILE:prompts.jsonl" one JSON string a line
# the decoding flags (temperature, top_k, num_samples, stop, ...): engine.DecodingOptions' fields
# and engine.SCRIPT_FLAGS, which say what each does; chat.py takes them too
globals().update(engine.decoding_flags())
FLAG_HELP = engine.decoding_flag_help()  # what each of them does, for --help
skip_special_tokens = False  # True: special tokens (<|endoftext|>, [CLS], ...) are not printed
return_full_text = True  # False: print the generated text only, not the prompt before it
stream = True  # print a lone sample as it is produced
device: str | None = None  # None (or 'auto') picks cuda, then mps, then cpu
dtype: str | None = None  # weights in 'float32', 'bfloat16' or 'float16'; None (or 'auto'): float32 on CPUs (fastest there), else the GPU's best
quantize: str | None = None  # 'int8': int8 weights in every matmul, for fast decoding on a CPU
compile = False  # compile the one-token decode step (CUDA graphs on a GPU); pays off for long generations
merge_lora = True  # a LoRA run: bake its adapters into the base weights, to decode at the base's speed
# -----------------------------------------------------------------------------


def read_prompts(text):
    """The prompts --start gives: the text itself, or a file's. A .jsonl file holds one JSON
    string a line; any other file one prompt a line, except that a file of one line is one
    prompt, newline included, as nanoGPT reads it. Blank lines are skipped."""
    if not isinstance(text, str):
        raise UserError(f"start must be the prompt's text or FILE:path, got {text!r} (an empty "
                        "prompt is --start='')")
    if not text.startswith("FILE:"):
        return [text]
    path = text[len("FILE:"):]
    data = read_bytes(path, f"prompt file {path!r}")
    if b"\0" in data:
        raise UserError(f"prompt file {path!r} is binary (it holds NUL bytes, first at byte "
                        f"{data.index(0)}), not text: give a UTF-8 text file")
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path!r} is not UTF-8 text (byte {e.start}: {e.reason}): "
                        "save it as UTF-8") from None
    lines = content.splitlines()
    if not path.endswith(".jsonl"):
        prompts = [content] if len(lines) <= 1 else [line for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            prompts.append(parse_json(line, f"{path}, line {n}"))
            if not isinstance(prompts[-1], str):
                raise UserError(f"{path}, line {n}: each line must be a JSON string (a prompt)")
    if not prompts:
        raise UserError(f"prompt file {path!r} holds no prompt")
    return prompts


def encode_prompt(tokenizer, text):
    ids = tokenizer.encode(text)
    if tokenizer.bos_token is not None:  # BERT vocabularies: [CLS] starts a text
        return [tokenizer.bos_token] + ids
    if ids:
        return ids
    if tokenizer.eot_token is None:
        raise UserError("the prompt is empty: give --start some text (this tokenizer has no "
                        "end-of-text token to start from)")
    return [tokenizer.eot_token]  # GPT-2 samples unconditionally after its end-of-text token


def check_generation_memory(model, n_prompts, prompt_width, options, device):
    """Refuse, before anything is allocated, a generation whose buffers cannot fit in memory:
    the token ids (int64), the KV cache and a step's logits for every row (num_samples or
    num_beams per prompt) over the prompt and max_new_tokens. Counted from the sizes, against
    this machine's memory (a CUDA device's free memory when it runs there)."""
    from nanogpt import hardware
    cfg = model.config
    rows = n_prompts * max(options.num_beams, options.num_return_sequences)
    total = prompt_width + options.max_new_tokens
    itemsize = next(model.parameters()).element_size()
    cache = 2 * cfg.n_layer * rows * cfg.kv_heads * min(cfg.block_size, total) * cfg.head_size * itemsize
    need = rows * total * 8 + cache + 4 * rows * cfg.vocab_size * 4
    have, where = hardware.memory(device, free=True)
    if need > have:
        raise UserError(f"{rows:,} rows (num_samples or num_beams per prompt) of {total:,} tokens "
                        f"(max_new_tokens={options.max_new_tokens:,} after the prompt) need "
                        f"{need / 1e9:,.1f} GB for their ids, KV cache and logits, more than the "
                        f"{have / 1e9:,.0f} GB {where}: lower num_samples or max_new_tokens")


def load(cfg):
    """The model (in the layout it decodes with), its tokenizer, the prompts' ids and the
    DecodingOptions that the settings cfg give; and a note on the decoding defaults that came
    from the model's folder ("" if none did)."""
    if not cfg["init_from"]:
        raise UserError("init_from must be 'resume', a GPT-2 size (gpt2 ... gpt2-xl), a hub id, "
                        "a model folder or a nanoGPT ckpt.pt")
    if cfg["quantize"] not in (None, "int8"):
        raise UserError(f"quantize must be None or 'int8', got {cfg['quantize']!r}")
    texts = read_prompts(cfg["start"])
    # the parameters are loaded in the run's precision (bfloat16 / float16 halve memory)
    model, tokenizer = checkpoint.load_for_decoding(cfg, merge_lora=cfg["merge_lora"])
    dev = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    # the model folder's generation_config.json decides what the user leaves unset
    flags, note = engine.with_generation_config(cfg, cfg.passed, tokenizer)
    options = engine.options_from_flags(flags, cfg.passed, tokenizer, max(map(len, prompts)))
    check_generation_memory(model, len(prompts), max(map(len, prompts)), options, dev)
    # this script owns the model: on a CPU its Linear layers get the layout that decodes fastest
    if cfg["quantize"] == "int8":
        quantize_int8(model)
    else:
        fast_cpu_linears(model)
    return model, tokenizer, prompts, options, note


def main():
    # None only where the default is None, and for the Optional fields: top_k (keep all), seed (unseeded)
    cfg = configure(globals(), nullable=engine.NULLABLE_FLAGS)  # .passed: what the user set
    stops = engine.check_stop_strings(cfg["stop"])
    model, tokenizer, prompts, options, note = load(cfg)
    stop_tokens = engine.stop_token_ids(model, tokenizer, cfg["eos_token_id"])
    pad_token_id = engine.pad_token_id(model, cfg["pad_token_id"])

    # each prompt has options.num_return_sequences rows of output, and each row a TextStream
    # that hides the stop strings (and, for a lone sample, prints the text as it comes)
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=cfg["skip_special_tokens"])

    # the token encode_prompt puts first ([CLS]) is the model's, not the user's text: it is fed
    # but not shown, as transformers' text-generation pipeline shows the prompt as typed
    shown = [p[1:] if tokenizer.bos_token is not None else p for p in prompts]
    streams = [engine.TextStream(decode, p, stops, show_prompt=cfg["return_full_text"])
               for p in shown for _ in range(options.num_return_sequences)]
    beams = options.num_beams > 1
    live = cfg["stream"] and len(streams) == 1 and not beams
    if live:
        print(streams[0].flush(), end="", flush=True)

    def on_token(row, token):
        text = streams[row].add(token)
        if live:
            print(text, end="", flush=True)
        return streams[row].stopped

    t0 = time.perf_counter()
    out = engine.generate(model, prompts, stop_tokens=stop_tokens, stop_strings=stops,
                          tokenizer=tokenizer, pad_token_id=pad_token_id,
                          on_token=None if beams else on_token,
                          compile=cfg["compile"], **vars(options))
    seconds = time.perf_counter() - t0
    if beams:  # beam search chooses its sequences at the end: read them now
        width = max(map(len, prompts))
        for row, tokens in enumerate(out[:, width:].tolist()):
            for token in tokens:
                if token in stop_tokens or token == engine.PAD or streams[row].stopped:
                    break
                on_token(row, token)
    for s in streams:
        print(s.flush() if live else s.shown_text())
        print("---------------")
    new = sum(s.new_tokens for s in streams)
    print(f"{len(prompts)} prompt(s) of {sum(map(len, prompts))} tokens; {new} tokens generated "
          f"in {seconds:.2f} s, {new / max(seconds, 1e-9):.1f} tok/s{'; ' + note if note else ''}",
          file=sys.stderr)


if __name__ == "__main__":
    run(main)
