"""
Every integrity check in one place. A checkpoint's writer records what its tensors and files
were, and its reader refuses them if they changed since (a disk, a copy, a transfer damaged
them): before anything of them is used, with one line saying what to do.

    checksums = checksums_of(tensors)               # {name: crc32}, stored in ckpt.pt
    verify_checksums(path, run)                     # ... checked when it is read back
    files = shard_checksums(folder, names, dist)    # {file: [size, crc32]}, in ckpt.dcp/run.pt
    verify_shards(folder, files, dist)              # ... checked before the shards are read
    run_fingerprint(checksums), folder_fingerprint(files)   # which base a LoRA run trained on
    nonfinite(tensors)                              # a diverged state is never saved

All of them are zlib's crc32: stored values from every earlier checkpoint still verify.
"""

import os
import zlib

import torch
import torch.distributed as torch_dist

from nanogpt.errors import UserError
from nanogpt.reading import open_regular


def named_tensors(obj, name):
    """(name.key.key..., tensor) of every tensor in nested dicts and lists (a state dict)."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{name}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{name}.{i}")


def nonfinite(tensors):
    """The name of the first floating-point tensor of {name: tensor} that holds a NaN or an
    infinity, or None if all are finite. Cheap: one sum per tensor (a NaN or an infinity makes
    the sum non-finite) and a single synchronisation with the device for all of them; only then
    is each tensor looked at (a sum can also overflow, of finite values past 3e38)."""
    floats = [(name, t) for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return None
    sums = torch.stack([t.sum(dtype=torch.float32) for _, t in floats])
    if bool(sums.isfinite().all()):
        return None
    return next((name for name, t in floats if not bool(torch.isfinite(t).all())), None)


# -----------------------------------------------------------------------------
# Tensors: a ckpt.pt's checksums

def checksum(tensor):
    """zlib.crc32 of a tensor's bytes (on the CPU, in memory order)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def checksums_of(tensors):
    """{name: crc32} of the tensors of {name: tensor}."""
    return {name: checksum(t) for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def verify_checksums(path, run, parts=("weights", "optimizer")):
    """Refuse a checkpoint whose tensors do not match the checksums save_run stored with them:
    the file was damaged after it was written. parts: which of its tensors to check, "weights"
    (the model or the adapters) and "optimizer". Checkpoints without checksums (nanoGPT's, ours
    from before) pass unchecked."""
    stored = run.get("checksums")
    if stored is None:
        return
    if not isinstance(stored, dict):
        raise UserError(f"checkpoint {path} is corrupted: its checksums are not a dict; restore it "
                        "or train again")
    tensors = {"weights": lambda: run.get("model", run.get("adapters")),
               "optimizer": lambda: dict(named_tensors(run.get("optimizer"), "optimizer"))}
    for part in parts:
        expected, have = stored.get(part), tensors[part]()
        if expected is None:
            continue
        if not isinstance(expected, dict) or not isinstance(have, dict):
            raise UserError(f"checkpoint {path} is corrupted: its {part} do not match their "
                            "checksums; restore it or train again")
        for name, crc in expected.items():
            tensor = have.get(name)
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"checkpoint {path} is corrupted: tensor {name} is missing; "
                                "restore it or train again")
            if checksum(tensor) != crc:
                raise UserError(f"checkpoint {path} is corrupted: tensor {name} does not match "
                                "the checksum it was saved with (the file changed after it was "
                                "written); restore it or train again")


# -----------------------------------------------------------------------------
# Files: a sharded checkpoint's, and a LoRA run's base model

def file_crc(path):
    """[size, crc32] of a file, read in 16 MiB pieces."""
    crc = 0
    with open_regular(path) as f:
        while piece := f.read(1 << 24):
            crc = zlib.crc32(piece, crc)
        return [os.fstat(f.fileno()).st_size, crc]


def sampled_crc(path, chunks=16, chunk=1 << 16):
    """[size, crc32 of `chunks` chunks of the file spread evenly, its start and end included]."""
    crc = 0
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        for i in range(chunks):
            f.seek(max(0, (size - chunk) * i // max(chunks - 1, 1)))
            crc = zlib.crc32(f.read(chunk), crc)
    return [size, crc]


def shard_checksums(folder, names, dist):
    """{name: [size, crc32], or None if it is missing} of the files `names` in folder, the same
    on every process: under FSDP each process reads a share of them (all must call this)."""
    rank, world_size = (dist.rank, dist.world_size) if dist.sharded else (0, 1)
    mine = {n: file_crc(os.path.join(folder, n)) if os.path.exists(os.path.join(folder, n)) else None
            for n in names[rank::world_size]}
    if not dist.sharded:
        return mine
    everyone = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, mine)
    return {n: crc for part in everyone for n, crc in part.items()}


def verify_shards(folder, expected, dist):
    """Refuse a sharded checkpoint whose files differ from the checksums it was written with
    (expected: shard_checksums'), on every process alike. Checkpoints from before there were
    checksums (expected None) pass unchecked."""
    if expected is None:
        return
    if not isinstance(expected, dict):
        raise UserError(f"the sharded checkpoint {folder} is corrupted: its checksums are not a "
                        "dict; restore it or train again")
    found = shard_checksums(folder, sorted(expected), dist)
    for name in sorted(expected):
        if found[name] is None:
            raise UserError(f"the sharded checkpoint {folder} is incomplete: {name} is missing; "
                            "restore it or train again")
        if found[name] != expected[name]:
            raise UserError(f"the sharded checkpoint {folder} is corrupted: {name} does not match "
                            "the checksum it was written with (it changed after it was written); "
                            "restore it or train again")


def run_fingerprint(checksums):
    """A LoRA base that is a run of ours, identified by the checksums its checkpoint carries
    (None if it carries none)."""
    return {"kind": "run", "crc32": zlib.crc32(repr(checksums).encode())} if checksums else None


def folder_fingerprint(files):
    """A LoRA base that is a model folder, identified by its weight files' names, sizes and a
    sampled_crc of each: cheap for any size, and a changed model differs there."""
    return {"kind": "folder", "files": {os.path.basename(f): sampled_crc(f) for f in files}}
