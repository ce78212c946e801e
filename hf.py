"""
Hugging Face's model format, both ways: hub downloads, config.json, the tokenizer's files,
safetensors read at 1x the weights' memory, and export to a folder transformers loads.

    folder = locate("gpt2-xl")            # a GPT-2 size, a hub id, or a local folder
    args = model_args(read_config(folder), "gpt2-xl")   # our GPTConfig's fields
    tokenizer = folder_tokenizer(folder, "gpt2-xl", args["vocab_size"])
    files = weight_files(folder, "gpt2-xl")
    export(model, tokenizer, "my-model")   # config.json, model.safetensors, tokenizer files

checkpoint.py's load_model puts these together into a GPT; nothing here builds one.
Hub downloads go through huggingface_hub, so its cache, HF_HOME, HF_ENDPOINT (mirrors),
HF_HUB_OFFLINE and progress bars all apply.

Hugging Face's GPT-2 uses the same parameter names as ours; its Conv1D layers store their
weights as (in, out), the transpose of nn.Linear's, so those four are transposed both ways.
"""

import functools
import json
import math
import os

import torch
from torch import nn

from errors import UserError
from tokenizer import HFTokenizer, TiktokenTokenizer

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
# tiktoken builds its "gpt2" encoding from OpenAI's two GPT-2 files, which are also Hugging
# Face's vocab.json and merges.txt: (tiktoken's source, its sha256)
GPT2_TOKENIZER_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


# -----------------------------------------------------------------------------
# Where a model's files are: a folder, or the hub

def locate(name_or_path, weights=True):
    """A local folder with the model's files: name_or_path itself, or its hub download (without
    the weights when weights=False: the config and the tokenizer alone)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
        raise UserError(f"{name_or_path} is not a folder: give a model folder (config.json and "
                        "model.safetensors), a GPT-2 name or a hub id")
    return download(GPT2_SIZES.get(name_or_path, name_or_path), weights)


def download(repo_id, weights=True):
    """The hub's files of repo_id, through huggingface_hub's cache; returns the local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    where = "the Hugging Face hub"
    if "HF_ENDPOINT" in os.environ:
        where += f" at {os.environ['HF_ENDPOINT']}"  # a mirror
    try:
        patterns = HUB_FILES if weights else [p for p in HUB_FILES if "safetensors" not in p]
        folder = snapshot_download(repo_id, allow_patterns=patterns)
        if weights and not any(f.endswith(".safetensors") for f in os.listdir(folder)):
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


# -----------------------------------------------------------------------------
# config.json and the tokenizer

def read_json(path):
    """A JSON object from a file, or a one-line error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}): download or save it again") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def read_config(folder, name):
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{name} has no config.json: not a Hugging Face model folder")
    return read_json(config_path)


def model_args(hf, name, dropout=None):
    """Our GPTConfig's fields for a Hugging Face config.json; refuses what our GPT would compute
    otherwise."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{name} is a {hf.get('model_type')!r} model, not GPT-2: "
                        "only GPT-2-architecture models (model_type 'gpt2') can be loaded")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise UserError(f"{name}: config.json lacks {', '.join(missing)}")
    n_embd = hf["n_embd"]
    # GPT-2's settings (with transformers' defaults for absent keys) and the values we accept
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    required = {"activation_function": ("gelu_new", tuple(activations)),
                "layer_norm_epsilon": (1e-5, (1e-5,)),
                "n_inner": (None, (None, 4 * n_embd) if isinstance(n_embd, int) else (None,)),
                "tie_word_embeddings": (True, (True,)),
                "scale_attn_weights": (True, (True,)),
                "scale_attn_by_inverse_layer_idx": (False, (False,)),
                "add_cross_attention": (False, (False,))}
    for key, (default, accepted) in required.items():
        if hf.get(key, default) not in accepted:
            raise UserError(f"{name} has {key}={hf[key]!r}; our GPT implements GPT-2 exactly, "
                            f"which has {key}={accepted[0]!r}")
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                vocab_size=hf["vocab_size"], bias=True,
                activation=activations[hf.get("activation_function", "gelu_new")],
                dropout=hf.get("resid_pdrop", 0.1) if dropout is None else dropout)


def folder_tokenizer(folder, name, vocab_size):
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
        settings = read_json(settings_path) if os.path.exists(settings_path) else {}
        return HFTokenizer.from_bert_vocab(vocab_txt, lowercase=settings.get("do_lower_case", True))
    if vocab_size == GPT2_VOCAB_SIZE:
        return TiktokenTokenizer("gpt2")  # e.g. a GPT-2 fine-tune saved without its tokenizer
    raise UserError(f"{name} has no tokenizer.json or vocab.txt, and its {vocab_size}-token "
                    "vocabulary is not GPT-2's: add the tokenizer's files to the folder")


# -----------------------------------------------------------------------------
# The weights

