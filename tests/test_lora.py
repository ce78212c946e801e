"""Fine-tuning three ways: LoRA adapters (lora.py, against peft), frozen layers, and the
finetune modes of train.py end to end, with a tiny trained model as the base."""

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from nanogpt import lora
from configurator import knobs
from nanogpt.checkpoint import load_model
from conftest import TINY, assert_user_error, eval_losses, run_script
from nanogpt.errors import UserError
from model import GPT, GPTConfig
from nanogpt.optim import configure_optimizers
from train import check_config, setup_finetune

RUN = [*TINY, "--eval_interval=10", "--always_save_checkpoint=True"]


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True))


def tiny_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(64, (4, 16), generator=generator), torch.randint(64, (4, 16), generator=generator)


def train_steps(model, steps=5):
    optimizer = configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), "cpu")
    x, y = tiny_batch()
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_lora_starts_as_the_base_trains_only_adapters_and_merges():
    model = tiny_gpt()
    x, y = tiny_batch()
    base_logits, _ = model(x, y)
    base = {k: v.clone() for k, v in model.state_dict().items()}

    lora.apply(model, rank=4, alpha=8.0, dropout=0.1, targets="c_attn,mlp.c_proj")
    logits, _ = model(x, y)  # in training mode, adapter dropout on: B = 0 makes the update exactly 0
    assert torch.equal(logits, base_logits)
    # c_attn (32 -> 96) and mlp.c_proj (128 -> 32) in each of the 2 blocks
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 * ((32 + 96) + (128 + 32))
    assert sorted(lora.adapters(model)) == sorted(f"transformer.h.{i}.{path}.lora_{m}" for i in range(2)
                                                  for path in ("attn.c_attn", "mlp.c_proj") for m in "AB")
    initial = {k: v.clone() for k, v in lora.adapters(model).items()}

    optimizer = train_steps(model)
    # the optimizer holds the adapters and nothing else; weight decay touched no frozen tensor
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for name, p in model.named_parameters() if ".lora_" in name}
    state = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in lora.adapters(model).items():
        assert not torch.equal(tensor, initial[name]), name

    model.eval()
    adapted, _ = model(x, y)
    assert not torch.allclose(adapted, base_logits)
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # a plain model again
    merged, _ = model(x, y)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


def test_lora_layer_equals_peft():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    ours = lora.LoRALinear(copy.deepcopy(linear), rank=4, alpha=12, dropout=0.3)
    nn.init.normal_(ours.lora_B)  # as if trained: B is no longer zero
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.3, target_modules=["proj"])
    theirs = get_peft_model(nn.ModuleDict({"proj": copy.deepcopy(linear)}), config)
    layer = theirs.base_model.model["proj"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    assert layer.scaling["default"] == ours.scaling == 3.0
    x = torch.randn(3, 5, 24)
    for train in (False, True):  # with dropout: the same mask falls on the same input
        ours.train(train), layer.train(train)
        torch.manual_seed(1)
        expected = layer(x)
        torch.manual_seed(1)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-6)
    merged = theirs.merge_and_unload()["proj"]
    torch.testing.assert_close(ours.merged().weight, merged.weight, rtol=0, atol=1e-6)


def test_lora_init_is_peft_s():
    # A as nn.Linear's default init (Kaiming-uniform, bound 1/sqrt(in)), B zero
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(400, 30), rank=64, alpha=8, dropout=0.0)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 400 ** 0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound


@pytest.mark.parametrize("call, words", [
    (lambda m: lora.apply(m, 4, 8.0, 0.0, "c_attn,q_proj"), ["unknown lora target 'q_proj'"]),
    (lambda m: lora.apply(m, 0, 8.0, 0.0, "c_attn"), ["lora_rank"]),
    (lambda m: setup_finetune(m, "freeze", 3), ["freeze_layers=3", "2 layers"]),
])
def test_bad_settings_are_user_errors(call, words):
    with pytest.raises(UserError) as info:
        call(tiny_gpt())
    for w in words:
        assert w in str(info.value)


# -----------------------------------------------------------------------------
# train.py's finetune modes, on the tiny model of the `trained` fixture

