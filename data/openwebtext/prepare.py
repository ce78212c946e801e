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

from configurator import configure, run  # noqa: E402  (first: Ctrl-C while the rest loads exits quietly)
from nanogpt import corpus  # noqa: E402

# -----------------------------------------------------------------------------
# the hub dataset by default; --input=, --tokenizer=, --shard_tokens=, ...: corpus.preparer_settings
globals().update(corpus.preparer_settings(name="Skylion007/openwebtext", config=""))
# -----------------------------------------------------------------------------


def main():
    corpus.main(configure(globals(), nullable=()), HERE)


if __name__ == "__main__":
    run(main)
