"""Generation corners where Hugging Face users expect transformers' behaviour: several EOS ids,
beam search with them, stop strings (begun in the prompt, and with beams), special tokens in
decoded text, the exact GELU of nanoGPT runs, and beam search from --num_beams alone.
transformers is the oracle; the models and the tokenizer are tiny and built here."""

import pickle

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from nanogpt import engine
from nanogpt import hf
from nanogpt.checkpoint import load_model
from conftest import run_script
from nanogpt.logits import process_logits
from nanogpt.tokenizer import CharTokenizer
from model import GPT, GPTConfig

CHARS = "\n !,.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random GPT-2 and a character tokenizer (a BPE without merges, plus <|endoftext|>),
    saved as a Hugging Face folder; the init is wide enough that generations vary."""
    folder = tmp_path_factory.mktemp("tiny-chars")
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(CHARS)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOT])
    tok.save(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=vocab,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(folder):
    """(transformers' model, ours, transformers' tokenizer, ours), the same weights."""
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours, tokenizer = load_model(str(folder))
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return theirs, ours.eval(), hf_tokenizer, tokenizer


def hf_generate(model, prompts, **kwargs):
    """transformers' generate on left-padded prompts (pad 0, masked), greedy unless told."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kwargs)


def generated(out, width):
    return out[:, width:].tolist()


def test_several_eos_ids_end_rows_and_pad_as_transformers(pair):
    theirs, ours, _, tok = pair
    prompts = [tok.encode("ROMEO: hello"), tok.encode("to be")]
    free = hf_generate(theirs, prompts, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    # the second id of the list ends the first row early, the first id never comes
    first_rows = free[0, 12:].tolist()
    b = first_rows[5]
    a = next(t for t in range(tok.vocab_size) if t not in free[:, 12:].flatten().tolist())
    expected = hf_generate(theirs, prompts, max_new_tokens=20, eos_token_id=[a, b], pad_token_id=a)
    got = engine.generate(ours, prompts, 20, temperature=0, stop_tokens=[a, b])
    # ours left-pads with PAD, transformers with the pad id: compare what was generated
    assert generated(got, 12) == generated(expected, 12)
    row = generated(got, 12)[0]
    assert b in row and row[row.index(b) + 1:] == [a] * (len(row) - row.index(b) - 1)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_with_several_likely_eos_ids_equals_transformers(pair, num_beams):
    theirs, ours, _, tok = pair
    prompt = tok.encode("ROMEO:")
    with torch.no_grad():
        first = theirs(torch.tensor([prompt])).logits[0, -1]
    eos = first.topk(3).indices.tolist()  # the three likeliest first tokens all end a beam
    expected = hf_generate(theirs, [prompt], max_new_tokens=10, num_beams=num_beams,
                           num_return_sequences=num_beams, eos_token_id=eos, pad_token_id=eos[0],
                           output_scores=True, return_dict_in_generate=True)
    got, scores = engine.beam_search(ours, [prompt], engine.DecodingOptions(
        10, temperature=0, num_beams=num_beams, num_return_sequences=num_beams), eos,
        pad_token_id=eos[0])
    assert got.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)


def test_stop_string_begun_in_the_prompt_stops_as_transformers(pair):
    theirs, ours, hf_tok, tok = pair
    prompt = tok.encode("ROMEO: hello")
    free = generated(engine.generate(ours, [prompt], 10, temperature=0), len(prompt))[0]
    stop = "lo" + tok.decode(free[:1])  # begins in the prompt's "hello", ends in the first new token
    expected = hf_generate(theirs, [prompt], max_new_tokens=10, stop_strings=[stop],
                           tokenizer=hf_tok, eos_token_id=None, pad_token_id=0)
    got = engine.generate(ours, [prompt], 10, temperature=0, stop_strings=[stop], tokenizer=tok)
    assert got.tolist() == expected.tolist() and got.size(1) == len(prompt) + 1
    stream = engine.TextStream(tok.decode, prompt, [stop])
    stream.add(free[0])
    assert stream.stopped and stream.text == "ROMEO: hello"  # the prompt itself is never cut


def test_stop_strings_end_beams_as_transformers(pair):
    theirs, ours, hf_tok, tok = pair
    prompt = tok.encode("ROMEO:")
    options = dict(max_new_tokens=12, num_beams=3, num_return_sequences=3, eos_token_id=None,
                   pad_token_id=0)
    free = hf_generate(theirs, [prompt], **options)
    stop = tok.decode(free[0, len(prompt) + 2:len(prompt) + 4].tolist())  # inside the best beam
    expected = hf_generate(theirs, [prompt], stop_strings=[stop], tokenizer=hf_tok, **options)
    got = engine.generate(ours, [prompt], 12, temperature=0, num_beams=3, num_return_sequences=3,
                          stop_strings=[stop], tokenizer=tok, pad_token_id=0)
    # without an eos id, transformers leaves -1 after a beam that a stop string ended; ours pads
    assert got.tolist() == expected.masked_fill(expected == -1, 0).tolist()
    assert expected.tolist() != free.tolist()  # the stop string changed which beams win


