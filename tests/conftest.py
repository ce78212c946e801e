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

# a model small enough that a training run takes a few seconds
TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=2", "--n_head=2",
        "--n_embd=32", "--block_size=32", "--batch_size=8", "--gradient_accumulation_steps=1",
        "--eval_iters=2", "--log_interval=5", "--learning_rate=3e-3", "--warmup_iters=5"]


def run_script(*args, cwd=REPO):
    """Run one of the repo's scripts in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def sample_text():
    """Some Shakespeare: the shared corpus when present, else a stand-in."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            return f.read()[:60_000]
    lines = ["ROMEO:\nBut soft, what light through yonder window breaks?\n",
             "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n"]
    return "".join(lines[i % 2] for i in range(700))


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
