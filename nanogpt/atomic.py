"""
Writing files so that a crash at any moment leaves the old file or the new one, never half of
one: the bytes go to a temporary file beside the target, are flushed to disk, and the temporary
file is renamed over the target (a rename is atomic on POSIX and Windows), then the folder is
flushed so the rename itself survives a power cut.

Checkpoints, datasets and the loss plot are all written through atomic_write. A folder of files
(a Hugging Face export) is written the same way by replace_folder: into a temporary folder
beside it, swapped in whole once complete. lock_out_dir keeps a run's out_dir to one run at a
time.
"""

import contextlib
import glob
import os
import shutil

from nanogpt.errors import UserError
from nanogpt.reading import read_bytes


def atomic_write(path, write):
    """Call write(f) on a binary file that becomes `path` only once it is whole. A write that
    fails (a full disk) is a UserError, the file at path as it was."""
    tmp = write_beside(path, write)
    try:
        os.replace(tmp, path)
    except OSError as e:
        os.remove(tmp)
        raise UserError(could_not_write(path, e)) from None
    sync_folder(os.path.dirname(os.path.abspath(path)))


def write_beside(path, write):
    """Call write(f) on a new binary file beside path, PATH.tmp.<pid>, flushed to disk; return
    its name, for the caller to rename over path (atomic_write does, a dataset renames all its
    files together). A write that fails (a full disk) is a UserError, nothing left behind."""
    # a process killed while writing leaves its temporary file behind: clear those first (files
    # named as this names them, not a user's folder or link of a like name)
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        if stale.rsplit(".", 1)[1].isdigit() and os.path.isfile(stale) and not os.path.islink(stale):
            os.remove(stale)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a short write as a RuntimeError
            raise UserError(could_not_write(path, e)) from None
        raise
    return tmp


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


def check_out_dir(path, flag="out_dir"):
    """Refuse, before anything is written, a folder to write into (a run's out_dir, a preparer's
    --out; flag: the setting that gave it) that nothing could be written into: an empty string,
    a file, a folder under a file, a link that leads nowhere (or round a loop of links), a name
    longer than its disk takes, a read-only folder (or one on a read-only disk). A folder that
    does not exist yet is not created here: the nearest one above it that exists must be
    writable. Writability is tried, not asked (a probe file is made and removed), so that root
    and read-only mounts answer truly."""
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{flag} must be a folder's path, got {path!r}")
    whole = existing = os.path.abspath(path)
    missing = []  # the names below existing, which the run would make
    while True:
        try:
            os.stat(existing)
            break
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(existing):
                where = "" if existing == whole else f" is under {existing}, which"
                raise UserError(f"{flag}={path}{where} is a link to {os.readlink(existing)}, which "
                                f"does not exist: choose another {flag}, or make the folder") from None
            existing, name = os.path.split(existing)
            missing.append(name)
        except OSError as e:  # a loop of links, a name too long, a folder that cannot be searched
            raise UserError(f"{flag}={path} cannot be used: {e.strerror}; choose another {flag}") from None
    if not os.path.isdir(existing):
        where = "is a file, not a folder" if existing == whole else f"is under {existing}, which is a file"
        raise UserError(f"{flag}={path} {where}: choose another {flag}")
    longest = os.pathconf(existing, "PC_NAME_MAX")
    for name in missing:
        if len(os.fsencode(name)) > longest:
            raise UserError(f"{flag}={path} cannot be made: the name {name[:16]}... is "
                            f"{len(os.fsencode(name))} bytes, more than the {longest} its disk "
                            f"takes; choose another {flag}")
    import tempfile
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        where = "" if existing == whole else f" (it would be made in {existing})"
        raise UserError(f"{flag}={path} cannot be written{where}: {e.strerror}; choose another "
                        f"{flag}") from None


# the files that make a folder a model's or a dataset's, which no script writes over (or beside)
# unless it made them, or is told to
MODEL_FILES = ("ckpt.pt", "config.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin")
DATASET_FILES = ("train.bin", "val.bin")


def check_not_foreign(folder, made_here, overwrite=False, guarded=MODEL_FILES + DATASET_FILES):
    """Refuse (a UserError) to write into folder when it holds a model or a dataset (one of the
    files named in guarded) that made_here(folder) says this script did not make, unless
    overwrite (its --overwrite=True): a user's model, a hub download, another program's dataset
    stay as they are."""
    if overwrite or not os.path.isdir(folder):
        return
    try:
        names = set(os.listdir(folder))
    except OSError as e:
        raise UserError(f"cannot read the folder {folder}: {e.strerror}") from None
    held = [name for name in guarded if name in names]
    if held and not made_here(folder):
        raise UserError(f"{folder} holds a model or dataset ({', '.join(held)}) that this script "
                        "did not make, which it would write over: choose another folder, or pass "
                        "--overwrite=True to replace it")


