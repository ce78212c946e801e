"""
Time causal self-attention, forward and backward, as training runs it: model.causal_attention
(the route the models take) against PyTorch's fused kernel (F.scaled_dot_product_attention),
in float32 and bfloat16, for a few shapes (batch, heads, context, head size), in one process:

$ python bench/attention.py
$ python bench/attention.py --shapes="8x4x256x32,12x12x1024x64" --device=cuda

For each shape and dtype it prints both times and the fused kernel's time over ours (above 1:
ours is faster). Where model.causal_attention takes the fused kernel itself, the two are the
same code and the ratio is 1 up to noise.
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from configurator import configure, run  # noqa: E402
from model import causal_attention  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402

# -----------------------------------------------------------------------------
shapes = "16x4x128x32,8x4x256x32,8x6x256x64,8x4x512x32,12x12x1024x64"  # batch x heads x context x head size, comma-separated
device = "cpu"
repeats = 10  # timed passes of each (after 3 untimed)
# -----------------------------------------------------------------------------


def parse_shapes(text):
    """[(B, heads, T, head_size), ...] from "8x4x256x32,..."."""
    try:
        parsed = [tuple(int(n) for n in shape.split("x")) for shape in text.split(",")]
    except ValueError:
        parsed = []
    if not parsed or any(len(s) != 4 or min(s) < 1 for s in parsed):
        raise UserError(f"shapes must be like 8x4x256x32 (batch x heads x context x head size), "
                        f"comma-separated, got {text!r}")
    return parsed


def seconds(attention, shape, dtype):
    """The mean time of one forward and backward pass of attention on random q, k, v laid out
    as model.py's attention has them: views of one (B, T, 3 x heads x head size) projection."""
    B, heads, T, head_size = shape
    projection = torch.randn(B, T, 3 * heads * head_size, dtype=dtype, device=device, requires_grad=True)
    # the gradient from above, as the output projection's backward pass hands it down: dense
    # (a .sum()'s would be one value broadcast, which the kernels read differently)
    upstream = torch.randn(B, T, heads * head_size, dtype=dtype, device=device)
    for i in range(3 + repeats):
        if i == 3:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
        q, k, v = projection.view(B, T, 3, heads, head_size).permute(2, 0, 3, 1, 4)
        attention(q, k, v).transpose(1, 2).reshape(B, T, -1).backward(upstream)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main():
    configure(globals())
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    for shape in parse_shapes(shapes):
        for dtype in (torch.float32, torch.bfloat16):
            theirs, ours = seconds(fused, shape, dtype), seconds(causal_attention, shape, dtype)
            print(f"{'x'.join(map(str, shape)):>16} {str(dtype)[6:]:>8}: fused {theirs * 1e3:7.2f} ms, "
                  f"ours {ours * 1e3:7.2f} ms, fused / ours {theirs / ours:.2f}")


if __name__ == "__main__":
    run(main)
