"""
Prepare FineWeb-Edu (HuggingFaceFW/fineweb-edu, the sample-10BT config: ~10B GPT-2 tokens of
educational web pages) as sharded train and val splits in GPT-2's BPE, the corpus of llm.c's
and build-nanogpt's GPT-2 (124M) runs; then train with config/train_gpt2_fineweb.py.

    python data/fineweb/prepare.py                                  # the hub's sample-10BT
    python data/fineweb/prepare.py --config=sample-100BT            # or any config,
    python data/fineweb/prepare.py --name=HuggingFaceFW/fineweb --config=sample-10BT   # any text dataset
    python data/fineweb/prepare.py --input='corpus/*.parquet' --out=data/mycorpus      # local files

The parquet files are downloaded one at a time through huggingface_hub (its cache, HF_ENDPOINT,
HF_HUB_OFFLINE apply); --input takes local parquet, jsonl (a JSON object a line) or txt files (a
document a file), globs and folders, comma-separated, for offline and private corpora.
Tokenized on every core (--num_proc), written in shards of --shard_tokens ids, the first
--val_tokens ids as val; stopped, the same command goes on from the last whole
shard. How it works: corpus.py.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, wherever we run from

from configurator import configure, run  # noqa: E402  (first: Ctrl-C while the rest loads exits quietly)
from nanogpt import corpus  # noqa: E402

# -----------------------------------------------------------------------------
# the hub dataset by default; --input=, --tokenizer=, --shard_tokens=, ...: corpus.preparer_settings
globals().update(corpus.preparer_settings(name="HuggingFaceFW/fineweb-edu", config="sample-10BT"))
# -----------------------------------------------------------------------------


def main():
    corpus.main(configure(globals(), nullable=()), HERE)


if __name__ == "__main__":
    run(main)
