"""
Train a GPT. Runs on one process:

$ python train.py config/train_shakespeare_char.py --batch_size=32

or on many, with PyTorch's distributed data parallel (each process a whole copy of the model)
or its fully sharded data parallel (FSDP2: each process 1/N of the model and its training state):

$ torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char.py
$ torchrun --standalone --nproc_per_node=8 train.py --init_from=gpt2-xl --parallel=fsdp ...

Every setting below can be changed by a config file and by --key=value;
`python train.py --help` lists them.
"""

import dataclasses
import fnmatch
import math
import os
import signal
import time

from configurator import configure, knobs, run  # first: Ctrl-C while the rest loads exits quietly

import torch
from torch.distributed import ReduceOp, all_reduce

import checkpoint
import distributed
import hardware
import lora
import sharded_ckpt
from dataset import get_batch, open_dataset, to_device
from errors import UserError
from model import build
from optim import configure_optimizers
from runlog import RunLog

# -----------------------------------------------------------------------------
# default config values: a GPT-2 (124M) sized model, as nanoGPT's
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_batch_size = None  # rows of each evaluation batch; None: batch_size, as nanoGPT
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save at every eval, not only when val loss improves
init_from = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or pretrained: gpt2 ... gpt2-xl, a hub id, a folder
# wandb logging
wandb_log = False
wandb_project = "nanogpt-next"
wandb_run_name = "gpt2"
# data
dataset = "shakespeare_char"  # a folder under data/ (or a path) with train.bin, val.bin, meta.json
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, to simulate larger batches
batch_size = 12  # sequences per micro-step (per process)
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for fine-tuning
bias = False  # biases in Linears and LayerNorms
# fine-tuning: which parameters train (setup_finetune below; lora.py)
finetune = "full"  # 'full': all; 'freeze': all but the embeddings and lowest freeze_layers blocks; 'lora'
freeze_layers = 0  # finetune='freeze': how many blocks, from the bottom, stay as they are
trainable = ""  # full / freeze: only the parameters whose names match these comma-separated patterns train, e.g. '*.attn.*' or '*ln_*,*.norm.*'
lora_rank = 8  # finetune='lora': rank of the adapters, which are all that trains
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "c_attn,c_proj,c_fc"  # the Linears of each block that get adapters (c_proj: attn's and mlp's)
# optimizer
optim = "adamw"  # 'adamw', or 'muon': PyTorch's Muon for the blocks' matrices, AdamW for the rest
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients to this norm; 0 disables
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~ max_iters, per Chinchilla
min_lr = 6e-5  # ~ learning_rate / 10, per Chinchilla
# system
parallel = "ddp"  # under torchrun: 'ddp' (a whole copy per process) or 'fsdp' (sharded; distributed.py)
sharded_checkpoint = False  # write out_dir/ckpt.dcp/, a shard per process, not ckpt.pt (models too big for one host's memory)
backend = None  # distributed backend; None picks nccl on CUDA, gloo otherwise
device = None  # 'cpu', 'cuda', 'cuda:1', 'mps'; None picks the best available
dtype = None  # 'float32', 'bfloat16' or 'float16'; None picks the device's best
compile = None  # torch.compile the model; None compiles on CUDA only
seed = 1337
peak_flops = None  # the peak FLOP/s of the device in dtype, for MFU; None: a datasheet figure, else measured
# -----------------------------------------------------------------------------
# a resumed run keeps its checkpoint's values of these: they decide what the checkpoint holds
KEPT_ON_RESUME = ("finetune", "freeze_layers", "trainable", "lora_rank", "lora_alpha",
                  "lora_dropout", "lora_targets", "optim")
# the model's shape: a resumed or pretrained model's own (block_size: a pretrained one's crops)
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "bias", "block_size")


