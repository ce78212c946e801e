"""Pretraining at web scale: the corpus preparers (corpus.py, data/fineweb/prepare.py,
data/openwebtext/prepare.py) on local files in the real datasets' formats, and HellaSwag."""

import contextlib
import hashlib
import http.server
import itertools
import json
import os
import random
import re
import threading
import time
import urllib.parse

import numpy as np
import pytest

from conftest import SHAKESPEARE, ServedRun, assert_user_error, run_cases, run_script, stand_in_text

FINEWEB, OWT = "data/fineweb/prepare.py", "data/openwebtext/prepare.py"
SMALL = ["--shard_tokens=20000", "--val_tokens=15000"]


def paragraphs():
    text = open(SHAKESPEARE, encoding="utf-8").read() if os.path.exists(SHAKESPEARE) else stand_in_text()
    return [p for p in text.split("\n\n") if p.strip()]


def web_documents(n, seed):
    """n documents of a few Shakespeare paragraphs each; one holds the end-of-text token's
    text, as a web page may, and one is empty and one None, as rows of a web corpus may be."""
    rng = random.Random(seed)
    found = paragraphs()
    # (the stand-in text of a bare clone has fewer paragraphs than a document may take)
    docs = ["\n\n".join(rng.sample(found, min(len(found), rng.randint(1, 30)))) for _ in range(n)]
    docs[3] = "a page that writes <|endoftext|> in its text"
    docs[5], docs[7] = "", None
    return docs


def write_fineweb_parquet(path, docs, row_group_size=40):
    """A parquet file with FineWeb-Edu's columns (text among them), in several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = len(docs)
    table = pa.table({"text": docs, "id": [f"<urn:uuid:{i}>" for i in range(n)],
                      "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.com/{i}" for i in range(n)],
                      "file_path": ["s3://commoncrawl/x.warc.gz"] * n, "language": ["en"] * n,
                      "language_score": [0.97] * n, "token_count": [len(d or "") // 4 for d in docs],
                      "score": [3.2] * n, "int_score": [3] * n})
    pq.write_table(table, path, row_group_size=row_group_size)


def write_owt_jsonl(path, docs):
    """OpenWebText's rows, a JSON object a line ({"text": ...})."""
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def reference(docs, enc, val_tokens):
    """(val ids, train ids) as the preparers should write them, computed one document at a
    time: each document's ids, then end-of-text; the first val_tokens ids are val."""
    ids = [i for d in docs if d for i in enc.encode_ordinary(d) + [enc.eot_token]]
    return ids[:val_tokens], ids[val_tokens:]


def read_shards(folder):
    meta = json.loads((folder / "meta.json").read_text())
    return meta, {split: [np.fromfile(folder / name, dtype=meta["dtype"]) for name in meta["shards"][split]]
                  for split in ("val", "train")}


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """Two FineWeb-Edu parquet files and their documents, in order."""
    folder = tmp_path_factory.mktemp("fineweb")
    first, second = web_documents(160, 0), web_documents(120, 1)
    write_fineweb_parquet(folder / "000_00000.parquet", first)
    write_fineweb_parquet(folder / "000_00001.parquet", second)
    return folder, first + second


@pytest.fixture(scope="module")
def prepared(corpus_files, gpt2_tokenizer, tmp_path_factory):
    """The folder the fineweb preparer wrote, uninterrupted, on two processes."""
    folder, _ = corpus_files
    out = tmp_path_factory.mktemp("prepared") / "fineweb"
    result = run_script(FINEWEB, f"--input={folder}", f"--out={out}", "--num_proc=2", *SMALL)
    assert result.returncode == 0, result.stderr
    return out


def test_fineweb_shards_equal_a_one_document_at_a_time_reference(corpus_files, prepared, gpt2_tokenizer):
    _, docs = corpus_files
    meta, shards = read_shards(prepared)
    val, train = reference(docs, gpt2_tokenizer.enc, 15000)
    assert np.concatenate(shards["val"]).tolist() == val
    assert np.concatenate(shards["train"]).tolist() == train
    assert all(len(s) == 20000 for s in shards["train"][:-1]) and 0 < len(shards["train"][-1]) <= 20000
    assert (meta["train_tokens"], meta["val_tokens"], meta["dtype"]) == (len(train), len(val), "uint16")
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"}
    assert not (prepared / "progress.json").exists()


