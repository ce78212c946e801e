"""The CUDA paths on a GPU: skipped without one (the CPU-side checks of the same paths are in
test_decode_speedups.py). On a GPU machine `make test` runs them with the rest."""

import pytest
import torch

from nanogpt import engine
from nanogpt import kvcache
from conftest import TINY, torchrun
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_RUN = [a for a in TINY if not a.startswith(("--device=", "--dtype="))] + ["--device=cuda"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=97, bias=True)
    return GPT(config).to("cuda").eval()


def test_static_cache_on_cuda_equals_a_full_forward(model):
    ids = torch.randint(97, (3, 32), device="cuda")
    cache = kvcache.KVCache(model, 3, 32, static=True)
    cache.reset(torch.zeros(3, dtype=torch.long, device="cuda"))
    with torch.no_grad():
        full = model(ids, ids)[0]
        stepped = torch.stack([cache.extend(model, ids[:, t:t + 1]) for t in range(32)], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


def test_compiled_decode_runs_as_cuda_graphs_and_gives_the_eager_tokens(model, monkeypatch):
    """torch skips CUDA graphs for a graph that writes a tensor of no fixed address; with
    cudagraph_or_error that skip is an error, so this fails unless every step replays a graph.
    TF32 off: the same float32 sums as eager, so the same tokens."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config.triton, "cudagraph_or_error", True)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cases = [dict(temperature=0), dict(temperature=0.9, top_k=20, seed=3),
             dict(temperature=0, num_beams=2, num_return_sequences=1)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for options in cases:
            rows = prompts[:1] if options.get("num_beams", 1) > 1 else prompts
            eager = engine.generate(model, rows, 40, **options)
            compiled = engine.generate(model, rows, 40, compile=True, **options)
            assert torch.equal(compiled, eager), options
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("parallel, dtype", [("ddp", "float32"), ("fsdp", "bfloat16")])
def test_torchrun_trains_on_cuda_with_nccl(parallel, dtype, char_dataset, tmp_path):
    """nanoGPT's workflow: torchrun on CUDA (it crashed on a CPU tensor given to NCCL); FSDP in
    bfloat16 computes from float32 master weights (its mixed-precision policy, CUDA only)."""
    result = torchrun("train.py", *CUDA_RUN, f"--dataset={char_dataset}", f"--out_dir={tmp_path}",
                      "--max_iters=20", "--eval_interval=10", f"--parallel={parallel}",
                      f"--dtype={dtype}", processes=1)
    assert result.returncode == 0, result.stderr[-8000:]
    assert (tmp_path / "ckpt.pt").exists()