def check_config(cfg):
    """Reject settings that cannot work, before anything is written."""
    if not cfg["init_from"]:
        raise UserError("init_from must be 'scratch', 'resume', a GPT-2 size (gpt2 ... gpt2-xl), "
                        "a hub id or a model folder")
    if cfg["finetune"] not in ("full", "freeze", "lora"):
        raise UserError(f"finetune must be 'full', 'freeze' or 'lora', got {cfg['finetune']!r}")
    if cfg["finetune"] == "lora" and cfg["trainable"]:
        raise UserError("trainable= picks parameters to train with finetune='full' or 'freeze'; "
                        "with 'lora' the adapters train (choose them with lora_targets)")
    if cfg["finetune"] == "lora" and cfg["init_from"] == "scratch":
        raise UserError("finetune=lora trains adapters on a pretrained model: set init_from to "
                        "gpt2 ... gpt2-xl, a hub id or a model folder")
    if cfg["init_from"] not in ("scratch", "resume") and \
            checkpoint.run_folder(cfg["init_from"]) == checkpoint.run_folder(cfg["out_dir"]):
        raise UserError(f"out_dir={cfg['out_dir']} is init_from's folder: the run would overwrite "
                        "the model it starts from; choose another out_dir (or init_from=resume)")
    if cfg["compile"] not in (None, True, False):
        raise UserError(f"compile must be True or False, got {cfg['compile']!r}")
    for key in ("batch_size", "block_size", "n_layer", "n_head", "n_embd",
                "gradient_accumulation_steps", "eval_iters", "eval_interval", "log_interval"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be at least 1, got {cfg[key]}")
    size = cfg["eval_batch_size"]
    if size is not None and (type(size) is not int or size < 1):
        raise UserError(f"eval_batch_size must be a whole number of at least 1 (or None: "
                        f"batch_size's), got {size!r}")
    if cfg["optim"] not in ("adamw", "muon"):
        raise UserError(f"optim must be 'adamw' or 'muon', got {cfg['optim']!r}")
    if cfg["parallel"] not in distributed.PARALLEL_MODES:
        raise UserError(f"parallel must be 'ddp' or 'fsdp', got {cfg['parallel']!r}")
    if cfg["parallel"] == "fsdp" and cfg["optim"] == "muon":
        raise UserError("optim=muon needs each matrix whole for its update, which parallel=fsdp "
                        "shards: use optim=adamw with fsdp, or muon with parallel=ddp")
    if cfg["parallel"] == "fsdp" and cfg["dtype"] == "float16":
        raise UserError("dtype=float16 needs a gradient scaler that parallel=fsdp does not "
                        "shard: use dtype=bfloat16 (or float32) with fsdp")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "max_iters",
                "warmup_iters", "lr_decay_iters", "freeze_layers"):
        if cfg[key] < 0:
            raise UserError(f"{key} must not be negative, got {cfg[key]}")
    for key in ("beta1", "beta2", "dropout", "lora_dropout"):
        if not 0 <= cfg[key] < 1:
            raise UserError(f"{key} must be in [0, 1), got {cfg[key]}")
    if cfg["decay_lr"] and cfg["lr_decay_iters"] <= cfg["warmup_iters"]:
        raise UserError(f"lr_decay_iters ({cfg['lr_decay_iters']}) must be more than warmup_iters "
                        f"({cfg['warmup_iters']}): the learning rate decays from the end of the "
                        "warmup to lr_decay_iters (or set decay_lr=False)")
    if not 0 <= cfg["seed"] < 2**64:
        raise UserError(f"seed must be in [0, 2**64), got {cfg['seed']}")


def check_memory(args, device_type):
    """Refuse a model of args' shape (n_layer, n_embd, block_size, vocab_size, bias) whose
    training state, counted from the shape, cannot fit: float32 weights, their gradients and
    AdamW's two moments, 16 bytes a parameter (activations come on top), in this machine's
    memory when it trains on the CPU; on another device the weights alone, built here first."""
    n, layers = args["n_embd"], args["n_layer"]
    per_layer = 12 * n * n + (13 if args["bias"] else 4) * n
    params = layers * per_layer + (args["vocab_size"] + args["block_size"]) * n + 2 * n
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need, what = (16 * params, "to train on the CPU") if device_type == "cpu" else \
        (4 * params, "for its float32 weights, built here before they move to the device")
    if need > ram:
        shape = ", ".join(f"{k}={args[k]}" for k in ("n_layer", "n_embd", "block_size", "vocab_size"))
        raise UserError(f"a model of {shape} has {params / 1e9:,.1f}B parameters and needs at least "
                        f"{need / 1e9:,.0f} GB {what}, more than this machine's {ram / 1e9:,.0f} GB "
                        "of memory: choose a smaller model")


def override(values, passed, why):
    """Set the knobs in values (what the checkpoint or the pretrained model says), reporting in
    one line the ones the user passed that are overridden."""
    ignored = [f"--{k}={globals()[k]!r}" for k in values if k in passed and globals()[k] != values[k]]
    globals().update(values)
    if ignored:
        print(f"note: {why}: {', '.join(ignored)} ignored")


