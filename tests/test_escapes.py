"""Issue 31's escapes that a row of tests/test_bad_input_table.py cannot express: standard output
that cannot take what a script writes (a reader that went away, a full disk, an encoding that
lacks a character), fuzzed, and a second Ctrl-C or SIGTERM while a stopped run saves or exits."""

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile

import pytest
import torch

import conftest
from conftest import ONE_THREAD, REPO, TINY, ServedRun, assert_user_error, run_script


def run_with_stdout(stdout, *args, env=ONE_THREAD):
    """(exit code, stderr) of `python ARGS` run as conftest.run_script runs it, with its standard
    output the file at stdout. A FIFO there is opened and closed at once: a reader that goes away
    before the script writes, as `| head` goes once it has read what it wants."""
    fifo = os.path.exists(stdout) and stat.S_ISFIFO(os.stat(stdout).st_mode)
    folder = tempfile.mkdtemp(prefix="stdout-")
    stderr = os.path.join(folder, "stderr")
    server = conftest.server({**os.environ, **env})
    server.start(args, REPO, os.devnull, stdout, stderr, 120, 0)
    if fifo:
        open(stdout, "rb").close()  # returns once the script has opened its end
    code = server.reply()["code"]
    with open(stderr, encoding="utf-8") as f:
        text = f.read()
    shutil.rmtree(folder)
    return code, text


@pytest.fixture
def closed_pipe(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return str(path)


# -----------------------------------------------------------------------------
# the terminal

SAMPLE = ["--device=cpu", "--max_new_tokens=20", "--num_samples=1"]


@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_a_reader_that_goes_away_ends_the_script_quietly(script, closed_pipe, trained, char_dataset, tmp_path):
    # `python sample.py | head -1`: exit code 141, as a Unix tool that SIGPIPE ends, and nothing
    # on stderr (no BrokenPipeError, no "Exception ignored")
    args = {"sample.py": [*SAMPLE, f"--out_dir={trained[0]}"],
            "train.py": [*TINY, "--peak_flops=1e12", f"--dataset={char_dataset}",
                         f"--out_dir={tmp_path / 'out'}", "--max_iters=20", "--log_interval=1"]}[script]
    code, stderr = run_with_stdout(closed_pipe, script, *args)
    assert code == 141 and stderr == "", (code, stderr)
    if script == "train.py":  # it stopped, as a kill would stop it, and let go of its out_dir
        assert not (tmp_path / "out" / "run.lock").exists()


def test_a_full_disk_under_standard_output_is_one_line(trained):
    code, stderr = run_with_stdout("/dev/full", "sample.py", *SAMPLE, f"--out_dir={trained[0]}")
    assert_user_error(subprocess.CompletedProcess([], code, "", stderr),
                      "cannot write to standard output: No space left on device")


@pytest.fixture(scope="module")
def unicode_run(tmp_path_factory):
    """A run (random weights) whose vocabulary is characters outside ASCII and Latin-1."""
    from model import GPT, GPTConfig
    from nanogpt.checkpoint import save_run
    from nanogpt.optim import configure_optimizers
    from nanogpt.tokenizer import CharTokenizer
    chars = "\n café☃€"
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=32, vocab_size=len(chars)))
    folder = tmp_path_factory.mktemp("unicode_run")
    save_run(str(folder / "ckpt.pt"), model, configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu"),
             {}, CharTokenizer(chars).spec(), iter_num=0)
    return folder


