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
expected), so a typo fails loudly instead of training the wrong model.

Mistakes made by the person at the keyboard are reported as UserError: one
line on stderr and exit code 2, no traceback (see `run`).
"""

import ast
import sys

from errors import UserError


def run(main):
    """Call main(), turning a UserError into a one-line message and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _is_knob(key, value):
    # the knobs are the script's lowercase globals holding plain data
    return (not key.startswith("_") and key.islower()
            and isinstance(value, (bool, int, float, str, type(None), tuple, list, dict)))


def knobs(namespace):
    """The configurable globals of a script, in their declaration order."""
    return {k: v for k, v in namespace.items() if _is_knob(k, v)}


def _coerce(key, value, default, origin):
    """Check `value` against the type of `default`; return the value to store."""
    if default is None or value is None:
        return value  # None means "unset / auto": any type may replace it
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


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as cpu or gpt2-xl


def _print_help(defaults, script):
    print(f"usage: python {script} [config/file.py] [--key=value ...]\n")
    print("keys (default):")
    width = max(len(k) for k in defaults)
    for k, v in defaults.items():
        print(f"  --{k.ljust(width)}  {v!r}")


def configure(namespace, argv=None, skip_unknown_file_keys=False):
    """Apply a config file and --key=value overrides to `namespace` (a script's globals).
    skip_unknown_file_keys: a config file may set keys this script does not have (bench.py
    reads train.py's configs for the model's shape); --key=value overrides stay strict."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = knobs(namespace)
    script = namespace.get("__file__", "script.py")
    if any(a in ("-h", "--help") for a in argv):
        _print_help(defaults, script)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            _apply_file(namespace, defaults, arg, skip_unknown_file_keys)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise UserError(f"argument {arg!r} must look like --key=value")
        if key not in defaults:
            raise UserError(f"unknown config key {key!r} (see --help for the list)")
        namespace[key] = _coerce(key, _parse_value(text), defaults[key], f"--{key}")
    return knobs(namespace)


def _apply_file(namespace, defaults, path, skip_unknown):
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise UserError(f"cannot read config file {path!r}: {e.strerror}") from None
    values = {}
    try:
        exec(compile(source, path, "exec"), {}, values)
    except Exception as e:  # a config file is user input; any failure is theirs to fix
        raise UserError(f"config file {path!r} failed: {type(e).__name__}: {e}") from None
    for key, value in values.items():
        if key.startswith("_") or type(value).__name__ == "module":
            continue
        if key not in defaults:
            if skip_unknown:
                continue
            raise UserError(f"{path}: unknown config key {key!r} (see --help for the list)")
        namespace[key] = _coerce(key, value, defaults[key], path)