def load_or_build_model(meta, passed, device_type, build_on="cpu"):
    """(model, tokenizer spec, run, base) for init_from: a new GPT of the configured shape, the
    run in out_dir/ckpt.pt (with its optimizer and counters in `run`), or a pretrained model
    (GPT-2, a hub id, a folder, a run of ours or nanoGPT's). base: where a LoRA run's base model
    is, which its checkpoints name. A resumed or pretrained model's shape replaces the flags'.
    build_on: 'cpu', or 'meta' for a model of the right shape without its values."""
    run, base = None, None
    if init_from == "resume":
        ckpt_path, sharded = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, sharded_ckpt.FOLDER)
        if os.path.isdir(sharded) and (not os.path.exists(ckpt_path) or
                                       os.path.getmtime(sharded) > os.path.getmtime(ckpt_path)):
            # the newer of the two: the model is built empty, for the shards to fill
            ckpt_path, run = sharded, sharded_ckpt.read_progress(sharded)
            config = checkpoint.model_config({**run["model_args"], "dropout": dropout}, sharded)
            with torch.device("meta"):
                model = build(config)
            run["sharded"] = sharded
        else:
            model, run = checkpoint.load_run(ckpt_path, device=build_on, dropout=dropout)
        if run["iter_num"] > max_iters:
            raise UserError(f"max_iters={max_iters} is below iteration {run['iter_num']}, where "
                            f"{ckpt_path} stopped: raise --max_iters to train on (nothing written)")
        override({k: run["config"][k] for k in KEPT_ON_RESUME if k in run["config"]} |
                 {k: run["model_args"][k] for k in ARCHITECTURE}, passed,
                 "a resumed run keeps its checkpoint's settings")
        return model, run.get("tokenizer") or meta.get("tokenizer"), run, run.get("base")
    if init_from == "scratch":
        args = {k: globals()[k] for k in ARCHITECTURE}
        config = checkpoint.model_config({**args, "dropout": dropout,
                                          "vocab_size": meta.get("vocab_size", 50304)})
        check_memory(dataclasses.asdict(config), device_type)
        with torch.device(build_on):
            model = build(config)
        return model, meta.get("tokenizer"), run, base
    # the architecture is the pretrained model's; dropout applies, block_size crops;
    # a LoRA run as init_from comes with its adapters merged into the weights
    model, tokenizer = checkpoint.load_model(init_from, build_on, dropout=dropout, block_size=block_size)
    override({k: getattr(model.config, k) for k in ARCHITECTURE}, passed,
             f"the architecture is {init_from}'s")
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise UserError(f"dataset {dataset!r} has {meta['vocab_size']} token ids, more than the "
                        f"{model.config.vocab_size} of {init_from}: prepare it with the model's tokenizer")
    return model, tokenizer.spec(), run, init_from if finetune == "lora" else None


