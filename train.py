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

import contextlib
import dataclasses
import fnmatch
import functools
import math
import os
import signal
import time

from configurator import configure, knobs, quit_at_once, run  # first: Ctrl-C while the rest loads exits quietly

import torch
from torch.distributed import ReduceOp, all_reduce

from nanogpt import atomic
from nanogpt import checkpoint
from nanogpt import distributed
from nanogpt import hardware
import hellaswag
from nanogpt import lora
from nanogpt import sharded_ckpt
from nanogpt.dataset import check_fits, every_window, get_batch, open_dataset, to_device
from nanogpt.errors import UserError
from model import build, config_class
from nanogpt.optim import configure_optimizers
from nanogpt.runlog import RunLog

# -----------------------------------------------------------------------------
# default config values: a GPT-2 (124M) sized model, as nanoGPT's
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_batch_size: int | None = None  # rows of each evaluation batch; None: batch_size, as nanoGPT
final_eval_whole_val = False  # the last evaluation scores every val token once, not eval_iters sampled batches
eval_only = False  # evaluate once and exit
hellaswag_interval = 0  # score HellaSwag (hellaswag.py: acc, acc_norm) every this many iterations; 0: never
hellaswag_input = ""  # a local file of HellaSwag examples; empty: the validation file, downloaded once
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
activation = "gelu_tanh"  # the MLP's: GPT-2's 'gelu_tanh', nanoGPT's exact 'gelu', or 'relu2' (relu(x)^2, modded-nanogpt's)
family = "gpt2"  # a new model's: 'gpt2' (model.py) or 'llama' (llama.py: rotary positions, RMSNorm, SwiGLU MLP)
mlp_hidden: int | None = None  # family='llama': the SwiGLU MLP's width; None: 4 * n_embd (~8/3 * n_embd matches GPT-2's size)
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
# learning rate schedule: linear warmup, then a decay to min_lr
decay_lr = True
lr_schedule = "cosine"  # 'cosine' (nanoGPT's), or 'wsd': warmup, stable, then a linear decay to min_lr
decay_fraction = 0.5  # lr_schedule='wsd': the last fraction of lr_decay_iters over which the rate decays
warmup_iters = 2000
lr_decay_iters = 600000  # ~ max_iters, per Chinchilla; None: max_iters, whatever --max_iters says
min_lr = 6e-5  # ~ learning_rate / 10, per Chinchilla
# system
parallel = "ddp"  # under torchrun: 'ddp' (a whole copy per process) or 'fsdp' (sharded; distributed.py)
sharded_checkpoint = False  # write out_dir/ckpt.dcp/, a shard per process, not ckpt.pt (models too big for one host's memory)
backend: str | None = None  # distributed backend; None picks nccl on CUDA, gloo otherwise
device: str | None = None  # 'cpu', 'cuda', 'cuda:1', 'mps'; None picks the best available
dtype: str | None = None  # 'float32', 'bfloat16' or 'float16'; None picks the device's best
compile: bool | None = None  # torch.compile the model; None compiles on CUDA only
seed = 1337
peak_flops: float | None = None  # the peak FLOP/s of the device in dtype, for MFU; None: a datasheet figure, else measured
# -----------------------------------------------------------------------------
# a resumed run keeps its checkpoint's values of these: they decide what the checkpoint holds
KEPT_ON_RESUME = ("finetune", "freeze_layers", "trainable", "lora_rank", "lora_alpha",
                  "lora_dropout", "lora_targets", "optim")
# the model's shape: a resumed or pretrained model's own (block_size: a pretrained one's crops)
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "bias", "block_size", "activation", "family",
                "mlp_hidden")
# the settings above, once the config file and the flags have set them: one read-only object
# that main() hands to each step; a resumed or pretrained run gets a copy with what it keeps
# (override)
Config = dataclasses.make_dataclass("Config", knobs(globals()), frozen=True)


def main():
    # None only where the default is None, and lr_decay_iters (max_iters)
    settings = configure(globals(), nullable=("lr_decay_iters",))
    if settings["lr_decay_iters"] is None:
        settings["lr_decay_iters"] = settings["max_iters"]
    config = Config(**settings)
    check_config(config)
    atomic.check_out_dir(config.out_dir)  # a file, under a file, read-only: before any work
    runtime = set_up(config)
    # one run per out_dir: two would delete each other's temporary files and save over each
    # other's checkpoints. The kernel's lock goes with the process however it ends
    with atomic.lock_out_dir(config.out_dir) if runtime.master else contextlib.nullcontext():
        try:
            train(config, settings.passed, runtime)
        except FileNotFoundError as e:
            if os.path.isdir(config.out_dir):
                raise
            raise UserError(f"out_dir {config.out_dir} was removed during the run ({e.filename} could "
                            "not be written): the run stopped") from None
    if runtime.world.parallel:
        distributed.finish_processes()


