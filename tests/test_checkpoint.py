"""Checkpoints are written atomically and read without unpickling code."""

import os

import pytest
import torch

import checkpoint
from checkpoint import load_checkpoint, save_checkpoint
from errors import UserError


def test_round_trip(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "iter_num": 7, "config": {"lr": 1e-3}}
    save_checkpoint(obj, path)
    back = load_checkpoint(path)
    assert back["iter_num"] == 7 and back["config"] == {"lr": 1e-3}
    assert torch.equal(back["model"]["w"], obj["model"]["w"])
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"iter_num": 1, "w": torch.ones(1000)}, path)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a crash while writing

    monkeypatch.setattr(checkpoint.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iter_num": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    back = load_checkpoint(path)
    assert back["iter_num"] == 1 and torch.equal(back["w"], torch.ones(1000))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_refuses_to_unpickle_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "ckpt.pt")
    torch.save({"x": Evil()}, path)
    with pytest.raises(UserError, match=r"refused, it is a pickle that calls code \((posix|os)\.system\)") as info:
        load_checkpoint(path, "the base of out/ckpt.pt")
    assert path in str(info.value) and "\n" not in str(info.value)
    assert "the base of out/ckpt.pt" in str(info.value) and "nothing of it was run" in str(info.value)
    assert not marker.exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))
