"""
HellaSwag (Zellers et al., 2019): 10,042 validation examples, each a context and four endings,
one of them the right one. Scored completion style, as llm.c and build-nanogpt score it: the
model reads the context followed by each ending, and the ending it finds least surprising wins.
acc_norm counts an example right when the right ending has the lowest mean loss over its
tokens; acc, when it has the lowest total loss (which favours short endings). Any model runs:
    python hellaswag.py --model=gpt2                    # a GPT-2 size, a hub id, a folder,
    python hellaswag.py --model=out-fineweb --limit=500 # or a run's out_dir
    torchrun --standalone --nproc_per_node=8 hellaswag.py --model=gpt2-xl   # a share a process

The validation file is downloaded once (with requests) into data/hellaswag/, checked, and read
from there after; --input= reads a local copy instead. train.py scores its model every
hellaswag_interval steps with the same functions:

    examples = load_examples(input, cache_dir)
    scores = evaluate(model, tokenizer, examples, device, batch_size, autocast, dist)
    # {"acc": ..., "acc_norm": ..., "examples": n}
"""

import math
import os
from contextlib import nullcontext

import requests
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanogpt.atomic import atomic_write
from configurator import configure, run
from nanogpt.errors import UserError
from nanogpt.reading import parse_json, read_bytes

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
EXAMPLES = 10042  # in the validation file: the published scores are over all of them
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hellaswag")

# -----------------------------------------------------------------------------
model = "gpt2"  # what to score: a GPT-2 size, a hub id, a model folder, a run's out_dir or ckpt.pt
input = ""  # a local hellaswag_val.jsonl (or a file of examples in its format); empty: the cache
cache_dir = ""  # where the downloaded file is kept; empty means data/hellaswag
device = "auto"  # cpu, cuda, cuda:N, mps; auto picks the best here (torchrun: this process's GPU)
dtype = "auto"  # the weights' dtype: float32, bfloat16, float16; auto: bfloat16 on a GPU, float32 on a CPU
batch_size = 16  # examples a forward pass (each is four rows, one an ending)
limit = 0  # score only the first `limit` examples; 0 means all
# -----------------------------------------------------------------------------


def parse_examples(data, source):
    """The examples of a HellaSwag jsonl file's bytes, each checked: a context, four endings
    and the label of the right one."""
    examples = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        example = parse_json(line, f"{source}, line {number}", "not a HellaSwag file")
        ok = (isinstance(example, dict) and isinstance(example.get("ctx"), str)
              and isinstance(example.get("endings"), list) and len(example["endings"]) == 4
              and all(isinstance(e, str) for e in example["endings"])
              and example.get("label") in (0, 1, 2, 3))
        if not ok:
            raise UserError(f"{source}, line {number} is not a HellaSwag example (a ctx, four "
                            "endings and a label 0-3)")
        examples.append(example)
    if not examples:
        raise UserError(f"{source} holds no examples")
    return examples


def load_examples(path="", cache_dir=""):
    """The examples of a local file (path), or of the validation file: downloaded into
    cache_dir the first time and checked, read from there after."""
    if path:
        return parse_examples(read_bytes(path, f"--input={path}"), path)
    cached = os.path.join(cache_dir or CACHE, "hellaswag_val.jsonl")
    if os.path.exists(cached):
        examples = parse_examples(read_bytes(cached), cached)
        if len(examples) != EXAMPLES:
            raise UserError(f"{cached} holds {len(examples):,} examples, not {EXAMPLES:,}: it is "
                            "damaged; delete it to download it again")
        return examples
    try:
        response = requests.get(URL, timeout=(10, 60))
        response.raise_for_status()
    except requests.RequestException as e:
        raise UserError(f"cannot download HellaSwag from {URL} ({type(e).__name__}): offline, copy "
                        f"hellaswag_val.jsonl to {cached} or give --input=FILE") from None
    examples = parse_examples(response.content, URL)
    if len(examples) != EXAMPLES:
        raise UserError(f"{URL} gave {len(examples):,} examples, not {EXAMPLES:,}: not keeping it")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    atomic_write(cached, lambda f: f.write(response.content))
    return examples


