"""Partial fine-tuning by name (train.py's trainable= patterns), for both model families."""

import os

import torch

from conftest import TINY, assert_user_error, run_script
from nanogpt.llama import Llama, LlamaConfig
from train import setup_finetune


def test_trainable_patterns_train_only_the_named_parameters(trained, char_dataset, tmp_path):
    base_dir = trained[0]
    out = tmp_path / "attn"
    result = run_script("train.py", *TINY, f"--dataset={char_dataset}", f"--out_dir={out}",
                        f"--init_from={base_dir}", "--trainable=*.attn.*,transformer.ln_f.*",
                        "--max_iters=6", "--eval_interval=3", "--always_save_checkpoint=True")
    assert result.returncode == 0, result.stderr
    assert "training" in result.stdout and "transformer.h.0.attn.c_attn.weight" in result.stdout
    base = torch.load(os.path.join(base_dir, "ckpt.pt"), weights_only=True)["model"]
    tuned = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    for name in base:
        changed = not torch.equal(base[name], tuned[name])
        assert changed == (".attn." in name or name.startswith("transformer.ln_f.")), name
    refused = run_script("train.py", *TINY, f"--dataset={char_dataset}", f"--out_dir={tmp_path / 'x'}",
                         f"--init_from={base_dir}", "--trainable=*.attention.*")
    assert_user_error(refused, "trainable pattern '*.attention.*' matches no parameter")
    assert not (tmp_path / "x").exists()


def test_freeze_and_patterns_on_a_llama_style_model():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=16,
                              vocab_size=50, mlp_hidden=64, tie_embeddings=False))
    setup_finetune(model, "freeze", freeze_layers=2)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(("model.layers.2.", "model.norm.", "lm_head.")) for n in trains)
    setup_finetune(model.requires_grad_(True), "full", patterns="*.self_attn.*")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".self_attn." in n}
