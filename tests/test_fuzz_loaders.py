"""Seeded mutation fuzzing of the loaders: byte flips, truncations and JSON / structure value
swaps of a real ckpt.pt (written by checkpoint.save_run), a safetensors file's header, a
config.json and a nanoGPT meta.pkl; hostile JSON (nested past any limit, numbers of thousands of
digits) planted in every JSON file a model folder or a dataset has; and safetensors byte ranges
moved, made fractional or strings, or files with bytes added or cut. Every outcome must be a
load or a clean UserError, no other exception escaping; a byte range that no longer fits the
file must be refused. Seeded, so a failure repeats; each failure names its mutation."""

import json
import pickle
import random
import shutil
import time

import pytest
import torch

from nanogpt import checkpoint
from nanogpt import dataset
from nanogpt import hf
from nanogpt.errors import UserError
from model import GPT, GPTConfig
from nanogpt.optim import configure_optimizers
from nanogpt.tokenizer import CharTokenizer

CHARS = "\n !'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# what a swapped value becomes: each kind of JSON / pickle value, and the awkward numbers
VALUES = [None, True, False, 0, -1, 1, 3, 2**70, -(2**40), 0.5, -1e308, 1e308, float("nan"),
          float("inf"), "", "x", "gpt2", "F32", [], [1, -2], [[]], {}, {"kind": "char"}]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """(ckpt.pt bytes, the checkpoint as a dict, the HF folder, meta.pkl's object): a tiny char
    run saved by save_run, its export, and its vocabulary as nanoGPT's meta.pkl."""
    root = tmp_path_factory.mktemp("originals")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=len(CHARS)))
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
    loss.backward()
    optimizer.step()
    tokenizer = CharTokenizer(CHARS)
    path = str(root / "ckpt.pt")
    checkpoint.save_run(path, model, optimizer, {"dataset": "x"}, tokenizer.spec(), iter_num=1,
                        best_val_loss=2.0, val_loss=2.0, sampler=torch.Generator().get_state(),
                        torch_rng=torch.get_rng_state(), cuda_rng=[])
    hf.export(model, tokenizer, str(root / "hf"))
    with open(path, "rb") as f:
        data = f.read()
    return data, torch.load(path, weights_only=True), str(root / "hf"), {
        "vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)}}


def flip(data, rng, n=None):
    """data with n (1 to 4) random bytes replaced by random ones."""
    out = bytearray(data)
    for _ in range(n or rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def swap(obj, rng, values=VALUES):
    """A deep copy of a JSON-like / pickled structure with one randomly chosen value (at any
    depth) replaced by one of values, or one key deleted; returns (copy, what was done)."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append(path + [key])
                walk(value, path + [key])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                paths.append(path + [i])
                walk(value, path + [i])

    walk(obj, [])
    out = copy_structure(obj)
    path = rng.choice(paths)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
        return out, f"deleted {path}"
    value = rng.choice(values)
    parent[path[-1]] = copy_structure(value)
    return out, f"{path} = {value!r}"


def copy_structure(obj):
    if isinstance(obj, dict):
        return {k: copy_structure(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_structure(v) for v in obj]
    return obj  # tensors are not changed in place, so they may be shared


def outcome(load):
    """None if load() loads or refuses with a UserError; else the exception that escaped."""
    try:
        load()
    except UserError as e:
        assert "\n" not in str(e), str(e)
    except Exception as e:  # anything else escaping is the failure this test looks for
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def fuzz(tmp_path, originals, kind, n, seed):
    """Apply n seeded mutations of one kind; returns the [(mutation, escaped exception)]."""
    data, run, hf_folder, meta = originals
    rng = random.Random(seed)
    escaped = []
    for i in range(n):
        case = tmp_path / f"{kind}{i}"
        if kind == "ckpt bytes":
            case.mkdir()
            what = "truncated" if rng.random() < 0.3 else "flipped"
            body = data[:rng.randrange(len(data))] if what == "truncated" else flip(data, rng)
            (case / "ckpt.pt").write_bytes(body)
            loads = [lambda: checkpoint.load_model(str(case)), lambda: checkpoint.load_run(str(case / "ckpt.pt"))]
        elif kind == "ckpt values":
            case.mkdir()
            mutated, what = swap(run, rng)
            torch.save(mutated, str(case / "ckpt.pt"))
            loads = [lambda: checkpoint.load_model(str(case)), lambda: checkpoint.load_run(str(case / "ckpt.pt"))]
        elif kind in ("safetensors header", "config.json"):
            shutil.copytree(hf_folder, case)
            what = mutate_folder(case, kind, rng)
            loads = [lambda: checkpoint.load_model(str(case))]
        else:  # meta.pkl of a nanoGPT run: its ckpt.pt without a tokenizer
            case.mkdir()
            nanogpt = {k: v for k, v in run.items() if k not in ("tokenizer", "checksums")}
            torch.save(nanogpt, str(case / "ckpt.pt"))
            good = pickle.dumps(meta)
            r = rng.random()
            if r < 0.4:
                body, what = flip(good, rng), "flipped"
            elif r < 0.55:
                body, what = good[:rng.randrange(len(good))], "truncated"
            else:
                mutated, what = swap(meta, rng)
                body = pickle.dumps(mutated)
            (case / "meta.pkl").write_bytes(body)
            loads = [lambda: checkpoint.load_tokenizer(str(case)), lambda: checkpoint.load_model(str(case))]
        for load in loads:
            error = outcome(load)
            if error:
                escaped.append((f"{kind} #{i}: {what}", error))
                break
        shutil.rmtree(case)
    return escaped


def mutate_folder(folder, kind, rng):
    """Mutate the folder's model.safetensors header or its config.json in place; returns what."""
    if kind == "config.json":
        path = folder / "config.json"
        text = path.read_text()
        if rng.random() < 0.25:
            path.write_bytes(flip(text.encode(), rng))
            return "flipped"
        mutated, what = swap(json.loads(text), rng)
        path.write_text(json.dumps(mutated))
        return what
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header, body = raw[8:8 + size], raw[8 + size:]
    r = rng.random()
    if r < 0.3:  # bytes of the header itself, its length unchanged
        header, what = flip(header, rng), "header bytes flipped"
    elif r < 0.4:  # the 8-byte length
        path.write_bytes(flip(raw[:8], rng, 1) + raw[8:])
        return "header size flipped"
    elif r < 0.5:
        path.write_bytes(raw[:rng.randrange(8 + size + 16)])
        return "truncated in or just past the header"
    else:
        mutated, what = swap(json.loads(header), rng)
        header = json.dumps(mutated).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)
    return what


@pytest.mark.parametrize("kind, n, seed", [("ckpt bytes", 120, 1), ("ckpt values", 80, 2),
                                           ("safetensors header", 120, 3), ("config.json", 80, 4), ("config.json", 45, 43),
                                           ("meta.pkl", 80, 5)])
def test_mutated_files_load_or_give_one_clean_error(kind, n, seed, originals, tmp_path):
    escaped = fuzz(tmp_path, originals, kind, n, seed)
    assert not escaped, "\n".join(f"{what} -> {error}" for what, error in escaped)


def test_the_unmutated_files_load(originals, tmp_path):
    data, run, hf_folder, meta = originals
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(data)
    model, tokenizer = checkpoint.load_model(str(tmp_path / "run"))
    assert tokenizer.chars == CHARS
    checkpoint.load_run(str(tmp_path / "run" / "ckpt.pt"))
    assert checkpoint.load_model(hf_folder)[0].config.vocab_size == len(CHARS)
    nanogpt = {k: v for k, v in run.items() if k not in ("tokenizer", "checksums")}
    (tmp_path / "nano").mkdir()
    torch.save(nanogpt, str(tmp_path / "nano" / "ckpt.pt"))
    (tmp_path / "nano" / "meta.pkl").write_bytes(pickle.dumps(meta))
    assert checkpoint.load_tokenizer(str(tmp_path / "nano")).chars == CHARS


def test_a_flipped_tensor_byte_is_reported_as_corruption(originals, tmp_path):
    """A byte of a tensor's data flipped on disk (torch.load does not notice: the file is still
    a valid zip of the right sizes) is caught by the checksum save_run stored."""
    data, run, _, _ = originals
    target = run["model"]["transformer.h.0.mlp.c_fc.weight"].numpy().tobytes()[:16]
    at = data.index(target)
    (tmp_path / "ckpt.pt").write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:])
    with pytest.raises(UserError, match=r"is corrupted: tensor transformer.h.0.mlp.c_fc.weight "
                                        "does not match the checksum"):
        checkpoint.load_model(str(tmp_path))


