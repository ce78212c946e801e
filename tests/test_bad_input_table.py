"""Every mistake a one-line error: a table of bad inputs to every script (command, words of the
expected line, and nothing under the test's folder changed, compared by sha256), run in one
process that imports the scripts once and forks a child per case (conftest.run_cases).

The kinds: every knob of every script given None or a value of the wrong type (generated from
the scripts' own knobs), values out of range, damaged datasets, damaged checkpoints of ours
(missing or wrong keys, wrong shapes, unknown tokenizers, a corrupted tensor, pickled code),
damaged Hugging Face folders (config.json, safetensors headers, shard indexes, pickled weights),
nanoGPT runs with a bad meta.pkl, for train.py (init_from=<folder>) and sample.py alike; LoRA
runs whose base is missing, changed, or another LoRA run naming them back; prompts; out_dir;
the benchmarks; files that are not regular files (FIFOs, folders, devices), hostile JSON, shard
indexes and safetensors headers that point outside or do not add up; out_dir links, loops and
long names, a damaged metrics.jsonl, batches too big for memory, knobs of another type than
their script declares; decoding values that would overflow and model folders that would decode
into NaN; chat templates that fail, loop or build too much."""

import importlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, TINY, assert_user_error, run_cases, run_script, save_tiny_bpe, tiny_bpe
from test_generation_config import qwen_folder

TRAIN = [*TINY, "--peak_flops=1e12", "--max_iters=25"]
SAMPLE = ["--device=cpu", "--max_new_tokens=5", "--num_samples=1"]


# -----------------------------------------------------------------------------
# The world the cases run in: a trained run, its dataset, its export, a LoRA run on the export,
# and damaged copies of each

def save(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path)