def test_openwebtext_on_jsonl_in_one_process(tmp_path, gpt2_tokenizer):
    docs = web_documents(60, 2)
    write_owt_jsonl(tmp_path / "owt.jsonl", docs)
    out = tmp_path / "owt"
    result = run_script(OWT, f"--input={tmp_path / 'owt.jsonl'}", f"--out={out}", "--num_proc=1", *SMALL)
    assert result.returncode == 0, result.stderr
    _, shards = read_shards(out)
    val, train = reference(docs, gpt2_tokenizer.enc, 15000)
    assert np.concatenate(shards["val"]).tolist() == val and np.concatenate(shards["train"]).tolist() == train
    again = run_script(OWT, f"--input={tmp_path / 'owt.jsonl'}", f"--out={out}", *SMALL)
    assert again.returncode == 0 and "prepared already" in again.stdout


def test_a_killed_preparation_resumes_to_the_same_bytes(corpus_files, prepared, tmp_path):
    folder, _ = corpus_files
    out = tmp_path / "fineweb"
    args = [FINEWEB, f"--input={folder}", f"--out={out}", "--num_proc=2", *SMALL]
    run = ServedRun(args)
    while not (out / "progress.json").exists() and run.server.proc.poll() is None:
        time.sleep(0.002)
    run.kill()
    run.communicate()
    assert not (out / "meta.json").exists(), "the run ended before it was killed"
    other = run_script(FINEWEB, *args[1:], "--shard_tokens=30000")
    assert_user_error(other, "other settings", "shard_tokens")
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(prepared))
    for name in os.listdir(prepared):
        if name.endswith(".bin"):
            assert (out / name).read_bytes() == (prepared / name).read_bytes(), name


def test_the_reader_stays_a_few_batches_ahead(gpt2_tokenizer):
    from nanogpt import corpus
    read = itertools.count()
    endless = ((0, [next(read)], ["word " * 1000], 0.0) for _ in itertools.repeat(None))
    work = corpus.tokenized(endless, gpt2_tokenizer.spec(), np.uint16, processes=2)
    per_batch = corpus.BATCH_CHARS // 5000 + 1
    for _ in zip(range(6), work):
        pass
    work.close()
    assert next(read) <= (6 + 2 * 2 + 1) * per_batch  # the yielded batches and those in flight


