"""
Training on several processes, with PyTorch's own engines. torchrun starts the processes (on
one node or many) and tells each its RANK, LOCAL_RANK and WORLD_SIZE; then, by `parallel`:

- 'ddp' (the default): DistributedDataParallel. Every process holds the whole model, its
  gradients and its optimizer state; the gradients are averaged across processes.
- 'fsdp': FSDP2 (torch.distributed.fsdp.fully_shard). Each Block is sharded, then the root
  (embeddings, tied head, final norm): every process holds 1/N of the parameters, gradients
  and optimizer state, and gathers a block's weights only while it computes with them.

    dist = distributed.setup(device_type, backend, kind)
    distributed.shard(model, dist, precision)             # FSDP: in place, before the optimizer
    with distributed.accumulating(model, raw_model, dist, sync=last_micro_step): ...backward()
    model_state, optimizer_state = distributed.full_state(model, optimizer, dist)   # for ckpt.pt
    distributed.save_sharded(folder, model, optimizer, dist, progress)            # ckpt.dcp/
    distributed.load_sharded(folder, model, optimizer, dist, progress)   # files checked first
    distributed.leave()                                  # the end of the run, all together

A run's ckpt.pt is the same file whatever trained it: the full state, gathered on rank 0, with
the optimizer's state keyed by position as torch.optim writes it, so sample.py, export_hf.py
and a resume with any number of processes (DDP, FSDP or none) read it. A model whose full state
does not fit in one host's memory is saved as a sharded checkpoint instead: a folder written by
torch.distributed.checkpoint, each process its own shard (on a file system all nodes share),
which a resume reads with any number of processes, and `python distributed.py --out_dir=...`
consolidates into ckpt.pt.
"""

import os
import pickle
import re
import sys
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

import checkpoint
from atomic import replace_folder
from configurator import configure, run
from errors import UserError
from model import GPT

# FSDP and torch.distributed.checkpoint are imported by the functions that use them: importing
# them takes most of a second, which a run that uses neither need not pay
KINDS = ("ddp", "fsdp")
SHARDED = "ckpt.dcp"  # the sharded checkpoint's folder in out_dir
PROGRESS = "run.pt"  # ... and the file in it with everything but the tensors' shards


@dataclass
class Distributed:
    """How this process trains: kind (None: alone, else 'ddp' or 'fsdp'), its rank among
    world_size processes and its local_rank (its GPU) on its node."""
    kind: str | None = None
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def sharded(self):
        return self.kind == "fsdp"


