"""
Every model this repo reads and every run it writes, in one place.

    save_run(path, model, optimizer, ...)              # a training run's ckpt.pt
    model, run = load_run(path)                        # ... read back, to resume it
    model, tokenizer = load_model(source)              # any source a user can name
    tokenizer = load_tokenizer(source)                 # its tokenizer alone, no weights read

A source is one of
- our run: its out_dir or ckpt.pt, full weights or LoRA adapters (with where their base is);
- a nanoGPT run: its out_dir or ckpt.pt (a char model's vocabulary from its meta.pkl);
- a Hugging Face model: a folder, a hub id, or a GPT-2 size (gpt2 ... gpt2-xl), read by hf.py.
A folder holding a ckpt.pt is a run, whatever else it holds.

The run format is nanoGPT's ckpt.pt: a dict with model (the state dict), optimizer, model_args,
iter_num, best_val_loss and config, plus tokenizer (tokenizer.py's spec), val_loss and the
sampler / RNG states for an exact resume. A LoRA run stores adapters and base instead of model.
It is written atomically (atomic.py) and read with torch.load(weights_only=True), which refuses
anything but tensors and plain containers, memory-mapped, so each file is read once and only
the tensors that are used take memory.

Models are built on the meta device (shapes only: no memory, no random init) and each loaded
tensor takes its parameter's place, so loading costs about 1x the weights' memory.
"""

import dataclasses
import os
import pickle
import re

import torch
from torch import nn

from nanogpt import hardware
from nanogpt import hf
from nanogpt import integrity
from nanogpt import lora
from nanogpt import reading
from nanogpt.atomic import atomic_write
from nanogpt.errors import UserError
from model import ACTIVATIONS, build, config_class
from nanogpt.tokenizer import CharTokenizer, TiktokenTokenizer, from_spec

# the positive int fields of a model's config (model_args), checked wherever one is read
SIZES = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


# -----------------------------------------------------------------------------
# Files

def save_checkpoint(obj, path):
    """torch.save(obj) to path, atomically: a crash leaves the old file or the new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, origin=None):
    """A file written by torch.save, memory-mapped, without unpickling any code. origin: where
    the file comes from (a hub model, a run's LoRA base), for the message that refuses it."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train one first, or check --out_dir)")
    reading.check_regular(path, f"checkpoint {path}")  # torch.load would wait on a FIFO for ever
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(refused_pickle(path, str(e), origin)) from None
    except Exception as e:  # weights_only runs no code: whatever else fails is the file's bytes
        # (a flipped byte can make torch's unpickler fail in any way: AttributeError, KeyError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({reason[:120]}); "
                        "restore it or train again") from None


def refused_pickle(path, reason, origin=None):
    """The one line that refuses a pickle naming code: what it names (torch's long message
    holds it as "GLOBAL module.name"), the file, and where that came from."""
    named = re.search(r"GLOBAL ([\w.]+)", reason) or re.search(r"it names ([\w.]+)", reason)
    what = f"code ({named.group(1)})" if named else "something other than tensors and plain data"
    where = f", {origin}" if origin else ""
    return (f"{path}{where}: refused, it is a pickle that calls {what}, which loading would have "
            "run; nothing of it was run. Load only files from a source you trust, or convert "
            "the model to safetensors")


