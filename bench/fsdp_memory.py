"""
Training-state memory of one process under DDP and under FSDP2, on a gpt2-medium-shaped model
(random weights), both measured in one run of `processes` CPU processes (gloo):

$ python bench/fsdp_memory.py                                       # gpt2-medium, 2 processes
$ python bench/fsdp_memory.py --processes=4 --n_layer=12 --n_head=12 --n_embd=768

The training state is what a process holds besides activations: its parameters, their
gradients and AdamW's two moments (DDP: all of them; FSDP: its shard of each). Each way takes
an optimizer step on random tokens, as train.py does it (distributed.shard for FSDP,
distributed.wrap_ddp for DDP), then the bytes of those tensors on each process are summed; the
largest process is reported. DDP's gradient buckets (another copy of the gradients, for the
all-reduce) are not counted, nor FSDP's unsharded copy of the one block it computes with.
"""

import os
import socket
import sys

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from nanogpt import distributed  # noqa: E402
from nanogpt.checkpoint import model_config  # noqa: E402
from configurator import configure, run  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from model import GPT  # noqa: E402
from nanogpt.optim import configure_optimizers  # noqa: E402

# -----------------------------------------------------------------------------
processes = 2
n_layer = 24  # gpt2-medium's shape
n_head = 16
n_embd = 1024
vocab_size = 50257
block_size = 1024
tokens = 64  # the length of the one sequence each step trains on: activations are not counted
seed = 1337
# -----------------------------------------------------------------------------


def local_bytes(tensor):
    """The bytes of a tensor that this process holds (its shard of a DTensor)."""
    tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return tensor.numel() * tensor.element_size()


def state_bytes(model, optimizer):
    """(parameters, gradients, optimizer state) bytes on this process."""
    params = list(model.parameters())
    moments = [t for state in optimizer.state.values() for t in state.values()
               if isinstance(t, (torch.Tensor, DTensor)) and t.dim() > 0]
    return (sum(local_bytes(p) for p in params),
            sum(local_bytes(p.grad) for p in params if p.grad is not None),
            sum(local_bytes(t) for t in moments))


def measure(kind, config, rank, world_size):
    """The largest process's (parameters, gradients, optimizer state) bytes after one step."""
    torch.manual_seed(seed)  # the same weights on every process, as train.py draws them
    model = GPT(config)
    dist = distributed.Distributed(kind, rank, rank, world_size)
    distributed.shard(model, dist, "float32", "cpu", "cpu", from_rank0=False)  # drawn alike on each
    optimizer = configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), "cpu")
    wrapped = distributed.wrap_ddp(model, dist, "cpu")
    x = torch.randint(0, config.vocab_size, (1, tokens + 1), generator=torch.Generator().manual_seed(rank))
    _, loss = wrapped(x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    sizes = torch.tensor(state_bytes(model, optimizer), dtype=torch.float64)
    torch_dist.all_reduce(sizes, op=torch_dist.ReduceOp.MAX)
    return sizes.tolist()


def worker(rank, world_size, port, config, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    for kind in ("fsdp", "ddp"):  # the smaller first: the larger's memory is the peak
        sizes = measure(kind, config, rank, world_size)
        if rank == 0:
            results[kind] = sizes
    torch_dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    configure(globals())
    if processes < 2:
        raise UserError(f"processes must be at least 2 (sharding needs several), got {processes}")
    if not 1 <= tokens <= block_size:
        raise UserError(f"tokens must be in [1, block_size={block_size}], got {tokens}")
    config = model_config(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                               vocab_size=vocab_size, block_size=block_size, bias=True))
    results = mp.Manager().dict()
    mp.spawn(worker, args=(processes, free_port(), config, results), nprocs=processes)
    print(f"{n_layer} layers x {n_embd}, vocabulary {vocab_size}; per process, after one AdamW step, "
          f"{processes} processes:")
    print(f"{'':6} {'params':>10} {'grads':>10} {'AdamW':>10} {'total':>10}")
    for kind in ("ddp", "fsdp"):
        p, g, m = (x / 2**30 for x in results[kind])
        print(f"{kind:6} {p:9.2f}G {g:9.2f}G {m:9.2f}G {p + g + m:9.2f}G")
    ratio = sum(results["fsdp"]) / sum(results["ddp"])
    print(f"fsdp / ddp: {ratio:.3f} (1 / {processes} = {1 / processes:.3f}, plus what does not divide evenly)")


if __name__ == "__main__":
    run(main)