def setup_finetune(model, mode, freeze_layers=0, lora_settings=None, adapters=None, patterns=""):
    """Which parameters train: all (mode 'full'); all but the embeddings and the lowest
    freeze_layers blocks ('freeze'; a head tied to the token embedding stays as it is too); or
    LoRA adapters only ('lora', with lora.apply's settings, starting from saved adapters when
    resuming). patterns (full / freeze): of those, only the parameters whose names match one of
    the comma-separated fnmatch patterns. Returns (trainable, total) parameter counts, the tied
    embedding / head counted once."""
    if mode == "freeze":
        blocks = model.blocks
        if not 0 <= freeze_layers <= len(blocks):
            raise UserError(f"freeze_layers={freeze_layers}, but the model has {len(blocks)} layers: "
                            f"choose 0 ... {len(blocks)}")
        for module in (*model.embeddings, *blocks[:freeze_layers]):
            module.requires_grad_(False)
    elif mode == "lora":
        lora.apply(model, **lora_settings, adapters=adapters)
    if patterns:
        keep_matching(model, [p.strip() for p in patterns.split(",") if p.strip()])
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def keep_matching(model, patterns):
    """Freeze every parameter whose names (a tied one has two) match none of the patterns."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    unmatched = [pat for pat in patterns
                 if not any(fnmatch.fnmatch(n, pat) for ns in names.values() for n in ns)]
    if unmatched:
        example = next(iter(names.values()))[0]
        raise UserError(f"trainable pattern {unmatched[0]!r} matches no parameter (names look like "
                        f"{example!r}; e.g. '*.attn.*' or 'lm_head.weight')")
    for p in model.parameters():
        if not any(fnmatch.fnmatch(n, pat) for n in names[id(p)] for pat in patterns):
            p.requires_grad_(False)


def get_lr(it):
    """Linear warmup for warmup_iters, then a cosine down to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss(model, batch, autocast, dist):
    """Mean loss and next-token accuracy (how often the most likely token is the right one)
    over eval_iters batches of each split, batch(split, generator, rows) drawing them;
    the same batches every time, so successive evaluations compare. As in training, every
    process draws the same global batches and takes its own eval_batch_size rows of each, so
    N processes evaluate N times the rows of one in the same time, and with N times the rows
    one process gets their numbers. Means over the targets that count (a loss mask's), summed
    on each process's device and reduced once a split: one wait for the device, not three a
    batch. Runs compiled when training is, but not through DDP's wrapper (it may talk to the
    other processes); under FSDP through the sharded model (every process holds a shard)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(seed)
        sums = 0  # (loss, right guesses, targets that count), summed over the targets
        for _ in range(eval_iters):
            X, Y = batch(split, generator, eval_batch_size or batch_size)
            with autocast:
                logits, loss = model(X, Y)
            learned = Y != -1  # targets a loss mask leaves out do not count
            counted = learned.sum()
            right = ((logits.argmax(dim=-1) == Y) & learned).sum()
            # a share with no target that counts has a loss of nan (a mean over none)
            loss_sum = torch.where(counted > 0, loss.float() * counted, 0.0)
            sums = sums + torch.stack([loss_sum, right.float(), counted.float()])
        if dist.parallel:
            all_reduce(sums)
        loss_sum, right, counted = sums.tolist()
        out[split] = loss_sum / counted if counted else math.nan
        out[f"{split}_acc"] = right / counted if counted else math.nan
    model.train()
    return out


def main():
    passed = configure(globals(), nullable=()).passed  # None only where the default is None
    check_config(knobs(globals()))
    checkpoint.check_out_dir(out_dir)  # a file, under a file, read-only: before any work

    dev, device_type, precision, autocast = hardware.setup(device, dtype)
    dist = distributed.setup(device_type, backend, parallel)
    rank, world_size = dist.rank, dist.world_size
    if sharded_checkpoint and dist.parallel == "ddp":
        raise UserError("sharded_checkpoint=True writes each process's shard of the model, but under "
                        "parallel=ddp each process holds all of it (rank 0 writes ckpt.pt): use "
                        "parallel=fsdp, or leave sharded_checkpoint off")
    if dist.parallel and device_type == "cuda":
        dev = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(dev)
    if gradient_accumulation_steps % world_size != 0:
        raise UserError(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be "
                        f"divisible by the number of processes ({world_size})")
    accum_steps = gradient_accumulation_steps // world_size  # each process does its share
    master = rank == 0  # only this process logs and writes checkpoints
    use_compile = compile if compile is not None else device_type == "cuda"
    if seed + world_size > 2**64:
        raise UserError(f"seed={seed}: each process seeds with seed + its rank, which must be "
                        f"below 2**64; lower seed")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # a new model's weights (and LoRA adapters) are drawn alike on every process (FSDP keeps
    # each its shard of them, DDP copies rank 0's); each process's own seed for what comes
    # after them (dropout)
    torch.manual_seed(seed)

    # the dataset's files before any model is loaded; then its length against the model's
    # context and its token ids against the model's vocabulary
    _, meta = open_dataset(dataset)
    # under FSDP rank 0 alone builds or loads the model in host memory; the others build it
    # empty and receive their shards from rank 0 (distributed.shard)
    build_on = "meta" if dist.sharded and rank > 0 else "cpu"
    model, tokenizer_spec, run, base = load_or_build_model(meta, passed, device_type, build_on)
    check_config(knobs(globals()))  # again, with what a resumed run keeps of its checkpoint
    splits, meta = open_dataset(dataset, block_size, model.config.vocab_size)
    trainable_count, total = setup_finetune(model, finetune, freeze_layers, checkpoint.lora_settings(globals()),
                                            run and run.get("adapters"), trainable)
    if rank > 0:  # rank 0 (and a single process) goes on drawing from where the model left off
        torch.manual_seed(seed + rank)
    resuming_shards = run is not None and "sharded" in run  # the model is empty: the shards fill it
    distributed.shard(model, dist, precision, device_type, dev, from_rank0=not resuming_shards)
    if next(model.parameters()).is_meta:
        distributed.materialize(model, dev)
    else:
        model.to(dev)
    tokens_per_iter = accum_steps * world_size * batch_size * block_size
    if master:
        print(f"{model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_iter:,} tokens per "
              f"iteration; device {dev}, {precision}, compile={use_compile}"
              + (f", {dist.parallel} over {world_size} processes" if dist.parallel else ""))
        print(f"finetune={finetune}: {trainable_count:,} of {total:,} parameters "
              f"train ({100 * trainable_count / total:.2f}%)")
        if trainable:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            print(f"training {len(names)} tensors: {', '.join(names[:8])}"
                  + (f", ... ({len(names) - 8} more)" if len(names) > 8 else ""))

    # float16 needs loss scaling to keep small gradients from flushing to zero
    scaler = torch.amp.GradScaler(device_type, enabled=(precision == "float16"))
    optimizer = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), device_type, optim)
    # batches are drawn from their own generator so its state can be saved and resumed;
    # the same seed on every process, which each takes its own rows of the global batch
    sampler = torch.Generator().manual_seed(seed)
    iter_num, best_val_loss = 0, float("inf")
    if run is not None:
        iter_num, best_val_loss = run["iter_num"], run["best_val_loss"]
        if "sharded" in run:
            sharded_ckpt.load_sharded(run["sharded"], model, optimizer, dist, run)
        else:
            distributed.load_full_optimizer_state(model, optimizer, run["optimizer"], dist)
        if "sampler" in run:  # nanoGPT's checkpoints have no random state
            sampler.set_state(run["sampler"])
            torch.set_rng_state(run["torch_rng"])
            if device_type == "cuda" and run["cuda_rng"]:
                torch.cuda.set_rng_state_all(run["cuda_rng"])
            if len(run.get("rank_rng", [])) == world_size:  # each process's own (FSDP runs)
                torch.set_rng_state(run["rank_rng"][rank])
            if device_type == "cuda" and len(run.get("rank_cuda_rng", [])) == world_size:
                torch.cuda.set_rng_state(run["rank_cuda_rng"][rank])
    run = None  # free the memory

    raw_model = model
    if use_compile:
        model = torch.compile(model)
    # evaluation runs compiled too, but not through DDP's wrapper, whose forward may wait for
    # the other processes
    eval_model = model
    model = distributed.wrap_ddp(model, dist, device_type)

    if device_type == "cuda":  # a small corpus is copied to the GPU once, not a batch at a time
        splits = to_device(splits, dev)

    def batch(split, generator, rows):
        """This process's `rows` rows of a global batch of rows x world_size (every process
        draws the same one), on the device."""
        own = slice(rank * rows, (rank + 1) * rows)
        x, y = get_batch(splits[split], block_size, rows * world_size, generator, own,
                         splits.get(f"{split}.mask"))
        if x.device.type == "cpu" and device_type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        return x.to(dev), y.to(dev)

    ckpt_path = os.path.join(out_dir, sharded_ckpt.FOLDER if sharded_checkpoint else "ckpt.pt")

    def save(val_loss):
        progress = dict(
            iter_num=iter_num, best_val_loss=best_val_loss, val_loss=val_loss,
            # everything random that is still to come, for a bit-exact resume
            sampler=sampler.get_state(), torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if device_type == "cuda" else [],
            rank_rng=distributed.gather(torch.get_rng_state(), dist) if dist.sharded else [],
            rank_cuda_rng=distributed.gather(torch.cuda.get_rng_state(), dist)
            if dist.sharded and device_type == "cuda" else [])
        if master:
            os.makedirs(out_dir, exist_ok=True)
        if sharded_checkpoint:
            progress |= dict(model_args=dataclasses.asdict(raw_model.config), config=knobs(globals()),
                             tokenizer=tokenizer_spec, base=base)
            sharded_ckpt.save_sharded(ckpt_path, raw_model, optimizer, dist, progress)
            return
        model_state, optimizer_state = distributed.full_state(raw_model, optimizer, dist)
        if master:
            checkpoint.save_run(ckpt_path, raw_model, optimizer, knobs(globals()), tokenizer_spec, base,
                                model_state=model_state, optimizer_state=optimizer_state, **progress)

    # nothing is written into out_dir until the run has started: its first record, at its
    # first evaluation, replaces the metrics of any earlier run there
    runlog = None
    if master:
        wandb_config = (wandb_project, wandb_run_name, knobs(globals())) if wandb_log else None
        runlog = RunLog(out_dir, wandb_config, resume=init_from == "resume")

    # Ctrl-C or SIGTERM asks the run to stop at the end of the current iteration, where the
    # state is whole, and save it; a second one stops at once
    stop = StopFlag(distributed.collective_device(dist) if dist.parallel else None)
    # the peak is measured (random matrices) where no datasheet figure is known, once the run
    # is known to be good: on random numbers of its own, not the run's (a resume restores those)
    with torch.random.fork_rng(devices=[dev] if device_type == "cuda" else [], device_type="cuda"):
        peak = peak_flops or hardware.peak_flops(dev, precision)  # in the precision the matmuls run in
    start_iter, train_time, run_start = iter_num, 0.0, time.time()
    last_loss = None  # the last step's loss, a tensor (reading it would wait for the device)
    while True:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # evaluate, and save a checkpoint; not again at the iteration a resumed run starts from
        at_eval = iter_num % eval_interval == 0 or iter_num == max_iters
        if at_eval and (iter_num != start_iter or iter_num == 0 or eval_only):
            losses = estimate_loss(eval_model, batch, autocast, dist)
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"val acc {losses['val_acc']:.4f}")
                runlog.log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                            "train_acc": losses["train_acc"], "val_acc": losses["val_acc"],
                            "lr": lr, "elapsed": time.time() - run_start})
            if not math.isfinite(losses["val"]):
                raise SystemExit(f"error: val loss is {losses['val']} at iteration {iter_num}; "
                                 f"stopping, {ckpt_path} left as it was (try a lower learning_rate)")
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if iter_num > 0 and (improved or always_save_checkpoint):
                if master:
                    print(f"saving checkpoint to {out_dir}")
                save(losses["val"])
        if eval_only or iter_num >= max_iters:
            break
        if stop.requested():
            # the weights are checked in save_run; the loss of the last step too, as only
            # logged iterations check theirs
            if last_loss is not None and not math.isfinite(last_loss.item()):
                raise UserError(f"interrupted at iteration {iter_num}, but its loss is "
                                f"{last_loss.item()}: the training diverged (try a lower "
                                f"learning_rate); not saved, {ckpt_path} left as it was")
            save(None)
            if master:
                print(f"interrupted: saved iteration {iter_num} to {ckpt_path}; "
                      "continue with --init_from=resume")
            break

        # forward, backward and update, accumulating gradients over micro-steps; under DDP
        # and FSDP the gradients are reduced across processes only on the last micro-step
        t0 = time.time()
        for micro_step in range(accum_steps):
            last = micro_step == accum_steps - 1
            with distributed.accumulating(model, raw_model, dist, sync=last):
                X, Y = batch("train", sampler, batch_size)
                with autocast:
                    _, loss = model(X, Y)
                    loss = loss / accum_steps  # the gradients sum: scale so they average
                scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        last_loss = loss.detach()

        if iter_num % log_interval == 0:
            # the last micro-step's loss (averaged over processes) as an estimate of the batch's
            lossf = loss.detach().float() * accum_steps
            if dist.parallel:
                all_reduce(lossf, op=ReduceOp.AVG)
            lossf = lossf.item()
            train_time += time.time() - t0
            if not math.isfinite(lossf):
                raise SystemExit(f"error: loss became {lossf} at iteration {iter_num}; stopping "
                                 f"without saving, {ckpt_path} left as it was (try a lower learning_rate)")
            if master:
                dt = train_time / log_interval
                tok_s = tokens_per_iter / dt
                mfu = raw_model.estimate_mfu(tok_s / world_size, peak)
                eta = (max_iters - iter_num) * dt
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                      f"{tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min", flush=True)
                runlog.log({"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000,
                            "tok_s": tok_s, "mfu": mfu, "elapsed": time.time() - run_start})
            train_time = 0.0
        else:
            train_time += time.time() - t0

    if runlog is not None:
        runlog.finish()
    if dist.parallel:
        distributed.finish_processes()


class StopFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (what a scheduler, `kill` or a shutdown sends)
    into a request to stop at the next safe point. device: under torchrun, where the process
    group's collectives run (NCCL takes CUDA tensors only), so that every process stops at the
    same iteration."""

    def __init__(self, device=None):
        self.flag, self.device = False, device
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\nstopping after this iteration ({again} again to quit at once)", flush=True)

    def requested(self):
        if self.device is None:
            return self.flag
        # every process must stop at the same iteration, whichever one was interrupted
        flag = torch.tensor(float(self.flag), device=self.device)
        all_reduce(flag, op=ReduceOp.MAX)
        return bool(flag.item())


if __name__ == "__main__":
    run(main)
