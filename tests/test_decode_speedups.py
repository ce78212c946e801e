"""The decode paths made for GPUs, checked on the CPU: the static (fixed-shape) KV cache, the
compiled one-token step, and collectives on the process group's device."""

import pytest
import torch

from nanogpt import engine
from nanogpt import kvcache
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=65, bias=True)).eval()


def step_logits(model, ids, static):
    """The logits of every position of ids (rows, T), fed one token at a time through a cache."""
    cache = kvcache.KVCache(model, ids.size(0), ids.size(1), static=static)
    cache.reset(torch.zeros(ids.size(0), dtype=torch.long))
    with torch.no_grad():
        return torch.stack([cache.extend(model, ids[:, t:t + 1]) for t in range(ids.size(1))], dim=1)


def test_static_cache_logits_equal_the_growing_cache_and_a_full_forward(model):
    ids = torch.randint(65, (3, 24))
    with torch.no_grad():
        full = model(ids, ids)[0]
    growing, static = step_logits(model, ids, False), step_logits(model, ids, True)
    torch.testing.assert_close(static, growing, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static, full, rtol=1e-5, atol=1e-5)


def test_a_static_cache_has_aligned_slots_and_the_same_logits(model):
    """17 tokens get 24 slots (16-aligned, within the context of 24): the masked extra slots
    change no logit."""
    ids = torch.randint(65, (2, 17))
    cache = kvcache.KVCache(model, 2, 17, static=True)
    assert cache.length == 24 and cache.layers[0].kv.size(3) == 24
    torch.testing.assert_close(step_logits(model, ids, True), step_logits(model, ids, False),
                               rtol=1e-5, atol=1e-5)


def test_compiled_decode_step_gives_the_eager_tokens(model):
    """Greedy, seeded sampling and beams, with left-padded prompts and past block_size; every
    case has 2 rows of the same length, so the step is compiled once (a compile takes ~40 s on
    a 2-core CPU). CUDA graphs need what the graph writes at a fixed address: each call writes
    the same cache buffers, and no call after the first compiles anything."""
    from torch._dynamo.utils import counters
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cases = [dict(temperature=0), dict(temperature=0.9, top_k=20, seed=3),
             dict(temperature=0, num_beams=2, num_return_sequences=1)]
    addresses, compiles = set(), []
    for options in cases:
        beams = options.get("num_beams", 1) > 1
        rows = prompts[:1] if beams else prompts  # 1 prompt x 2 beams: 2 rows too
        eager = engine.generate(model, rows, 30, **options)
        compiled = engine.generate(model, rows, 30, compile=True, **options)
        assert torch.equal(compiled, eager), options
        assert eager.size(1) > model.config.block_size  # the window was cropped on the way
        cache = kvcache._kept_caches[model]
        addresses.add(tuple(layer.kv.data_ptr() for layer in cache.layers))
        compiles.append(counters["stats"]["unique_graphs"])
    assert len(addresses) == 1
    assert compiles[0] == compiles[-1]


def test_stop_flag_all_reduces_on_the_process_group_s_device(monkeypatch):
    """NCCL takes CUDA tensors only: the Ctrl-C flag must travel on the device the run was told,
    not the CPU (torchrun on CUDA crashed there)."""
    import train
    seen = []
    monkeypatch.setattr(train, "all_reduce", lambda tensor, op=None: seen.append(tensor.device))
    monkeypatch.setattr(train.signal, "signal", lambda *args: None)
    flag = train.StopFlag(torch.device("meta"))  # any device but the CPU shows where it goes
    with pytest.raises(RuntimeError, match="meta"):  # .item() of a meta tensor: the reduce ran first
        flag.requested()
    assert seen == [torch.device("meta")]


def test_evaluation_sums_reduce_on_the_model_s_device(monkeypatch):
    """The evaluation's sums travel to the other processes from the device the model ran on:
    a model on the meta device shows where they go, as a CUDA one would under NCCL."""
    from nanogpt import distributed
    import train

    class Reduced(Exception):
        pass

    seen = []

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)
        raise Reduced  # a meta tensor has no values to go on with

    monkeypatch.setattr(train, "all_reduce", all_reduce)
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))

    def batch(split, generator, rows):
        ids = torch.zeros(rows, 9, dtype=torch.long, device="meta")
        return ids[:, :-1], ids[:, 1:]

    with pytest.raises(Reduced):
        train.estimate_loss(model, batch, torch.autocast("cpu", enabled=False),
                            distributed.Distributed("ddp"), iters=1, rows=2, seed=0)
    assert seen == [torch.device("meta")]


def test_distributed_collectives_run_on_this_process_s_gpu_under_nccl(monkeypatch):
    """save_sharded's NaN flag, the gathered RNG states and train.py's stop flag travel on
    collective_device: this process's GPU under NCCL, the CPU under gloo."""
    from nanogpt import distributed
    dist = distributed.Distributed("fsdp", rank=3, local_rank=1, world_size=4)
    monkeypatch.setattr(distributed.torch_dist, "get_backend", lambda group=None: "nccl")
    assert distributed.collective_device(dist) == "cuda:1"
    monkeypatch.setattr(distributed.torch_dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device(dist) == "cpu"


def test_peak_flops_come_from_the_datasheet_or_a_measurement(monkeypatch):
    from nanogpt import hardware
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert hardware.peak_flops("cuda", "bfloat16") == 989e12
        assert hardware.peak_flops("cuda", "float32") == 495e12  # TF32 tensor cores
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert hardware.peak_flops("cuda", "float16") == 756e12
    # a CPU's is measured: a bfloat16 or float32 training step of ours cannot beat it
    measured = hardware.peak_flops("cpu", "float32")
    assert 1e9 < measured < 1e14


def test_fastest_attention_picks_a_backend_that_runs_the_step(model):
    """The measured choice skips backends that cannot run a masked one-token query (on a CPU,
    cuDNN's and the memory-efficient one) and keeps its answer per shape."""
    from torch.nn.attention import SDPBackend
    candidates = (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    state = torch.get_rng_state()
    chosen = kvcache.fastest_attention(model, 3, 20, candidates)
    assert torch.equal(torch.get_rng_state(), state)  # seeded sampling after it is unchanged
    assert chosen in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    assert kvcache.fastest_attention(model, 3, 20, candidates) is chosen
    assert kvcache.KVCache(model, 3, 20).backends is None  # the CPU keeps torch's own choice
