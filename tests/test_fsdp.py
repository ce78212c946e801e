"""FSDP2 (parallel=fsdp) through torchrun on the CPU, with gloo: the trajectory of one process,
exact resume, both checkpoint formats (ckpt.pt and the sharded ckpt.dcp/), LoRA and freeze,
and bad input."""

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, assert_user_error, eval_losses, run_script, torchrun, train_losses

RUN = [*TINY, "--eval_interval=10", "--lr_decay_iters=40", "--min_lr=3e-4"]


def train(out_dir, dataset, *args, processes=2):
    """train.py under torchrun with parallel=fsdp (or alone, processes=1): its stdout."""
    script = ["train.py", *RUN, f"--dataset={dataset}", f"--out_dir={out_dir}", *args]
    if processes > 1:
        result = torchrun(*script, "--parallel=fsdp", processes=processes)
    else:
        result = run_script(*script)
    # the last 8000 characters: the processes' own words come before torchrun's long traceback
    assert result.returncode == 0, result.stderr[-8000:]
    return result.stdout


def read_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


# the same global batch of 16 rows: one process 8 x 2 micro-steps, two processes 4 x 2 each
ONE, TWO = ["--batch_size=8", "--gradient_accumulation_steps=2"], ["--batch_size=4", "--gradient_accumulation_steps=4"]


@pytest.mark.parametrize("finetune", ["full", "freeze", "lora"])
def test_two_sharded_processes_follow_one(finetune, trained, char_dataset, tmp_path):
    args = {"full": [],
            "freeze": [f"--init_from={trained[0]}", "--finetune=freeze", "--freeze_layers=1"],
            "lora": [f"--init_from={trained[0]}", "--finetune=lora", "--lora_rank=4",
                     "--learning_rate=1e-2"]}[finetune]
    one = train(tmp_path / "one", char_dataset, *ONE, *args, "--max_iters=20", processes=1)
    two = train(tmp_path / "two", char_dataset, *TWO, *args, "--max_iters=20")
    assert "fsdp over 2 processes" in two and two.count("saving checkpoint") == 2
    assert len(train_losses(one)) == 4
    assert train_losses(two) == pytest.approx(train_losses(one), abs=2e-4)
    # each evaluates its half of one process's rows
    assert len(eval_losses(one)) == 3
    np.testing.assert_allclose(eval_losses(two), eval_losses(one), atol=2e-4)
    a, b = read_ckpt(tmp_path / "one"), read_ckpt(tmp_path / "two")
    weights = "adapters" if finetune == "lora" else "model"
    assert a[weights].keys() == b[weights].keys()
    # sums taken in another order (sharded reductions) differ in the last bits, which Adam's
    # division by small second moments turns into ~1e-5 after 20 steps
    for name in a[weights]:
        torch.testing.assert_close(a[weights][name], b[weights][name], atol=1e-4, rtol=1e-3)
    # the optimizer's state: the trainable parameters' only, whole, as one process keeps it
    assert b["optimizer"]["param_groups"] == a["optimizer"]["param_groups"]
    assert b["optimizer"]["state"].keys() == a["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            ours, theirs = b["optimizer"]["state"][i][moment], state[moment]
            assert (ours - theirs).norm() <= 1e-2 * theirs.norm() + 1e-8, (i, moment)
    if finetune == "lora":
        assert len(b["optimizer"]["state"]) == len(a["adapters"])
    if finetune == "freeze":  # the embeddings and the lowest block stay as they were
        base = read_ckpt(trained[0])["model"]
        assert all(torch.equal(base[n], b["model"][n]) == n.startswith(("transformer.wte", "transformer.wpe",
                                                                         "transformer.h.0.", "lm_head"))
                   for n in base)


@pytest.fixture(scope="module")
def straight(char_dataset, tmp_path_factory):
    """Two sharded processes, 20 iterations straight, dropout on (its random state must resume)."""
    out = tmp_path_factory.mktemp("straight")
    train(out, char_dataset, *TWO, "--dropout=0.1", "--max_iters=20")
    return out


def test_resume_from_ckpt_pt_is_exact_and_samples(straight, char_dataset, tmp_path):
    split = tmp_path / "split"
    train(split, char_dataset, *TWO, "--dropout=0.1", "--max_iters=10")
    train(split, char_dataset, *TWO, "--dropout=0.1", "--max_iters=20", "--init_from=resume")
    a, b = read_ckpt(straight), read_ckpt(split)
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    sampled = run_script("sample.py", f"--out_dir={split}", "--device=cpu", "--max_new_tokens=20",
                         "--num_samples=1", "--start=ROMEO:")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("ROMEO:")


def test_sharded_checkpoint_resumes_exactly_with_any_number_of_processes(straight, char_dataset, tmp_path):
    split = tmp_path / "split"
    sharded = ["--dropout=0.1", "--sharded_checkpoint=True"]
    train(split, char_dataset, *TWO, *sharded, "--max_iters=10")
    assert not (split / "ckpt.pt").exists() and (split / "ckpt.dcp" / "run.pt").exists()
    assert len(list((split / "ckpt.dcp").glob("*.distcp"))) == 2  # a shard per process
    listed = torch.load(split / "ckpt.dcp" / "run.pt", weights_only=True)["files"]
    assert sorted(listed) == sorted(p.name for p in (split / "ckpt.dcp").iterdir() if p.name != "run.pt")
    train(split, char_dataset, *TWO, *sharded, "--max_iters=20", "--init_from=resume")
    consolidated = run_script("consolidate.py", f"--out_dir={split}")
    assert consolidated.returncode == 0, consolidated.stderr
    a, b = read_ckpt(straight), read_ckpt(split)
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    assert b["optimizer"]["param_groups"] == a["optimizer"]["param_groups"]
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])
    assert b["iter_num"] == 20
    sampled = run_script("sample.py", f"--out_dir={split}", "--device=cpu", "--max_new_tokens=10",
                         "--num_samples=1")
    assert sampled.returncode == 0, sampled.stderr

    # the shards read by one process, without torchrun: it goes on from iteration 20
    one = tmp_path / "one"
    os.makedirs(one)
    os.rename(split / "ckpt.dcp", one / "ckpt.dcp")
    stdout = train(one, char_dataset, *ONE, "--sharded_checkpoint=True", "--max_iters=25",
                   "--init_from=resume", "--log_interval=1", processes=1)
    assert "iter 21:" in stdout and "iter 25:" in stdout and "iter 20:" not in stdout


