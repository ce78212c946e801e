"""
Prepare OpenWebText (Skylion007/openwebtext: 8M web pages, ~9B GPT-2 tokens), nanoGPT's corpus
for reproducing GPT-2, as sharded train and val splits in GPT-2's BPE; then train with
config/train_gpt2.py, or measure OpenAI's GPT-2s on it with config/eval_gpt2*.py.

    python data/openwebtext/prepare.py                         # from the hub's parquet files
    python data/openwebtext/prepare.py --input='owt/*.parquet'  # local files (jsonl and txt too)

nanoGPT's own prepare.py no longer runs (today's `datasets` runs no dataset scripts): this one
reads the hub's parquet files through huggingface_hub, one file at a time, and tokenizes them
on every core. Everything else is as data/fineweb/prepare.py (corpus.py): shards of
--shard_tokens ids, the first --val_tokens as val, resumable after a stop.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, wherever we run from

import corpus  # noqa: E402
from configurator import configure, run  # noqa: E402

# -----------------------------------------------------------------------------
name = "Skylion007/openwebtext"  # a dataset on the Hugging Face hub
config = ""  # its config (subset); '' for the default
split = "train"
column = "text"  # the column (jsonl: the field) holding each document's text
input = ""  # local parquet / jsonl / txt files, globs or folders, comma-separated: read instead of the hub
out = ""  # the dataset folder; empty means this folder (then train with --dataset=openwebtext)
tokenizer = "gpt2"  # 'gpt2' (tiktoken), or a model whose tokenizer to use: a folder, hub id, run's out_dir
shard_tokens = 100_000_000  # token ids a shard
val_tokens = 10_000_000  # the val split: the corpus's first this many ids
num_proc = 0  # processes that tokenize; 0 means one per CPU core
overwrite = False  # write into an --out that holds a model, or a dataset not of this repo's preparers
# -----------------------------------------------------------------------------


def main():
    corpus.main(configure(globals(), nullable=()), HERE)


if __name__ == "__main__":
    run(main)
