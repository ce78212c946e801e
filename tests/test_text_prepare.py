"""data/text/prepare.py: any text file, any tokenizer, as a stream or one document a line."""

import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config

from conftest import assert_user_error, run_script, sample_text, save_tiny_bpe, tiny_bpe
from nanogpt.dataset import open_dataset
from model import GPT, GPTConfig
from nanogpt.tokenizer import HFTokenizer, from_spec

PREPARE = "data/text/prepare.py"


def prepare(tmp_path, text, *args):
    src = tmp_path / "input.txt"
    src.write_bytes(text.encode("utf-8"))  # bytes: no newline translation on any OS
    out = tmp_path / "data"
    result = run_script(PREPARE, f"--input={src}", f"--out={out}", *args)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))  # it says the ids' dtype
    train, val = (np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val"))
    return meta, train.tolist(), val.tolist()


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A model folder (config.json, tokenizer.json, no weights: prepare.py reads none) whose
    tokenizer is the tiny byte-level BPE, as --tokenizer takes a model to fine-tune."""
    folder = tmp_path_factory.mktemp("tiny-bpe-model")
    GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=8, vocab_size=tiny_bpe().get_vocab_size()).save_pretrained(folder)
    save_tiny_bpe(folder)
    return str(folder)


class Oracle:
    """A tokenizer as its own library has it: tokenizers' for a tokenizer.json, tiktoken's for
    GPT-2; with tokenizer.py's spec of it."""

    def __init__(self, spec, encode, decode, eot):
        self.spec, self.encode, self.decode, self.eot_token = spec, encode, decode, eot


@pytest.fixture(params=["model folder", "gpt2"])
def bpe(request):
    """(--tokenizer, its Oracle): the tiny BPE, through a model folder, and GPT-2's (tiktoken)."""
    if request.param == "gpt2":
        enc = request.getfixturevalue("gpt2_tokenizer").enc
        return "gpt2", Oracle({"kind": "tiktoken", "name": "gpt2"},
                              lambda text: enc.encode(text, allowed_special={"<|endoftext|>"}),
                              enc.decode, enc.eot_token)
    tok = tiny_bpe()
    return request.getfixturevalue("bpe_model"), Oracle(
        {"kind": "tokenizers", "json": tok.to_str()},
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False), tok.token_to_id("<|endoftext|>"))


def big_text():
    """Over 512K characters, so 2 processes each tokenise pieces of it; odd characters on purpose."""
    text = sample_text().replace("ROMEO", "Roméo \u2014 \t") + "\r\n"
    return text * (600_000 // len(text) + 1)


def test_stream_round_trips_in_bpe_tokens_tokenised_in_parallel(tmp_path, bpe):
    text = big_text()
    tokenizer, enc = bpe
    meta, train, val = prepare(tmp_path, text, f"--tokenizer={tokenizer}", "--num_proc=2")
    assert meta["tokenizer"] == enc.spec and meta["dtype"] == "uint16"
    n = int(len(text) * 0.9)
    # the pieces tokenised apart give exactly the ids of the whole
    assert train == enc.encode(text[:n]) and val == enc.encode(text[n:])
    assert enc.decode(train) + enc.decode(val) == text
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))


def test_char_tokenizer_round_trips(tmp_path):
    text = "".join(f"Line {i}: caf\u00e9 \u2014\tok\r\n" for i in range(97))
    meta, train, val = prepare(tmp_path, text, "--tokenizer=char")
    tok = from_spec(meta["tokenizer"])
    assert meta["tokenizer"]["chars"] == "".join(sorted(set(text))) and meta["dtype"] == "uint16"
    n = int(len(text) * 0.9)
    assert tok.decode(train) == text[:n] and tok.decode(val) == text[n:]


