"""
Which device to run on, at which precision, and how fast that device can go.

Shared by train.py, sample.py and bench/ so that `device=None` and
`dtype=None` mean the same thing everywhere.
"""

import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanogpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (no sparsity) peak FLOP/s of common GPUs by the precision of their matmuls, from the
# vendors' datasheets, for model FLOPs utilisation (MFU); "tf32" is float32 with TF32 tensor
# cores on (train.py turns them on). Matched against torch.cuda.get_device_name(), most
# specific name first. Devices not listed (CPUs, MPS, other GPUs) get a matmul rate measured
# in the run's precision; `peak_flops` in train.py overrides either.
GPU_PEAK_FLOPS = [
    # name,        bfloat16, float16,  tf32,     float32
    ("H200 NVL",   835e12,   835e12,   418e12,   60e12),
    ("H200",       989e12,   989e12,   495e12,   67e12),
    ("H100 NVL",   835e12,   835e12,   418e12,   60e12),
    ("H100 PCIe",  756e12,   756e12,   378e12,   51e12),
    ("H100",       989e12,   989e12,   495e12,   67e12),  # SXM (HBM3)
    ("A100",       312e12,   312e12,   156e12,   19.5e12),
    ("L40S",       362e12,   362e12,   183e12,   91.6e12),
    ("L4",         121e12,   121e12,   60e12,    30.3e12),
    ("A10",        125e12,   125e12,   62.5e12,  31.2e12),  # A10G too: A10's datasheet figures
    ("RTX 4090",   165e12,   165e12,   82.6e12,  82.6e12),  # GeForce: fp32 accumulation rate
    ("RTX 3090",   71e12,    71e12,    35.6e12,  35.6e12),
    ("V100",       None,     125e12,   None,     15.7e12),
    ("T4",         None,     65e12,    None,     8.1e12),
]


# memory bandwidth of the same GPUs (bytes/s, the datasheets'), for decoding, which streams
# every weight once per token; devices not listed get a copy rate measured here and now
GPU_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                 ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12),
                 ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12), ("RTX 4090", 1.01e12),
                 ("RTX 3090", 0.936e12), ("V100", 0.9e12), ("T4", 0.32e12)]


def memory_bandwidth(device):
    """Bytes/s device's memory delivers: the table's for a GPU it lists, else measured (a copy
    of 256 MiB reads and writes each byte once)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, bandwidth in GPU_BANDWIDTH:
            if fragment in name:
                return bandwidth
    src = torch.empty(2 ** 28, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * 4 / (time.perf_counter() - start)


def peak_flops(device, precision):
    """The peak FLOP/s of device's matmuls in precision (a DTYPES name): the table's figure for
    a GPU it lists, else a rate measured here and now."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = "tf32" if precision == "float32" and torch.backends.cuda.matmul.allow_tf32 else precision
        column = ("bfloat16", "float16", "tf32", "float32").index(kind) + 1
        for row in GPU_PEAK_FLOPS:
            if row[0] in name and row[column] is not None:
                return row[column]
    return measure_matmul_flops(device, precision)


def measure_matmul_flops(device, precision, size=None, repeats=2, rounds=3):
    """The FLOP/s of a square matmul in precision on device, multiplied as nn.Linear multiplies
    (by a transposed weight), in the fastest of `rounds` rounds of `repeats` (another program
    on the machine only adds time): the ceiling MFU is measured against where no datasheet
    figure is known (a sixth of a second on a 2-core CPU: every CPU run pays it at its
    start). The layout matters: on a CPU without bfloat16 units, `a @ b` in bfloat16 runs many
    times slower than `a @ b.T`, and a model's own matmuls beat a "peak" measured as `a @ b`."""
    # a GPU's cores are not all busy on a 1024 x 1024 matmul; a CPU's are (and 4096 takes it seconds)
    size = size or (1024 if torch.device(device).type == "cpu" else 4096)
    # its own generator: measuring leaves the global random state (which a resume restores) as it was
    generator = torch.Generator(device).manual_seed(0)
    x, weight = (torch.randn(size, size, device=device, dtype=DTYPES[precision], generator=generator)
                 for _ in range(2))
    F.linear(x, weight)  # warm up
    fastest = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, weight)
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / fastest


def memory(device, free=False):
    """(bytes, where) of the memory a device computes in, `where` to follow "the N GB": a GPU's
    (what is free of it with free=True, else all of it), or this machine's for the CPU and MPS
    (which shares it)."""
    device = torch.device(device)
    if device.type == "cuda":
        if free:
            return torch.cuda.mem_get_info(device)[0], f"free on {device}"
        return torch.cuda.get_device_properties(device).total_memory, f"of the GPU ({device})"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of this machine's memory"


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bfloat16():
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 matrices in hardware, about twice as fast
    as float32 (bench/train_step.py); without them bfloat16 is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_dtype(device_type, training=True):
    """The default precision: for training, the autocast precision, the fastest that trains as
    well; for decoding, the weights'. Decoding on a CPU keeps float32 weights: transformers'
    numbers exactly (bfloat16 weights decode faster on some CPUs, at a small cost: docs/benchmarks.md)."""
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
    wrong = f"device must be cpu, cuda, cuda:N or mps, got {dev!r}"
    try:
        parsed = torch.device(dev)
    except RuntimeError:  # not a device's name at all (cpu:abc, tpu)
        raise UserError(wrong) from None
    device_type = parsed.type
    if device_type not in ("cpu", "cuda", "mps"):
        raise UserError(wrong)
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("device is cuda but no CUDA GPU is available: use --device=cpu")
    if device_type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {dev}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        "numbered from 0")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device is mps but MPS is not available: use --device=cpu")
    precision = check_dtype(default_dtype(device_type, training) if dtype in (None, "auto") else dtype)
    autocast = (nullcontext() if precision == "float32"
                else torch.autocast(device_type=device_type, dtype=DTYPES[precision]))
    return dev, device_type, precision, autocast
