"""Pretrained checkpoints in and out, offline. Tiny random transformers GPT-2s saved to temp
folders, with a small BPE as their tokenizer.json, stand in for the hub's models; transformers
is the oracle. The tests of GPT-2's own vocabulary (tiktoken's gpt2) need its files."""

import http.server
import json
import os
import pickle
import threading

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, BertTokenizer, GPT2Config,
                          GPT2LMHeadModel, pipeline)

from nanogpt.checkpoint import load_model
from configurator import configure
from nanogpt.errors import UserError
from nanogpt.hf import GPT2_SIZES, tokenizer_files
from conftest import (REPO, assert_user_error, run_script, sample_text, save_tiny_bpe, tiny_bpe,
                      until_stop)
from model import GPT, GPTConfig
from nanogpt.tokenizer import HFTokenizer, from_spec

GPT2_VOCAB = 50257
VOCAB = tiny_bpe().get_vocab_size()  # the tiny models' tokenizer.json
EOT = tiny_bpe().token_to_id("<|endoftext|>")
CHINESE = "这是很久之前的事情了，我也不知道。"


def tiny_hf(vocab_size=VOCAB):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    hf = GPT2LMHeadModel(config).eval()
    hf.generation_config.eos_token_id = None  # greedy runs the full length, as ours does
    hf.generation_config.pad_token_id = 0
    return hf


def save_hf(hf, folder):
    """folder as the hub holds a model: hf's config.json and weights, and the tiny BPE as its
    tokenizer.json."""
    hf.save_pretrained(folder)
    save_tiny_bpe(folder)
    return folder


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx, idx)[0]  # with targets: the logits of every position