def test_a_meta_pkl_whose_unpickling_error_runs_over_lines_is_one_line(originals, tmp_path):
    """A persistent-id opcode makes pickle's error two lines long; the refusal is still one."""
    _, run, _, _ = originals
    torch.save({k: v for k, v in run.items() if k not in ("tokenizer", "checksums")}, str(tmp_path / "ckpt.pt"))
    (tmp_path / "meta.pkl").write_bytes(b"P0\n.")
    with pytest.raises(UserError) as refused:
        checkpoint.load_tokenizer(str(tmp_path))
    assert "\n" not in str(refused.value) and "meta.pkl" in str(refused.value)


# -----------------------------------------------------------------------------
# Hostile JSON in every JSON file a model folder or a dataset has, and safetensors byte ranges
# that do not fit the file (nanogpt/reading.py, hf.safetensors_header)

HOSTILE = "\0hostile"  # a string value planted by swap, which hostile_text then replaces


def hostile_text(rng):
    """(JSON text, what it is): a value nested deeper than any real file (past Python's recursion
    limit, or just around reading.MAX_DEPTH), or a number of up to thousands of digits."""
    if rng.random() < 0.5:
        depth = rng.choice([rng.randint(95, 105), rng.randint(900, 1100), 20_000])
        opener, closer = rng.choice([("[", "]"), ('{"a": ', "}")])
        return opener * depth + "0" + closer * depth, f"nested {depth} deep"
    digits = rng.randint(90, 6000)
    return rng.choice(["", "-"]) + "9" * digits + rng.choice(["", ".5", "e10"]), f"a number of {digits} digits"


