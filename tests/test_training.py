"""Training at scale and under faults: DDP, exact resume, SIGKILL, NaN, Ctrl-C, run logs."""

import dataclasses
import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from nanogpt.errors import UserError
from conftest import TINY, ServedRun, eval_losses, run_script, torchrun, train_losses

RUN = [*TINY, "--eval_interval=10", "--lr_decay_iters=40", "--min_lr=3e-4"]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def train(out_dir, dataset, *args):
    result = run_script("train.py", *RUN, f"--dataset={dataset}", f"--out_dir={out_dir}", *args,
                        fresh="--compile=True" in args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_two_process_ddp_matches_one_process_with_twice_the_batch(char_dataset, tmp_path):
    one = train(tmp_path / "one", char_dataset, "--batch_size=8", "--max_iters=20")
    two = torchrun("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={tmp_path / 'two'}",
                   "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=20")
    assert two.returncode == 0, two.stderr[-8000:]
    # one process logs and writes the checkpoint
    assert two.stdout.count("saving checkpoint") == one.count("saving checkpoint") == 2
    # both evaluate, each its half of one process's rows
    assert len(eval_losses(one)) == 3
    np.testing.assert_allclose(eval_losses(two.stdout), eval_losses(one), atol=2e-4)
    # the logged loss is averaged over the processes: the loss of the whole batch
    assert len(train_losses(one)) == 4
    assert train_losses(two.stdout) == pytest.approx(train_losses(one), abs=2e-4)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("optim, model", [
    ("adamw", []), ("muon", []),
    # the speedrun's choices: a new Llama-family model; relu2 in bfloat16 (a CPU's own attention)
    ("muon", ["--family=llama", "--mlp_hidden=48"]), ("muon", ["--activation=relu2", "--dtype=bfloat16"])])
def test_resume_is_bitwise_identical(optim, model, char_dataset, tmp_path):
    # dropout > 0: the resumed run must also restore the random state dropout draws from;
    # Muon's momentum is restored as AdamW's moments are. The resumed run is told nothing of
    # the model: its checkpoint says which it is
    args = ["--dropout=0.1", "--always_save_checkpoint=True", f"--optim={optim}"]
    train(tmp_path / "whole", char_dataset, *args, *model, "--max_iters=30")
    train(tmp_path / "split", char_dataset, *args, *model, "--max_iters=10")
    train(tmp_path / "split", char_dataset, *args, "--max_iters=30", "--init_from=resume",
          *[a for a in model if a.startswith("--dtype")])
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_ctrl_c_saves_and_resume_is_bitwise_identical(char_dataset, tmp_path):
    args = [*RUN, f"--dataset={char_dataset}", "--dropout=0.1", "--max_iters=60", "--log_interval=1"]
    train(tmp_path / "whole", char_dataset, *args[len(RUN) + 1:])
    out = tmp_path / "split"
    proc = ServedRun(["train.py", *args, f"--out_dir={out}"])
    for line in proc.stdout:
        if line.startswith("iter 17:"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "interrupted: saved iteration" in stdout
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert 17 <= stopped_at < 60
    train(out, char_dataset, *args[len(RUN) + 1:], "--init_from=resume")
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_an_out_dir_deleted_mid_run_stops_it_with_one_line(char_dataset, tmp_path):
    out = tmp_path / "out"
    proc = ServedRun(["train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}",
                      "--max_iters=100000", "--log_interval=1", "--eval_interval=20"])
    for line in proc.stdout:
        if line.startswith("iter 25:"):  # after the first checkpoint
            while out.exists():  # the run may be writing a file into it meanwhile
                shutil.rmtree(out, ignore_errors=True)
            break
    stdout, stderr = proc.communicate()
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()  # one line, no traceback
    assert len(lines) == 1 and lines[0].startswith(f"error: out_dir {out} was removed during the run ({out}/")
    assert lines[0].endswith(" could not be written): the run stopped")
    assert not out.exists()


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(char_dataset, tmp_path):
    # a model of a few MB, saved at every iteration: most of the run is spent writing
    out = tmp_path / "out"
    args = [*RUN, f"--dataset={char_dataset}", f"--out_dir={out}", "--n_embd=256", "--n_head=4",
            "--eval_interval=1", "--eval_iters=1", "--max_iters=100000", "--log_interval=1000"]
    rng = random.Random(0)
    for trial in range(8):
        resume = ["--init_from=resume"] if (out / "ckpt.pt").exists() else []
        proc = ServedRun(["train.py", *args, *resume])
        for line in proc.stdout:
            if line.startswith("saving checkpoint"):
                break
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere in a later save, or between saves
        proc.kill()
        proc.communicate()
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["iter_num"] >= 1 and ckpt["model"] and ckpt["optimizer"]["state"]


# train.py as `python train.py ARGS` runs it, in a fresh interpreter, but with GPT.forward
# returning a NaN loss from its 4th call in training mode on
NAN_AFTER_3_CALLS = """
import runpy, sys
import model
forward, calls = model.GPT.forward, []
def poisoned(self, *args, **kwargs):
    logits, loss = forward(self, *args, **kwargs)
    calls.append(1)
    if self.training and len(calls) > 3:
        loss = loss * float("nan")
    return logits, loss
model.GPT.forward = poisoned
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_nan_loss_stops_the_run_and_keeps_the_checkpoint(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    before = (out / "ckpt.pt").read_bytes()
    dataset = torch.load(out / "ckpt.pt", weights_only=True)["config"]["dataset"]
    result = run_script("-c", NAN_AFTER_3_CALLS, *RUN, f"--dataset={dataset}", f"--out_dir={out}",
                        "--init_from=resume", "--max_iters=60", "--eval_interval=5",
                        "--log_interval=1", "--always_save_checkpoint=True")
    assert result.returncode != 0 and "loss became nan" in result.stderr, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mfu_stays_below_the_measured_peak(dtype, char_dataset, tmp_path):
    """On a CPU the peak is a matmul measured in the run's precision, multiplied as nn.Linear
    multiplies: measured as `a @ b`, on a CPU without bfloat16 units, a bfloat16 run of this
    tiny model logged an MFU over 250%."""
    train(tmp_path, char_dataset, f"--dtype={dtype}", "--max_iters=10")
    # metrics.jsonl keeps the full figure: the log line's one decimal shows 0.0% when other
    # programs slow the run down
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if "mfu" in r]
    assert len(mfus) == 2 and all(0 < m < 1 for m in mfus), mfus


def test_run_logs_metrics_plot_and_offline_wandb(char_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    stdout = train(out, char_dataset, "--max_iters=20", "--wandb_log=True", "--wandb_project=test")
    assert "eta" in stdout and "tok/s" in stdout and "mfu" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 10, 20]
    assert [r["iter"] for r in records if "loss" in r] == [5, 10, 15, 20]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and os.listdir(out / "wandb" / runs[0])


def test_compiled_evaluation_gives_the_eager_losses(trained, char_dataset, tmp_path):
    """Evaluation runs through the compiled model when training does (compile=True) with the
    same losses; eval_batch_size sets its batches' rows (other rows, other estimates)."""
    def evaluate(name, *args):
        shutil.copytree(trained[0], tmp_path / name)
        stdout = train(tmp_path / name, char_dataset, "--init_from=resume", "--eval_only=True", *args)
        return eval_losses(stdout)[0]
    eager, eager_4 = evaluate("eager"), evaluate("eager_4", "--eval_batch_size=4")
    compiled_4 = evaluate("compiled_4", "--eval_batch_size=4", "--compile=True")
    assert eager_4 != eager
    assert compiled_4 == pytest.approx(eager_4, abs=2e-4)


def test_a_fine_tune_warns_once_when_its_schedule_outlasts_it(trained, char_dataset, tmp_path):
    # pretraining's warmup and decay (train.py's defaults), as a fine-tune typed on the command
    # line gets them, on a run of 4 steps
    short = [*TINY, f"--dataset={char_dataset}", "--max_iters=4", "--eval_interval=4",
             "--warmup_iters=2000", "--lr_decay_iters=600000"]

    def warnings(*args):
        result = run_script("train.py", *short, *args)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("warning:")]

    tuned = tmp_path / "tuned"
    [line] = warnings(f"--init_from={trained[0]}", f"--out_dir={tuned}")
    assert "warmup_iters=2000 and lr_decay_iters=600000" in line and "max_iters=4" in line
    # a resumed fine-tune is one too
    [line] = warnings("--init_from=resume", f"--out_dir={tuned}", "--max_iters=6")
    assert "max_iters=6" in line
    # decay over max_iters, a warmup within it, or no schedule at all: nothing to say
    assert warnings(f"--init_from={trained[0]}", f"--out_dir={tmp_path / 'a'}", "--warmup_iters=1",
                    "--lr_decay_iters=None") == []
    assert warnings(f"--init_from={trained[0]}", f"--out_dir={tmp_path / 'b'}", "--decay_lr=False") == []
    # pretraining from scratch: a short run is a test, not a mistake
    assert warnings(f"--out_dir={tmp_path / 'c'}") == []


@pytest.mark.parametrize("block_size, rows, processes", [(7, 3, 1), (16, 4, 2), (5, 8, 3)])
def test_every_window_scores_each_target_once(block_size, rows, processes):
    """dataset.every_window, split over processes as draw_windows splits it: each target of
    the data once (ids 0..N-1, so a target names its place), each input its target's context."""
    from nanogpt.dataset import every_window
    data = np.arange(103, dtype=np.uint16)
    scored = []
    for rank in range(processes):
        for x, y in every_window(data, block_size, rows * processes, slice(rank * rows, (rank + 1) * rows)):
            assert x.shape == y.shape and x.shape[1] == block_size
            assert torch.equal(x + 1, torch.from_numpy(data.astype(np.int64))[x + 1])  # inputs precede targets
            scored += y[y >= 0].tolist()
            assert torch.equal(y[y >= 0], (x + 1)[y >= 0])
    assert sorted(scored) == list(range(1, len(data)))


def test_the_final_evaluation_scores_all_of_val(char_dataset, tmp_path):
    """final_eval_whole_val=True: the last evaluation's val loss is the mean loss of every val
    target, as a plain loop over the saved model computes it."""
    from nanogpt.checkpoint import load_model
    stdout = train(tmp_path, char_dataset, "--max_iters=10", "--final_eval_whole_val=True",
                   "--always_save_checkpoint=True")
    last = [line for line in stdout.splitlines() if line.startswith("step 10:")]
    assert len(last) == 1 and "(all of val)" in last[0], stdout
    model, _ = load_model(str(tmp_path), "cpu")
    val = torch.from_numpy(np.fromfile(os.path.join(char_dataset, "val.bin"), dtype=np.uint16).astype(np.int64))
    T = model.config.block_size
    losses = []  # per target: each whole window's, then the tail's not yet scored
    with torch.no_grad():
        for start in range(0, len(val) - 1 - T + 1, T):
            logits, _ = model(val[None, start:start + T], val[None, start + 1:start + T + 1])
            losses.append(torch.nn.functional.cross_entropy(logits[0], val[start + 1:start + T + 1], reduction="none"))
        done = sum(len(x) for x in losses)
        if done < len(val) - 1:
            start = len(val) - 1 - T
            logits, _ = model(val[None, start:start + T], val[None, start + 1:start + T + 1])
            tail = torch.nn.functional.cross_entropy(logits[0], val[start + 1:], reduction="none")
            losses.append(tail[T - (len(val) - 1 - done):])
    expected = torch.cat(losses)
    assert len(expected) == len(val) - 1
    assert eval_losses(stdout)[-1][1] == pytest.approx(expected.mean().item(), abs=1e-4)


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_wsd_holds_the_rate_then_decays_it_in_a_line(fraction):
    import train
    from configurator import knobs
    config = train.Config(**{**knobs(vars(train)), "lr_schedule": "wsd", "decay_fraction": fraction,
                             "learning_rate": 1e-2, "min_lr": 1e-3, "warmup_iters": 10,
                             "lr_decay_iters": 1000, "max_iters": 1200})
    train.check_config(config)
    lrs = [train.get_lr(it, config) for it in range(1201)]
    start = round(1000 * (1 - fraction))
    assert lrs[0] < lrs[9] < 1e-2 and lrs[10:start + 1] == pytest.approx([1e-2] * (start - 9))
    steps = np.diff(lrs[start:1001])  # a straight line down: every step the same
    assert np.allclose(steps, -(1e-2 - 1e-3) / (1000 - start))
    assert lrs[1000] == pytest.approx(1e-3) and all(lr == 1e-3 for lr in lrs[1001:])
    # the cosine (nanoGPT's) decays from the end of the warmup
    cosine = dataclasses.replace(config, lr_schedule="cosine")
    assert train.get_lr(start, cosine) < 1e-2
    with pytest.raises(UserError, match="lr_schedule must be"):
        train.check_config(dataclasses.replace(config, lr_schedule="step"))
