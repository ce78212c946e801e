"""
How much memory and time loading GPT-2 takes: ours (checkpoint.load_model) against
nanoGPT's way (transformers' GPT2LMHeadModel.from_pretrained, then a copy into a GPT).

$ python bench/loading.py                         # gpt2-xl: 6.2 GB on disk, ~20 GB of RAM at peak
$ python bench/loading.py --model=gpt2 --repeats=5   # quicker
$ python bench/loading.py --model=qwen2.5-0.5b       # Qwen2.5-0.5B's shape, against transformers

It writes a checkpoint of the chosen GPT-2 size with random weights, in the hub's layout
(config.json + model.safetensors, as save_pretrained writes them), to a temporary folder.
Then each way loads it in a fresh process, taking turns, `repeats` times; a process reports
its peak resident memory (everything it ever held: Python, torch, the model) and
the load's wall time (imports excluded), and its resident memory before the load began (Python
and torch), so that what the load itself added shows too. Ours also loads in bfloat16, to show
the halving. --model=qwen2.5-0.5b writes Qwen2.5-0.5B's shape (a Qwen2 folder, its tied
embedding saved once, and a stand-in tokenizer.json) and times transformers'
Qwen2ForCausalLM.from_pretrained as the peer.
Needs transformers (requirements-test.txt); tiktoken's gpt2 files are read as in any load.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

from bench import shapes  # noqa: E402
from configurator import configure, run  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402

# -----------------------------------------------------------------------------
model = "gpt2-xl"  # the shape to write: gpt2, gpt2-medium, gpt2-large, gpt2-xl, qwen2.5-0.5b
repeats = 3  # loads of each kind; the figures are the median and the spread
folder = ""  # where to write the checkpoint; empty means a temp folder, removed afterwards
# -----------------------------------------------------------------------------

SIZES = shapes.GPT2
QWEN = {"qwen2.5-0.5b": shapes.QWEN2_5_0_5B}

# the measured programs; each prints {"seconds": load time, "peak": peak RSS in bytes}
PEAK = """
import resource, sys
def peak():
    # Linux: VmHWM, the peak resident memory since this program started (ru_maxrss can be the
    # parent's, inherited through fork); elsewhere ru_maxrss, in bytes on macOS
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def resident():
    # the resident memory now (VmRSS), where it can be read; else 0
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return 0
"""
OURS = PEAK + """
import json, time
from nanogpt.checkpoint import load_model
before = resident()
t0 = time.perf_counter()
model, tokenizer = load_model(sys.argv[1], dtype=sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": peak(), "before": before}))
"""
# transformers' own load of a Qwen2 folder. transformers 5 maps the safetensors file into memory
# and reads a page only when it is first used, so every weight is touched once (as the first
# forward pass would) before the peak counts
TRANSFORMERS = PEAK + """
import json, time
import torch
from transformers import Qwen2ForCausalLM
before = resident()
t0 = time.perf_counter()
model = Qwen2ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
with torch.no_grad():
    for p in model.parameters():
        p.sum()
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": peak(), "before": before}))
"""
# nanoGPT's GPT.from_pretrained: a GPT of the same shape, the transformers model, then a copy
# of every tensor, transposing the Conv1D weights
NANOGPT = PEAK + """
import json, time
import torch
from transformers import GPT2LMHeadModel
from model import GPT, GPTConfig
from nanogpt.hf import CONV1D
before = resident()
t0 = time.perf_counter()
with open(sys.argv[1] + "/config.json") as f:
    hf_config = json.load(f)
model = GPT(GPTConfig(n_layer=hf_config["n_layer"], n_head=hf_config["n_head"],
                      n_embd=hf_config["n_embd"], vocab_size=hf_config["vocab_size"],
                      block_size=hf_config["n_positions"], bias=True))
sd = model.state_dict()
model_hf = GPT2LMHeadModel.from_pretrained(sys.argv[1])
sd_hf = model_hf.state_dict()
with torch.no_grad():
    for k, v in sd_hf.items():
        if not k.endswith((".attn.bias", ".attn.masked_bias")):
            sd[k].copy_(v.t() if k.endswith(CONV1D) else v)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": peak(), "before": before}))
"""


def write_checkpoint(path, n_layer, n_head, n_embd):
    """Random weights of that shape, saved as transformers' save_pretrained saves a GPT-2.
    Returns the weights' size in bytes."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)  # GPT-2's vocab and context
    with torch.device("meta"):  # the names and shapes, without the memory
        shapes = {k: v.shape for k, v in GPT2LMHeadModel(config).state_dict().items()}
    del shapes["lm_head.weight"]  # tied to wte: save_pretrained stores it once
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return sum(t.nbytes for t in tensors.values())


def write_qwen_checkpoint(path, shape):
    """Random weights of a Qwen2 shape, saved as save_pretrained saves them (a tied head once),
    with a stand-in tokenizer.json (load_model reads one). Returns the weights' size in bytes."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**shape)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    del shapes["lm_head.weight"]
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(os.path.join(path, "tokenizer.json"))
    return sum(t.nbytes for t in tensors.values())


def measure(program, *args):
    result = subprocess.run([sys.executable, "-c", program, *args], cwd=REPO_DIR,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"a measured load failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(runs, key, scale):
    values = sorted(r[key] / scale for r in runs)
    return statistics.median(values), values[0], values[-1]


def main():
    configure(globals(), nullable=())
    if model not in SIZES and model not in QWEN:
        raise UserError(f"model must be one of {', '.join([*SIZES, *QWEN])}, got {model!r}")
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, got {repeats}")
    if folder and not os.path.isdir(folder):
        raise UserError(f"--folder={folder} is not a folder: give an existing folder for the "
                        "checkpoint (or leave it empty for a temp folder)")
    with tempfile.TemporaryDirectory(dir=folder or None) as path:
        t0 = time.perf_counter()
        if model in QWEN:
            weight_bytes = write_qwen_checkpoint(path, QWEN[model])
            peer = ("transformers from_pretrained, weights touched", (TRANSFORMERS, path))
        else:
            weight_bytes = write_checkpoint(path, *SIZES[model])
            peer = ("transformers + copy (nanoGPT)", (NANOGPT, path))
        print(f"wrote a {model}-shaped checkpoint, {weight_bytes / 1e9:.2f} GB of float32 weights, "
              f"in {time.perf_counter() - t0:.0f} s")
        kinds = {"ours, float32": (OURS, path, "float32"),
                 "ours, bfloat16": (OURS, path, "bfloat16"),
                 peer[0]: peer[1]}
        runs = {kind: [] for kind in kinds}
        for i in range(repeats):  # taking turns, so a busy moment of the machine hits all kinds
            for kind, (program, *args) in kinds.items():
                runs[kind].append(measure(program, *args))
                r = runs[kind][-1]
                print(f"run {i + 1}, {kind}: peak {r['peak'] / 1e9:.2f} GB "
                      f"({r['peak'] / weight_bytes:.2f}x the weights; the load added "
                      f"{(r['peak'] - r['before']) / weight_bytes:.2f}x to the {r['before'] / 1e9:.2f} GB "
                      f"held before it), {r['seconds']:.1f} s", flush=True)

    print(f"\n{model}: weights {weight_bytes / 1e9:.2f} GB (float32); median [min - max] of {repeats}")
    for kind, kind_runs in runs.items():
        peak = summary(kind_runs, "peak", weight_bytes)
        seconds = summary(kind_runs, "seconds", 1)
        print(f"  {kind:30s} peak RSS {peak[0]:.2f}x the weights [{peak[1]:.2f} - {peak[2]:.2f}], "
              f"load {seconds[0]:.1f} s [{seconds[1]:.1f} - {seconds[2]:.1f}]")
    for kind, kind_runs in runs.items():
        added = statistics.median((r["peak"] - r["before"]) / weight_bytes for r in kind_runs)
        print(f"  {kind:30s} peak RSS less the {statistics.median(r['before'] for r in kind_runs) / 1e9:.2f} GB "
              f"held before the load: {added:.2f}x the weights")
    ours, theirs = runs["ours, float32"], runs[peer[0]]
    memory, seconds = (summary(theirs, key, 1)[0] / summary(ours, key, 1)[0] for key in ("peak", "seconds"))
    print(f"  {peer[0]} / ours: peak memory {memory:.2f}x, load time {seconds:.2f}x")


if __name__ == "__main__":
    run(main)
