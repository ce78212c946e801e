"""Nothing the user had is lost: a diverged, refused, failed or interrupted run, or a failed
export, leaves every checkpoint, metrics file and export as it was; bad input is one line on
stderr, exit code 2."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from checkpoint import save_run
from conftest import REPO, TINY, run_script
from errors import UserError
from model import GPT, GPTConfig
from optim import configure_optimizers

try:
    from conftest import assert_user_error
except ImportError:  # conftest.py gains it in another change
    def assert_user_error(result, *words):
        assert result.returncode == 2, (result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        for w in words:
            assert w in lines[0], lines[0]


def digests(folder):
    """{path relative to folder: sha256} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of a good run's out_dir (ckpt.pt, metrics.jsonl, loss.png), to be damaged."""
    path = tmp_path / "out"
    shutil.copytree(trained[0], path)
    return path


# train.py in a subprocess that, as iteration N begins, sends itself a real signal (N:SIGINT,
# N:SIGTERM) or makes its optimizer's state infinite (N:poison: what an overflowed step leaves;
# the weights and the loss stay finite), e.g. "21:poison,22:SIGINT"
AT_ITERATION = """
import os, signal, sys
import configurator, train
actions = dict(a.split(":") for a in sys.argv[1].split(","))
optimizers, configure, get_lr = [], train.configure_optimizers, train.get_lr
def configure_and_keep(*args, **kwargs):
    optimizers.append(configure(*args, **kwargs))
    return optimizers[-1]
def get_lr_and_act(it):
    action = actions.get(str(it))
    if action == "poison":
        for state in optimizers[0].state.values():
            state["exp_avg_sq"].fill_(float("inf"))
    elif action:
        os.kill(os.getpid(), getattr(signal, action))
    return get_lr(it)
train.configure_optimizers, train.get_lr = configure_and_keep, get_lr_and_act
sys.argv = ["train.py", *sys.argv[2:]]
configurator.run(train.main)
"""


def train_with(actions, *args):
    return run_script("-c", AT_ITERATION, actions, *TINY, *args)


# -----------------------------------------------------------------------------
# A1. a checkpoint is never written with weights or a loss that are not finite

