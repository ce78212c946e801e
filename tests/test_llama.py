"""The Llama-style family (model_type llama, mistral, qwen2), offline. Tiny random transformers
models saved to temp folders, with a byte-level BPE tokenizer.json that puts <s> before every
text, stand in for the hub's; transformers is the oracle: logits, greedy decoding, beam search,
left-padded batches, and the export loaded back by AutoModelForCausalLM."""

import functools
import json
import math
import shutil
from dataclasses import asdict

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from nanogpt import engine
from nanogpt import hf
from nanogpt import llama
from nanogpt.checkpoint import load_model, load_tokenizer, save_run
from conftest import assert_user_error, run_script, tiny_bpe
from nanogpt.errors import UserError
from model import GPT


@functools.cache
def tokenizer_json():
    """tiny_bpe() with Llama's <s> and </s>; its post-processor puts <s> before every text, as
    Llama's tokenizer.json does."""
    tok = tiny_bpe()
    tok.add_special_tokens(["<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok.to_str()


TOK = Tokenizer.from_str(tokenizer_json())
VOCAB, BOS, EOS = TOK.get_vocab_size(), TOK.token_to_id("<s>"), TOK.token_to_id("</s>")
CONTEXT = 64  # max_position_embeddings of the tiny models

# what each tiny model tests: Qwen2's q/k/v biases and a tied head; Llama's untied head and
# grouped-query attention (2 and 1 key / value heads for 4 query heads); Llama 3.1's and
# linear RoPE scaling; Mistral without a sliding window; Llama's optional biases
KINDS = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                  rope_theta=1000.0)),
    "llama": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2)),
    "llama3": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=1, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64), rope_theta=500.0)),
    "linear": (LlamaForCausalLM, LlamaConfig, dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "llama_bias": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=4, attention_bias=True,
                                                       mlp_bias=True, tie_word_embeddings=True)),
}


def build(kind):
    """A tiny random transformers model of kind, its norms and biases random too (transformers
    starts them at 1 and 0, which would leave them untested)."""
    model_class, config_class, extra = KINDS[kind]
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
                          bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2, **extra)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{kind: (transformers' model, ours, our tokenizer, its folder)}, the same weights."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        build(kind).save_pretrained(folder)
        (folder / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
        ours, tok = load_model(str(folder))
        out[kind] = (AutoModelForCausalLM.from_pretrained(folder).eval(), ours.eval(), tok, folder)
    return out


def logits(model, idx):
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(idx, idx)[0]  # with targets: every position's logits
        return model(idx).logits


def hf_generate(model, prompts, **kwargs):
    """transformers' generate on left-padded prompts (pad 0, masked), greedy, the full length."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kwargs)


def assert_load_fails(folder, *words):
    with pytest.raises(UserError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message


def variant(folder, dst, **changes):
    """A copy of the model folder, its config.json changed (a value of None removes the key)."""
    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return dst


# -----------------------------------------------------------------------------
# the model

@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_equal_transformers(pairs, kind):
    theirs, ours, _, _ = pairs[kind]
    idx = torch.randint(VOCAB, (2, CONTEXT))
    torch.testing.assert_close(logits(ours, idx), logits(theirs, idx), rtol=0, atol=1e-5)
    # the names are transformers', the head tied as theirs
    assert set(dict(ours.named_parameters())) == set(dict(theirs.named_parameters()))
    tied = theirs.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert ours.config.n_kv_head == theirs.config.num_key_value_heads
    # without targets, the last position's logits only
    with torch.no_grad():
        last, loss = ours(idx)
    assert loss is None
    torch.testing.assert_close(last[:, 0], logits(ours, idx)[:, -1], rtol=0, atol=1e-5)
    embeddings = 0 if tied else VOCAB * 32  # an untied embedding is a lookup: not counted
    assert ours.get_num_params() == theirs.num_parameters() - embeddings


def test_a_new_llama_trains_from_gpt2_s_init():
    torch.manual_seed(0)
    config = llama.LlamaConfig(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2,
                               n_embd=64, mlp_hidden=128, tie_embeddings=False)
    model = llama.Llama(config)
    assert not hasattr(model, "transformer")  # no position table: rotary embeddings
    assert abs(model.model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.003
    assert abs(model.model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / math.sqrt(4)) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    x, y = torch.randint(100, (4, 32)), torch.randint(100, (4, 32))
    _, first = model(x, y)
    assert abs(first.item() - math.log(100)) < 0.1 * math.log(100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first.item()
    assert model.flops_per_token() == 6 * model.get_num_params() + 12 * 2 * 64 * 32
    with pytest.raises(ValueError, match="yarn"):
        llama.LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})


# -----------------------------------------------------------------------------
# decoding: the KV cache holds the un-repeated key / value heads

@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_greedy_and_beams_equal_transformers(pairs, kind):
    theirs, ours, tok, _ = pairs[kind]
    prompt = [BOS] + tok.encode("ROMEO: But soft")
    got = engine.generate(ours, [prompt], 20, temperature=0)
    expected = hf_generate(theirs, [prompt], max_new_tokens=20)
    assert got.tolist() == expected.tolist() and len(set(got[0, len(prompt):].tolist())) > 3

    with torch.no_grad():
        first = theirs(torch.tensor([prompt])).logits[0, -1]
    eos = first.topk(2).indices.tolist()[1:]  # the second likeliest first token ends a beam
    expected = hf_generate(theirs, [prompt], max_new_tokens=12, num_beams=3, num_return_sequences=3,
                           eos_token_id=eos, pad_token_id=eos[0], output_scores=True,
                           return_dict_in_generate=True)
    got, scores = engine.beam_search(ours, [prompt], engine.DecodingOptions(
        12, temperature=0, num_beams=3, num_return_sequences=3), eos, pad_token_id=eos[0])
    assert got.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_left_padded_batch_equals_each_prompt_alone(pairs, kind):
    theirs, ours, tok, _ = pairs[kind]
    prompts = [[BOS] + tok.encode("ROMEO:"), [BOS] + tok.encode("JULIET: O Romeo, Romeo")]
    batch = engine.generate(ours, prompts, 12, temperature=0)
    width = batch.size(1) - 12
    for row, prompt in enumerate(prompts):
        alone = engine.generate(ours, [prompt], 12, temperature=0)
        assert batch[row, width:].tolist() == alone[0, len(prompt):].tolist()
        assert alone.tolist() == hf_generate(theirs, [prompt], max_new_tokens=12).tolist()
    # and with transformers' own left padding and attention mask
    assert batch[:, width:].tolist() == hf_generate(theirs, prompts, max_new_tokens=12)[:, width:].tolist()


def test_generation_runs_past_the_context(pairs):
    _, ours, tok, _ = pairs["llama"]
    prompt = [BOS] + tok.encode("ROMEO:")
    for context_shift in (False, True):  # the window re-read from position 0, or shifted
        out = engine.generate(ours, [prompt], CONTEXT + 10, temperature=0, context_shift=context_shift)
        assert out.size(1) == len(prompt) + CONTEXT + 10


# -----------------------------------------------------------------------------
# loading

def test_special_tokens_and_eos_ids_come_from_the_configs(pairs, tmp_path):
    _, ours, tok, folder = pairs["llama"]
    assert (tok.bos_token, tok.eot_token, tok.eos_tokens) == (BOS, EOS, [EOS])
    assert ours.config.eos_token_id == [EOS] and ours.config.hf_model_type == "llama"
    # an instruct model's generation_config.json lists several; generate() stops at all of them
    chat = tmp_path / "chat"
    shutil.copytree(folder, chat)
    (chat / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 7]}))
    model, tok = load_model(str(chat))
    assert model.config.eos_token_id == [EOS, 7] and tok.eos_tokens == [EOS, 7] and tok.eot_token == EOS
    assert load_tokenizer(str(chat)).eos_tokens == [EOS, 7]
    # Qwen2's tokenizer adds no <s>: no bos_token
    qwen_folder = variant(pairs["qwen2"][3], tmp_path / "qwen-no-bos")
    (qwen_folder / "tokenizer.json").write_text(tiny_bpe().to_str())
    assert load_tokenizer(str(qwen_folder)).bos_token is None


def test_sharded_and_bfloat16_loads(pairs, tmp_path):
    theirs, ours, _, _ = pairs["llama"]
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    (tmp_path / "sharded" / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, _ = load_model(str(tmp_path / "sharded"))
    idx = torch.randint(VOCAB, (2, 16))
    assert torch.equal(logits(model.eval(), idx), logits(ours, idx))
    half, _ = load_model(str(tmp_path / "sharded"), dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    theirs_half = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16).eval()
    torch.testing.assert_close(logits(half.eval(), idx), logits(theirs_half, idx), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_a_run_saves_and_loads_back(pairs, kind, tmp_path):
    _, ours, tok, _ = pairs[kind]
    save_run(str(tmp_path / "ckpt.pt"), ours, torch.optim.AdamW(ours.parameters()), {}, tok.spec(),
             iter_num=1)
    model, _ = load_model(str(tmp_path))
    assert model.config == ours.config
    idx = torch.randint(VOCAB, (2, 16))
    assert torch.equal(logits(model.eval(), idx), logits(ours, idx))


# -----------------------------------------------------------------------------
# export

@pytest.mark.parametrize("kind", ["qwen2", "llama3", "llama_bias", "mistral", "new"])
def test_export_loads_in_transformers_with_equal_logits(pairs, kind, tmp_path):
    if kind == "new":  # a model of ours, trained here: no model_type of its own, qkv_bias as Qwen2's
        torch.manual_seed(0)
        ours = llama.Llama(llama.LlamaConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4,
                                             n_kv_head=2, n_embd=32, mlp_hidden=48, qkv_bias=True,
                                             tie_embeddings=False, rope_theta=1000.0)).eval()
        tok, model_type = pairs["qwen2"][2], "qwen2"
    else:
        theirs, ours, tok, _ = pairs[kind]
        model_type = theirs.config.model_type
    hf.export(ours, tok, str(tmp_path / "export"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.model_type == model_type
    assert exported.config.eos_token_id == EOS
    idx = torch.randint(VOCAB, (2, ours.config.block_size))
    torch.testing.assert_close(logits(exported, idx), logits(ours, idx), rtol=0, atol=1e-5)
    reloaded, tok2 = load_model(str(tmp_path / "export"))  # and back again
    assert torch.equal(logits(reloaded.eval(), idx), logits(ours, idx))
    # the same config, but for what the export adds: a model_type, the tokenizer's eos id
    same = {k: v for k, v in asdict(ours.config).items() if k not in ("hf_model_type", "eos_token_id")}
    assert {k: v for k, v in asdict(reloaded.config).items() if k in same} == same
    assert reloaded.config.hf_model_type == model_type and reloaded.config.eos_token_id == [EOS]
    assert tok2.bos_token == BOS
    text = "ROMEO: wherefore art thou"
    assert AutoTokenizer.from_pretrained(tmp_path / "export")(text)["input_ids"] == [BOS] + tok.encode(text)


# -----------------------------------------------------------------------------
# bad input: one line

def test_unsupported_configs_are_one_line_errors(pairs, tmp_path):
    llama, mistral = pairs["llama"][3], pairs["mistral"][3]
    assert_load_fails(variant(llama, tmp_path / "gemma", model_type="gemma"),
                      "'gemma'", "'gpt2', 'llama', 'mistral', 'qwen2'")
    yarn = dict(rope_type="yarn", factor=2.0, rope_theta=10000.0)
    assert_load_fails(variant(llama, tmp_path / "yarn", rope_parameters=yarn), "'yarn'", "'linear'", "'llama3'")
    assert_load_fails(variant(llama, tmp_path / "dynamic", rope_parameters=None,
                              rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'")
    assert_load_fails(variant(mistral, tmp_path / "window", sliding_window=16),
                      "sliding_window=16", "max_position_embeddings=64")
    assert_load_fails(variant(llama, tmp_path / "gelu", hidden_act="gelu"), "hidden_act='gelu'")
    assert_load_fails(variant(llama, tmp_path / "gqa", num_key_value_heads=3), "num_key_value_heads (3)")
    # weights that are not the config's: Qwen2's biases under a Llama config, a missing head
    qwen_as_llama = variant(pairs["qwen2"][3], tmp_path / "qwen-as-llama", model_type="llama")
    assert_load_fails(qwen_as_llama, "model.layers.0.self_attn.", "_proj.bias", "llama model")
    head_missing = variant(pairs["qwen2"][3], tmp_path / "untied", tie_word_embeddings=False)
    assert_load_fails(head_missing, "lacks", "lm_head.weight")
    # and through the scripts: exit code 2, one line
    result = run_script("sample.py", f"--init_from={tmp_path / 'yarn'}", "--device=cpu", "--max_new_tokens=2")
    assert_user_error(result, "'yarn'")


def test_lora_on_the_family_s_projections_equals_peft(pairs):
    """LoRA by the family's names (q_proj, v_proj, down_proj): with the same adapter matrices,
    our adapted model's logits are peft's on transformers' model."""
    import copy

    from peft import LoraConfig, get_peft_model

    from nanogpt import lora
    from nanogpt.optim import configure_optimizers
    theirs, ours, _, _ = pairs["qwen2"]
    ours, theirs = copy.deepcopy(ours), copy.deepcopy(theirs)
    lora.apply(ours, rank=4, alpha=8.0, dropout=0.0, targets="q_proj,v_proj,down_proj")
    optimizer = configure_optimizers(ours, 0.0, 1e-2, (0.9, 0.95), "cpu", "muon")
    trainable = {id(p) for n, p in ours.named_parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(lora.adapters(ours))
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in lora.adapters(ours).values():
            tensor.normal_(0, 0.1)  # B is zero at the start: give both matrices values
    peft_model = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj", "down_proj"]))
    state = peft_model.state_dict()
    with torch.no_grad():
        for name, tensor in lora.adapters(ours).items():
            layer, matrix = name.rsplit(".", 1)  # model.layers.0.self_attn.q_proj, lora_A
            state[f"base_model.model.{layer}.{matrix}.default.weight"].copy_(tensor)
    idx = torch.randint(VOCAB, (2, 16))
    torch.testing.assert_close(logits(ours.eval(), idx), logits(peft_model.eval(), idx), rtol=1e-5, atol=1e-5)
