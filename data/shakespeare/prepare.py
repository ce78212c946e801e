"""
Prepare the tiny Shakespeare dataset in GPT-2's byte-pair encoding (tiktoken's "gpt2"), to
fine-tune GPT-2 on it (config/finetune_shakespeare.py) or to evaluate GPT-2 (config/eval_gpt2*.py).

    python data/shakespeare/prepare.py                          # download it
    python data/shakespeare/prepare.py --input=path/to/text.txt  # or use a local file

The text (with the same fallback when there is no network) and the 90/10 split are those of
data/shakespeare_char/prepare.py, whose functions do the work: train.bin and val.bin hold GPT-2
token ids as uint16, meta.json the tokenizer spec.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, wherever we run from

from configurator import configure, run  # noqa: E402
from data.shakespeare_char.prepare import fetch_text, prepare_text  # noqa: E402
from nanogpt.dataset import check_dataset_folder  # noqa: E402
from nanogpt.tokenizer import TiktokenTokenizer  # noqa: E402

# -----------------------------------------------------------------------------
input = ""    # a local text file to use; empty means download tinyshakespeare
out_dir = ""  # where train.bin, val.bin and meta.json go; empty means this folder
overwrite = False  # write into an out_dir that holds a model, or a dataset not of this repo's preparers
# -----------------------------------------------------------------------------


def main():
    cfg = configure(globals(), nullable=())
    folder = cfg["out_dir"] or HERE
    check_dataset_folder(folder, cfg["overwrite"])
    text, source = fetch_text(cfg["input"], cache_dir=HERE)
    meta = prepare_text(text, folder, source, tokenizer=TiktokenTokenizer("gpt2"),
                        overwrite=cfg["overwrite"])
    print(f"source: {source} ({len(text):,} characters)")
    print(f"train has {meta['train_tokens']:,} GPT-2 tokens, val has {meta['val_tokens']:,}")


if __name__ == "__main__":
    run(main)
