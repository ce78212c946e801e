"""The generation engine against Hugging Face transformers, the oracle: a tiny random
GPT2LMHeadModel, saved with save_pretrained and loaded into our GPT, must decode as
transformers' generate() does; our logits processing must equal transformers' processors."""

import json
import re
from collections import Counter

import pytest
import torch
import transformers

from nanogpt import engine
from nanogpt import quantize
from conftest import assert_user_error, run_script, save_tiny_bpe, tiny_bpe, until_stop
from nanogpt.errors import UserError
from nanogpt.checkpoint import load_model
from nanogpt.logits import process_logits
from model import GPT, GPTConfig

VOCAB = tiny_bpe().get_vocab_size()  # the folder's tokenizer.json: a small byte-level BPE
EOT = tiny_bpe().token_to_id("<|endoftext|>")
BLOCK = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny GPT-2 with random weights, saved as the hub would hold it, with a small BPE as its
    tokenizer.json. The weights are far larger than GPT-2's initial ones, so that its
    predictions are peaked and varied, not the near-uniform ones of a fresh model."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                     bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf.save_pretrained(path)
    save_tiny_bpe(path)
    return str(path), hf


@pytest.fixture(scope="module")
def hf(folder):
    return folder[1]


@pytest.fixture(scope="module")
def ours(folder):
    return load_model(folder[0])[0].eval()


def prompts(n, length, seed=0):
    return torch.randint(VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def hf_generate(hf, idx, max_new_tokens, **kw):
    return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens, **kw)


# -----------------------------------------------------------------------------
# decoding, against transformers' generate()

def test_greedy_equals_transformers(hf, ours):
    idx = prompts(3, 6)
    expected = hf_generate(hf, idx, 24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx, 24, temperature=0), expected)
    # a stop token that row 0 reaches early: the row ends and repeats it, as transformers
    # pads with it when it is also the padding token
    eot = expected[0, 6 + 3].item()
    expected = hf_generate(hf, idx, 24, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    got = ours.generate(idx, 24, temperature=0, stop_tokens=[eot])
    assert torch.equal(got, expected)
    assert (got[0, 6 + 3:] == eot).all()


def test_sampling_equals_transformers_with_every_option(hf, ours):
    # both draw each token with one torch.multinomial from the global generator, so with the
    # same seed and the same processed logits they pick the same tokens
    idx = prompts(2, 5)
    options = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3,
                   no_repeat_ngram_size=2)
    torch.manual_seed(7)
    expected = hf_generate(hf, idx, 20, do_sample=True, pad_token_id=0, **options)
    torch.manual_seed(7)
    assert torch.equal(ours.generate(idx, 20, **options), expected)


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, num_return_sequences, extra", [
    (3, 1.5, True, 2, {}),
    (4, 0.6, False, 3, {}),
    (5, -0.5, False, 5, {}),
    (4, 2.0, "never", 2, {}),
    (3, 0.8, True, 3, dict(repetition_penalty=1.5, no_repeat_ngram_size=2)),
])
def test_beam_search_equals_transformers(hf, ours, num_beams, length_penalty, early_stopping,
                                         num_return_sequences, extra):
    idx = prompts(2, 5, seed=1)
    greedy = hf_generate(hf, idx, 12, do_sample=False, pad_token_id=0)
    eot = greedy[0, 5 + 2].item()  # a token the beams will meet, so that some end early
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=num_return_sequences, **extra)
    expected = hf_generate(hf, idx, 12, do_sample=False, eos_token_id=eot, pad_token_id=eot,
                           output_scores=True, return_dict_in_generate=True, **kw)
    sequences, scores = engine.beam_search(ours, idx.tolist(), engine.DecodingOptions(12, temperature=0, **kw),
                                           stop_tokens=[eot])
    assert torch.equal(sequences, expected.sequences)
    torch.testing.assert_close(scores, expected.sequences_scores, rtol=0, atol=1e-4)
    # generate() returns the same sequences
    assert torch.equal(ours.generate(idx, 12, temperature=0, stop_tokens=[eot], **kw), sequences)


# -----------------------------------------------------------------------------
# logits processing, against transformers' processors

def hf_processors(hf, sampling, **options):
    config = transformers.GenerationConfig(do_sample=sampling, **options)
    return hf._get_logits_processor(generation_config=config, input_ids_seq_length=1)


