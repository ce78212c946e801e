"""
Big text corpora into sharded datasets: streamed, tokenized on every core, resumable.
data/fineweb/prepare.py and data/openwebtext/prepare.py are this module with their defaults.

    files = hub_files("HuggingFaceFW/fineweb-edu", "sample-10BT")   # or local_files(["a/*.parquet"])
    prepare(files, "text", "data/fineweb", tokenizer, shard_tokens=10**8, val_tokens=10**7)

The documents are read one file at a time (parquet, jsonl or txt), a batch of rows at a time,
and tokenized by a pool of processes that is never more than a few batches ahead of the
writer, so memory holds a shard and those batches, never the corpus. Each document becomes its
ids followed by the end-of-text token. The first val_tokens ids are the val split (as llm.c's
first shard is), the rest is train. A split is cut into shards of shard_tokens ids (the last one
shorter), written atomically as

    val_000000.bin, train_000000.bin, train_000001.bin, ...   uint16 ids (uint32 for vocabularies over 65,536)
    progress.json   while preparing: the settings, and where in the documents the next shard starts
    meta.json       at the end: dataset.py's fields, the shards of each split and the settings

After a crash or Ctrl-C the same command starts again after the last whole shard: the ids of a
document do not depend on how the documents were batched or on how many processes encoded
them, so the shards are byte for byte those of a run that was never stopped.
"""

import collections
import glob
import hashlib
import json
import os
import signal
from contextlib import closing
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from nanogpt.atomic import atomic_write
from nanogpt.dataset import check_dataset_folder, json_bytes, shard_name, token_dtype, write_meta, write_shard
from nanogpt.errors import UserError
from nanogpt.reading import check_regular, open_regular, parse_json, read_bytes, read_json

BATCH_CHARS = 1 << 20  # characters of text a worker encodes at once: worth a trip to another process
ROWS = 1024  # parquet rows read at once
KINDS = (".parquet", ".jsonl", ".txt")

# a file of the corpus: its name (shown, and part of the settings a resume checks), its size in
# bytes (the progress bar's measure), and fetch() -> the path of a local copy
Source = collections.namedtuple("Source", "name size fetch")


# -----------------------------------------------------------------------------
# Where the documents are: local files, or a dataset on the Hugging Face hub

