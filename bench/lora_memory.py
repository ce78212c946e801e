"""
Training-state memory of the three ways to fine-tune, on a gpt2-medium-shaped model (random
weights), measured in one run:

$ python bench/lora_memory.py                                        # gpt2-medium: 24 x 1024
$ python bench/lora_memory.py --n_layer=12 --n_head=12 --n_embd=768    # gpt2

The training state is what a run holds besides activations: the parameters, their gradients and
AdamW's two moments. Each way takes an optimizer step on random tokens, then the bytes of those
tensors are summed: full fine-tuning keeps gradients and moments for every parameter, LoRA
for its adapters only. The last line gives LoRA's state as a fraction of full fine-tuning's.
"""

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from nanogpt.checkpoint import model_config  # noqa: E402
from configurator import configure, run  # noqa: E402
from model import GPT  # noqa: E402
from nanogpt.optim import configure_optimizers  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from train import check_memory, setup_finetune  # noqa: E402

# -----------------------------------------------------------------------------
n_layer = 24  # gpt2-medium's shape
n_head = 16
n_embd = 1024
vocab_size = 50257
block_size = 1024
tokens = 128  # the length of the one sequence each step trains on: activations are not counted
freeze_layers: int | None = None  # finetune='freeze' as train.py does it: the embeddings and this many blocks; None: half
lora_rank = 8  # LoRA as train.py's defaults
lora_alpha = 16.0
lora_targets = "c_attn,c_proj,c_fc"
seed = 1337
# -----------------------------------------------------------------------------


def step(model):
    """One AdamW step on random tokens, as train.py takes them; returns the optimizer."""
    optimizer = configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), "cpu")
    x = torch.randint(vocab_size, (1, tokens))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    return optimizer


def state_bytes(model, optimizer):
    """(parameters, gradients, optimizer state) in bytes; the tied embedding counts once."""
    params = list(model.parameters())
    moments = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return (sum(p.nbytes for p in params),
            sum(p.grad.nbytes for p in params if p.grad is not None),
            sum(t.nbytes for t in moments))


def main():
    configure(globals(), nullable=("freeze_layers",))
    torch.manual_seed(seed)
    config = model_config(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                               block_size=block_size, bias=True))
    if not 1 <= tokens <= block_size:
        raise UserError(f"tokens must be in 1 ... block_size ({block_size}), got {tokens}")
    check_memory(dataclasses.asdict(config), "cpu")  # full fine-tuning's state, before it is built
    model = GPT(config)
    frozen = n_layer // 2 if freeze_layers is None else freeze_layers
    lora_settings = dict(rank=lora_rank, alpha=lora_alpha, dropout=0.0, targets=lora_targets)
    ways = {"full": ("full", 0), f"freeze {frozen}": ("freeze", frozen), f"lora r={lora_rank}": ("lora", 0)}
    gib = 2 ** 30
    total = sum(p.numel() for p in model.parameters())
    print(f"{n_layer} layers x {n_embd}, {total / 1e6:.1f}M parameters, float32; "
          f"one step of {tokens} tokens\n")
    print(f"{'finetune':>12} {'trainable':>12} {'params':>9} {'grads':>9} {'AdamW':>9} {'total':>9}")
    totals = {}
    for name, (mode, layers) in ways.items():
        # every way starts from the whole model, trainable
        trainable, _ = setup_finetune(model.requires_grad_(True), mode, layers, lora_settings)
        optimizer = step(model)
        sizes = state_bytes(model, optimizer)
        totals[name] = sum(sizes)
        print(f"{name:>12} {trainable:>12,} "
              + " ".join(f"{b / gib:>5.2f} GiB" for b in (*sizes, totals[name])))
        del optimizer
        model.zero_grad(set_to_none=True)  # free this way's state before the next one
    full, lora_way = totals["full"], totals[f"lora r={lora_rank}"]
    print(f"\nLoRA's training state is {lora_way / full:.3f} of full fine-tuning's "
          f"({full / lora_way:.1f}x smaller)")


if __name__ == "__main__":
    run(main)