@pytest.mark.parametrize("options", [
    dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
    dict(repetition_penalty=1.4), dict(repetition_penalty=0.7), dict(no_repeat_ngram_size=1),
    dict(no_repeat_ngram_size=3),
    dict(temperature=1.3, top_k=12, top_p=0.7, min_p=0.05, repetition_penalty=1.2, no_repeat_ngram_size=2),
    dict(temperature=0, repetition_penalty=1.2, no_repeat_ngram_size=2),  # greedy: no warpers
])
def test_processed_logits_equal_transformers(hf, options):
    gen = torch.Generator().manual_seed(0)
    vocab, rows, length, pad = 40, 4, 14, 3
    ids = torch.randint(8, (rows, length), generator=gen)  # few distinct tokens: many repeats
    ids[0, :pad] = engine.PAD  # a left-padded row must be processed as if alone
    logits = 3 * torch.randn(rows, vocab, generator=gen)
    ours = process_logits(ids, logits.clone(), length - 5, engine.DecodingOptions(1, **options))
    sampling = options.get("temperature", 1.0) > 0
    processors = hf_processors(hf, sampling, **{k: v for k, v in options.items() if k != "temperature" or sampling})
    for row in range(rows):
        real = ids[row:row + 1, pad if row == 0 else 0:]
        assert torch.equal(ours[row:row + 1], processors(real, logits[row:row + 1].clone())), row


def test_presence_and_frequency_penalties_follow_openai():
    # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, where c[j]
    # counts token j among the tokens generated so far (the prompt does not count)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(6, (3, 12), generator=gen)
    ids[1, :2] = engine.PAD
    logits = torch.randn(3, 10, generator=gen)
    prompt_width = 4
    ours = process_logits(ids, logits.clone(), prompt_width,
                                 engine.DecodingOptions(1, presence_penalty=0.6, frequency_penalty=0.25))
    expected = logits.clone()
    for row in range(3):
        for token, count in Counter(ids[row, prompt_width:].tolist()).items():
            expected[row, token] -= count * 0.25 + 0.6
    torch.testing.assert_close(ours, expected)


# -----------------------------------------------------------------------------
# the KV cache, batches, seeds

def test_cached_logits_equal_full_recompute_past_block_size(ours):
    # the logits the engine computes with its cache, at every step, equal a forward pass over
    # the whole context, cropped to the last block_size tokens as nanoGPT does
    steps = []
    def record(ids, logits):
        steps.append((ids.clone(), logits.clone()))
        return logits
    rows = [prompts(1, 3)[0].tolist(), prompts(1, 9, seed=1)[0].tolist()]  # padded batch
    ours.generate(rows, 2 * BLOCK, temperature=0, logits_processors=[record])
    assert len(steps) == 2 * BLOCK and steps[-1][0].size(1) > BLOCK + 9
    with torch.no_grad():
        for ids, logits in steps:
            for row in range(2):
                context = ids[row][ids[row] != engine.PAD][-BLOCK:]
                full, _ = ours(context[None])
                torch.testing.assert_close(logits[row], full[0, -1], rtol=1e-4, atol=1e-4)


def test_context_shift_logits_equal_a_forward_pass_over_the_shifted_window(ours):
    # context_shift: when the window is full, it restarts from its newer half; the logits at
    # every step equal a forward pass over exactly that window, which the cache never re-reads
    # between shifts
    steps = []
    def record(ids, logits):
        steps.append((ids.clone(), logits.clone()))
        return logits
    out = ours.generate(prompts(3, 5), 3 * BLOCK, temperature=0, context_shift=True,
                        logits_processors=[record])
    begin, shifts = 0, 0
    with torch.no_grad():
        for ids, logits in steps:
            end = ids.size(1)
            if end - begin > BLOCK:
                begin, shifts = end - BLOCK // 2, shifts + 1
            full, _ = ours(ids[:, begin:end])
            torch.testing.assert_close(logits, full[:, -1], rtol=1e-4, atol=1e-4)
    assert shifts >= 4
    # within the context it is the exact decoding
    exact = ours.generate(prompts(3, 5), 3 * BLOCK, temperature=0)
    assert torch.equal(out[:, :BLOCK + 1], exact[:, :BLOCK + 1])


