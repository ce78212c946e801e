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
                        (["--parallel=fsdp", "--optim=muon"], ["optim=muon", "parallel=fsdp"]),
                        (["--parallel=fsdp", "--dtype=float16"], ["float16", "bfloat16"])]:
        result = run_script("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}", *args)
        assert_user_error(result, *words)
        assert not out.exists()
    # under DDP (torchrun, here with one process) every process holds the whole state
    result = torchrun("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out}",
                      "--sharded_checkpoint=True", processes=1, timeout=300)
    assert result.returncode != 0 and not out.exists()
    assert "sharded_checkpoint=True writes each process's shard" in result.stderr
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
