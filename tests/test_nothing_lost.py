"""Nothing the user had is lost (issue 31's data-loss points): an export deletes only the folders
it made, a script writes over a model or dataset only if it made it (or is told to), a dataset is
replaced whole, one run holds an out_dir, a dataset must fit its model's tokenizer, and a NaN or
an infinity is refused before anything runs."""

import builtins
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from nanogpt import atomic
import conftest
from conftest import ONE_THREAD, REPO, assert_user_error
from configurator import configure
from nanogpt import dataset
from nanogpt.errors import UserError
from nanogpt.tokenizer import CharTokenizer, HFTokenizer, TiktokenTokenizer


def run_script(*args):
    return conftest.run_script(*args, env=ONE_THREAD)


def digests(folder):
    """{path relative to folder: sha256} of every file under folder (folders too, as None)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def users_folder(path, note="mine, keep it"):
    os.makedirs(path)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write(note)


def write(folder, name, text):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


# -----------------------------------------------------------------------------
# 1. an export deletes only the temporary folders it made, never a user's of a like name

def test_export_keeps_a_users_folders_named_like_its_temporary_ones(trained, tmp_path):
    folder = tmp_path / "model"
    for name in ("model.old.1", "model.tmp.2", "model.old.99999999"):
        users_folder(tmp_path / name)
    before = digests(tmp_path)
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert result.returncode == 0, result.stderr
    after = digests(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("model/") and k != "model"} == before
    assert (folder / "config.json").exists()


# replace_folder in a process that dies (as a SIGKILL would end it) at its `n`th rename
DIE_AT_RENAME = """
import os, sys
from nanogpt import atomic
n, renames, rename = int(sys.argv[2]), [], os.rename
def rename_or_die(src, dst):
    renames.append(src)
    if len(renames) == n:
        os._exit(9)
    rename(src, dst)
os.rename = rename_or_die
def write(tmp):
    with open(os.path.join(tmp, "weights"), "w") as f:
        f.write("new")
