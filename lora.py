"""
Fine-tuning less than the whole model: frozen lower layers, or LoRA adapters.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) leaves a pretrained Linear's weight W
as it is and learns a low-rank change to it:

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T     A: (rank, in), B: (out, rank)

Only A and B train: rank * (in + out) numbers instead of in * out, so their gradients and
AdamW's two moments are tiny, and a checkpoint holds them and a reference to the base model.
B starts at zero, so the adapted model starts out computing exactly what the base does.

    lora.freeze(model, n)                  # embeddings and the lowest n blocks stop training
    lora.apply(model, 8, 16, 0.0, "c_attn,c_proj,c_fc")  # adapters on those; all else frozen
    lora.adapters(model)                   # {name: tensor} of the A and B matrices
    lora.load_adapters(model, adapters)
    lora.merge(model)                      # bake the adapters into the weights: a plain GPT
    lora.load_model(source, merge_adapters=True)  # load_pretrained that also reads a LoRA run
"""

import math
import os
import pickle
import zipfile

import torch
from torch import nn
from torch.nn import functional as F

from configurator import UserError
from pretrained import load_pretrained


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
    mlp.c_proj only the MLP's."""
    paths = linear_paths(block)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UserError(f"lora_targets is empty: name some of {', '.join(paths)}")
    chosen = []
    for name in names:
        matches = [p for p in paths if p == name or p.endswith("." + name)]
        if not matches:
            raise UserError(f"unknown lora target {name!r}: choose from c_attn, c_proj, c_fc, "
                            f"or a full path ({', '.join(paths)})")
        chosen += [p for p in matches if p not in chosen]
    return chosen


def apply(model, rank, alpha, dropout, targets):
    """Put LoRA adapters on the targeted Linears of every block of a GPT and freeze all else."""
    if rank < 1:
        raise UserError(f"lora_rank must be at least 1, got {rank}")
    if not 0 <= dropout < 1:
        raise UserError(f"lora_dropout must be in [0, 1), got {dropout}")
    model.requires_grad_(False)
    for block in model.transformer.h:
        for path in parse_targets(targets, block):
            parent, _, name = path.rpartition(".")
            parent = block.get_submodule(parent)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return model


def freeze(model, n_layers):
    """Freeze the embeddings and the lowest n_layers blocks of a GPT. The output head is tied
    to the token embedding, so it stays as it is too."""
    blocks = model.transformer.h
    if not 0 <= n_layers <= len(blocks):
        raise UserError(f"freeze_layers={n_layers}, but the model has {len(blocks)} layers: "
                        f"choose 0 ... {len(blocks)}")
    for module in (model.transformer.wte, model.transformer.wpe, *blocks[:n_layers]):
        module.requires_grad_(False)
    return model


def count_params(model):
    """(trainable, total) parameter counts; the tied embedding / head counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_layers(model):
    """(parent module, attribute name, LoRALinear) for every adapter of the model."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if isinstance(child, LoRALinear)]


def adapters(model):
    """{name: tensor} of every adapter matrix: what a LoRA checkpoint stores of the model."""
    return {name: p for name, p in model.state_dict().items() if name.endswith((".lora_A", ".lora_B"))}


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


# -----------------------------------------------------------------------------
# LoRA checkpoints: the adapters and a reference to the base model, which is loaded again

def checkpoint_entries(model, base):
    """What a LoRA run's checkpoint holds in place of the model's weights. A base given as a
    local path is stored as an absolute one, so the run can be loaded from anywhere."""
    return {"adapters": adapters(model), "base": os.path.abspath(base) if os.path.exists(base) else base}


def checkpoint_path(source):
    """The ckpt.pt that source names (itself, or the one in the folder), as load_pretrained reads it."""
    return os.path.abspath(source if os.path.isfile(source) else os.path.join(source, "ckpt.pt"))


def read_lora_checkpoint(source):
    """The checkpoint at source (a ckpt.pt, or a folder holding one) if it is a LoRA run's,
    else None. The file is memory-mapped, not read: a full model's checkpoint costs nothing to
    look at. An unreadable one is left for load_pretrained to report."""
    path = checkpoint_path(source)
    if not os.path.isfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile):
        return None
    return checkpoint if isinstance(checkpoint, dict) and "adapters" in checkpoint else None


def load_model(source, merge_adapters=False, **kwargs):
    """(model, tokenizer) as pretrained.load_pretrained(source, **kwargs) gives them, and from a
    LoRA run too (its out_dir or ckpt.pt): the base model it refers to, with its adapters
    applied, and baked into the weights if merge_adapters."""
    checkpoint = read_lora_checkpoint(source)
    if checkpoint is None:
        return load_pretrained(source, **kwargs)
    if checkpoint_path(checkpoint["base"]) == checkpoint_path(source):
        raise UserError(f"{source} names itself as its base model (the base was overwritten)")
    # the base may be a LoRA run itself: it comes merged, as a plain model
    model, tokenizer = load_model(checkpoint["base"], merge_adapters=True, **kwargs)
    config, args = checkpoint["config"], checkpoint["model_args"]
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if getattr(model.config, key) != args[key]:
            raise UserError(f"{source} was trained on a base with {key}={args[key]}, but its base "
                            f"{checkpoint['base']} now has {getattr(model.config, key)}")
    apply(model, config["lora_rank"], config["lora_alpha"], config["lora_dropout"], config["lora_targets"])
    load_adapters(model, checkpoint["adapters"])
    return (merge(model) if merge_adapters else model), tokenizer
