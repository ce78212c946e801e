"""
How fast HellaSwag is scored: ours (hellaswag.evaluate: --batch_size examples a forward pass,
padded) against a plain transformers loop, build-nanogpt's way (GPT2LMHeadModel, one example's
four rows a forward pass), on the same model and examples; both must pick the same endings.

$ python bench/hellaswag.py                          # gpt2's shape, 64 examples, on the CPU
$ python bench/hellaswag.py --device=cuda --examples=1000 --batch_size=32

The model has GPT-2 (124M)'s shape (--model: any of bench/shapes.py's GPT-2 sizes) with random
weights, saved as a model folder both load; the examples are in the validation file's format,
made from Shakespeare's lines (no download). Figures: examples a second, the best of --repeats.
Needs transformers (requirements-test.txt).
"""

import os
import random
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

from nanogpt import hardware  # noqa: E402
import hellaswag  # noqa: E402
from bench import shapes  # noqa: E402
from nanogpt.checkpoint import load_model  # noqa: E402
from configurator import configure, run  # noqa: E402

# -----------------------------------------------------------------------------
model = "gpt2"  # the shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl
examples = 64  # examples scored each time
batch_size = 16  # ours: examples a forward pass
device = "cpu"
repeats = 2  # the figures are the best of these
# -----------------------------------------------------------------------------


def made_examples(n):
    """n examples in HellaSwag's format: a Shakespeare line as the context, four others as endings."""
    from data.shakespeare_char.prepare import fetch_text
    shared = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "tinyshakespeare", "input.txt")
    text, _ = fetch_text(shared if os.path.exists(shared) else "", cache_dir=os.path.join(REPO_DIR, "data", "shakespeare_char"))
    lines = [line for line in text.splitlines() if len(line) > 30 and ":" not in line]
    rng = random.Random(0)
    return [{"ctx": rng.choice(lines), "endings": [rng.choice(lines) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(n)]


@torch.no_grad()
def transformers_loop(hf, tokenizer, chosen, dev):
    """build-nanogpt's evaluation: an example's four rows a forward pass; (right, right_norm)."""
    right = right_norm = 0
    for example in chosen:
        context = tokenizer.encode(example["ctx"])
        rows = [context + tokenizer.encode(" " + ending) for ending in example["endings"]]
        tokens = torch.zeros(4, max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(context):len(row)] = 1
        tokens, mask = tokens.to(dev), mask.to(dev)
        logits = hf(tokens).logits
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        total = (losses * mask[:, 1:]).sum(1)
        right += int(total.argmin()) == example["label"]
        right_norm += int((total / mask[:, 1:].sum(1)).argmin()) == example["label"]
    return right, right_norm


def best_time(fn, repeats, device):
    """(the result of fn(), its fastest wall time in seconds)."""
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        hardware.synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    return result, fastest


def main():
    cfg = configure(globals(), nullable=())
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, n_head, n_embd = shapes.GPT2[cfg["model"]]
    dev, n, rows = cfg["device"], cfg["examples"], cfg["batch_size"]
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).eval()
    chosen = made_examples(n)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours, tokenizer = load_model(folder, dev)
    hf.to(dev)
    scores, ours_s = best_time(lambda: hellaswag.evaluate(ours, tokenizer, chosen, dev, rows), cfg["repeats"], dev)
    (right, right_norm), peer_s = best_time(lambda: transformers_loop(hf, tokenizer, chosen, dev), cfg["repeats"], dev)
    assert (round(scores["acc"] * n), round(scores["acc_norm"] * n)) == (right, right_norm), \
        "the two ways picked different endings"
    print(f"ours ({rows} examples a pass): {n / ours_s:.1f} examples/s")
    print(f"transformers loop (one example a pass): {n / peer_s:.1f} examples/s")
    print(f"ours / transformers: {peer_s / ours_s:.2f}x  ({cfg['model']}, {n} examples, {dev}, torch {torch.__version__})")


if __name__ == "__main__":
    run(main)
