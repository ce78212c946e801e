"""Nothing the user had is lost: a diverged, refused, failed or interrupted run, or a failed
export, leaves every checkpoint, metrics file and export as it was; bad input is one line on
stderr, exit code 2."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanogpt.checkpoint import save_run
import conftest
from conftest import ONE_THREAD, REPO, TINY, assert_user_error, run_cases
from nanogpt.errors import UserError
from model import GPT, GPTConfig
from nanogpt.optim import configure_optimizers

# train.py's tiny model, with a peak FLOP/s given: no matmul is timed for the MFU figure
TRAIN = [*TINY, "--peak_flops=1e12"]


def run_script(*args):
    """conftest's run_script, on one thread."""
    return conftest.run_script(*args, env=ONE_THREAD)


def digests(folder):
    """{path relative to folder: sha256} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of a good run's out_dir (ckpt.pt, metrics.jsonl, loss.png), to be damaged."""
    path = tmp_path / "out"
    shutil.copytree(trained[0], path)
    return path


# train.py in a subprocess that, as iteration N begins, sends itself a real signal (N:SIGINT,
# N:SIGTERM), makes its optimizer's state infinite (N:poison: what an overflowed step leaves;
# the weights and the loss stay finite) or fails (N:raise), e.g. "21:poison,22:SIGINT"
AT_ITERATION = """
import os, signal, sys
import configurator, train
actions = dict(a.split(":") for a in sys.argv[1].split(","))
optimizers, configure, get_lr = [], train.configure_optimizers, train.get_lr
def configure_and_keep(*args, **kwargs):
    optimizers.append(configure(*args, **kwargs))
    return optimizers[-1]
def get_lr_and_act(it, config):
    action = actions.get(str(it))
    if action == "poison":
        for state in optimizers[0].state.values():
            state["exp_avg_sq"].fill_(float("inf"))
    elif action == "raise":
        raise RuntimeError("a simulated failure")
    elif action:
        os.kill(os.getpid(), getattr(signal, action))
    return get_lr(it, config)
train.configure_optimizers, train.get_lr = configure_and_keep, get_lr_and_act
sys.argv = ["train.py", *sys.argv[2:]]
configurator.run(train.main)
"""


def train_with(actions, *args):
    return run_script("-c", AT_ITERATION, actions, *TRAIN, *args)


# -----------------------------------------------------------------------------
# A1. a checkpoint is never written with weights or a loss that are not finite