def assert_load_fails(name_or_path, *words, **kwargs):
    """load_model refuses with a one-line UserError (which the scripts turn into exit code 2)."""
    with pytest.raises(UserError) as info:
        load_model(str(name_or_path), **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message


@pytest.fixture(scope="module")
def hf():
    return tiny_hf()


@pytest.fixture(scope="module")
def safetensors_folder(hf, tmp_path_factory):
    folder = save_hf(hf, tmp_path_factory.mktemp("tiny-gpt2"))
    assert (folder / "model.safetensors").exists()
    return folder


@pytest.fixture(scope="module")
def bin_folder(hf, tmp_path_factory):
    """config.json + pytorch_model.bin, in the layout of OpenAI's GPT-2 uploads: no
    'transformer.' prefix, the causal masks saved as attn.bias, no separate lm_head.
    (transformers 5 no longer writes .bin files; this is what save_pretrained(safe_serialization=False) did.)"""
    folder = tmp_path_factory.mktemp("tiny-gpt2-bin")
    hf.config.save_pretrained(folder)
    save_tiny_bpe(folder)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def hub_cache(bin_folder, tmp_path, monkeypatch):
    """A Hugging Face cache (HF_HOME) holding the .bin model as the hub repo someone/tiny-gpt2,
    in huggingface_hub's layout; offline, so any download attempt fails fast."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in bin_folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "someone/tiny-gpt2"


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_logits_equal_transformers(layout, hf, safetensors_folder, bin_folder):
    folder = safetensors_folder if layout == "safetensors" else bin_folder
    model, tokenizer = load_model(str(folder))
    idx = torch.randint(VOCAB, (2, 40))
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), rtol=0, atol=1e-5)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert tokenizer.spec() == {"kind": "tokenizers", "json": tiny_bpe().to_str()}  # the folder's
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert model.generate(prompt, 12, temperature=0).tolist() == expected.tolist()


def test_sample_from_a_hub_id_equals_transformers_greedy(hf, hub_cache):
    # through huggingface_hub's cache (offline), the .bin fallback, and sample.py end to end;
    # sample.py stops at the end-of-text token and does not print it, as transformers stops at
    # eos_token_id and the tokenizers library skips special tokens
    tok = tiny_bpe()
    expected = hf.generate(torch.tensor([tok.encode("ROMEO:").ids]), max_new_tokens=12, do_sample=False,
                           eos_token_id=EOT, pad_token_id=EOT)
    result = run_script("sample.py", f"--init_from={hub_cache}", "--device=cpu", "--start=ROMEO:",
                        "--temperature=0", "--num_samples=1", "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr
    assert tok.decode(expected[0].tolist()) in result.stdout


def test_loaded_without_random_init_with_dtype_dropout_and_crop(hf, safetensors_folder, monkeypatch):
    # the GPT's own random init may run only on the meta device, where it costs nothing
    for name in ("normal_", "zeros_"):
        def on_meta_only(tensor, *args, _init=getattr(torch.nn.init, name), **kwargs):
            assert tensor.is_meta, "the GPT's random init ran on real memory"
            return _init(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.nn.init, name, on_meta_only)
    model, _ = load_model(str(safetensors_folder), dtype="bfloat16", dropout=0.25, block_size=16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.dropout == 0.25 and model.transformer.drop.p == 0.25
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32)
    idx = torch.randint(VOCAB, (1, 16))
    torch.testing.assert_close(our_logits(model, idx).float(), hf_logits(hf, idx), rtol=0.05, atol=0.05)
    assert_load_fails(safetensors_folder, "block_size=128", "64 positions", block_size=128)


# -----------------------------------------------------------------------------
# bad input: one line, and (through the scripts) exit code 2

def copy_folder(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_checkpoints_are_one_line_errors(hf, safetensors_folder, tmp_path):
    no_weights = copy_folder(safetensors_folder, tmp_path / "no_weights", skip=("model.safetensors",))
    assert_load_fails(no_weights, "has no weights", "model.safetensors")

    # a vocabulary of VOCAB tokens is not GPT-2's: without its tokenizer.json it is unknown
    no_tokenizer = copy_folder(safetensors_folder, tmp_path / "no_tokenizer", skip=("tokenizer.json",))
    assert_load_fails(no_tokenizer, "no tokenizer.json", f"{VOCAB}-token")

    truncated = copy_folder(safetensors_folder, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_load_fails(truncated, "truncated", "model.safetensors")

    garbage = copy_folder(safetensors_folder, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert_load_fails(garbage, "not a safetensors file")

    wrong_shape = tmp_path / "wrong_shape"
    bigger = tiny_hf()
    bigger.transformer.h[1].mlp.c_fc.weight = torch.nn.Parameter(torch.zeros(32, 100))
    save_hf(bigger, wrong_shape)
    assert_load_fails(wrong_shape, "transformer.h.1.mlp.c_fc.weight", "[32, 100]", "[32, 128]")

    llama = copy_folder(safetensors_folder, tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert_load_fails(llama, "'llama'", "not GPT-2")

    assert_load_fails(tmp_path / "no_such_folder", "not a folder")


@pytest.fixture
def fake_hub(monkeypatch):
    """A hub (HF_ENDPOINT) that knows no repository, as huggingface.co answers for one that
    does not exist."""
    class NoRepos(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRepos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    server.shutdown()


def test_unknown_model_name_exits_2(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    result = run_script("sample.py", "--init_from=nobody/no-such-model", "--device=cpu")
    assert_user_error(result, "no model 'nobody/no-such-model'")


def test_train_from_a_folder_without_weights_exits_2_and_writes_nothing(safetensors_folder, bpe_dataset, tmp_path):
    folder = copy_folder(safetensors_folder, tmp_path / "no_weights", skip=("model.safetensors",))
    out_dir = tmp_path / "out"
    result = run_script("train.py", f"--init_from={folder}", f"--dataset={bpe_dataset}", f"--out_dir={out_dir}",
                        "--device=cpu", "--block_size=32", "--compile=False")
    assert_user_error(result, "has no weights")
    assert not out_dir.exists()


# -----------------------------------------------------------------------------
# fine-tune, export, and transformers loads the export

@pytest.fixture(scope="module")
def bpe_dataset(safetensors_folder, tmp_path_factory):
    """Shakespeare in the tiny models' tokens, by data/text/prepare.py with the model folder as
    --tokenizer (its tokenizer.json)."""
    root = tmp_path_factory.mktemp("shakespeare_bpe")
    (root / "input.txt").write_text(sample_text(), encoding="utf-8")
    result = run_script("data/text/prepare.py", f"--input={root / 'input.txt'}", f"--out={root / 'data'}",
                        f"--tokenizer={safetensors_folder}")
    assert result.returncode == 0, result.stderr
    return root / "data"


@pytest.fixture(scope="module")
def gpt2_folder(gpt2_tokenizer, tmp_path_factory):
    """A tiny GPT-2 of GPT-2's vocabulary saved without tokenizer files, as GPT-2 fine-tunes
    often are: loaded with tiktoken's gpt2."""
    folder = tmp_path_factory.mktemp("tiny-gpt2-50257")
    tiny_hf(GPT2_VOCAB).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dataset(gpt2_tokenizer, tmp_path_factory):
    """Shakespeare in GPT-2 tokens, by data/shakespeare/prepare.py."""
    root = tmp_path_factory.mktemp("shakespeare")
    (root / "input.txt").write_text(sample_text(), encoding="utf-8")
    result = run_script("data/shakespeare/prepare.py", f"--input={root / 'input.txt'}", f"--out_dir={root / 'data'}")
    assert result.returncode == 0, result.stderr
    return root / "data"


def test_gpt2_dataset_has_the_char_datasets_split(gpt2_dataset, gpt2_tokenizer):
    text = sample_text()
    n = int(len(text) * 0.9)  # data/shakespeare_char/prepare.py's split
    meta = json.loads((gpt2_dataset / "meta.json").read_text())
    tok = from_spec(meta["tokenizer"])
    assert meta["tokenizer"] == gpt2_tokenizer.spec() and meta["vocab_size"] == GPT2_VOCAB
    for split, part in (("train", text[:n]), ("val", text[n:])):
        ids = np.fromfile(gpt2_dataset / f"{split}.bin", dtype=meta["dtype"])
        assert ids.tolist() == gpt2_tokenizer.encode(part) and tok.decode(ids.tolist()) == part


@pytest.mark.parametrize("vocabulary", ["tokenizer.json", "gpt2"])
def test_finetune_then_export_loads_in_transformers(vocabulary, request, tmp_path):
    if vocabulary == "gpt2":  # tiktoken's, exported as GPT-2's vocab.json and merges.txt
        folder, dataset = request.getfixturevalue("gpt2_folder"), request.getfixturevalue("gpt2_dataset")
        spec, vocab_size = request.getfixturevalue("gpt2_tokenizer").spec(), GPT2_VOCAB
    else:  # the folder's tokenizer.json, exported as it is
        folder, dataset = request.getfixturevalue("safetensors_folder"), request.getfixturevalue("bpe_dataset")
        spec, vocab_size = HFTokenizer.from_file(folder / "tokenizer.json").spec(), VOCAB
    out_dir = tmp_path / "out"
    result = run_script("train.py", "config/finetune_shakespeare.py", f"--init_from={folder}",
                        f"--dataset={dataset}", f"--out_dir={out_dir}", "--device=cpu",
                        "--dtype=float32", "--compile=False", "--block_size=32", "--batch_size=4",
                        "--gradient_accumulation_steps=1", "--max_iters=4", "--eval_interval=4",
                        "--eval_iters=2", "--dropout=0.1", "--always_save_checkpoint=True")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"] == spec  # the model's, carried along
    # the pretrained model's shape and vocabulary, GPT-2's GELU, and the flags' context and dropout
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=vocab_size,
                 dropout=0.1, activation="gelu_tanh")
    assert {k: ckpt["model_args"].get(k) for k in shape} == shape

    result = run_script("export_hf.py", f"--out_dir={out_dir}", f"--export_dir={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr
    ours, tok = load_model(str(out_dir / "ckpt.pt"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(vocab_size, (2, 32))
    torch.testing.assert_close(hf_logits(exported, idx), our_logits(ours, idx), rtol=0, atol=1e-5)
    text = "ROMEO:\nBut soft, what light through yonder window breaks? 1234 <|endoftext|>"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == tok.encode(text)

    # the pipeline stops at the export's eos_token_id (the end-of-text token) and skips it
    generator = pipeline("text-generation", model=str(tmp_path / "hf"))
    out = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    prompt = tok.encode("ROMEO:")
    ids = ours.eval().generate(torch.tensor([prompt]), 8, temperature=0, stop_tokens=[tok.eot_token])
    assert out == tok.decode(until_stop(ids[0].tolist(), len(prompt), tok.eot_token))

    reloaded, _ = load_model(str(tmp_path / "hf"))  # and back again
    torch.testing.assert_close(our_logits(reloaded, idx), our_logits(ours, idx), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["finetune_shakespeare", "eval_gpt2", "eval_gpt2_medium",
                                  "eval_gpt2_large", "eval_gpt2_xl"])
def test_gpt2_configs_apply_to_train(name):
    import train
    cfg = configure(dict(vars(train)), [os.path.join(REPO, "config", f"{name}.py")])
    train.check_config(train.Config(**cfg))
    # nanoGPT's eval configs measure each size on OpenWebText, its fine-tune on Shakespeare
    assert cfg["init_from"] in GPT2_SIZES
    assert cfg["dataset"] == ("openwebtext" if name.startswith("eval") else "shakespeare")
    assert cfg["eval_only"] == name.startswith("eval")


@pytest.fixture(scope="module")
def chinese_folder(tmp_path_factory):
    """A GPT-2 with a BERT vocab.txt, as the hub's uer/gpt2-chinese-* models are."""
    folder = tmp_path_factory.mktemp("gpt2-chinese")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(CHINESE)), "gpt", "##s"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    tiny_hf(vocab_size=len(vocab)).save_pretrained(folder)
    return folder


def test_bert_vocab_folder_round_trips_chinese_and_exports(chinese_folder, tmp_path):
    model, tok = load_model(str(chinese_folder))
    oracle = BertTokenizer(str(chinese_folder / "vocab.txt"))
    for text in (CHINESE, "GPTs很久"):
        assert tok.encode(text) == oracle.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(CHINESE)) == CHINESE  # WordPiece's decoder would say "这 是 很 ..."
    assert tok.decode(tok.encode("GPTs很久")) == "gpts很久"

    # the export's tokenizer files (export_hf.py runs end to end in the fine-tuning test)
    for name, data in tokenizer_files(tok, model.config.block_size).items():
        (tmp_path / name).write_bytes(data)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    assert exported(CHINESE, add_special_tokens=False)["input_ids"] == tok.encode(CHINESE)


# -----------------------------------------------------------------------------
# nanoGPT runs

@pytest.fixture
def nanogpt_run(tmp_path):
    """A nanoGPT repo with a char-level run: out-shakespeare-char/ckpt.pt from a compiled model
    (keys prefixed _orig_mod.) and data/shakespeare_char/meta.pkl. nanoGPT's model is ours with
    the exact GELU, and its model_args do not say so."""
    chars = sorted(set(sample_text()))
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=len(chars), dropout=0.0)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**args, activation="gelu")).eval()
    root = tmp_path / "nanoGPT"
    (root / "out-shakespeare-char").mkdir(parents=True)
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in gpt.state_dict().items()},
                "optimizer": {}, "model_args": args, "iter_num": 5000, "best_val_loss": torch.tensor(1.47),
                "config": {"dataset": "shakespeare_char"}}, root / "out-shakespeare-char" / "ckpt.pt")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    with open(root / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return root, gpt


def test_nanogpt_run_imports_with_its_vocabulary(nanogpt_run):
    root, gpt = nanogpt_run
    model, tok = load_model(str(root / "out-shakespeare-char"))
    idx = torch.randint(gpt.config.vocab_size, (2, 32))
    torch.testing.assert_close(our_logits(model, idx), our_logits(gpt, idx), rtol=0, atol=0)
    text = sample_text()[:200]  # characters of its vocabulary
    assert tok.decode(tok.encode(text)) == text

    # a meta.pkl that names any class or function (the way pickles run code) is refused
    with open(root / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump({"itos": {0: "a"}, "evil": os.system}, f)
    assert_load_fails(root / "out-shakespeare-char", "meta.pkl", "refused")

    # without its meta.pkl, a char model's vocabulary is unknown (GPT-2's BPE is far bigger)
    os.remove(root / "data" / "shakespeare_char" / "meta.pkl")
    assert_load_fails(root / "out-shakespeare-char" / "ckpt.pt", "meta.pkl", f"{len(tok.chars)}-token")