def tiny_run():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_save_run_refuses_nonfinite_state_and_keeps_the_file(where, tmp_path):
    model, optimizer = tiny_run()
    path = str(tmp_path / "ckpt.pt")
    save_run(path, model, optimizer, {}, None, iter_num=1)
    before = digests(tmp_path)
    with torch.no_grad():
        if where == "weights":
            model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        else:
            next(iter(optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(UserError, match=r"NaN or infinite values at iteration 2.*left as it was") as info:
        save_run(path, model, optimizer, {}, None, iter_num=2)
    assert ("c_fc.weight" if where == "weights" else "exp_avg_sq") in str(info.value)
    assert digests(tmp_path) == before  # no temporary file left either


def test_a_diverged_run_interrupted_keeps_the_good_checkpoint(run_copy, char_dataset):
    # at learning_rate=1e6 the loss is NaN within 4 iterations; none is logged, so only the save
    # path can see it
    before = digests(run_copy)
    result = train_with("24:SIGINT", f"--dataset={char_dataset}", f"--out_dir={run_copy}",
                        "--init_from=resume", "--learning_rate=1e6", "--max_iters=1000",
                        "--eval_interval=1000", "--log_interval=1000")
    assert_user_error(result, "diverged", "not saved", "left as it was")
    assert "interrupted: saved" not in result.stdout
    assert digests(run_copy) == before


@pytest.mark.parametrize("path, actions, stop", [
    ("Ctrl-C", "21:poison,22:SIGINT", "--max_iters=1000"),
    ("end of run", "21:poison", "--max_iters=22"),  # an evaluation, with a finite val loss, and a save
])
def test_nonfinite_optimizer_state_is_never_saved(path, actions, stop, run_copy, char_dataset):
    before = digests(run_copy)
    result = train_with(actions, f"--dataset={char_dataset}", f"--out_dir={run_copy}",
                        "--init_from=resume", stop, "--eval_interval=1000", "--log_interval=1")
    assert_user_error(result, "exp_avg_sq", "NaN or infinite values at iteration 22", "left as it was")
    assert "iter 22: loss" in result.stdout  # the loss stayed finite: only the save path saw it
    assert digests(run_copy)["ckpt.pt"] == before["ckpt.pt"]


# -----------------------------------------------------------------------------
# A2. an export never replaces a model the run is made of

@pytest.fixture(scope="module")
def lora_chain(trained, char_dataset, tmp_path_factory):
    """root/lora2, a LoRA run on root/lora1, a LoRA run on root/hfbase, an export of a run."""
    root = tmp_path_factory.mktemp("chain")
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={root / 'hfbase'}")
    assert result.returncode == 0, result.stderr
    for run, base in (("lora1", root / "hfbase"), ("lora2", root / "lora1")):
        result = run_script("train.py", *TINY, f"--dataset={char_dataset}", f"--out_dir={root / run}",
                            f"--init_from={base}", "--finetune=lora", "--lora_rank=2",
                            "--max_iters=2", "--eval_interval=2")
        assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize("export_dir, words", [
    ("lora2", ["is the run's own folder"]),
    ("lora1", ["is the folder of", "lora2", "LoRA base"]),
    ("hfbase", ["is the folder of", "lora1", "LoRA base"]),  # the base of the base
    (".", ["holds", "which the export would delete"]),
])
def test_export_refuses_a_folder_the_run_is_made_of(export_dir, words, lora_chain):
    before = digests(lora_chain)
    result = run_script("export_hf.py", f"--out_dir={lora_chain / 'lora2'}",
                        f"--export_dir={lora_chain / export_dir}")
    assert_user_error(result, *words)
    assert digests(lora_chain) == before


def test_export_refuses_a_folder_of_other_files(trained, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert_user_error(result, "todo.txt", "not an export's files")
    assert os.listdir(folder) == ["todo.txt"]


# -----------------------------------------------------------------------------
# A5. an export is swapped in whole: a failure part way leaves the previous one intact

# export_hf.py with the disk full at one point of the export: part way through the weights, or
# when the written files are flushed (where a full disk shows with delayed allocation)
DISK_FULL = """
import errno, os, sys
import configurator, export_hf, safetensors.torch
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
def half_then_full(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata)[:1000])
    full()
if sys.argv[1] == "weights":
    safetensors.torch.save_file = half_then_full
else:
    os.fsync = full
sys.argv = ["export_hf.py", *sys.argv[2:]]
configurator.run(export_hf.main)
"""


def assert_previous_export_intact(folder, before, model):
    from checkpoint import load_model
    assert digests(folder) == before
    assert sorted(os.listdir(os.path.dirname(folder))) == ["hf"]  # no temporary folder left
    loaded, _ = load_model(str(folder))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.fixture
def exported(trained, tmp_path):
    """(folder, digests, model) of a good export of the trained run, in tmp_path/exports/hf."""
    from checkpoint import load_model
    folder = tmp_path / "exports" / "hf"
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert result.returncode == 0, result.stderr
    return folder, digests(folder), load_model(str(folder))[0]


@pytest.mark.parametrize("where", ["weights", "flush"])
def test_a_failed_export_leaves_the_previous_one(where, exported, trained):
    folder, before, model = exported
    result = run_script("-c", DISK_FULL, where, f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert_user_error(result, "cannot write the export", "No space left on device", "left as it was")
    assert_previous_export_intact(folder, before, model)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 160 KiB at tmp_path/disk: room for one tiny export, not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs, which only root can mount (the simulated one runs)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the simulated full disk runs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_leaves_the_previous_export(small_disk, trained):
    from checkpoint import load_model
    folder = small_disk / "hf"
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert result.returncode == 0, result.stderr
    before, model = digests(folder), load_model(str(folder))[0]
    assert 80_000 < sum(os.path.getsize(folder / name) for name in before) < 160_000  # one fits, two do not
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert_user_error(result, "cannot write the export", "No space left on device", "left as it was")
    assert_previous_export_intact(folder, before, model)