def train(config, passed, runtime):
    """Build or resume the run, train it to max_iters (or a stop), and close its log."""
    config, training = build_or_resume(config, passed, runtime)

    # nothing is written into out_dir until the run has started: its first record, at its
    # first evaluation, replaces the metrics of any earlier run there
    runlog = None
    if runtime.master:
        wandb_config = ((config.wandb_project, config.wandb_run_name, dataclasses.asdict(config))
                        if config.wandb_log else None)
        runlog = RunLog(config.out_dir, wandb_config, resume=config.init_from == "resume")
    # Ctrl-C or SIGTERM asks the run to stop at the end of the current iteration, where the
    # state is whole, and save it; a second one stops at once
    world = runtime.world
    stop = StopFlag(distributed.collective_device(world) if world.parallel else None)
    # the peak is measured (random matrices) where no datasheet figure is known, once the run
    # is known to be good: on random numbers of its own, not the run's (a resume restores those)
    cuda_devices = [runtime.device] if runtime.device_type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        # in the precision the matmuls run in
        peak = config.peak_flops or hardware.peak_flops(runtime.device, runtime.precision)

    # HellaSwag's examples before the first step (downloaded once): offline fails now, not hours in
    examples = hellaswag_examples(config, training)
    train_loop(config, runtime, training, stop, peak, runlog, examples)
    if runlog is not None:
        runlog.finish()


def check_config(config):
    """Reject settings that cannot work, before anything is written."""
    if not config.init_from:
        raise UserError("init_from must be 'scratch', 'resume', a GPT-2 size (gpt2 ... gpt2-xl), "
                        "a hub id or a model folder")
    if config.finetune not in ("full", "freeze", "lora"):
        raise UserError(f"finetune must be 'full', 'freeze' or 'lora', got {config.finetune!r}")
    if config.finetune == "lora" and config.trainable:
        raise UserError("trainable= picks parameters to train with finetune='full' or 'freeze'; "
                        "with 'lora' the adapters train (choose them with lora_targets)")
    if config.trainable and not trainable_patterns(config.trainable):
        raise UserError(f"trainable={config.trainable!r} names no pattern, which would freeze every "
                        "parameter: give comma-separated patterns, e.g. '*.attn.*', or leave it "
                        "empty to train them all")
    if config.finetune == "lora" and config.init_from == "scratch":
        raise UserError("finetune=lora trains adapters on a pretrained model: set init_from to "
                        "gpt2 ... gpt2-xl, a hub id or a model folder")
    if config.init_from not in ("scratch", "resume") and \
            checkpoint.run_folder(config.init_from) == checkpoint.run_folder(config.out_dir):
        raise UserError(f"out_dir={config.out_dir} is init_from's folder: the run would overwrite "
                        "the model it starts from; choose another out_dir (or init_from=resume)")
    for key in ("batch_size", "block_size", "n_layer", "n_head", "n_embd",
                "gradient_accumulation_steps", "eval_iters", "eval_interval", "log_interval"):
        if getattr(config, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.hellaswag_interval < 0:
        raise UserError(f"hellaswag_interval must be 0 (never) or more, got {config.hellaswag_interval}")
    size = config.eval_batch_size
    if size is not None and size < 1:
        raise UserError(f"eval_batch_size must be a whole number of at least 1 (or None: "
                        f"batch_size's), got {size!r}")
    if config.optim not in ("adamw", "muon"):
        raise UserError(f"optim must be 'adamw' or 'muon', got {config.optim!r}")
    if config.parallel not in distributed.PARALLEL_MODES:
        raise UserError(f"parallel must be 'ddp' or 'fsdp', got {config.parallel!r}")
    if config.parallel == "fsdp" and config.dtype == "float16":
        raise UserError("dtype=float16 needs a gradient scaler that parallel=fsdp does not "
                        "shard: use dtype=bfloat16 (or float32) with fsdp")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "max_iters",
                "warmup_iters", "lr_decay_iters", "freeze_layers"):
        if getattr(config, key) < 0:
            raise UserError(f"{key} must not be negative, got {getattr(config, key)}")
    for key in ("beta1", "beta2", "dropout", "lora_dropout"):
        if not 0 <= getattr(config, key) < 1:
            raise UserError(f"{key} must be in [0, 1), got {getattr(config, key)}")
    if config.lr_schedule not in ("cosine", "wsd"):
        raise UserError(f"lr_schedule must be 'cosine' or 'wsd', got {config.lr_schedule!r}")
    if not 0 < config.decay_fraction <= 1:
        raise UserError(f"decay_fraction must be in (0, 1], got {config.decay_fraction}")
    if config.decay_lr and config.lr_decay_iters <= config.warmup_iters:
        raise UserError(f"lr_decay_iters ({config.lr_decay_iters}) must be more than warmup_iters "
                        f"({config.warmup_iters}): the learning rate decays from the end of the "
                        "warmup to lr_decay_iters (or set decay_lr=False)")
    if not 0 <= config.seed < 2**64:
        raise UserError(f"seed must be in [0, 2**64), got {config.seed}")
    check_family(config)


def check_family(config):
    """Refuse a setting that the model family does not have."""
    try:
        config_class(config.family)  # model.py's list of the families
    except ValueError as e:
        raise UserError(str(e)) from None
    if config.family == "llama" and config.bias:
        raise UserError("family=llama has no biases: drop --bias=True")
    if config.family == "llama" and config.activation != "gelu_tanh":
        raise UserError(f"family=llama's MLP is SwiGLU: activation={config.activation!r} is "
                        "family=gpt2's setting; drop it")
    if config.family == "gpt2" and config.mlp_hidden is not None:
        raise UserError("mlp_hidden sets family=llama's MLP: family=gpt2's is 4 * n_embd wide; "
                        "drop it or set --family=llama")
    if config.mlp_hidden is not None and config.mlp_hidden < 1:
        raise UserError(f"mlp_hidden must be at least 1 (or None: 4 * n_embd), got {config.mlp_hidden}")


