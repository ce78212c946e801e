"""
Export a checkpoint as a Hugging Face model folder, which transformers loads as GPT-2:

$ python export_hf.py --out_dir=out-shakespeare                 # writes out-shakespeare/hf
$ python export_hf.py --out_dir=out-shakespeare --export_dir=my-model

    from transformers import AutoModelForCausalLM, pipeline
    model = AutoModelForCausalLM.from_pretrained("my-model")
    print(pipeline("text-generation", model="my-model")("ROMEO:")[0]["generated_text"])

The folder holds config.json, model.safetensors and the tokenizer's files: GPT-2's vocab.json
and merges.txt for tiktoken's gpt2, the tokenizer.json a hub model came with, or, for a char
vocabulary, a tokenizer.json of a BPE without merges (one token per character). Any run that
init_from accepts can be exported, nanoGPT's included (hf.py writes the folder); a LoRA run's
adapters are baked into its base's weights; init_from=<folder> loads the export back.
"""

import os

import checkpoint
import hf
from configurator import configure, run

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose out_dir/ckpt.pt to export
export_dir = ""  # where the Hugging Face folder goes; empty means out_dir/hf
# -----------------------------------------------------------------------------


def main():
    configure(globals())
    folder = export_dir or os.path.join(out_dir, "hf")
    model, tokenizer = checkpoint.load_model(os.path.join(out_dir, "ckpt.pt"))
    files = hf.export(model, tokenizer, folder)
    print(f"wrote {folder}: config.json, model.safetensors" + "".join(f", {n}" for n in files))
    if not files:
        print(f"its tokenizer ({tokenizer.spec()}) has no Hugging Face form: none exported")


if __name__ == "__main__":
    run(main)