def model_config(args, source=None):
    """A model's config (model.GPTConfig, or llama.LlamaConfig where model_args' family is
    "llama") from model_args (a checkpoint's, config.json's, or the flags'), checked."""
    where = f"{source}: " if source else ""
    try:
        config_type = config_class(args.get("family", "gpt2"))
    except ValueError as e:
        raise UserError(f"{where}not a model this repo builds: {e}") from None
    for key in SIZES:
        value = args.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}{key} must be a positive integer, got {value!r}")
        if value >= 2 ** 62:  # torch cannot even hold such a shape (smaller absurd sizes are
            # refused with the memory they would need, where the model is built)
            raise UserError(f"{where}{key}={value} is beyond any model (at most 2**62 - 1)")
    if args["n_embd"] % args["n_head"] != 0:
        raise UserError(f"{where}n_embd ({args['n_embd']}) must be divisible by n_head ({args['n_head']})")
    if args.get("activation", "gelu_tanh") not in ACTIVATIONS:
        raise UserError(f"{where}activation must be 'gelu_tanh', 'gelu' or 'relu2', got {args['activation']!r}")
    dropout = args.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{where}dropout must be in [0, 1), got {dropout!r}")
    fields = {f.name: f.default for f in dataclasses.fields(config_type) if f.init}
    optional = {"n_kv_head": int, "mlp_hidden": int, "rope_scaling": dict, "hf_model_type": str,
                "eos_token_id": list}
    for key, value in args.items():
        if key not in fields or key in SIZES or key in ("dropout", "activation"):
            continue
        kind = optional.get(key) or type(fields[key])
        if value is None and key in optional:
            continue
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        else:
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if ok and kind is int:
            ok = value >= 1
        if not ok:
            raise UserError(f"{where}{key} must be {'a positive int' if kind is int else 'a ' + kind.__name__}"
                            f"{' or None' if key in optional else ''}, got {value!r}")
    try:
        return config_type(**{k: v for k, v in args.items() if k in fields})
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise UserError(f"{where}not a model this repo builds: {e}") from None


# -----------------------------------------------------------------------------
# Our runs (and nanoGPT's, whose format ours keeps)

def save_run(path, model, optimizer, config, tokenizer_spec, base=None, model_state=None,
             optimizer_state=None, **progress):
    """Write a training run's checkpoint. tokenizer_spec: tokenizer.py's spec of the run's
    tokens (None if its dataset names none). base: where a LoRA run's base model comes from
    (a name, a hub id, or a path, stored absolute so the run loads from anywhere); such a run
    saves its adapters, not the base's weights. model_state, optimizer_state: the states to
    save when model and optimizer hold shards of them (distributed.full_state gathers them
    under FSDP); by default model.state_dict() and optimizer.state_dict(). progress: iter_num,
    best_val_loss, val_loss and the sampler / RNG states, stored as they are. Weights (or
    adapters) or optimizer state holding a NaN or an infinity are refused with a UserError, the
    file at path untouched: a diverged run never replaces a good checkpoint. Every tensor's
    crc32 is stored with it, for load_run to check (integrity.py)."""
    model_state = model.state_dict() if model_state is None else model_state
    if base is None:
        weights = {"model": model_state}
    else:
        weights = {"adapters": lora.adapters(model_state),
                   "base": os.path.abspath(base) if os.path.exists(base) else base}
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    tensors = weights.get("model", weights.get("adapters"))
    bad = integrity.nonfinite(tensors) or \
        integrity.nonfinite(dict(integrity.named_tensors(optimizer_state, "the optimizer's state")))
    if bad is not None:
        where = f" at iteration {progress['iter_num']}" if "iter_num" in progress else ""
        raise UserError(f"{bad} holds NaN or infinite values{where}: the training diverged (try a "
                        f"lower learning_rate); not saved, {path} left as it was")
    if "base" in weights:  # what the adapters were trained on, to tell later if it changed
        weights["base_fingerprint"] = base_fingerprint(weights["base"])
    checksums = {"weights": integrity.checksums_of(tensors), "optimizer": integrity.checksums_of(
        dict(integrity.named_tensors(optimizer_state, "optimizer")))}
    save_checkpoint({**weights, "optimizer": optimizer_state,
                     "model_args": dataclasses.asdict(model.config), "config": config,
                     "tokenizer": tokenizer_spec, "checksums": checksums, **progress}, path)