# A folder that replace_folder makes beside its target, to write into or to move the old one
# aside into, holds this file: a clean-up after a killed run deletes only folders that hold it,
# never a user's own folder that happens to be named like one.
MARKER = ".replace_folder"
MARKER_TEXT = "made by atomic.replace_folder, which a killed run left behind: safe to delete\n"


def replace_folder(folder, write):
    """Call write(tmp) on a new, empty folder that becomes `folder` only once write has returned:
    its files are flushed to disk, the old folder (if any) is moved aside, the new one renamed
    into its place, and the old one removed. A failure while writing (a full disk) leaves the old
    folder exactly as it was, and no temporary folder behind.

    Beside folder go FOLDER.tmp.<pid> and FOLDER.old.<pid>: marked folders (MARKER) holding the
    new folder while it is written and the old one while it is swapped out, so that clear_stale
    can tell them from a user's folders of the same names."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    clear_stale(folder)
    tmp, old = make_marked(f"{folder}.tmp.{os.getpid()}"), None
    try:
        new = os.path.join(tmp, name)
        os.mkdir(new)
        write(new)
        for entry in os.listdir(new):
            fd = os.open(os.path.join(new, entry), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(new)
        if os.path.lexists(folder):
            old = make_marked(f"{folder}.old.{os.getpid()}")
            os.rename(folder, os.path.join(old, name))
        try:
            os.rename(new, folder)
        except BaseException:
            if old is not None:
                os.rename(os.path.join(old, name), folder)  # put the old one back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sync_folder(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_marked(path):
    """A new folder at path holding MARKER, flushed: from here on clear_stale may remove it.
    One that cannot be made whole (a full disk) is not left behind."""
    os.mkdir(path)
    try:
        with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
            f.write(MARKER_TEXT)
        sync_folder(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def is_marked(path):
    """Whether path is a folder (not a link to one) that make_marked made."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        return read_bytes(os.path.join(path, MARKER), limit=len(MARKER_TEXT)) == MARKER_TEXT.encode()
    except UserError:  # missing, or not a file (a FIFO would block an open())
        return False


def clear_stale(folder):
    """What an earlier replace_folder of folder killed part way left: its temporary folders
    (removed) and, if it died between its two renames, the old folder (moved back). Only marked
    folders are touched: a user's FOLDER.old.1 stays as it is."""
    name = os.path.basename(folder)
    for kind in ("tmp", "old"):
        for stale in sorted(glob.glob(glob.escape(folder) + f".{kind}.*")):
            if not stale.rsplit(".", 1)[1].isdigit() or not is_marked(stale):
                continue
            inside = os.path.join(stale, name)
            if kind == "old" and os.path.isdir(inside) and not os.path.lexists(folder):
                os.rename(inside, folder)
            shutil.rmtree(stale)


LOCK_FILE = "run.lock"  # in out_dir while a run holds it: the holder's pid


@contextlib.contextmanager
def lock_out_dir(folder):
    """Hold folder (a run's out_dir) for this process alone while the with-block runs; a second
    process that tries is refused with a UserError naming the holder's pid. The lock is the
    kernel's (flock on folder/LOCK_FILE), so it goes with its process however that ends, a
    SIGKILL included; a folder this made is removed again if it is left empty."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = take_lock(path)
    try:
        yield
    finally:
        try:
            os.remove(path)  # while still held: whoever opens the name next makes a new lock file
        except FileNotFoundError:
            pass  # the folder went during the run (deleted by hand): nothing is left to clean up
        os.close(fd)
        if created:
            try:
                os.rmdir(folder)
            except OSError:
                pass  # it holds the run's files


def take_lock(path):
    """An open descriptor of path holding its exclusive flock, with this process's pid written in."""
    import fcntl  # POSIX only, as flock is
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{os.path.dirname(path)} is in use by another run (pid {holder}): "
                            "one run per out_dir; wait for it to end, or choose another out_dir") from None
        # the holder before us may have removed the file between our open and our flock: the
        # lock we hold is then on a file no one else can find, so take the one at path again
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd
