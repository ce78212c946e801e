"""The model on its own: initial loss, learning, the pieces train.py relies on, generate, and
either family built back from a saved config."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nanogpt import engine
from nanogpt.checkpoint import load_model, save_run
from nanogpt.errors import UserError
from nanogpt.llama import Llama, LlamaConfig
from model import GPT, GPTConfig, build, causal_attention
from nanogpt.optim import BatchedMuon, configure_optimizers
from nanogpt.tokenizer import CharTokenizer


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


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cpu_bfloat16_attention_matches_pytorch_s_kernel(kv_heads):
    # bfloat16 on a CPU takes causal_attention's own route: the same outputs and gradients as
    # PyTorch's fused kernel computes in float32, to bfloat16's precision
    torch.manual_seed(0)
    q = torch.randn(2, 4, 48, 16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 48, 16, requires_grad=True) for _ in range(2))
    ours = causal_attention(*(t.bfloat16() for t in (q, k, v)))
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(theirs)
    ours_grads = torch.autograd.grad(ours.float(), (q, k, v), grad)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


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


def test_batched_muon_updates_as_torch_s_muon():
    # every shape a model has (wide, square, tall: transposed into the wide batch), several of
    # each, steps with momentum: the same weights and momentum as torch.optim.Muon, to the bit
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128)] * 2 + [(48, 16)]
    theirs = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    before = [p.detach().clone() for p in ours]
    settings = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    torch_muon, batched = torch.optim.Muon(theirs, **settings), BatchedMuon(ours, **settings)
    for _ in range(4):
        for a, b in zip(theirs, ours):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours[-1].grad = theirs[-1].grad = None  # a parameter without a gradient stays as it is
        torch_muon.step()
        batched.step()
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b)
        assert torch.equal(torch_muon.state[a].get("momentum_buffer", a), batched.state[b].get("momentum_buffer", b))
    assert not any(torch.equal(p, b) for p, b in zip(ours[:-1], before)) and torch.equal(ours[-1], before[-1])


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


# -----------------------------------------------------------------------------
# generate: nanoGPT's loop, over the KV cache, the same tokens as engine.generate

def tiny_llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             tie_embeddings=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_gives_engine_s_tokens(family):
    model = (tiny() if family == "gpt2" else tiny_llama()).eval()
    x = torch.randint(65, (3, 5))
    for new in (10, 60):  # 60: past block_size (32), where both crop to the last 32 tokens
        greedy = engine.generate(model, x, new, temperature=0)
        assert greedy.shape == (3, 5 + new)
        assert torch.equal(model.generate(x, new, temperature=0), greedy)
        assert torch.equal(model.generate(x, new, top_k=1), greedy)  # only the most likely is left
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            ours = model.generate(x, new, temperature=0.8, top_k=5)
            torch.manual_seed(seed)
            theirs = engine.generate(model, x, new, temperature=0.8, top_k=5)
            assert torch.equal(ours, theirs)
        torch.manual_seed(3)
        sampled = model.generate(x, new, temperature=0.8, top_k=5)
        assert not torch.equal(sampled, greedy)  # it does sample


def test_generate_takes_nanogpt_s_positional_call():
    model = tiny().eval()
    x = torch.randint(65, (2, 3))
    torch.manual_seed(0)
    positional = model.generate(x, 100, 0.8, 200)  # sample.py's call in nanoGPT; top_k > vocab
    torch.manual_seed(0)
    assert torch.equal(positional, model.generate(x, max_new_tokens=100, temperature=0.8, top_k=200))
    torch.manual_seed(0)
    assert torch.equal(positional, engine.generate(model, x, 100, temperature=0.8, top_k=200))


def test_other_options_go_to_engine_generate():
    model = tiny().eval()
    x = torch.randint(65, (2, 4))
    # beams without a temperature are deterministic, as transformers' beams without do_sample
    beams = model.generate(x, 10, num_beams=3)
    assert torch.equal(beams, engine.generate(model, x, 10, temperature=0, num_beams=3))
    assert torch.equal(beams, engine.beam_search(model, x.tolist(), engine.DecodingOptions(
        10, temperature=0, num_beams=3))[0])
    nucleus = model.generate(x, 10, temperature=0.8, top_p=0.9, seed=5)
    assert torch.equal(nucleus, engine.generate(model, x, 10, temperature=0.8, top_p=0.9, seed=5))
    uneven = [[1, 2, 3], [4]]  # prompts of several lengths: the engine left-pads them
    assert torch.equal(model.generate(uneven, 6, 0), engine.generate(model, uneven, 6, temperature=0))
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(max_new_tokens=-1)):
        with pytest.raises(UserError, match=next(iter(bad))):  # refused as engine.generate refuses it
            model.generate(x, **{"max_new_tokens": 5, **bad})


# -----------------------------------------------------------------------------
# loading: one constructor for either family, checkpoints of earlier versions included

# the config fields of both families, as this repo saved them in every run's model_args
# before the Llama-style family had a config class of its own
OLD_FIELDS = dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768,
                  dropout=0.0, bias=True, activation="gelu_tanh", family="gpt2", n_kv_head=None,
                  norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, mlp_hidden=None,
                  tie_embeddings=True, qkv_bias=False, attn_bias=False, mlp_bias=False,
                  hf_model_type=None, eos_token_id=None)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_run_saved_with_both_families_fields_loads_eval_ready(family, tmp_path):
    model = tiny() if family == "gpt2" else tiny_llama()
    config = dataclasses.asdict(model.config)
    old = {**OLD_FIELDS, **config}
    if family == "llama":
        old.update(bias=False, activation="gelu_tanh")  # the old loaders wrote these for Llamas
    path = str(tmp_path / "ckpt.pt")
    chars = CharTokenizer("".join(chr(32 + i) for i in range(65)))
    save_run(path, model, torch.optim.AdamW(model.parameters()), {}, chars.spec())
    run = torch.load(path, weights_only=True)
    run["model_args"] = old
    torch.save(run, path)
    loaded, _ = load_model(str(tmp_path))
    assert type(loaded) is type(model) and dataclasses.asdict(loaded.config) == config
    assert not loaded.training and not any(m.training for m in loaded.modules())  # eval-ready
    idx = torch.randint(65, (2, 16))
    assert torch.equal(loaded(idx, idx)[0], model.eval()(idx, idx)[0])


def test_build_makes_each_family_s_model():
    assert type(build(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=10))) is GPT
    llama = build(LlamaConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=10))
    assert type(llama) is Llama and not hasattr(llama, "transformer")
    assert [n for n, _ in llama.named_parameters()][:2] == ["model.embed_tokens.weight",
                                                            "model.layers.0.input_layernorm.weight"]
