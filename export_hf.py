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

The export is written beside export_dir and swapped in whole once complete, so a failure part
way (a full disk) leaves the previous export as it was. An export_dir that is, or holds, a
folder the run is made of (its own, its LoRA base's, down a chain of LoRA bases) is refused, and
so is one holding files that are not an export's: the swap would delete them.
"""

import os

from configurator import configure, run  # first: Ctrl-C while the rest loads exits quietly

import checkpoint
import hf
from errors import UserError

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose out_dir/ckpt.pt to export
export_dir = ""  # where the Hugging Face folder goes; empty means out_dir/hf
# -----------------------------------------------------------------------------


def sources(ckpt_path):
    """[(folder, what)] of the folders the run at ckpt_path is made of: its own, and for a LoRA
    run its base's, and so on down a chain of LoRA runs (a base that is a Hugging Face folder
    ends it; a hub id or a GPT-2 size lies in no folder of the user's). Absolute, links resolved."""
    found, source, what = [], ckpt_path, "the run's own folder"
    while True:
        path = checkpoint.run_path(source)
        if path is None:
            if os.path.isdir(source):
                found.append((os.path.realpath(source), what))
            return found
        folder = os.path.realpath(os.path.dirname(path))
        if any(folder == f for f, _ in found):
            return found  # a loop of bases, which load_model reports
        found.append((folder, what))
        run = checkpoint.load_checkpoint(path)  # memory-mapped: only "base" is read
        base = run.get("base") if isinstance(run, dict) else None
        if not isinstance(base, str) or not base:
            return found
        source, what = base, f"the folder of {path}'s LoRA base"


def check_export_dir(folder, ckpt_path):
    """Refuse an export folder that is, or holds, a source of the run: the export replaces the
    folder whole, so it would destroy the model being exported."""
    target = os.path.realpath(folder)
    for source, what in sources(ckpt_path):
        if source == target:
            raise UserError(f"--export_dir={folder} is {what}: the export would replace the model "
                            "it is made from; choose another --export_dir")
        if os.path.commonpath([source, target]) == target:
            raise UserError(f"--export_dir={folder} holds {source} ({what}), which the export "
                            "would delete: choose another --export_dir")


def main():
    configure(globals(), nullable=())
    folder = export_dir or os.path.join(out_dir, "hf")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    check_export_dir(folder, ckpt_path)
    model, tokenizer = checkpoint.load_model(ckpt_path)
    files = hf.export(model, tokenizer, folder)
    print(f"wrote {folder}: config.json, model.safetensors" + "".join(f", {n}" for n in files))
    if not files:
        print(f"its tokenizer ({tokenizer.spec()}) has no Hugging Face form: none exported")


if __name__ == "__main__":
    run(main)
