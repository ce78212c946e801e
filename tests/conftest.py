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


def assert_user_error(result, *words):
    """A script refused bad input as a user error: exit code 2 and one line on stderr (no
    traceback) that holds each of words."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


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