def test_batch_of_prompts_equals_each_prompt_alone(ours):
    rows = [prompts(1, n, seed=n)[0].tolist() for n in (2, 7, 4)]
    for options in (dict(temperature=0), dict(temperature=0, num_beams=3, num_return_sequences=2)):
        batch = ours.generate(rows, 40, **options)  # 40: past block_size for the longer prompts
        n = options.get("num_return_sequences", 1)
        width = max(map(len, rows))
        for i, row in enumerate(rows):
            alone = ours.generate([row], 40, **options)
            got = batch[i * n:(i + 1) * n, width - len(row):]
            assert torch.equal(got[:, :alone.size(1)], alone)


def test_seeded_sampling_is_reproducible(ours):
    idx = prompts(1, 4)
    a = ours.generate(idx, 30, top_p=0.9, num_return_sequences=4, seed=3)
    assert torch.equal(a, ours.generate(idx, 30, top_p=0.9, num_return_sequences=4, seed=3))
    assert not torch.equal(a, ours.generate(idx, 30, top_p=0.9, num_return_sequences=4, seed=4))
    assert len({tuple(r) for r in a.tolist()}) == 4  # the samples of one batch differ


def test_rows_stop_on_their_own(ours):
    idx = prompts(3, 5)
    free = ours.generate(idx, 20, temperature=0)
    eot = free[1, 5 + 6].item()
    out = ours.generate(idx, 20, temperature=0, stop_tokens=[eot])
    for row in range(3):
        tokens = free[row, 5:].tolist()
        end = tokens.index(eot) + 1 if eot in tokens else len(tokens)
        assert out[row, 5:5 + end].tolist() == tokens[:end]
        assert (out[row, 5 + end:] == eot).all()


def test_user_processors_ban_and_force_tokens(ours):
    idx = prompts(2, 4)
    free = ours.generate(idx, 20, temperature=0)
    banned = sorted(set(free[:, 4:].flatten().tolist()))
    def ban(ids, logits):
        logits[:, banned] = -float("inf")
        return logits
    out = ours.generate(idx, 20, temperature=0, logits_processors=[ban])
    assert not set(out[:, 4:].flatten().tolist()) & set(banned)
    # a poem's punctuation: the token "," at every fifth generated position, while sampling
    [token] = tiny_bpe().encode(",").ids
    def comma(ids, logits):
        if (ids.size(1) - 4) % 5 == 4:
            forced = torch.full_like(logits, -float("inf"))
            forced[:, token] = 0
            return forced
        return logits
    out = ours.generate(idx, 20, logits_processors=[comma], seed=0)
    assert (out[:, 4 + 4::5] == token).all() and (out[:, 4:4 + 4] != token).any()


def test_top_k_samples_only_the_k_most_likely_tokens(ours):
    # many seeded draws of the next token of each of 4 prompts: every one among its prompt's k
    # most likely, and more than one of them drawn; without top_k, the draws go beyond them
    k, draws = 3, 200
    idx = prompts(4, 6, seed=2)
    with torch.no_grad():
        logits, _ = ours(idx)
    rows = idx.repeat_interleave(draws, dim=0)
    top_k = ours.generate(rows, 1, top_k=k, seed=0)[:, -1].view(4, draws)
    free = ours.generate(rows, 1, seed=0)[:, -1].view(4, draws)
    for prompt in range(4):
        top = set(logits[prompt, -1].topk(k).indices.tolist())
        drawn = set(top_k[prompt].tolist())
        assert drawn <= top and len(drawn) > 1, (prompt, drawn, top)
        assert not set(free[prompt].tolist()) <= top, prompt


@pytest.mark.parametrize("options, words", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(num_beams=0), "num_beams"),
    (dict(temperature=0, num_beams=2, num_return_sequences=3), "cannot exceed num_beams"),
    (dict(num_beams=3), "does not sample"),  # temperature 1: sampling
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(seed=2**64), "seed must be in"),
])
def test_bad_options_are_user_errors(ours, options, words):
    options = {"max_new_tokens": 5, **options}
    with pytest.raises(UserError, match=words):
        engine.generate(ours, prompts(1, 3), **options)


def test_empty_prompt_is_a_user_error(ours):
    with pytest.raises(UserError, match="at least one token"):
        ours.generate([[1, 2], []], 5)


# -----------------------------------------------------------------------------
# smaller weights

