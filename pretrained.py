"""
Pretrained weights into our GPT, without transformers and at 1x the weights' memory.

    model, tokenizer = load_pretrained("gpt2-xl")                          # OpenAI's GPT-2 sizes
    model, tokenizer = load_pretrained("uer/gpt2-chinese-cluecorpussmall")  # any GPT-2 on the hub
    model, tokenizer = load_pretrained("path/to/folder")   # config.json + model.safetensors (or .bin)
    model, tokenizer = load_pretrained("path/to/out-dir")  # a nanoGPT run (ckpt.pt), or one of ours

Hub downloads go through huggingface_hub, so its cache, HF_HOME, HF_ENDPOINT (mirrors),
HF_HUB_OFFLINE and progress bars all apply.

The model is built on the meta device (shapes only: no memory, no random init), and every
tensor of model.safetensors is read with readinto() straight into the memory of the
parameter it becomes. The peak is the weights plus one tensor. (safetensors'
safe_open maps the file into memory instead, and every page it touches counts as resident
too, so the weights would be held twice.)

Hugging Face's GPT-2 uses the same parameter names as ours; its Conv1D layers store their
weights as (in, out), the transpose of nn.Linear's, so those four are transposed on load.
"""

import contextlib
import functools
import json
import math
import os
import pickle

import torch
from torch import nn

import hardware
from checkpoint import load_checkpoint
from configurator import UserError
from model import GPT, GPTConfig
from tokenizer import CharTokenizer, HFTokenizer, TiktokenTokenizer, load_tokenizer

# OpenAI's GPT-2 sizes, by the short names nanoGPT uses, and where they live on the hub
GPT2_SIZES = {name: f"openai-community/{name}"
              for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
GPT2_VOCAB_SIZE = 50257  # tiktoken's "gpt2" encoding
# what a hub download fetches: the config, the weights, the tokenizer; pytorch_model.bin
# only when there is no safetensors file, since many repos hold both
HUB_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}


def load_pretrained(name_or_path, device="cpu", dtype=None, dropout=None, block_size=None):
    """(GPT, tokenizer) from a GPT-2 size name, a hub id, a local Hugging Face folder, or a
    nanoGPT-style ckpt.pt (the file, or the folder holding it).
    dtype: the parameters' dtype (torch dtype or name), float32 by default; dropout: overrides
    the checkpoint's; block_size: crops the context to this many positions."""
    if isinstance(dtype, str):
        if dtype not in hardware.DTYPES:
            raise UserError(f"dtype must be one of {', '.join(hardware.DTYPES)}, got {dtype!r}")
        dtype = hardware.DTYPES[dtype]
    dtype = dtype or torch.float32
    folder_ckpt = os.path.join(name_or_path, "ckpt.pt")
    if os.path.isfile(name_or_path) or name_or_path.endswith(".pt"):
        model, tokenizer = load_nanogpt(name_or_path, device, dtype, dropout)
    elif os.path.isfile(folder_ckpt) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        model, tokenizer = load_nanogpt(folder_ckpt, device, dtype, dropout)
    else:
        model, tokenizer = load_hf(name_or_path, device, dtype, dropout)
    if block_size is not None and block_size != model.config.block_size:
        if block_size > model.config.block_size:
            raise UserError(f"block_size={block_size} is larger than the context of {name_or_path} "
                            f"({model.config.block_size} positions): lower --block_size")
        model.crop_block_size(block_size)
    return model, tokenizer


# -----------------------------------------------------------------------------
# Hugging Face checkpoints: the hub, or a folder

