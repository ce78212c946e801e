import atexit
import functools
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
sys.path.insert(0, REPO)

# tiktoken's GPT-2 files, cached beside the repo: no download needed
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

# why a test that needs tiktoken's GPT-2 encoding is skipped where its files cannot be had
NEEDS_GPT2 = ("needs GPT-2's real 50,257-token vocabulary: tiktoken's files, from "
              "../shared/tiktoken_cache or the internet")

# a model small enough that a training run takes a few seconds
TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=2", "--n_head=2",
        "--n_embd=32", "--block_size=32", "--batch_size=8", "--gradient_accumulation_steps=1",
        "--eval_iters=2", "--log_interval=5", "--learning_rate=3e-3", "--warmup_iters=5"]


def train_losses(stdout):
    """The loss of each logged iteration of a train.py run's stdout."""
    return [float(line.split("loss ")[1].split(",")[0]) for line in stdout.splitlines()
            if line.startswith("iter ")]


def eval_losses(stdout):
    """[(train loss, val loss, val acc)] of each evaluation a train.py run printed."""
    return [tuple(float(part.split()[2]) for part in line.split(": ", 1)[1].split(", "))
            for line in stdout.splitlines() if line.startswith("step ")]


def assert_user_error(result, *words):
    """A script refused bad input as a user error: exit code 2 and one line on stderr (no
    traceback) that holds each of words."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


# -----------------------------------------------------------------------------
# Running the repo's scripts. A fresh interpreter spends two seconds importing torch and the rest
# and most of another tearing them down, and the suite runs its scripts a few hundred times; so
# a run is forked from a server that has imported them already: `python ARGS` in cwd, run as the
# program (the script as __main__, sys.argv and sys.path[0] as Python sets them, stdin empty),
# exiting through the interpreter's own shutdown. A server serves one environment, the one it
# was started in: what a module reads from the environment at import (OpenMP's thread count,
# huggingface_hub's paths) is then what the run was given. The server itself runs no torch op,
# so no thread pool exists when it forks. What cannot be forked (torchrun, python -m) and what a
# test runs fresh on purpose (how a script starts) goes through subprocess.
SCRIPT_SERVER = r"""
import atexit, importlib.util, json, os, resource, runpy, signal, sys, threading, types
repo = sys.argv[1]
sys.path.insert(0, repo)
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a program started at a terminal has it
replies = os.fdopen(os.dup(1), "w")  # to the tests; what a warmed script prints goes to stderr
os.dup2(2, 1)
import gc, weakref, configurator, torch._dynamo, matplotlib.figure  # what every training run imports (torch.optim imports dynamo)
warmed = set()
def warm(args, cwd):
    # import a script as a module of its own (its imports are what its run needs) before the fork
    path = os.path.abspath(os.path.join(cwd, args[0]))
    if args[0].endswith(".py") and path not in warmed and os.path.isfile(path):
        warmed.add(path)
        spec = importlib.util.spec_from_file_location(f"warm{len(warmed)}", path)
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except BaseException:
            pass  # the run itself will say what is wrong
