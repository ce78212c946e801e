"""
Which device to run on, at which precision, and how fast that device can go.

Shared by train.py, sample.py and bench.py so that `device=None` and
`dtype=None` mean the same thing everywhere.
"""

from contextlib import nullcontext

import torch

from configurator import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Peak FLOP/s used for model FLOPs utilisation (MFU) when the config gives none.
# CPU: the fp32 torch.mm rate measured on our 2-core machine (4096x4096: 169-181 GFLOP/s);
# bench.py measures it afresh. MFU above 100% on a CPU means bfloat16 beat the fp32 peak.
PEAK_FLOPS = {"cuda": 312e12, "cpu": 175e9, "mps": 10e12}  # cuda: A100 bf16


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bfloat16():
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 matrices in hardware, at about twice
    its float32 rate (2.2x measured on our 2-core machine); without them bfloat16 is emulated
    and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_dtype(device_type, training=True):
    """The default precision: for training, the autocast precision, the fastest that trains as
    well; for decoding, the weights'. Decoding on a CPU keeps float32 weights: model.Linear's
    route for a few rows decodes faster with them than bfloat16 weights do (bench_generate.py:
    58 vs 45 tokens/s for GPT-2 124M here)."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and training and cpu_has_fast_bfloat16():
        return "bfloat16"
    return "float32"


def synchronize(device):
    """Wait for the device's queued work, so wall-clock timings mean something."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    elif str(device) == "mps":
        torch.mps.synchronize()


def setup(device, dtype, training=True):
    """Resolve device=None / dtype=None to the best choice for this machine, for training or
    (training=False) for decoding.
    Returns (device, device_type, dtype name, autocast context)."""
    dev = device or default_device()
    device_type = "cuda" if dev.startswith("cuda") else dev.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device must be cpu, cuda, cuda:N or mps, got {dev!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("device is cuda but no CUDA GPU is available: use --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device is mps but MPS is not available: use --device=cpu")
    precision = dtype or default_dtype(device_type, training)
    if precision not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {precision!r}")
    autocast = (nullcontext() if precision == "float32"
                else torch.autocast(device_type=device_type, dtype=DTYPES[precision]))
    return dev, device_type, precision, autocast