def local_files(patterns):
    """The Sources of files, globs and folders (all parquet / jsonl / txt files under one),
    each pattern's files in sorted order."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(p for kind in KINDS for p in glob.glob(os.path.join(glob.escape(pattern), "**", "*" + kind), recursive=True))
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"--input={pattern} matches no file")
        for path in matches:
            if not path.endswith(KINDS):
                raise UserError(f"{path} is not a corpus file: give .parquet, .jsonl (a JSON object a "
                                "line) or .txt (a document a file) files")
            files.append(Source(os.path.abspath(path), check_regular(path), lambda p=path: p))
    return files


def hub_files(name, config="", split="train"):
    """The Sources of the parquet files of a hub dataset's config and split, downloaded one by
    one (through huggingface_hub's cache) when the preparation reaches them. They are those of
    the main revision, or, where main has none (a dataset of a loading script, as OpenWebText
    is), those of the parquet copy the hub makes of the datasets it can read (PARQUET_BRANCH)."""
    info = hub_listing(name)
    wanted = data_files(info.card_data, config, split)
    names = parquet_files(info, wanted)
    revision = "main"
    if not names:
        converted = hub_listing(name, PARQUET_BRANCH)
        patterns = converted_files(converted, config, split)
        names = parquet_files(converted, patterns)
        if not names:
            raise UserError(f"dataset {name} has no parquet files for config {config!r}, split {split!r} "
                            f"(looked for {', '.join(wanted)} in main, {', '.join(patterns)} in "
                            f"{PARQUET_BRANCH}): check --config and --split")
        info, revision = converted, PARQUET_BRANCH
    partial = " (partial: the hub converted only the start of the split)" if "/partial-" in names[0] else ""
    print(f"{name}: the parquet files of revision {revision}{partial}")
    sizes = {f.rfilename: f.size or 0 for f in info.siblings}

    def fetch(filename):
        from huggingface_hub import hf_hub_download
        try:
            return hf_hub_download(name, filename, repo_type="dataset", revision=info.sha)
        except OSError as e:
            raise UserError(f"cannot download {filename} of {name} ({type(e).__name__}: "
                            f"{str(e)[:100]}); run again to go on from the last whole shard") from None
    return [Source(f"{name}/{n}", sizes[n], lambda n=n: fetch(n)) for n in names]


# the hub's parquet copy of a dataset (its dataset viewer's): <config>/<split>/0000.parquet, ...,
# or <config>/partial-<split>/... where it converted only the start of a big split
PARQUET_BRANCH = "refs/convert/parquet"


def hub_listing(name, revision=None):
    """The hub's DatasetInfo of a dataset at a revision (its files and their sizes); None for a
    revision it does not have."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    where = os.environ.get("HF_ENDPOINT", "the Hugging Face hub")
    try:
        return HfApi().dataset_info(name, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"no dataset {name!r} on {where}: check --name (owner/name)") from None
    except RevisionNotFoundError:
        return None
    except OSError as e:  # no network, HF_HUB_OFFLINE (requests' errors are OSErrors too)
        raise UserError(f"cannot reach {where} to list {name} ({type(e).__name__}): offline, copy its "
                        "parquet files here and give them with --input=FILES (parquet, jsonl or txt)") from None


def parquet_files(info, patterns):
    """The parquet files of a DatasetInfo (or None) that match any of patterns, in sorted order."""
    names = [f.rfilename for f in info.siblings or ()] if info else []
    return sorted(n for n in names if n.endswith(".parquet") and any(matches(n, p) for p in patterns))


def converted_files(info, config, split):
    """The path patterns of a config's split in the hub's parquet copy (PARQUET_BRANCH); the
    config '' is the one named "default", or the copy's only config (OpenWebText's plain_text)."""
    configs = {f.rfilename.split("/")[0] for f in info.siblings or () if "/" in f.rfilename} if info else set()
    if not config:
        config = configs.pop() if len(configs) == 1 else "default"
    return [f"{config}/{split}/*.parquet", f"{config}/partial-{split}/*.parquet"]


def data_files(card, config, split):
    """The path patterns of a config's split: its data_files in the dataset card's `configs`
    (FineWeb-Edu's sample-10BT: sample/10BT/*), else the files under a folder named after it."""
    for entry in (card or {}).get("configs") or ():
        if entry.get("config_name") == (config or "default"):
            files = entry.get("data_files") or []
            if isinstance(files, (str, dict)):
                files = [files]
            paths = [f for f in files if isinstance(f, str)]  # a bare pattern is the train split
            paths += [p for f in files if isinstance(f, dict) and f.get("split") == split
                      for p in ([f["path"]] if isinstance(f["path"], str) else f["path"])]
            return paths
    return [f"{config}/*{split}*" if config else f"*{split}*"]


def matches(path, pattern):
    """Whether a hub file's path matches a data_files pattern (`*` within a folder, `**` across)."""
    import fnmatch
    return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.rstrip("*") + "**")


# -----------------------------------------------------------------------------
# Reading documents

def read_documents(path, column, skip=0):
    """The documents of a local file from row `skip` on, a chunk of rows at a time:
    (their row numbers, their texts, the fraction of the file read). A parquet file's or a
    jsonl file's rows (the column's text; rows without text are passed over), or a whole txt
    file, which is one document. A parquet file's texts stay an Arrow array, which the workers
    turn into strings: the main process never decodes the corpus."""
    if path.endswith(".parquet"):
        yield from read_parquet(path, column, skip)
    elif path.endswith(".txt"):
        text = read_bytes(path, limit=None).decode("utf-8", errors="replace") if skip == 0 else ""
        if text:
            yield np.zeros(1, dtype=np.int64), [text], 1.0
    else:
        yield from read_jsonl(path, column, skip)


def read_parquet(path, column, skip):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and kin: not a parquet file
        raise UserError(f"{path} is not a readable parquet file ({str(e)[:100]})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise UserError(f"{path} has no column {column!r} (its columns: {', '.join(names)}): "
                        "give the text's with --column=")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {column!r} holds {kind}, not text: give the text's with --column=")
    rows, row = pf.metadata.num_rows, 0
    for group in range(pf.num_row_groups):
        in_group = pf.metadata.row_group(group).num_rows
        if row + in_group <= skip:  # a resume passes over whole row groups unread
            row += in_group
            continue
        for batch in pf.iter_batches(ROWS, row_groups=[group], columns=[column]):
            texts, numbers = batch.column(0), np.arange(row, row + batch.num_rows)
            keep = (numbers >= skip) & (pc.fill_null(pc.binary_length(texts), 0).to_numpy() > 0)
            if keep.any():
                yield numbers[keep], texts.filter(pa.array(keep)), (row + batch.num_rows) / rows
            row += batch.num_rows


def read_jsonl(path, column, skip):
    numbers, texts = [], []
    with open_regular(path) as f:
        size = max(os.fstat(f.fileno()).st_size, 1)
        for row, line in enumerate(f):
            if row < skip or not line.strip():
                continue
            record = parse_json(line, f"{path}, line {row + 1}")
            if not isinstance(record, dict) or column not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{path}, line {row + 1} has no field {column!r} (it has: {keys}): "
                                "give the text's with --column=")
            if record[column]:
                numbers.append(row)
                texts.append(str(record[column]))
            if len(texts) == ROWS:
                yield np.array(numbers), texts, f.tell() / size
                numbers, texts = [], []
    if texts:
        yield np.array(numbers), texts, 1.0


def documents(files, column, start):
    """(file index, row numbers, texts, fraction of the corpus read) of every chunk of
    documents from start = (file index, row) on; the fraction is measured in the files' bytes."""
    total = sum(f.size for f in files) or 1
    done = sum(f.size for f in files[:start[0]])
    for index in range(start[0], len(files)):
        skip = start[1] if index == start[0] else 0
        for numbers, texts, fraction in read_documents(files[index].fetch(), column, skip):
            yield index, numbers, texts, (done + fraction * files[index].size) / total
        done += files[index].size


# -----------------------------------------------------------------------------
# Tokenizing on every core

_encoder = None  # this worker's (encode, start ids, end ids, dtype): set once by start_worker


def start_worker(spec, dtype):
    """Set up a pool process to encode documents (Ctrl-C is the main process's to handle)."""
    global _encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _encoder = document_encoder(spec, dtype)


def document_encoder(spec, dtype):
    """(encode: text -> ids array, ids before a document, ids after it, dtype) for the tokenizer
    of spec. tiktoken encodes a document's text as text (an "<|endoftext|>" written in a web
    page is not the end-of-text token), straight into an array."""
    from nanogpt.tokenizer import TiktokenTokenizer, from_spec
    tok = from_spec(spec)
    if isinstance(tok, TiktokenTokenizer):
        encode = lambda text: tok.enc.encode_to_numpy(text, disallowed_special=())  # noqa: E731
    else:
        encode = lambda text: np.asarray(tok.encode(text), dtype=np.int64)  # noqa: E731
    # a tokenizer that starts texts with a token of its own (BERT's [CLS], Llama's <s>) starts
    # each document with it, as data/text/prepare.py does
    before = np.array([] if tok.bos_token is None else [tok.bos_token], dtype=np.int64)
    return encode, before, np.array([tok.eot_token], dtype=np.int64), np.dtype(dtype)


def encode_batch(chunks, encoder=None):
    """(ids of the documents one after another, each one's length) in the encoder's dtype;
    chunks: lists of texts, or Arrow arrays of them."""
    encode, before, after, dtype = encoder or _encoder
    texts = (text for chunk in chunks for text in (chunk.to_pylist() if hasattr(chunk, "to_pylist") else chunk))
    pieces = [piece for text in texts for piece in (before, encode(text), after)]
    lengths = np.array([len(ids) + len(before) + len(after) for ids in pieces[1::3]], dtype=np.int64)
    return np.concatenate(pieces).astype(dtype, copy=False), lengths


def batches(chunks, chars=BATCH_CHARS):
    """The chunks of documents in batches of about `chars` characters (UTF-8 bytes of an Arrow
    array): (each document's (file index, row), the chunks' texts, fraction read)."""
    import pyarrow.compute as pc
    positions, texts, size = [], [], 0
    for index, numbers, chunk, fraction in chunks:
        positions += [(index, int(n)) for n in numbers]
        texts.append(chunk)
        size += pc.sum(pc.binary_length(chunk)).as_py() if hasattr(chunk, "to_pylist") else sum(map(len, chunk))
        if size >= chars:
            yield positions, texts, fraction
            positions, texts, size = [], [], 0
    if texts:
        yield positions, texts, fraction


def tokenized(chunks, spec, dtype, processes):
    """(positions, ids, lengths, fraction read) of each batch of the chunks of documents, in
    order, encoded in `processes` processes, which are never more than two batches each ahead
    of the caller."""
    if processes <= 1:
        encoder = document_encoder(spec, dtype)
        for positions, texts, fraction in batches(chunks):
            yield (positions, *encode_batch(texts, encoder), fraction)
        return
    with Pool(processes, start_worker, (spec, dtype)) as pool:
        pending = collections.deque()
        for positions, texts, fraction in batches(chunks):
            pending.append((positions, pool.apply_async(encode_batch, (texts,)), fraction))
            if len(pending) >= 2 * processes:
                positions, result, fraction = pending.popleft()
                yield (positions, *result.get(), fraction)
        while pending:
            positions, result, fraction = pending.popleft()
            yield (positions, *result.get(), fraction)


