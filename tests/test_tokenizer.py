"""Tokenizers a checkpoint can carry, checked against transformers' tokenizers."""

import pytest
from tiktoken.load import read_file_cached
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast

from conftest import assert_user_error, run_script, sample_text
from nanogpt.hf import GPT2_TOKENIZER_FILES, char_tokenizer_json
from nanogpt.tokenizer import CharTokenizer, HFTokenizer, from_spec

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?  It's 1597 — naïve café. <|endoftext|>"
CHINESE = "这是很久之前的事情了，我也不知道。"


def test_tiktoken_gpt2_equals_transformers_gpt2_tokenizer(gpt2_tokenizer, tmp_path):
    # tiktoken's gpt2 comes from the shared cache (TIKTOKEN_CACHE_DIR), with no download; its
    # two source files are GPT-2's vocab.json and merges.txt, which export_hf.py writes
    for name, (url, sha256) in GPT2_TOKENIZER_FILES.items():
        (tmp_path / name).write_bytes(read_file_cached(url, sha256))
    oracle = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tok = from_spec(gpt2_tokenizer.spec())
    assert tok.encode(TEXT) == oracle(TEXT)["input_ids"]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == 50257 and tok.eot_token == 50256


def test_tokenizer_json_equals_transformers(tmp_path):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([sample_text()[:20_000]], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.decoder = decoders.ByteLevel()
    bpe.save(str(tmp_path / "tokenizer.json"))
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    tok = from_spec(HFTokenizer.from_file(tmp_path / "tokenizer.json").spec())  # as a checkpoint carries it
    ids = tok.encode(TEXT)
    assert ids == oracle(TEXT)["input_ids"]
    assert tok.decode(ids) == oracle.decode(ids) == TEXT


@pytest.fixture
def bert_vocab(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(CHINESE)), "gpt", "GPT", "##s", "!"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("lowercase", [True, False])
def test_bert_vocab_equals_transformers_and_decodes_chinese_without_spaces(bert_vocab, lowercase):
    tok = from_spec(HFTokenizer.from_bert_vocab(bert_vocab, lowercase=lowercase).spec())
    oracle = BertTokenizer(bert_vocab, do_lower_case=lowercase)
    for text in (CHINESE, "GPTs很久!", "什么 unknown 字"):
        assert tok.encode(text) == oracle.encode(text, add_special_tokens=False)
    ids = tok.encode(CHINESE)
    assert oracle.decode(ids) == " ".join(CHINESE)  # WordPiece's decoder spaces every character
    assert tok.decode(ids) == CHINESE
    assert tok.decode(tok.encode("GPTs很久!")) == ("gpts很久!" if lowercase else "GPTs很久!")
    # [CLS], [SEP], [PAD] are special tokens: decoded as transformers does, unless skipped
    assert tok.decode([2, *ids, 3, 0], skip_special_tokens=True) == CHINESE
    assert oracle.decode([2, *ids, 3, 0], skip_special_tokens=True) == " ".join(CHINESE)


def test_char_vocabulary_exports_as_tokenizer_json(tmp_path):
    chars = CharTokenizer.from_text(sample_text())
    (tmp_path / "tokenizer.json").write_text(char_tokenizer_json(chars.chars), encoding="utf-8")
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = sample_text()[:500]
    assert oracle(text)["input_ids"] == chars.encode(text)
    assert oracle.decode(chars.encode(text)) == text


def test_tiktoken_without_cache_or_network_is_a_one_line_error(tmp_path, monkeypatch):
    # an empty cache, and a proxy that refuses connections: tiktoken cannot fetch its files
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    (tmp_path / "input.txt").write_text("some text to encode\n" * 50, encoding="utf-8")
    result = run_script("data/shakespeare/prepare.py", f"--input={tmp_path / 'input.txt'}",
                        f"--out_dir={tmp_path / 'data'}")
    assert_user_error(result, "tiktoken", "TIKTOKEN_CACHE_DIR")
    assert not (tmp_path / "data").exists()
