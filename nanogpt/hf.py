"""
Hugging Face's model format, both ways: hub downloads, config.json, the tokenizer's files,
safetensors read at 1x the weights' memory, and export to a folder transformers loads.
Two families: GPT-2 (model_type "gpt2") and the Llama-style models ("llama", "mistral",
"qwen2"), which llama.py builds (llama.LlamaConfig).

    folder = locate("gpt2-xl")            # a GPT-2 size, a hub id, or a local folder
    args = model_args(read_config(folder), "gpt2-xl")   # our config's fields (model_args)
    tokenizer = folder_tokenizer(folder, "gpt2-xl", args["vocab_size"])
    files = weight_files(folder, "gpt2-xl")
    export(model, tokenizer, "my-model")   # config.json, model.safetensors, tokenizer files

checkpoint.py's load_model puts these together into a GPT; nothing here builds one.
Hub downloads go through huggingface_hub, so its cache, HF_HOME, HF_ENDPOINT (mirrors),
HF_HUB_OFFLINE and progress bars all apply.

Hugging Face's GPT-2 uses the same parameter names as ours; its Conv1D layers store their
weights as (in, out), the transpose of nn.Linear's, so those four are transposed both ways.
The Llama-style models use transformers' names and layouts as they are.
"""

import functools
import json
import math
import os

import torch
from torch import nn

from nanogpt.errors import UserError
from nanogpt.reading import open_regular, parse_json, read_json, read_text
from nanogpt.tokenizer import HFTokenizer, TiktokenTokenizer, check_token_ids

# OpenAI's GPT-2 sizes, by the short names nanoGPT uses, and where they live on the hub
GPT2_SIZES = {name: f"openai-community/{name}"
              for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
GPT2_VOCAB_SIZE = 50257  # tiktoken's "gpt2" encoding
AGAIN = "download or save it again"  # what to do about a model folder's damaged file
# what a hub download fetches: the config, the weights, the tokenizer; pytorch_model.bin
# only when there is no safetensors file, since many repos hold both
HUB_FILES = ["config.json", "generation_config.json", "model*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json", "chat_template.jinja"]
# the special tokens whose texts transformers gives a chat template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the Llama-style model_types, one architecture in llama.py, and their transformers classes
LLAMA_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
MODEL_TYPES = ("gpt2", *LLAMA_TYPES)
# transformers' defaults for the keys of theirs that a config.json may leave out
LLAMA_DEFAULTS = {"llama": dict(max_position_embeddings=2048, num_key_value_heads=None),
                  "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8),
                  "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32)}
# the decoding settings of a generation_config.json that sample.py and chat.py take as their
# defaults, and transformers' defaults for those a file leaves out
# (GenerationConfig._get_default_generation_params; min_p has none, 0.0 is "off")
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                       "min_p": 0.0, "typical_p": 1.0, "repetition_penalty": 1.0,
                       "no_repeat_ngram_size": 0}
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the safetensors library refuses a larger header
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

def read_config(folder, name):
    """config.json, its eos_token_id replaced by generation_config.json's where that names one:
    those are the ids transformers' generate() stops at (an instruct model's end of turn, say)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{name} has no config.json: not a Hugging Face model folder")
    config = read_json(config_path, AGAIN)
    if not isinstance(config.get("model_type", ""), str):
        raise UserError(f"{config_path}: model_type must be a name such as \"gpt2\" or \"qwen2\", "
                        f"got {config['model_type']!r}")
    generation_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(generation_path):
        eos = read_json(generation_path, AGAIN).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def generation_defaults(folder, name):
    """The decoding settings of GENERATION_DEFAULTS that a folder's generation_config.json
    gives, checked: {} without a file, or with one that sets none of them (GPT-2's holds only
    token ids). sample.decoding_defaults fills in the rest as transformers' generate() does."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return {}
    given = {k: v for k, v in read_json(path, AGAIN).items() if k in GENERATION_DEFAULTS and v is not None}
    for key, value in given.items():
        kind = type(GENERATION_DEFAULTS[key])
        ok = isinstance(value, bool) if kind is bool else \
            not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
        if not ok or (kind is float and not math.isfinite(value)):  # JSON may hold NaN, Infinity
            raise UserError(f"{name}: generation_config.json's {key} must be "
                            f"{'a finite number' if kind is float else kind.__name__}, got {value!r}")
        given[key] = kind(value)
    return given


def model_args(hf, name, dropout=None):
    """Our config's fields (model_args) for a Hugging Face config.json; refuses what our GPT would compute
    otherwise."""
    if hf.get("model_type") in LLAMA_TYPES:
        return llama_args(hf, name, dropout)
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{name} is a {hf.get('model_type')!r} model, not GPT-2 or a Llama-style "
                        f"one: the model_types that load are {', '.join(map(repr, MODEL_TYPES))}")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise UserError(f"{name}: config.json lacks {', '.join(missing)}")
    n_embd = hf["n_embd"]
    # GPT-2's settings (with transformers' defaults for absent keys) and the values we accept
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                   "relu2": "relu2"}
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