# -----------------------------------------------------------------------------
# Writing shards, resumably

def read_saved(path):
    """progress.json or meta.json as this module saved it, or None if it is missing or torn
    (as if there were none)."""
    try:
        return read_json(path, "")
    except UserError:
        return None


class ShardWriter:
    """The shards of a preparation being written, and its progress: where in the documents
    (file index, row, ids of that document already written) the next shard starts."""

    def __init__(self, folder, dtype, shard_tokens, settings, state):
        self.folder, self.settings, self.state = folder, settings, state
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0

    def add(self, split, positions, ids, ends, start, stop):
        """Add ids[start:stop] of a batch (documents at positions, ending at ends) to split,
        writing each shard as it fills."""
        while start < stop:
            n = min(stop - start, len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + n] = ids[start:start + n]
            self.filled, start = self.filled + n, start + n
            if self.filled == len(self.buffer):
                self.write_shard(split, next_position(positions, ends, start))

    def write_shard(self, split, next_start):
        """Write the shard filled so far (if any), then the progress that follows it."""
        if self.filled:
            write_shard(self.folder, split, self.state["shards"][split], self.buffer[:self.filled])
            self.state["shards"][split] += 1
            self.state["tokens"][split] += self.filled
            self.filled = 0
        self.state["next"] = next_start
        os.makedirs(self.folder, exist_ok=True)
        progress = json_bytes({"settings": self.settings, **self.state})
        atomic_write(os.path.join(self.folder, "progress.json"), lambda f: f.write(progress))


def next_position(positions, ends, j):
    """[file index, row, ids written] of the document holding the j-th id of a batch, the last
    one written (j > 0): a resume reads from that document on and drops the ids written."""
    d = int(np.searchsorted(ends, j - 1, side="right"))
    start = int(ends[d - 1]) if d else 0
    return [*positions[d], j - start]


def resume_state(folder, settings):
    """Where a preparation into folder stands: a fresh start, the state saved in its
    progress.json, or None when it is complete. A folder prepared with other settings is
    refused: its shards would be mixed with these."""
    for name in ("progress.json", "meta.json"):
        saved = read_saved(os.path.join(folder, name))
        if isinstance(saved, dict) and "settings" in saved:
            if saved["settings"] != settings:
                differ = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
                raise UserError(f"{folder} holds a preparation with other settings ({', '.join(differ)} "
                                "differ): give another --out, or delete the folder to start over")
            return None if name == "meta.json" else {k: saved[k] for k in ("split", "shards", "tokens", "next")}
    return {"split": "val", "shards": {"val": 0, "train": 0}, "tokens": {"val": 0, "train": 0},
            "next": [0, 0, 0]}


def prepare(files, column, folder, tokenizer, shard_tokens=10**8, val_tokens=10**7, processes=0,
            source=""):
    """Write the documents of files (Sources) into folder as sharded train and val splits
    (see the top of this file); returns meta, as meta.json holds it."""
    if tokenizer.eot_token is None:
        raise UserError("the tokenizer has no end-of-text token to separate documents with")
    spec, dtype = tokenizer.spec(), token_dtype(tokenizer.vocab_size)
    settings = {"files": [[f.name, f.size] for f in files], "column": column,
                "tokenizer": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16],
                "shard_tokens": shard_tokens, "val_tokens": val_tokens}
    state = resume_state(folder, settings)
    if state is None:
        print(f"{folder} is prepared already: nothing to do")
        return read_saved(os.path.join(folder, "meta.json"))
    writer = ShardWriter(folder, dtype, shard_tokens, settings, state)
    file_index, row, written = state["next"]
    done = state["tokens"]["val"] + state["tokens"]["train"]
    chunks = documents(files, column, (file_index, row))
    work = tokenized(chunks, spec, dtype, processes or os.cpu_count() or 1)
    with closing(work), tqdm(initial=done, unit="tok", unit_scale=True, desc=os.path.basename(folder)) as bar:
        for positions, ids, lengths, fraction in work:
            ends = np.cumsum(lengths)
            start = written if positions[0] == (file_index, row) else 0  # a resume's first document
            written = 0
            split_at = start
            if state["split"] == "val":  # the first val_tokens ids are val's, as llm.c's first shard
                split_at = min(len(ids), start + val_tokens - state["tokens"]["val"] - writer.filled)
                writer.add("val", positions, ids, ends, start, split_at)
                if state["tokens"]["val"] + writer.filled == val_tokens:
                    state["split"] = "train"
                    writer.write_shard("val", next_position(positions, ends, split_at))
            if state["split"] == "train":
                writer.add("train", positions, ids, ends, split_at, len(ids))
            bar.update(len(ids) - start)
            bar.total = int(bar.n / max(fraction, 1e-9))
        if state["split"] == "val" and writer.filled:
            raise UserError(f"the corpus has {state['tokens']['val'] + writer.filled:,} tokens, not more "
                            f"than val_tokens={val_tokens:,}: lower --val_tokens")
        writer.write_shard("train", state["next"])
    if state["tokens"]["train"] == 0:
        raise UserError(f"{source or 'the corpus'} has no documents to prepare")
    meta = {"vocab_size": tokenizer.vocab_size, "tokenizer": spec, "dtype": dtype.name,
            "source": source, "train_tokens": state["tokens"]["train"],
            "val_tokens": state["tokens"]["val"], "shard_tokens": shard_tokens,
            "shards": {split: [shard_name(split, i) for i in range(state["shards"][split])]
                       for split in ("train", "val")},
            "settings": settings}
    write_meta(folder, meta)
    os.remove(os.path.join(folder, "progress.json"))
    return meta


