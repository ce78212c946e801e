"""Checkpoints are written atomically and read without unpickling code."""

import os

import pytest
import torch

from nanogpt import checkpoint
from nanogpt.checkpoint import load_checkpoint, save_checkpoint
from nanogpt.errors import UserError


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


def test_integrity_sums_are_zlib_crc32_of_the_bytes(tmp_path):
    """The checksums every earlier checkpoint stored keep verifying: a tensor's is zlib's crc32
    of its bytes in memory order, whatever its dtype, device or layout; a file's is [size, crc32]
    of all of it, or of 16 chunks of 64 KiB spread through it (start and end included)."""
    import zlib

    from nanogpt import integrity
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert integrity.checksum(t) == zlib.crc32(t.numpy().tobytes())
    assert integrity.checksum(t.t()) == zlib.crc32(t.t().contiguous().numpy().tobytes())
    half = t.to(torch.bfloat16)
    assert integrity.checksum(half) == zlib.crc32(half.view(torch.int16).numpy().tobytes())
    assert integrity.checksums_of({"a": t, "step": 3}) == {"a": integrity.checksum(t)}
    data = bytes(range(256)) * 4099  # over 16 chunks of 64 KiB, not a multiple of one
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    assert integrity.file_crc(str(path)) == [len(data), zlib.crc32(data)]
    chunk = 1 << 16
    starts = [(len(data) - chunk) * i // 15 for i in range(16)]
    assert starts[0] == 0 and starts[-1] + chunk == len(data)
    sampled = zlib.crc32(b"".join(data[s:s + chunk] for s in starts))
    assert integrity.sampled_crc(str(path)) == [len(data), sampled]