def load_hf(name_or_path, device, dtype, dropout):
    folder = locate(name_or_path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{name_or_path} has no config.json: not a Hugging Face model folder")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    config = gpt_config(hf_config, name_or_path, dropout)
    tokenizer = hf_tokenizer(folder, name_or_path, config.vocab_size)
    files = weight_files(folder, name_or_path)
    if files[0].endswith(".bin"):
        tensors = torch_tensors(read_torch_file(files[0]))
    else:
        tensors = (t for path in files for t in safetensors_tensors(path))
    model = fill_model(config, tensors, hf_rename, device, dtype, name_or_path)
    return model, tokenizer


def locate(name_or_path):
    """A local folder with the model's files: name_or_path itself, or its hub download."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
        raise UserError(f"{name_or_path} is not a folder: give a model folder (config.json and "
                        "model.safetensors), a GPT-2 name or a hub id")
    return download(GPT2_SIZES.get(name_or_path, name_or_path))


def download(repo_id):
    """The hub's files of repo_id, through huggingface_hub's cache; returns the local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    where = "the Hugging Face hub"
    if "HF_ENDPOINT" in os.environ:
        where += f" at {os.environ['HF_ENDPOINT']}"  # a mirror
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_FILES)
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            folder = snapshot_download(repo_id, allow_patterns=["pytorch_model.bin"])
    except HFValidationError:
        raise UserError(f"{repo_id!r} is neither a folder nor a valid hub id "
                        f"(a GPT-2 size {', '.join(GPT2_SIZES)}, or owner/name)") from None
    except GatedRepoError:
        raise UserError(f"{repo_id} on {where} is gated: accept its terms on the hub and log in "
                        "with `hf auth login`") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise UserError(f"no model {repo_id!r} on {where}, and no folder of that name: "
                        "check the spelling") from None
    except LocalEntryNotFoundError:
        raise UserError(f"cannot get {repo_id!r}: {where} is unreachable (or HF_HUB_OFFLINE is set) "
                        "and it is not in the local cache; check the network or HF_ENDPOINT, "
                        "or give a local folder") from None
    except OSError as e:  # network failures (HTTP errors are OSErrors too) and full disks
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot download {repo_id!r} from {where}: {reason}") from None
    return folder


def gpt_config(hf, name, dropout):
    """Our GPTConfig for a Hugging Face config.json; refuses what our GPT would compute otherwise."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{name} is a {hf.get('model_type')!r} model, not GPT-2: "
                        "only GPT-2-architecture models (model_type 'gpt2') can be loaded")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise UserError(f"{name}: config.json lacks {', '.join(missing)}")
    n_embd = hf["n_embd"]
    # GPT-2's settings (with transformers' defaults for absent keys) and the values we accept
    required = {"activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
                "layer_norm_epsilon": (1e-5, (1e-5,)),
                "n_inner": (None, (None, 4 * n_embd)),
                "tie_word_embeddings": (True, (True,)),
                "scale_attn_weights": (True, (True,)),
                "scale_attn_by_inverse_layer_idx": (False, (False,)),
                "add_cross_attention": (False, (False,))}
    for key, (default, accepted) in required.items():
        if hf.get(key, default) not in accepted:
            raise UserError(f"{name} has {key}={hf[key]!r}; our GPT implements GPT-2 exactly, "
                            f"which has {key}={accepted[0]!r}")
    return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                     block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                     vocab_size=hf["vocab_size"], bias=True,
                     dropout=hf.get("resid_pdrop", 0.1) if dropout is None else dropout)


def hf_tokenizer(folder, name, vocab_size):
    """The checkpoint's tokenizer: tiktoken's gpt2 for OpenAI's sizes, else the folder's
    tokenizer.json or BERT vocab.txt, else GPT-2's if the vocabulary is GPT-2's size."""
    if name in GPT2_SIZES:
        return TiktokenTokenizer("gpt2")
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    vocab_txt = os.path.join(folder, "vocab.txt")
    if os.path.exists(tokenizer_json):
        return HFTokenizer.from_file(tokenizer_json)
    if os.path.exists(vocab_txt):
        settings_path = os.path.join(folder, "tokenizer_config.json")
        settings = {}
        if os.path.exists(settings_path):
            with open(settings_path, encoding="utf-8") as f:
                settings = json.load(f)
        return HFTokenizer.from_bert_vocab(vocab_txt, lowercase=settings.get("do_lower_case", True))
    if vocab_size == GPT2_VOCAB_SIZE:
        return TiktokenTokenizer("gpt2")  # e.g. a GPT-2 fine-tune saved without its tokenizer
    raise UserError(f"{name} has no tokenizer.json or vocab.txt, and its {vocab_size}-token "
                    "vocabulary is not GPT-2's: add the tokenizer's files to the folder")


def weight_files(folder, name):
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    pickled = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):  # a big model split into shards
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, shard) for shard in shards]
    if os.path.exists(pickled):
        return [pickled]
    raise UserError(f"{name} has no weights: expected model.safetensors or pytorch_model.bin "
                    f"in {folder}")


def hf_rename(name):
    """(our parameter name, whether to transpose) for a tensor of a GPT-2 checkpoint;
    None for tensors that are not parameters of ours."""
    name = name.removeprefix("transformer.")  # GPT2LMHeadModel's prefix; GPT2Model has none
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # the head is tied to wte; old checkpoints saved the causal masks
    return "transformer." + name, name.endswith(CONV1D)


# -----------------------------------------------------------------------------
# reading tensors: each source yields (name, shape, read), read(out, transpose) filling `out`

def safetensors_tensors(path):
    """The tensors of a safetensors file, read one by one into their destinations.
    The format: an 8-byte little-endian header size, a JSON header giving each tensor's dtype,
    shape and byte range, then the tensors' bytes."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size)) if 8 + header_size <= size else None
        header.pop("__metadata__", None)
        entries = [(name, info["dtype"], info["shape"], *info["data_offsets"])
                   for name, info in header.items()]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError(f"{path} is not a safetensors file (its header is unreadable): "
                        "download or save it again") from None
    data_start = 8 + header_size
    needed = data_start + max((end for *_, end in entries), default=0)
    if needed > size:
        raise UserError(f"{path} is truncated: it has {size:,} bytes and its header needs "
                        f"{needed:,}; download or save it again")
    for name, dtype, shape, begin, end in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} of {path} has dtype {dtype}, not a float type")
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise UserError(f"{path} is corrupt: the bytes of tensor {name} do not match its shape")
    # one buffer, reused, for the tensors that cannot be read in place (a fresh one for each
    # fragments the heap, which then holds on to memory); only the pages written to take memory
    largest = max((end - begin for *_, begin, end in entries), default=0)
    buffer = torch.empty(largest, dtype=torch.uint8)
    with open(path, "rb") as f:
        for name, dtype, shape, begin, end in sorted(entries, key=lambda e: e[3]):
            yield name, shape, functools.partial(read_tensor, f, buffer, data_start + begin,
                                                 end - begin, SAFETENSORS_DTYPES[dtype], shape)