def test_uint32_ids_for_a_vocabulary_over_65536(tmp_path):
    from nanogpt import corpus
    from tokenizers import Tokenizer, models, pre_tokenizers
    from nanogpt.tokenizer import HFTokenizer
    words = ["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    docs = [" ".join(f"w{(i * 7919 + j) % 70_000}" for j in range(50)) for i in range(40)]
    write_owt_jsonl(tmp_path / "big.jsonl", docs)
    files = corpus.local_files([str(tmp_path / "big.jsonl")])
    meta = corpus.prepare(files, "text", str(tmp_path / "out"), HFTokenizer(tok.to_str()), 300, 100, 1)
    assert meta["dtype"] == "uint32"
    ids = np.concatenate([np.fromfile(tmp_path / "out" / n, dtype=np.uint32)
                          for split in ("val", "train") for n in meta["shards"][split]])
    assert ids.tolist() == [i for d in docs for i in tok.encode(d).ids + [0]]
    assert ids.max() > 65535


# -----------------------------------------------------------------------------
# Bad input: one line, nothing written

DISK_FULL = """
import errno, os, sys, runpy
def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.fsync = full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@contextlib.contextmanager
def fake_hub(datasets):
    """A hub at HF_ENDPOINT (yielded) that serves datasets {repo: {revision: {path: bytes}}} as
    huggingface.co does: a revision's files and their sizes (the API), the files themselves
    (downloads, the revision given as its commit), and a 404 naming what it lacks."""
    commits = {repo: {hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest(): rev for rev in revisions}
               for repo, revisions in datasets.items()}

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self, body=True):
            path = urllib.parse.urlsplit(self.path).path
            listing = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            download = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            repo = (listing or download).group(1) if listing or download else None
            if repo not in datasets:
                return self.answer(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            if listing:
                revision = urllib.parse.unquote(listing.group(2) or "main")
                commit = next((c for c, r in commits[repo].items() if r == revision), None)
            else:
                commit = download.group(2)
                revision = commits[repo].get(commit)
            files = datasets[repo].get(revision)
            if files is None:
                return self.answer(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
            if listing:
                info = {"id": repo, "sha": commit, "cardData": {},
                        "siblings": [{"rfilename": name, "size": len(data)} for name, data in files.items()]}
                return self.answer(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            data = files.get(urllib.parse.unquote(download.group(3)))
            if data is None:
                return self.answer(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            self.answer(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)

        def do_HEAD(self):
            self.do_GET(body=False)

        def answer(self, status, data, headers, body=True):
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_bad_corpora_are_one_line_errors_with_nothing_written(corpus_files, tmp_path, gpt2_tokenizer):
    folder, _ = corpus_files
    out = tmp_path / "out"
    write_owt_jsonl(tmp_path / "owt.jsonl", ["one", "two"])
    (tmp_path / "notes.md").write_text("# not a corpus")
    cases = [
        (["--column=content", f"--input={folder}"], ["has no column 'content'", "text, id, dump"]),
        (["--column=body", f"--input={tmp_path / 'owt.jsonl'}"], ["line 1 has no field 'body'"]),
        ([f"--input={tmp_path / 'missing*.parquet'}"], ["matches no file"]),
        ([f"--input={tmp_path / 'notes.md'}"], ["not a corpus file"]),
        (["--shard_tokens=0"], ["shard_tokens must be at least 1"]),
    ]
    results = run_cases([{"script": FINEWEB, "args": [*args, f"--out={out}"], "watch": [out]}
                         for args, _ in cases])
    for (result, changed), (_, words) in zip(results, cases):
        assert_user_error(result, *words)
        assert not changed
    full = run_script("-c", DISK_FULL, FINEWEB, f"--input={folder}", f"--out={out}", *SMALL)
    # the disk fills while the progress bar runs: the bar's line, then the error's
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert "No space left on device" in full.stderr.splitlines()[-1] and "make room" in full.stderr
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_the_hub_unreachable_or_without_the_dataset(tmp_path):
    offline = run_script(FINEWEB, f"--out={tmp_path / 'out'}", env={"HF_HUB_OFFLINE": "1"}, fresh=True)
    assert_user_error(offline, "cannot reach", "--input=")
    with fake_hub({"someone/scripts-only": {"main": {"README.md": b"# a dataset of a loading script"}}}) as endpoint:
        env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        missing = run_script(FINEWEB, "--name=nobody/no-such-corpus", f"--out={tmp_path / 'out'}", env=env, fresh=True)
        no_parquet = run_script(OWT, "--name=someone/scripts-only", f"--out={tmp_path / 'out'}", env=env, fresh=True)
    assert_user_error(missing, "no dataset 'nobody/no-such-corpus'", "check --name")
    # neither main nor the hub's parquet copy (which it has not made) holds parquet files
    assert_user_error(no_parquet, "has no parquet files", "refs/convert/parquet", "check --config")
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_parquet_on_main_is_read_from_the_hubs_parquet_copy(corpus_files, prepared, tmp_path):
    # OpenWebText's main holds a loading script; the hub's parquet copy of its only config
    # (refs/convert/parquet) holds the documents: here those the --input run prepared
    folder, _ = corpus_files
    owt = {"main": {"README.md": b"# OpenWebText", "openwebtext.py": b"import datasets"},
           "refs/convert/parquet": {f"plain_text/train/{i:04d}.parquet": path.read_bytes()
                                    for i, path in enumerate(sorted(folder.glob("*.parquet")))}}
    out = tmp_path / "owt"
    with fake_hub({"Skylion007/openwebtext": owt}) as endpoint:
        result = run_script(OWT, f"--out={out}", "--num_proc=2", *SMALL, fresh=True,
                            env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
                                 "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert result.returncode == 0, result.stderr
    assert "revision refs/convert/parquet" in result.stdout
    shards = sorted(p.name for p in prepared.glob("*.bin"))
    assert sorted(p.name for p in out.glob("*.bin")) == shards
    for name in shards:
        assert (out / name).read_bytes() == (prepared / name).read_bytes(), name


# -----------------------------------------------------------------------------
# HellaSwag

def hellaswag_examples(n, seed):
    """n examples in the validation file's format (its fields, four endings, a label)."""
    rng = random.Random(seed)
    lines = [line for p in paragraphs() for line in p.splitlines() if ":" not in line and len(line) > 20]
    return [{"ind": i, "activity_label": "Reading", "ctx_a": lines[2 * i], "ctx_b": "then",
             "ctx": lines[2 * i] + " then", "split": "val", "split_type": "indomain",
             "label": rng.randrange(4), "endings": [rng.choice(lines) for _ in range(4)],
             "source_id": f"activitynet~v_{i}"} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT2LMHeadModel of transformers' (random weights, the tiny BPE), saved as a model
    folder: (folder, the transformers model, its tokenizers.Tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from conftest import save_tiny_bpe, tiny_bpe
    torch.manual_seed(0)
    tok = tiny_bpe()
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256,
                                    vocab_size=tok.get_vocab_size())).eval()
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf.save_pretrained(folder)
    save_tiny_bpe(folder)
    return str(folder), hf, tok


def transformers_losses(hf, tok, example):
    """(total, mean) loss of each ending, each row scored alone by transformers."""
    import torch
    context = tok.encode(example["ctx"], add_special_tokens=False).ids
    out = []
    for ending in example["endings"]:
        ids = context + tok.encode(" " + ending, add_special_tokens=False).ids
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        losses = [-logprobs[t - 1, ids[t]].item() for t in range(len(context), len(ids))]
        out.append((sum(losses), sum(losses) / len(losses)))  # floats: compared as float64
    return out


def test_hellaswag_losses_equal_transformers(tiny_gpt2):
    import torch
    import hellaswag
    from nanogpt.checkpoint import load_model
    folder, hf, tok = tiny_gpt2
    model, tokenizer = load_model(folder)
    model.eval()
    examples = hellaswag_examples(5, 0)
    rows = [row for e in examples for row in hellaswag.render(e, tokenizer, model.config.block_size)]
    total, count = hellaswag.ending_losses(model, rows, "cpu")  # 20 rows in one padded batch
    expected = torch.tensor([s for e in examples for s in transformers_losses(hf, tok, e)], dtype=torch.float64)
    assert torch.allclose(total.double(), expected[:, 0], atol=1e-4, rtol=1e-5)
    assert torch.allclose((total / count).double(), expected[:, 1], atol=1e-5, rtol=1e-5)


def test_hellaswag_accuracy_of_a_file_in_the_real_format(tiny_gpt2, tmp_path):
    folder, hf, tok = tiny_gpt2
    examples = hellaswag_examples(12, 1)
    scores = [transformers_losses(hf, tok, e) for e in examples]
    for e, s in zip(examples[:6], scores):  # half of them answered as the model would: not chance
        e["label"] = min(range(4), key=lambda i: s[i][1])
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    result = run_script("hellaswag.py", f"--model={folder}", f"--input={path}", "--device=cpu",
                        "--batch_size=5")
    assert result.returncode == 0, result.stderr
    acc = sum(min(range(4), key=lambda i: s[i][0]) == e["label"] for e, s in zip(examples, scores)) / 12
    acc_norm = sum(min(range(4), key=lambda i: s[i][1]) == e["label"] for e, s in zip(examples, scores)) / 12
    assert f"acc {acc:.4f}, acc_norm {acc_norm:.4f} (12 examples" in result.stdout, result.stdout
    assert acc_norm >= 0.5


def test_hellaswag_offline_or_damaged_cache_is_refused(tmp_path, monkeypatch):
    import requests
    import hellaswag
    from nanogpt.errors import UserError

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(UserError, match="cannot download HellaSwag .* give --input=FILE"):
        hellaswag.load_examples(cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(hellaswag_examples(1, 0)[0]) + "\n")
    with pytest.raises(UserError, match="holds 1 examples, not 10,042: it is damaged; delete it"):
        hellaswag.load_examples(cache_dir=str(tmp_path))


# -----------------------------------------------------------------------------
# The recipes

@pytest.mark.parametrize("name, dataset, tokens", [("train_gpt2", "openwebtext", 491_520),
                                                    ("train_gpt2_fineweb", "fineweb", 524_288)])
def test_the_gpt2_recipes_apply_to_train(name, dataset, tokens):
    import train
    from configurator import configure
    cfg = configure(dict(vars(train)), [os.path.join("config", f"{name}.py")])
    train.check_config(train.Config(**cfg))
    assert cfg["dataset"] == dataset
    assert cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"] == tokens  # on 8 GPUs
    assert cfg["gradient_accumulation_steps"] % 8 == 0


# -----------------------------------------------------------------------------
# Sharded datasets in training

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, gpt2_tokenizer):
    """(sharded dataset folder, the same ids as a one-file dataset's folder): shards of 3,000
    ids, so that windows span shard boundaries."""
    from nanogpt.dataset import write_dataset
    root = tmp_path_factory.mktemp("shards")
    write_owt_jsonl(root / "docs.jsonl", web_documents(40, 3))
    result = run_script(OWT, f"--input={root / 'docs.jsonl'}", f"--out={root / 'sharded'}",
                        "--shard_tokens=3000", "--val_tokens=7000", "--num_proc=1")
    assert result.returncode == 0, result.stderr
    meta, shards = read_shards(root / "sharded")
    assert len(shards["train"]) > 3 and len(shards["val"]) == 3
    write_dataset(str(root / "whole"), gpt2_tokenizer, np.concatenate(shards["train"]),
                  np.concatenate(shards["val"]), "the shards end to end")
    return str(root / "sharded"), str(root / "whole")


