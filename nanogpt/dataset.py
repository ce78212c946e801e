"""
A dataset on disk, both ways: what every data/<name>/prepare.py writes and what train.py reads.

A dataset is a folder holding
    train.bin, val.bin  token ids, one after another, as uint16 (uint32 for vocabularies over
                        65,536 tokens)
    meta.json           vocab_size, the tokenizer spec (tokenizer.py), the ids' dtype, the source
JSON instead of nanoGPT's meta.pkl, so reading a dataset never unpickles anything. A dataset
is replaced whole (swap_in): a preparation stopped part way leaves the old one, or a meta.json
that says so; never train.bin of one dataset beside val.bin of another. No preparer writes
into a folder holding a model or another program's dataset unless told to (--overwrite=True).
A web corpus (corpus.py) is split into shards instead, train_000000.bin, ..., val_000000.bin,
..., written one by one as it is tokenized and listed in meta.json ("shards"), which comes
last; each is memory-mapped and a split reads as its shards' ids end to end.

    read_text(path)                                  # a preparer's UTF-8 input
    write_dataset(folder, tokenizer, train_ids, val_ids, source)
    write_shard(folder, "train", 0, ids) ... write_meta(folder, meta)   # a sharded one, shard by shard
    splits, meta = open_dataset("shakespeare_char", block_size, vocab_size)   # memory-mapped, checked
    check_fits(meta, model_tokenizer_spec, "shakespeare_char", "out")   # the model reads its ids
    splits = to_device(splits, "cuda")               # a small corpus: held on the GPU whole
    x, y = get_batch(splits["train"], block_size, rows, generator)
"""

import hashlib
import json
import os

import numpy as np

from nanogpt import reading
from nanogpt.atomic import atomic_write, check_not_foreign, sync_folder, write_beside
from nanogpt.errors import UserError

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, above this package


def read_text(path):
    """The text of a preparer's UTF-8 input exactly as it is on disk (\\r stays), of any size."""
    return reading.read_text(path, f"--input={path}", limit=None)


MASKS = ("train.mask.bin", "val.mask.bin")
# what meta.json says while write_dataset renames a new dataset's files in: a folder it is found
# in was left half old, half new by a preparation that stopped (a SIGKILL, a power cut)
INCOMPLETE = {"incomplete": "the dataset's files were being replaced: prepare it again"}


def write_dataset(folder, tokenizer, train_ids, val_ids, source="", masks=None, overwrite=False):
    """Write train.bin, val.bin and meta.json into folder; return meta. An empty split is
    refused, before anything is written, and so is a folder that holds a model or another
    program's dataset (check_dataset_folder) unless overwrite. masks: (train, val) arrays of one
    0/1 byte per token, written as train.mask.bin / val.mask.bin: 1 where the token is a target
    to learn (data/chat/prepare.py's assistant tokens), 0 where it is context only."""
    dtype = token_dtype(tokenizer.vocab_size)
    train_ids, val_ids = np.asarray(train_ids, dtype=dtype), np.asarray(val_ids, dtype=dtype)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) == 0:
            raise UserError(f"{source or 'the text'} gives no {split} tokens: it is too short to "
                            "split into train and val; nothing written")
    check_dataset_folder(folder, overwrite)
    arrays = {"train.bin": train_ids, "val.bin": val_ids}
    for name, ids, mask in zip(MASKS, (train_ids, val_ids), masks or ()):
        assert len(mask) == len(ids), "one mask byte per token"
        arrays[name] = np.asarray(mask, np.uint8)
    meta = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.spec(), "dtype": dtype.name,
            "source": source, "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    try:
        os.makedirs(folder, exist_ok=True)
        swap_in(folder, arrays, meta)
    except OSError as e:
        raise UserError(f"cannot write the dataset to {folder}: {e.strerror}") from None
    return meta


def swap_in(folder, arrays, meta):
    """Replace the dataset in folder by arrays ({file name: ids}) and meta, as a whole: every
    file is written beside its name first (a full disk there leaves the old dataset as it
    was), then meta.json says INCOMPLETE while they are renamed in, then the new meta.json is
    written. A preparation stopped at any point leaves the old dataset, the new one, or one
    that open_dataset refuses; never train.bin of one beside val.bin of another."""
    meta_path = os.path.join(folder, "meta.json")
    staged = []
    try:
        for name, ids in arrays.items():
            staged.append((write_beside(os.path.join(folder, name), ids.tofile), name))
        atomic_write(meta_path, lambda f: f.write(json_bytes(INCOMPLETE)))
    except BaseException:
        for tmp, _ in staged:
            os.remove(tmp)
        raise
    for tmp, name in staged:
        os.replace(tmp, os.path.join(folder, name))
    for name in MASKS:  # an earlier dataset's loss masks, which this one has none of
        if name not in arrays and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    sync_folder(folder)
    atomic_write(meta_path, lambda f: f.write(json_bytes(meta)))