def test_int8_and_bfloat16_weights_stay_close(folder, ours):
    idx = prompts(1, 20)
    with torch.no_grad():
        ref, _ = ours(idx, targets=idx)
        for model in (quantize.quantize_int8(load_model(folder[0])[0].eval()),
                      load_model(folder[0], dtype="bfloat16")[0].eval()):
            logits, _ = model(idx, targets=idx)
            error = (logits.float() - ref).abs().mean() / ref.std()
            agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
            assert error < 0.05 and agree >= 0.8, (error, agree)
            assert model.generate(idx, 8, temperature=0).shape == (1, 28)


# -----------------------------------------------------------------------------
# text

def test_text_stream_never_splits_characters():
    enc = tiny_bpe()  # byte-level: a character outside its training text spans several tokens
    text = "naïve café 世界 🙂🙂 done"
    stream = engine.TextStream(enc.decode, [])
    tokens = enc.encode(text).ids
    assert any("\ufffd" in enc.decode([t]) for t in tokens)  # characters split across tokens
    pieces = [stream.add(t) for t in tokens]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_text_stream_holds_back_and_hides_stop_strings():
    chars = "abcdENDX"
    stream = engine.TextStream(lambda ids: "".join(chars[i] for i in ids), [0], stop_strings=["END", "dd"])
    assert stream.flush() == "a"  # the prompt
    out = [stream.add(chars.index(c)) for c in "bcENX"]
    assert out == ["b", "c", "", "", "ENX"] and not stream.stopped  # "EN" waited for its next letter
    out = [stream.add(chars.index(c)) for c in "dEND"]
    assert out == ["", "d", "", ""] and stream.stopped
    assert stream.text == "abcENXd"


# -----------------------------------------------------------------------------
# sample.py

def sample(folder, *args):
    return run_script("sample.py", f"--init_from={folder}", "--device=cpu", "--num_samples=1", *args)


def samples(stdout):
    return stdout.split("---------------\n")[:-1]


def test_sample_prompt_file_is_one_batch(folder, ours, tmp_path):
    enc = tiny_bpe()  # the folder's tokenizer.json, read by the tokenizers library itself
    lines = ["Hello there", "The meaning of life is", "A"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in lines), encoding="utf-8")
    for name in ("prompts.txt", "prompts.jsonl"):
        result = sample(folder[0], f"--start=FILE:{tmp_path / name}", "--temperature=0", "--max_new_tokens=12")
        assert result.returncode == 0, result.stderr
        got = samples(result.stdout)
        assert len(got) == 3
        for line, text in zip(lines, got):
            prompt = enc.encode(line).ids
            alone = ours.generate([prompt], 12, temperature=0, stop_tokens=[EOT])[0].tolist()
            assert text == enc.decode(until_stop(alone, len(prompt), EOT)) + "\n"


def test_sample_stops_at_stop_string_and_streams(folder):
    result = sample(folder[0], "--start=Once", "--temperature=0", "--max_new_tokens=20", "--stream=False")
    assert result.returncode == 0, result.stderr
    full = samples(result.stdout)[0]
    # a stop string of real characters a few characters in (the random model's bytes are
    # mostly not UTF-8, decoded as U+FFFD)
    found = re.compile(r"[!-~]{2}").search(full, len("Once") + 4)
    assert found, full
    stop = found.group()
    result = sample(folder[0], "--start=Once", "--temperature=0", "--max_new_tokens=20", f"--stop={stop!r}")
    assert result.returncode == 0, result.stderr
    assert samples(result.stdout) == [full[:full.index(stop, len("Once"))] + "\n"]