def llama_args(hf, name, dropout=None):
    """LlamaConfig's fields (family "llama") for the config.json of a Llama, Mistral or Qwen2
    model, with transformers' defaults for the keys it leaves out; refuses what llama.py would
    compute otherwise (another activation, RoPE variant or head size, a sliding window that
    would matter)."""
    model_type = hf["model_type"]
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
    missing = [k for k in sizes if k not in hf]
    if missing:
        raise UserError(f"{name} is a {model_type!r} model (not GPT-2), but its config.json lacks "
                        f"{', '.join(missing)}")
    for key in sizes:
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise UserError(f"{name}: config.json's {key} must be a positive integer, got {hf[key]!r}")

    def refuse(key, value, accepted):
        raise UserError(f"{name} has {key}={value!r}, which our Llama-style model does not "
                        f"implement (it has {accepted})")

    defaults = LLAMA_DEFAULTS[model_type]
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    n_kv_head = hf.get("num_key_value_heads", defaults["num_key_value_heads"]) or n_head
    block_size = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "'silu'")
    if n_embd % n_head != 0 or hf.get("head_dim") not in (None, n_embd // n_head):
        refuse("head_dim", hf.get("head_dim"), "hidden_size / num_attention_heads")
    if isinstance(n_kv_head, bool) or not isinstance(n_kv_head, int) or n_kv_head < 1 or \
            n_head % n_kv_head != 0:
        raise UserError(f"{name}: num_key_value_heads ({n_kv_head!r}) must divide "
                        f"num_attention_heads ({n_head})")
    if (n_embd // n_head) % 2 != 0:
        refuse("head_dim", n_embd // n_head, "an even size, which rotary embeddings need")
    window = sliding_window(hf, model_type)
    if window is not None and window < block_size:
        raise UserError(f"{name} has sliding_window={window}, shorter than its context "
                        f"(max_position_embeddings={block_size}): sliding-window attention is "
                        "not implemented, only a window that spans the whole context (or null)")
    rope_theta, rope_scaling = rope_args(hf, name, block_size)
    eos = hf.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if eos is not None and not (isinstance(eos, list) and
                                all(isinstance(i, int) and not isinstance(i, bool) for i in eos)):
        raise UserError(f"{name}: eos_token_id must be a token id or a list of them, got {eos!r}")
    check_token_ids(f"{name}: eos_token_id", eos or [], hf["vocab_size"])
    return dict(family="llama", hf_model_type=model_type, n_layer=hf["num_hidden_layers"],
                n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                mlp_hidden=hf["intermediate_size"], block_size=block_size,
                vocab_size=hf["vocab_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta, rope_scaling=rope_scaling,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2",
                attn_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
                mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
                eos_token_id=eos or None,
                dropout=hf.get("attention_dropout", 0.0) if dropout is None else dropout)


def sliding_window(hf, model_type):
    """The attention window of the config's sliding layers as transformers reads it; None if
    no layer slides. Mistral slides in every layer; Qwen2 only with use_sliding_window, in the
    layers its layer_types say (by default those from max_window_layers on)."""
    window = hf.get("sliding_window", 4096)
    if model_type == "llama" or window is None:
        return None
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        layers = hf.get("num_hidden_layers")
        types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                          else "full_attention" for i in range(layers)]
        if "sliding_attention" not in types:
            return None
    return window


def rope_args(hf, name, block_size):
    """(rope_theta, rope_scaling) of a config.json: transformers 5 writes rope_parameters,
    older configs rope_theta and rope_scaling. rope_scaling comes out None, or complete, as
    LlamaConfig takes it (Llama 3.1's original_max_position_embeddings filled in as transformers
    does, so that a later crop of block_size does not change it)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{name} has rope parameters per layer type ({params!r}), which our "
                        "Llama-style model does not implement")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise UserError(f"{name}: rope_theta must be a positive number, got {theta!r}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"{name} has partial_rotary_factor={partial!r}: only rotary embeddings "
                        "over the whole head (1.0) are implemented")
    kind = params.get("rope_type", params.get("type", "default"))
    keys = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")}
    if kind not in keys:
        raise UserError(f"{name} has RoPE scaling of type {kind!r}, which is not implemented: "
                        "the types that load are 'default', 'linear' and 'llama3'")
    if kind == "default":
        return float(theta), None
    scaling = {"rope_type": kind, **{k: params[k] for k in keys[kind] if k in params}}
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings",
                           hf.get("original_max_position_embeddings", block_size))
    for key in keys[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"{name}: its {kind} RoPE scaling needs a positive {key}, got {value!r}")
    if kind == "llama3" and scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        raise UserError(f"{name}: its llama3 RoPE scaling needs high_freq_factor != low_freq_factor")
    return float(theta), scaling


def folder_tokenizer(folder, name, vocab_size):
    """The checkpoint's tokenizer: tiktoken's gpt2 for OpenAI's sizes, else the folder's
    tokenizer.json or BERT vocab.txt, else GPT-2's if the vocabulary is GPT-2's size."""
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    vocab_txt = os.path.join(folder, "vocab.txt")
    if name in GPT2_SIZES:
        tokenizer = TiktokenTokenizer("gpt2")
    elif os.path.exists(tokenizer_json):
        tokenizer = HFTokenizer(read_text(tokenizer_json), *chat_template(folder))
        config_path = os.path.join(folder, "config.json")
        if os.path.exists(config_path):
            config = read_config(folder, name)
            if config.get("model_type") in LLAMA_TYPES:
                llama_special_tokens(tokenizer, config)
    elif os.path.exists(vocab_txt):
        settings_path = os.path.join(folder, "tokenizer_config.json")
        settings = read_json(settings_path, AGAIN) if os.path.exists(settings_path) else {}
        tokenizer = HFTokenizer.from_bert_vocab(vocab_txt, lowercase=settings.get("do_lower_case", True))
    elif vocab_size == GPT2_VOCAB_SIZE:
        tokenizer = TiktokenTokenizer("gpt2")  # e.g. a GPT-2 fine-tune saved without its tokenizer
    else:
        raise UserError(f"{name} has no tokenizer.json or vocab.txt, and its {vocab_size}-token "
                        "vocabulary is not GPT-2's: add the tokenizer's files to the folder")
    # the model's decoding defaults travel with its tokenizer, into the checkpoints of runs
    tokenizer.generation = generation_defaults(folder, name)
    return tokenizer


def chat_template(folder):
    """(template, {"bos_token": text, ...}, file) of a folder: tokenizer_config.json's
    chat_template (a string, or a list of named ones: the "default"), or chat_template.jinja,
    with the special tokens' texts the template may use and the file it is in; (None, None,
    None) without one."""
    settings_path = os.path.join(folder, "tokenizer_config.json")
    settings = read_json(settings_path, AGAIN) if os.path.exists(settings_path) else {}
    template, path = settings.get("chat_template"), settings_path
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        template, path = read_text(jinja_path), jinja_path
    if not isinstance(template, str):
        return None, None, None
    return template, special_tokens(folder, settings), path


def special_tokens(folder, settings):
    """{"bos_token": text, ...}: the special tokens' texts a chat template may use, read as
    transformers reads them: tokenizer_config.json's, over which an older folder's
    special_tokens_map.json wins where the config lists no added_tokens_decoder."""
    sources = [settings]
    map_path = os.path.join(folder, "special_tokens_map.json")
    if "added_tokens_decoder" not in settings and os.path.exists(map_path):
        sources.append(read_json(map_path, AGAIN))
    special = {}
    for source in sources:
        for key in SPECIAL_TOKEN_NAMES:
            value = source.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
    return special


def llama_special_tokens(tokenizer, config):
    """A Llama-style model's tokenizer ends a text where its config says, not at GPT-2's
    <|endoftext|>: eot_token becomes the first of eos_token_id (generation_config.json's or
    config.json's, see read_config), and eos_tokens all of them (an instruct model has several).
    bos_token is the token that the tokenizer.json puts before every text (Llama's <s> or
    <|begin_of_text|>; Qwen2 has none), which transformers' tokenizer adds and sample.py too."""
    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    if eos:
        tokenizer.eot_token = eos[0]
    tokenizer.eos_tokens = eos or ([] if tokenizer.eot_token is None else [tokenizer.eot_token])
    plain = tokenizer.tok.encode("a", add_special_tokens=False).ids
    marked = tokenizer.tok.encode("a", add_special_tokens=True).ids
    if len(marked) == len(plain) + 1 and marked[1:] == plain:
        tokenizer.bos_token = marked[0]


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
        weight_map = read_json(index, AGAIN).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map naming the shards")
        for shard in weight_map.values():
            # the shards are files beside the index: a path elsewhere (../other/model.safetensors,
            # /abs/path) would load another folder's weights as this model's
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise UserError(f"{index} names the shard {shard!r}, which is not the name of a file "
                                f"in its folder (the shards lie beside it): {AGAIN}")
        shards = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
        missing = [s for s in shards if not os.path.exists(s)]
        if missing:
            raise UserError(f"{name}: {index} names the shard {missing[0]}, which is missing")
        return shards
    if os.path.exists(pickled):
        return [pickled]
    raise UserError(f"{name} has no weights: expected model.safetensors or pytorch_model.bin "
                    f"in {folder}")


def renamer(config, name):
    """The rename function (file's tensor name -> (our name, transpose) or None to skip it)
    for checkpoints of config's family (a GPTConfig or LlamaConfig)."""
    if config.family == "gpt2":
        return rename
    return functools.partial(llama_rename, expected=llama_names(config), config=config, source=name)


def rename(name):
    """(our parameter name, whether to transpose) for a tensor of a GPT-2 checkpoint;
    None for tensors that are not parameters of ours."""
    name = name.removeprefix("transformer.")  # GPT2LMHeadModel's prefix; GPT2Model has none
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # the head is tied to wte; old checkpoints saved the causal masks
    return "transformer." + name, name.endswith(CONV1D)


def llama_names(config):
    """The names of a Llama-style checkpoint's tensors for config, as transformers saves them
    (a tied lm_head is not saved)."""
    qkv_bias = config.qkv_bias or config.attn_bias
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight",
                 *(f"self_attn.{p}_proj.{kind}" for p in "qkv"
                   for kind in ("weight", "bias") if kind == "weight" or qkv_bias),
                 "self_attn.o_proj.weight", *(["self_attn.o_proj.bias"] if config.attn_bias else []),
                 *(f"mlp.{p}_proj.{kind}" for p in ("gate", "up", "down")
                   for kind in ("weight", "bias") if kind == "weight" or config.mlp_bias)]
    names = {"model.embed_tokens.weight", "model.norm.weight",
             *(f"model.layers.{i}.{n}" for i in range(config.n_layer) for n in per_layer)}
    if not config.tie_embeddings:
        names.add("lm_head.weight")
    return names


def llama_rename(name, expected, config, source):
    """(our name, False) for a tensor of a Llama-style checkpoint: transformers' names are
    ours. A model saved without its head (LlamaModel) lacks the "model." prefix; old
    checkpoints saved the rotary embedding's inv_freq, which we compute; a tied head stored
    anyway is the embedding again. Anything else is refused here, naming the family."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
        return None
    if not name.startswith("model.") and name != "lm_head.weight":
        name = "model." + name
    if name not in expected:
        raise UserError(f"{source} has a tensor {name} that a {config.hf_model_type or 'llama'} "
                        f"model of its config.json does not: another architecture, or a "
                        f"config.json that does not match the weights")
    return name, False


def safetensors_tensors(path):
    """The tensors of a safetensors file as (name, shape, read), read(out, transpose) filling
    `out` with the tensor straight from the file. The format: an 8-byte little-endian header
    size, a JSON header giving each tensor's dtype, shape and byte range, then the bytes.
    (safetensors' safe_open maps the file into memory instead, and every page it touches counts
    as resident too, so the weights would be held twice.)"""
    with open_regular(path) as f:
        data_start, entries = safetensors_header(f, path)
    # one buffer, reused, for the tensors that cannot be read in place (a fresh one for each
    # fragments the heap, which then holds on to memory); only the pages written to take memory
    largest = max((end - begin for *_, begin, end in entries), default=0)
    buffer = torch.empty(largest, dtype=torch.uint8)
    with open_regular(path) as f:
        for name, dtype, shape, begin, end in sorted(entries, key=lambda e: e[3]):
            yield name, shape, functools.partial(read_tensor, f, buffer, data_start + begin,
                                                 end - begin, SAFETENSORS_DTYPES[dtype], shape)


def safetensors_header(f, path):
    """(where the tensors' bytes start, [(name, dtype, shape, begin, end), ...]) of the open
    safetensors file f (at path), checked as the safetensors library checks a file before it
    reads one: a header of at most its 100 MB, shapes and byte ranges of whole numbers, each
    tensor's bytes as many as its dtype and shape take, and the tensors' bytes one after another
    from the end of the header to the end of the file, none overlapping another's, no byte
    unused. The format has no checksum: bytes changed within a tensor go unnoticed."""
    size = os.fstat(f.fileno()).st_size
    header_size = int.from_bytes(f.read(8), "little")
    if size < 8 or header_size > min(SAFETENSORS_MAX_HEADER, size - 8):
        raise UserError(f"{path} is not a safetensors file (its header would be {header_size:,} "
                        f"bytes, in a file of {size:,}); {AGAIN}")
    header = parse_json(f.read(header_size), f"{path} is not a safetensors file: its header", AGAIN)
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file: its header is a JSON "
                        f"{type(header).__name__}, not an object; {AGAIN}")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
                and len(offsets) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in shape + offsets)):
            raise UserError(f"{path} is not a safetensors file: its header's entry {name!r} is not "
                            f"a tensor's dtype, shape and data_offsets (whole numbers); {AGAIN}")
        entries.append((name, dtype, shape, *offsets))
    data_start = 8 + header_size
    needed = data_start + max((end for *_, end in entries), default=0)
    if needed > size:
        raise UserError(f"{path} is truncated: it has {size:,} bytes and its header needs "
                        f"{needed:,}; {AGAIN}")
    for name, dtype, shape, begin, end in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} of {path} has dtype {dtype}, not a float type")
        if begin < 0 or min(shape, default=1) < 0 or \
                end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise UserError(f"{path} is corrupt: the bytes of tensor {name} do not match its shape")
    reached = 0  # the bytes the tensors before this one (in the file's order) end at
    for name, *_, begin, end in sorted(entries, key=lambda e: e[3:]):
        if begin != reached:
            how = "overlap another tensor's" if begin < reached else f"leave {begin - reached:,} bytes unused before them"
            raise UserError(f"{path} is corrupt: the bytes of tensor {name} {how}; {AGAIN}")
        reached = end
    if data_start + reached != size:
        raise UserError(f"{path} is corrupt: its last {size - data_start - reached:,} bytes belong "
                        f"to no tensor; {AGAIN}")
    return data_start, entries


BLOCK_BYTES = 1 << 24  # 16 MiB: what read_tensor converts at a time


def read_tensor(f, buffer, offset, nbytes, dtype, shape, out, transpose):
    """Read the tensor at offset of file f into out, transposed if asked."""
    f.seek(offset)
    if out.device.type == "cpu" and out.dtype == dtype and not transpose:
        # the common case: the file's bytes go straight into the parameter's memory
        f.readinto(out.view(-1).view(torch.uint8).numpy())
        return
    # a transpose, another dtype or another device: through the buffer, a block of the file's
    # rows at a time, so converting a tensor takes a block of memory beside it, not a copy of it
    # (loading in bfloat16 then peaks at about half the float32 weights)
    if not shape:
        raw = buffer[:nbytes]
        f.readinto(raw.numpy())
        out.copy_(raw.view(dtype).view(shape))
        return
    row_bytes = nbytes // shape[0] if shape[0] else 0
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    for begin in range(0, shape[0], step):
        end = min(shape[0], begin + step)
        raw = buffer[:(end - begin) * row_bytes]
        f.readinto(raw.numpy())
        rows = raw.view(dtype).view(end - begin, *shape[1:])
        # converts dtype and device as needed; the file's rows are out's columns if transposed
        (out[:, begin:end] if transpose else out[begin:end]).copy_(rows.t() if transpose else rows)


# -----------------------------------------------------------------------------
# Export: our GPT as a folder transformers loads as GPT-2

# transformers' name of each of GPTConfig's activations
EXPORTED_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu2": "relu2"}


def export_config(config, tokenizer):
    """transformers' config (as JSON) of our config: GPT2Config, or the Llama-style one."""
    if config.family == "llama":
        return llama_export_config(config, tokenizer)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
            "activation_function": EXPORTED_ACTIVATIONS[config.activation],
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "tie_word_embeddings": True,
            "bos_token_id": tokenizer.eot_token, "eos_token_id": tokenizer.eot_token}


def llama_export_type(config):
    """The model_type an export of a Llama-style config is: the one it was loaded as, if that
    can hold its biases, else the first that can (qkv_bias alone is Qwen2's)."""
    no_bias = not (config.qkv_bias or config.attn_bias or config.mlp_bias)
    fits = {"llama": config.attn_bias or not config.qkv_bias,  # attention_bias covers all four
            "qwen2": config.qkv_bias and not config.attn_bias and not config.mlp_bias,
            "mistral": no_bias}
    for model_type in (config.hf_model_type, "llama", "qwen2"):
        if fits.get(model_type):
            return model_type
    raise UserError("no Hugging Face model_type has biases on q, k and v and in the MLP but "
                    "not on o_proj (qkv_bias and mlp_bias without attn_bias): cannot export")


def llama_export_config(config, tokenizer):
    """transformers' LlamaConfig, MistralConfig or Qwen2Config (as JSON) of our LlamaConfig."""
    model_type = llama_export_type(config)
    eos = config.eos_token_id or ([] if tokenizer.eot_token is None else [tokenizer.eot_token])
    rope = {"rope_type": "default"} if config.rope_scaling is None else dict(config.rope_scaling)
    out = {"architectures": [LLAMA_TYPES[model_type]], "model_type": model_type,
           "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
           "intermediate_size": config.mlp_hidden or 4 * config.n_embd,
           "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
           "num_key_value_heads": config.kv_heads, "head_dim": config.head_size,
           "hidden_act": "silu", "max_position_embeddings": config.block_size,
           "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
           # transformers 5 reads rope_parameters; older versions rope_theta and rope_scaling
           "rope_parameters": {**rope, "rope_theta": config.rope_theta},
           "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
           "attention_dropout": config.dropout,
           "bos_token_id": getattr(tokenizer, "bos_token", None),
           "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None}
    if model_type == "llama":
        out.update(attention_bias=config.attn_bias, mlp_bias=config.mlp_bias)
    elif model_type == "mistral":
        out.update(sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return out


def export_tensors(model):
    """Our parameters under the names and layout transformers loads. GPT-2: GPT2LMHeadModel's
    names (the same as ours) and layout (Conv1D weights transposed); the head is tied to wte,
    so transformers needs only wte. Llama-style: ours are transformers' as they are, a tied
    head saved once, as the embedding."""
    if model.config.family == "llama":
        return {name: p.detach().contiguous() for name, p in model.named_parameters()}
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
        if tokenizer.chat_template is not None:  # a chat model's template and its tokens' texts
            settings.update(chat_template=tokenizer.chat_template, **tokenizer.special_tokens)
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
    tokenizer's files (with its chat template, if it has one), and generation_config.json if the
    tokenizer carries decoding defaults; returns the names of the tokenizer's files (none if it has no
    Hugging Face form). The files are written into a temporary folder beside it, which replaces
    the folder whole once complete (atomic.replace_folder): a failure part way, a full disk,
    leaves the previous export as it was. A folder that holds anything but an export's files
    is refused, as the export would delete them."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from nanogpt.atomic import replace_folder
    files = tokenizer_files(tokenizer, model.config.block_size)
    exported = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", *GPT2_TOKENIZER_FILES}
    config = export_config(model.config, tokenizer)
    # the decoding defaults the model came with (its folder's generation_config.json), and
    # the token ids transformers reads beside them there
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  **tokenizer.generation} if getattr(tokenizer, "generation", None) else None
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
            json.dump(config, f, indent=2)
        if generation is not None:
            with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(generation, f, indent=2)
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
