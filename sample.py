"""
Sample from a trained model:

$ python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --temperature=0.8 --top_k=50

The checkpoint carries its tokenizer, so no data folder is needed.
`python sample.py --help` lists every setting.
"""

import os
import torch

import hardware
from checkpoint import load_checkpoint
from configurator import UserError, configure, run
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' loads out_dir/ckpt.pt
out_dir = "out"
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 10
max_new_tokens = 500
temperature = 0.8  # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
top_k = 200  # keep only the top_k most likely tokens; None keeps all
seed = 1337
device = None  # None picks cuda, then mps, then cpu
dtype = None  # 'float32', 'bfloat16' or 'float16'; None picks the device's best
compile = False  # torch.compile the model (pays off only for long generations on CUDA)
# -----------------------------------------------------------------------------


def read_prompt(text):
    if not text.startswith("FILE:"):
        return text
    path = text[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read prompt file {path!r}: {e.strerror}") from None


def load_model(ckpt_path, dev):
    checkpoint = load_checkpoint(ckpt_path, map_location=dev)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    # checkpoints from a compiled model (e.g. nanoGPT's) prefix every key with _orig_mod.
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    if checkpoint.get("tokenizer") is None:
        raise UserError(f"checkpoint {ckpt_path} does not say which tokenizer it uses")
    return model, load_tokenizer(checkpoint["tokenizer"])


def main():
    configure(globals())
    if init_from != "resume":
        raise UserError(f"init_from must be 'resume', got {init_from!r}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1 or None, got {top_k}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")

    dev, _, _, autocast = hardware.setup(device, dtype)

    model, tokenizer = load_model(os.path.join(out_dir, "ckpt.pt"), dev)
    prompt_ids = tokenizer.encode(read_prompt(start))
    if not prompt_ids:
        raise UserError("the prompt is empty: give --start some text")
    model.eval().to(dev)
    if compile:
        model = torch.compile(model)

    torch.manual_seed(seed)
    x = torch.tensor(prompt_ids, dtype=torch.long, device=dev)[None, :]
    with torch.no_grad(), autocast:
        for _ in range(num_samples):
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    run(main)
