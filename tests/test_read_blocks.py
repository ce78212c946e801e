"""hf.safetensors_tensors reads a tensor that needs converting (another dtype, a transpose)
a block of rows at a time: the same values as reading it whole."""

import pytest
import torch
from safetensors.torch import save_file

from nanogpt import hf


@pytest.mark.parametrize("dtype, transpose", [(torch.bfloat16, False), (torch.float32, True),
                                              (torch.bfloat16, True), (torch.float16, False)])
def test_converted_tensors_read_in_blocks_equal_the_whole(tmp_path, monkeypatch, dtype, transpose):
    monkeypatch.setattr(hf, "BLOCK_BYTES", 1000)  # 1000 bytes: blocks of 8 of the 31-float rows
    torch.manual_seed(0)
    tensors = {"w": torch.randn(37, 31), "v": torch.randn(5), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    for name, shape, read in hf.safetensors_tensors(str(tmp_path / "m.safetensors")):
        expected = tensors[name].t() if transpose and name == "w" else tensors[name]
        out = torch.empty(expected.shape, dtype=dtype)
        read(out, transpose and name == "w")
        assert torch.equal(out, expected.to(dtype)), name