def test_sharded_batches_are_those_of_the_one_file(small_shards):
    import torch
    from nanogpt.dataset import get_batch, open_dataset
    sharded, _ = open_dataset(small_shards[0], 64, 50257)
    whole, _ = open_dataset(small_shards[1], 64, 50257)
    for split in ("train", "val"):
        assert len(sharded[split]) == len(whole[split])
        a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for _ in range(20):
            x, y = get_batch(sharded[split], 64, 16, a, slice(4, 12))
            x1, y1 = get_batch(whole[split], 64, 16, b, slice(4, 12))
            assert torch.equal(x, x1) and torch.equal(y, y1)
        assert np.array_equal(np.asarray(sharded[split]), whole[split])  # to_device's copy


# each process of a torchrun draws its rows of the global batches from the sharded dataset, as
# train.py does; rank 0 checks that they are distinct and together the one-process batches.
# Then they score HellaSwag, each its share
DRAW_UNDER_TORCHRUN = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from nanogpt.dataset import get_batch, open_dataset
import hellaswag
from nanogpt import distributed
from nanogpt.checkpoint import load_model
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
splits, _ = open_dataset(sys.argv[1], 32)
mine, alone = torch.Generator().manual_seed(1337), torch.Generator().manual_seed(1337)
for _ in range(5):
    x, _ = get_batch(splits["train"], 32, 4 * world, mine, slice(rank * 4, (rank + 1) * 4))
    every = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(every, x)
    whole, _ = get_batch(splits["train"], 32, 4 * world, alone)
    assert torch.equal(torch.cat(every), whole)
    assert not any(torch.equal(every[0][i], every[1][j]) for i in range(4) for j in range(4))