# -----------------------------------------------------------------------------
# The preparers' command line

def get_tokenizer(name):
    """GPT-2's BPE (tiktoken), or the tokenizer of a model as checkpoint.load_tokenizer finds it."""
    if name == "gpt2":
        from nanogpt.tokenizer import TiktokenTokenizer
        return TiktokenTokenizer("gpt2")
    from nanogpt.checkpoint import load_tokenizer  # imports torch: only for a model's tokenizer
    return load_tokenizer(name)


def preparer_settings(name, config):
    """The settings of a corpus preparer (data/fineweb, data/openwebtext: --key=value), for its
    globals: the hub dataset `name` and its `config` by default."""
    return dict(
        name=name,  # a dataset on the Hugging Face hub
        config=config,  # its config (subset); '' for the default
        split="train",
        column="text",  # the column (jsonl: the field) holding each document's text
        input="",  # local parquet / jsonl / txt files, globs or folders, comma-separated: read instead of the hub
        out="",  # the dataset folder; empty means the preparer's own folder (then --dataset=its name)
        tokenizer="gpt2",  # 'gpt2' (tiktoken), or a model whose tokenizer to use: a folder, hub id, run's out_dir
        shard_tokens=100_000_000,  # token ids a shard
        val_tokens=10_000_000,  # the val split: the corpus's first this many ids
        num_proc=0,  # processes that tokenize; 0 means one per CPU core
        overwrite=False,  # write into an --out that holds a model, or a dataset not of this repo's preparers
    )


def main(settings, default_out):
    """Run a preparer: settings are its knobs (data/fineweb/prepare.py's), default_out its folder."""
    for key in ("shard_tokens", "val_tokens"):
        if settings[key] < 1:
            raise UserError(f"{key} must be at least 1, got {settings[key]}")
    if settings["num_proc"] < 0:
        raise UserError(f"num_proc must be 0 (one per CPU core) or more, got {settings['num_proc']}")
    out = settings["out"] or default_out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file: give a folder for the dataset")
    check_dataset_folder(out, settings["overwrite"])  # a model, another program's dataset: refused
    if settings["input"]:
        files = local_files(p for p in settings["input"].split(",") if p)
        source = settings["input"]
        for f in files:  # a file without the column (or not of its kind) refused before any work
            next(read_documents(f.name, settings["column"]), None)
    else:
        files = hub_files(settings["name"], settings["config"], settings["split"])
        source = f"{settings['name']} {settings['config']} {settings['split']}".strip()
    tok = get_tokenizer(settings["tokenizer"])
    print(f"{source}: {len(files)} file(s), {sum(f.size for f in files) / 1e6:,.1f} MB")
    meta = prepare(files, settings["column"], out, tok, settings["shard_tokens"], settings["val_tokens"],
                   settings["num_proc"], source)
    print(f"train: {meta['train_tokens']:,} tokens in {len(meta['shards']['train'])} shard(s); "
          f"val: {meta['val_tokens']:,} in {len(meta['shards']['val'])} ({meta['dtype']})")
    print(f"train on it with --dataset={os.path.abspath(out)}")
