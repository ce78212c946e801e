"""
The optimizer of a training run: which parameters get which update and how much weight decay.

    optimizer = configure_optimizers(model, weight_decay, learning_rate, betas, device_type, "muon")

optim="adamw" is nanoGPT's: AdamW for every trainable parameter, weight decay on matrices
(matmul weights, embeddings) only, biases and LayerNorm gains undecayed.
optim="muon": PyTorch's Muon for the 2-D matrices inside the blocks and AdamW for the rest
(embeddings, the tied head, gains, biases), as Muon's authors advise. Muon orthogonalises each
matrix's update (Newton-Schulz iterations); with the update scaled to AdamW's size
(adjust_lr_fn="match_rms_adamw") one learning rate serves both. It learns far more per step
(docs/benchmarks.md has the CPU figures). Under FSDP2 (sharded=True) the matrices are
shards (DTensors): ShardedMuon orthogonalises each update whole, gathered.
"""

import inspect

import torch

from nanogpt.errors import UserError

OPTIMIZERS = ("adamw", "muon")


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, kind="adamw",
                         sharded=False):
    """The optimizer for the parameters of model that train (requires_grad); sharded: model's
    parameters are FSDP2's shards (distributed.shard)."""
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
    muon_type = ShardedMuon if sharded else torch.optim.Muon
    return Optimizers(adamw, muon_type(muon, lr=learning_rate, weight_decay=weight_decay,
                                       adjust_lr_fn="match_rms_adamw"))


class ShardedMuon(torch.optim.Muon):
    """PyTorch's Muon for matrices that FSDP2 shards by rows (DTensors), each process holding
    some rows. The momentum is elementwise, so it stays in shards; the Newton-Schulz iterations
    need the whole matrix: each process gathers the update (one all-gather a matrix), runs them
    on it and applies its own rows: exactly the update of one process's Muon, whose work every
    process repeats. Torch's own step would run the iterations on the DTensors, gathering
    pieces at every matmul of every iteration."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import distribute_tensor
        # torch's own pieces of Muon (torch is pinned: requirements.txt), so the update is
        # the one torch.optim.Muon makes of the whole matrix
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"],
                                                    group["ns_steps"], group["eps"])
                # this process's rows of it: every process holds the whole, so none is sent
                own = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(own, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


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
