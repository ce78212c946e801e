import functools
import os
import subprocess
import sys

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


def run_script(*args, cwd=REPO, env=None):
    """Run one of the repo's scripts in a fresh interpreter, as a user would; env: variables to
    set on top of this process's."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})


def train_losses(stdout):
    """The loss of each logged iteration of a train.py run's stdout."""
    return [float(line.split("loss ")[1].split(",")[0]) for line in stdout.splitlines()
            if line.startswith("iter ")]


def eval_losses(stdout):
    """[(train loss, val loss, val acc)] of each evaluation a train.py run printed."""
    return [tuple(float(part.split()[-1]) for part in line.split(": ", 1)[1].split(", "))
            for line in stdout.splitlines() if line.startswith("step ")]


def assert_user_error(result, *words):
    """A script refused bad input as a user error: exit code 2 and one line on stderr (no
    traceback) that holds each of words."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


# The runner of bad-input tables: one interpreter imports every script once (torch and all),
# then forks a child per case, which runs `python SCRIPT ARGS` as the script's __main__ would:
# configurator.run(main), with stdout and stderr in files, stdin empty. Before and after each
# case it takes the sha256 of every file under the case's watched paths (None for a path that
# does not exist; a file whose stat is unchanged keeps the hash it had), so a case that changes,
# adds or removes a file is caught and named. A child
# that runs past its time is killed by an alarm (a runaway), and its address space is capped, so
# that an allocation that would swap the machine fails instead. Prints one JSON list:
# [{"code": exit code, "changed": [paths]}, ...].
CASE_RUNNER = r"""
import hashlib, importlib, importlib.util, json, os, resource, signal, sys, traceback
repo, spec_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
os.chdir(repo)
import configurator
with open(spec_path) as f:
    cases = json.load(f)
modules = {}
def module(script):
    if script not in modules:
        if "/" not in script:  # train.py, sample.py, ...: imported by name, as they import each other
            modules[script] = importlib.import_module(script[:-3])
        else:
            name = "case_" + script[:-3].replace("/", "_")
            spec = importlib.util.spec_from_file_location(name, os.path.join(repo, script))
            modules[script] = importlib.util.module_from_spec(spec)
            sys.modules[name] = modules[script]
            spec.loader.exec_module(modules[script])
    return modules[script]
known = {}  # path: (its stat, its sha256): a file is hashed again only when its stat changes
def sha256(path):
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if known.get(path, (None,))[0] != key:
        with open(path, "rb") as f:
            known[path] = key, hashlib.sha256(f.read()).hexdigest()
    return known[path][1]
def digests(paths):
    out = {}
    for top in paths:
        if not os.path.lexists(top):
            out[top] = None
        elif os.path.isfile(top):
            out[top] = sha256(top)
        else:
            out[top] = "folder"
            for root, dirs, files in os.walk(top):
                for name in dirs:
                    out[os.path.join(root, name)] = "folder"
                for name in files:
                    out[os.path.join(root, name)] = sha256(os.path.join(root, name))
    return out
for case in cases:
    module(case["script"])  # every import before the first fork
results = []
for case in cases:
    before = digests(case["watch"])
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        for fd, name in ((1, case["log"] + ".out"), (2, case["log"] + ".err")):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        signal.alarm(case["timeout"])
        limit = case["memory"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.argv, code = [case["script"], *case["args"]], 0
        try:
            configurator.run(module(case["script"]).main)
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    after = digests(case["watch"])
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    results.append({"code": code, "changed": changed})
print(json.dumps(results))
"""


def run_cases(cases, folder, timeout=60, memory=16 << 30):
    """Run bad-input cases, each {"script": "train.py" or "data/text/prepare.py" ..., "args":
    [...], "watch": [paths that must not change]}, through CASE_RUNNER, in one process that
    forks a child per case; logs go to folder. Returns, for each case, (CompletedProcess-like
    result, the watched paths that changed). timeout: seconds a case may run; memory: the
    address space a case may take (torch's own mappings included)."""
    import json
    folder = str(folder)
    spec = []
    for i, case in enumerate(cases):
        spec.append({"script": case["script"], "args": [str(a) for a in case["args"]],
                     "watch": [str(p) for p in case.get("watch", ())],
                     "log": os.path.join(folder, f"case{i}"), "timeout": timeout, "memory": memory})
    spec_path = os.path.join(folder, "cases.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    result = subprocess.run([sys.executable, "-c", CASE_RUNNER, REPO, spec_path], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout * len(cases) + 120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = []
    for entry, case in zip(json.loads(result.stdout.strip().splitlines()[-1]), spec):
        with open(case["log"] + ".out") as f, open(case["log"] + ".err") as g:
            ran = subprocess.CompletedProcess(case["args"], entry["code"], f.read(), g.read())
        out.append((ran, entry["changed"]))
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
    from errors import UserError
    from tokenizer import TiktokenTokenizer
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
