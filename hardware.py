"""
Which device to run on, at which precision, and how fast that device can go.

Shared by train.py, sample.py and bench.py so that `device=None` and
`dtype=None` mean the same thing everywhere.
"""

from contextlib import nullcontext

import torch

from errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Peak FLOP/s used for model FLOPs utilisation (MFU) when the config gives none. CPU: the
# fp32 matmul rate of the 2-core machine the README's figures come from (bench.py measures it
# afresh); MFU above 100% on a CPU means bfloat16 beat the fp32 peak. cuda: an A100's bf16.
PEAK_FLOPS = {"cuda": 312e12, "cpu": 175e9, "mps": 10e12}


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bfloat16():
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 matrices in hardware, about twice as fast
    as float32 (bench.py); without them bfloat16 is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_dtype(device_type, training=True):
    """The default precision: for training, the autocast precision, the fastest that trains as
    well; for decoding, the weights'. Decoding on a CPU keeps float32 weights: engine.ThinLinear's
    route for a few rows decodes faster with them than bfloat16 weights do (bench/generate.py)."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and training and cpu_has_fast_bfloat16():
        return "bfloat16"
    return "float32"


def check_dtype(name):
    """name, if it names a dtype we run in."""
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


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
    dev = default_device() if device in (None, "auto") else device
    device_type = "cuda" if dev.startswith("cuda") else dev.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device must be cpu, cuda, cuda:N or mps, got {dev!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("device is cuda but no CUDA GPU is available: use --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device is mps but MPS is not available: use --device=cpu")
    precision = check_dtype(default_dtype(device_type, training) if dtype in (None, "auto") else dtype)
    autocast = (nullcontext() if precision == "float32"
                else torch.autocast(device_type=device_type, dtype=DTYPES[precision]))
    return dev, device_type, precision, autocast