def test_special_tokens_are_decoded_unless_skipped(pair):
    _, _, hf_tok, tok = pair
    ids = [tok.eot_token] + tok.encode("This is")
    assert tok.decode(ids) == hf_tok.decode(ids) == EOT + "This is"
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_sample_stops_at_a_special_token_string(folder, pair):
    _, ours, _, tok = pair
    eot = tok.eot_token
    # a processor that forces <|endoftext|> as the 4th new token; --stop names it as text
    result = run_script("sample.py", f"--init_from={folder}", "--device=cpu", "--start=ROMEO:",
                        "--temperature=0", "--num_samples=1", "--max_new_tokens=8",
                        f"--stop={EOT!r}", "--stream=False")
    assert result.returncode == 0, result.stderr
    free = tok.decode(generated(engine.generate(ours, [tok.encode("ROMEO:")], 8, temperature=0,
                                                stop_tokens=[eot]), 6)[0])
    text = result.stdout.split("---------------\n")[0]
    assert text == "ROMEO:" + free.split(EOT)[0] + "\n"


def test_nanogpt_runs_keep_their_exact_gelu_and_export_it(tmp_path):
    """nanoGPT's model.py uses nn.GELU() (exact): its runs load with it, and the export says
    activation_function='gelu', so transformers computes the same logits."""
    chars = sorted(set(CHARS))
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=len(chars),
                dropout=0.0, activation="gelu")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**args)).eval()
    run = tmp_path / "out-nanogpt"
    run.mkdir()
    nanogpt_args = {k: v for k, v in args.items() if k != "activation"}  # nanoGPT has no such key
    torch.save({"model": gpt.state_dict(), "optimizer": {}, "model_args": nanogpt_args,
                "iter_num": 1, "best_val_loss": 2.0, "config": {}}, run / "ckpt.pt")
    with open(run / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    model, tokenizer = load_model(str(run))
    assert model.config.activation == "gelu"
    hf.export(model, tokenizer, str(tmp_path / "hf"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.activation_function == "gelu"
    idx = torch.randint(len(chars), (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx, idx)[0], theirs(idx).logits, rtol=0, atol=1e-5)
        tanh = GPT(GPTConfig(**{**args, "activation": "gelu_tanh"}))
        tanh.load_state_dict(gpt.state_dict())
        assert not torch.allclose(tanh.eval()(idx, idx)[0], theirs(idx).logits, rtol=0, atol=1e-6)


def test_a_relu2_model_exports_to_transformers_and_back(tmp_path):
    """activation='relu2' (train.py --activation=relu2) is transformers' "relu2": the export
    computes the same logits there, and loads back with it."""
    chars = sorted(set(CHARS))
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False,
                         vocab_size=len(chars), dropout=0.0, activation="relu2")).eval()
    tokenizer = CharTokenizer(chars)
    hf.export(ours, tokenizer, str(tmp_path / "hf"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.activation_function == "relu2"
    back, _ = load_model(str(tmp_path / "hf"))
    assert back.config.activation == "relu2"
    idx = torch.randint(len(chars), (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, idx)[0], theirs(idx).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(back.eval()(idx, idx)[0], theirs(idx).logits, rtol=0, atol=1e-5)


def test_beam_search_from_num_beams_alone_prints_transformers_beams(folder, pair):
    theirs, _, hf_tok, tok = pair
    result = run_script("sample.py", f"--init_from={folder}", "--device=cpu", "--start=ROMEO:",
                        "--num_beams=5", "--no_repeat_ngram_size=2", "--num_return_sequences=5",
                        "--early_stopping=True", "--max_new_tokens=15")
    assert result.returncode == 0, result.stderr
    got = result.stdout.split("---------------\n")[:-1]
    prompt = tok.encode("ROMEO:")
    expected = hf_generate(theirs, [prompt], max_new_tokens=15, num_beams=5, num_return_sequences=5,
                           no_repeat_ngram_size=2, early_stopping=True, pad_token_id=tok.eot_token)
    texts = [hf_tok.decode(row).split(EOT)[0] + "\n" for row in expected.tolist()]
    assert got == texts and len(set(got)) == 5
    # the Python API too: the sampling filters do not apply to beams, as in transformers
    engine.DecodingOptions(10, num_beams=3, temperature=0, top_k=50, top_p=0.9)


# -----------------------------------------------------------------------------
# Hugging Face's option names

def test_typical_min_new_tokens_bad_words_and_suppress_equal_transformers_processors():
    from transformers.generation import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                         NoBadWordsLogitsProcessor, SuppressTokensLogitsProcessor,
                                         TemperatureLogitsWarper, TypicalLogitsWarper)
    torch.manual_seed(0)
    vocab, prompt_width = 40, 5
    ids = torch.randint(vocab, (4, 8))
    ids[1, 6:] = torch.tensor([7, 8])  # row 1 ends with the start of the bad word (7, 8, 9)
    logits = torch.randn(4, vocab) * 3
    cases = [
        (dict(typical_p=0.7, temperature=0.9),
         [TemperatureLogitsWarper(0.9), TypicalLogitsWarper(mass=0.7)]),
        (dict(min_new_tokens=5, temperature=0), [MinNewTokensLengthLogitsProcessor(prompt_width, 5, [3, 4])]),
        (dict(bad_words_ids=((7, 8, 9), (11,)), temperature=0), [NoBadWordsLogitsProcessor([[7, 8, 9], [11]])]),
        (dict(suppress_tokens=(2, 5), temperature=0), [SuppressTokensLogitsProcessor([2, 5])]),
    ]
    for options, processors in cases:
        expected = LogitsProcessorList(processors)(ids, logits.clone())
        ours = process_logits(ids, logits.clone(), prompt_width, engine.DecodingOptions(1, **options),
                                     stop_tokens=[3, 4])
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6, msg=str(options))
        assert torch.isinf(ours).any()  # each case filtered something


def test_do_sample_false_is_greedy_and_greedy_gives_one_result(pair):
    theirs, ours, _, tok = pair
    prompt = [tok.encode("to be or")]
    greedy = engine.generate(ours, prompt, 10, temperature=0)
    assert torch.equal(engine.generate(ours, prompt, 10, temperature=0.8, do_sample=False), greedy)
    assert generated(greedy, 8) == generated(hf_generate(theirs, prompt, max_new_tokens=10,
                                                         temperature=0.8, eos_token_id=None,
                                                         pad_token_id=0), 8)
    with pytest.raises(engine.UserError, match="greedy decoding gives one result"):
        engine.generate(ours, prompt, 10, temperature=0, num_return_sequences=2)


def test_sample_takes_hugging_face_s_names(folder, pair):
    _, ours, _, tok = pair
    prompt = tok.encode("to be or")
    free = tok.decode(generated(engine.generate(ours, [prompt], 6, temperature=0,
                                                stop_tokens=[tok.eot_token]), len(prompt))[0])
    result = run_script("sample.py", f"--init_from={folder}", "--device=auto", "--dtype=auto",
                        "--start=to be or", f"--max_length={len(prompt) + 6}", "--do_sample=False",
                        "--return_full_text=False", "--stream=False")
    assert result.returncode == 0, result.stderr
    assert result.stdout == free.split(EOT)[0] + "\n---------------\n"
    summary = result.stderr.strip().splitlines()[-1]
    assert f"1 prompt(s) of {len(prompt)} tokens" in summary and "tok/s" in summary


def test_bert_vocabulary_documents_are_wrapped_and_samples_start_and_end_as_they_do(tmp_path):
    """uer/gpt2-chinese-* style: a GPT-2 with a BERT vocab.txt. --documents=lines wraps every
    line as BertTokenizer does ([CLS] ... [SEP]); sample.py starts at [CLS] and ends at [SEP]."""
    import numpy as np
    from transformers import BertTokenizer

    lines = ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"] * 5
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set("".join(lines)))]
    folder = tmp_path / "gpt2-chinese"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                               vocab_size=len(vocab))).save_pretrained(folder)
    (tmp_path / "poems.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_script("data/text/prepare.py", f"--input={tmp_path / 'poems.txt'}", f"--tokenizer={folder}",
                        "--documents=lines", f"--out={tmp_path / 'data'}", "--num_proc=1")
    assert result.returncode == 0, result.stderr
    oracle = BertTokenizer(str(folder / "vocab.txt"))
    train = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16).tolist()
    assert train == [i for line in lines[:18] for i in oracle.encode(line)]
    model, tok = load_model(str(folder))
    sampled = run_script("sample.py", f"--init_from={folder}", "--device=cpu", "--start=床前",
                         "--temperature=0", "--max_new_tokens=20", "--stream=False")
    assert sampled.returncode == 0, sampled.stderr
    prompt = [tok.bos_token] + tok.encode("床前")
    row = engine.generate(model.eval(), [prompt], 20, temperature=0, stop_tokens=[tok.eot_token])[0].tolist()
    row = row[1:]  # the [CLS] fed first is not shown, as transformers' pipeline does not
    expected = tok.decode(row[:row.index(tok.eot_token)] if tok.eot_token in row else row)
    assert sampled.stdout.split("---------------\n")[0] == expected + "\n"
    assert expected.startswith("床前")