atomic.replace_folder(sys.argv[1], write)
"""


@pytest.mark.parametrize("die_at", [1, 2])
def test_what_a_killed_replace_left_is_cleared_or_put_back(die_at, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    write(folder, "weights", "old")
    users_folder(tmp_path / "export.old.5")
    result = subprocess.run([sys.executable, "-c", DIE_AT_RENAME, str(folder), str(die_at)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    assert result.returncode == 9, result.stderr
    # killed before the old folder is moved aside (1: the new one is left written beside it), or
    # between the two renames (2: the old one is aside, no folder in place); either way the next
    # replace finds the old folder in place, and only its own leftovers gone
    atomic.clear_stale(str(folder))
    assert (folder / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["export", "export.old.5"]
    assert (tmp_path / "export.old.5" / "notes.txt").read_text() == "mine, keep it"


# -----------------------------------------------------------------------------
# 2. an export or a preparer writes over a model or dataset only if it made it, or is told to

@pytest.fixture
def finetuned_from_folder(trained, tmp_path):
    """(run folder, model folder): a run fine-tuned in full from a Hugging Face folder (its
    checkpoint is the trained run's, its config's init_from the folder)."""
    from nanogpt.checkpoint import load_model
    from nanogpt import hf
    base = tmp_path / "base"
    model, tokenizer = load_model(os.path.join(trained[0], "ckpt.pt"))
    hf.export(model, tokenizer, str(base))
    run = torch.load(os.path.join(trained[0], "ckpt.pt"), weights_only=True)
    run["config"]["init_from"] = str(base)
    (tmp_path / "run").mkdir()
    torch.save(run, tmp_path / "run" / "ckpt.pt")
    return tmp_path / "run", base


def test_export_refuses_the_folder_a_full_finetune_started_from(finetuned_from_folder):
    run, base = finetuned_from_folder
    before = digests(base)
    result = run_script("export_hf.py", f"--out_dir={run}", f"--export_dir={base}")
    assert_user_error(result, f"--export_dir={base}", "fine-tuned from", "choose another --export_dir")
    assert digests(base) == before


def test_a_resumed_full_finetune_still_names_the_folder_it_started_from(trained, char_dataset, tmp_path):
    """train.py from a model folder, then resumed: the checkpoint still names the folder, so the
    export refuses to replace it, and an export elsewhere carries the folder's tokenizer and
    chat template."""
    from nanogpt import hf
    from nanogpt.checkpoint import load_model
    base, out, export = tmp_path / "base", tmp_path / "run", tmp_path / "export"
    hf.export(*load_model(os.path.join(trained[0], "ckpt.pt")), str(base))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    settings = json.loads((base / "tokenizer_config.json").read_text())
    write(base, "tokenizer_config.json", json.dumps({**settings, "chat_template": template}))
    args = [*conftest.TINY, f"--dataset={char_dataset}", f"--out_dir={out}", "--eval_interval=2"]
    for start, iters in ((base, 2), ("resume", 4)):
        result = run_script("train.py", *args, f"--init_from={start}", f"--max_iters={iters}")
        assert result.returncode == 0, result.stderr
    before = digests(base)
    result = run_script("export_hf.py", f"--out_dir={out}", f"--export_dir={base}")
    assert_user_error(result, f"--export_dir={base}", "fine-tuned from", "choose another --export_dir")
    assert digests(base) == before
    result = run_script("export_hf.py", f"--out_dir={out}", f"--export_dir={export}")
    assert result.returncode == 0, result.stderr
    assert (export / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == template


def a_models_folder(folder):
    """A Hugging Face folder as transformers' save_pretrained writes one (names an export has)."""
    folder.mkdir()
    write(folder, "config.json", json.dumps({"model_type": "gpt2", "transformers_version": "5.0"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return digests(folder)


def test_export_replaces_another_model_only_with_overwrite(trained, tmp_path):
    folder = tmp_path / "downloaded"
    before = a_models_folder(folder)
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert_user_error(result, str(folder), "config.json", "did not make", "--overwrite=True")
    assert digests(folder) == before
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}",
                        "--overwrite=True")
    assert result.returncode == 0, result.stderr
    assert digests(folder) != before
    # an export of this run is its own to replace: again, without --overwrite
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert result.returncode == 0, result.stderr


def test_chat_demo_prepare_refuses_a_model_it_did_not_make(tmp_path):
    folder = tmp_path / "my-model"
    before = a_models_folder(folder)
    result = run_script("data/chat_demo/prepare.py", f"--out={folder}", "--conversations=20")
    assert_user_error(result, "config.json", "did not make", "--overwrite=True")
    assert digests(folder) == before


@pytest.mark.parametrize("what", ["a model", "nanoGPT's dataset"])
def test_text_prepare_refuses_a_model_or_anothers_dataset(what, tmp_path):
    folder = tmp_path / "out"
    if what == "a model":
        before = a_models_folder(folder)
    else:
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\1\0" * 100)
        (folder / "val.bin").write_bytes(b"\1\0" * 10)
        (folder / "meta.pkl").write_bytes(b"pickled")
        before = digests(folder)
    text = tmp_path / "text.txt"
    text.write_text("hello world, " * 50)
    args = [f"--input={text}", "--tokenizer=char", f"--out={folder}", "--num_proc=1"]
    result = run_script("data/text/prepare.py", *args)
    assert_user_error(result, str(folder), "did not make", "--overwrite=True")
    assert digests(folder) == before
    result = run_script("data/text/prepare.py", *args, "--overwrite=True")
    assert result.returncode == 0, result.stderr
    assert dataset.open_dataset(str(folder))[1]["source"] == str(text)
    result = run_script("data/text/prepare.py", *args)  # its own dataset: written again at will
    assert result.returncode == 0, result.stderr


# -----------------------------------------------------------------------------
# 3. a dataset is replaced whole: never the new train.bin beside the old val.bin

def old_dataset(folder):
    tok = CharTokenizer("abc")
    dataset.write_dataset(str(folder), tok, [0, 1, 2] * 20, [2, 1, 0] * 5, "old")
    return digests(folder)


def test_a_full_disk_while_writing_val_keeps_the_old_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    before = old_dataset(folder)
    real_open = builtins.open

    def open_full_for_val(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(file)).startswith("val.bin"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_full_for_val)
    with pytest.raises(UserError, match="No space left on device"):
        dataset.write_dataset(str(folder), CharTokenizer("abcd"), [3, 2, 1] * 30, [1, 2, 3] * 7, "new")
    monkeypatch.undo()
    assert digests(folder) == before
    assert dataset.open_dataset(str(folder))[1]["source"] == "old"


# write_dataset in a process that dies as val.bin is renamed into place
DIE_AT_VAL = """
import os, sys
from nanogpt.dataset import write_dataset
from nanogpt.tokenizer import CharTokenizer
replace = os.replace
def replace_or_die(src, dst):
    if os.path.basename(dst) == "val.bin":
        os._exit(9)
    replace(src, dst)
os.replace = replace_or_die
write_dataset(sys.argv[1], CharTokenizer("abcd"), [3, 2, 1] * 30, [1, 2, 3] * 7, "new")
"""


def test_a_preparation_killed_part_way_is_refused_not_mixed(tmp_path):
    folder = tmp_path / "data"
    old_dataset(folder)
    result = subprocess.run([sys.executable, "-c", DIE_AT_VAL, str(folder)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    assert result.returncode == 9, result.stderr
    with pytest.raises(UserError, match="being replaced when its preparation stopped.*prepare it again"):
        dataset.open_dataset(str(folder))
    # preparing again puts it right, and the stale temporary files go
    dataset.write_dataset(str(folder), CharTokenizer("abcd"), [3, 2, 1] * 30, [1, 2, 3] * 7, "new")
    assert dataset.open_dataset(str(folder))[1]["source"] == "new"
    assert sorted(os.listdir(folder)) == ["meta.json", "train.bin", "val.bin"]


def test_a_new_dataset_without_masks_drops_the_old_ones(tmp_path):
    folder = tmp_path / "data"
    tok = CharTokenizer("abc")
    dataset.write_dataset(str(folder), tok, [0, 1] * 20, [1, 0] * 5, masks=([1, 0] * 20, [0, 1] * 5))
    dataset.write_dataset(str(folder), tok, [0, 1, 2] * 20, [2, 1, 0] * 5)
    splits, _ = dataset.open_dataset(str(folder))
    assert sorted(splits) == ["train", "val"]


# -----------------------------------------------------------------------------
# 4. one run per out_dir

HOLD = """
import sys
from nanogpt import atomic
with atomic.lock_out_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""
TAKE = """
import sys
import configurator
from nanogpt import atomic
def main():
    with atomic.lock_out_dir(sys.argv[1]):
        print("taken")
configurator.run(main)
"""


def python(code, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, **kwargs)


def test_a_second_run_on_an_out_dir_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    holder = python(HOLD, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n"
        assert (out / atomic.LOCK_FILE).read_text() == f"{holder.pid}\n"
        second = python(TAKE, str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = second.communicate(timeout=60)
        assert_user_error(subprocess.CompletedProcess([], second.returncode, stdout, stderr),
                          str(out), "in use by another run", f"pid {holder.pid}")
        holder.send_signal(signal.SIGKILL)  # the kernel lets go of a killed holder's lock
        holder.wait(timeout=60)
    finally:
        holder.kill()
        holder.wait()
    third = python(TAKE, str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = third.communicate(timeout=60)
    assert third.returncode == 0 and stdout == "taken\n", stderr
    assert os.listdir(out) == []  # the killed holder's lock file went with the third's lock


def test_train_py_refuses_an_out_dir_another_run_holds(trained, char_dataset, tmp_path):
    out = tmp_path / "out"
    holder = python(HOLD, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n"
        result = run_script("train.py", *conftest.TINY, f"--dataset={char_dataset}",
                                     f"--out_dir={out}", "--max_iters=2")
        assert_user_error(result, "in use by another run", f"pid {holder.pid}")
        assert os.listdir(out) == [atomic.LOCK_FILE]  # nothing of the refused run written
    finally:
        holder.kill()
        holder.wait()


def test_a_released_lock_leaves_the_run_and_can_be_taken_again(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"a run's")
    for _ in range(2):
        with atomic.lock_out_dir(str(tmp_path)):
            assert (tmp_path / atomic.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


# -----------------------------------------------------------------------------
# 5. a dataset must fit its model's tokenizer

def test_a_dataset_of_another_tokenizer_does_not_fit(tmp_path, gpt2_tokenizer):
    meta = dataset.write_dataset(str(tmp_path / "data"), CharTokenizer("abc"), [0, 1, 2] * 20, [1] * 5)
    dataset.check_fits(meta, CharTokenizer("abc").spec(), "data", "out")
    with pytest.raises(UserError, match=r"dataset 'data' was prepared with another tokenizer "
                                        r"\(char, 3 characters\) than out's \(char, 3 characters\)"):
        dataset.check_fits(meta, CharTokenizer("abd").spec(), "data", "out")
    with pytest.raises(UserError, match="tiktoken's gpt2.*prepare it with the model's tokenizer"):
        dataset.check_fits(meta, TiktokenTokenizer("gpt2").spec(), "data", "gpt2")
    dataset.check_fits({"vocab_size": 3}, TiktokenTokenizer("gpt2").spec(), "data", "gpt2")  # says nothing


def test_train_py_refuses_to_resume_on_a_dataset_of_another_vocabulary(trained, tmp_path):
    out_dir, _ = trained
    other = dataset.write_dataset(str(tmp_path / "data"), CharTokenizer("abcdefgh"), [0, 1, 2] * 400,
                                  [1, 2] * 200)
    before = digests(out_dir)
    result = run_script("train.py", *conftest.TINY, f"--dataset={tmp_path / 'data'}",
                                 f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=30")
    assert_user_error(result, "was prepared with another tokenizer", "(char, 8 characters)")
    assert digests(out_dir) == before and other["vocab_size"] == 8


def test_the_same_vocabulary_in_another_form_fits(tmp_path, gpt2_tokenizer):
    from nanogpt import hf
    chars = "\n !$&',-.3:;?ABCabc"
    export = HFTokenizer(hf.char_tokenizer_json(chars))  # a char run's export, loaded back
    assert dataset.same_tokens(CharTokenizer(chars).spec(), export.spec())
    assert not dataset.same_tokens(CharTokenizer(chars[::-1]).spec(), export.spec())
    # GPT-2's vocab.json and merges.txt (as an export writes them) as a tokenizers BPE:
    # tiktoken's gpt2 by another road
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    gpt2 = TiktokenTokenizer("gpt2")
    files = hf.tokenizer_files(gpt2, 1024)
    folder = str(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(files[name])
    bpe = Tokenizer(models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    theirs = HFTokenizer(bpe.to_str())
    assert theirs.encode("Hello world\n\n") == gpt2.encode("Hello world\n\n")
    assert dataset.tokenizer_fingerprint(theirs.spec()) == dataset.tokenizer_fingerprint(gpt2.spec())


@pytest.mark.parametrize("change, words", [
    ({"vocab_size": 5}, ["vocab_size is 5, but its tokenizer has 3 tokens"]),
    ({"tokenizer": {"kind": "tokenizers", "json": "{not json"}}, ["tokenizer.json is unreadable"]),
])
def test_a_meta_json_whose_tokenizer_is_not_its_own_is_refused(change, words, tmp_path):
    folder = tmp_path / "data"
    meta = dataset.write_dataset(str(folder), CharTokenizer("abc"), [0, 1, 2] * 20, [1] * 5)
    write(folder, "meta.json", json.dumps({**meta, **change}))
    with pytest.raises(UserError) as info:
        dataset.open_dataset(str(folder))
    assert all(w in str(info.value) for w in words) and "prepare the dataset again" in str(info.value)


# -----------------------------------------------------------------------------
# 6. no NaN or infinity in any number, refused before anything runs

KNOBS = {"learning_rate": 6e-4, "grad_clip": 1.0, "lora_alpha": 16.0, "peak_flops": None,
         "max_iters": 100, "betas": (0.9, 0.95), "device": "cpu"}


@pytest.mark.parametrize("arg", ["--learning_rate=nan", "--learning_rate=inf", "--learning_rate=1e400",
                                 "--grad_clip=inf", "--lora_alpha=nan", "--learning_rate=-inf",
                                 "--peak_flops=1e999", "--betas=(0.9, 1e999)"])
def test_every_float_knob_is_finite(arg):
    with pytest.raises(UserError, match=f"--{arg[2:].split('=')[0]}: .* must be a finite number"):
        configure(dict(KNOBS), [arg])


def test_a_float_knob_in_a_config_file_is_finite(tmp_path):
    config = tmp_path / "config.py"
    config.write_text("learning_rate = float('nan')\n")
    with pytest.raises(UserError, match="learning_rate must be a finite number, got nan"):
        configure(dict(KNOBS), [str(config)])


@pytest.mark.parametrize("key", ["learning_rate", "peak_flops", "max_iters"])
def test_a_number_past_floats_is_refused_not_hung(key):
    with pytest.raises(UserError, match=f"{key} is a number of 401 digits"):
        configure(dict(KNOBS), [f"--{key}=1{'0' * 400}"])


@pytest.mark.parametrize("arg", ["--learning_rate=nan", "--grad_clip=1e400", f"--learning_rate=1{'0' * 400}"])
def test_train_refuses_a_nonfinite_knob_and_writes_nothing(arg, char_dataset, tmp_path):
    result = run_script("train.py", *conftest.TINY, f"--dataset={char_dataset}",
                        f"--out_dir={tmp_path / 'out'}", "--max_iters=2", arg)
    assert_user_error(result, arg.split("=")[0][2:])
    assert not (tmp_path / "out").exists()
