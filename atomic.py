"""
Writing files so that a crash at any moment leaves the old file or the new one, never half of
one: the bytes go to a temporary file beside the target, are flushed to disk, and the temporary
file is renamed over the target (a rename is atomic on POSIX and Windows), then the folder is
flushed so the rename itself survives a power cut.

Checkpoints, datasets and the loss plot are all written through atomic_write. A folder of files
(a Hugging Face export) is written the same way by replace_folder: into a temporary folder
beside it, swapped in whole once complete.
"""

import glob
import os
import shutil

from errors import UserError


def atomic_write(path, write):
    """Call write(f) on a binary file that becomes `path` only once it is whole. A write that
    fails (a full disk) is a UserError, the file at path as it was."""
    # a process killed while writing leaves its temporary file behind: clear those first
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        os.remove(stale)
    tmp, failed = f"{path}.tmp.{os.getpid()}", None
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        failed = e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if failed is not None:
        raise UserError(could_not_write(path, failed))
    sync_folder(os.path.dirname(os.path.abspath(path)))


def could_not_write(path, error):
    """The line for a write to path that failed: why, and the room left on its disk."""
    if isinstance(error, OSError):
        reason = error.strerror or type(error).__name__
    else:  # torch's words for a write that stopped short
        reason = f"the write stopped short, as on a full disk: {(str(error).strip().splitlines() or [''])[0][:80]}"
    try:
        free = f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6:,.1f} MB free there"
    except OSError:
        free = ""
    return (f"could not write {path} ({reason}{free}): what was there before is as it was; "
            "make room (or choose another folder) and run again")


def sync_folder(folder):
    """Make the renames done in folder durable (where the OS can open a folder)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_folder(folder, write):
    """Call write(tmp) on a new, empty folder that becomes `folder` only once write has returned:
    its files are flushed to disk, the old folder (if any) is renamed aside, the new one renamed
    into its place, and the old one removed. A failure while writing (a full disk) leaves the old
    folder exactly as it was, and no temporary folder behind."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    clear_stale(folder)
    tmp, old = f"{folder}.tmp.{os.getpid()}", f"{folder}.old.{os.getpid()}"
    os.mkdir(tmp)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(tmp)
        if os.path.lexists(folder):
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except BaseException:
            if os.path.lexists(old):
                os.rename(old, folder)  # put the old one back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sync_folder(parent)
    shutil.rmtree(old, ignore_errors=True)


def clear_stale(folder):
    """What an earlier replace_folder of folder killed part way left: its temporary folders
    (removed) and, if it died between its two renames, the old folder (renamed back)."""
    for kind in ("tmp", "old"):
        for stale in sorted(glob.glob(glob.escape(folder) + f".{kind}.*")):
            if not stale.rsplit(".", 1)[1].isdigit() or not os.path.isdir(stale):
                continue
            if kind == "old" and not os.path.lexists(folder):
                os.rename(stale, folder)
            else:
                shutil.rmtree(stale)
