"""End to end: prepare -> train -> checkpoint -> resume -> sample, in temp folders."""

import json
import os
import shutil

import torch

from conftest import TINY, run_script


def read_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_train_writes_a_loadable_checkpoint(trained):
    out_dir, stdout = trained
    ckpt = read_ckpt(out_dir)
    for key in ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config", "tokenizer"):
        assert key in ckpt
    assert ckpt["iter_num"] == 20
    assert ckpt["model_args"]["n_layer"] == 2
    assert "step 20:" in stdout and "val loss" in stdout


def test_resume_continues_iterations_and_optimizer(trained, tmp_path):
    out_dir = str(tmp_path / "resumed")
    shutil.copytree(trained[0], out_dir)
    before = read_ckpt(out_dir)
    result = run_script("train.py", *TINY, f"--dataset={trained_dataset(before)}", f"--out_dir={out_dir}",
                        "--init_from=resume", "--max_iters=30", "--eval_interval=10")
    assert result.returncode == 0, result.stderr
    # the run picks up at iteration 21: no evaluation at 20 again, the next one at 30
    assert "step 20:" not in result.stdout
    assert "iter 25:" in result.stdout and "step 30:" in result.stdout
    after = read_ckpt(out_dir)
    assert after["iter_num"] == 30
    assert after["best_val_loss"] <= before["best_val_loss"]
    # Adam's step counter went on from where it was, not from zero
    steps = [s["step"].item() for s in after["optimizer"]["state"].values()]
    assert steps and all(s == 30 for s in steps)


def trained_dataset(ckpt):
    return ckpt["config"]["dataset"]


def test_sample_uses_only_vocabulary_characters(trained, char_dataset):
    out_dir, _ = trained
    result = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--start=ROMEO:",
                        "--num_samples=3", "--max_new_tokens=50", "--seed=7")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")
    assert len([s for s in samples if s.strip()]) == 3
    with open(os.path.join(char_dataset, "meta.json"), encoding="utf-8") as f:
        vocab = set(json.load(f)["tokenizer"]["chars"])
    for s in samples[:3]:
        assert s.startswith("ROMEO:")
        assert len(s.rstrip("\n")) >= len("ROMEO:") + 40  # 50 new characters (a newline may end it)
        assert set(s) <= vocab
    # the same seed gives the same samples
    again = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--start=ROMEO:",
                       "--num_samples=3", "--max_new_tokens=50", "--seed=7")
    assert again.stdout == result.stdout


def test_sample_reads_prompt_from_file(trained, tmp_path):
    out_dir, _ = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\n", encoding="utf-8")
    result = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", f"--start=FILE:{prompt}",
                        "--num_samples=1", "--max_new_tokens=10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("JULIET:\n")
