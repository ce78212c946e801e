"""
Training on several processes, with PyTorch's own engines. torchrun starts the processes (on
one node or many) and tells each its RANK, LOCAL_RANK and WORLD_SIZE; then, by `parallel`:

- 'ddp' (the default): DistributedDataParallel. Every process holds the whole model, its
  gradients and its optimizer state; the gradients are averaged across processes.
- 'fsdp': FSDP2 (torch.distributed.fsdp.fully_shard). Each Block is sharded, then the root
  (embeddings, tied head, final norm): every process holds 1/N of the parameters, gradients
  and optimizer state, and gathers a block's weights only while it computes with them.

    dist = distributed.setup(device_type, backend, parallel)
    distributed.shard(model, dist, precision, device_type, device)   # FSDP: before the optimizer
    model = distributed.wrap_ddp(model, dist, device_type)            # DDP: after compiling
    with distributed.accumulating(model, raw_model, dist, sync=last_micro_step): ...backward()
    model_state, optimizer_state = distributed.full_state(model, optimizer, dist)   # for ckpt.pt
    distributed.gather(tensor, dist)                     # every process's, e.g. its RNG state
    distributed.collective_device(dist)                  # where a flag all processes share goes
    distributed.finish_processes()                       # the end of the run, all together

A run's ckpt.pt is the same file whatever trained it: the full state, gathered on rank 0, with
the optimizer's state keyed by position as torch.optim writes it, so sample.py, export_hf.py
and a resume with any number of processes (DDP, FSDP or none) read it. A model whose full state
does not fit in one host's memory is saved as a sharded checkpoint instead (sharded_ckpt.py;
consolidate.py makes it a ckpt.pt).
"""

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from nanogpt.optim import Optimizers

# FSDP and torch.distributed.checkpoint are imported by the functions that use them: they are
# slow to import, which a run that uses neither need not pay
PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class Distributed:
    """How this process trains: parallel (None: a single process, else 'ddp' or 'fsdp'), its
    rank among world_size processes and its local_rank (its GPU) on its node."""
    parallel: str | None = None
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def sharded(self):
        return self.parallel == "fsdp"


def setup(device_type, backend=None, parallel="ddp"):
    """The process group torchrun asks for (nccl on CUDA, gloo otherwise), or none when the
    script was started without torchrun. parallel: "ddp" or "fsdp" (train.check_config checks it)."""
    if int(os.environ.get("RANK", -1)) == -1:
        if parallel == "fsdp":
            print("note: parallel=fsdp shards the model across the processes torchrun starts; "
                  "this is one process, so it trains unsharded")
        return Distributed()
    torch_dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
    return Distributed(parallel, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                       int(os.environ["WORLD_SIZE"]))


def shard(model, dist, precision, device_type, device, from_rank0=True):
    """FSDP2 on model, in place: each Block its own unit (its weights gathered for its forward
    and backward, then freed), then the root. On a GPU the blocks compute in the run's precision
    from float32 master weights, and gradients are reduced in float32. from_rank0: rank 0's
    model holds the weights and the others were built on the meta device: each process gets
    its shards from rank 0, so one copy of the model passes through host memory, not one a
    process. Else each process's model is its own: drawn alike, or empty (on the meta device)
    for a sharded checkpoint to fill."""
    if not dist.sharded:
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    whole = model.state_dict() if from_rank0 and dist.rank == 0 else {}
    policy = MixedPrecisionPolicy()
    if device_type == "cuda" and precision != "float32":
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, precision), reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if any(p.is_meta for p in model.parameters()):
        materialize(model, device)
    if from_rank0:
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))


def materialize(model, device):
    """Memory on device for a model built on the meta device (its values: garbage, for a
    checkpoint to fill). Module.to_empty gives every name of a tied parameter a tensor of its
    own: the ties are made again."""
    first, aliases = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        (aliases.append((name, first[id(p)])) if id(p) in first else first.setdefault(id(p), name))
    model.to_empty(device=device)
    for alias, name in aliases:
        if model.get_parameter(alias) is not model.get_parameter(name):
            parent, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(parent), attr, model.get_parameter(name))


def wrap_ddp(model, dist, device_type):
    """model in DistributedDataParallel under parallel=ddp, so that its backward averages the
    gradients across processes; else model itself (FSDP shards it in place: shard)."""
    if dist.parallel != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[dist.local_rank] if device_type == "cuda" else None)