class Evil:
    """A pickle that would run code: it calls os.system."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def damaged_checkpoints(root, good):
    """Folders root/<how>/ckpt.pt, each a copy of the good run's checkpoint damaged one way."""
    def variant(how, change):
        run = dict(torch.load(good, weights_only=True))
        run["model"] = dict(run["model"])
        change(run)
        save(run, str(root / how / "ckpt.pt"))

    first = "transformer.h.0.mlp.c_fc.weight"
    variant("no_model_args", lambda r: r.pop("model_args"))
    variant("model_args_list", lambda r: r.update(model_args=[2, 2, 32]))
    variant("model_not_dict", lambda r: r.update(model=[1, 2]))
    variant("n_layer_str", lambda r: r["model_args"].update(n_layer="2"))
    variant("n_embd_negative", lambda r: r["model_args"].update(n_embd=-32))
    variant("n_head_not_dividing", lambda r: r["model_args"].update(n_head=3))
    variant("family_unknown", lambda r: r["model_args"].update(family="rnn"))
    variant("norm_eps_str", lambda r: r["model_args"].update(family="llama", norm_eps="small"))
    variant("bias_str", lambda r: r["model_args"].update(bias="yes"))
    variant("activation_unknown", lambda r: r["model_args"].update(activation="relu"))
    variant("dropout_1_5", lambda r: r["model_args"].update(dropout=1.5))
    variant("tensor_missing", lambda r: r["model"].pop(first))
    variant("tensor_missing_no_checksums", lambda r: (r["model"].pop(first), r.pop("checksums")))
    variant("tensor_wrong_shape", lambda r: r["model"].update({first: torch.zeros(3, 3)}))
    variant("tensor_wrong_shape_no_checksums",
            lambda r: (r["model"].update({first: torch.zeros(3, 3)}), r.pop("checksums")))
    variant("tensor_extra", lambda r: r["model"].update({"transformer.h.9.mlp.c_fc.weight": torch.zeros(2)}))
    variant("tensor_name_int", lambda r: (r["model"].update({7: torch.zeros(2)}), r.pop("checksums")))
    variant("tensor_changed", lambda r: r["model"].update({first: r["model"][first] + 1e-3}))
    variant("checksums_list", lambda r: r.update(checksums=[1, 2]))
    variant("tokenizer_unknown_kind", lambda r: r.update(tokenizer={"kind": "sentencepiece"}))
    variant("tokenizer_tiktoken_unknown", lambda r: r.update(tokenizer={"kind": "tiktoken", "name": "nope"}))
    variant("tokenizer_char_not_str", lambda r: r.update(tokenizer={"kind": "char", "chars": 65}))
    variant("tokenizer_json_garbage", lambda r: r.update(tokenizer={"kind": "tokenizers", "json": "{not json"}))
    variant("tokenizer_a_string", lambda r: r.update(tokenizer="gpt2"))
    variant("no_iter_num", lambda r: r.pop("iter_num"))
    variant("iter_num_str", lambda r: r.update(iter_num="20"))
    variant("no_optimizer", lambda r: r.pop("optimizer"))
    variant("optimizers_not_states", lambda r: r.update(optimizer={"optimizers": [{"state": 3}]}))
    variant("sampler_not_state", lambda r: r.update(sampler=[1, 2, 3]))
    variant("config_list", lambda r: r.update(config=["dataset"]))
    save([1, 2, 3], str(root / "a_list" / "ckpt.pt"))
    save({"model": Evil(), "model_args": {}}, str(root / "pickled_code" / "ckpt.pt"))
    os.makedirs(root / "empty_file")
    (root / "empty_file" / "ckpt.pt").write_bytes(b"")
    os.makedirs(root / "truncated")
    data = open(good, "rb").read()
    (root / "truncated" / "ckpt.pt").write_bytes(data[: len(data) // 3])
    os.makedirs(root / "garbage")
    (root / "garbage" / "ckpt.pt").write_bytes(b"not a checkpoint at all" * 100)


def damaged_datasets(root, good):
    """Folders root/<how>, each a copy of the good dataset damaged one way."""
    meta = json.load(open(os.path.join(good, "meta.json")))

    def variant(how, change=None, files=None):
        folder = root / how
        shutil.copytree(good, folder)
        if change is not None:
            m = json.loads(json.dumps(meta))
            change(m)
            (folder / "meta.json").write_text(json.dumps(m))
        for name, content in (files or {}).items():
            if content is None:
                os.remove(folder / name)
            else:
                (folder / name).write_bytes(content)

    variant("vocab_size_str", lambda m: m.update(vocab_size="65"))
    variant("vocab_size_zero", lambda m: m.update(vocab_size=0))
    variant("tokenizer_unknown", lambda m: m.update(tokenizer={"kind": "bpe"}))
    variant("tokenizer_no_chars", lambda m: m.update(tokenizer={"kind": "char"}))
    variant("dtype_int8", lambda m: m.update(dtype="int8"))
    variant("no_val", files={"val.bin": None})
    variant("mask_short", files={"train.mask.bin": b"\1" * 10})
    variant("meta_null", files={"meta.json": b"null"})
    variant("meta_latin1", files={"meta.json": b'{"source": "caf\xe9"}'})


def safetensors_with(header, data, path):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


def damaged_hf_folders(root, good):
    """Folders root/<how>, each a copy of the good export damaged one way."""
    from safetensors.torch import load_file, save as save_safetensors
    with open(os.path.join(good, "model.safetensors"), "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(size)), f.read()
    config = json.load(open(os.path.join(good, "config.json")))
    wte = "transformer.wte.weight"

    def variant(how, config_change=None, header_change=None, raw=None, files=None):
        folder = root / how
        shutil.copytree(good, folder)
        if config_change is not None:
            c = json.loads(json.dumps(config))
            text = config_change(c)
            (folder / "config.json").write_text(text if isinstance(text, str) else json.dumps(c))
        if header_change is not None or raw is not None:
            h = json.loads(json.dumps(header))
            if header_change is not None:
                h = header_change(h) or h
            safetensors_with(raw if raw is not None else h, data, str(folder / "model.safetensors"))
        for name, content in (files or {}).items():
            if content is None:
                os.remove(folder / name)
            else:
                (folder / name).write_bytes(content)

    variant("config_a_list", lambda c: "[1, 2]")
    variant("config_not_json", lambda c: "{\"n_layer\": ")
    variant("config_n_layer_str", lambda c: c.update(n_layer="2"))
    variant("config_n_embd_negative", lambda c: c.update(n_embd=-32))
    variant("config_vocab_zero", lambda c: c.update(vocab_size=0))
    variant("config_n_positions_str", lambda c: c.update(n_positions="32"))
    variant("config_n_head_not_dividing", lambda c: c.update(n_head=3))
    variant("config_model_type_bert", lambda c: c.update(model_type="bert"))
    variant("config_no_n_layer", lambda c: c.pop("n_layer"))
    variant("config_epsilon_str", lambda c: c.update(layer_norm_epsilon="tiny"))
    variant("config_llama_sizes_str", lambda c: (c.clear(), c.update(
        model_type="llama", vocab_size=65, hidden_size="32", intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2)))
    variant("config_llama_layers_negative", lambda c: (c.clear(), c.update(
        model_type="qwen2", vocab_size=65, hidden_size=32, intermediate_size=64,
        num_hidden_layers=-2, num_attention_heads=2)))
    variant("config_llama_kv_heads", lambda c: (c.clear(), c.update(
        model_type="llama", vocab_size=65, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=3)))
    variant("config_llama_rope_theta_str", lambda c: (c.clear(), c.update(
        model_type="llama", vocab_size=65, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, rope_theta="big")))
    variant("no_config", files={"config.json": None})
    variant("header_size_huge", raw=b"", files=None)
    with open(root / "header_size_huge" / "model.safetensors", "wb") as f:
        f.write((2**60).to_bytes(8, "little") + b"{}")
    variant("header_not_json", raw=b"\xff\xfe not json at all")
    variant("header_a_list", raw=b"[1, 2, 3]")
    variant("header_entry_a_string", header_change=lambda h: h.update({wte: "F32"}))
    variant("header_dtype_int", header_change=lambda h: h[wte].update(dtype="I64"))
    variant("header_shape_negative", header_change=lambda h: h[wte].update(shape=[-65, -32]))
    variant("header_shape_str", header_change=lambda h: h[wte].update(shape=["a", "b"]))
    variant("header_offsets_past_end", header_change=lambda h: h[wte].update(
        data_offsets=[h[wte]["data_offsets"][0], len(data) + 10**6]))
    variant("header_offsets_reversed", header_change=lambda h: h[wte].update(
        data_offsets=h[wte]["data_offsets"][::-1]))
    variant("header_shape_swapped", header_change=lambda h: h[wte].update(shape=h[wte]["shape"][::-1]))
    # whole safetensors files (as the library writes them) with a tensor too many, or one too few
    tensors = load_file(os.path.join(good, "model.safetensors"))
    variant("header_unknown_tensor", files={"model.safetensors": save_safetensors(
        {**tensors, "transformer.h.7.foo": tensors[wte].clone()})})
    variant("header_tensor_missing", files={"model.safetensors": save_safetensors(
        {k: v for k, v in tensors.items() if k != "transformer.ln_f.weight"})})
    variant("safetensors_empty", files={"model.safetensors": b""})
    variant("safetensors_truncated", files={"model.safetensors": open(
        os.path.join(good, "model.safetensors"), "rb").read()[:5000]})
    variant("index_missing_shard", files={"model.safetensors": None, "model.safetensors.index.json":
                                          json.dumps({"weight_map": {wte: "model-00001-of-00002.safetensors"}}).encode()})
    variant("index_no_weight_map", files={"model.safetensors": None,
                                          "model.safetensors.index.json": b'{"metadata": {}}'})
    variant("index_weight_map_list", files={"model.safetensors": None,
                                            "model.safetensors.index.json": b'{"weight_map": ["a"]}'})
    variant("index_not_json", files={"model.safetensors": None, "model.safetensors.index.json": b"{{"})
    variant("no_weights", files={"model.safetensors": None})
    variant("bin_pickled_code", files={"model.safetensors": None, "pytorch_model.bin": b""})
    torch.save({"w": Evil()}, str(root / "bin_pickled_code" / "pytorch_model.bin"))
    variant("bin_garbage", files={"model.safetensors": None, "pytorch_model.bin": b"garbage" * 50})
    variant("tokenizer_json_garbage", files={"tokenizer.json": b"{\"model\": 3"})


def nanogpt_runs(root, good):
    """nanoGPT-style runs (no tokenizer in ckpt.pt; its vocabulary in meta.pkl beside it) whose
    meta.pkl is wrong in one way."""
    run = dict(torch.load(good, weights_only=True))
    chars = run.pop("tokenizer")["chars"]
    run.pop("checksums")
    variants = {
        "meta_a_list": ["a", "b"],
        "meta_no_itos": {"stoi": {"a": 0}},
        "meta_itos_gaps": {"itos": {0: "a", 5: "b"}},
        "meta_itos_words": {"itos": {i: "ab" for i in range(65)}},
        "meta_itos_ints": {"itos": {i: i for i in range(65)}},
    }
    for how, meta in variants.items():
        save(run, str(root / how / "ckpt.pt"))
        with open(root / how / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    save(run, str(root / "meta_pickled_code" / "ckpt.pt"))
    with open(root / "meta_pickled_code" / "meta.pkl", "wb") as f:
        pickle.dump({"itos": Evil()}, f)
    save(run, str(root / "meta_truncated" / "ckpt.pt"))
    with open(root / "meta_truncated" / "meta.pkl", "wb") as f:
        f.write(pickle.dumps({"itos": dict(enumerate(chars))})[:20])
    save(run, str(root / "meta_missing" / "ckpt.pt"))  # a 65-token vocabulary and no meta.pkl


def lora_runs(root, hf_folder):
    """root/lora, a LoRA run (adapters only) on the export hf_folder, and damaged variants:
    its base gone, its base changed, two runs naming each other as base, ..."""
    from nanogpt import lora
    from nanogpt.checkpoint import load_model, save_run
    from nanogpt.optim import configure_optimizers

    def lora_run(path, base):
        model, tokenizer = load_model(str(base))
        config = {"lora_rank": 2, "lora_alpha": 4.0, "lora_dropout": 0.0, "lora_targets": "c_attn",
                  "finetune": "lora", "dataset": "x"}
        lora.apply(model, rank=2, alpha=4.0, dropout=0.0, targets="c_attn")
        optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_run(str(path), model, optimizer, config, tokenizer.spec(), base=str(base),
                 iter_num=2, best_val_loss=2.0, val_loss=2.0)

    lora_run(root / "lora" / "ckpt.pt", hf_folder)
    # its base moved away
    shutil.copytree(hf_folder, root / "base_gone")
    lora_run(root / "lora_base_gone" / "ckpt.pt", root / "base_gone")
    shutil.rmtree(root / "base_gone")
    # its base replaced by another model of the same shape
    shutil.copytree(hf_folder, root / "base_changed")
    lora_run(root / "lora_base_changed" / "ckpt.pt", root / "base_changed")
    path = root / "base_changed" / "model.safetensors"
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    for i in range(8 + size + 64, len(data), 4096):  # nudge weights all through the file
        data[i] ^= 0x01
    path.write_bytes(bytes(data))
    # two LoRA runs each naming the other as its base
    good = dict(torch.load(root / "lora" / "ckpt.pt", weights_only=True))
    for me, other in (("loop_a", "loop_b"), ("loop_b", "loop_a")):
        save({**good, "base": str(root / other), "base_fingerprint": None}, str(root / me / "ckpt.pt"))
    save({**good, "base": ""}, str(root / "lora_no_base" / "ckpt.pt"))
    save({"model": Evil(), "model_args": {}}, str(root / "evil_base" / "ckpt.pt"))
    save({**good, "base": str(root / "evil_base"), "base_fingerprint": None},
         str(root / "lora_base_pickled_code" / "ckpt.pt"))
    save({**good, "base": "no-such-owner/no-such-model", "base_fingerprint": None},
         str(root / "lora_base_not_on_hub" / "ckpt.pt"))
    config = dict(good["config"])
    config.pop("lora_rank")
    save({**good, "config": config}, str(root / "lora_no_rank" / "ckpt.pt"))
    adapters = {k: torch.zeros(1) for k in good["adapters"]}
    save({**good, "adapters": adapters, "checksums": None}, str(root / "lora_adapters_shapes" / "ckpt.pt"))
    save({**good, "adapters": {k: "x" for k in good["adapters"]}, "checksums": None},
         str(root / "lora_adapters_not_tensors" / "ckpt.pt"))


@pytest.fixture(scope="module")
def world(trained, char_dataset, tmp_path_factory):
    """The folder every case runs in (all of it watched): run/ (a trained char run), data/ (its
    dataset), hf/ (its export), lora/ (a LoRA run on hf/), ckpt/<how>, hf_bad/<how>, nano/<how>
    and lora runs (damaged copies), prompts, and a read-only disk where one can be mounted."""
    from nanogpt import hf
    from nanogpt.checkpoint import load_model
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(trained[0], root / "run")
    shutil.copytree(char_dataset, root / "data")
    model, tokenizer = load_model(str(root / "run"))
    hf.export(model, tokenizer, str(root / "hf"))
    damaged_checkpoints(root / "ckpt", str(root / "run" / "ckpt.pt"))
    damaged_datasets(root / "data_bad", str(root / "data"))
    damaged_hf_folders(root / "hf_bad", str(root / "hf"))
    nanogpt_runs(root / "nano", str(root / "run" / "ckpt.pt"))
    lora_runs(root, root / "hf")
    escapes_world(root)
    decoding_and_template_folders(root, tokenizer.vocab_size)
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (prompts / "latin1.txt").write_bytes("ROMEO: caf\xe9\n".encode("latin-1"))
    (prompts / "empty.txt").write_text("\n\n")
    (prompts / "bad.jsonl").write_text('"ROMEO:"\n{not json\n')
    (prompts / "numbers.jsonl").write_text("[1, 2]\n")
    (root / "a_file").write_text("not a folder")
    (root / "text_latin1.txt").write_bytes("caf\xe9 " .encode("latin-1") * 100)
    (root / "text_empty.txt").write_text("   \n")
    (root / "text_one.txt").write_text("a")
    (root / "text_snow.txt").write_text("ROMEO: a snowman \u2603 here\n" * 200)
    (root / "chats_bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    bpe = root / "bpe"
    bpe.mkdir()
    save_tiny_bpe(bpe)
    (root / "config_yaml.py").write_text("n_layer: 4\n")
    (root / "config_bad.py").write_text("n_layer = = 4\n")
    (root / "config_raises.py").write_text("n_layer = 1 // 0\n")
    (root / "config_unknown.py").write_text("n_layers = 4\n")
    (root / "config_latin1.py").write_bytes(b"# caf\xe9\nn_layer = 4\n")
    reading_world(root)
    readonly = root / "readonly"
    readonly.mkdir()
    # a read-only disk holding a run: a tmpfs, filled, then remounted read-only
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(readonly)], capture_output=True).returncode == 0
    if mounted:
        shutil.copytree(root / "run", readonly / "run")
        mounted = subprocess.run(["mount", "-o", "remount,ro", str(readonly)], capture_output=True).returncode == 0
    if not mounted:
        os.chmod(readonly, 0o555)
    yield root, mounted
    if mounted:
        subprocess.run(["umount", str(readonly)], check=True)


def escapes_world(root):
    """What issue 31's escape cases need: links that lead nowhere or round a loop (beside root,
    ROOT_links/, as a link that leads nowhere cannot be hashed), and runs whose metrics.jsonl
    cannot be resumed: a link to a file outside out_dir, a line that is not JSON, a line that is
    JSON but not a record."""
    links = root.parent / f"{root.name}_links"
    links.mkdir()
    os.symlink(links / "nowhere", links / "dangling")
    os.symlink(links / "loop_b", links / "loop_a")
    os.symlink(links / "loop_a", links / "loop_b")
    (root / "outside.jsonl").write_text('{"iter": 0, "loss": 4.0}\n')
    for how, line in (("link", None), ("not_json", "{not json"), ("a_list", "[1, 2]"),
                      ("loss_a_word", '{"iter": 30, "loss": "low"}')):
        shutil.copytree(root / "run", root / f"metrics_{how}")
        metrics = root / f"metrics_{how}" / "metrics.jsonl"
        if line is None:
            os.remove(metrics)
            os.symlink(root / "outside.jsonl", metrics)
        else:
            with open(metrics, "a") as f:
                f.write(line + "\n")


# -----------------------------------------------------------------------------
# The table. A case: (id, script, arguments, words of the one-line error). In arguments, {root}
# is the world's folder; every train.py case also gets TRAIN, --dataset={root}/data and a new
# --out_dir (which must stay uncreated) unless it sets its own.

def knob_cases():
    """For every knob of every script whose default is not None (and that may not be set to
    None): --knob=None, and a value of another type."""
    scripts = ["train.py", "sample.py", "chat.py", "serve.py", "export_hf.py", "consolidate.py",
               "data/text/prepare.py", "bench/serve.py",
               "data/chat/prepare.py", "data/shakespeare_char/prepare.py",
               "data/shakespeare/prepare.py", "bench/train_step.py", "bench/loading.py",
               "bench/lora_memory.py", "bench/generation.py"]
    nullable = {"sample.py": ("top_k", "seed"), "chat.py": ("top_k", "seed"), "serve.py": ("top_k", "seed"),
                "train.py": ("lr_decay_iters",)}
    cases = []
    from configurator import knobs
    for script in scripts:
        if "/" in script:
            spec = importlib.util.spec_from_file_location("knobs_" + script[:-3].replace("/", "_"),
                                                          os.path.join(REPO, script))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(script[:-3])
        for key, default in knobs(vars(module)).items():
            if default is None or key in nullable.get(script, ()):
                continue
            cases.append((f"{script}:{key}=None", script, [f"--{key}=None"], [f"{key} cannot be None"]))
            wrong, kind = ("3", "str") if isinstance(default, str) else ("abc", type(default).__name__)
            cases.append((f"{script}:{key} of another type", script, [f"--{key}={wrong}"],
                          [f"{key} must be", kind, "got"]))
    return cases


# train.py: values out of range, config files, datasets, init_from folders
TRAIN_CASES = [
    ("train: batch_size 0", ["--batch_size=0"], ["batch_size must be at least 1"]),
    ("train: n_layer 0", ["--n_layer=0"], ["n_layer must be at least 1"]),
    ("train: grad_clip negative", ["--grad_clip=-1.0"], ["grad_clip must not be negative"]),
    ("train: lora_dropout 1", ["--lora_dropout=1.0"], ["lora_dropout must be in [0, 1)"]),
    ("train: finetune unknown", ["--finetune=half"], ["finetune must be 'full', 'freeze' or 'lora'"]),
    ("train: lora from scratch", ["--finetune=lora"], ["finetune=lora trains adapters on a pretrained model"]),
    ("train: compile a string", ["--compile=yes"], ["compile must be a bool", "'yes'"]),
    ("train: eval_batch_size 0", ["--eval_batch_size=0"], ["eval_batch_size must be a whole number of at least 1"]),
    ("train: eval_batch_size a string", ["--eval_batch_size=big"], ["eval_batch_size must be", "'big'"]),
    ("train: eval_batch_size a float", ["--eval_batch_size=2.5"], ["eval_batch_size must be", "2.5"]),
    ("train: init_from empty", ["--init_from="], ["init_from must be"]),
    ("train: family unknown", ["--family=bert"], ["family must be 'gpt2' or 'llama'"]),
    ("train: llama with biases", ["--family=llama", "--bias=True"], ["family=llama has no biases"]),
    ("train: mlp_hidden for gpt2", ["--mlp_hidden=64"], ["mlp_hidden sets family=llama's MLP"]),
    ("train: activation for llama", ["--family=llama", "--activation=relu2"], ["family=llama's MLP is SwiGLU"]),
    ("train: activation unknown", ["--activation=relu"], ["activation must be 'gelu_tanh', 'gelu' or 'relu2'"]),
    ("train: lr_schedule unknown", ["--lr_schedule=step"], ["lr_schedule must be 'cosine' or 'wsd'"]),
    ("train: decay_fraction 0", ["--lr_schedule=wsd", "--decay_fraction=0"], ["decay_fraction must be in (0, 1]"]),
    ("train: config not Python", ["{root}/config_bad.py"], ["is not Python"]),
    ("train: config YAML", ["{root}/config_yaml.py"], ["not YAML"]),
    ("train: config that raises", ["{root}/config_raises.py"], ["failed: ZeroDivisionError"]),
    ("train: config unknown key", ["{root}/config_unknown.py"], ["unknown config key 'n_layers'"]),
    ("train: config not UTF-8", ["{root}/config_latin1.py"], ["is not UTF-8 text"]),
    ("train: config missing", ["{root}/no_such_config.py"], ["cannot read config file"]),
    ("train: a bare --key that is no switch", ["--batch_size"], ["needs a value: --batch_size="]),
    ("train: dataset missing", ["--dataset={root}/no_such_data"], ["has no train.bin"]),
    ("train: dataset a file", ["--dataset={root}/a_file"], ["has no train.bin"]),
    ("train: meta.json vocab_size a string", ["--dataset={root}/data_bad/vocab_size_str"],
     ["vocab_size must be a positive integer, got '65'"]),
    ("train: meta.json vocab_size 0", ["--dataset={root}/data_bad/vocab_size_zero"],
     ["vocab_size must be a positive integer, got 0"]),
    ("train: meta.json tokenizer unknown", ["--dataset={root}/data_bad/tokenizer_unknown"],
     ["meta.json: unknown tokenizer 'bpe'"]),
    ("train: meta.json tokenizer without chars", ["--dataset={root}/data_bad/tokenizer_no_chars"],
     ["meta.json: the char tokenizer spec has no chars"]),
    ("train: meta.json dtype int8", ["--dataset={root}/data_bad/dtype_int8"], ["names dtype 'int8'"]),
    ("train: no val.bin", ["--dataset={root}/data_bad/no_val"], ["has no val.bin"]),
    ("train: a mask of the wrong length", ["--dataset={root}/data_bad/mask_short"],
     ["train.mask.bin has 10 bytes for"]),
    ("train: meta.json null", ["--dataset={root}/data_bad/meta_null"], ["holds a JSON NoneType"]),
    ("train: meta.json not UTF-8", ["--dataset={root}/data_bad/meta_latin1"], ["is not readable JSON"]),
    ("train: block_size past the model's", ["--init_from={root}/run", "--block_size=64"],
     ["block_size=64 is larger than the context"]),
    ("train: init_from a missing folder", ["--init_from={root}/no_such_model"], ["is not a folder"]),
    ("train: init_from a file", ["--init_from={root}/a_file"], ["a_file"]),
    ("train: init_from a hub id offline", ["--init_from=no-such-owner/no-such-model"],
     ["cannot get 'no-such-owner/no-such-model'"]),
    ("train: resume without a checkpoint", ["--init_from=resume", "--out_dir={root}/new_out"], ["no checkpoint"]),
    ("train: init_from a folder without config.json", ["--init_from={root}/bpe", "--finetune=lora"],
     ["has no config.json"]),
]
# damaged checkpoints, HF folders and nanoGPT runs: the same line from train.py (init_from=)
# and sample.py (init_from=)
FOLDER_CASES = [
    ("ckpt/no_model_args", ["is not a checkpoint of a run"]),
    ("ckpt/model_args_list", ["is not a checkpoint of a run"]),
    ("ckpt/model_not_dict", ["is not a checkpoint of a run"]),
    ("ckpt/n_layer_str", ["n_layer must be a positive integer, got '2'"]),
    ("ckpt/n_embd_negative", ["n_embd must be a positive integer, got -32"]),
    ("ckpt/n_head_not_dividing", ["n_embd (32) must be divisible by n_head (3)"]),
    ("ckpt/family_unknown", ["family must be 'gpt2' or 'llama'"]),
    ("ckpt/norm_eps_str", ["norm_eps must be a float, got 'small'"]),
    ("ckpt/bias_str", ["bias must be a bool, got 'yes'"]),
    ("ckpt/activation_unknown", ["activation must be"]),
    ("ckpt/tensor_missing", ["is corrupted", "c_fc.weight is missing"]),
    ("ckpt/tensor_missing_no_checksums", ["lacks 1 tensor(s)", "c_fc.weight"]),
    ("ckpt/tensor_wrong_shape", ["is corrupted", "c_fc.weight does not match the checksum"]),
    ("ckpt/tensor_wrong_shape_no_checksums", ["c_fc.weight has shape [3, 3]"]),
    ("ckpt/tensor_extra", ["has a tensor transformer.h.9.mlp.c_fc.weight"]),
    ("ckpt/tensor_name_int", ["a tensor is named 7"]),
    ("ckpt/tensor_changed", ["is corrupted", "does not match the checksum it was saved with"]),
    ("ckpt/checksums_list", ["is corrupted", "checksums are not a dict"]),
    ("ckpt/tokenizer_unknown_kind", ["unknown tokenizer 'sentencepiece'"]),
    ("ckpt/tokenizer_tiktoken_unknown", ["unknown tiktoken encoding 'nope'"]),
    ("ckpt/tokenizer_char_not_str", ["char tokenizer spec has no chars"]),
    ("ckpt/tokenizer_json_garbage", ["tokenizer.json is unreadable"]),
    ("ckpt/tokenizer_a_string", ["unknown tokenizer 'gpt2'"]),
    ("ckpt/a_list", ["is not a checkpoint of a run"]),
    ("ckpt/pickled_code", ["refused", "calls code", "system", "nothing of it was run"]),
    ("ckpt/empty_file", ["is unreadable or corrupt"]),
    ("ckpt/truncated", ["is unreadable or corrupt"]),
    ("ckpt/garbage", ["is unreadable or corrupt"]),
    ("hf_bad/config_a_list", ["config.json holds a JSON list, not an object"]),
    ("hf_bad/config_not_json", ["config.json is not readable JSON"]),
    ("hf_bad/config_n_layer_str", ["n_layer must be a positive integer, got '2'"]),
    ("hf_bad/config_n_embd_negative", ["n_embd must be a positive integer, got -32"]),
    ("hf_bad/config_vocab_zero", ["vocab_size must be a positive integer, got 0"]),
    ("hf_bad/config_n_positions_str", ["block_size must be a positive integer, got '32'"]),
    ("hf_bad/config_n_head_not_dividing", ["must be divisible by n_head (3)"]),
    ("hf_bad/config_model_type_bert", ["is a 'bert' model"]),
    ("hf_bad/config_no_n_layer", ["config.json lacks n_layer"]),
    ("hf_bad/config_epsilon_str", ["layer_norm_epsilon='tiny'"]),
    ("hf_bad/config_llama_sizes_str", ["hidden_size must be a positive integer, got '32'"]),
    ("hf_bad/config_llama_layers_negative", ["num_hidden_layers must be a positive integer, got -2"]),
    ("hf_bad/config_llama_kv_heads", ["num_key_value_heads (3) must divide num_attention_heads (4)"]),
    ("hf_bad/config_llama_rope_theta_str", ["rope_theta must be a positive number"]),
    ("hf_bad/no_config", ["has no config.json"]),
    ("hf_bad/header_size_huge", ["is not a safetensors file"]),
    ("hf_bad/header_not_json", ["is not a safetensors file"]),
    ("hf_bad/header_a_list", ["is not a safetensors file"]),
    ("hf_bad/header_entry_a_string", ["is not a safetensors file"]),
    ("hf_bad/header_dtype_int", ["has dtype I64, not a float type"]),
    ("hf_bad/header_shape_negative", ["is corrupt", "do not match its shape"]),
    ("hf_bad/header_shape_str", ["is not a safetensors file"]),
    ("hf_bad/header_offsets_past_end", ["is truncated"]),
    ("hf_bad/header_offsets_reversed", ["is corrupt", "do not match its shape"]),
    ("hf_bad/header_shape_swapped", ["tensor transformer.wte.weight has shape [32, ", "its config implies"]),
    ("hf_bad/header_unknown_tensor", ["has a tensor transformer.h.7.foo"]),
    ("hf_bad/header_tensor_missing", ["lacks 1 tensor(s)", "ln_f.weight"]),
    ("hf_bad/safetensors_empty", ["is not a safetensors file"]),
    ("hf_bad/safetensors_truncated", ["is truncated"]),
    ("hf_bad/index_missing_shard", ["names the shard", "model-00001-of-00002.safetensors", "missing"]),
    ("hf_bad/index_no_weight_map", ["has no weight_map"]),
    ("hf_bad/index_weight_map_list", ["has no weight_map"]),
    ("hf_bad/index_not_json", ["model.safetensors.index.json is not readable JSON"]),
    ("hf_bad/no_weights", ["has no weights"]),
    ("hf_bad/bin_pickled_code", ["refused", "calls code", "system", "the weights of the model folder"]),
    ("hf_bad/bin_garbage", ["is unreadable or corrupt"]),
    ("hf_bad/tokenizer_json_garbage", ["tokenizer.json is unreadable"]),
    ("nano/meta_a_list", ["meta.pkl is not a nanoGPT meta.pkl"]),
    ("nano/meta_no_itos", ["meta.pkl is not a nanoGPT meta.pkl"]),
    ("nano/meta_itos_gaps", ["meta.pkl is not a nanoGPT meta.pkl"]),
    ("nano/meta_itos_words", ["meta.pkl is not a nanoGPT meta.pkl"]),
    ("nano/meta_itos_ints", ["meta.pkl is not a nanoGPT meta.pkl"]),
    ("nano/meta_pickled_code", ["refused", "calls code", "system", "the vocabulary of the nanoGPT run"]),
    ("nano/meta_truncated", ["is not a plain nanoGPT meta.pkl"]),
    ("nano/meta_missing", ["-token vocabulary but no meta.pkl"]),
    ("lora_base_gone", ["is a LoRA run on", "base_gone, which is missing"]),
    ("lora_base_changed", ["is a LoRA run on", "whose weights have changed since the run was trained"]),
    ("loop_a", ["leads back to", "two runs name each other"]),
    ("lora_no_base", ["is a LoRA run without the name of its base model"]),
    ("lora_base_pickled_code", ["evil_base/ckpt.pt, the LoRA base of", "lora_base_pickled_code/ckpt.pt: refused",
                                "calls code", "nothing of it was run"]),
    ("lora_base_not_on_hub", ["cannot get 'no-such-owner/no-such-model'"]),
    ("lora_no_rank", ["has no valid lora_rank"]),
    ("lora_adapters_shapes", ["the saved adapters", "do not fit"]),
    ("lora_adapters_not_tensors", ["adapters are not a state dict of tensors"]),
]
# only sample.py reads these from the checkpoint (train.py's dropout replaces the checkpoint's)
SAMPLE_ONLY_FOLDERS = [("ckpt/dropout_1_5", ["dropout must be in [0, 1), got 1.5"])]
# train.py --init_from=resume (a copy of the checkpoint in out_dir)
RESUME_CASES = [
    ("ckpt/no_iter_num", ["cannot be resumed", "iter_num is None"]),
    ("ckpt/iter_num_str", ["cannot be resumed", "iter_num is '20'"]),
    ("ckpt/no_optimizer", ["cannot be resumed", "no optimizer state"]),
    ("ckpt/optimizers_not_states", ["cannot be resumed", "no optimizer state"]),
    ("ckpt/sampler_not_state", ["cannot be resumed", "sampler is not a random generator's state"]),
    ("ckpt/config_list", ["cannot be resumed", "config is not a dict"]),
    ("ckpt/tensor_changed", ["is corrupted"]),
    ("ckpt/pickled_code", ["refused", "calls code"]),
    ("lora_base_changed", ["whose weights have changed"]),
]
SAMPLE_CASES = [
    ("sample: start None", ["--start=None"], ["start cannot be None"]),
    ("sample: seed past a generator's range", ["--seed=1180591620717411303424"], ["seed must be in [0, 2**64)"]),
    ("sample: negative seed", ["--seed=-1"], ["seed must be in [0, 2**64)"]),
    ("sample: start a binary file", ["--start=FILE:{root}/prompts/binary.bin"], ["is binary", "NUL bytes"]),
    ("sample: start a latin-1 file", ["--start=FILE:{root}/prompts/latin1.txt"], ["is not UTF-8 text", "byte 10"]),
    ("sample: start an empty file", ["--start=FILE:{root}/prompts/empty.txt"], ["holds no prompt"]),
    ("sample: start a folder", ["--start=FILE:{root}/prompts"], ["cannot read prompt file"]),
    ("sample: jsonl not JSON", ["--start=FILE:{root}/prompts/bad.jsonl"], ["line 2 is not readable JSON"]),
    ("sample: jsonl not strings", ["--start=FILE:{root}/prompts/numbers.jsonl"], ["must be a JSON string"]),
    ("sample: start outside the vocabulary", ["--start=snow \u2603"], ["outside the vocabulary"]),
    ("sample: num_samples 0", ["--num_samples=0"], ["num_samples must be >= 1"]),
    ("sample: num_samples 10**9", ["--num_samples=1000000000"], ["GB", "lower num_samples or max_new_tokens"]),
    ("sample: max_new_tokens 10**12", ["--max_new_tokens=1000000000000"], ["GB", "max_new_tokens=1,000,000,000,000"]),
    ("sample: max_length 1", ["--max_length=1"], ["leaves no room"]),
    ("sample: max_length a string", ["--max_length=abc"], ["max_length must be a whole number of tokens", "'abc'"]),
    ("sample: max_length a float", ["--max_length=2.5"], ["max_length must be a whole number of tokens", "2.5"]),
    ("sample: min_new_tokens negative", ["--min_new_tokens=-1"], ["min_new_tokens"]),
    ("sample: top_p 0", ["--top_p=0.0"], ["top_p must be in (0, 1]"]),
    ("sample: top_p 1.5", ["--top_p=1.5"], ["top_p must be in (0, 1]"]),
    ("sample: min_p 2", ["--min_p=2.0"], ["min_p must be in [0, 1]"]),
    ("sample: typical_p 0", ["--typical_p=0.0"], ["typical_p must be in (0, 1]"]),
    ("sample: repetition_penalty 0", ["--repetition_penalty=0.0"], ["repetition_penalty must be > 0"]),
    ("sample: no_repeat_ngram_size negative", ["--no_repeat_ngram_size=-2"], ["no_repeat_ngram_size must be >= 0"]),
    ("sample: num_beams 0", ["--num_beams=0"], ["num_beams must be >= 1"]),
    ("sample: beams with samples", ["--num_beams=2", "--num_samples=3"], ["beam search"]),
    ("sample: two counts of samples", ["--num_return_sequences=2", "--num_samples=3"], ["both count the samples per prompt"]),
    ("sample: beams with do_sample", ["--num_beams=3", "--do_sample=True"], ["beam sampling, which is not supported"]),
    ("sample: early_stopping a word", ["--early_stopping=sometimes"], ["early_stopping"]),
    ("sample: do_sample with temperature 0", ["--do_sample=True", "--temperature=0.0"], ["do_sample=True samples"]),
    ("sample: stop empty", ["--stop=['']"], ["stop must be a non-empty string"]),
    ("sample: bad_words a number list", ["--bad_words=[[]]"], ["bad_words"]),
    ("sample: suppress_tokens a dict", ["--suppress_tokens={'a': 1}"], ["suppress_tokens must be"]),
    ("sample: quantize int4", ["--quantize=int4"], ["quantize must be None or 'int8'"]),
    ("sample: device tpu", ["--device=tpu"], ["device must be"]),
    ("sample: dtype float8", ["--dtype=float8"], ["dtype must be"]),
    ("sample: init_from empty", ["--init_from="], ["init_from must be"]),
    ("sample: out_dir without a run", ["--out_dir={root}/prompts"], ["no checkpoint"]),
    ("sample: out_dir a file", ["--out_dir={root}/a_file"], ["no checkpoint"]),
]
CHAT_CASES = [
    ("chat: beams", ["--num_beams=2"], ["unknown config key 'num_beams'"]),
    ("chat: temperature negative", ["--temperature=-1.0"], ["temperature must be >= 0"]),
    ("chat: seed past a generator's range", ["--seed=1180591620717411303424"], ["seed must be in [0, 2**64)"]),
    ("chat: max_new_tokens negative", ["--max_new_tokens=-1"], ["max_new_tokens must be >= 0"]),
    ("chat: top_p 0", ["--top_p=0.0"], ["top_p must be in (0, 1]"]),
    ("chat: no checkpoint", ["--out_dir={root}/prompts"], ["no checkpoint"]),
    ("chat: a damaged run", ["--init_from={root}/ckpt/tensor_changed"], ["is corrupted"]),
]
EXPORT_CASES = [
    ("export: no checkpoint", ["--out_dir={root}/prompts", "--export_dir={root}/new_export"], ["no checkpoint"]),
    ("export: export_dir a file", ["--out_dir={root}/run", "--export_dir={root}/a_file"], ["is a file or a link"]),
    ("export: export_dir under a file", ["--out_dir={root}/run", "--export_dir={root}/a_file/hf"],
     ["cannot write the export", "left as it was"]),
    ("export: export_dir the dataset", ["--out_dir={root}/run", "--export_dir={root}/data"], ["which are not an export's files"]),
    ("export: a corrupted run", ["--out_dir={root}/ckpt/tensor_changed", "--export_dir={root}/new_export"], ["is corrupted"]),
    ("export: a LoRA run whose base changed", ["--out_dir={root}/lora_base_changed", "--export_dir={root}/new_export"],
     ["whose weights have changed"]),
    ("export: its LoRA base", ["--out_dir={root}/lora", "--export_dir={root}/hf"], ["LoRA base"]),
]
PREPARE_CASES = [
    ("text: no input", "data/text/prepare.py", ["--out={root}/new_data"], ["give --input=FILE"]),
    ("text: input missing", "data/text/prepare.py", ["--input={root}/nope.txt", "--out={root}/new_data"], ["cannot read --input"]),
    ("text: input not UTF-8", "data/text/prepare.py", ["--input={root}/text_latin1.txt", "--out={root}/new_data"], ["is not UTF-8 text"]),
    ("text: input blank", "data/text/prepare.py", ["--input={root}/text_empty.txt", "--out={root}/new_data"], ["is empty"]),
    ("text: input one character", "data/text/prepare.py", ["--input={root}/text_one.txt", "--out={root}/new_data",
                                                           "--tokenizer=char"], ["too short"]),
    ("text: documents unknown", "data/text/prepare.py", ["--input={root}/text_snow.txt", "--out={root}/new_data",
                                                         "--documents=pages"], ["documents must be 'stream' or 'lines'"]),
    ("text: unknown unknown", "data/text/prepare.py", ["--input={root}/text_snow.txt", "--out={root}/new_data",
                                                       "--unknown=keep"], ["unknown must be 'error' or 'drop'"]),
    ("text: num_proc negative", "data/text/prepare.py", ["--input={root}/text_snow.txt", "--out={root}/new_data",
                                                         "--num_proc=-1"], ["num_proc must be"]),
    ("text: char documents", "data/text/prepare.py", ["--input={root}/text_snow.txt", "--out={root}/new_data",
                                                      "--tokenizer=char", "--documents=lines"], ["no end-of-text token"]),
    ("text: a char run's tokenizer, other characters", "data/text/prepare.py",
     ["--input={root}/text_snow.txt", "--out={root}/new_data", "--tokenizer={root}/run"], ["outside the vocabulary"]),
    ("text: tokenizer a missing folder", "data/text/prepare.py",
     ["--input={root}/text_snow.txt", "--out={root}/new_data", "--tokenizer={root}/nope"], ["is not a folder"]),
    ("text: tokenizer a damaged run", "data/text/prepare.py",
     ["--input={root}/text_snow.txt", "--out={root}/new_data", "--tokenizer={root}/ckpt/tokenizer_unknown_kind"],
     ["unknown tokenizer"]),
    ("text: out a file", "data/text/prepare.py", ["--input={root}/text_snow.txt", "--out={root}/a_file",
                                                  "--tokenizer=char"], ["a_file is a file"]),
    ("text: out under a file", "data/text/prepare.py", ["--input={root}/text_snow.txt", "--out={root}/a_file/d",
                                                        "--tokenizer=char"], ["is under", "a_file, which is a file"]),
    ("chat data: no input", "data/chat/prepare.py", ["--out={root}/new_data", "--tokenizer={root}/run"], ["input"]),
    ("chat data: a bad line", "data/chat/prepare.py", ["--input={root}/chats_bad.jsonl", "--out={root}/new_data",
                                                       "--tokenizer={root}/run"], ["line"]),
    ("char data: input missing", "data/shakespeare_char/prepare.py",
     ["--input={root}/nope.txt", "--out_dir={root}/new_data"], ["cannot read --input"]),
    ("char data: input not UTF-8", "data/shakespeare_char/prepare.py",
     ["--input={root}/text_latin1.txt", "--out_dir={root}/new_data"], ["is not UTF-8 text"]),
    ("char data: out_dir a file", "data/shakespeare_char/prepare.py",
     ["--input={root}/text_snow.txt", "--out_dir={root}/a_file"], ["cannot write the dataset"]),
    ("bpe data: input missing", "data/shakespeare/prepare.py",
     ["--input={root}/nope.txt", "--out_dir={root}/new_data"], ["cannot read --input"]),
]
BENCH_CASES = [
    ("train_step: steps 0", "bench/train_step.py", ["--steps=0"], ["steps must be at least 1"]),
    ("train_step: warmup negative", "bench/train_step.py", ["--warmup_steps=-1"], ["warmup_steps must not be negative"]),
    ("train_step: batch_size 0", "bench/train_step.py", ["--batch_size=0"], ["batch_size must be at least 1"]),
    ("train_step: n_embd huge", "bench/train_step.py", ["--n_embd=65536", "--n_head=16", "--device=cpu"], ["GB", "memory"]),
    ("train_step: n_head not dividing", "bench/train_step.py", ["--n_head=5"], ["must be divisible by n_head"]),
    ("train_step: vocab 0", "bench/train_step.py", ["--vocab_size=0"], ["vocab_size must be a positive integer"]),
    ("train_step: optim sgd", "bench/train_step.py", ["--optim=sgd"], ["optim must be 'adamw' or 'muon'"]),
    ("train_step: precision float8", "bench/train_step.py", ["--compare=True", "--precisions=float8"], ["float8"]),
    ("train_step: device tpu", "bench/train_step.py", ["--device=tpu"], ["device must be"]),
    ("loading: model unknown", "bench/loading.py", ["--model=gpt3"], ["model must be one of"]),
    ("loading: repeats 0", "bench/loading.py", ["--repeats=0"], ["repeats must be at least 1"]),
    ("loading: folder missing", "bench/loading.py", ["--folder={root}/no_such_folder"], ["no_such_folder", "not a folder"]),
    ("loading: folder a file", "bench/loading.py", ["--folder={root}/a_file"], ["not a folder"]),
    ("lora_memory: n_layer 0", "bench/lora_memory.py", ["--n_layer=0"], ["n_layer must be a positive integer"]),
    ("lora_memory: n_embd huge", "bench/lora_memory.py", ["--n_embd=65536"], ["GB", "memory"]),
    ("lora_memory: tokens 0", "bench/lora_memory.py", ["--tokens=0"], ["tokens must be in 1"]),
    ("lora_memory: tokens past the context", "bench/lora_memory.py", ["--tokens=5000"], ["tokens must be in 1"]),
    ("lora_memory: lora_rank 0", "bench/lora_memory.py", ["--n_layer=2", "--n_embd=64", "--n_head=2", "--lora_rank=0"],
     ["lora_rank must be at least 1"]),
    ("lora_memory: freeze_layers past the model", "bench/lora_memory.py", ["--n_layer=2", "--n_embd=64",
                                                                           "--n_head=2", "--freeze_layers=9"],
     ["freeze_layers=9"]),
    ("lora_memory: targets unknown", "bench/lora_memory.py", ["--n_layer=2", "--n_embd=64", "--n_head=2",
                                                              "--lora_targets=q_proj"], ["unknown lora target"]),
    ("generation: repeat 0", "bench/generation.py", ["--repeat=0"], ["repeat must be at least 1"]),
    ("generation: new_tokens 0", "bench/generation.py", ["--new_tokens=0"], ["new_tokens must be at least 1"]),
    ("generation: prompt_tokens 0", "bench/generation.py", ["--prompt_tokens=0"], ["prompt_tokens must be at least 1"]),
    ("generation: char_samples 0", "bench/generation.py", ["--char_samples=0"], ["char_samples must be at least 1"]),
    ("generation: char_tokens 0", "bench/generation.py", ["--char_tokens=0"], ["char_tokens must be at least 1"]),
    ("generation: parts unknown", "bench/generation.py", ["--parts=gpt3"], ["parts must be"]),
    ("generation: quality_from missing", "bench/generation.py", ["--parts=", "--quality_from={root}/prompts"],
     ["no checkpoint"]),
    ("generation: prompt past the context", "bench/generation.py", ["--prompt_tokens=2000", "--parts=gpt2"],
     ["prompt_tokens"]),
]
# out_dir for train.py: checked by atomic.check_out_dir, which train.py calls
OUT_DIR_CASES = [
    ("train: out_dir a file", ["--out_dir={root}/a_file"], ["out_dir=", "a_file is a file, not a folder"]),
    ("train: out_dir empty", ["--out_dir="], ["out_dir must be a folder's path"]),
    ("train: out_dir under a file", ["--out_dir={root}/a_file/out"], ["is under", "a_file, which is a file"]),
    ("train: out_dir read-only", ["--out_dir={root}/readonly/out"], ["cannot be written", "Read-only file system"]),
    ("train: resume in a read-only out_dir", ["--out_dir={root}/readonly/run", "--init_from=resume",
                                              "--max_iters=40"], ["cannot be written", "Read-only file system"]),
]


# -----------------------------------------------------------------------------
# issue 31's escapes, by class (the terminal's and the signals' cases need a closed pipe, a full
# disk or a signal: test_escapes.py). {root}_links is escapes_world's folder beside root.
LONG_NAME = "x" * 300  # a name longer than any disk takes
ESCAPE_TRAIN_CASES = [  # run as TRAIN_CASES are
    # out_dir and outputs
    ("train: out_dir a link to nowhere", ["--out_dir={root}_links/dangling"], ["is a link to", "which does not exist"]),
    ("train: out_dir under a link to nowhere", ["--out_dir={root}_links/dangling/out"],
     ["is under", "dangling, which is a link to", "which does not exist"]),
    ("train: out_dir a loop of links", ["--out_dir={root}_links/loop_a"], ["Too many levels of symbolic links"]),
    ("train: out_dir under a loop of links", ["--out_dir={root}_links/loop_a/out"], ["Too many levels of symbolic links"]),
    ("train: out_dir a 300-character name", [f"--out_dir={{root}}/{LONG_NAME}"], ["File name too long"]),
    ("train: out_dir a 300-character name in a new folder", [f"--out_dir={{root}}/new_out/{LONG_NAME}"],
     ["cannot be made", "is 300 bytes, more than the"]),
    ("train: resume, metrics.jsonl a link outside", ["--out_dir={root}/metrics_link", "--init_from=resume"],
     ["metrics.jsonl is a link (to", "outside.jsonl"]),
    ("train: resume, metrics.jsonl a line not JSON", ["--out_dir={root}/metrics_not_json", "--init_from=resume"],
     ["metrics.jsonl, line 8: not a record", "'{not json'"]),
    ("train: resume, metrics.jsonl a line a list", ["--out_dir={root}/metrics_a_list", "--init_from=resume"],
     ["metrics.jsonl, line 8: not a record"]),
    ("train: resume, metrics.jsonl a loss a word", ["--out_dir={root}/metrics_loss_a_word", "--init_from=resume"],
     ["metrics.jsonl, line 8: not a record"]),
    # sizes
    ("train: batch_size 10**9", ["--batch_size=1000000000"], ["batch_size=1,000,000,000 rows", "GB", "lower batch_size"]),
    ("train: eval_batch_size 10**12", ["--eval_batch_size=1000000000000"], ["eval_batch_size=1,000,000,000,000 rows", "GB"]),
    ("train: batch_size 10**9 fine-tuning a model folder", ["--init_from={root}/hf", "--batch_size=1000000000"],
     ["batch_size=1,000,000,000 rows", "GB"]),
    ("train: batch_size 10**9 resumed", ["--out_dir={root}/run", "--init_from=resume", "--batch_size=1000000000"],
     ["batch_size=1,000,000,000 rows", "GB"]),
    ("train: trainable only commas", ["--trainable=,,,"], ["trainable=',,,' names no pattern"]),
    ("train: trainable blanks", ["--trainable= , "], ["names no pattern"]),
    ("train: trainable only what freeze froze", ["--finetune=freeze", "--freeze_layers=2",
                                                 "--trainable=transformer.wte.weight"], ["leave no parameter to train"]),
    # knobs whose default is None: their declared types
    ("train: device an int", ["--device=5"], ["device must be a str or None", "got 5"]),
    ("train: device cpu:abc", ["--device=cpu:abc"], ["device must be cpu, cuda, cuda:N or mps", "'cpu:abc'"]),
    ("train: dtype a list", ["--dtype=[1]"], ["dtype must be a str or None", "[1]"]),
    ("train: backend a number", ["--backend=1.5"], ["backend must be a str or None"]),
    ("train: compile a number", ["--compile=1"], ["compile must be a bool or None"]),
    ("train: peak_flops a word", ["--peak_flops=fast"], ["peak_flops must be a float or None", "'fast'"]),
    ("train: peak_flops nan", ["--peak_flops=nan"], ["peak_flops must be a finite number"]),
    ("train: eval_batch_size a list", ["--eval_batch_size=[8]"], ["eval_batch_size must be an int or None"]),
    ("train: learning_rate a 1 and 400 zeros", [f"--learning_rate=1{'0' * 400}"], ["learning_rate is a number of 401 digits"]),
    ("train: learning_rate 1e400", ["--learning_rate=1e400"], ["learning_rate must be a finite number"]),
]
ESCAPE_CASES = [
    # out_dir and outputs, checked before the text is tokenised
    ("text: out a link to nowhere", "data/text/prepare.py",
     ["--input={root}/text_snow.txt", "--tokenizer=char", "--out={root}_links/dangling"], ["--out=", "is a link to"]),
    ("text: out a loop of links", "data/text/prepare.py",
     ["--input={root}/text_snow.txt", "--tokenizer=char", "--out={root}_links/loop_a"], ["Too many levels of symbolic links"]),
    ("text: out a 300-character name", "data/text/prepare.py",
     ["--input={root}/text_snow.txt", "--tokenizer=char", f"--out={{root}}/{LONG_NAME}"], ["File name too long"]),
    ("chat data: out a link to nowhere", "data/chat/prepare.py",
     ["--input={root}/chats_bad.jsonl", "--tokenizer={root}/run", "--out={root}_links/dangling"], ["is a link to"]),
    # knobs whose default is None: their declared types
    ("sample: device an int", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--device=5"], ["device must be a str or None"]),
    ("sample: device cpu:abc", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--device=cpu:abc"],
     ["device must be cpu, cuda, cuda:N or mps"]),
    ("sample: dtype a list", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--dtype=[1]"], ["dtype must be a str or None"]),
    ("sample: quantize a number", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--quantize=8"],
     ["quantize must be a str or None"]),
    ("chat: device a tuple", "chat.py", ["--out_dir={root}/run", "--prompt=ROMEO:", "--device=(1,)"],
     ["device must be a str or None"]),
    ("serve: dtype a number", "serve.py", ["--out_dir={root}/run", "--dtype=16"], ["dtype must be a str or None"]),
    ("serve: pad_token_id, which a reply never uses", "serve.py", ["--out_dir={root}/run", "--pad_token_id=0"],
     ["unknown config key 'pad_token_id'"]),
    ("train_step: dtype a number", "bench/train_step.py", ["--dtype=32"], ["dtype must be a str or None"]),
    ("generation: device a list", "bench/generation.py", ["--device=['cpu']"], ["device must be a str or None"]),
    ("lora_memory: freeze_layers a word", "bench/lora_memory.py", ["--freeze_layers=half"],
     ["freeze_layers must be an int or None"]),
    ("fsdp_memory: processes None", "bench/fsdp_memory.py", ["--processes=None"], ["processes cannot be None"]),
    ("fsdp_memory: tokens None", "bench/fsdp_memory.py", ["--tokens=None"], ["tokens cannot be None"]),
    ("chat_demo: conversations None", "data/chat_demo/prepare.py", ["--out={root}/new_demo", "--conversations=None"],
     ["conversations cannot be None"]),
]


# Escapes (issue 31), read through nanogpt/reading.py: files that are not regular files (a FIFO,
# whose open() waits for a writer for ever; a folder; a device that never ends), hostile JSON
# (nested past any recursion limit, a number past Python's 4,300-digit int limit), and model
# folders whose shard index points outside them or whose safetensors header does not add up.
# reading_world(root) builds esc/ in the world; escape_cases() turns the lists into cases.

FIFO, FOLDER, DEVICE = "a FIFO", "a folder", "/dev/zero"
DEEP = b"[" * 100_000 + b"]" * 100_000  # JSON nested far past Python's recursion limit
LONG = b"1" * 5000  # a JSON number past Python's int-digit limit
SHARD = "model-00001-of-00001.safetensors"
WTE = "transformer.wte.weight"


def put(path, what):
    """Put what at path, in place of whatever is there: bytes (a file), None (nothing), FIFO,
    FOLDER or DEVICE (a link to /dev/zero)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
    if what == FIFO:
        os.mkfifo(path)
    elif what == FOLDER:
        os.mkdir(path)
    elif what == DEVICE:
        os.symlink("/dev/zero", path)
    elif what is not None:
        with open(path, "wb") as f:
            f.write(what)


def in_object(value):
    """A JSON object's bytes holding value (bytes of JSON) under one key."""
    return b'{"x": ' + value + b"}"


# a model folder's files as sample.py reads them, each with what else the folder needs for
# that file to be read (the shard index instead of model.safetensors, a chat template ...)
HF_READS = {
    "config.json": {}, "generation_config.json": {}, "tokenizer.json": {}, "tokenizer_config.json": {},
    "chat_template.jinja": {}, "special_tokens_map.json": {"chat_template.jinja": b"{{ bos_token }}"},
    "model.safetensors": {}, "model.safetensors.index.json": {"model.safetensors": None},
    SHARD: {"model.safetensors": None, "model.safetensors.index.json":
            json.dumps({"weight_map": {WTE: SHARD}}).encode()},
    "pytorch_model.bin": {"model.safetensors": None}, "vocab.txt": {"tokenizer.json": None},
}
HF_JSON = ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
           "model.safetensors.index.json"]
# (folder, file in it, what the file becomes): a dataset's and a run's files, for train.py
DATASET_FILES = [("data", "meta.json", FIFO), ("data", "train.bin", FIFO), ("data", "val.bin", FIFO),
                 ("data", "train.mask.bin", FIFO), ("data", "train.bin", FOLDER),
                 ("data", "meta.json", DEVICE), ("data", "meta.json", in_object(DEEP))]
RUN_FILES = [("run", "ckpt.pt", FIFO), ("nano/meta_missing", "meta.pkl", FIFO)]


def special_name(folder, name, what):
    """The esc/ folder of a copy of folder whose file name is what."""
    kind = {FIFO: "fifo", FOLDER: "folder", DEVICE: "device"}.get(what) or \
        ("deep" if what.startswith(b'{"x": [') else "long")
    return f"{folder.replace('/', '_')}_{name}_{kind}"


def reading_world(root):
    """esc/ in the world: copies of hf/, data/, run/ and nano/ with one file made special or
    hostile each (HF_READS, HF_JSON, DATASET_FILES, RUN_FILES), the same for the safetensors
    header and the shard index (MODEL_FOLDER_CASES), and esc/in/: inputs given by path."""
    esc = root / "esc"

    def variant(folder, files, name):
        shutil.copytree(root / folder, esc / name, symlinks=True)
        for file, what in files.items():
            put(esc / name / file, what)

    for name, needs in HF_READS.items():
        variant("hf", {**needs, name: FIFO}, special_name("hf", name, FIFO))
    for name in ("tokenizer.json", "model.safetensors", "chat_template.jinja"):
        variant("hf", {**HF_READS[name], name: FOLDER}, special_name("hf", name, FOLDER))
    variant("hf", {"tokenizer.json": DEVICE}, special_name("hf", "tokenizer.json", DEVICE))
    for name in HF_JSON:
        for value in (DEEP, LONG):
            variant("hf", {**HF_READS[name], name: in_object(value)}, special_name("hf", name, in_object(value)))
    for folder, name, what in DATASET_FILES + RUN_FILES:
        variant(folder, {name: what}, special_name(folder, name, what))
    with open(root / "hf" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = f.read()
    for name, change in SAFETENSORS_CHANGES.items():
        variant("hf", {}, name)
        safetensors_with(change(json.loads(json.dumps(header)), data), data, str(esc / name / "model.safetensors"))
    for name, weight_map in ELSEWHERE.items():
        index = json.dumps({"weight_map": weight_map(str(root))}).encode()
        variant("hf", {"model.safetensors": None, "model.safetensors.index.json": index}, name)
    with open(esc / "hf_bytes_after_the_last_tensor" / "model.safetensors", "ab") as f:
        f.write(bytes(64))
    inputs = esc / "in"
    inputs.mkdir()
    for name in ("fifo.py", "fifo.txt", "fifo.jsonl"):
        put(inputs / name, FIFO)
    for name, line in (("deep.jsonl", DEEP), ("long.jsonl", LONG)):
        put(inputs / name, line + b"\n")
    put(inputs / "chats_deep.jsonl", b'{"messages": ' + DEEP + b"}\n")
    put(inputs / "hellaswag_deep.jsonl", in_object(DEEP) + b"\n")
    put(inputs / "corpus_deep.jsonl", b'{"text": ' + DEEP + b"}\n")


def overlapping(header, data):
    """ln_2's bytes said to be ln_1's (the same shape): both tensors read the same bytes."""
    header["transformer.h.0.ln_2.weight"]["data_offsets"] = header["transformer.h.0.ln_1.weight"]["data_offsets"]
    return header


def offsets_of(kind):
    """wte's data_offsets (or shape) written as kind: floats (fractional in form) or strings."""
    def change(header, data):
        header[WTE]["data_offsets"] = [kind(o) for o in header[WTE]["data_offsets"]]
        return header
    return change


def shape_as_floats(header, data):
    header[WTE]["shape"] = [float(n) for n in header[WTE]["shape"]]
    return header


SAFETENSORS_CHANGES = {
    "hf_header_overlapping": overlapping,
    "hf_header_offsets_floats": offsets_of(float),
    "hf_header_offsets_strings": offsets_of(str),
    "hf_header_shape_floats": shape_as_floats,
    "hf_header_deep": lambda header, data: in_object(DEEP),
    "hf_bytes_after_the_last_tensor": lambda header, data: header,
}
# shard indexes naming the weights of another folder (the world's hf/), relatively or absolutely
ELSEWHERE = {
    "hf_index_elsewhere_relative": lambda root: {WTE: "../../hf/model.safetensors"},
    "hf_index_elsewhere_absolute": lambda root: {WTE: os.path.join(root, "hf", "model.safetensors")},
}
MODEL_FOLDER_CASES = [
    ("hf_header_overlapping", ["is corrupt", "ln_2.weight overlap another tensor's"]),
    ("hf_header_offsets_floats", ["is not a safetensors file", WTE, "whole numbers"]),
    ("hf_header_offsets_strings", ["is not a safetensors file", WTE, "whole numbers"]),
    ("hf_header_shape_floats", ["is not a safetensors file", WTE, "whole numbers"]),
    ("hf_header_deep", ["is not a safetensors file: its header is not readable JSON", "nests deeper"]),
    ("hf_bytes_after_the_last_tensor", ["is corrupt", "its last 64 bytes belong to no tensor"]),
    ("hf_index_elsewhere_relative", ["names the shard '../../hf/model.safetensors'", "not the name of a file in its folder"]),
    ("hf_index_elsewhere_absolute", ["names the shard", "not the name of a file in its folder"]),
]
IS = {FIFO: "named pipe (FIFO)", FOLDER: "is a folder", DEVICE: "is a device"}
# inputs given by path: (id, script, arguments, words)
INPUT_ESCAPES = [
    ("esc: config file a FIFO", "train.py", [*TRAIN, "{root}/esc/in/fifo.py"], ["cannot read config file", IS[FIFO]]),
    ("esc: config file a device", "train.py", [*TRAIN, "/dev/zero"], ["cannot read config file", IS[DEVICE]]),
    ("esc: prompt file a FIFO", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--start=FILE:{root}/esc/in/fifo.txt"],
     ["cannot read prompt file", IS[FIFO]]),
    ("esc: prompt file a device", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--start=FILE:/dev/zero"],
     ["cannot read prompt file", IS[DEVICE]]),
    ("esc: prompts nested deep", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--start=FILE:{root}/esc/in/deep.jsonl"],
     ["deep.jsonl, line 1 is not readable JSON", "nests deeper than 100"]),
    ("esc: prompts a long number", "sample.py", [*SAMPLE, "--out_dir={root}/run", "--start=FILE:{root}/esc/in/long.jsonl"],
     ["long.jsonl, line 1 is not readable JSON", "5,000 characters long"]),
    ("esc: text input a FIFO", "data/text/prepare.py", ["--input={root}/esc/in/fifo.txt", "--out={root}/new_data"],
     ["cannot read --input=", IS[FIFO]]),
    ("esc: text input a device", "data/text/prepare.py", ["--input=/dev/zero", "--out={root}/new_data"],
     ["cannot read --input=", IS[DEVICE]]),
    ("esc: char input a FIFO", "data/shakespeare_char/prepare.py",
     ["--input={root}/esc/in/fifo.txt", "--out_dir={root}/new_data"], ["cannot read --input=", IS[FIFO]]),
    ("esc: chat input a FIFO", "data/chat/prepare.py", ["--input={root}/esc/in/fifo.jsonl", "--out={root}/new_data",
                                                        "--tokenizer={root}/run"], ["cannot read --input=", IS[FIFO]]),
    ("esc: chats nested deep", "data/chat/prepare.py", ["--input={root}/esc/in/chats_deep.jsonl", "--out={root}/new_data",
                                                        "--tokenizer={root}/run"], ["line 1 is not readable JSON", "nests deeper"]),
    ("esc: hellaswag input a FIFO", "hellaswag.py", ["--input={root}/esc/in/fifo.jsonl", "--model={root}/run", "--device=cpu"],
     ["cannot read --input=", IS[FIFO]]),
    ("esc: hellaswag input nested deep", "hellaswag.py", ["--input={root}/esc/in/hellaswag_deep.jsonl",
                                                          "--model={root}/run", "--device=cpu"],
     ["line 1 is not readable JSON", "nests deeper"]),
    ("esc: corpus input a FIFO", "data/fineweb/prepare.py", ["--input={root}/esc/in/fifo.jsonl", "--out={root}/new_data"],
     ["cannot read", "fifo.jsonl", IS[FIFO]]),
    ("esc: corpus jsonl nested deep", "data/fineweb/prepare.py", ["--input={root}/esc/in/corpus_deep.jsonl",
                                                                  "--out={root}/new_data"], ["line 1 is not readable JSON", "nests deeper"]),
    ("esc: init_from a FIFO .pt", "sample.py", [*SAMPLE, "--init_from={root}/esc/run_ckpt.pt_fifo/ckpt.pt"],
     ["cannot read checkpoint", IS[FIFO]]),
    ("esc: resume from a FIFO ckpt.pt", "train.py", [*TRAIN, "--dataset={root}/data", "--init_from=resume",
                                                     "--out_dir={root}/esc/run_ckpt.pt_fifo"], ["cannot read checkpoint", IS[FIFO]]),
]


def expected(name, what):
    """The words of the line that refuses a file name that is what."""
    if isinstance(what, str):
        return ["cannot read", name, IS[what]]
    return [name, "is not readable JSON", "nests deeper than 100" if what == in_object(DEEP) else "5,000 characters long"]


def escape_cases():
    """The cases of the lists above: each special or hostile file of a model folder (sample.py,
    --init_from), of a dataset (train.py, --dataset) and of a run (sample.py, --init_from), the
    model folders, and the inputs."""
    cases = []
    for name, what in [(n, FIFO) for n in HF_READS] + [(n, FOLDER) for n in ("tokenizer.json", "model.safetensors",
                                                                           "chat_template.jinja")] + \
            [("tokenizer.json", DEVICE)] + [(n, in_object(v)) for n in HF_JSON for v in (DEEP, LONG)]:
        folder = special_name("hf", name, what)
        cases.append((f"esc: sample, init_from={folder}", "sample.py", [*SAMPLE, f"--init_from={{root}}/esc/{folder}"],
                      expected(name, what)))
    for source, name, what in DATASET_FILES:
        folder = special_name(source, name, what)
        cases.append((f"esc: train, dataset={folder}", "train.py",
                      [*TRAIN, f"--dataset={{root}}/esc/{folder}", "--out_dir={root}/new_out"], expected(name, what)))
    for source, name, what in RUN_FILES:
        folder = special_name(source, name, what)
        cases.append((f"esc: sample, init_from={folder}", "sample.py", [*SAMPLE, f"--init_from={{root}}/esc/{folder}"],
                      expected(name, what)))
    for folder, words in MODEL_FOLDER_CASES:
        cases.append((f"esc: sample, init_from={folder}", "sample.py", [*SAMPLE, f"--init_from={{root}}/esc/{folder}"],
                      words))
    return cases + INPUT_ESCAPES


def test_reading_refuses_a_socket_and_a_file_larger_than_its_kind_unread(tmp_path):
    """The two kinds the table does not make: a socket, and a file past reading.MAX_BYTES
    (sparse, so it takes no room), refused from its size before a byte of it is read."""
    import socket
    from nanogpt import reading
    from nanogpt.errors import UserError
    huge = tmp_path / "config.json"
    with open(huge, "wb") as f:
        f.truncate(reading.MAX_BYTES + 1)
    with pytest.raises(UserError, match=f"{huge}: it holds {reading.MAX_BYTES + 1:,} bytes, more than"):
        reading.read_json(str(huge), "download it again")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        with pytest.raises(UserError, match="sock: it is a socket, not a regular file"):
            reading.read_bytes(str(tmp_path / "sock"))

def all_cases():
    """[(id, script, args, words, marks)] of every case."""
    cases = [(i, s, a, w, ()) for i, s, a, w in knob_cases()]
    new_out = "--out_dir={root}/new_out"
    for what, args, words in TRAIN_CASES:
        cases.append((what, "train.py", [*TRAIN, "--dataset={root}/data", new_out, *args], words, ()))
    for folder, words in FOLDER_CASES:
        cases.append((f"train: init_from={folder}", "train.py",
                      [*TRAIN, "--dataset={root}/data", new_out, f"--init_from={{root}}/{folder}"], words, ()))
    for folder, words in FOLDER_CASES + SAMPLE_ONLY_FOLDERS:
        cases.append((f"sample: init_from={folder}", "sample.py",
                      [*SAMPLE, f"--init_from={{root}}/{folder}"], words, ()))
    for folder, words in RESUME_CASES:
        cases.append((f"train: resume {folder}", "train.py",
                      [*TRAIN, "--dataset={root}/data", "--init_from=resume", f"--out_dir={{root}}/{folder}"],
                      words, ()))
    for what, args, words in SAMPLE_CASES:
        cases.append((what, "sample.py", [*SAMPLE, "--out_dir={root}/run", *args], words, ()))
    for what, args, words in CHAT_CASES:
        cases.append((what, "chat.py", ["--device=cpu", "--out_dir={root}/run", "--prompt=ROMEO:", *args], words, ()))
    for what, args, words in EXPORT_CASES:
        cases.append((what, "export_hf.py", args, words, ()))
    for what, script, args, words in PREPARE_CASES + BENCH_CASES:
        cases.append((what, script, args, words, ()))
    for what, args, words in OUT_DIR_CASES:
        cases.append((what, "train.py", [*TRAIN, "--dataset={root}/data", *args], words, ()))
    for what, args, words in ESCAPE_TRAIN_CASES:
        cases.append((what, "train.py", [*TRAIN, "--dataset={root}/data", new_out, *args], words, ()))
    cases += [(what, script, args, words, ()) for what, script, args, words in ESCAPE_CASES]
    cases += [(what, script, args, words, ()) for what, script, args, words in escape_cases()]
    return cases


# -----------------------------------------------------------------------------
# Issue 31: decoding values that would overflow, token ids outside the vocabulary, model folders
# that decode into NaN, and chat templates that fail, loop or build too much. Their world
# (decoding_and_template_folders) and their cases (decoding_and_template_cases), apart from the
# table above.

def qwen(folder, config=None, generation=None):
    """test_generation_config's tiny Qwen2 folder, its config.json and generation_config.json
    then updated with config and generation (or replaced by them, where given as JSON text, as a
    NaN must be)."""
    qwen_folder(folder)
    for name, change in (("config.json", config), ("generation_config.json", generation)):
        if isinstance(change, str):
            (folder / name).write_text(change)
        elif change is not None:
            (folder / name).write_text(json.dumps({**json.loads((folder / name).read_text()), **change}))


def weights_times(folder, factor, name=None):
    """Multiply the folder's weights (or only the tensor `name`) by factor."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    tensors = {k: v * factor if name in (None, k) else v for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


# chat templates that fail, each as tokenizer_config.json's chat_template: {how: (template,
# words of the line)}; every line also names the template's file
TEMPLATES = {
    "zero_division": ("{{ 1 / 0 }}", ["failed on the conversation", "ZeroDivisionError"]),
    "include": ("{% include 'other.jinja' %}", ["no loader"]),
    "import": ("{% import 'macros.jinja' as m %}{{ m.x }}", ["no loader"]),
    "extends": ("{% extends 'base.jinja' %}", ["no loader"]),
    "range_huge": ("{{ range(10**10)|list }}", ["MAX_RANGE"]),
    "recursive_macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ["RecursionError"]),
    "repeat_huge": ("{{ 'a' * 10**10 }}", ["built more than 10,000,000 characters"]),
    "output_huge": ("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", ["built more than"]),
    "doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                 "{% endfor %}{{ ns.s }}", ["built more than"]),
    "captured_block": ("{% set x %}{% for i in range(99999) %}" + "y" * 1000 + "{% endfor %}{% endset %}",
                       ["built more than"]),
    "width_filter": ("{{ 'x'|center(10**9) }}", ["a width or a count of 1000000000"]),
    "width_method": ("{{ 'x'.ljust(10**9) }}", ["a width or a count of 1000000000"]),
    "width_percent": ("{{ '%0999999999d' % 1 }}", ["formats with a width of 0999999999"]),
    "width_format": ("{{ '{:>999999999}'.format(1) }}", ["formats with a width of 999999999"]),
    "power": ("{{ 7 ** 99999999 }}", ["an integer of more than 4,300 digits"]),
    "syntax": ("{% for %}", ["is not a jinja template", "line 1"]),
    "unsafe": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", ["unsafe"]),
    "raises": ("{{ raise_exception('roles must alternate') }}", ["refused the conversation: roles must alternate"]),
}


def decoding_and_template_folders(root, vocab_size):
    """root/dec/<how>: tiny Qwen2 folders damaged one way; root/tpl/<how>: hf/ with a chat
    template of TEMPLATES (and tpl/jinja_file, one in chat_template.jinja); config files that
    ban every token of the run's vocabulary and all but the end of text of a Qwen2's."""
    dec, tpl = root / "dec", root / "tpl"
    eos = tiny_bpe().token_to_id("<|endoftext|>")
    qwen(dec / "eps_negative", config={"rms_norm_eps": -1e-6})
    qwen(dec / "eps_zero", config={"rms_norm_eps": 0})
    qwen(dec / "eos_huge", generation={"eos_token_id": 10**12})
    qwen(dec / "eos_negative", generation={"eos_token_id": [eos, -1]})
    qwen(dec / "temperature_nan", generation='{"do_sample": true, "temperature": NaN}')
    qwen(dec / "top_p_infinite", generation='{"do_sample": true, "top_p": Infinity}')
    qwen(dec / "penalty_tiny", generation={"repetition_penalty": 1e-300})
    qwen(dec / "nan_weights")
    weights_times(dec / "nan_weights", float("nan"))
    qwen(dec / "loud")  # logits a million times larger: a tiny temperature overflows them
    weights_times(dec / "loud", 1e6, "model.norm.weight")
    qwen(dec / "good")
    (root / "suppress_all.py").write_text(f"suppress_tokens = {list(range(vocab_size))}\n")
    (root / "suppress_all_but_eos.py").write_text(
        f"suppress_tokens = {[i for i in range(tiny_bpe().get_vocab_size()) if i != eos]}\n")
    for how, (template, _) in TEMPLATES.items():
        shutil.copytree(root / "hf", tpl / how)
        settings = json.loads((tpl / how / "tokenizer_config.json").read_text())
        (tpl / how / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": template}))
    shutil.copytree(root / "hf", tpl / "jinja_file")
    (tpl / "jinja_file" / "chat_template.jinja").write_text("{{ 1 / 0 }}")


def decoding_and_template_cases():
    """[(id, script, args, words, marks)]: decoding values refused (generated over the options
    and their bounds), model folders that would decode into NaN, and chat templates that fail."""
    f32 = torch.finfo(torch.float32)
    sample = [*SAMPLE, "--out_dir={root}/run"]
    cases = []
    for option in ("temperature", "repetition_penalty"):  # the logits are divided in float32
        for value in (f32.tiny / 10, 1e-300, f32.max * 10, 1e300):
            cases.append((f"decode: {option}={value!r}", "sample.py", [*sample, f"--{option}={value!r}"],
                          [f"{option} must be", "in float32's range", f"got {value!r}"]))
    for option in ("presence_penalty", "frequency_penalty"):  # OpenAI's range
        for value in (2.5, -3.0, 1e308, -1e308):
            cases.append((f"decode: {option}={value!r}", "sample.py", [*sample, f"--{option}={value!r}"],
                          [f"{option} must be in [-2, 2]", f"got {value!r}"]))
    for option in ("suppress_tokens", "bad_words"):
        for ids in ([-1], [10**6], [3, 2**63 - 1]):
            flag = ids if option == "suppress_tokens" else [ids]
            cases.append((f"decode: {option}={flag}", "sample.py", [*sample, f"--{option}={flag}"],
                          [f"{option}: {ids[-1]} is not a token id", "the vocabulary has"]))
    cases += [
        ("decode: suppress every token", "sample.py", [*sample, "{root}/suppress_all.py"],
         ["suppress_tokens and bad_words ban all", "tokens of the vocabulary"]),
        ("decode: length_penalty overflowing with beams", "sample.py",
         [*sample, "--num_beams=2", "--temperature=0", "--length_penalty=5000.0"],
         ["length_penalty=5000.0 is too far from 0"]),
    ]
    folders = [  # (what, the folder, more arguments, words)
        ("rms_norm_eps negative", "eps_negative", [], ["norm_eps", "must be a positive number, got -1e-06"]),
        ("rms_norm_eps 0", "eps_zero", [], ["norm_eps", "must be a positive number, got 0"]),
        ("eos_token_id 10**12", "eos_huge", [], ["eos_token_id: 1000000000000 is not a token id",
                                                 "the vocabulary has"]),
        ("eos_token_id [eos, -1]", "eos_negative", [], ["eos_token_id: -1 is not a token id"]),
        ("temperature NaN", "temperature_nan", [],
         ["generation_config.json's temperature must be a finite number, got nan"]),
        ("top_p Infinity", "top_p_infinite", [], ["generation_config.json's top_p must be a finite number, got inf"]),
        ("repetition_penalty 1e-300", "penalty_tiny", [], ["repetition_penalty must be in float32's range",
                                                           "got 1e-300"]),
        ("NaN weights, sampling", "nan_weights", [], ["the model's next-token logits are not finite numbers"]),
        ("NaN weights, greedy", "nan_weights", ["--temperature=0"],
         ["the model's next-token logits are not finite numbers"]),
        ("logits overflowing a tiny temperature", "loud", ["--temperature=1e-35"],
         ["no token can be sampled at new token 1", "after temperature=1e-35"]),
        ("min_new_tokens banning the last token left", "good", ["{root}/suppress_all_but_eos.py", "--min_new_tokens=3"],
         ["no token can be sampled at new token 1", "after suppress_tokens (and min_new_tokens=3 before it)"]),
    ]
    for what, how, args, words in folders:
        cases.append((f"decode: a model folder's {what}", "sample.py",
                      [*SAMPLE, f"--init_from={{root}}/dec/{how}", *args], words))
    chat = ["--device=cpu", "--prompt=hi", "--max_new_tokens=3"]
    for how, (_, words) in TEMPLATES.items():
        cases.append((f"template: {how}", "chat.py", [*chat, f"--init_from={{root}}/tpl/{how}"],
                      ["the chat template of", "tokenizer_config.json", *words]))
    cases.append(("template: in chat_template.jinja", "chat.py", [*chat, "--init_from={root}/tpl/jinja_file"],
                  ["the chat template of", "chat_template.jinja", "ZeroDivisionError"]))
    return [(*case, ()) for case in cases]


CASES = all_cases() + decoding_and_template_cases()
assert len({c[0] for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.fixture(scope="module")
def results(world, request):
    """{id: (result, changed paths)} of every case this session runs (-k may select some), run
    in one go."""
    root, _ = world
    selected = {item.callspec.params["what"] for item in request.session.items
                if getattr(item, "callspec", None) and "what" in item.callspec.params}
    cases = [c for c in CASES if c[0] in selected]
    specs = [{"script": script, "args": [a.replace("{root}", str(root)) for a in args], "watch": [root]}
             for _, script, args, _, _ in cases]
    ran = run_cases(specs, timeout=30)
    return {case[0]: outcome for case, outcome in zip(cases, ran)}


@pytest.mark.parametrize("what, words", [pytest.param(c[0], c[3], marks=c[4], id=c[0]) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(what, words, results, world):
    root, mounted = world
    if "read-only" in what and not mounted:
        pytest.skip("a read-only folder needs a read-only mount (root ignores permissions)")
    result, changed = results[what]
    assert_user_error(result, *words)
    assert changed == [], changed


def test_the_table_covers_every_kind():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 150
    for kind in ("ckpt/", "hf_bad/", "nano/", "lora", "sample: start", "out_dir", "text:",
                 "train_step:", "loading:", "lora_memory:", "generation:", "export:", "chat:",
                 "resume", "None", "another type",
                 # issue 31's escapes: files that are not regular, hostile JSON, model folders
                 # (the esc: cases); links, long names, metrics, sizes, declared types
                 "esc:", "a link to nowhere", "loop of links", "300-character", "metrics.jsonl",
                 "batch_size 10**9", "trainable", "device an int"):
        assert any(kind in i for i in ids), kind


def test_the_table_covers_decoding_and_templates():
    ids = [c[0] for c in CASES]
    for kind in ("decode: temperature", "decode: presence_penalty", "decode: suppress_tokens",
                 "decode: bad_words", "decode: a model folder's", "template: "):
        assert sum(i.startswith(kind) for i in ids) >= 2, kind


def test_prepare_char_tokenizer_error_is_the_first_line(world, tmp_path):
    """A char model's tokenizer meets a character it lacks: the error comes before any
    progress bar, as the only line on stderr."""
    root, _ = world
    result = run_script("data/text/prepare.py", f"--input={root}/text_snow.txt", f"--out={tmp_path}/out",
                        f"--tokenizer={root}/run")
    assert_user_error(result, "outside the vocabulary", "'\u2603'")
    assert not (tmp_path / "out").exists()


def test_the_table_covers_every_escape_class():
    ids = [c[0] for c in ESCAPE_TRAIN_CASES + ESCAPE_CASES]
    for kind, least in (("link", 4), ("300-character", 3), ("metrics.jsonl", 4), ("batch_size", 4),
                        ("trainable", 3), ("device", 5), ("dtype", 4), ("None", 3)):
        assert sum(kind in i for i in ids) >= least, kind


@pytest.mark.parametrize("where, words", [
    ("a_file", ["is a file, not a folder"]),
    ("", ["out_dir must be a folder's path"]),
    ("a_file/out", ["is under", "a_file, which is a file"]),
    ("readonly/out", ["cannot be written", "Read-only file system"]),
    ("readonly/run", ["cannot be written", "Read-only file system"]),
])
def test_check_out_dir_refuses_what_no_run_can_write_into(where, words, world):
    """atomic.check_out_dir itself (train.py's out_dir cases above run once train.py calls
    it): one line, and nothing made, not even the probe file."""
    from nanogpt.atomic import check_out_dir
    from nanogpt.errors import UserError
    root, mounted = world
    if where.startswith("readonly") and not mounted:
        pytest.skip("a read-only folder needs a read-only mount (root ignores permissions)")
    before = sorted(os.listdir(root))
    with pytest.raises(UserError) as info:
        check_out_dir(str(root / where) if where else "")
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert sorted(os.listdir(root)) == before
    check_out_dir(str(root / "new_out" / "deeper"))  # a new folder in a writable one: fine
    assert not (root / "new_out").exists()
