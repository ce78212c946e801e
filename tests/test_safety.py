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