def token_dtype(vocab_size):
    """How a vocabulary's ids are stored: uint16, or uint32 past 65,536 tokens."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_name(split, index):
    return f"{split}_{index:06d}.bin"


def write_shard(folder, split, index, ids):
    """Write one shard of a sharded dataset (corpus.py writes them as a corpus is tokenized),
    atomically: a stop while writing leaves the shard whole or absent."""
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, shard_name(split, index)), ids.tofile)


def write_meta(folder, meta):
    """Write meta.json: for a sharded dataset, last, once every shard it lists is written."""
    atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json_bytes(meta)))


def json_bytes(obj):
    """meta.json's bytes: obj as indented JSON."""
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def check_dataset_folder(folder, overwrite=False):
    """Refuse, unless overwrite, a folder to write a dataset into that holds a model, or a dataset
    that write_dataset did not write (nanoGPT's, another program's): preparing would write over
    or beside what the user keeps there. A preparer calls it before its work, write_dataset again."""
    check_not_foreign(folder, lambda f: written_here(os.path.join(f, "meta.json")), overwrite)


def written_here(meta_path):
    """Whether the meta.json at meta_path is write_dataset's (a whole one, or INCOMPLETE)."""
    try:
        meta = reading.read_json(meta_path, "")
    except UserError:
        return False
    return "train_tokens" in meta or meta == INCOMPLETE


def dataset_dir(name):
    """A dataset's folder: a path, or the name of a folder under the repo's data/."""
    return name if os.sep in name else os.path.join(REPO_DIR, "data", name)


def open_dataset(name, block_size=None, vocab_size=None):
    """({"train": ids, "val": ids}, meta) of a prepared dataset, the ids memory-mapped (a sharded
    one's as ShardedIds), checked;
    with "train.mask" / "val.mask" too where the dataset has loss masks (write_dataset):
    meta.json a JSON object naming uint16 or uint32 ids, each split a whole number of ids and
    more than block_size of them (if given), and every id below vocab_size (if given: the
    model's vocabulary; one pass over each split)."""
    folder = dataset_dir(name)
    meta_path = os.path.join(folder, "meta.json")
    meta = reading.read_json(meta_path, "prepare the dataset again") if os.path.exists(meta_path) else {}
    if meta == INCOMPLETE:
        raise UserError(f"{meta_path}: the dataset's files were being replaced when its "
                        "preparation stopped, so they may be of two datasets: prepare it again")
    if not meta and os.path.exists(os.path.join(folder, "progress.json")):
        raise UserError(f"dataset {name!r} is still being prepared ({folder} has its progress.json "
                        "but no meta.json yet): run its prepare command again to finish it")
    dtype = meta.get("dtype", "uint16")
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"{meta_path} names dtype {dtype!r}: token ids are stored as 'uint16' or "
                        "'uint32'")
    dtype = np.dtype(dtype)
    meta_vocab = meta.get("vocab_size")
    if meta_vocab is not None and (isinstance(meta_vocab, bool) or not isinstance(meta_vocab, int)
                                   or meta_vocab < 1):
        raise UserError(f"{meta_path}: vocab_size must be a positive integer, got {meta_vocab!r}")
    if meta.get("tokenizer") is not None:  # a run trained on it carries this spec: check it now
        check_meta_tokenizer(meta, meta_path)
    splits = {}
    for split in ("train", "val"):
        if "shards" in meta:  # a web corpus (corpus.py): the split's shards, read as one
            splits[split] = ShardedIds([open_ids(os.path.join(folder, shard), name, split, dtype)
                                        for shard in shard_names(meta, split, meta_path)])
        else:
            path = os.path.join(folder, f"{split}.bin")
            if not os.path.exists(path):
                prepare = os.path.join("data", name, "prepare.py")
                raise UserError(f"dataset {name!r} has no {split}.bin in {folder}: "
                                f"run `python {prepare}` first")
            splits[split] = open_ids(path, name, split, dtype)
        if block_size is not None and len(splits[split]) <= block_size:
            raise UserError(f"{split}.bin of {name!r} has {len(splits[split])} tokens, "
                            f"not more than block_size={block_size} (a batch needs block_size + 1): "
                            "lower --block_size")
        mask_path = os.path.join(folder, f"{split}.mask.bin")
        if "shards" not in meta and os.path.exists(mask_path):  # shards have no loss masks
            size = reading.check_regular(mask_path)
            if size != len(splits[split]):
                raise UserError(f"{mask_path} has {size:,} bytes for "
                                f"{len(splits[split]):,} tokens (one each): prepare the dataset again")
            splits[f"{split}.mask"] = np.memmap(mask_path, dtype=np.uint8, mode="r")
        if vocab_size is not None:
            top = max(int(np.max(ids)) for ids in getattr(splits[split], "shards", [splits[split]]))
            if top >= vocab_size:
                raise UserError(f"{split}.bin of {name!r} has token id {top}, but the model's "
                                f"vocabulary has {vocab_size} ids (0 ... {vocab_size - 1}): "
                                "prepare the dataset with the model's tokenizer")
    return splits, meta