def train(out_dir, dataset, *args):
    result = run_script("train.py", *RUN, f"--dataset={dataset}", f"--out_dir={out_dir}", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_freeze_leaves_embeddings_and_lowest_blocks_bitwise(trained, char_dataset, tmp_path):
    base_dir = trained[0]
    stdout = train(tmp_path / "freeze", char_dataset, f"--init_from={base_dir}", "--finetune=freeze",
                   "--freeze_layers=1", "--max_iters=10")
    base, tuned = read_ckpt(base_dir)["model"], read_ckpt(tmp_path / "freeze")["model"]
    frozen = ("transformer.wte.", "transformer.wpe.", "transformer.h.0.", "lm_head.")  # the head is tied to wte
    for name in base:
        assert torch.equal(base[name], tuned[name]) == name.startswith(frozen), name
    trainable = sum(t.numel() for n, t in base.items() if not n.startswith(frozen))
    assert f"finetune=freeze: {trainable:,} of" in stdout


def test_lora_run_saves_adapters_resumes_exactly_samples_and_exports(trained, char_dataset, tmp_path):
    base_dir = trained[0]
    lora_args = ["--finetune=lora", "--lora_rank=4", "--lora_dropout=0.1", "--lora_targets=c_attn,c_fc"]
    whole = tmp_path / "whole"
    stdout = train(whole, char_dataset, f"--init_from={base_dir}", *lora_args, "--learning_rate=1e-2",
                   "--max_iters=20")
    losses = [val for _, val, _ in eval_losses(stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]  # adapters alone lower the val loss
    assert "val acc 0." in stdout
    evals = [r for r in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert all(0 < r["val_acc"] < 1 and 0 < r["train_acc"] < 1 for r in evals)

    # the checkpoint: adapters and the base's location, not the base's weights
    ckpt = read_ckpt(whole)
    assert "model" not in ckpt and ckpt["base"] == os.path.abspath(base_dir)
    assert sorted(ckpt["adapters"]) == sorted(f"transformer.h.{i}.{path}.lora_{m}" for i in range(2)
                                              for path in ("attn.c_attn", "mlp.c_fc") for m in "AB")
    n_adapter = sum(t.numel() for t in ckpt["adapters"].values())
    assert f"finetune=lora: {n_adapter:,} of" in stdout
    assert os.path.getsize(whole / "ckpt.pt") < os.path.getsize(os.path.join(base_dir, "ckpt.pt")) / 5

    # stopped at 10 and resumed (with no LoRA flags: the checkpoint's settings hold): the same adapters
    split = tmp_path / "split"
    train(split, char_dataset, f"--init_from={base_dir}", *lora_args, "--learning_rate=1e-2", "--max_iters=10")
    train(split, char_dataset, "--init_from=resume", "--learning_rate=1e-2", "--max_iters=20")
    resumed = read_ckpt(split)["adapters"]
    assert all(torch.equal(resumed[k], v) for k, v in ckpt["adapters"].items())

    # sample.py loads base + adapters (merged) and decodes as the unmerged adapted model does
    adapted, tok = load_model(str(whole), merge_lora=False)
    assert any(isinstance(m, lora.LoRALinear) for m in adapted.modules())
    prompt = torch.tensor([tok.encode("ROMEO:")])
    expected = tok.decode(adapted.eval().generate(prompt, 40, temperature=0)[0].tolist())
    result = run_script("sample.py", f"--out_dir={whole}", "--device=cpu", "--dtype=float32",
                        "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=40", "--temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected + "\n")

    # export bakes the adapters in: the exported model computes what base + adapters do
    result = run_script("export_hf.py", f"--out_dir={whole}", f"--export_dir={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr
    exported, _ = load_model(str(tmp_path / "hf"))
    idx = torch.randint(adapted.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(idx, idx)[0], adapted.eval()(idx, idx)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("changes, words", [
    ({"finetune": "partial"}, ["finetune must be"]),
    ({"finetune": "lora"}, ["finetune=lora", "pretrained"]),  # from scratch: no base to adapt
    ({"finetune": "lora", "init_from": "out-base", "out_dir": "out-base"}, ["init_from's folder"]),
])
def test_bad_finetune_config_is_refused(changes, words):
    import train
    cfg = train.Config(**{**knobs(vars(train)), **changes})
    with pytest.raises(UserError) as info:
        check_config(cfg)
    for w in words:
        assert w in str(info.value)


def test_unknown_lora_target_exits_2_with_one_line_and_writes_nothing(trained, char_dataset, tmp_path):
    out_dir = tmp_path / "out"
    result = run_script("train.py", *RUN, f"--dataset={char_dataset}", f"--out_dir={out_dir}",
                        f"--init_from={trained[0]}", "--finetune=lora", "--lora_targets=c_attn,wq")
    assert_user_error(result, "unknown lora target 'wq'")
    assert not out_dir.exists()