def base_fingerprint(base, origin=None):
    """What identifies a LoRA run's base model, to tell later whether it is still the one the
    adapters were trained on (integrity.py computes it): for a run of ours, the checksums its
    checkpoint carries; for a model folder, its weight files. None for a hub id or a GPT-2
    size: the hub's copy is named, not held."""
    path = run_path(base) if isinstance(base, str) else None
    if path is not None:
        run = load_checkpoint(path, origin)
        return integrity.run_fingerprint(run.get("checksums") if isinstance(run, dict) else None)
    if not (isinstance(base, str) and os.path.isdir(base)):
        return None
    try:
        files = hf.weight_files(base, base)
    except UserError:
        return None
    return integrity.folder_fingerprint(files)


def load_run(path, device="cpu", dtype=torch.float32, dropout=None, _loading=(),
             verify=("weights", "optimizer")):
    """(model, run) from a ckpt.pt of ours or nanoGPT's. model holds the run's weights; for a
    LoRA run it is the base model, and run["adapters"] holds what goes on it. run is the rest of
    the checkpoint: optimizer, iter_num, config, tokenizer (a spec), sampler and RNG states.
    dropout replaces the checkpoint's. verify: which tensors to check against the checksums
    save_run stored (integrity.verify_checksums); a corrupted file is a UserError."""
    run = load_checkpoint(path, f"the LoRA base of {_loading[-1]}" if _loading else None)
    if not isinstance(run, dict) or not isinstance(run.get("model_args"), dict) or \
            not isinstance(run.get("model", run.get("adapters")), dict):
        raise UserError(f"{path} is not a checkpoint of a run (no model / model_args)")
    args = dict(run["model_args"])
    # runs of ours from before the activation was recorded used GPT-2's tanh GELU; nanoGPT's
    # model.py (whose checkpoints have no tokenizer key) uses the exact one
    args.setdefault("activation", "gelu_tanh" if "tokenizer" in run else "gelu")
    if dropout is not None:
        args["dropout"] = dropout
    config = model_config(args, path)
    if "optimizer" in verify:  # train.py's resume, which reads the rest of the run too
        check_resumable(path, run)
    integrity.verify_checksums(path, run, verify)
    if "adapters" in run:
        model = load_lora_base(path, run, device, dtype, dropout, _loading)
    else:
        model = fill_model(config, torch_tensors(run.pop("model")), nanogpt_rename, device, dtype, path)
    return model, run


def check_resumable(path, run):
    """Refuse a checkpoint that lacks, or holds the wrong kind of, what a resume reads besides
    the weights: the optimizer's state, iter_num, best_val_loss, config, the model's shape and
    the random states."""
    def refuse(what):
        raise UserError(f"{path} cannot be resumed: {what} (a damaged checkpoint, or one "
                        "saved without its training state); start a new run from it with "
                        f"--init_from={os.path.dirname(os.path.abspath(path))} instead")
    def torch_optimizer_state(state):
        return isinstance(state, dict) and isinstance(state.get("state"), dict) and \
            isinstance(state.get("param_groups"), list)
    optimizer = run.get("optimizer")
    # one torch.optim state dict, or optim.py's several (Muon with AdamW) under "optimizers"
    parts = optimizer.get("optimizers") if isinstance(optimizer, dict) and "optimizers" in optimizer else [optimizer]
    if not isinstance(parts, list) or not parts or not all(map(torch_optimizer_state, parts)):
        refuse("it has no optimizer state")
    iter_num = run.get("iter_num")
    if isinstance(iter_num, bool) or not isinstance(iter_num, int) or iter_num < 0:
        refuse(f"iter_num is {iter_num!r}, not a count of iterations")
    best = run.get("best_val_loss")
    if isinstance(best, bool) or not isinstance(best, (int, float, torch.Tensor)):
        refuse(f"best_val_loss is {best!r}, not a number")
    if not isinstance(run.get("config", {}), dict):
        refuse("its config is not a dict")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "bias") if k not in run["model_args"]]
    if missing:
        refuse(f"its model_args lack {', '.join(missing)}")
    for key in ("sampler", "torch_rng"):
        if key in run and not (isinstance(run[key], torch.Tensor) and run[key].dtype == torch.uint8):
            refuse(f"its {key} is not a random generator's state")
    if "sampler" in run and "torch_rng" not in run:
        refuse("it has the sampler's state but not torch_rng")
    if not isinstance(run.get("cuda_rng", []), list):
        refuse("its cuda_rng is not a list of states")