def accumulating(model, raw_model, dist, sync):
    """The context of one micro-step's backward: gradients are reduced across processes only
    when sync (the last micro-step); before, each process accumulates its own."""
    if dist.parallel == "ddp" and not sync:
        return model.no_sync()
    if dist.sharded:
        raw_model.set_requires_gradient_sync(sync)
    return nullcontext()


def collective_device(dist):
    """Where this process group's collectives run (a flag every process must agree on, a state
    gathered from each): NCCL takes CUDA tensors only."""
    return f"cuda:{dist.local_rank}" if torch_dist.get_backend() == "nccl" else "cpu"


def gather(tensor, dist):
    """[each process's tensor] (all of the same shape) on every process, on the CPU."""
    device = collective_device(dist)
    out = [torch.empty_like(tensor, device=device) for _ in range(dist.world_size)]
    torch_dist.all_gather(out, tensor.to(device))
    return [t.cpu() for t in out]


def finish_processes():
    """Ends this process's part of a finished run, with every other process: the last thing
    train.py does under torchrun, after the checkpoint and the logs are written and closed."""
    torch_dist.barrier()  # together: none tears its group down while another still saves
    torch_dist.destroy_process_group()
    # The group outlives its destruction: torch.distributed.nn's functions hold it as their
    # default argument when imported after it was made (torch._dynamo imports them), and
    # DTensor's caches (sharding rules, redistribution plans) hold FSDP's device mesh, which
    # holds it. Its gloo threads then live on into the interpreter's teardown, where now and
    # then they abort the process ("terminate called without an active exception", SIGABRT)
    # after a complete run. With nothing left to write, the process ends here instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -----------------------------------------------------------------------------
# The full state, gathered for ckpt.pt or spread from it

def parameter_names(model, optimizer):
    """The name of each parameter the optimizer updates, in the order its state dict numbers
    them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_position(state):
    """An optimizer state keyed by parameter name (torch.distributed's) keyed by position
    (torch.optim's, what ckpt.pt holds): the names' order in its param groups. An
    optim.Optimizers' state ({"optimizers": [...]}) part by part, as its state_dict has it."""
    if "optimizers" in state:
        return {"optimizers": [by_position(part) for part in state["optimizers"]]}
    position = {n: i for i, n in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {"state": {position[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]}
                             for g in state["param_groups"]]}


def by_name(state, model, optimizer):
    """The inverse of by_position, for the optimizer of model whose state it is."""
    if isinstance(optimizer, Optimizers):
        return {"optimizers": [by_name(part, model, opt) for part, opt in
                               zip(state["optimizers"], optimizer.optimizers, strict=True)]}
    names = parameter_names(model, optimizer)
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in state["param_groups"]]}


def named_optimizer_state(model, optimizer, options=None):
    """The optimizer's state keyed by parameter name (torch.distributed's get_optimizer_state_dict:
    under FSDP this process's shards, or whole with options' full_state_dict); an
    optim.Optimizers' part by part, as {"optimizers": [...]}, the shape of its state_dict."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if isinstance(optimizer, Optimizers):
        return {"optimizers": [named_optimizer_state(model, opt, options) for opt in optimizer.optimizers]}
    return get_optimizer_state_dict(model, optimizer, options=options)


def set_named_optimizer_state(model, optimizer, state, options=None):
    """Load a state of named_optimizer_state's form into optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if isinstance(optimizer, Optimizers):
        for opt, part in zip(optimizer.optimizers, state["optimizers"], strict=True):
            set_named_optimizer_state(model, opt, part, options)
        return
    set_optimizer_state_dict(model, optimizer, state, options=options)


def full_state(model, optimizer, dist):
    """(model state, optimizer state) whole, as one process would have them: under FSDP
    gathered from every process (all must call this) into rank 0's memory, the other ranks
    getting (None, None); otherwise (None, None), meaning the model's and optimizer's own."""
    if not dist.sharded:
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = named_optimizer_state(model, optimizer, options)
    if dist.rank != 0:
        return None, None
    return model_state, by_position(optimizer_state)


def load_full_optimizer_state(model, optimizer, state, dist):
    """Load a ckpt.pt's optimizer state (whole, keyed by position): under FSDP each process
    keeps its shard of it."""
    if not dist.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    set_named_optimizer_state(model, optimizer, by_name(state, model, optimizer),
                              StateDictOptions(full_state_dict=True))