def plant(text, rng):
    """JSON text (an object's) with a hostile value in place of one of its values, at any depth."""
    mutated, what = swap(json.loads(text), rng, values=[HOSTILE])
    hostile, kind = hostile_text(rng)
    return json.dumps(mutated).replace(json.dumps(HOSTILE), hostile), f"{what}: {kind}"


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """A tiny dataset of CHARS' ids, as a preparer writes it."""
    folder = tmp_path_factory.mktemp("data") / "d"
    ids = [i % len(CHARS) for i in range(200)]
    dataset.write_dataset(str(folder), CharTokenizer(CHARS), ids, ids, "fuzz")
    return str(folder)


def header_and_body(path):
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def write_safetensors(path, header, body):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def test_hostile_json_in_any_json_file_gives_one_clean_error(originals, char_data, tmp_path):
    """config.json, tokenizer_config.json, a generation_config.json, a shard index, the
    safetensors header and a dataset's meta.json, each with a hostile value planted somewhere."""
    _, _, hf_folder, _ = originals
    rng = random.Random(6)
    escaped = []
    for i in range(60):
        case = tmp_path / str(i)
        target = rng.choice(["config.json", "tokenizer_config.json", "generation_config.json",
                             "model.safetensors.index.json", "safetensors header", "meta.json"])
        if target == "meta.json":
            shutil.copytree(char_data, case)
            load = lambda: dataset.open_dataset(str(case))  # noqa: E731
        else:
            shutil.copytree(hf_folder, case)
            load = lambda: checkpoint.load_model(str(case))  # noqa: E731
        if target == "generation_config.json":
            (case / target).write_text(json.dumps({"temperature": 0.7, "eos_token_id": [0, 1]}))
        if target == "model.safetensors.index.json":  # the weights as one shard and its index
            (case / "model.safetensors").rename(case / "model-00001-of-00001.safetensors")
            header, _ = header_and_body(case / "model-00001-of-00001.safetensors")
            (case / target).write_text(json.dumps({"metadata": {}, "weight_map": {
                name: "model-00001-of-00001.safetensors" for name in header if name != "__metadata__"}}))
        if target == "safetensors header":
            header, body = header_and_body(case / "model.safetensors")
            text, what = plant(json.dumps(header), rng)
            write_safetensors(case / "model.safetensors", text.encode(), body)
        else:
            text, what = plant((case / target).read_text(), rng)
            (case / target).write_text(text)
        error = outcome(load)
        if error:
            escaped.append((f"{target} #{i}: {what}", error))
        shutil.rmtree(case)
    assert not escaped, "\n".join(f"{what} -> {error}" for what, error in escaped)