def load_lora_base(path, run, device, dtype, dropout, loading):
    """The base model a LoRA run was trained on (merged, if it is a LoRA run itself), checked
    against the shapes the run's adapters were made for."""
    base = run.get("base")
    if not isinstance(base, str) or not base:
        raise UserError(f"{path} is a LoRA run without the name of its base model")
    own = os.path.abspath(path)
    if run_path(base) in (*loading, own):
        raise UserError(f"{path} names {base} as its base model, which leads back to {path} "
                        "(the base was overwritten, or two runs name each other)")
    recorded = run.get("base_fingerprint")
    if recorded is not None:
        if not os.path.exists(base):
            raise UserError(f"{path} is a LoRA run on {base}, which is missing (moved or deleted "
                            "since the run): put the base model back there")
        if base_fingerprint(base, f"the LoRA base of {path}") != recorded:
            raise UserError(f"{path} is a LoRA run on {base}, whose weights have changed since "
                            "the run was trained: its adapters belong to the model that was there; "
                            "restore that model, or train the adapters again")
    model, tokenizer = load_model(base, device, dtype, dropout, _loading=(*loading, own))
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if getattr(model.config, key) != run["model_args"][key]:
            raise UserError(f"{path} was trained on a base with {key}={run['model_args'][key]}, "
                            f"but its base {base} now has {getattr(model.config, key)}")
    if run.get("tokenizer") is None:
        run["tokenizer"] = tokenizer.spec()
    return model


def lora_settings(config):
    """lora.apply's settings, as a run's config saved them (checked: a damaged or foreign
    checkpoint's config is a UserError)."""
    kinds = {"lora_rank": int, "lora_alpha": (int, float), "lora_dropout": (int, float),
             "lora_targets": str}
    for key, kind in kinds.items():
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UserError(f"the LoRA run's config has no valid {key} (got {value!r}): its "
                            "checkpoint is damaged or not a LoRA run of this repo")
    return dict(rank=config["lora_rank"], alpha=config["lora_alpha"],
                dropout=config["lora_dropout"], targets=config["lora_targets"])


def nanogpt_rename(name):
    """(our parameter name, transpose=False) of a state-dict key, or None to skip it: a
    torch.compile'd model saves its parameters under _orig_mod.; nanoGPT's own attention
    (without flash) saved its causal mask as attn.bias. A tied head's lm_head.weight is the token
    embedding again: fill_model skips it."""
    name = name.removeprefix("_orig_mod.")
    if name.endswith(".attn.bias"):
        return None
    return name, False


def run_tokenizer(run, path):
    """Ours carry a tokenizer spec. nanoGPT's char models have a meta.pkl, which nanoGPT's
    sample.py finds at data/<dataset>/meta.pkl of its repo: look beside the checkpoint, then
    there. Without one, nanoGPT assumes GPT-2's BPE, and so do we, if the vocabulary fits."""
    if run.get("tokenizer") is not None:
        tokenizer = from_spec(run["tokenizer"])
        if tokenizer.chat_template is not None:
            tokenizer.chat_template_file = path  # which its template's errors name
        return tokenizer
    folder = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(folder, "meta.pkl")]
    config = run.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if dataset:
        candidates.append(os.path.join(os.path.dirname(folder), "data", str(dataset), "meta.pkl"))
    for meta_path in candidates:
        if os.path.exists(meta_path):
            itos = read_meta_pkl(meta_path, f"the vocabulary of the nanoGPT run {path}")
            return CharTokenizer("".join(itos[i] for i in range(len(itos))))
    vocab_size = run["model_args"]["vocab_size"]
    if vocab_size < hf.GPT2_VOCAB_SIZE:
        raise UserError(f"{path} has a {vocab_size}-token vocabulary but no meta.pkl (looked in "
                        f"{' and '.join(candidates)}): copy its dataset's meta.pkl beside it")
    return TiktokenTokenizer("gpt2")


class PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a pickle that names any class or
    function (the way pickles run code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def read_meta_pkl(path, origin=None):
    """The itos vocabulary ({id: character}) of a nanoGPT meta.pkl."""
    try:
        with reading.open_regular(path, limit=reading.MAX_BYTES) as f:
            meta = PlainUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("it names "):
            raise UserError(refused_pickle(path, str(e), origin)) from None
        raise UserError(f"{path} is not a plain nanoGPT meta.pkl (UnpicklingError: {str(e)[:80]}): "
                        "refused") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, UnicodeDecodeError, OverflowError) as e:
        raise UserError(f"{path} is not a plain nanoGPT meta.pkl ({type(e).__name__}: "
                        f"{str(e)[:80]}): refused") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or not all(isinstance(k, int) for k in itos) or \
            sorted(itos) != list(range(len(itos))) or \
            not all(isinstance(c, str) and len(c) == 1 for c in itos.values()):
        raise UserError(f"{path} is not a nanoGPT meta.pkl (no itos vocabulary of ids 0 ... n-1 "
                        "to characters)")
    return itos


# -----------------------------------------------------------------------------
# Any source

def run_folder(source):
    """The folder a source names, absolute: itself, or the folder of a file."""
    return os.path.abspath(os.path.dirname(source) if source.endswith(".pt") else source)


def run_path(source):
    """The ckpt.pt that source names (itself, or the one in the folder), absolute; None if the
    source is not a run (a Hugging Face folder, a hub id, a GPT-2 size)."""
    if os.path.isfile(source) or source.endswith(".pt"):
        return os.path.abspath(source)
    if os.path.exists(os.path.join(source, "ckpt.pt")):  # a file, or what load_checkpoint refuses
        return os.path.abspath(os.path.join(source, "ckpt.pt"))
    return None


def load_for_decoding(settings, merge_lora=True):
    """The model a decoding script's settings name (init_from; 'resume' reads out_dir's
    ckpt.pt), on the device and in the dtype they ask for (None: the best here), ready to
    decode, and its tokenizer."""
    device, _, precision, _ = hardware.setup(settings["device"], settings["dtype"], training=False)
    source = (os.path.join(settings["out_dir"], "ckpt.pt") if settings["init_from"] == "resume"
              else settings["init_from"])
    return load_model(source, device, precision, merge_lora=merge_lora)


def load_model(source, device="cpu", dtype=None, dropout=None, block_size=None, merge_lora=True,
               _loading=()):
    """(GPT, tokenizer) from any source (see the top of this file), in eval-ready form.
    dtype: the parameters' dtype (a torch dtype or its name), float32 by default; dropout:
    replaces the checkpoint's; block_size: crops the context to this many positions;
    merge_lora: a LoRA run's adapters are baked into the weights (a plain GPT, at the base's
    speed), else kept as trainable LoRA layers."""
    dtype = hardware.DTYPES[hardware.check_dtype(dtype)] if isinstance(dtype, str) else dtype
    dtype = dtype or torch.float32
    path = run_path(source)
    if path is not None:
        model, run = load_run(path, device, dtype, dropout, _loading, verify=("weights",))
        tokenizer = run_tokenizer(run, path)
        if "adapters" in run:
            if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in run["adapters"].items()):
                raise UserError(f"{path}: its adapters are not a state dict of tensors: damaged")
            lora.apply(model, **lora_settings(run["config"]), adapters=run["adapters"])
            if merge_lora:
                lora.merge(model)
    else:
        model, tokenizer = load_hf(source, device, dtype, dropout)
    if block_size is not None and block_size != model.config.block_size:
        if block_size > model.config.block_size:
            raise UserError(f"block_size={block_size} is larger than the context of {source} "
                            f"({model.config.block_size} positions): lower --block_size")
        model.crop_block_size(block_size)
    return model.eval(), tokenizer