def tiny_run():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_save_run_refuses_nonfinite_state_and_keeps_the_file(where, tmp_path):
    model, optimizer = tiny_run()
    path = str(tmp_path / "ckpt.pt")
    save_run(path, model, optimizer, {}, None, iter_num=1)
    before = digests(tmp_path)
    with torch.no_grad():
        if where == "weights":
            model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        else:
            next(iter(optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(UserError, match=r"NaN or infinite values at iteration 2.*left as it was") as info:
        save_run(path, model, optimizer, {}, None, iter_num=2)
    assert ("c_fc.weight" if where == "weights" else "exp_avg_sq") in str(info.value)
    assert digests(tmp_path) == before  # no temporary file left either


def test_a_diverged_run_interrupted_keeps_the_good_checkpoint(run_copy, char_dataset):
    # at learning_rate=1e6 the loss is NaN within 4 iterations; none is logged, so only the save
    # path can see it
    before = digests(run_copy)
    result = train_with("24:SIGINT", f"--dataset={char_dataset}", f"--out_dir={run_copy}",
                        "--init_from=resume", "--learning_rate=1e6", "--max_iters=1000",
                        "--eval_interval=1000", "--log_interval=1000")
    assert_user_error(result, "diverged", "not saved", "left as it was")
    assert "interrupted: saved" not in result.stdout
    assert digests(run_copy) == before


@pytest.mark.parametrize("path, actions, stop", [
    ("Ctrl-C", "21:poison,22:SIGINT", "--max_iters=1000"),
    ("end of run", "21:poison", "--max_iters=22"),  # an evaluation, with a finite val loss, and a save
])
def test_nonfinite_optimizer_state_is_never_saved(path, actions, stop, run_copy, char_dataset):
    before = digests(run_copy)
    result = train_with(actions, f"--dataset={char_dataset}", f"--out_dir={run_copy}",
                        "--init_from=resume", stop, "--eval_interval=1000", "--log_interval=1")
    assert_user_error(result, "exp_avg_sq", "NaN or infinite values at iteration 22", "left as it was")
    assert "iter 22: loss" in result.stdout  # the loss stayed finite: only the save path saw it
    assert digests(run_copy)["ckpt.pt"] == before["ckpt.pt"]


# -----------------------------------------------------------------------------
# A2. an export never replaces a model the run is made of

@pytest.fixture(scope="module")
def lora_chain(trained, char_dataset, tmp_path_factory):
    """root/lora2, a LoRA run on root/lora1, a LoRA run on root/hfbase, an export of a run."""
    root = tmp_path_factory.mktemp("chain")
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={root / 'hfbase'}")
    assert result.returncode == 0, result.stderr
    for run, base in (("lora1", root / "hfbase"), ("lora2", root / "lora1")):
        result = run_script("train.py", *TRAIN, f"--dataset={char_dataset}", f"--out_dir={root / run}",
                            f"--init_from={base}", "--finetune=lora", "--lora_rank=2",
                            "--max_iters=2", "--eval_interval=2")
        assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize("export_dir, words", [
    ("lora2", ["is the run's own folder"]),
    ("lora1", ["is the folder of", "lora2", "LoRA base"]),
    ("hfbase", ["is the folder of", "lora1", "LoRA base"]),  # the base of the base
    (".", ["holds", "which the export would delete"]),
])
def test_export_refuses_a_folder_the_run_is_made_of(export_dir, words, lora_chain):
    before = digests(lora_chain)
    result = run_script("export_hf.py", f"--out_dir={lora_chain / 'lora2'}",
                        f"--export_dir={lora_chain / export_dir}")
    assert_user_error(result, *words)
    assert digests(lora_chain) == before


def test_export_refuses_a_folder_of_other_files(trained, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert_user_error(result, "todo.txt", "not an export's files")
    assert os.listdir(folder) == ["todo.txt"]


# -----------------------------------------------------------------------------
# A5. an export is swapped in whole: a failure part way leaves the previous one intact

# export_hf.py with the disk full at one point of the export: part way through the weights, or
# when the written files are flushed (where a full disk shows with delayed allocation)
DISK_FULL = """
import errno, os, sys
import configurator, export_hf, safetensors.torch
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
def half_then_full(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata)[:1000])
    full()
if sys.argv[1] == "weights":
    safetensors.torch.save_file = half_then_full
else:
    os.fsync = full
sys.argv = ["export_hf.py", *sys.argv[2:]]
configurator.run(export_hf.main)
"""


def assert_previous_export_intact(folder, before, model):
    from nanogpt.checkpoint import load_model
    assert digests(folder) == before
    assert sorted(os.listdir(os.path.dirname(folder))) == ["hf"]  # no temporary folder left
    loaded, _ = load_model(str(folder))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.fixture
def exported(trained, tmp_path):
    """(folder, digests, model) of a good export of the trained run, in tmp_path/exports/hf."""
    from nanogpt.checkpoint import load_model
    folder = tmp_path / "exports" / "hf"
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert result.returncode == 0, result.stderr
    return folder, digests(folder), load_model(str(folder))[0]


@pytest.mark.parametrize("where", ["weights", "flush"])
def test_a_failed_export_leaves_the_previous_one(where, exported, trained):
    folder, before, model = exported
    result = run_script("-c", DISK_FULL, where, f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert_user_error(result, "cannot write the export", "No space left on device", "left as it was")
    assert_previous_export_intact(folder, before, model)


def mount_tmpfs(mount, size):
    """A tmpfs of size bytes at mount (a new folder), or the test skipped with the reason."""
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs, which only root can mount (the simulated one runs)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the simulated full disk runs")
    return mount


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 160 KiB at tmp_path/disk: room for one tiny export, not two."""
    yield mount_tmpfs(tmp_path / "disk", 160 << 10)
    subprocess.run(["umount", str(tmp_path / "disk")], check=True)


def test_a_full_disk_while_training_keeps_the_last_checkpoint(char_dataset, tmp_path):
    # room for a run's first checkpoint, plot and log, and half of a second checkpoint
    args = [*TRAIN, f"--dataset={char_dataset}", "--max_iters=30", "--eval_interval=10"]
    sizing = tmp_path / "sizing"
    result = run_script("train.py", *args, "--max_iters=10", f"--out_dir={sizing}")
    assert result.returncode == 0, result.stderr
    size = sum(f.stat().st_size for f in sizing.iterdir())
    disk = mount_tmpfs(tmp_path / "disk", size + (sizing / "ckpt.pt").stat().st_size // 2)
    try:
        out = disk / "run"
        result = run_script("train.py", *args, f"--out_dir={out}")
        assert_user_error(result, f"could not write {out / 'ckpt.pt'}", "as it was")
        assert "No space left on device" in result.stderr or "as on a full disk" in result.stderr
        assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 10
        assert not list(out.glob("*.tmp.*"))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records and records[-1]["iter"] == 20  # whole lines only
    finally:
        subprocess.run(["umount", str(tmp_path / "disk")], check=True)


def test_a_real_full_disk_leaves_the_previous_export(small_disk, trained):
    from nanogpt.checkpoint import load_model
    folder = small_disk / "hf"
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert result.returncode == 0, result.stderr
    before, model = digests(folder), load_model(str(folder))[0]
    assert 80_000 < sum(os.path.getsize(folder / name) for name in before) < 160_000  # one fits, two do not
    result = run_script("export_hf.py", f"--out_dir={trained[0]}", f"--export_dir={folder}")
    assert_user_error(result, "cannot write the export", "No space left on device", "left as it was")
    assert_previous_export_intact(folder, before, model)


# -----------------------------------------------------------------------------
# A3. a fine-tune never writes over the run it starts from

def test_a_full_finetune_into_its_own_folder_is_refused(run_copy, char_dataset):
    before = digests(run_copy)
    result = run_script("train.py", *TRAIN, f"--dataset={char_dataset}", f"--out_dir={run_copy}",
                        f"--init_from={run_copy}", "--finetune=full", "--max_iters=25")
    assert_user_error(result, "init_from's folder", "would overwrite")
    assert digests(run_copy) == before


# -----------------------------------------------------------------------------
# A4. a new run that fails before it has started leaves the previous run's files

def test_runlog_replaces_the_old_metrics_only_at_its_first_record(tmp_path):
    from nanogpt.runlog import RunLog
    old = tmp_path / "metrics.jsonl"
    old.write_text('{"iter": 5, "loss": 1.0}\n')
    log = RunLog(str(tmp_path))
    assert old.read_text() == '{"iter": 5, "loss": 1.0}\n'  # not yet
    log.log({"iter": 0, "loss": 2.0})
    log.log({"iter": 1, "loss": 1.5})
    assert old.read_text() == '{"iter": 0, "loss": 2.0}\n{"iter": 1, "loss": 1.5}\n'
    RunLog(str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # no empty file, no folder


def test_a_new_run_failing_at_its_first_step_keeps_the_old_metrics(run_copy, char_dataset, tmp_path):
    before = digests(run_copy)
    for out_dir in (run_copy, tmp_path / "new"):
        result = train_with("0:raise", f"--dataset={char_dataset}", f"--out_dir={out_dir}", "--max_iters=5")
        assert result.returncode == 1 and "a simulated failure" in result.stderr
    assert digests(run_copy) == before
    assert not (tmp_path / "new").exists()


# -----------------------------------------------------------------------------
# B. bad input: one line, exit code 2, nothing the user had changed

def damage(dataset, how):
    """Spoil a copy of a char dataset (train.bin, val.bin as uint16, meta.json) in one way."""
    train, val, meta = (os.path.join(dataset, n) for n in ("train.bin", "val.bin", "meta.json"))
    if how == "odd bytes":
        with open(train, "ab") as f:
            f.write(b"\0")
    elif how == "empty split":
        open(val, "wb").close()
    elif how == "meta a list":
        with open(meta, "w") as f:
            f.write("[65]")
    elif how == "meta not json":
        with open(meta, "w") as f:
            f.write("vocab_size: 65")
    elif how == "meta float32":
        with open(meta) as f:
            text = f.read()
        with open(meta, "w") as f:
            f.write(text.replace('"uint16"', '"float32"'))
    elif how == "ids too big":  # an id past the characters of meta.json's vocabulary
        with open(val, "r+b") as f:
            f.seek(100)
            f.write((70).to_bytes(2, "little"))
    elif how == "short split":
        with open(val, "r+b") as f:
            f.truncate(2 * 20)  # 20 tokens, fewer than block_size + 1 = 33


YAML = "n_layer: 4\nn_embd: 128\n"
# (what, train.py arguments ({yaml}: a YAML config file, {none}: a config file of comments),
#  damage to the dataset, words of the one-line error)
TRAIN_CASES = [
    ("None for a number", ["--batch_size=None"], None, ["batch_size cannot be None"]),
    ("negative learning_rate", ["--learning_rate=-0.001"], None, ["learning_rate must not be negative"]),
    ("beta1 of 1", ["--beta1=1.0"], None, ["beta1 must be in [0, 1)"]),
    ("negative beta2", ["--beta2=-0.5"], None, ["beta2 must be in [0, 1)"]),
    ("negative weight_decay", ["--weight_decay=-0.1"], None, ["weight_decay must not be negative"]),
    ("dropout of 1", ["--dropout=1.0"], None, ["dropout must be in [0, 1)"]),
    ("no warmup, no decay", ["--warmup_iters=0", "--lr_decay_iters=0"], None,
     ["lr_decay_iters (0) must be more than warmup_iters (0)"]),
    ("decay ends in the warmup", ["--warmup_iters=100", "--lr_decay_iters=50"], None,
     ["lr_decay_iters (50) must be more than warmup_iters (100)"]),
    ("negative min_lr", ["--min_lr=-1e-5"], None, ["min_lr must not be negative"]),
    ("negative seed", ["--seed=-1"], None, ["seed must be in [0, 2**64)"]),
    ("seed of 2**64", [f"--seed={2**64}"], None, ["seed must be in [0, 2**64)"]),
    ("max_iters below the checkpoint's", ["--init_from=resume", "--max_iters=10"], None,
     ["max_iters=10 is below iteration 20", "nothing written"]),
    ("a YAML config file", ["{yaml}"], None, ["line 1", "'n_layer: 4' sets nothing", "not YAML"]),
    ("a config file that sets nothing", ["{none}"], None, ["sets no config key"]),
    ("n_embd=65536", ["--n_embd=65536"], None, ["n_embd=65536", "103.1B parameters", "GB", "memory"]),
    ("a huge block_size", [f"--block_size={10**12}"], None, [f"block_size={10**12}", "GB", "memory"]),
    ("a .bin of odd length", [], "odd bytes", ["train.bin", "not a whole number of uint16 token ids"]),
    ("an empty split", [], "empty split", ["val.bin", "is empty"]),
    ("meta.json a list", [], "meta a list", ["meta.json", "not an object"]),
    ("meta.json not JSON", [], "meta not json", ["meta.json", "not readable JSON"]),
    ("meta.json's dtype float32", [], "meta float32", ["meta.json", "dtype 'float32'", "'uint16' or 'uint32'"]),
    ("ids past the vocabulary", [], "ids too big", ["val.bin", "token id 70", "but the model's vocabulary has"]),
    ("a split shorter than a window", [], "short split", ["val.bin", "20 tokens", "block_size=32"]),
]

@pytest.fixture(scope="module")
def train_cases(trained, char_dataset, tmp_path_factory):
    """{what: (CompletedProcess-like result, the watched files that changed)}: each case runs
    (conftest.run_cases) on its own copies of the trained run and the dataset."""
    root = tmp_path_factory.mktemp("bad")
    (root / "config.yaml").write_text(YAML)
    (root / "comments.py").write_text("# n_layer = 4\n")
    cases = []
    for i, (what, args, how, _) in enumerate(TRAIN_CASES):
        folder = root / str(i)
        shutil.copytree(trained[0], folder / "out")
        shutil.copytree(char_dataset, folder / "data")
        if how:
            damage(str(folder / "data"), how)
        args = [a.format(yaml=root / "config.yaml", none=root / "comments.py") for a in args]
        cases.append({"script": "train.py", "watch": [folder / "out", folder / "data"],
                      "args": [*TRAIN, f"--dataset={folder / 'data'}", f"--out_dir={folder / 'out'}",
                               "--max_iters=25", *args]})
    return {what: ran for (what, *_), ran in zip(TRAIN_CASES, run_cases(cases))}


@pytest.mark.parametrize("what, words", [(c[0], c[3]) for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_input_and_changes_nothing(what, words, train_cases):
    result, changed = train_cases[what]
    assert_user_error(result, *words)
    assert changed == []


def test_prepare_refuses_a_text_too_short_to_split(char_dataset, tmp_path):
    shutil.copytree(char_dataset, tmp_path / "data")
    before = digests(tmp_path / "data")
    (tmp_path / "one.txt").write_text("a")
    result = run_script("data/shakespeare_char/prepare.py", f"--input={tmp_path / 'one.txt'}",
                        f"--out_dir={tmp_path / 'data'}")
    assert_user_error(result, "too short", "1 characters", "nothing written")
    assert digests(tmp_path / "data") == before


def test_sigterm_stops_saves_and_exits_0_like_ctrl_c(run_copy, char_dataset):
    result = train_with("23:SIGTERM", f"--dataset={char_dataset}", f"--out_dir={run_copy}",
                        "--init_from=resume", "--max_iters=1000", "--eval_interval=1000")
    assert result.returncode == 0, result.stderr
    assert "SIGTERM again to quit at once" in result.stdout
    assert f"interrupted: saved iteration 23 to {run_copy / 'ckpt.pt'}" in result.stdout
    assert torch.load(run_copy / "ckpt.pt", weights_only=True)["iter_num"] == 23


@pytest.mark.parametrize("script, delay", [("train.py", 0.1), ("train.py", 0.3), ("train.py", 0.6),
                                           ("sample.py", 0.3)])
def test_ctrl_c_while_a_script_starts_exits_quietly(script, delay, trained, char_dataset, tmp_path):
    # at these moments the script is still importing torch and the rest (a second or more):
    # one line, exit code 130, no traceback, nothing written. (Later, a run stops at the end of
    # its iteration and saves: the tests of Ctrl-C during training.)
    args = {"train.py": [*TRAIN, f"--dataset={char_dataset}", f"--out_dir={tmp_path / 'out'}", "--max_iters=100000"],
            "sample.py": [f"--out_dir={trained[0]}", "--device=cpu", "--max_new_tokens=100000"]}[script]
    # Ctrl-C as at a terminal: a child inherits an ignored SIGINT (as a shell's background
    # jobs have it) and Python then keeps ignoring it, so the child starts with the default
    proc = subprocess.Popen([sys.executable, script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr[-2000:]
    assert not (tmp_path / "out").exists()
