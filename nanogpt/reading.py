"""
Reading the files a user names, so that no file can hang a script or take all its memory: a
named pipe (FIFO, whose open waits for a writer that never comes), a device (/dev/zero, which
never ends), a socket or a folder where a file is expected, a file larger than its kind ever
is, and JSON nested thousands deep or holding a number thousands of digits long are each
refused with one line naming the file, before anything of it is used.

    data = read_bytes(path, "prompt file 'p.txt'")   # a regular file's bytes, at most MAX_BYTES
    text = read_text(path, "--input=x.txt", None)   # ... as UTF-8 text (None: any size)
    with open_regular(path) as f: ...               # ... or open, to read as it goes
    size = check_regular(path)                      # before a library opens it (torch.load, np.memmap)
    config = read_json(path, "download it again")   # a JSON object, within the limits below
    value = parse_json(line, f"{path}, line {n}")   # a JSON value, a line of a .jsonl file
"""

import json
import os
import stat

from nanogpt.errors import UserError

MAX_BYTES = 1 << 28  # 256 MiB: more than any settings, tokenizer or prompt file holds
MAX_DEPTH = 100  # lists and objects in one another: real files nest a few levels
MAX_NUMBER_CHARS = 100  # a JSON number's characters: real ones have at most a few dozen

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
         (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def check_stat(st, name, limit):
    """Refuse what st (an os.stat result) says is not a regular file of at most limit bytes
    (None: any size); return its size."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((kind for is_kind, kind in KINDS if is_kind(st.st_mode)), "of another kind")
        raise UserError(f"cannot read {name}: it is {kind}, not a regular file; give the path of a file")
    if limit is not None and st.st_size > limit:
        raise UserError(f"cannot read {name}: it holds {st.st_size:,} bytes, more than such a file "
                        f"ever does ({limit:,}); check that it is the right file")
    return st.st_size


def check_regular(path, name=None, limit=None):
    """The size of the regular file at path (a link is followed), or a UserError saying why it
    cannot be read. name: how the messages name the file (by default its path)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read {name or path}: {e.strerror}") from None
    return check_stat(st, name or path, limit)


def open_regular(path, name=None, limit=None):
    """path open for reading (binary), once it is known to be a regular file of at most limit
    bytes. It is checked before it is opened, so no device is opened at all, and again once it
    is open, through the open file, so that what was checked is what is read. O_NONBLOCK makes
    the open of a FIFO (put in the file's place meanwhile) return at once; it changes nothing
    for a regular file."""
    check_regular(path, name, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise UserError(f"cannot read {name or path}: {e.strerror}") from None
    try:
        check_stat(os.fstat(fd), name or path, limit)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(path, name=None, limit=MAX_BYTES):
    """The bytes of the regular file at path, at most limit of them (None: any number)."""
    with open_regular(path, name, limit) as f:
        try:
            return f.read()
        except OSError as e:
            raise UserError(f"cannot read {name or path}: {e.strerror}") from None


def read_text(path, name=None, limit=MAX_BYTES):
    """The text of the UTF-8 file at path, exactly as it is (\\r\\n stays \\r\\n)."""
    data = read_bytes(path, name, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name or path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_json(path, fix, name=None, limit=MAX_BYTES):
    """The JSON object in the file at path (parse_json's limits), or a UserError naming the
    file and ending with fix, what to do (e.g. "download the model again")."""
    value = parse_json(read_bytes(path, name, limit), name or path, fix)
    if not isinstance(value, dict):
        raise UserError(f"{name or path} holds a JSON {type(value).__name__}, not an object"
                        f"{'; ' + fix if fix else ''}")
    return value


def parse_json(text, where, fix=""):
    """The JSON value of text (str, or bytes of UTF-8), refused with a UserError "{where} is not
    readable JSON (why); {fix}" if it is not JSON, nests deeper than MAX_DEPTH or holds a number
    longer than MAX_NUMBER_CHARS (Python's int() refuses over 4,300 digits, with a ValueError
    json.loads lets through, and a long one costs time to convert)."""
    def refuse(reason):
        return UserError(f"{where} is not readable JSON ({reason}){'; ' + fix if fix else ''}")

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise refuse(f"not UTF-8 text, byte {e.start}: {e.reason}") from None
    try:
        value = json.loads(text, parse_int=number(int), parse_float=number(float))
    except json.JSONDecodeError as e:
        raise refuse(f"{e.msg}: line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # number's
        raise refuse(str(e)) from None
    except RecursionError:  # json's parser recurses once a level
        raise refuse(f"it nests deeper than {MAX_DEPTH} levels") from None
    if too_deep(value):
        raise refuse(f"it nests deeper than {MAX_DEPTH} levels")
    return value


def number(convert):
    """json.loads' parse_int or parse_float: convert, for the text of a number no longer than
    MAX_NUMBER_CHARS."""
    def parse(text):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number {len(text):,} characters long, more than {MAX_NUMBER_CHARS}")
        return convert(text)
    return parse


def too_deep(value):
    """Whether lists and dicts nest in value deeper than MAX_DEPTH (what json.loads parses
    within Python's recursion limit may still be too deep for code that recurses through it,
    repr() included); walked without recursion."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)
                     if isinstance(child, (dict, list)))
    return False