def test_characters_the_terminal_lacks_come_out_escaped(unicode_run):
    # PYTHONIOENCODING=ascii (or a C locale): the sample is printed, its other characters as
    # Python writes them in a string (\xe9), not a UnicodeEncodeError
    result = run_script("sample.py", *SAMPLE, f"--out_dir={unicode_run}", "--start=café ☃",
                        env={**ONE_THREAD, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    assert result.stdout.startswith("caf\\xe9 \\u2603"), result.stdout
    assert len(result.stdout.split("\n---")[0]) > len("caf\\xe9 \\u2603")  # the sample too


# a script (configurator.run) printing the lines of a JSON file, (text, flush) each, to a
# standard output of the given encoding and error handler
PRINT_LINES = """
import json, sys
import configurator
path, encoding, errors = sys.argv[1:]
sys.stdout.reconfigure(encoding=encoding, errors=errors)
with open(path, encoding="utf-8") as f:
    lines = json.load(f)
def main():
    for text, flush in lines:
        print(text, flush=flush)
configurator.run(main)
"""


def random_text(rng):
    """Text from every range of Unicode: ASCII, Latin-1, the rest of the first plane, the
    planes above it, and lone surrogates, which no encoding takes (those of surrogateescape,
    which stand for the bytes of undecodable input, and others)."""
    ranges = [(32, 127), (128, 256), (256, 0x10000), (0x10000, 0x110000), (0xDC80, 0xDD00), (0xD800, 0xE000)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randrange(0, 300)))


def written(char, encoding):
    try:
        return char.encode(encoding, "surrogateescape")
    except UnicodeEncodeError:
        return char.encode(encoding, "backslashreplace")


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_standard_output(seed, tmp_path):
    # any text, any encoding (with the error handler Python picks: strict, or surrogateescape
    # under a C locale), printed to a file, to a reader that went away, to a full disk: each
    # character as Python's codec writes it, else the byte surrogateescape gives, else the
    # backslashreplace escape; exit code 141; or one error line
    rng = random.Random(seed)
    encoding, errors = rng.choice(["ascii", "latin-1", "utf-8"]), rng.choice(["strict", "surrogateescape"])
    sink = rng.choice(["file", "file", "closed pipe", "full disk"])
    lines = [(random_text(rng), rng.random() < 0.3) for _ in range(rng.randrange(1, 40))]
    with open(tmp_path / "lines.json", "w", encoding="utf-8") as f:
        json.dump(lines, f)
    with open(tmp_path / "lines.json", encoding="utf-8") as f:
        lines = json.load(f)  # as the script reads them: a high and a low surrogate become one character
    stdout = {"file": str(tmp_path / "out"), "full disk": "/dev/full"}.get(sink)
    if sink == "closed pipe":
        stdout = str(tmp_path / "pipe")
        os.mkfifo(stdout)
    code, stderr = run_with_stdout(stdout, "-c", PRINT_LINES, str(tmp_path / "lines.json"), encoding, errors)
    if sink == "file":
        assert code == 0 and stderr == "", stderr
        expected = b"".join(written(c, encoding) for text, _ in lines for c in text + "\n")
        with open(stdout, "rb") as f:
            assert f.read() == expected
    elif sink == "closed pipe":
        assert code == 141 and stderr == "", (code, stderr)
    else:
        assert code == 2 and stderr == "error: cannot write to standard output: No space left on device\n", stderr


# -----------------------------------------------------------------------------
# signals

# train.py (configurator.run(train.main), as the script runs it) that waits, printing `what`, at
# one place: "written", once a checkpoint's bytes are in its temporary file (before it is renamed
# into place); "exiting", in the interpreter's exit handlers, after the run has ended
WAIT_AT = """
import atexit, sys, time
import torch
import configurator, train
def wait(what):
    print(what, flush=True)
    time.sleep(60)  # until the test's signal
if sys.argv[1] == "exiting":
    atexit.register(wait, "exiting")
else:
    save = torch.save
    def save_and_wait(*args, **kwargs):
        save(*args, **kwargs)
        wait("written")
    torch.save = save_and_wait
sys.argv = ["train.py", *sys.argv[2:]]
configurator.run(train.main)
"""


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
@pytest.mark.parametrize("where", ["written", "exiting"])
def test_a_second_signal_quits_at_once_and_quietly(where, sig, trained, char_dataset, tmp_path):
    # the first asks the run to stop and save; the second, landing in that save or in the
    # interpreter's exit, ends it with the shell's code for the signal, one line, and the
    # checkpoint whole: the old one (in the save), or the one just saved (in the exit)
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    before = sha256(out / "ckpt.pt")
    proc = ServedRun(["-c", WAIT_AT, where, *TINY, "--peak_flops=1e12", f"--dataset={char_dataset}",
                      f"--out_dir={out}", "--init_from=resume", "--max_iters=1000",
                      "--eval_interval=1000", "--log_interval=1"], env=ONE_THREAD, timeout=120)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 22:"):
            proc.send_signal(sig)
        if line.startswith(where):
            proc.send_signal(sig)
            break
    rest, stderr = proc.communicate()
    stdout = "".join(lines) + rest
    assert proc.returncode == 128 + sig and stderr.strip() == "interrupted", (proc.returncode, stderr)
    if where == "written":
        assert sha256(out / "ckpt.pt") == before
    else:
        saved = int(stdout.split("interrupted: saved iteration ")[1].split()[0])
        assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == saved > 20


# -----------------------------------------------------------------------------
# knobs whose default is None

def test_every_knob_whose_default_is_none_declares_its_types():
    # configure checks a value against the types a script declares (`device: str | None =
    # None`); undeclared, a None default would take anything (`--device=5`). The decoding flags
    # are engine.py's, which checks them itself (engine.options_from_flags).
    import glob
    import importlib.util
    from configurator import knobs
    from nanogpt import engine
    decoding = set(engine.decoding_flags())
    scripts = [path for pattern in ("*.py", "data/*/prepare.py", "bench/*.py")
               for path in sorted(glob.glob(os.path.join(REPO, pattern)))
               if "configure(globals()" in open(path, encoding="utf-8").read() and not path.endswith("configurator.py")]
    assert len(scripts) >= 20
    for path in scripts:
        spec = importlib.util.spec_from_file_location("declared_" + os.path.relpath(path, REPO)[:-3].replace("/", "_"), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        declared = vars(module).get("__annotations__", {})
        untyped = [key for key, default in knobs(vars(module)).items()
                   if default is None and key not in declared and key not in decoding]
        assert not untyped, (os.path.relpath(path, REPO), untyped)


@pytest.mark.parametrize("declared, arg, value", [
    (str, "--device=cuda:1", "cuda:1"),
    (str, "--device=None", None),
    (bool, "--device", True),  # bare, as a switch
    (float, "--device=3", 3.0),  # an int where a float is declared, as for a float default
    (int, "--device=3", 3),
])
def test_a_declared_type_is_taken(declared, arg, value):
    from configurator import configure
    namespace = {"device": None, "__annotations__": {"device": declared | None}}
    configure(namespace, [arg])
    assert namespace["device"] == value and type(namespace["device"]) is type(value)


@pytest.mark.parametrize("declared, arg, words", [
    (str, "--device=5", "device must be a str or None (default None), got 5"),
    (str, "--device", "needs a value"),
    (int, "--device=True", "device must be an int or None"),
    (int, "--device=2.5", "device must be an int or None"),
    (float, "--device=fast", "device must be a float or None"),
    (float, "--device=nan", "device must be a finite number"),
    (bool, "--device=1", "device must be a bool or None"),
])
def test_a_value_of_another_type_than_declared_is_refused(declared, arg, words):
    from configurator import configure
    from nanogpt.errors import UserError
    with pytest.raises(UserError) as info:
        configure({"device": None, "__annotations__": {"device": declared | None}}, [arg])
    assert words in str(info.value)


def test_a_config_file_is_held_to_the_declared_type(tmp_path):
    from configurator import configure
    from nanogpt.errors import UserError
    config = tmp_path / "config.py"
    config.write_text("device = 5\n")
    with pytest.raises(UserError, match="device must be a str or None"):
        configure({"device": None, "__annotations__": {"device": str | None}}, [str(config)])


def test_none_replaces_only_a_default_of_none_unless_a_script_says():
    # bench/fsdp_memory.py and data/chat_demo/prepare.py call configure(globals()) as it is
    from configurator import configure
    from nanogpt.errors import UserError
    with pytest.raises(UserError, match="processes cannot be None"):
        configure({"processes": 2}, ["--processes=None"])
    namespace = {"top_k": 200}
    configure(namespace, ["--top_k=None"], nullable=("top_k",))
    assert namespace["top_k"] is None