def open_ids(path, name, split, dtype):
    """The ids of a .bin file (a split, or one of its shards), memory-mapped, once its size is
    checked."""
    if not os.path.exists(path):
        raise UserError(f"dataset {name!r} lacks {path}, which its meta.json lists: prepare "
                        "the dataset again (a sharded one goes on where it stopped)")
    size = reading.check_regular(path)
    if size == 0:
        raise UserError(f"{split}.bin of {name!r} is empty ({path}): prepare the dataset "
                        "again, from more text")
    if size % dtype.itemsize:
        raise UserError(f"{path} has {size:,} bytes, not a whole number of {dtype.name} token "
                        f"ids ({dtype.itemsize} bytes each): it is cut short or of another "
                        "dtype; prepare the dataset again")
    return np.memmap(path, dtype=dtype, mode="r")


def shard_names(meta, split, meta_path):
    """The file names of a split's shards as meta.json lists them, checked: plain names of
    files in the dataset's folder, at least one."""
    names = meta["shards"].get(split) if isinstance(meta["shards"], dict) else None
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n and os.path.basename(n) == n for n in names)):
        raise UserError(f"{meta_path}: shards.{split} must list the split's shard files (plain "
                        f"names in its folder), got {repr(names)[:80]}: prepare the dataset again")
    return names


class ShardedIds:
    """A split's shards as one sequence of ids, each shard memory-mapped: len() counts the ids
    of all, and an array of positions indexes them as if they were one file. So get_batch draws
    its windows uniformly over every id of the split (a window may span two shards), exactly as
    from the one file that the shards make end to end, and a resumed generator gives the same
    batches."""

    def __init__(self, shards):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])  # each shard's first position
        self.dtype = shards[0].dtype

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, positions):
        positions = np.asarray(positions)
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        out = np.empty(positions.shape, dtype=self.dtype)
        for k in np.unique(shard):  # one gather from each shard that holds some of them
            here = shard == k
            out[here] = self.shards[k][positions[here] - self.starts[k]]
        return out

    def __array__(self, dtype=None, copy=None):
        """All the ids in memory, end to end: to_device holds a small corpus on the GPU whole."""
        return np.concatenate(self.shards).astype(dtype or self.dtype, copy=False)


def check_meta_tokenizer(meta, meta_path):
    """Refuse a meta.json whose tokenizer cannot be made from its spec, or whose vocab_size is not
    that tokenizer's: the dataset's ids would decode to nothing, or to other text."""
    from nanogpt.tokenizer import from_spec
    try:
        tokenizer = from_spec(meta["tokenizer"])
    except UserError as e:
        raise UserError(f"{meta_path}: {e}; prepare the dataset again") from None
    if meta.get("vocab_size") is not None and meta["vocab_size"] != tokenizer.vocab_size:
        raise UserError(f"{meta_path}: vocab_size is {meta['vocab_size']}, but its tokenizer has "
                        f"{tokenizer.vocab_size} tokens: prepare the dataset again")


def check_fits(meta, model_spec, dataset, model):
    """Refuse a dataset prepared with another tokenizer than the model's (model_spec, the spec a
    checkpoint or model folder carries): its ids would mean other text to the model, and training
    would run on, learning garbage. Two specs fit when they give every id the same text
    (tokenizer_fingerprint), whatever their form: a char vocabulary and its export's
    tokenizer.json, tiktoken's gpt2 and GPT-2's own files. A dataset or checkpoint without a
    spec (nanoGPT's) is not checked."""
    spec = meta.get("tokenizer")
    if spec is None or model_spec is None or same_tokens(spec, model_spec):
        return
    raise UserError(f"dataset {dataset!r} was prepared with another tokenizer "
                    f"({describe(spec)}) than {model}'s ({describe(model_spec)}): its token ids "
                    "mean other text to the model; prepare it with the model's tokenizer "
                    f"(python data/text/prepare.py --tokenizer={model} ...)")


def same_tokens(spec, other):
    """Whether two tokenizer specs give every id the same text: at once when they name the same
    vocabulary alike, else by their fingerprints."""
    def vocabulary(s):  # what fixes the ids (not the chat template or decoding defaults)
        return {k: s.get(k) for k in ("kind", "chars", "name", "json")}
    return vocabulary(spec) == vocabulary(other) or \
        tokenizer_fingerprint(spec) == tokenizer_fingerprint(other)