def misplace(header, body, rng):
    """(header, body, what): a safetensors file's tensors' byte ranges changed so that they no
    longer lie one after another over the whole data, each tensor's size as its shape says."""
    sized = [name for name, info in header.items()
             if name != "__metadata__" and info["data_offsets"][1] > info["data_offsets"][0]]
    name, other = rng.sample(sized, 2)
    offsets = header[name]["data_offsets"]
    r = rng.random()
    if r < 0.25:
        shift = rng.choice([-1, 1]) * rng.randint(1, 64)
        header[name]["data_offsets"] = [o + shift for o in offsets]
        return header, body, f"{name} moved by {shift}"
    if r < 0.4:
        header[name]["data_offsets"] = [offsets[0] + 0.5, offsets[1] + 0.5]
        return header, body, f"{name} at fractional offsets"
    if r < 0.5:
        key = rng.choice(["data_offsets", "shape"])
        header[name][key] = [float(n) for n in header[name][key]]
        return header, body, f"{name}'s {key} as floats"
    if r < 0.6:
        header[name]["data_offsets"] = [str(o) for o in offsets]
        return header, body, f"{name}'s offsets as strings"
    if r < 0.7:
        header[name]["data_offsets"] = offsets[::-1]
        return header, body, f"{name}'s offsets reversed"
    if r < 0.8 and header[other]["dtype"] == header[name]["dtype"] and header[other]["shape"] == header[name]["shape"]:
        header[name]["data_offsets"] = header[other]["data_offsets"]
        return header, body, f"{name} over {other}'s bytes"
    if r < 0.9:
        extra = rng.randint(1, 64)
        return header, body + bytes(rng.randrange(256) for _ in range(extra)), f"{extra} bytes added at the end"
    cut = rng.randint(1, 64)
    return header, body[:-cut], f"{cut} bytes cut from the end"


def test_safetensors_byte_ranges_that_do_not_fit_the_file_are_refused(originals, tmp_path):
    """What the safetensors library refuses (ranges overlapping, leaving bytes unused, running
    past the file, fractional or not numbers) is refused here too, in one line: such a file
    would load other bytes as a tensor, or bytes of two tensors as one."""
    _, _, hf_folder, _ = originals
    rng = random.Random(7)
    loaded = []
    for i in range(60):
        case = tmp_path / str(i)
        shutil.copytree(hf_folder, case)
        header, body = header_and_body(case / "model.safetensors")
        header, body, what = misplace(header, body, rng)
        write_safetensors(case / "model.safetensors", header, body)
        try:
            checkpoint.load_model(str(case))
            loaded.append(f"#{i}: {what} -> loaded")
        except UserError as e:
            assert "\n" not in str(e), str(e)
        except Exception as e:  # anything but a UserError escaping fails too
            loaded.append(f"#{i}: {what} -> {type(e).__name__}: {str(e)[:200]}")
        shutil.rmtree(case)
    assert not loaded, "\n".join(loaded)