# -----------------------------------------------------------------------------
# set up: this process's device and its place among the processes torchrun started

@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how this process trains (set_up)."""
    device: str  # 'cpu', 'mps', 'cuda' or 'cuda:N' (under torchrun, this process's GPU)
    device_type: str  # 'cpu', 'cuda' or 'mps'
    precision: str  # what the matmuls run in: 'float32', 'bfloat16' or 'float16'
    autocast: object  # the context that makes them run in it
    world: distributed.Distributed  # the processes this one trains with (parallel None: alone)
    accum_steps: int  # this process's share of gradient_accumulation_steps
    use_compile: bool  # whether the model runs through torch.compile

    @property
    def master(self):
        """Whether this process is the one that logs and writes checkpoints (rank 0)."""
        return self.world.rank == 0


def set_up(config):
    """This process's device, precision and process group (under torchrun), with the checks
    that need them; seeds torch's random numbers."""
    device, device_type, precision, autocast = hardware.setup(config.device, config.dtype)
    world = distributed.setup(device_type, config.backend, config.parallel)
    if config.sharded_checkpoint and world.parallel == "ddp":
        raise UserError("sharded_checkpoint=True writes each process's shard of the model, but under "
                        "parallel=ddp each process holds all of it (rank 0 writes ckpt.pt): use "
                        "parallel=fsdp, or leave sharded_checkpoint off")
    if world.parallel and device_type == "cuda":
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    # gradient_accumulation_steps is the total over the processes; where they do not divide it
    # (the one of a single-process config), each takes the fewest micro-steps that make at
    # least the batch asked for, and the step's batch grows (docs/distributed.md)
    accum_steps = -(-config.gradient_accumulation_steps // world.world_size)
    if accum_steps * world.world_size != config.gradient_accumulation_steps and world.rank == 0:
        print(f"note: gradient_accumulation_steps={config.gradient_accumulation_steps} does not "
              f"divide among {world.world_size} processes: each takes {accum_steps}, so a step is "
              f"{accum_steps * world.world_size} x batch_size sequences, not "
              f"{config.gradient_accumulation_steps} x batch_size (the same learning_rate)")
    if config.seed + world.world_size > 2**64:
        raise UserError(f"seed={config.seed}: each process seeds with seed + its rank, which must be "
                        f"below 2**64; lower seed")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # a new model's weights (and LoRA adapters) are drawn alike on every process (FSDP keeps
    # each its shard of them, DDP copies rank 0's); each process's own seed for what comes
    # after them (dropout)
    torch.manual_seed(config.seed)
    return Runtime(device, device_type, precision, autocast, world, accum_steps=accum_steps,
                   use_compile=config.compile if config.compile is not None else device_type == "cuda")


def tokens_per_iter(config, runtime):
    """The tokens of one optimizer step, over all processes."""
    return runtime.accum_steps * runtime.world.world_size * config.batch_size * config.block_size


# -----------------------------------------------------------------------------
# build or resume: the model, its optimizer and where the run stands

@dataclasses.dataclass
class Training:
    """A run in progress: what its steps run and what its checkpoints save (build_or_resume)."""
    raw_model: torch.nn.Module  # the model itself (model.build's): what checkpoints save
    model: torch.nn.Module  # what training steps run: raw_model, compiled and wrapped in DDP as asked
    eval_model: torch.nn.Module  # what evaluation runs: compiled as model is, never DDP's wrapper
    optimizer: object  # configure_optimizers's: a torch optimizer, or optim.Optimizers
    scaler: torch.amp.GradScaler  # float16's loss scaling (disabled in other precisions)
    sampler: torch.Generator  # draws the training batches
    batch: object  # batch(split, generator, rows): this process's rows of a global batch (draw_batch)
    windows: object  # windows(split, rows): this process's rows of batches that score a whole split (draw_windows)
    tokenizer_spec: dict | None  # saved with each checkpoint, for sample.py
    base: str | None  # where a LoRA run's base model is, which its checkpoints name
    # the init_from the run started with, which its checkpoints' config names (a resumed run's
    # is its checkpoint's): export_hf.py follows it to the folders the run is made of
    started_from: str
    iter_num: int  # optimizer steps taken
    best_val_loss: float


def build_or_resume(config, passed, runtime):
    """The run, ready for its first step: the model (new, pretrained or resumed) set up for
    fine-tuning and placed on the device, its optimizer and the generator of its batches, as
    the checkpoint left them when resuming; then compiled and wrapped as asked. passed: the
    settings the user gave. Returns (config, training): the config with what a resumed or
    pretrained model decides of it."""
    # the dataset's files before any model is loaded; then its length against the model's
    # context and its token ids against the model's vocabulary
    _, meta = open_dataset(config.dataset)
    # under FSDP rank 0 alone builds or loads the model in host memory; the others build it
    # empty and receive their shards from rank 0 (distributed.shard)
    build_on = "meta" if runtime.world.sharded and runtime.world.rank > 0 else "cpu"
    config, model, tokenizer_spec, saved_run, base = load_or_build_model(
        config, meta, passed, runtime.device_type, build_on)
    check_config(config)  # again, with what a resumed run keeps of its checkpoint
    if runtime.master and is_finetune(config, saved_run):
        warn_if_schedule_too_long(config)
    check_fits(meta, tokenizer_spec, config.dataset,
               config.out_dir if config.init_from == "resume" else config.init_from)
    splits, _ = open_dataset(config.dataset, config.block_size, model.config.vocab_size)
    check_batch_memory(config, model.config.vocab_size, runtime)
    prepare_model(model, config, runtime, saved_run)

    # float16 needs loss scaling to keep small gradients from flushing to zero
    scaler = torch.amp.GradScaler(runtime.device_type, enabled=(runtime.precision == "float16"))
    optimizer = configure_optimizers(model, config.weight_decay, config.learning_rate,
                                     (config.beta1, config.beta2), runtime.device_type, config.optim,
                                     sharded=runtime.world.sharded)
    # batches are drawn from their own generator so its state can be saved and resumed;
    # the same seed on every process, which each takes its own rows of the global batch
    sampler = torch.Generator().manual_seed(config.seed)
    iter_num, best_val_loss = 0, float("inf")
    started_from = config.init_from
    if saved_run is not None:
        started_from = saved_run["config"].get("init_from", "resume")
        iter_num, best_val_loss = restore(saved_run, model, optimizer, sampler, runtime)
    del saved_run  # free its memory: what the run needs of it is restored

    raw_model = model
    if runtime.use_compile:
        model = torch.compile(model)
    # evaluation runs compiled too, but not through DDP's wrapper, whose forward may wait for
    # the other processes
    eval_model = model
    model = distributed.wrap_ddp(model, runtime.world, runtime.device_type)
    if runtime.device_type == "cuda":  # a small corpus is copied to the GPU once, not a batch at a time
        splits = to_device(splits, runtime.device)
    batch = functools.partial(draw_batch, splits, config.block_size, runtime)
    windows = functools.partial(draw_windows, splits, config.block_size, runtime)
    return config, Training(raw_model=raw_model, model=model, eval_model=eval_model,
                            optimizer=optimizer, scaler=scaler, sampler=sampler, batch=batch,
                            windows=windows, tokenizer_spec=tokenizer_spec, base=base,
                            started_from=started_from, iter_num=iter_num, best_val_loss=best_val_loss)


def load_or_build_model(config, meta, passed, device_type, build_on="cpu"):
    """(config, model, tokenizer spec, saved_run, base) for init_from: a new GPT of the
    configured shape, the run in out_dir (resume_model), or a pretrained model (GPT-2, a hub
    id, a folder, a run of ours or nanoGPT's). meta: the dataset's. saved_run: a resumed
    run's checkpoint (its optimizer, counters and random state), else None. base: where a
    LoRA run's base model is, which its checkpoints name. A resumed or pretrained model's
    shape replaces the flags' in the config returned. build_on: 'cpu', or 'meta' for a model
    of the right shape without its values."""
    if config.init_from == "resume":
        return resume_model(config, meta, passed, build_on)
    if config.init_from == "scratch":
        args = {k: getattr(config, k) for k in ARCHITECTURE}
        model_config = checkpoint.model_config({**args, "dropout": config.dropout,
                                                "vocab_size": meta.get("vocab_size", 50304)})
        check_memory(dataclasses.asdict(model_config), device_type)
        with torch.device(build_on):
            model = build(model_config)
        return config, model, meta.get("tokenizer"), None, None
    # the architecture is the pretrained model's; dropout applies, block_size crops;
    # a LoRA run as init_from comes with its adapters merged into the weights
    model, tokenizer = checkpoint.load_model(config.init_from, build_on, dropout=config.dropout,
                                             block_size=config.block_size)
    # (each family has only some of these: GPT-2 no mlp_hidden, a Llama no activation)
    config = override(config, {k: getattr(model.config, k) for k in ARCHITECTURE
                               if hasattr(model.config, k)}, passed,
                      f"the architecture is {config.init_from}'s")
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise UserError(f"dataset {config.dataset!r} has {meta['vocab_size']} token ids, more than "
                        f"the {model.config.vocab_size} of {config.init_from}: prepare it with the "
                        "model's tokenizer")
    return config, model, tokenizer.spec(), None, config.init_from if config.finetune == "lora" else None


def resume_model(config, meta, passed, build_on):
    """load_or_build_model for init_from='resume': the run in out_dir, from ckpt.pt or from
    its sharded checkpoint (ckpt.dcp/) where that is the newer; then the model is built empty,
    and saved_run['sharded'] names the folder whose shards fill it."""
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    sharded = os.path.join(config.out_dir, sharded_ckpt.FOLDER)
    if os.path.isdir(sharded) and (not os.path.exists(ckpt_path) or
                                   os.path.getmtime(sharded) > os.path.getmtime(ckpt_path)):
        # the newer of the two: the model is built empty, for the shards to fill
        ckpt_path, saved_run = sharded, sharded_ckpt.read_progress(sharded)
        args = {**saved_run["model_args"], "dropout": config.dropout}
        model_config = checkpoint.model_config(args, sharded)
        with torch.device("meta"):
            model = build(model_config)
        saved_run["sharded"] = sharded
    else:
        model, saved_run = checkpoint.load_run(ckpt_path, device=build_on, dropout=config.dropout)
    if saved_run["iter_num"] > config.max_iters:
        raise UserError(f"max_iters={config.max_iters} is below iteration {saved_run['iter_num']}, "
                        f"where {ckpt_path} stopped: raise --max_iters to train on (nothing written)")
    kept = {k: saved_run["config"][k] for k in KEPT_ON_RESUME if k in saved_run["config"]}
    shape = {k: saved_run["model_args"][k] for k in ARCHITECTURE if k in saved_run["model_args"]}
    config = override(config, kept | shape, passed, "a resumed run keeps its checkpoint's settings")
    tokenizer_spec = saved_run.get("tokenizer") or meta.get("tokenizer")
    return config, model, tokenizer_spec, saved_run, saved_run.get("base")


def is_finetune(config, saved_run):
    """Whether the run fine-tunes a pretrained model, as far as can be told: init_from names
    one, or the resumed run's did (or trains adapters or a part, which only fine-tunes do)."""
    if config.init_from != "resume":
        return config.init_from != "scratch"
    started_from = saved_run["config"].get("init_from", "scratch") if saved_run else "scratch"
    return started_from not in ("scratch", "resume") or config.finetune != "full"


def warn_if_schedule_too_long(config):
    """One line where the learning rate schedule outlasts the run: pretraining's warmup and
    decay (the defaults: 2,000 and 600,000 iterations) on a fine-tune of a few hundred steps
    leave its learning rate still climbing when it ends."""
    if not config.decay_lr or config.eval_only:
        return
    too_long = [f"{key}={getattr(config, key)}" for key in ("warmup_iters", "lr_decay_iters")
                if getattr(config, key) > config.max_iters]
    if too_long:
        print(f"warning: this fine-tune ends before its learning rate schedule does "
              f"({' and '.join(too_long)}, max_iters={config.max_iters}): set e.g. "
              f"--warmup_iters={max(1, config.max_iters // 20)} --lr_decay_iters=None (decay over "
              "max_iters), or start from config/chat_sft.py or config/chat_lora.py")


def override(config, values, passed, why):
    """config with values (what the checkpoint or the pretrained model says) in place of its
    own, reporting in one line the ones the user passed (passed) that are overridden."""
    ignored = [f"--{k}={getattr(config, k)!r}" for k in values
               if k in passed and getattr(config, k) != values[k]]
    if ignored:
        print(f"note: {why}: {', '.join(ignored)} ignored")
    return dataclasses.replace(config, **values)


def check_memory(args, device_type):
    """Refuse a model of args' shape (n_layer, n_embd, block_size, vocab_size, bias) whose
    training state, counted from the shape, cannot fit: float32 weights, their gradients and
    AdamW's two moments, 16 bytes a parameter (activations come on top), in this machine's
    memory when it trains on the CPU; on another device the weights alone, built here first."""
    n, layers = args["n_embd"], args["n_layer"]
    per_layer = 12 * n * n + (13 if args["bias"] else 4) * n
    params = layers * per_layer + (args["vocab_size"] + args["block_size"]) * n + 2 * n
    ram, _ = hardware.memory("cpu")
    need, what = (16 * params, "to train on the CPU") if device_type == "cpu" else \
        (4 * params, "for its float32 weights, built here before they move to the device")
    if need > ram:
        shape = ", ".join(f"{k}={args[k]}" for k in ("n_layer", "n_embd", "block_size", "vocab_size"))
        raise UserError(f"a model of {shape} has {params / 1e9:,.1f}B parameters and needs at least "
                        f"{need / 1e9:,.0f} GB {what}, more than this machine's {ram / 1e9:,.0f} GB "
                        "of memory: choose a smaller model")


def check_batch_memory(config, vocab_size, runtime):
    """Refuse a batch (batch_size or eval_batch_size rows, the larger, of block_size tokens)
    that cannot fit where it is computed, before one is drawn: its token ids (int64: the
    offsets of its windows in the corpus and the windows, 16 bytes a token) and its logits
    (float32: 4 bytes a token and vocabulary entry), the least of its activations, against the
    GPU's memory, or this machine's on the CPU (and MPS, which shares it)."""
    rows, key = max((config.batch_size, "batch_size"), (config.eval_batch_size or 0, "eval_batch_size"))
    need = rows * config.block_size * (16 + 4 * vocab_size)
    memory, where = hardware.memory(runtime.device)
    if need > memory:
        raise UserError(f"{key}={rows:,} rows of {config.block_size} tokens needs at least "
                        f"{need / 1e9:,.0f} GB for its token ids and logits, more than the "
                        f"{memory / 1e9:,.0f} GB {where}: lower {key} (and raise "
                        "gradient_accumulation_steps for as many tokens a step)")


def prepare_model(model, config, runtime, saved_run):
    """Choose what trains (setup_finetune; a resumed LoRA run's adapters from saved_run), seed
    this process's own random numbers, and move the model to the device: under FSDP sharded,
    its values from rank 0 or, resuming, from the sharded checkpoint. Prints its summary."""
    trainable_count, total = setup_finetune(model, config.finetune, config.freeze_layers,
                                            checkpoint.lora_settings(dataclasses.asdict(config)),
                                            saved_run and saved_run.get("adapters"), config.trainable)
    if trainable_count == 0:  # its backward would fail at the first step
        raise UserError(f"finetune={config.finetune}, freeze_layers={config.freeze_layers} and "
                        f"trainable={config.trainable!r} leave no parameter to train: unfreeze some")
    world = runtime.world
    if world.rank > 0:  # rank 0 (and a single process) goes on drawing from where the model left off
        torch.manual_seed(config.seed + world.rank)
    # resuming from a sharded checkpoint the model is empty: the shards fill it
    resuming_shards = saved_run is not None and "sharded" in saved_run
    distributed.shard(model, world, runtime.precision, runtime.device_type, runtime.device,
                      from_rank0=not resuming_shards)
    if next(model.parameters()).is_meta:
        distributed.materialize(model, runtime.device)
    else:
        model.to(runtime.device)
    if not runtime.master:
        return
    print(f"{model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_iter(config, runtime):,} "
          f"tokens per iteration; device {runtime.device}, {runtime.precision}, "
          f"compile={runtime.use_compile}"
          + (f", {world.parallel} over {world.world_size} processes" if world.parallel else ""))
    print(f"finetune={config.finetune}: {trainable_count:,} of {total:,} parameters "
          f"train ({100 * trainable_count / total:.2f}%)")
    if config.trainable:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        print(f"training {len(names)} tensors: {', '.join(names[:8])}"
              + (f", ... ({len(names) - 8} more)" if len(names) > 8 else ""))


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
        keep_matching(model, trainable_patterns(patterns))
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_patterns(text):
    """The patterns of a trainable= setting: comma-separated, blanks left out."""
    return [p.strip() for p in text.split(",") if p.strip()]


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


def restore(saved_run, model, optimizer, sampler, runtime):
    """Load into optimizer and sampler what a resumed run's checkpoint (saved_run) holds for
    them, and every random generator's state, so that the run goes on bit-identically.
    Returns its (iter_num, best_val_loss)."""
    progress = saved_run["iter_num"], saved_run["best_val_loss"]
    world = runtime.world
    if "sharded" in saved_run:
        sharded_ckpt.load_sharded(saved_run["sharded"], model, optimizer, world, saved_run)
    else:
        distributed.load_full_optimizer_state(model, optimizer, saved_run["optimizer"], world)
    if "sampler" in saved_run:  # nanoGPT's checkpoints have no random state
        cuda = runtime.device_type == "cuda"
        sampler.set_state(saved_run["sampler"])
        torch.set_rng_state(saved_run["torch_rng"])
        if cuda and saved_run["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved_run["cuda_rng"])
        if len(saved_run.get("rank_rng", [])) == world.world_size:  # each process's own (FSDP runs)
            torch.set_rng_state(saved_run["rank_rng"][world.rank])
        if cuda and len(saved_run.get("rank_cuda_rng", [])) == world.world_size:
            torch.cuda.set_rng_state(saved_run["rank_cuda_rng"][world.rank])
    return progress


def draw_batch(splits, block_size, runtime, split, generator, rows):
    """This process's `rows` rows of a global batch of rows x world_size (every process
    draws the same one) from splits[split], on the device."""
    rank = runtime.world.rank
    own = slice(rank * rows, (rank + 1) * rows)
    x, y = get_batch(splits[split], block_size, rows * runtime.world.world_size, generator, own,
                     splits.get(f"{split}.mask"))
    return on_device(x, y, runtime)


def draw_windows(splits, block_size, runtime, split, rows):
    """This process's `rows` rows of each batch of windows that score every target of
    splits[split] once (dataset.every_window), on the device. Every process runs as many
    batches (the last ones may leave a process no row), as FSDP's forward passes need."""
    rank = runtime.world.rank
    for x, y in every_window(splits[split], block_size, rows * runtime.world.world_size,
                             slice(rank * rows, (rank + 1) * rows), splits.get(f"{split}.mask")):
        yield on_device(x, y, runtime)


def on_device(x, y, runtime):
    """A batch's inputs and targets moved to the run's device."""
    if x.device.type == "cpu" and runtime.device_type == "cuda":
        # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(runtime.device, non_blocking=True), y.pin_memory().to(runtime.device, non_blocking=True)
    return x.to(runtime.device), y.to(runtime.device)


# -----------------------------------------------------------------------------
# the loop: evaluate and save, take a step, log

def train_loop(config, runtime, training, stop, peak, runlog, examples=None):
    """Train until max_iters (or, eval_only, evaluate once), evaluating and saving every
    eval_interval iterations, scoring HellaSwag's examples (if any) every hellaswag_interval,
    and logging every log_interval; or until stop (a StopFlag) is requested, saving first.
    peak: the device's FLOP/s, for MFU; runlog: rank 0's RunLog."""
    start_iter, train_time, run_start = training.iter_num, 0.0, time.time()
    last_loss = None  # the last step's loss, a tensor (reading it would wait for the device)
    while True:
        iter_num = training.iter_num
        lr = get_lr(iter_num, config)
        for group in training.optimizer.param_groups:
            group["lr"] = lr

        # evaluate, and save a checkpoint; not again at the iteration a resumed run starts from
        at_eval = iter_num % config.eval_interval == 0 or iter_num == config.max_iters
        if at_eval and (iter_num != start_iter or iter_num == 0 or config.eval_only):
            final = iter_num == config.max_iters
            evaluate_and_save(config, runtime, training, lr, runlog, run_start, final)
        if examples and iter_num % config.hellaswag_interval == 0 and \
                (iter_num != start_iter or iter_num == 0 or config.eval_only):
            score_hellaswag(config, runtime, training, examples, runlog)
        if config.eval_only or iter_num >= config.max_iters:
            return
        if stop.requested():
            save_and_stop(config, runtime, training, last_loss)
            return

        t0 = time.time()
        last_loss = train_step(config, runtime, training)
        if training.iter_num % config.log_interval == 0:
            # the last micro-step's loss (averaged over processes) as an estimate of the batch's
            loss = last_loss.float() * runtime.accum_steps
            if runtime.world.parallel:
                all_reduce(loss, op=ReduceOp.AVG)
            loss = loss.item()
            train_time += time.time() - t0
            log_step(config, runtime, training, loss, lr, train_time / config.log_interval, peak,
                     runlog, run_start)
            train_time = 0.0
        else:
            train_time += time.time() - t0


def get_lr(it, config):
    """Linear warmup for warmup_iters, then down to min_lr at lr_decay_iters: along a cosine,
    or (lr_schedule='wsd') held at learning_rate until the last decay_fraction of the way and
    then in a straight line."""
    if not config.decay_lr:
        return config.learning_rate
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it > config.lr_decay_iters:
        return config.min_lr
    if config.lr_schedule == "wsd":
        left = (config.lr_decay_iters - it) / (config.decay_fraction * config.lr_decay_iters)
        return config.min_lr + min(1.0, left) * (config.learning_rate - config.min_lr)
    ratio = (it - config.warmup_iters) / (config.lr_decay_iters - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # from 1 down to 0
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


def train_step(config, runtime, training):
    """One optimizer step: forward, backward and update, accumulating gradients over
    runtime.accum_steps micro-steps; under DDP and FSDP the gradients are reduced across
    processes only on the last micro-step. Returns the last micro-step's loss (scaled by
    1 / accum_steps), detached."""
    model, optimizer, scaler = training.model, training.optimizer, training.scaler
    for micro_step in range(runtime.accum_steps):
        last = micro_step == runtime.accum_steps - 1
        with distributed.accumulating(model, training.raw_model, runtime.world, sync=last):
            X, Y = training.batch("train", training.sampler, config.batch_size)
            with runtime.autocast:
                _, loss = model(X, Y)
                loss = loss / runtime.accum_steps  # the gradients sum: scale so they average
            scaler.scale(loss).backward()
    if config.grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    training.iter_num += 1
    return loss.detach()


def log_step(config, runtime, training, loss, lr, dt, peak, runlog, run_start):
    """Report the step just taken: its loss (a float), learning rate, dt (its seconds) and the
    speed and MFU (against peak) they make; stop, nothing saved, where the loss is not finite."""
    if not math.isfinite(loss):  # every process sees it (the loss is averaged): rank 0 says it
        raise SystemExit(f"error: loss became {loss} at iteration {training.iter_num}; stopping "
                         f"without saving, {checkpoint_path(config)} left as it was (try a lower "
                         "learning_rate)" if runtime.master else 1)
    if not runtime.master:
        return
    tok_s = tokens_per_iter(config, runtime) / dt
    mfu = training.raw_model.estimate_mfu(tok_s / runtime.world.world_size, peak)
    eta = (config.max_iters - training.iter_num) * dt
    print(f"iter {training.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
          f"{tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min", flush=True)
    runlog.log({"iter": training.iter_num, "loss": loss, "lr": lr, "ms": dt * 1000,
                "tok_s": tok_s, "mfu": mfu, "elapsed": time.time() - run_start})


def evaluate_and_save(config, runtime, training, lr, runlog, run_start, final=False):
    """Evaluate (estimate_loss) and log; save a checkpoint where the val loss improved, or
    always with always_save_checkpoint (not at iteration 0); stop, nothing saved, where the
    val loss is not finite. final: the run's last evaluation, which final_eval_whole_val
    makes score all of val."""
    whole_val = final and config.final_eval_whole_val
    losses = estimate_loss(training.eval_model, training.batch, runtime.autocast, runtime.world,
                           config.eval_iters, config.eval_batch_size or config.batch_size, config.seed,
                           training.windows if whole_val else None)
    iter_num = training.iter_num
    if runtime.master:
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
              f"{' (all of val)' if whole_val else ''}, val acc {losses['val_acc']:.4f}")
        runlog.log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                    "train_acc": losses["train_acc"], "val_acc": losses["val_acc"],
                    "lr": lr, "elapsed": time.time() - run_start})
    if not math.isfinite(losses["val"]):  # the same on every process: rank 0 says it
        raise SystemExit(f"error: val loss is {losses['val']} at iteration {iter_num}; "
                         f"stopping, {checkpoint_path(config)} left as it was (try a lower "
                         "learning_rate)" if runtime.master else 1)
    improved = losses["val"] < training.best_val_loss
    training.best_val_loss = min(training.best_val_loss, losses["val"])
    if iter_num > 0 and (improved or config.always_save_checkpoint):
        if runtime.master:
            print(f"saving checkpoint to {config.out_dir}")
        save(config, runtime, training, losses["val"])