for line in sys.stdin:
    run = json.loads(line)
    warm(run["args"], run["cwd"])
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # what is imported stays out of the runs' collections: no copy-on-write, quick exits
    for finalizer in weakref.finalize._registry:  # torch's op libraries, unregistered at exit: 40 ms
        finalizer.atexit = False                  # of a forked run for nothing its outcome shows
    pid = os.fork()
    if pid == 0:
        break
    print(json.dumps({"pid": pid}), file=replies, flush=True)
    print(json.dumps({"code": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), file=replies, flush=True)
else:
    sys.exit(0)
# the child: the run (its stdout first: a test waits for it to be opened)
replies.close()
for fd, path, flags in ((1, run["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), (0, run["stdin"], os.O_RDONLY),
                        (2, run["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
    opened = os.open(path, flags)
    os.dup2(opened, fd)
    os.close(opened)
os.chdir(run["cwd"])
signal.alarm(run["timeout"])  # a runaway dies of SIGALRM
if run["memory"]:  # an allocation that would swap the machine fails instead
    resource.setrlimit(resource.RLIMIT_AS, (run["memory"], run["memory"]))
args, code = run["args"], 0
try:
    if args[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *args[2:]], ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(args[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv, sys.path[0] = list(args), os.path.dirname(os.path.abspath(args[0]))
        runpy.run_path(os.path.abspath(args[0]), run_name="__main__")
except SystemExit as e:  # as the interpreter turns it into an exit code
    if e.code is not None and not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
except BaseException as e:
    sys.excepthook(type(e), e, e.__traceback__)
    code = -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1
# the interpreter's shutdown up to its teardown of every module (a third of a second with torch
# imported, which nothing observable needs): threads joined, atexit run, output flushed
for thread in threading.enumerate():
    if thread is not threading.main_thread() and not thread.daemon:
        thread.join()
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
if code == -signal.SIGINT:  # as Python ends on an uncaught Ctrl-C
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
os._exit(code & 0xFF)
"""


class ScriptServer:
    """One SCRIPT_SERVER process, for runs in the environment env."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT_SERVER, REPO], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self, args, cwd, stdin, stdout, stderr, timeout, memory):
        """Fork a run whose stdin, stdout and stderr are those paths; its pid."""
        request = {"args": [str(a) for a in args], "cwd": str(cwd), "stdin": str(stdin), "stdout": str(stdout),
                   "stderr": str(stderr), "timeout": timeout, "memory": memory}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.reply()["pid"]

    def reply(self):
        line = self.proc.stdout.readline()
        assert line, f"the script server died (exit code {self.proc.poll()})"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_servers = {}  # environment: its server; the last few environments asked for


def server(env):
    env = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's, new every test
    key = tuple(sorted(env.items()))
    if key not in _servers:
        if len(_servers) == 3:
            _servers.pop(next(iter(_servers))).close()
        _servers[key] = ScriptServer(env)
    return _servers[key]


atexit.register(lambda: [s.close() for s in _servers.values()])


class ServedRun:
    """A script forked by its server, as subprocess.Popen(..., stdout=PIPE, text=True) would run
    it: stdin the text input (or empty), stdout a stream of its lines (a FIFO), stderr kept in
    a file. own_server: forked from a script server of its own, for a run that lasts while
    other runs start (a server under test): a script server waits for its run to end before it
    forks the next."""

    def __init__(self, args, cwd=REPO, env=None, input=None, timeout=600, memory=0, own_server=False):
        self.folder = tempfile.mkdtemp(prefix="served-")
        stdin, fifo, self.stderr_path = (os.path.join(self.folder, name) for name in ("stdin", "stdout", "stderr"))
        with open(stdin, "w", encoding="utf-8") as f:
            f.write(input or "")
        os.mkfifo(fifo)
        env = dict(os.environ) if env is None else {**os.environ, **env}
        self.own_server = own_server
        self.server = ScriptServer(env) if own_server else server(env)
        self.pid = self.server.start(args, cwd, stdin, fifo, self.stderr_path, timeout, memory)
        self.stdout = open(fifo, encoding="utf-8")  # open once the run has its end open
        self.returncode = None

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self):
        """(the rest of stdout, stderr), once the run has ended."""
        rest = self.stdout.read()
        self.stdout.close()
        self.wait()
        with open(self.stderr_path, encoding="utf-8") as f:
            stderr = f.read()
        shutil.rmtree(self.folder)
        return rest, stderr

    def wait(self):
        if self.returncode is None:
            self.returncode = self.server.reply()["code"]
            if self.own_server:
                self.server.close()
        return self.returncode


def run_script(*args, cwd=REPO, env=None, input=None, timeout=600, memory=0, fresh=False):
    """Run `python ARGS` (a script of the repo, or -c CODE) in cwd as a user would, and wait for
    it: a CompletedProcess. env: variables to set on top of this process's; input: the text on
    its stdin; timeout: seconds before it is killed (exit code -14); memory: bytes of address
    space it may take (0: no cap). fresh: in a new interpreter, not forked: a run that compiles
    (torch.compile's compile threads and workers hung in a forked run, with a cold cache)."""
    if fresh:
        return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, input=input,
                              timeout=timeout, env=None if env is None else {**os.environ, **env})
    run = ServedRun(args, cwd=cwd, env=env, input=input, timeout=timeout, memory=memory)
    stdout, stderr = run.communicate()
    return subprocess.CompletedProcess([sys.executable, *args], run.returncode, stdout, stderr)


def torchrun(*args, processes=2, timeout=600):
    """`torchrun --standalone --nproc_per_node=processes ARGS` in the repo, waited for: a
    CompletedProcess. A new interpreter (torchrun cannot be forked from the script server), with
    one OpenMP thread a process (two processes share a 2-core machine), and Python's
    faulthandler on: a process that dies of a signal first prints the Python stacks of its
    threads, into the stderr a failing test shows."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={processes}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


# runs of tiny models on one thread: they gain nothing from two, and two threads of each run
# contending with the other jobs of a busy 2-core machine made runs about 3x slower
ONE_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
_known = {}  # path: (its stat, its sha256): a file is hashed again only when its stat changes


def _sha256(path):
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device a test made: its kind (reading one would block)
        return f"not a file ({stat.S_IFMT(st.st_mode):o})"
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if _known.get(path, (None,))[0] != key:
        with open(path, "rb") as f:
            _known[path] = key, hashlib.sha256(f.read()).hexdigest()
    return _known[path][1]


def _digests(paths):
    """{path: sha256, "folder", or None where nothing is} of paths and all under them."""
    out = {}
    for top in map(str, paths):
        if not os.path.lexists(top):
            out[top] = None
        elif os.path.isfile(top):
            out[top] = _sha256(top)
        else:
            out[top] = "folder"
            for root, dirs, files in os.walk(top):
                out.update((os.path.join(root, name), "folder") for name in dirs)
                out.update((os.path.join(root, name), _sha256(os.path.join(root, name))) for name in files)
    return out


def run_cases(cases, timeout=60, memory=16 << 30):
    """Run bad-input cases, each {"script": "train.py" or "data/text/prepare.py" ..., "args":
    [...], "watch": [paths that must not change]}; for each, (its CompletedProcess, the watched
    paths it changed, added or removed). timeout: seconds a case may run (a runaway); memory:
    the address space a case may take (torch's own mappings included)."""
    out, watched, after = [], None, None
    for case in cases:
        watch = case.get("watch", ())
        # what the last case left is what this one starts from: walked once, not twice
        before = after if watch == watched else _digests(watch)
        ran = run_script(case["script"], *case["args"], env=ONE_THREAD, timeout=timeout, memory=memory)
        after, watched = _digests(watch), watch
        out.append((ran, sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))))
    return out


def until_stop(tokens, start, stop):
    """tokens (a list of ids) up to the first stop token at or after position start: the text a
    script prints, which ends there and leaves the stop token out."""
    return tokens[:tokens.index(stop, start)] if stop in tokens[start:] else tokens


def stand_in_text():
    """Two lines of Shakespeare, over and over."""
    lines = ["ROMEO:\nBut soft, what light through yonder window breaks?\n",
             "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n"]
    return "".join(lines[i % 2] for i in range(700))


def sample_text():
    """Some Shakespeare: the shared corpus when present, else a stand-in."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            return f.read()[:60_000]
    return stand_in_text()


@functools.cache
def _tiny_bpe_json():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, on bytes
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([stand_in_text()], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|endoftext|>"])  # the last id, as GPT-2's
    return tok.to_str()


def tiny_bpe():
    """A byte-level BPE of a few hundred tokens, GPT-2's kind (any text encodes, a character can
    span tokens, "<|endoftext|>" is a special token), for the tests that need some BPE but not
    GPT-2's own 50,257 tokens. Trained on the stand-in text, so it is the same with or without
    ../shared. A fresh tokenizers.Tokenizer each call."""
    from tokenizers import Tokenizer
    return Tokenizer.from_str(_tiny_bpe_json())


def save_tiny_bpe(folder):
    """Write tiny_bpe() into a model folder as its tokenizer.json (which checkpoint.load_model
    reads); returns the file's path."""
    path = os.path.join(str(folder), "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_tiny_bpe_json())
    return path


@functools.cache
def _gpt2_tokenizer():
    from nanogpt.errors import UserError
    from nanogpt.tokenizer import TiktokenTokenizer
    try:
        return TiktokenTokenizer("gpt2")
    except UserError:
        return None


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding (tokenizer.py's TiktokenTokenizer). A test (or fixture) that
    truly needs GPT-2's vocabulary asks for this, and is skipped with NEEDS_GPT2 where tiktoken
    cannot get its files."""
    tok = _gpt2_tokenizer()
    if tok is None:
        pytest.skip(NEEDS_GPT2)
    return tok


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory):
    """A char-level dataset made by data/shakespeare_char/prepare.py from a local text."""
    root = tmp_path_factory.mktemp("shakespeare_char")
    src = root / "input.txt"
    src.write_text(sample_text(), encoding="utf-8")
    out = root / "data"
    result = run_script("data/shakespeare_char/prepare.py", f"--input={src}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    return str(out)


@pytest.fixture(scope="session")
def trained(char_dataset, tmp_path_factory):
    """A tiny model trained for 20 iterations, with its checkpoint in out_dir."""
    out_dir = str(tmp_path_factory.mktemp("out"))
    result = run_script("train.py", *TINY, f"--dataset={char_dataset}", f"--out_dir={out_dir}",
                        "--max_iters=20", "--eval_interval=10")
    assert result.returncode == 0, result.stderr
    return out_dir, result.stdout
