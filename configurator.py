"""
Flat configuration for every script in this repo, nanoGPT style.

A script declares its knobs as plain module globals, then calls

    configure(globals())

which reads the command line: an optional config file (a flat Python file of
`key = value` lines, e.g. config/train_shakespeare_char.py) and then any number
of `--key=value` overrides, applied in order. Values are Python literals
(`--lr=3e-4`, `--compile=False`, `--start='hi'`); anything that does not parse
as a literal is taken as a string (`--device=cpu`). Every value must match the
type of the default it replaces (an int is accepted where a float is
expected), so a typo fails loudly instead of training the wrong model, and
no number may be NaN or infinite.

Mistakes made by the person at the keyboard are reported as UserError: one
line on stderr and exit code 2, no traceback (see `run`).
"""

import ast
import codecs
import contextlib
import difflib
import errno
import gc
import io
import math
import os
import re
import signal
import sys
import typing

from nanogpt.errors import UserError
from nanogpt.reading import read_text


def quit_at_once(signum, frame):
    """A signal handler that ends the program now, quietly: `interrupted`, and the exit code a
    shell gives a program the signal ended (130 for Ctrl-C, 143 for SIGTERM). Not by raising:
    an exception raised wherever the signal lands (an import's bare `except:`, the interpreter's
    exit handlers) is swallowed or printed as a traceback. Ending at once is as safe as a
    SIGKILL, which leaves every file this repo writes whole (atomic.py)."""
    with contextlib.suppress(Exception):  # a reader gone, a full disk, a write it interrupted
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        print("interrupted", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _our_script_is_the_program():
    """Whether the program (__main__) is one of this repo's scripts (not a test runner or a
    tool in its venv)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    rel = os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(__file__)))
    parts = rel.split(os.sep)
    return rel.endswith(".py") and parts[0] != ".." and \
        not any(p.startswith(".") or p == "site-packages" for p in parts)


# Ctrl-C while a script is still starting (torch takes seconds to import) exits as quietly as
# it does later on (run): each script imports this module before anything heavy. Only a script
# of this repo run as the program: a test runner importing the scripts keeps its own Ctrl-C.
if _our_script_is_the_program() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)


def run(main):
    """Call main(), turning a UserError into a one-line message (under torchrun, rank 0's) and
    exit code 2, Ctrl-C into "interrupted" and exit code 130, and a standard output that
    cannot take what is written to it into what a Unix tool does: a reader that went away
    (`| head`) ends the program quietly with exit code 141 (a shell's code for a program that
    SIGPIPE ended, as `yes | head` gives under `set -o pipefail`: the program stopped short of
    its end), any other failure (a full disk) is one line, `error: cannot write to standard
    output: ...`, exit code 2 as for every other write that fails."""
    if signal.getsignal(signal.SIGINT) is quit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is Python's again
    _take_stdout()
    try:
        main()
        sys.stdout.flush()  # what is still buffered fails here, not in the interpreter's exit
    except UserError as e:
        # under torchrun every process meets the same bad input: rank 0 says it, once
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except StdoutError as e:
        _discard_stdout()
        if e.errno == errno.EPIPE:
            sys.exit(141)
        print(f"error: cannot write to standard output: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    finally:
        try:
            sys.stdout.flush()
        except StdoutError:  # after another failure, which was reported
            _discard_stdout()
        if _our_script_is_the_program():
            # the script is done: a Ctrl-C or SIGTERM while the interpreter exits (its exit
            # handlers, joining threads) ends it at once, not with a traceback
            signal.signal(signal.SIGINT, quit_at_once)
            signal.signal(signal.SIGTERM, quit_at_once)
            # The interpreter's exit collects every object's cycles: with torch._dynamo imported
            # (any torch optimizer imports it) that alone takes most of a second. Everything this
            # script wrote is closed by now, so the program skips it; a caller that imported the
            # script keeps its collector.
            gc.freeze()


class StdoutError(OSError):
    """A write to standard output that failed (a reader that went away, a full disk), told
    apart from a failed write to a file, which the code writing it reports."""


class _StdoutFile(io.FileIO):
    """Standard output's file descriptor, whose failed writes are StdoutErrors."""

    def write(self, data):
        try:
            return super().write(data)
        except BlockingIOError:
            raise  # a non-blocking descriptor that is full: the buffer above it waits and retries
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None


def _escape_unwritable(error):
    """Standard output's encoding error handler: a character its encoding lacks is written as
    an escape (\\xe9, under PYTHONIOENCODING=ascii or a C locale), as backslashreplace does,
    instead of failing; one that stands for a byte of undecodable input (surrogateescape's: a
    file name that is not UTF-8) as that byte, as Python writes it under a C locale."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return b"".join(bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF
                    else c.encode("ascii", "backslashreplace") for c in text), error.end


codecs.register_error("nanogpt.stdout", _escape_unwritable)


def _take_stdout():
    """Put in sys.stdout's place a stream like it (encoding, buffering) on _StdoutFile, with
    _escape_unwritable for its errors unless the user chose a handler of their own. Only the
    interpreter's own stdout (not a test runner's capture, not a second time)."""
    out = sys.stdout
    if out is None or out is not sys.__stdout__ or not isinstance(out, io.TextIOWrapper):
        return
    try:
        fd = out.fileno()
    except (OSError, ValueError):
        return
    out.flush()
    raw = _StdoutFile(fd, "w", closefd=False)
    unbuffered = isinstance(out.buffer, io.RawIOBase)  # python -u
    sys.stdout = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=out.encoding,
                                  errors="nanogpt.stdout" if out.errors in ("strict", "surrogateescape") else out.errors,
                                  line_buffering=out.line_buffering, write_through=out.write_through)


def _discard_stdout():
    """Send what standard output still holds, and all written to it from now on, nowhere: the
    interpreter's exit flushes it, which would fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _is_knob(key, value):
    # the knobs are the script's lowercase globals holding plain data
    return (not key.startswith("_") and key.islower()
            and isinstance(value, (bool, int, float, str, type(None), tuple, list, dict)))


def knobs(namespace):
    """The configurable globals of a script, in their declaration order."""
    return {k: v for k, v in namespace.items() if _is_knob(k, v)}


def _kinds(key, default, declared):
    """The types key takes: those its script declares (an annotation, e.g. `device: str | None
    = None`), else its default's; None where neither says (a default of None, undeclared)."""
    if key in declared:
        return tuple(t for t in typing.get_args(declared[key]) or (declared[key],) if t is not type(None))
    return None if default is None else (type(default),)


def _coerce(key, value, default, origin, nullable, declared):
    """Check `value` against key's types (_kinds); return the value to store. nullable: the
    keys besides those whose default is None that None may be given to."""
    kinds = _kinds(key, default, declared)
    _check_numbers(key, value, float in (kinds or ()), origin)
    if value is None:
        if default is None or key in nullable:
            return value
        raise UserError(f"{origin}: {key} cannot be None (default {default!r}): None only "
                        "replaces the settings whose default is None")
    if kinds is None:
        return value  # an undeclared None, "unset / auto": any type may replace it
    if isinstance(value, bool):
        ok = bool in kinds
    elif isinstance(value, int) and float in kinds and int not in kinds:
        return float(value)
    else:
        ok = isinstance(value, tuple(k for k in kinds if k is not bool))
    if not ok:
        names = [k.__name__ for k in kinds] + (["None"] if default is None else [])
        article = "an" if names[0][0] in "aeiou" else "a"
        raise UserError(f"{origin}: {key} must be {article} {' or '.join(names)} "
                        f"(default {default!r}), got {value!r}")
    return value


def _check_numbers(key, value, wants_float, origin):
    """Refuse a NaN or an infinity anywhere in value (1e400 parses as one), and an int too large
    to be a float (a 1 and 400 zeros), before anything runs: an optimizer or a clip given one
    trains NaNs, or raises deep inside torch. A word a float knob (wants_float) is given that
    Python reads as NaN or infinity ('nan', 'inf') is named as such."""
    if wants_float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return  # not a number: the type check names it
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{origin}: {key} must be a finite number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        raise UserError(f"{origin}: {key} is a number of {len(str(abs(value)))} digits, beyond "
                        "what any setting takes")
    if isinstance(value, (tuple, list)):
        for item in value:
            _check_numbers(key, item, False, origin)
    elif isinstance(value, dict):
        for item in value.values():
            _check_numbers(key, item, False, origin)


LITERAL_STARTS = tuple("0123456789+-.([{'\"")  # what a number, a string in quotes or a container starts with


def _parse_value(text):
    """A Python literal (a number, a quoted string, a list, tuple or dict, None), true / false
    in any case (as Hugging Face's flags are written), or else the text itself: a bare word such
    as cpu or gpt2-xl, or a prompt. Plain text never goes through the literal parser, which
    runs out of memory on long texts."""
    word = text.strip()
    if word.lower() in ("true", "false"):
        return word.lower() == "true"
    if word != "None" and not word.startswith(LITERAL_STARTS):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


# a setting's line in a script: `name = default  # what it does` (or `name: type = ...`)
SETTING_LINE = re.compile(r"([a-z_][a-z0-9_]*)\s*(?::[^=]*)?=.*?#\s*(.*)$")


def _print_help(defaults, namespace):
    """The usage line and every knob with its default and what it does: the comment on its
    line in the script, or the script's FLAG_HELP ({name: text} of the flags it takes from
    elsewhere, as engine.decoding_flag_help gives them)."""
    script = namespace.get("__file__", "script.py")
    try:
        lines = read_text(script).splitlines()
    except (UserError, OSError):
        lines = []
    helps = {}
    for line in lines:
        found = SETTING_LINE.match(line)
        if found:
            helps.setdefault(found.group(1), found.group(2))
    helps.update(namespace.get("FLAG_HELP", {}))
    print(f"usage: python {script} [config/file.py] [--key=value ...]\n")
    print("keys (default): what each does")
    width = max(len(k) for k in defaults)
    value_width = min(24, max(len(repr(v)) for v in defaults.values()))
    for k, v in defaults.items():
        print(f"  --{k.ljust(width)}  {repr(v).ljust(value_width)}  {helps.get(k, '')}".rstrip())


class Settings(dict):
    """The knobs after configure(): {key: value}, and .passed, the keys that a config file or
    the command line set (to any value, the default's included), which is how a script tells
    what the user asked for from what it may fill in itself."""

    def __init__(self, values, passed):
        super().__init__(values)
        self.passed = frozenset(passed)


def configure(namespace, argv=None, skip_unknown_file_keys=False, nullable=()):
    """Apply a config file and --key=value overrides to `namespace` (a script's globals);
    returns the knobs as Settings (a dict, with .passed: the keys given).
    skip_unknown_file_keys: a config file may set keys this script does not have
    (bench/train_step.py reads train.py's configs for the model's shape); --key=value
    overrides stay strict.
    nullable: the keys whose default is not None that may still be set to None (by default
    none: None replaces only a default of None).
    A knob whose default is None takes the types its script declares for it (an annotation:
    `device: str | None = None`), or any value where it declares none."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = knobs(namespace)
    declared = namespace.get("__annotations__", {})
    if any(a in ("-h", "--help") for a in argv):
        _print_help(defaults, namespace)
        sys.exit(0)
    passed = set()
    for arg in argv:
        if not arg.startswith("--"):
            passed.update(_apply_file(namespace, defaults, arg, skip_unknown_file_keys, nullable, declared))
            continue
        key, sep, text = arg[2:].partition("=")
        if key not in defaults:
            raise UserError(f"unknown config key {key!r}{_did_you_mean(key, defaults, '--')} "
                            "(see --help for the list)")
        if not sep:  # a bare --flag switches a True / False setting on, as argparse's store_true
            if bool not in (_kinds(key, defaults[key], declared) or (bool,)):
                raise UserError(f"argument {arg!r} needs a value: --{key}=... (only a True / "
                                "False setting may be given bare)")
            text = "True"
        namespace[key] = _coerce(key, _parse_value(text), defaults[key], f"--{key}", nullable, declared)
        passed.add(key)
    return Settings(knobs(namespace), passed)


def _did_you_mean(key, defaults, prefix=""):
    """', did you mean --x?' for the one or two keys nearest a mistyped one: those it begins
    (temp: temperature) or whose first words it is (Hugging Face's stop_strings is --stop
    here), then those spelled alike (batch_sise, n_layers)."""
    begun = [k for k in defaults if (len(key) >= 3 and k.startswith(key)) or key.startswith(k + "_")]
    near = [k for k in difflib.get_close_matches(key, defaults, n=2, cutoff=0.8) if k not in begun]
    chosen = (begun + near)[:2]
    return ", did you mean " + " or ".join(prefix + k for k in chosen) + "?" if chosen else ""


def _apply_file(namespace, defaults, path, skip_unknown, nullable, declared):
    """Set the keys of the config file at path; returns the keys it set."""
    source = read_text(path, f"config file {path!r}")
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        raise UserError(f"config file {path!r} is not Python (line {e.lineno}: {e.msg}): it holds "
                        "`key = value` lines, e.g. n_layer = 4") from None
    # `n_layer: 4` (YAML) is Python too, an annotation, which sets nothing
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and node.value is None:
            text = ast.get_source_segment(source, node) or ast.unparse(node)
            raise UserError(f"config file {path!r}, line {node.lineno}: {text!r} sets nothing (an "
                            "annotation): a config file is Python, `key = value` lines, not YAML")
    values = {}
    try:
        exec(compile(tree, path, "exec"), {}, values)
    except Exception as e:  # a config file is user input; any failure is theirs to fix
        raise UserError(f"config file {path!r} failed: {type(e).__name__}: {e}") from None
    keys = [k for k, v in values.items() if not k.startswith("_") and type(v).__name__ != "module"]
    if not keys:
        raise UserError(f"config file {path!r} sets no config key: it should hold `key = value` "
                        "lines, e.g. n_layer = 4")
    applied = []
    for key in keys:
        if key not in defaults:
            if skip_unknown:
                continue
            raise UserError(f"{path}: unknown config key {key!r}{_did_you_mean(key, defaults)} "
                            "(see --help for the list)")
        namespace[key] = _coerce(key, values[key], defaults[key], path, nullable, declared)
        applied.append(key)
    return applied
