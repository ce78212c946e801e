"""
The sharded checkpoint: for a model whose full state does not fit in one host's memory. A
folder, out_dir/ckpt.dcp/, written by torch.distributed.checkpoint, each process its own shard
(on a file system all nodes share), beside run.pt, which holds everything but the tensors
(model_args, config, tokenizer, counters, random states) and a crc32 of every shard file.
A resume reads it with any number of processes (FSDP, DDP or one):

    sharded_ckpt.save_sharded(folder, model, optimizer, dist, progress)   # every process
    progress = sharded_ckpt.read_progress(folder)                          # run.pt, checked
    sharded_ckpt.load_sharded(folder, model, optimizer, dist, progress)   # files checked first

and consolidate() makes it the run's ckpt.pt, for sample.py and export_hf.py:

$ python consolidate.py --out_dir=out
"""

import os
import pickle
import re
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as torch_dist

from nanogpt import checkpoint
from nanogpt import integrity
from nanogpt import reading
from nanogpt.atomic import replace_folder
from nanogpt.distributed import (Distributed, by_position, collective_device, named_optimizer_state,
                                 set_named_optimizer_state)
from nanogpt.errors import UserError
from model import build

# torch.distributed.checkpoint is imported by the functions that use it: it is slow to import,
# which a run that does not use it need not pay
FOLDER = "ckpt.dcp"  # the sharded checkpoint's folder in out_dir
PROGRESS = "run.pt"  # ... and the file in it with everything but the tensors' shards


def sharded_state(model, optimizer):
    """What a sharded checkpoint holds, as this process has it (its shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {"model": get_model_state_dict(model), "optimizer": named_optimizer_state(model, optimizer)}


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
             for n, t in integrity.named_tensors(state, "state")}
    bad = torch.tensor(float(integrity.nonfinite(local) is not None))
    if dist.sharded:  # one process's NaN stops them all
        bad = bad.to(collective_device(dist))
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
    if bad.item():
        raise UserError(f"the model or optimizer state holds NaN or infinite values at iteration "
                        f"{progress.get('iter_num')}: the training diverged (try a lower "
                        f"learning_rate); not saved, {folder} left as it was")

    def write(tmp):
        if dist.sharded:  # every process writes into the folder rank 0 made
            torch_dist.broadcast_object_list([tmp], src=0)
        with silence_no_dist_warning(dist):
            dcp.save(state, checkpoint_id=tmp, no_dist=not dist.sharded)
        files = integrity.shard_checksums(tmp, shard_files(tmp, dist), dist)
        checkpoint.save_checkpoint({**progress, "files": files}, os.path.join(tmp, PROGRESS))

    if dist.rank == 0:
        replace_folder(folder, write)
    else:  # into the folder rank 0 made
        box = [None]
        torch_dist.broadcast_object_list(box, src=0)
        tmp = box[0]
        dcp.save(state, checkpoint_id=tmp)
        integrity.shard_checksums(tmp, shard_files(tmp, dist), dist)
    if dist.sharded:
        torch_dist.barrier()  # the folder is in place before anyone goes on


def shard_files(folder, dist):
    """The files torch.distributed.checkpoint wrote into folder (all but the progress file), as
    rank 0 lists them, on every process: a file system's listings may lag on other nodes."""
    names = sorted(n for n in os.listdir(folder) if n != PROGRESS) if dist.rank == 0 else None
    if dist.sharded:
        box = [names]
        torch_dist.broadcast_object_list(box, src=0)
        names = box[0]
    return names


def read_progress(folder):
    """A sharded checkpoint's progress file (model_args, config, counters ...), checked."""
    run = checkpoint.load_checkpoint(os.path.join(folder, PROGRESS))
    if not isinstance(run, dict) or not isinstance(run.get("model_args"), dict):
        raise UserError(f"{folder} is not a sharded checkpoint of a run (its {PROGRESS} has no model_args)")
    check_metadata(folder)
    return run


def load_sharded(folder, model, optimizer, dist, progress):
    """Fill model and optimizer (built, and under FSDP sharded, for the checkpoint's model
    config) from a sharded checkpoint written by any number of processes, its files checked
    against the checksums in its progress file (read_progress) first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    integrity.verify_shards(folder, progress.get("files"), dist)
    state = sharded_state(model, optimizer)
    try:
        with silence_no_dist_warning(dist):  # without FSDP each process reads the whole state for itself
            dcp.load(state, checkpoint_id=folder, no_dist=not dist.sharded)
    except (Exception, CheckpointException) as e:
        raise UserError(f"the sharded checkpoint {folder} does not fit this model ({last_error_line(e)}): "
                        "resume it with the settings it was trained with") from None
    set_model_state_dict(model, state["model"])
    set_named_optimizer_state(model, optimizer, state["optimizer"])


@contextmanager
def silence_no_dist_warning(dist):
    """torch.distributed.checkpoint used by one process on its own (no_dist), as it is meant
    to be here: without its warning that it assumes so."""
    with warnings.catch_warnings():
        if not dist.sharded:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def last_error_line(error):
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
    """Refuse a sharded checkpoint whose index is missing, damaged, or names code."""
    path = os.path.join(folder, ".metadata")
    if not os.path.exists(path):
        raise UserError(f"{folder} has no .metadata: not a complete sharded checkpoint")
    try:
        with reading.open_regular(path) as f:
            MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, UnicodeDecodeError, OverflowError, ImportError) as e:
        raise UserError(checkpoint.refused_pickle(path, str(e), "the index of a sharded checkpoint")
                        if isinstance(e, pickle.UnpicklingError) else
                        f"{path} is unreadable or corrupt ({type(e).__name__}); restore it") from None


# -----------------------------------------------------------------------------
# python consolidate.py --out_dir=...: a sharded checkpoint made into ckpt.pt

def consolidate(folder, path):
    """Write the sharded checkpoint in folder as the ckpt.pt at path, as a run on one process
    would have saved it (a LoRA run's adapters and base, else the whole model). On the way, the
    shards become one torch.save file beside path (torch.distributed.checkpoint's converter),
    removed at the end: the disk needs room for the state twice."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    progress = read_progress(folder)
    integrity.verify_shards(folder, progress.pop("files", None), Distributed())
    whole = f"{path}.whole.{os.getpid()}"
    try:
        try:
            with silence_no_dist_warning(Distributed()):
                dcp_to_torch_save(folder, whole)
        except (Exception, CheckpointException) as e:
            raise UserError(f"the sharded checkpoint {folder} is unreadable ({last_error_line(e)}); restore it") from None
        state = checkpoint.load_checkpoint(whole)
        write_run(path, state, progress, folder)
    finally:
        if os.path.exists(whole):
            os.remove(whole)


def write_run(path, state, progress, folder):
    """ckpt.pt from a sharded checkpoint's state (model, optimizer) and progress."""
    config = checkpoint.model_config(progress.pop("model_args"), folder)
    with torch.device("meta"):
        model = build(config)  # its config only: the tensors come from the shards
    settings, tokenizer, base = progress.pop("config"), progress.pop("tokenizer"), progress.pop("base")
    checkpoint.save_run(path, model, None, settings, tokenizer, base, model_state=state["model"],
                        optimizer_state=by_position(state["optimizer"]), **progress)

