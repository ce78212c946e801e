"""
Checkpoint files: written atomically, read without unpickling code.

A checkpoint is a dict of tensors and plain Python data (nanoGPT's keys:
model, optimizer, model_args, iter_num, best_val_loss, config; plus the
tokenizer spec and the RNG / data-sampler state). It is saved to a temporary
file in the same folder, flushed to disk, then renamed over the old one, so a
crash at any moment leaves either the old or the new checkpoint, never half
of one. Loading uses torch.load(weights_only=True), which refuses anything but
tensors and plain containers.
"""

import glob
import os
import pickle
import zipfile

import torch

from configurator import UserError


def save_checkpoint(obj, path):
    # a process killed while writing leaves its temp file behind: clear those first
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        os.remove(stale)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # make the rename itself durable
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train one first, or check --out_dir)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({reason[:120]}); "
                        "restore it or train again") from None