def test_sample_beams_and_empty_prompt(folder):
    result = sample(folder[0], "--start=", "--temperature=0", "--top_k=None", "--num_beams=3",
                    "--num_return_sequences=2", "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr
    got = samples(result.stdout)
    assert len(got) == 2 and all(s.startswith("<|endoftext|>") for s in got) and got[0] != got[1]


def test_sample_with_smaller_weights(folder):
    for args in (["--quantize=int8"], ["--dtype=bfloat16"]):
        result = sample(folder[0], "--start=Hi", "--max_new_tokens=5", "--num_samples=2", *args)
        assert result.returncode == 0, result.stderr
        assert len(samples(result.stdout)) == 2


@pytest.mark.parametrize("args, words", [
    (["--num_beams=3", "--temperature=0.7"], ["does not sample", "temperature"]),
    (["--num_beams=2", "--num_samples=2"], ["num_beams=2", "num_samples"]),
    (["--num_return_sequences=2"], ["num_samples"]),
    (["--stop=['']"], ["stop"]),
    (["--quantize=int4"], ["quantize"]),
])
def test_sample_rejects_bad_decoding_options(folder, args, words):
    assert_user_error(sample(folder[0], *args), *words)


def test_small_batch_linear_equals_linear_and_leaves_small_weights_to_it(monkeypatch):
    """SmallBatchLinear (the CPU decode routes) gives nn.Linear's outputs; its batched-matmul route
    ("split_matmul") is taken for a few rows of a big weight only (odd out_features included), not for
    a small weight such as a grouped-query key projection; its matrix-vector route ("matvec") for
    one row only."""
    from torch import nn
    calls = []
    real_bmm, real_mv = torch.bmm, torch.mv
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append("split_matmul") or real_bmm(*a))
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append("matvec") or real_mv(*a))
    torch.manual_seed(0)
    for route in ("split_matmul", "matvec"):
        monkeypatch.setattr(quantize, "_fastest_route", {torch.float32: route})
        for (n_in, n_out), rows, taken in [((896, 128), 1, False), ((768, 50257), 1, True),
                                           ((896, 4864), 2, route == "split_matmul"), ((896, 4864), 8, False)]:
            linear = nn.Linear(n_in, n_out, bias=n_out != 50257)
            layer = quantize.SmallBatchLinear(n_in, n_out, bias=linear.bias is not None)
            layer.load_state_dict(linear.state_dict())
            x = torch.randn(rows, 1, n_in)
            calls.clear()
            with torch.no_grad():
                torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
            assert calls == ([route] if taken else []), (route, n_in, n_out, rows)


@pytest.mark.parametrize("route", ["linear", "split_matmul", "matvec"])
def test_fast_cpu_linears_are_given_only_where_their_route_wins(route, monkeypatch):
    """fast_cpu_linears swaps a CPU model's big Linear layers for SmallBatchLinear only when the
    once-a-process measurement (fastest_route) finds a route faster than nn.Linear's on this
    machine; either way the model's outputs and parameters stay the same."""
    from torch import nn
    monkeypatch.setattr(quantize, "_fastest_route", {torch.float32: route})
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=256, block_size=8, vocab_size=4096)).eval()
    params = dict(model.named_parameters())
    x = torch.randint(4096, (1, 8))
    with torch.no_grad():
        before = model(x)[0]
        quantize.fast_cpu_linears(model)
        after = model(x)[0]
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == ({nn.Linear} if route == "linear" else {quantize.SmallBatchLinear})
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fastest_route_is_one_of_the_dtype_s_routes(monkeypatch):
    """The measurement runs every route of the dtype on a model's layers and keeps a winner."""
    monkeypatch.setattr(quantize, "_fastest_route", {})
    layers = [torch.nn.Linear(1024, 1024) for _ in range(2)]
    for dtype, routes in quantize.ROUTES.items():
        for layer in layers:
            layer.to(dtype)
        assert quantize.fastest_route(layers, dtype) in routes
    assert set(quantize._fastest_route) == set(quantize.ROUTES)


@pytest.mark.parametrize("route", ["linear", "split_matmul", "matvec"])
def test_generate_leaves_the_model_as_it_was(route, monkeypatch):
    """engine.generate on a CPU uses the caller's model as it is, whichever route this machine
    would measure fastest: afterwards every module is the same object of the same type, and the
    state dict holds the same tensors with the same values. A script that owns its model gives
    it the faster layout itself (quantize.fast_cpu_linears)."""
    monkeypatch.setattr(quantize, "_fastest_route", {torch.float32: route})
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=256, block_size=16, vocab_size=4096)).eval()
    modules = {name: (module, type(module)) for name, module in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for options in (dict(temperature=0), dict(temperature=0.8, top_k=20, seed=0), dict(num_beams=2, temperature=0)):
        engine.generate(model, [[1, 2, 3], [4]], 20, **options)  # past block_size too
    assert {name: (module, type(module)) for name, module in model.named_modules()} == modules
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k
