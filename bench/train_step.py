"""
Time the training step alone (forward, backward, optimizer) on synthetic data:

$ python bench/train_step.py config/train_shakespeare_char.py            # one setting
$ python bench/train_step.py config/train_shakespeare_char.py --compare=True

--compare=True runs the same model under each precision and compile choice of the device,
and the same shape as Hugging Face's GPT2LMHeadModel (LlamaForCausalLM for family='llama';
when transformers is installed), in one process, and prints each one's speed relative to the first. MFU is reported against the
device's peak in each run's precision (hardware.peak_flops: a datasheet figure for the GPUs it
lists, else a matmul rate measured in the same run), so it stays below 100%.
"""

import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from nanogpt import hardware  # noqa: E402
from nanogpt.checkpoint import model_config  # noqa: E402
from configurator import configure, run  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.hf import EXPORTED_ACTIVATIONS  # noqa: E402
from model import build  # noqa: E402
from nanogpt.optim import configure_optimizers  # noqa: E402
from train import check_memory  # noqa: E402

# -----------------------------------------------------------------------------
batch_size = 12
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
bias = False
activation = "gelu_tanh"  # family='gpt2''s MLP
family = "gpt2"  # or 'llama' (train.py's)
mlp_hidden: int | None = None  # family='llama''s MLP width; None: 4 * n_embd
dropout = 0.0
device: str | None = None
dtype: str | None = None
compile = False
steps = 10  # timed steps, after warmup_steps untimed ones
warmup_steps = 3
compare = False  # time every precision x compile choice, and transformers' model of the family
precisions = "float32,bfloat16,float16"  # the autocast precisions --compare times
optim = "adamw"  # our model's optimizer, as train.py's: 'adamw' or 'muon'
# -----------------------------------------------------------------------------


def time_steps(model, optimizer, loss_fn, dev, autocast):
    """Seconds per optimizer step on random tokens; loss_fn(x, y) runs the forward pass."""
    x = torch.randint(vocab_size, (batch_size, block_size), device=dev)
    y = torch.randint(vocab_size, (batch_size, block_size), device=dev)
    for i in range(warmup_steps + steps):
        if i == warmup_steps:
            hardware.synchronize(dev)
            t = time.perf_counter()
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    hardware.synchronize(dev)
    return (time.perf_counter() - t) / steps


def ours(config, precision, use_compile, device_type):
    torch.manual_seed(0)
    model = build(config)
    step = torch.compile(model) if use_compile else model
    optimizer = configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device_type, optim)
    return (f"ours {precision}, compile={use_compile}", precision, model, optimizer,
            lambda x, y: step(x, y)[1])


def transformers_model(config):
    """Hugging Face's model of the same family and shape (fp32, its SDPA attention), or None."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    if config.family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
            intermediate_size=config.mlp_hidden or 4 * config.n_embd, num_attention_heads=config.n_head,
            max_position_embeddings=config.block_size, tie_word_embeddings=True,
            attn_implementation="sdpa", bos_token_id=None, eos_token_id=None))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return ("transformers Llama float32, AdamW", "float32", model, optimizer,
                lambda x, y: model(input_ids=x, labels=y).loss)
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                           n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                           resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                           attn_pdrop=config.dropout, attn_implementation="sdpa",
                           activation_function=EXPORTED_ACTIVATIONS[config.activation],
                           bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(hf_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return ("transformers GPT-2 float32, AdamW", "float32", model, optimizer,
            lambda x, y: model(input_ids=x, labels=y).loss)


def check_settings():
    """Refuse settings no timing can come from, before anything is built."""
    for key, low in (("steps", 1), ("batch_size", 1), ("block_size", 1)):
        if globals()[key] < low:
            raise UserError(f"{key} must be at least {low}, got {globals()[key]}")
    if warmup_steps < 0:
        raise UserError(f"warmup_steps must not be negative, got {warmup_steps}")
    if optim not in ("adamw", "muon"):
        raise UserError(f"optim must be 'adamw' or 'muon', got {optim!r}")
    if compare:
        unknown = [p for p in precisions.split(",") if p not in hardware.DTYPES]
        if unknown:
            raise UserError(f"precisions: {unknown[0]!r} is not one of {', '.join(hardware.DTYPES)}")


def main():
    configure(globals(), skip_unknown_file_keys=True, nullable=())  # train.py's configs give the shape
    check_settings()
    dev, device_type, precision, _ = hardware.setup(device, dtype)
    config = model_config(dict(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                               n_head=n_head, n_embd=n_embd, dropout=dropout, bias=bias,
                               activation=activation, family=family, mlp_hidden=mlp_hidden))
    check_memory(dataclasses.asdict(config), device_type)  # before the model is built
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py runs float32 on a GPU
    torch.backends.cudnn.allow_tf32 = True
    flops_per_token = build(config).flops_per_token()
    tokens = batch_size * block_size
    print(f"{device_type}, {torch.get_num_threads()} threads; "
          f"{flops_per_token * tokens / 1e9:,.1f} GFLOP per iteration")
    peaks = {}

    if compare:
        runs = [ours(config, p, c, device_type) for c in (False, True) for p in precisions.split(",")]
        runs.append(transformers_model(config) or ("transformers not installed", None, None, None, None))
    else:
        runs = [ours(config, precision, compile, device_type)]
    baseline = None
    for name, run_precision, model, optimizer, loss_fn in runs:
        if model is None:
            print(name)
            continue
        model.to(dev).train()
        dt = time_steps(model, optimizer, loss_fn, dev, hardware.setup(dev, run_precision)[3])
        baseline = baseline or dt
        if run_precision not in peaks:
            peaks[run_precision] = hardware.peak_flops(dev, run_precision)
        mfu = flops_per_token * tokens / dt / peaks[run_precision]
        print(f"{name:34s} {dt * 1000:9.1f} ms/iter {tokens / dt:9,.0f} tok/s  mfu {mfu * 100:5.1f}%  "
              f"speed x{baseline / dt:.2f}  (peak {peaks[run_precision] / 1e12:,.2f} TFLOP/s)",
              flush=True)


if __name__ == "__main__":
    run(main)
