"""The model on its own: initial loss, learning, and the pieces train.py relies on."""

import math

import pytest
import torch

from model import GPT, GPTConfig
from optim import configure_optimizers


def tiny(**kw):
    cfg = dict(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


def test_initial_loss_is_uniform_over_the_vocabulary():
    # GPT-2's small init makes the first predictions nearly uniform: loss ~ ln(vocab)
    for vocab in (65, 1000):
        model = tiny(vocab_size=vocab)
        idx = torch.randint(vocab, (8, 32))
        _, loss = model(idx, torch.randint(vocab, (8, 32)))
        assert abs(loss.item() - math.log(vocab)) < 0.1 * math.log(vocab)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_overfits_one_batch(kind):
    model = tiny()
    x = torch.randint(65, (4, 32))
    y = torch.randint(65, (4, 32))
    optimizer = configure_optimizers(model, 0.0, 3e-3, (0.9, 0.99), "cpu", kind)
    _, first = model(x, y)
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first.item() > 4.0 and loss.item() < 0.1


def test_output_head_is_tied_to_the_token_embedding():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projections_use_scaled_init():
    model = tiny(n_layer=8, n_embd=64, n_head=4)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.002
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002


def test_attention_is_causal():
    # changing a later token must not change the logits at earlier positions
    model = tiny().eval()
    x = torch.randint(65, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 65
    logits_x, _ = model(x, x)
    logits_y, _ = model(y, y)
    torch.testing.assert_close(logits_x[:, :10], logits_y[:, :10])
    assert not torch.allclose(logits_x[:, 10], logits_y[:, 10])


def test_weight_decay_only_on_matrices():
    model = tiny()
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny()
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    blocks = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    in_muon = [p for g in muon.param_groups for p in g["params"]]
    assert {id(p) for p in in_muon} == blocks and len(in_muon) == len(blocks) == 2 * 4
    assert muon.param_groups[0]["weight_decay"] == 0.1
    # AdamW keeps the embeddings (the head is tied to wte) and the gains and biases
    in_adamw = [id(p) for g in adamw.param_groups for p in g["params"]]
    assert id(model.transformer.wte.weight) in in_adamw and id(model.transformer.wpe.weight) in in_adamw
    assert sorted(in_adamw + list(blocks)) == sorted(id(p) for p in model.parameters())
    # train.py sets the learning rate on every group of both
    for group in opt.param_groups:
        group["lr"] = 5e-4
    assert adamw.param_groups[0]["lr"] == muon.param_groups[0]["lr"] == 5e-4


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(16)
    assert model.transformer.wpe.weight.shape[0] == 16
    logits, _ = model(torch.randint(65, (1, 16)))
    assert logits.shape == (1, 1, 65)


def test_generate_greedy_and_sampled():
    model = tiny().eval()
    x = torch.randint(65, (2, 5))
    out = model.generate(x, 40, temperature=0)  # longer than block_size: the context slides
    assert out.shape == (2, 45) and torch.equal(out[:, :5], x)
    assert torch.equal(out, model.generate(x, 40, temperature=0))
    torch.manual_seed(1)
    a = model.generate(x, 10, temperature=1.0, top_k=3)
    torch.manual_seed(1)
    b = model.generate(x, 10, temperature=1.0, top_k=3)
    assert torch.equal(a, b)