def test_lines_are_documents_each_ended_by_end_of_text(tmp_path, bpe):
    docs = [f"poem {i}: roses are red, violets are blue \u00e9" for i in range(20_000)]
    lines = [d + ("\r" if i % 3 == 0 else "") for i, d in enumerate(docs)]  # some Windows line ends
    lines[5:5] = ["", "   "]  # blank lines are not documents
    text = "\n".join(lines) + "\n"
    tokenizer, enc = bpe
    meta, train, val = prepare(tmp_path, text, f"--tokenizer={tokenizer}", "--documents=lines", "--num_proc=2")
    assert meta["tokenizer"] == enc.spec
    ids = train + val
    assert ids.count(enc.eot_token) == len(docs) and ids[-1] == enc.eot_token
    assert enc.decode(ids).split("<|endoftext|>")[:-1] == docs
    # the split falls between documents, about 90% of the way
    assert train[-1] == enc.eot_token and 0.88 < len(train) / len(ids) < 0.92
    assert ids == [t for d in docs for t in enc.encode(d) + [enc.eot_token]]


def test_a_model_s_tokenizer_over_65536_tokens_gives_uint32(tmp_path):
    # a run folder (ckpt.pt) whose tokenizer has 70,002 words: ids past uint16
    words = [f"w{i}" for i in range(70_000)]
    spec = HFTokenizer(word_level_json(["[UNK]", "<|endoftext|>", *words])).spec()
    vocab_size = 70_002
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=vocab_size))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "model_args": dict(n_layer=1, n_head=1, n_embd=8, block_size=8,
                vocab_size=vocab_size, bias=True), "tokenizer": spec, "config": {}}, run / "ckpt.pt")

    docs = [" ".join(words[(i * 7919) % 70_000] for i in range(j, j + 9)) for j in range(0, 400, 9)]
    meta, train, val = prepare(tmp_path, "\n".join(docs) + "\n", f"--tokenizer={run}", "--documents=lines")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == vocab_size and meta["tokenizer"] == spec
    assert max(train + val) > 65_535
    tok = from_spec(spec)
    assert [tok.decode(ids) for ids in split_at(train + val, tok.eot_token)] == docs

    splits, _ = open_dataset(str(tmp_path / "data"), block_size=8)
    assert splits["train"].tolist() == train and splits["val"].tolist() == val


def word_level_json(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok.to_str()


def split_at(ids, sep):
    docs, doc = [], []
    for i in ids:
        if i == sep:
            docs.append(doc)
            doc = []
        else:
            doc.append(i)
    return docs


@pytest.mark.parametrize("args, words", [
    (["--documents=lines", "--tokenizer=char"], ["no end-of-text token", "--documents=stream"]),
    (["--documents=poems"], ["documents must be"]),
    (["--out="], ["--out"]),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    (tmp_path / "in.txt").write_text("one\ntwo\nthree\n" * 10, encoding="utf-8")
    result = run_script(PREPARE, f"--input={tmp_path / 'in.txt'}", f"--out={tmp_path / 'out'}", *args)
    assert_user_error(result, *words)
    assert not (tmp_path / "out").exists()


def test_a_char_model_s_tokenizer_refuses_or_drops_unknown_characters(trained, tmp_path):
    out_dir, _ = trained
    src = tmp_path / "in.txt"
    src.write_text("ROMEO: my lord [aside] 42 \u00e9!\n" * 200, encoding="utf-8")
    # (without the progress bar, which prepare.py has begun on stderr when the refusal comes)
    refused = run_script(PREPARE, f"--input={src}", f"--out={tmp_path / 'refused'}", f"--tokenizer={out_dir}",
                         env={"TQDM_DISABLE": "1"})
    assert_user_error(refused, "outside the vocabulary")
    assert not (tmp_path / "refused").exists()

    result = run_script(PREPARE, f"--input={src}", f"--out={tmp_path / 'out'}", f"--tokenizer={out_dir}",
                        "--unknown=drop")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8"))
    tok = from_spec(meta["tokenizer"])
    known = set(meta["tokenizer"]["chars"])
    assert "[" not in known and "\u00e9" not in known  # the shared corpus has neither
    kept = "".join(ch for ch in src.read_text(encoding="utf-8") if ch in known)
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert tok.decode(ids.tolist()) == kept and "dropped" in result.stdout
