"""
Export a checkpoint as a Hugging Face model folder, which transformers loads as GPT-2:

$ python export_hf.py --out_dir=out-shakespeare                 # writes out-shakespeare/hf
$ python export_hf.py --out_dir=out-shakespeare --export_dir=my-model

    from transformers import AutoModelForCausalLM, pipeline
    model = AutoModelForCausalLM.from_pretrained("my-model")
    print(pipeline("text-generation", model="my-model")("ROMEO:")[0]["generated_text"])

The folder holds config.json, model.safetensors and the tokenizer's files: GPT-2's vocab.json
and merges.txt for tiktoken's gpt2, the tokenizer.json a hub model came with, or, for a char
vocabulary, a tokenizer.json of a BPE without merges (one token per character). Any ckpt.pt that
init_from accepts can be exported, nanoGPT's included; init_from=<folder> loads the export back.
"""

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

import lora
from configurator import UserError, configure, run
from pretrained import CONV1D

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose out_dir/ckpt.pt to export
export_dir = ""  # where the Hugging Face folder goes; empty means out_dir/hf
# -----------------------------------------------------------------------------

# tiktoken builds its "gpt2" encoding from OpenAI's two GPT-2 files, which are also Hugging
# Face's vocab.json and merges.txt: (tiktoken's source, its sha256)
GPT2_TOKENIZER_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def hf_config(config, tokenizer):
    """transformers' GPT2Config (as JSON) of our GPTConfig."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "tie_word_embeddings": True,
            "bos_token_id": tokenizer.eot_token, "eos_token_id": tokenizer.eot_token}


def hf_tensors(model):
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


def main():
    configure(globals())
    folder = export_dir or os.path.join(out_dir, "hf")
    # a LoRA run's adapters are baked into its base model's weights
    model, tokenizer = lora.load_model(os.path.join(out_dir, "ckpt.pt"), merge_adapters=True)
    files = tokenizer_files(tokenizer, model.config.block_size)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config(model.config, tokenizer), f, indent=2)
        # "format": "pt" is the metadata transformers expects of a PyTorch safetensors file
        save_file(hf_tensors(model), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
    except OSError as e:
        raise UserError(f"cannot write the export to {folder}: {e.strerror}") from None
    print(f"wrote {folder}: config.json, model.safetensors" + "".join(f", {n}" for n in files))
    if not files:
        print(f"its tokenizer ({tokenizer.spec()}) has no Hugging Face form: none exported")


if __name__ == "__main__":
    run(main)
