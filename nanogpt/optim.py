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
    muon_type = ShardedMuon if sharded else BatchedMuon
    return Optimizers(adamw, muon_type(muon, lr=learning_rate, weight_decay=weight_decay,
                                       adjust_lr_fn="match_rms_adamw"))


class BatchedMuon(torch.optim.Muon):
    """PyTorch's Muon, with the Newton-Schulz iterations of same-shaped matrices run as one
    batch: a model has a few shapes (a block's attention and MLP matrices, the MLP's two
    transposed alike), each repeated in every block, and torch's step launches every matmul
    of every iteration for each matrix in turn. On a small model those launches, not the
    arithmetic, are the optimizer's time. The update is torch's: the same momentum, the same
    iterations in bfloat16 (on each matrix of the batch), the same learning-rate scaling."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr  # torch's own scaling (torch is pinned)

        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            lr, momentum = group["lr"], group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            # tall matrices are orthogonalised as their (wide) transposes, as torch does: an
            # MLP's up and down projections then share one batch
            batches = {}
            for p, update in zip(params, updates):
                wide = update.mT if p.size(0) > p.size(1) else update
                batches.setdefault(wide.shape, []).append((p, wide))
            for shape, pairs in batches.items():
                ortho = orthogonalize(torch.stack([w for _, w in pairs]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"])
                ps = [p for p, _ in pairs]
                steps = [o.mT if p.size(0) > p.size(1) else o for p, o in zip(ps, ortho.unbind(0))]
                torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
                torch._foreach_add_(ps, steps, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], shape))
        return loss


def closure_loss(closure):
    """The loss of an optimizer step's closure (run with gradients on, as torch's optimizers
    run it), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def orthogonalize(updates, coefficients, steps, eps):
    """torch's Newton-Schulz iterations (torch.optim._muon._zeropower_via_newtonschulz) on a
    batch of same-shaped wide matrices (n, rows <= cols), each as torch does it alone: in
    bfloat16, scaled to a norm of at most 1 first."""
    a, b, c = coefficients
    x = updates.bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


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

        loss = closure_loss(closure)
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
