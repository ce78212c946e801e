"""
Writing files so that a crash at any moment leaves the old file or the new one, never half of
one: the bytes go to a temporary file beside the target, are flushed to disk, and the temporary
file is renamed over the target (a rename is atomic on POSIX and Windows), then the folder is
flushed so the rename itself survives a power cut.

Checkpoints, datasets and the loss plot are all written through atomic_write.
"""

import glob
import os


def atomic_write(path, write):
    """Call write(f) on a binary file that becomes `path` only once it is whole."""
    # a process killed while writing leaves its temporary file behind: clear those first
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        os.remove(stale)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    sync_folder(os.path.dirname(os.path.abspath(path)))


def sync_folder(folder):
    """Make the renames done in folder durable (where the OS can open a folder)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
