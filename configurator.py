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
import difflib
import gc
import math
import os
import signal
import sys

from nanogpt.errors import UserError
from nanogpt.reading import read_text


def _interrupted_while_starting(signum, frame):
    # at once, not by raising: an import's bare `except:` could swallow a SystemExit, and
    # nothing has been written yet that a cleanup would need to finish
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


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
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def run(main):
    """Call main(), turning a UserError into a one-line message and exit code 2, Ctrl-C into
    "interrupted" and exit code 130."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is Python's again
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        # The interpreter's exit collects every object's cycles: with torch._dynamo imported
        # (any torch optimizer imports it) that alone takes most of a second. Everything this
        # script wrote is closed by now, so the program skips it; a caller that imported the
        # script keeps its collector.
        if _our_script_is_the_program():
            gc.freeze()


def _is_knob(key, value):
    # the knobs are the script's lowercase globals holding plain data
    return (not key.startswith("_") and key.islower()
            and isinstance(value, (bool, int, float, str, type(None), tuple, list, dict)))


def knobs(namespace):
    """The configurable globals of a script, in their declaration order."""
    return {k: v for k, v in namespace.items() if _is_knob(k, v)}


def _coerce(key, value, default, origin, nullable=None):
    """Check `value` against the type of `default`; return the value to store. nullable: the
    keys besides those whose default is None that None may be given to (None: every key)."""
    _check_numbers(key, value, default, origin)
    if default is None:
        return value  # None means "unset / auto": any type may replace it
    if value is None:
        if nullable is None or key in nullable:
            return value
        raise UserError(f"{origin}: {key} cannot be None (default {default!r}): None only "
                        "replaces the settings whose default is None")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = type(default).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError(f"{origin}: {key} must be {article} {kind} "
                        f"(default {default!r}), got {value!r}")
    return value


def _check_numbers(key, value, default, origin):
    """Refuse a NaN or an infinity anywhere in value (1e400 parses as one), and an int too large
    to be a float (a 1 and 400 zeros), before anything runs: an optimizer or a clip given one
    trains NaNs, or raises deep inside torch. A word a float knob is given that Python reads as
    NaN or infinity ('nan', 'inf') is named as such."""
    if isinstance(default, float) and isinstance(value, str):
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
            _check_numbers(key, item, None, origin)
    elif isinstance(value, dict):
        for item in value.values():
            _check_numbers(key, item, None, origin)


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


def _print_help(defaults, script):
    print(f"usage: python {script} [config/file.py] [--key=value ...]\n")
    print("keys (default):")
    width = max(len(k) for k in defaults)
    for k, v in defaults.items():
        print(f"  --{k.ljust(width)}  {v!r}")


class Settings(dict):
    """The knobs after configure(): {key: value}, and .passed, the keys that a config file or
    the command line set (to any value, the default's included), which is how a script tells
    what the user asked for from what it may fill in itself."""

    def __init__(self, values, passed):
        super().__init__(values)
        self.passed = frozenset(passed)


def configure(namespace, argv=None, skip_unknown_file_keys=False, nullable=None):
    """Apply a config file and --key=value overrides to `namespace` (a script's globals);
    returns the knobs as Settings (a dict, with .passed: the keys given).
    skip_unknown_file_keys: a config file may set keys this script does not have
    (bench/train_step.py reads train.py's configs for the model's shape); --key=value
    overrides stay strict.
    nullable: the keys whose default is not None that may still be set to None (e.g. () for
    none); left at None, any key may be."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = knobs(namespace)
    script = namespace.get("__file__", "script.py")
    if any(a in ("-h", "--help") for a in argv):
        _print_help(defaults, script)
        sys.exit(0)
    passed = set()
    for arg in argv:
        if not arg.startswith("--"):
            passed.update(_apply_file(namespace, defaults, arg, skip_unknown_file_keys, nullable))
            continue
        key, sep, text = arg[2:].partition("=")
        if key not in defaults:
            raise UserError(f"unknown config key {key!r}{_did_you_mean(key, defaults, '--')} "
                            "(see --help for the list)")
        if not sep:  # a bare --flag switches a True / False setting on, as argparse's store_true
            if not isinstance(defaults[key], bool) and defaults[key] is not None:
                raise UserError(f"argument {arg!r} needs a value: --{key}=... (only a True / "
                                "False setting may be given bare)")
            text = "True"
        namespace[key] = _coerce(key, _parse_value(text), defaults[key], f"--{key}", nullable)
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


def _apply_file(namespace, defaults, path, skip_unknown, nullable=None):
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
        namespace[key] = _coerce(key, values[key], defaults[key], path, nullable)
        applied.append(key)
    return applied