def read_tensor(f, buffer, offset, nbytes, dtype, shape, out, transpose):
    """Read the tensor at offset of file f into out, transposed if asked."""
    f.seek(offset)
    if out.device.type == "cpu" and out.dtype == dtype and not transpose:
        # the common case: the file's bytes go straight into the parameter's memory
        f.readinto(out.view(-1).view(torch.uint8).numpy())
        return
    # a transpose, another dtype or another device: through the buffer
    raw = buffer[:nbytes]
    f.readinto(raw.numpy())
    copy_into(raw.view(dtype).view(shape), out, transpose)


def copy_into(tensor, out, transpose):
    out.copy_(tensor.t() if transpose else tensor)  # converts dtype and device as needed


def read_torch_file(path):
    """A state dict saved with torch.save, loaded without running any of the file's code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:160]
        raise UserError(f"{path} holds more than tensors, refused ({reason})") from None
    except (RuntimeError, EOFError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is unreadable or truncated ({reason}): "
                        "download or save it again") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def torch_tensors(state):
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield name, list(tensor.shape), functools.partial(copy_into, tensor)


@contextlib.contextmanager
def no_normal_init():
    """Make torch.nn.init.normal_ a no-op for a while. The GPT's random init is wasted on a
    model about to be loaded, and on meta tensors torch runs normal_ through a Python
    implementation whose first use imports torch._dynamo: 2 s and 300 MB for nothing."""
    normal_ = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.nn.init.normal_ = normal_


def fill_model(config, tensors, rename, device, dtype, name):
    """A GPT of `config` whose parameters are exactly the given tensors, allocated once each:
    the model is built on the meta device and the loaded tensors are assigned to it."""
    with torch.device("meta"), no_normal_init():
        model = GPT(config)
    wanted = dict(model.named_parameters())  # tied parameters once, under their first name
    loaded = {}
    for file_name, shape, read in tensors:
        renamed = rename(file_name)
        if renamed is None:
            continue
        ours, transpose = renamed
        if ours not in wanted:
            raise UserError(f"{name} has a tensor {file_name} that GPT-2 does not: "
                            "not a GPT-2-architecture checkpoint")
        expected = list(wanted[ours].shape)
        expected_in_file = expected[::-1] if transpose else expected
        if list(shape) != expected_in_file:
            raise UserError(f"{name}: tensor {file_name} has shape {list(shape)}, but its "
                            f"config.json implies {expected_in_file}")
        out = torch.empty(expected, dtype=dtype, device=device)
        read(out, transpose)
        loaded[ours] = nn.Parameter(out)
    missing = [n for n in wanted if n not in loaded]
    if missing:
        raise UserError(f"{name} lacks {len(missing)} tensor(s) of its GPT-2 config, "
                        f"e.g. {missing[0]}")
    # give every name of a tied parameter the same loaded tensor, so the tie survives
    first_name = {id(p): n for n, p in wanted.items()}
    state = {n: loaded[first_name[id(p)]] for n, p in model.named_parameters(remove_duplicate=False)}
    model.load_state_dict(state, assign=True)
    return model


# -----------------------------------------------------------------------------
# nanoGPT checkpoints (and ours, which keep nanoGPT's format)

def load_nanogpt(path, device, dtype, dropout):
    """A GPT and its tokenizer from a ckpt.pt of nanoGPT or of this repo."""
    checkpoint = load_checkpoint(path)
    try:
        args = dict(checkpoint["model_args"])
        state = checkpoint["model"]
    except (KeyError, TypeError):
        raise UserError(f"{path} is not a nanoGPT checkpoint (no model / model_args)") from None
    if dropout is not None:
        args["dropout"] = dropout
    config = GPTConfig(**{k: v for k, v in args.items() if k in GPTConfig.__dataclass_fields__})
    model = fill_model(config, torch_tensors(state), nanogpt_rename, device, dtype, path)
    return model, nanogpt_tokenizer(checkpoint, path)


def nanogpt_rename(name):
    # a torch.compile'd model saves its parameters under _orig_mod.; nanoGPT's own attention
    # (without flash) saved its causal mask as attn.bias; the head is tied to wte
    name = name.removeprefix("_orig_mod.")
    if name == "lm_head.weight" or name.endswith(".attn.bias"):
        return None
    return name, False


def nanogpt_tokenizer(checkpoint, path):
    """Ours carry a tokenizer spec. nanoGPT's char models have a meta.pkl, which nanoGPT's
    sample.py finds at data/<dataset>/meta.pkl of its repo: look beside the checkpoint, then
    there. Without one, nanoGPT assumes GPT-2's BPE, and so do we, if the vocabulary fits."""
    if checkpoint.get("tokenizer") is not None:
        return load_tokenizer(checkpoint["tokenizer"])
    folder = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(folder, "meta.pkl")]
    dataset = (checkpoint.get("config") or {}).get("dataset")
    if dataset:
        candidates.append(os.path.join(os.path.dirname(folder), "data", str(dataset), "meta.pkl"))
    for meta_path in candidates:
        if os.path.exists(meta_path):
            itos = read_meta_pkl(meta_path)["itos"]
            return CharTokenizer("".join(itos[i] for i in range(len(itos))))
    vocab_size = checkpoint["model_args"]["vocab_size"]
    if vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{path} has a {vocab_size}-token vocabulary but no meta.pkl (looked in "
                        f"{' and '.join(candidates)}): copy its dataset's meta.pkl beside it")
    return TiktokenTokenizer("gpt2")


class PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a pickle that names any class or
    function (the way pickles run code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def read_meta_pkl(path):
    try:
        with open(path, "rb") as f:
            meta = PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a plain nanoGPT meta.pkl ({e}): refused") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("itos"), dict):
        raise UserError(f"{path} is not a nanoGPT meta.pkl (no itos vocabulary)")
    return meta