def hellaswag_examples(config, training):
    """HellaSwag's validation examples when hellaswag_interval asks for them, else None."""
    if not config.hellaswag_interval:
        return None
    if training.tokenizer_spec is None:
        raise UserError("hellaswag_interval needs the model's tokenizer, which the dataset's "
                        "meta.json does not name (a nanoGPT dataset): prepare it with this repo")
    return hellaswag.load_examples(config.hellaswag_input)


def score_hellaswag(config, runtime, training, examples, runlog):
    """HellaSwag's acc and acc_norm of the model, each process scoring its share (hellaswag.py);
    rank 0 prints and logs them (metrics.jsonl, wandb)."""
    from nanogpt.tokenizer import from_spec
    scores = hellaswag.evaluate(training.raw_model, from_spec(training.tokenizer_spec), examples,
                                runtime.device, config.eval_batch_size or config.batch_size,
                                runtime.autocast, runtime.world)
    if runtime.master:
        print(f"hellaswag at step {training.iter_num}: acc {scores['acc']:.4f}, "
              f"acc_norm {scores['acc_norm']:.4f}")
        runlog.log({"iter": training.iter_num, "hellaswag_acc": scores["acc"],
                    "hellaswag_acc_norm": scores["acc_norm"]})


@torch.no_grad()
def estimate_loss(model, batch, autocast, world, iters, rows, seed, windows=None):
    """Mean loss and next-token accuracy (how often the most likely token is the right one)
    over `iters` batches of each split, batch(split, generator, rows) drawing them from a
    generator seeded with seed: the same batches every time, so successive evaluations
    compare. windows(split, rows) (draw_windows), if given, gives val's batches instead:
    every target of it, once. As in training, every process (world, a distributed.Distributed) draws the same
    global batches and takes its own `rows` rows of each, so N processes evaluate N times the
    rows of one in the same time, and with N times the rows one process gets their numbers.
    Means over the targets that count (a loss mask's), summed on each process's device and
    reduced once a split: one wait for the device, not three a batch. Runs compiled when
    training is, but not through DDP's wrapper (it may talk to the other processes); under
    FSDP through the sharded model (every process holds a shard)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(seed)
        batches = (windows(split, rows) if split == "val" and windows is not None else
                   (batch(split, generator, rows) for _ in range(iters)))
        sums = 0  # (loss, right guesses, targets that count), summed over the targets
        for X, Y in batches:
            with autocast:
                logits, loss = model(X, Y)
            learned = Y != -1  # targets a loss mask leaves out do not count
            counted = learned.sum()
            right = ((logits.argmax(dim=-1) == Y) & learned).sum()
            # a share with no target that counts has a loss of nan (a mean over none)
            loss_sum = torch.where(counted > 0, loss.float() * counted, 0.0)
            sums = sums + torch.stack([loss_sum, right.float(), counted.float()])
        if world.parallel:
            all_reduce(sums)
        loss_sum, right, counted = sums.tolist()
        out[split] = loss_sum / counted if counted else math.nan
        out[f"{split}_acc"] = right / counted if counted else math.nan
    model.train()
    return out


def checkpoint_path(config):
    """Where the run's checkpoint goes: out_dir/ckpt.pt, or the sharded checkpoint's folder."""
    return os.path.join(config.out_dir, sharded_ckpt.FOLDER if config.sharded_checkpoint else "ckpt.pt")


def save(config, runtime, training, val_loss):
    """Write the run's checkpoint: ckpt.pt (the full state, gathered on rank 0) or, with
    sharded_checkpoint, a shard per process. val_loss: the evaluation's that saves it, None
    when Ctrl-C or SIGTERM does."""
    world, cuda = runtime.world, runtime.device_type == "cuda"
    progress = dict(
        iter_num=training.iter_num, best_val_loss=training.best_val_loss, val_loss=val_loss,
        # everything random that is still to come, for a bit-exact resume
        sampler=training.sampler.get_state(), torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if cuda else [],
        rank_rng=distributed.gather(torch.get_rng_state(), world) if world.sharded else [],
        rank_cuda_rng=distributed.gather(torch.cuda.get_rng_state(), world)
        if world.sharded and cuda else [])
    if runtime.master:
        os.makedirs(config.out_dir, exist_ok=True)
    model, optimizer = training.raw_model, training.optimizer
    saved_config = dataclasses.asdict(config) | {"init_from": training.started_from}
    if config.sharded_checkpoint:
        progress |= dict(model_args=dataclasses.asdict(model.config), config=saved_config,
                         tokenizer=training.tokenizer_spec, base=training.base)
        sharded_ckpt.save_sharded(checkpoint_path(config), model, optimizer, world, progress)
        return
    model_state, optimizer_state = distributed.full_state(model, optimizer, world)
    if runtime.master:
        checkpoint.save_run(checkpoint_path(config), model, optimizer, saved_config,
                            training.tokenizer_spec, training.base,
                            model_state=model_state, optimizer_state=optimizer_state, **progress)


def save_and_stop(config, runtime, training, last_loss):
    """Save the run where Ctrl-C or SIGTERM stopped it. The weights are checked in save_run;
    the loss of the last step (last_loss, a tensor; None before the first) here, as only
    logged iterations check theirs."""
    if last_loss is not None and not math.isfinite(last_loss.item()):
        raise UserError(f"interrupted at iteration {training.iter_num}, but its loss is "
                        f"{last_loss.item()}: the training diverged (try a lower "
                        f"learning_rate); not saved, {checkpoint_path(config)} left as it was")
    save(config, runtime, training, None)
    if runtime.master:
        print(f"interrupted: saved iteration {training.iter_num} to {checkpoint_path(config)}; "
              "continue with --init_from=resume")


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
        if self.flag:  # a second one: at once, wherever it lands (in a save, in the exit)
            quit_at_once(signum, frame)
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