# -----------------------------------------------------------------------------
# Chat templates (issue 31): seeded random templates made of hostile fragments (loops that never
# end, texts, widths and integers too big to build, failing calls, recursion) among ordinary
# ones, nested in loops and macros. Each renders, or gives one UserError naming the template,
# within the render's time bound.

ORDINARY = ["{{ bos_token }}", "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}",
            "{% if add_generation_prompt %}<assistant>{% endif %}", "{{ messages|length }}",
            "{{ ('ab' * 3) ~ '%05d' % 7 ~ '{:>4}'.format(1) }}", "{{ messages|tojson }}"]
HOSTILE = ["{{ 1 / 0 }}", "{% include 'x.jinja' %}", "{{ range(10**10)|list }}", "{{ 'a' * 10**10 }}",
           "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
           "{% set r = range(99999) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
           "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", "{{ 'x'|center(10**9) }}",
           "{{ '%0999999999d' % 1 }}", "{{ '{:>999999999}'.format(1) }}", "{{ 'x'.ljust(10**9) }}",
           "{{ 7 ** 99999999 }}", "{{ (range(99999)|list) * 99999 }}", "{{ lipsum(10**9) }}",
           "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
           "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
           "{% macro g() %}{{ g() }}{% endmacro %}{{ g() }}", "{{ raise_exception('no') }}",
           "{{ messages.__class__.__mro__[1].__subclasses__() }}", "{% for %}",
           "{% set x %}{% for i in range(99999) %}" + "y" * 500 + "{% endfor %}{% endset %}{{ x }}"]
WRAPPERS = ["{}", "{{% for k in range(3) %}}{}{{% endfor %}}", "{{% macro w() %}}{}{{% endmacro %}}{{{{ w() }}}}",
            "{{% set s %}}{}{{% endset %}}{{{{ s }}}}", "{{% if messages %}}{}{{% endif %}}"]


def random_template(rng):
    """One to four fragments, none to two of them hostile, each in a random wrapper."""
    hostile = rng.randint(0, 2)
    fragments = rng.sample(ORDINARY, rng.randint(0 if hostile else 1, 2)) + rng.sample(HOSTILE, hostile)
    rng.shuffle(fragments)
    return "".join(rng.choice(WRAPPERS).format(f) for f in fragments)


def test_random_hostile_templates_render_or_give_one_line_within_the_bounds(monkeypatch):
    from nanogpt import tokenizer
    monkeypatch.setattr(tokenizer, "RENDER_SECONDS", 0.25)  # the bounds, small for a quick test
    monkeypatch.setattr(tokenizer, "RENDER_CHARS", 10**6)
    rng = random.Random(31)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well met."}]
    seen = set()
    for n in range(40):
        template = random_template(rng)
        start = time.monotonic()
        try:
            text = tokenizer.render_chat_template(template, conversation, True, source="fuzz.jinja",
                                                  special_tokens={"bos_token": "<s>"})
            seen.add("rendered")
            assert len(text) <= tokenizer.RENDER_CHARS, template
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith("the chat template of fuzz.jinja "), (template, e)
            seen.add(next((b for b in ("ran for more than", "built more than", "width", "integer")
                           if b in str(e)), "failed"))
        # past the bound, at most the one step that ran over (on a busy machine)
        assert time.monotonic() - start < tokenizer.RENDER_SECONDS + 2, template
    assert seen == {"rendered", "ran for more than", "built more than", "width", "integer", "failed"}, seen