def render(example, tokenizer, block_size):
    """The four rows of an example, (ids, where the ending starts): the context's ids, then an
    ending's (after a space, as the endings continue the sentence). A row longer than the
    model's context keeps its last block_size ids, the ending whole where it fits."""
    start = [] if tokenizer.bos_token is None else [tokenizer.bos_token]
    context = start + tokenizer.encode(example["ctx"])
    rows = []
    for ending in example["endings"]:
        ids = context + tokenizer.encode(" " + ending)
        cut = max(0, len(ids) - block_size)
        rows.append((ids[cut:], max(1, len(context) - cut)))
    return rows


@torch.no_grad()
def ending_losses(model, rows, device, autocast=nullcontext()):
    """(total loss, number of ids) of each row's ending: the cross-entropy of each of its ids
    given all that comes before it in the row. Rows are padded to the longest; padding and the
    context are not scored."""
    longest = max(len(ids) for ids, _ in rows)
    idx = torch.zeros(len(rows), longest, dtype=torch.long)
    targets = torch.full((len(rows), longest), -1, dtype=torch.long)
    for r, (ids, ending_start) in enumerate(rows):
        idx[r, :len(ids)] = torch.tensor(ids)
        # the id at position t is predicted by the logits at position t - 1
        targets[r, ending_start - 1:len(ids) - 1] = torch.tensor(ids[ending_start:])
    idx, targets = idx.to(device), targets.to(device)
    with autocast:
        logits, _ = model(idx, targets)
    scored = targets != -1  # the endings' positions: their logits alone go through the softmax
    losses = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    row = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(targets)[scored]
    total = torch.zeros(len(rows), device=device).index_add_(0, row, losses)
    return total.cpu(), scored.sum(1).cpu()


def evaluate(model, tokenizer, examples, device, batch_size=16, autocast=nullcontext(), dist=None):
    """{"acc", "acc_norm", "examples"} of model on the examples. Under torchrun (dist: a
    distributed.Distributed) each process scores every world_size-th example and the counts
    are summed; every process runs as many forward passes (an FSDP model gathers its weights
    in each, all processes together)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    # by length, so that a batch's rows are padded little (the counts do not depend on the order)
    mine = sorted(examples[rank::world], key=lambda e: len(e["ctx"]) + max(map(len, e["endings"])))
    passes = math.ceil(math.ceil(len(examples) / world) / batch_size)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # right by total loss, by mean loss, scored
    for b in tqdm(range(passes), desc="hellaswag", disable=rank != 0, leave=False):
        batch = mine[b * batch_size:(b + 1) * batch_size]
        scored = bool(batch)
        batch = batch or examples[:1]  # a pass with nothing left to score: run, and not counted
        rows = [row for example in batch for row in render(example, tokenizer, model.config.block_size)]
        total, count = ending_losses(model, rows, device, autocast)
        total, mean = total.view(-1, 4), (total / count).view(-1, 4)
        labels = torch.tensor([example["label"] for example in batch])
        if scored:
            counts += torch.tensor([(total.argmin(1) == labels).sum(), (mean.argmin(1) == labels).sum(), len(batch)])
    model.train(was_training)
    if world > 1:
        import torch.distributed as torch_dist
        from nanogpt.distributed import collective_device
        summed = counts.to(collective_device(dist))
        torch_dist.all_reduce(summed)
        counts = summed.cpu()
    right, right_norm, n = counts.tolist()
    return {"acc": right / n, "acc_norm": right_norm / n, "examples": int(n)}


def main():
    cfg = configure(globals(), nullable=())
    from nanogpt import distributed
    from nanogpt import hardware
    from nanogpt.checkpoint import load_model
    if cfg["batch_size"] < 1 or cfg["limit"] < 0:
        raise UserError(f"batch_size must be at least 1 and limit 0 or more, got {cfg['batch_size']} "
                        f"and {cfg['limit']}")
    examples = load_examples(cfg["input"], cfg["cache_dir"])[:cfg["limit"] or None]
    dev, device_type, precision, _ = hardware.setup(cfg["device"], cfg["dtype"], training=False)
    dist = distributed.setup(device_type)
    if dist.parallel is not None and device_type == "cuda":
        dev = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(dev)
    scored, tokenizer = load_model(cfg["model"], dev, precision)
    scores = evaluate(scored, tokenizer, examples, dev, cfg["batch_size"], dist=dist)
    if dist.rank == 0:
        print(f"hellaswag {cfg['model']}: acc {scores['acc']:.4f}, acc_norm {scores['acc_norm']:.4f} "
              f"({scores['examples']:,} examples, completion style)")
    if dist.parallel is not None:
        distributed.finish_processes()


if __name__ == "__main__":
    run(main)
