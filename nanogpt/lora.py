"""
LoRA adapters: fine-tuning a low-rank change to a model's Linear layers instead of the layers.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) leaves a pretrained Linear's weight W
as it is and learns a low-rank change to it:

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T     A: (rank, in), B: (out, rank)

Only A and B train: rank * (in + out) numbers instead of in * out, so their gradients and
AdamW's two moments are tiny, and a checkpoint holds them and a reference to the base model.
B starts at zero, so the adapted model starts out computing exactly what the base does.

    lora.apply(model, 8, 16, 0.0, "c_attn,c_proj,c_fc")  # adapters on those; all else frozen
    lora.apply(model, ..., adapters=saved)  # ... holding a run's saved adapters
    lora.adapters(model)                   # {name: tensor} of the A and B matrices
    lora.merge(model)                      # bake the adapters into the weights: a plain GPT

A LoRA run's checkpoint (checkpoint.py) holds lora.adapters(model) and where the base came from.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from nanogpt.errors import UserError


class LoRALinear(nn.Module):
    """A Linear layer plus a trainable low-rank update (the formula above). The weight and bias
    are the wrapped layer's own tensors under the same names, so the model's state dict keeps
    the base model's keys and only adds lora_A and lora_B."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        like = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, **like))
        # A starts as nn.Linear's weights do, B at zero: the update starts at exactly zero but
        # its gradient does not (as in the paper's code and peft)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # alpha / rank keeps the update's size, and so a good learning rate, about the same
        # whatever the rank (the paper's reason)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)  # on the adapter's input only: the base path is as it was

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged(self):
        """An nn.Linear computing the same as this layer (without dropout): W + (alpha/rank) B A."""
        out_features, in_features = self.weight.shape
        with torch.device("meta"):  # no memory for an init that is about to be replaced
            linear = nn.Linear(in_features, out_features, bias=self.bias is not None)
        with torch.no_grad():  # in float32, so a bfloat16 base does not round the update away
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
        linear.bias = self.bias
        return linear


def linear_paths(block):
    """The paths of a block's Linear layers: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj."""
    return [path for path, module in block.named_modules() if isinstance(module, nn.Linear)]


def parse_targets(targets, block):
    """The Linear paths of a block named by targets, a comma-separated list matched against the
    end of each path as peft's target_modules are: c_proj names attn.c_proj and mlp.c_proj,
    mlp.c_proj only the MLP's; a Llama-style block's are q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj and down_proj."""
    paths = linear_paths(block)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UserError(f"lora_targets is empty: name some of {', '.join(paths)}")
    chosen = []
    for name in names:
        matches = [p for p in paths if p == name or p.endswith("." + name)]
        if not matches:
            short = sorted({p.rpartition(".")[2] for p in paths})
            raise UserError(f"unknown lora target {name!r}: choose from {', '.join(short)}, "
                            f"or a full path ({', '.join(paths)})")
        chosen += [p for p in matches if p not in chosen]
    return chosen


def apply(model, rank, alpha, dropout, targets, adapters=None):
    """Put LoRA adapters on the targeted Linears of every block of a GPT and freeze all else;
    adapters: saved adapter matrices (a run's) to start from, instead of B = 0."""
    if rank < 1:
        raise UserError(f"lora_rank must be at least 1, got {rank}")
    if not 0 <= dropout < 1:
        raise UserError(f"lora_dropout must be in [0, 1), got {dropout}")
    model.requires_grad_(False)
    for block in model.blocks:
        for path in parse_targets(targets, block):
            parent, _, name = path.rpartition(".")
            parent = block.get_submodule(parent)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    if adapters is not None:
        load_adapters(model, adapters)
    return model


def lora_layers(model):
    """(parent module, attribute name, LoRALinear) for every adapter of the model."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if isinstance(child, LoRALinear)]


def adapters(model):
    """{name: tensor} of every adapter matrix of a model (or of its state dict): what a LoRA
    checkpoint stores of the model."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {name: p for name, p in state.items() if name.endswith((".lora_A", ".lora_B"))}


def load_adapters(model, state):
    """Copy saved adapter matrices into a model that has had apply() with the same settings."""
    own = adapters(model)
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        raise UserError(f"the saved adapters ({len(state)} tensors) do not fit this model's "
                        f"({len(own)}): the base model or the LoRA settings differ")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
    return model


def merge(model):
    """Bake every adapter into its layer's weight and put plain Linears back: the model computes
    the same (up to rounding) at the base model's speed, and saves and exports as any GPT.
    It is a whole model again, so every parameter is trainable again."""
    for parent, name, layer in lora_layers(model):
        setattr(parent, name, layer.merged())
    return model.requires_grad_(True)

