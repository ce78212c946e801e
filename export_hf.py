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
folder the run is made of (its own, the model it was fine-tuned from, its LoRA base's, down a
chain of them) is refused, and so is one holding files that are not an export's: the swap would
delete them. A model there that is not an export of this run's model (a hub download, another
model's export) is replaced only with --overwrite=True.
"""

import json
import os

from configurator import configure, run  # first: Ctrl-C while the rest loads exits quietly

from nanogpt import checkpoint
from nanogpt import hf
from nanogpt.atomic import MODEL_FILES, check_not_foreign
from nanogpt.errors import UserError
from nanogpt.reading import read_json

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose out_dir/ckpt.pt to export
export_dir = ""  # where the Hugging Face folder goes; empty means out_dir/hf
overwrite = False  # replace an export_dir that holds a model other than an export of this run's
# -----------------------------------------------------------------------------


def sources(ckpt_path):
    """[(folder, what)] of the folders the run at ckpt_path is made of: its own, and the folder
    of the model it started from (a LoRA run's base, a full fine-tune's init_from), and so on
    down the chain (a Hugging Face folder ends it; a hub id or a GPT-2 size lies in no folder of
    the user's). Absolute, links resolved."""
    found, source, what = [], ckpt_path, "the run's own folder"
    while True:
        path = checkpoint.run_path(source)
        if path is not None and not os.path.isfile(path):
            return found  # a fine-tune's init_from.pt since moved: nothing there to destroy
        if path is None:
            if os.path.isdir(source):
                found.append((os.path.realpath(source), what))
            return found
        folder = os.path.realpath(os.path.dirname(path))
        if any(folder == f for f, _ in found):
            return found  # a loop of bases, which load_model reports
        found.append((folder, what))
        run = checkpoint.load_checkpoint(path)  # memory-mapped: only "base" and "config" are read
        start, what = started_from(run, path)
        if start is None:
            return found
        source = start


def started_from(run, path):
    """(source, what) of the model the run of checkpoint path started from: a LoRA run's base,
    or a fine-tune's init_from, which a resumed run's checkpoint keeps; (None, None) for a run
    from scratch (or a checkpoint that names none, "resume"). A fine-tune's init_from is a path
    as the run was given it."""
    base = run.get("base") if isinstance(run, dict) else None
    if isinstance(base, str) and base:
        return base, f"the folder of {path}'s LoRA base"
    config = run.get("config") if isinstance(run, dict) else None
    start = config.get("init_from") if isinstance(config, dict) else None
    if isinstance(start, str) and start not in ("", "scratch", "resume"):
        return start, f"the folder of the model {path}'s run was fine-tuned from"
    return None, None


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


def is_export_of(folder, model, tokenizer):
    """Whether folder's config.json is the one exporting model (with tokenizer) writes: an export
    of this run's model, earlier, which a new export may replace."""
    try:
        config = read_json(os.path.join(folder, "config.json"), "")
    except UserError:
        return False
    return config == json.loads(json.dumps(hf.export_config(model.config, tokenizer)))


def main():
    cfg = configure(globals(), nullable=())
    folder = cfg["export_dir"] or os.path.join(cfg["out_dir"], "hf")
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    check_export_dir(folder, ckpt_path)
    model, tokenizer = checkpoint.load_model(ckpt_path)
    # a model there: hf.export refuses every file that is not an export's, a dataset's included
    check_not_foreign(folder, lambda f: is_export_of(f, model, tokenizer), cfg["overwrite"], MODEL_FILES)
    files = hf.export(model, tokenizer, folder)
    print(f"wrote {folder}: config.json, model.safetensors" + "".join(f", {n}" for n in files))
    if not files:
        print(f"its tokenizer ({tokenizer.spec()}) has no Hugging Face form: none exported")


if __name__ == "__main__":
    run(main)
