"""Bad input: one line on stderr, exit code 2, no traceback, nothing overwritten."""

import hashlib
import os
import shutil

import pytest

from conftest import TINY, assert_user_error, run_script


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def out_dir(trained, tmp_path):
    """A copy of a good run's out_dir: bad commands must leave its checkpoint as it was."""
    path = str(tmp_path / "out")
    shutil.copytree(trained[0], path)
    before = digest(os.path.join(path, "ckpt.pt"))
    yield path
    assert digest(os.path.join(path, "ckpt.pt")) == before
    assert sorted(os.listdir(path)) == sorted(os.listdir(trained[0]))


@pytest.mark.parametrize("args, words", [
    (["--n_layers=3"], ["unknown config key 'n_layers'"]),
    (["--batch_size=abc"], ["batch_size must be an int", "'abc'"]),
    (["--learning_rate=True"], ["learning_rate must be a float"]),
    (["config/no_such_config.py"], ["cannot read config file", "no_such_config.py"]),
    (["--n_embd=30", "--n_head=4"], ["n_embd (30) must be divisible by n_head (4)"]),
    (["--block_size=100000"], ["block_size=100000"]),
    (["--device=tpu"], ["device must be"]),
    (["--dtype=float8"], ["dtype must be"]),
    (["--optim=sgd"], ["optim must be 'adamw' or 'muon'", "'sgd'"]),
])
def test_train_rejects_bad_config(args, words, out_dir, char_dataset):
    result = run_script("train.py", *TINY, f"--dataset={char_dataset}", f"--out_dir={out_dir}",
                        "--max_iters=5", *args)
    assert_user_error(result, *words)


def test_train_missing_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script("train.py", *TINY, f"--dataset={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'o'}")
    assert_user_error(result, "train.bin", "prepare.py")
    assert not (tmp_path / "o").exists()


def test_train_resume_without_checkpoint(tmp_path, char_dataset):
    result = run_script("train.py", *TINY, f"--dataset={char_dataset}", f"--out_dir={tmp_path}",
                        "--init_from=resume")
    assert_user_error(result, "no checkpoint", str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint(damage, trained, tmp_path, char_dataset):
    out_dir = tmp_path / "out"
    shutil.copytree(trained[0], out_dir)
    ckpt = out_dir / "ckpt.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 100)
    broken = digest(ckpt)
    for script, args in [("train.py", [*TINY, f"--dataset={char_dataset}", "--init_from=resume"]),
                         ("sample.py", ["--device=cpu"])]:
        result = run_script(script, *args, f"--out_dir={out_dir}")
        assert_user_error(result, "corrupt", "ckpt.pt")
        assert digest(ckpt) == broken


def test_sample_prompt_outside_vocabulary(out_dir):
    result = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--start=ROMEO: ☃ ok€",
                        "--max_new_tokens=5")
    assert_user_error(result, "outside the vocabulary", "'☃'", "'€'")


def test_sample_without_checkpoint(tmp_path):
    result = run_script("sample.py", f"--out_dir={tmp_path}", "--device=cpu")
    assert_user_error(result, "no checkpoint")


@pytest.mark.parametrize("args, words", [
    (["--temperature=-1"], ["temperature"]),
    (["--max_new_tokens=-3"], ["max_new_tokens"]),
    (["--top_k=-1"], ["top_k"]),
    (["--start=FILE:/no/such/prompt.txt"], ["cannot read prompt file"]),
    (["--start="], ["prompt is empty"]),
])
def test_sample_rejects_bad_options(args, words, out_dir):
    result = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", *args)
    assert_user_error(result, *words)
