"""
The optimizer of a training run: which parameters get which update and how much weight decay.

    optimizer = configure_optimizers(model, weight_decay, learning_rate, betas, device_type, "muon")

optim="adamw" is nanoGPT's: AdamW for every trainable parameter, weight decay on matrices
(matmul weights, embeddings) only, biases and LayerNorm gains undecayed.
optim="muon": PyTorch's Muon for the 2-D matrices inside the blocks and AdamW for the rest
(embeddings, the tied head, gains, biases), as Muon's authors advise. Muon orthogonalises each
matrix's update (Newton-Schulz iterations); with the update scaled to AdamW's size
(adjust_lr_fn="match_rms_adamw") one learning rate serves both. It learns far more per step
(docs/benchmarks.md has the CPU figures).
"""

import inspect

import torch

from nanogpt.errors import UserError

OPTIMIZERS = ("adamw", "muon")


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, kind="adamw"):
    """The optimizer for the parameters of model that train (requires_grad)."""
    if kind not in OPTIMIZERS:
        raise UserError(f"optim must be 'adamw' or 'muon', got {kind!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_blocks = {id(p) for p in model.blocks.parameters()}
    to_muon = {n for n, p in named if kind == "muon" and p.dim() == 2 and id(p) in in_blocks}
    muon = [p for n, p in named if n in to_muon]
    rest = [p for n, p in named if n not in to_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel does the whole update in one launch per group
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {}
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
    if not muon:
        return adamw
    return Optimizers(adamw, torch.optim.Muon(muon, lr=learning_rate, weight_decay=weight_decay,
                                              adjust_lr_fn="match_rms_adamw"))


class Optimizers:
    """Several optimizers that step as one, each over its own parameters: train.py sets the
    learning rate of every group, steps, zeroes and checkpoints them as it would one optimizer
    (and torch.amp.GradScaler unscales and steps them through param_groups and step())."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)