def setup(device_type, backend=None, kind="ddp"):
    """The process group torchrun asks for (nccl on CUDA, gloo otherwise), or none when the
    script was started without torchrun. kind: "ddp" or "fsdp" (train.check_config checks it)."""
    if int(os.environ.get("RANK", -1)) == -1:
        if kind == "fsdp":
            print("note: parallel=fsdp shards the model across the processes torchrun starts; "
                  "this is one process, so it trains unsharded")
        return Distributed()
    torch_dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
    return Distributed(kind, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
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


def accumulating(model, raw_model, dist, sync):
    """The context of one micro-step's backward: gradients are reduced across processes only
    when sync (the last micro-step); before, each process accumulates its own."""
    if dist.kind == "ddp" and not sync:
        return model.no_sync()
    if dist.sharded:
        raw_model.set_requires_gradient_sync(sync)
    return nullcontext()


def leave():
    """Ends this process's part of a finished run, with every other process: the last thing
    train.py does under torchrun, after the checkpoint and the logs are written and closed."""
    torch_dist.barrier()  # leave together: none tears its group down while another still saves
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
# Checkpoints: the full state (ckpt.pt), or the shards (ckpt.dcp/)

def parameter_names(model, optimizer):
    """The name of each parameter the optimizer updates, in the order its state dict numbers
    them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_position(state):
    """An optimizer state keyed by parameter name (torch.distributed's) keyed by position
    (torch.optim's, what ckpt.pt holds): the names' order in its param groups."""
    position = {n: i for i, n in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {"state": {position[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]}
                             for g in state["param_groups"]]}


def by_name(state, names):
    """The inverse of by_position."""
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in state["param_groups"]]}


def full_state(model, optimizer, dist):
    """(model state, optimizer state) whole, as one process would have them: under FSDP
    gathered from every process (all must call this) into rank 0's memory, the other ranks
    getting (None, None); otherwise (None, None), meaning the model's and optimizer's own."""
    if not dist.sharded:
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.rank != 0:
        return None, None
    return model_state, by_position(optimizer_state)


def load_full_optimizer_state(model, optimizer, state, dist):
    """Load a ckpt.pt's optimizer state (whole, keyed by position): under FSDP each process
    keeps its shard of it."""
    if not dist.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, by_name(state, parameter_names(model, optimizer)),
                             options=StateDictOptions(full_state_dict=True))


def sharded_state(model, optimizer):
    """What a sharded checkpoint holds, as this process has it (its shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(folder, model, optimizer, dist, progress):
    """Write a sharded checkpoint: every process its shards of the model and optimizer states
    (torch.distributed.checkpoint), rank 0 the rest (progress: model_args, config, tokenizer,
    counters, random states; a file torch.load reads as plain data). Under FSDP all processes
    call this; else one process holds the whole state and writes it alone.
    The folder is written beside and swapped in whole, so a crash leaves the last good one.
    Non-finite weights or moments are refused on every process, nothing written. The progress
    file holds a crc32 of every file the shards went into, for load_sharded to check."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    state = sharded_state(model, optimizer)
    local = {n: t.to_local() if isinstance(t, DTensor) else t
             for n, t in checkpoint.named_tensors(state, "state")}
    bad = torch.tensor(float(checkpoint.nonfinite(local) is not None))
    if dist.sharded:  # one process's NaN stops them all
        bad = bad.to(flag_device(dist))
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
    if bad.item():
        raise UserError(f"the model or optimizer state holds NaN or infinite values at iteration "
                        f"{progress.get('iter_num')}: the training diverged (try a lower "
                        f"learning_rate); not saved, {folder} left as it was")

    def write(tmp):
        if dist.sharded:  # every process writes into the folder rank 0 made
            torch_dist.broadcast_object_list([tmp], src=0)
        with alone(dist):
            dcp.save(state, checkpoint_id=tmp, no_dist=not dist.sharded)
        files = shard_checksums(tmp, dist)
        checkpoint.save_checkpoint({**progress, "files": files}, os.path.join(tmp, PROGRESS))

    if dist.rank == 0:
        replace_folder(folder, write)
    else:
        names = [None]
        torch_dist.broadcast_object_list(names, src=0)
        dcp.save(state, checkpoint_id=names[0])
        shard_checksums(names[0], dist)
    if dist.sharded:
        torch_dist.barrier()  # the folder is in place before anyone goes on


def file_crc(path):
    """[size, crc32] of a file, read in 16 MiB pieces."""
    crc = 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            crc = zlib.crc32(piece, crc)
    return [os.path.getsize(path), crc]


def shard_checksums(folder, dist, names=None):
    """{name: [size, crc32]} of the files in folder (by default every one but the progress file),
    the same on every process: under FSDP each process reads a share of them."""
    share = (dist.rank, dist.world_size) if dist.sharded else (0, 1)
    if names is None:
        names = sorted(n for n in os.listdir(folder) if n != PROGRESS)
        if dist.sharded:  # rank 0's listing: a file system's listings may lag on other nodes
            box = [names]
            torch_dist.broadcast_object_list(box, src=0)
            names = box[0]
    mine = {n: file_crc(os.path.join(folder, n)) if os.path.exists(os.path.join(folder, n)) else None
            for n in names[share[0]::share[1]]}
    if not dist.sharded:
        return mine
    everyone = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, mine)
    return {n: crc for part in everyone for n, crc in part.items()}


def verify_shards(folder, expected, dist):
    """Refuse a sharded checkpoint whose files differ from what save_sharded wrote (a disk, a
    copy, a transfer changed them), on every process alike. Checkpoints from before there were
    checksums (expected None) pass unchecked."""
    if expected is None:
        return
    if not isinstance(expected, dict):
        raise UserError(f"the sharded checkpoint {folder} is corrupted: its {PROGRESS} lists no "
                        "checksums; restore it or train again")
    found = shard_checksums(folder, dist, sorted(expected))
    for name in sorted(expected):
        if found[name] is None:
            raise UserError(f"the sharded checkpoint {folder} is incomplete: {name} is missing; "
                            "restore it or train again")
        if found[name] != expected[name]:
            raise UserError(f"the sharded checkpoint {folder} is corrupted: {name} does not match "
                            "the checksum it was written with (it changed after it was written); "
                            "restore it or train again")


def gather(tensor, dist):
    """[each process's tensor] (all of the same shape) on every process, on the CPU."""
    device = flag_device(dist)
    out = [torch.empty_like(tensor, device=device) for _ in range(dist.world_size)]
    torch_dist.all_gather(out, tensor.to(device))
    return [t.cpu() for t in out]


def flag_device(dist):
    """Where this process group's collectives run: NCCL takes CUDA tensors only."""
    return f"cuda:{dist.local_rank}" if torch_dist.get_backend() == "nccl" else "cpu"


def read_progress(folder):
    """A sharded checkpoint's progress file (model_args, config, counters ...), checked."""
    run = checkpoint.load_checkpoint(os.path.join(folder, PROGRESS))
    if not isinstance(run, dict) or not isinstance(run.get("model_args"), dict):
        raise UserError(f"{folder} is not a sharded checkpoint of a run (its {PROGRESS} has no model_args)")
    check_metadata(folder)
    return run


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


def load_sharded(folder, model, optimizer, dist, progress):
    """Fill model and optimizer (built, and under FSDP sharded, for the checkpoint's model
    config) from a sharded checkpoint written by any number of processes, its files checked
    against the checksums in its progress file (read_progress) first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    verify_shards(folder, progress.get("files"), dist)
    state = sharded_state(model, optimizer)
    try:
        with alone(dist):  # without FSDP each process reads the whole state for itself
            dcp.load(state, checkpoint_id=folder, no_dist=not dist.sharded)
    except (Exception, CheckpointException) as e:
        raise UserError(f"the sharded checkpoint {folder} does not fit this model ({reason(e)}): "
                        "resume it with the settings it was trained with") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextmanager
def alone(dist):
    """torch.distributed.checkpoint used by one process on its own (no_dist), as it is meant
    to be here: without its warning that it assumes so."""
    with warnings.catch_warnings():
        if not dist.sharded:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def reason(error):
    """What went wrong, in one line, from an error of torch.distributed.checkpoint (which wraps
    each process's traceback into its message): the last 'SomeError: ...' line in it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (found[-1] if found else lines[0] if lines else type(error).__name__)[:200]


class MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint stores its index (.metadata) as a pickle and reads it with
    pickle.load. Before it does, the file is read here, where only what such an index is made
    of may be named: the classes of torch.distributed.checkpoint.metadata, a few helpers, paths,
    torch.Size and dtypes. A pickle naming anything else (the way pickles run code) is refused."""
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
               ("torch.serialization", "_get_layout"), ("torch", "Size"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module, name):
        found = super().find_class(module, name) if module in ("torch", "torch.distributed.checkpoint.metadata") else None
        if (module, name) in self.ALLOWED or isinstance(found, (torch.dtype, torch.memory_format)) or \
                (module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)):
            return found or super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def check_metadata(folder):
    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{folder} has no .metadata: not a complete sharded checkpoint") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, UnicodeDecodeError, OverflowError, ImportError) as e:
        raise UserError(checkpoint.refused_pickle(path, str(e), "the index of a sharded checkpoint")
                        if isinstance(e, pickle.UnpicklingError) else
                        f"{path} is unreadable or corrupt ({type(e).__name__}); restore it") from None


# -----------------------------------------------------------------------------
# python distributed.py --out_dir=...: a sharded checkpoint made into ckpt.pt

def consolidate(folder, path):
    """Write the sharded checkpoint in folder as the ckpt.pt at path, as a run on one process
    would have saved it (a LoRA run's adapters and base, else the whole model). On the way, the
    shards become one torch.save file beside path (torch.distributed.checkpoint's converter),
    removed at the end: the disk needs room for the state twice."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    progress = read_progress(folder)
    verify_shards(folder, progress.pop("files", None), Distributed())
    whole = f"{path}.whole.{os.getpid()}"
    try:
        try:
            with alone(Distributed()):
                dcp_to_torch_save(folder, whole)
        except (Exception, CheckpointException) as e:
            raise UserError(f"the sharded checkpoint {folder} is unreadable ({reason(e)}); restore it") from None
        state = checkpoint.load_checkpoint(whole)
        write_run(path, state, progress, folder)
    finally:
        if os.path.exists(whole):
            os.remove(whole)


def write_run(path, state, progress, folder):
    """ckpt.pt from a sharded checkpoint's state (model, optimizer) and progress."""
    config = checkpoint.model_config(progress.pop("model_args"), folder)
    with torch.device("meta"):
        model = GPT(config)  # its config only: the tensors come from the shards
    settings, tokenizer, base = progress.pop("config"), progress.pop("tokenizer"), progress.pop("base")
    checkpoint.save_run(path, model, None, settings, tokenizer, base, model_state=state["model"],
                        optimizer_state=by_position(state["optimizer"]), **progress)


out_dir = "out"  # the run whose ckpt.dcp/ becomes its ckpt.pt


def main():
    configure(globals())
    folder, path = os.path.join(out_dir, SHARDED), os.path.join(out_dir, "ckpt.pt")
    if not os.path.isdir(folder):
        raise UserError(f"no sharded checkpoint at {folder} (train with --sharded_checkpoint=True)")
    consolidate(folder, path)
    print(f"wrote {path} from {folder}")


if __name__ == "__main__":
    run(main)