def test_bad_parallel_settings(char_dataset, tmp_path):
    out = tmp_path / "out"
    for args, words in [(["--parallel=zero3"], ["parallel must be 'ddp' or 'fsdp'", "zero3"]),
                        (["--parallel=fsdp", "--dtype=float16"], ["float16", "bfloat16"])]:
        result = run_script("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}", *args)
        assert_user_error(result, *words)
        assert not out.exists()
    # under DDP every process holds the whole state; the processes refuse (exit code 2, in
    # torchrun's report; torchrun stops the others once one ends) and rank 0 says why, once
    result = torchrun("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}",
                      "--sharded_checkpoint=True", timeout=300)
    assert result.returncode != 0 and not out.exists()
    [line] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line.startswith("error: sharded_checkpoint=True writes each process's shard")
    assert "exitcode  : 2" in result.stderr
    # one process, without torchrun: nothing to shard, it says so and trains
    result = run_script("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}",
                        "--parallel=fsdp", "--max_iters=2")
    assert result.returncode == 0, result.stderr
    assert "this is one process, so it trains unsharded" in result.stdout


def test_a_sharded_checkpoint_that_does_not_fit_or_runs_code_is_refused(char_dataset, tmp_path):
    out = tmp_path / "out"
    train(out, char_dataset, *ONE, "--sharded_checkpoint=True", "--max_iters=10", processes=1)
    folder = out / "ckpt.dcp"
    progress = torch.load(folder / "run.pt", weights_only=True)
    # another model's settings beside these shards
    torch.save({**progress, "model_args": {**progress["model_args"], "n_embd": 48, "n_head": 2}},
               folder / "run.pt")
    before = digests(folder)
    result = run_script("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}",
                        "--init_from=resume", "--max_iters=20", "--sharded_checkpoint=True")
    assert_user_error(result, "sharded checkpoint", "does not fit this model")
    assert digests(folder) == before
    # an index that would run code when torch.distributed.checkpoint unpickles it
    torch.save(progress, folder / "run.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    for script, args in [("train.py", [*RUN, f"--dataset={char_dataset}", f"--out_dir={out}",
                                       "--init_from=resume", "--max_iters=20"]),
                         ("consolidate.py", [f"--out_dir={out}"])]:
        result = run_script(script, *args)
        assert_user_error(result, "refused", "posix.system")
        assert not os.path.exists(os.path.join(REPO, "pwned"))