def weight_files(folder, name):
    """The folder's weight files: model.safetensors, its shards, or a pytorch_model.bin."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    pickled = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):  # a big model split into shards
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map naming the shards")
        shards = [os.path.join(folder, str(shard)) for shard in sorted(set(weight_map.values()))]
        missing = [s for s in shards if not os.path.exists(s)]
        if missing:
            raise UserError(f"{name}: {index} names the shard {missing[0]}, which is missing")
        return shards
    if os.path.exists(pickled):
        return [pickled]
    raise UserError(f"{name} has no weights: expected model.safetensors or pytorch_model.bin "
                    f"in {folder}")


def rename(name):
    """(our parameter name, whether to transpose) for a tensor of a GPT-2 checkpoint;
    None for tensors that are not parameters of ours."""
    name = name.removeprefix("transformer.")  # GPT2LMHeadModel's prefix; GPT2Model has none
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # the head is tied to wte; old checkpoints saved the causal masks
    return "transformer." + name, name.endswith(CONV1D)


def safetensors_tensors(path):
    """The tensors of a safetensors file as (name, shape, read), read(out, transpose) filling
    `out` with the tensor straight from the file. The format: an 8-byte little-endian header
    size, a JSON header giving each tensor's dtype, shape and byte range, then the bytes.
    (safetensors' safe_open maps the file into memory instead, and every page it touches counts
    as resident too, so the weights would be held twice.)"""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size)) if 8 + header_size <= size else None
        header.pop("__metadata__", None)
        entries = [(name, info["dtype"], [int(n) for n in info["shape"]],
                    *(int(o) for o in info["data_offsets"])) for name, info in header.items()]
    except (ValueError, AttributeError, KeyError, TypeError, UnicodeDecodeError):
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
        if begin < 0 or min(shape, default=1) < 0 or \
                end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
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
    tensor = raw.view(dtype).view(shape)
    out.copy_(tensor.t() if transpose else tensor)  # converts dtype and device as needed


# -----------------------------------------------------------------------------
# Export: our GPT as a folder transformers loads as GPT-2

def export_config(config, tokenizer):
    """transformers' GPT2Config (as JSON) of our GPTConfig."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
            "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "tie_word_embeddings": True,
            "bos_token_id": tokenizer.eot_token, "eos_token_id": tokenizer.eot_token}


def export_tensors(model):
    """Our parameters under GPT2LMHeadModel's names (the same as ours) and layout (Conv1D
    weights transposed); the head is tied to wte, so transformers needs only wte."""
    tensors = {}
    for name, p in model.named_parameters():
        tensor = p.detach().t() if name.endswith(CONV1D) else p.detach()
        tensors[name] = tensor.contiguous()
    # GPT-2 always has biases; a model trained with bias=False has zeros in their place
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
            tensors[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return tensors


def tokenizer_files(tokenizer, block_size):
    """{file name: bytes} of the tokenizer in transformers' format; {} if it has none."""
    spec = tokenizer.spec()
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
    if spec["kind"] == "tiktoken" and spec["name"] == "gpt2":
        from tiktoken.load import read_file_cached  # tiktoken has them cached since it loaded "gpt2"
        files = {name: read_file_cached(url, sha256)
                 for name, (url, sha256) in GPT2_TOKENIZER_FILES.items()}
        eot = "<|endoftext|>"
        settings.update(tokenizer_class="GPT2Tokenizer", bos_token=eot, eos_token=eot, unk_token=eot)
    elif spec["kind"] == "tokenizers":
        files = {"tokenizer.json": spec["json"].encode("utf-8")}
    elif spec["kind"] == "char":
        files = {"tokenizer.json": char_tokenizer_json(spec["chars"]).encode("utf-8")}
    else:
        return {}
    files["tokenizer_config.json"] = json.dumps(settings, indent=2).encode("utf-8")
    return files


def char_tokenizer_json(chars):
    """A char vocabulary as a tokenizer.json: a BPE with no merges cuts text into single
    characters, and the Fuse decoder joins them back without spaces."""
    from tokenizers import Tokenizer, decoders, models
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def export(model, tokenizer, folder):
    """Write model and tokenizer into folder as config.json, model.safetensors and the
    tokenizer's files; returns the names of the tokenizer's files (none if it has no
    Hugging Face form). The files are written into a temporary folder beside it, which replaces
    the folder whole once complete (atomic.replace_folder): a failure part way, a full disk,
    leaves the previous export as it was. A folder that holds anything but an export's files
    is refused, as the export would delete them."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from atomic import replace_folder
    files = tokenizer_files(tokenizer, model.config.block_size)
    exported = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                *GPT2_TOKENIZER_FILES}
    if os.path.lexists(folder):
        if not os.path.isdir(folder) or os.path.islink(folder):
            raise UserError(f"cannot export to {folder}: it is a file or a link, not a folder")
        others = sorted(set(os.listdir(folder)) - exported)
        if others:
            raise UserError(f"cannot export to {folder}: it holds {', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}, which are not an export's files "
                            "and would be deleted; choose a new or empty folder")

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(export_config(model.config, tokenizer), f, indent=2)
        # "format": "pt" is the metadata transformers expects of a PyTorch safetensors file
        save_file(export_tensors(model), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)

    try:
        replace_folder(folder, write)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise UserError(f"cannot write the export to {folder} ({reason}); "
                        "any previous export there is left as it was") from None
    return list(files)