def load_hf(name_or_path, device, dtype, dropout):
    folder = hf.locate(name_or_path)
    config = model_config(hf.model_args(hf.read_config(folder, name_or_path), name_or_path, dropout),
                          name_or_path)
    tokenizer = hf.folder_tokenizer(folder, name_or_path, config.vocab_size)
    files = hf.weight_files(folder, name_or_path)
    if files[0].endswith(".bin"):
        origin = (f"the weights of the model folder {name_or_path}" if os.path.isdir(name_or_path)
                  else f"the weights of {name_or_path}, downloaded from the Hugging Face hub")
        tensors = torch_tensors(load_checkpoint(files[0], origin))
    else:
        tensors = (t for path in files for t in hf.safetensors_tensors(path))
    return fill_model(config, tensors, hf.renamer(config, name_or_path), device, dtype, name_or_path), tokenizer


def load_tokenizer(source):
    """The tokenizer of any source, without reading its weights (a run's checkpoint is
    memory-mapped, and a hub download fetches only the config and tokenizer files)."""
    path = run_path(source)
    if path is None:
        folder = hf.locate(source, weights=False)
        args = hf.model_args(hf.read_config(folder, source), source)
        return hf.folder_tokenizer(folder, source, args["vocab_size"])
    run = load_checkpoint(path)
    if not isinstance(run, dict) or not isinstance(run.get("model_args"), dict):
        raise UserError(f"{path} is not a checkpoint of a run (no model / model_args)")
    if run.get("tokenizer") is None and isinstance(run.get("base"), str):
        return load_tokenizer(run["base"])  # a LoRA run of an older format: its base's
    return run_tokenizer(run, path)


# -----------------------------------------------------------------------------
# Tensors into a GPT

def torch_tensors(state):
    """The tensors of a state dict as (name, shape, read), as hf.safetensors_tensors gives them."""
    if not isinstance(state, dict):
        raise UserError("the checkpoint's weights are not a state dict of tensors")
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise UserError(f"the checkpoint's weights are not a state dict: a tensor is named {name!r}")
        if isinstance(tensor, torch.Tensor):
            yield name, list(tensor.shape), lambda out, transpose, t=tensor: out.copy_(t.t() if transpose else t)


def fill_model(config, tensors, rename, device, dtype, name):
    """A GPT of `config` whose parameters are exactly the given tensors, allocated once each:
    the model is built on the meta device and the loaded tensors are assigned to it.
    tensors: (file name, shape, read) triples; rename(file name) -> (our name, transpose) or None."""
    with torch.device("meta"):
        model = build(config)
    wanted = dict(model.named_parameters())  # tied parameters once, under their first name
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - wanted.keys()
    loaded = {}
    for file_name, shape, read in tensors:
        renamed = rename(file_name)
        if renamed is None:
            continue
        ours, transpose = renamed
        if ours in aliases:
            continue  # a tied parameter's second name: the first one brings the tensor
        if ours not in wanted:
            raise UserError(f"{name} has a tensor {file_name} that its config's model does not: "
                            f"not a {config.family} checkpoint of that shape")
        expected = list(wanted[ours].shape)
        expected_in_file = expected[::-1] if transpose else expected
        if list(shape) != expected_in_file:
            raise UserError(f"{name}: tensor {file_name} has shape {list(shape)}, but its "
                            f"config implies {expected_in_file}")
        out = torch.empty(expected, dtype=dtype, device=device)
        read(out, transpose)
        loaded[ours] = nn.Parameter(out)
    missing = [n for n in wanted if n not in loaded]
    if missing:
        raise UserError(f"{name} lacks {len(missing)} tensor(s) of its config's model, "
                        f"e.g. {missing[0]}")
    # give every name of a tied parameter the same loaded tensor, so the tie survives
    first_name = {id(p): n for n, p in wanted.items()}
    state = {n: loaded[first_name[id(p)]] for n, p in model.named_parameters(remove_duplicate=False)}
    model.load_state_dict(state, assign=True)
    return model