def test_a_sharded_checkpoint_whose_files_changed_is_refused(char_dataset, tmp_path):
    """Its progress file holds a crc32 of every file; a flipped byte or a missing file is
    refused before torch.distributed.checkpoint reads anything, by a resume and by
    consolidation, and nothing is written."""
    out = tmp_path / "out"
    train(out, char_dataset, *ONE, "--sharded_checkpoint=True", "--max_iters=10", processes=1)
    folder = out / "ckpt.dcp"
    shard = next(folder.glob("*.distcp"))
    pristine = shard.read_bytes()
    flipped = bytearray(pristine)
    flipped[len(flipped) // 2] ^= 0x10
    resume = ["train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}",
              "--init_from=resume", "--max_iters=20", "--sharded_checkpoint=True"]
    for change, words in [(lambda: shard.write_bytes(bytes(flipped)), ["corrupted", shard.name]),
                          (lambda: shard.unlink(), ["incomplete", shard.name, "missing"])]:
        shard.write_bytes(pristine)
        change()
        before = digests(folder)
        for args in (resume, ["consolidate.py", f"--out_dir={out}"]):
            result = run_script(*args)
            assert_user_error(result, *words, "restore it")
            assert digests(folder) == before and not (out / "ckpt.pt").exists()
    shard.write_bytes(pristine)  # as written: it resumes
    result = run_script(*resume)
    assert result.returncode == 0, result.stderr


def test_a_sharded_checkpoint_is_never_written_with_nonfinite_weights(tmp_path):
    from nanogpt import sharded_ckpt
    from nanogpt.distributed import Distributed
    from nanogpt.errors import UserError
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    optimizer = torch.optim.AdamW(model.parameters())
    folder = tmp_path / "ckpt.dcp"
    sharded_ckpt.save_sharded(str(folder), model, optimizer, Distributed(), {"iter_num": 1})
    before = digests(folder)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite values at iteration 2"):
        sharded_ckpt.save_sharded(str(folder), model, optimizer, Distributed(), {"iter_num": 2})
    assert digests(folder) == before


def test_the_readmes_cpu_config_runs_under_torchrun_as_written(char_dataset, tmp_path):
    # one process's config (gradient_accumulation_steps=1, Muon) on two processes, sharded:
    # each takes its micro-step, the step's batch doubles, and Muon updates the shards
    result = torchrun("train.py", "config/train_shakespeare_char_cpu.py", "--parallel=fsdp",
                      f"--dataset={char_dataset}", f"--out_dir={tmp_path}", "--max_iters=4",
                      "--eval_iters=2", "--log_interval=2")
    assert result.returncode == 0, result.stderr[-8000:]
    assert "fsdp over 2 processes" in result.stdout
    [note] = [line for line in result.stdout.splitlines() if "gradient_accumulation_steps" in line]
    assert "each takes 1, so a step is 2 x batch_size sequences" in note
    assert len(train_losses(result.stdout)) == 2
    # ckpt.pt holds AdamW's and Muon's states as one process's run does: one process goes on
    assert len(read_ckpt(tmp_path)["optimizer"]["optimizers"]) == 2
    resumed = run_script("train.py", "config/train_shakespeare_char_cpu.py", f"--dataset={char_dataset}",
                         f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=6",
                         "--eval_iters=2", "--log_interval=2")
    assert resumed.returncode == 0, resumed.stderr
    assert "iter 6:" in resumed.stdout


SHARDED_MUON = """
import copy, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from nanogpt.optim import ShardedMuon

dist.init_process_group("gloo")
torch.manual_seed(0)
# rows that two processes split unevenly (5 and 7) and evenly (6)
whole = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 7), torch.nn.Linear(7, 6))
sharded = copy.deepcopy(whole)
for layer in sharded:
    fully_shard(layer)
matrices = lambda model: [p for p in model.parameters() if p.dim() == 2]
settings = dict(lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
theirs, ours = torch.optim.Muon(matrices(whole), **settings), ShardedMuon(matrices(sharded), **settings)
for step in range(3):
    x = torch.randn(4, 6)  # the same on both processes: the averaged gradient is the whole's
    for model, optimizer in ((whole, theirs), (sharded, ours)):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
for a, b in zip(matrices(whole), matrices(sharded)):
    assert b.to_local().shape[0] < a.shape[0]  # a shard
    assert torch.equal(b.full_tensor(), a)
    assert torch.equal(ours.state[b]["momentum_buffer"].full_tensor(), theirs.state[a]["momentum_buffer"])
print("equal", flush=True)
dist.barrier()
# as distributed.finish_processes ends a run: gloo's threads, torn down with the interpreter,
# now and then abort a finished process
os._exit(0)
"""


def test_sharded_muon_updates_each_shard_as_muon_updates_the_whole_matrix(tmp_path):
    script = tmp_path / "sharded_muon.py"
    script.write_text(SHARDED_MUON)
    result = torchrun(str(script), REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-8000:]
    assert result.stdout.count("equal") == 2