model, tokenizer = load_model(sys.argv[3])
scores = hellaswag.evaluate(model, tokenizer, hellaswag.load_examples(sys.argv[4]), "cpu", 2,
                            dist=distributed.Distributed("ddp", rank, rank, world))
dist.barrier()
if rank == 0:
    print("distinct", scores)
dist.destroy_process_group()
"""


def test_each_process_draws_its_own_rows_and_scores_its_share(small_shards, tiny_gpt2, tmp_path):
    import hellaswag
    from nanogpt.checkpoint import load_model
    from conftest import REPO, torchrun
    script, examples = tmp_path / "draw.py", tmp_path / "hellaswag.jsonl"
    script.write_text(DRAW_UNDER_TORCHRUN)
    examples.write_text("".join(json.dumps(e) + "\n" for e in hellaswag_examples(7, 2)))
    result = torchrun(str(script), small_shards[0], REPO, tiny_gpt2[0], str(examples), processes=2, timeout=300)
    assert result.returncode == 0 and "distinct" in result.stdout, result.stderr[-2000:]
    model, tokenizer = load_model(tiny_gpt2[0])
    alone = hellaswag.evaluate(model, tokenizer, hellaswag.load_examples(str(examples)), "cpu", 2)
    assert alone["examples"] == 7 and f"distinct {alone}" in result.stdout  # 4 and 3 examples: 2 passes each


def test_a_sharded_dataset_missing_a_shard_or_unfinished_is_refused(small_shards, tmp_path):
    import shutil
    from nanogpt.dataset import open_dataset
    from nanogpt.errors import UserError
    folder = tmp_path / "copy"
    shutil.copytree(small_shards[0], folder)
    (folder / "train_000002.bin").unlink()
    with pytest.raises(UserError, match="lacks .*train_000002.bin, which its meta.json lists"):
        open_dataset(str(folder), 32)
    (folder / "meta.json").rename(folder / "progress.json")
    with pytest.raises(UserError, match="still being prepared .* run its prepare command again"):
        open_dataset(str(folder), 32)


def test_a_hub_config_names_its_files():
    from nanogpt import corpus
    # FineWeb-Edu's dataset card, as far as its configs go, and a few of its files
    card = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*/*"}]},
                        {"config_name": "sample-10BT", "data_files": [{"split": "train", "path": "sample/10BT/*"}]},
                        {"config_name": "CC-MAIN-2024-10", "data_files": [{"split": "train", "path": "data/CC-MAIN-2024-10/*"}]}]}
    files = ["sample/10BT/000_00000.parquet", "sample/10BT/013_00000.parquet", "sample/100BT/000_00000.parquet",
             "data/CC-MAIN-2024-10/000_00000.parquet"]
    wanted = corpus.data_files(card, "sample-10BT", "train")
    assert [f for f in files if any(corpus.matches(f, w) for w in wanted)] == files[:2]
    # a dataset without configs in its card (OpenWebText's parquet conversion): files named by split
    owt = ["plain_text/train-00000-of-00080.parquet", "plain_text/train-00079-of-00080.parquet"]
    assert all(corpus.matches(f, w) for f in owt for w in corpus.data_files(None, "", "train"))
    assert not any(corpus.matches(f, w) for f in owt for w in corpus.data_files(None, "", "test"))


def test_a_folder_holding_a_model_is_not_written_into(corpus_files, tmp_path):
    folder, _ = corpus_files
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    [(result, changed)] = run_cases([{"script": FINEWEB, "args": [f"--input={folder}", f"--out={model}", *SMALL],
                                      "watch": [model]}])
    assert_user_error(result, "holds a model or dataset", "--overwrite=True")
    assert not changed


def test_training_on_shards_equals_training_on_the_one_file_and_scores_hellaswag(small_shards, tmp_path):
    import hellaswag
    from nanogpt.checkpoint import load_model
    from conftest import TINY, eval_losses, train_losses
    examples = tmp_path / "hellaswag.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in hellaswag_examples(6, 3)))
    runs = [run_script("train.py", *TINY, f"--dataset={folder}", f"--out_dir={tmp_path / str(i)}",
                       "--max_iters=6", "--eval_interval=3", "--log_interval=1", "--hellaswag_interval=3",
                       f"--hellaswag_input={examples}") for i, folder in enumerate(small_shards)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert len(train_losses(runs[0].stdout)) == 6 and len(eval_losses(runs[0].stdout)) == 3
    assert train_losses(runs[0].stdout) == train_losses(runs[1].stdout)
    assert eval_losses(runs[0].stdout) == eval_losses(runs[1].stdout)
    logged = [[r for r in map(json.loads, (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines())
               if "hellaswag_acc" in r] for i in range(2)]
    assert [r["iter"] for r in logged[0]] == [0, 3, 6] and logged[0] == logged[1]
    model, tokenizer = load_model(str(tmp_path / "0"))  # the checkpoint of iteration 6
    again = hellaswag.evaluate(model, tokenizer, hellaswag.load_examples(str(examples)), "cpu")
    assert (logged[0][-1]["hellaswag_acc"], logged[0][-1]["hellaswag_acc_norm"]) == (again["acc"], again["acc_norm"])
    assert f"hellaswag at step 6: acc {again['acc']:.4f}, acc_norm {again['acc_norm']:.4f}" in runs[0].stdout