def tokenizer_fingerprint(spec):
    """sha256 of the text of every id of the tokenizer of spec, one after another: the same for
    any two tokenizers that read and write the same ids."""
    from nanogpt.tokenizer import from_spec
    tokenizer = from_spec(spec)
    digest = hashlib.sha256(str(tokenizer.vocab_size).encode())
    for i in range(tokenizer.vocab_size):
        try:
            text = tokenizer.decode([i])
        except (KeyError, ValueError):  # an id a vocabulary skips (tiktoken's have gaps)
            text = None
        digest.update(b"\0" + repr(text).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def describe(spec):
    """A tokenizer spec in a few words."""
    if not isinstance(spec, dict):
        return "unknown"
    if spec.get("kind") == "char":
        return f"char, {len(spec.get('chars') or '')} characters"
    if spec.get("kind") == "tiktoken":
        return f"tiktoken's {spec.get('name')}"
    return f"{spec.get('kind')}, a tokenizer.json"


def to_device(splits, device, max_tokens=2**28):
    """The splits (and their masks) as tensors on device, when all of them hold at most
    max_tokens (2**28: 1 GiB as int32), so that batches are cut there, with no gather on the
    host, pinning and copy at every step; larger corpora stay memory-mapped, as they are."""
    import torch
    if sum(len(ids) for name, ids in splits.items() if not name.endswith(".mask")) > max_tokens:
        return splits
    return {name: torch.from_numpy(np.asarray(ids, dtype=np.uint8 if name.endswith(".mask") else np.int32)).to(device)
            for name, ids in splits.items()}


def get_batch(data, block_size, n_rows, generator, rows=slice(None), mask=None):
    """Random windows of block_size + 1 tokens of data, as inputs and the targets shifted by one
    ((rows, block_size) int64 tensors each). n_rows starts are drawn and `rows` of them kept, so
    every process of a distributed run draws the same global batch and takes its own share.
    mask: the split's loss mask; targets it marks 0 become -1, which the loss ignores. data (and
    mask): memory-mapped arrays, or tensors (to_device), whose batches are cut where they are."""
    import torch  # the preparers import this module too, and need no torch
    starts = torch.randint(len(data) - block_size, (n_rows,), generator=generator)[rows]
    if isinstance(data, torch.Tensor):
        offsets = starts.to(data.device)[:, None] + torch.arange(block_size + 1, device=data.device)
        windows = data[offsets].long()
        hidden = None if mask is None else mask[offsets[:, 1:]] == 0
    else:
        offsets = starts.numpy()[:, None] + np.arange(block_size + 1)
        windows = torch.from_numpy(data[offsets].astype(np.int64))
        hidden = None if mask is None else torch.from_numpy(mask[offsets[:, 1:]] == 0)
    x, y = windows[:, :-1], windows[:, 1:]
    if hidden is not None:
        y = y.masked_fill(hidden, -1)
    return x, y


def every_window(data, block_size, n_rows, rows=slice(None), mask=None):
    """Batches (as get_batch's) that score every target of data once: consecutive windows of
    block_size targets, n_rows windows a batch (of which `rows` are kept, as get_batch's), the
    last one ending at the data's end, with the targets the window before it scored set to -1
    (ignored). A window's first targets see a short context, as in training batches, whose
    windows start anywhere: so the loss estimates what sampled batches estimate, without
    their sampling noise."""
    import torch
    n_targets = len(data) - 1
    starts = list(range(0, n_targets - block_size + 1, block_size))
    overlap = 0  # targets of the last window that the whole windows scored already
    if starts[-1] + block_size < n_targets:
        overlap = starts[-1] + 2 * block_size - n_targets
        starts.append(n_targets - block_size)
    last = starts[-1]
    for first in range(0, len(starts), n_rows):
        kept = torch.tensor(starts[first:first + n_rows])[rows]
        offsets = kept[:, None] + torch.arange(block_size + 1)
        if isinstance(data, torch.Tensor):
            offsets = offsets.to(data.device)
            windows, hidden = data[offsets].long(), None if mask is None else mask[offsets[:, 1:]] == 0
        else:
            windows = torch.from_numpy(data[offsets.numpy()].astype(np.int64))
            hidden = None if mask is None else torch.from_numpy(mask[offsets[:, 1:].numpy()] == 0)
        x, y = windows[:, :-1], windows[:, 1:].clone()
        if hidden is not None:
            y = y.masked_fill(hidden, -1)
        y[(kept == last).to(y.device), :overlap] = -1
        yield x, y
