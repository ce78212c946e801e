"""A model folder's generation_config.json supplies the decoding defaults (do_sample,
temperature, top_k, top_p, repetition_penalty, ...) of sample.py and chat.py, as transformers'
generate() resolves them; a flag the user sets wins. The settings and a Llama folder's end and
start ids travel in the tokenizer spec, so a fine-tuned run keeps them. Oracle: transformers
(model.generation_config, and generate()'s seeded or greedy tokens on the same weights)."""

import json

import pytest
import torch
from tokenizers import processors
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from nanogpt import checkpoint
from nanogpt import engine
import sample
from configurator import configure, knobs
from conftest import run_script, save_tiny_bpe, tiny_bpe
from nanogpt.tokenizer import from_spec

INSTRUCT = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
PROMPT = "ROMEO:"
NEW = 12


def qwen_folder(folder, **generation):
    """A tiny random Qwen2 saved by transformers, with tiny_bpe() and a generation_config.json
    that transformers writes from `generation`."""
    eos = tiny_bpe().token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=tiny_bpe().get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=eos)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    GenerationConfig(eos_token_id=eos, **generation).save_pretrained(folder)
    save_tiny_bpe(folder)
    return folder


def resolved(tokenizer, argv=(), width=1):
    """The options sample.py decodes with for the command line argv."""
    cfg = configure(dict(knobs(vars(sample))), list(argv))
    values, note = engine.with_generation_config(cfg, cfg.passed, tokenizer)
    return engine.options_from_flags(values, cfg.passed, tokenizer, width), note


def ours_and_theirs(folder, seed, **their_kwargs):
    """Our tokens and transformers' for PROMPT, NEW tokens, each with its own defaults."""
    model, tok = checkpoint.load_model(str(folder))
    prompt = tok.encode(PROMPT)
    options, _ = resolved(tok, ["--num_samples=1", f"--max_new_tokens={NEW}", f"--seed={seed}"], len(prompt))
    ours = engine.generate(model.eval(), [prompt], stop_tokens=model.config.eos_token_id, **vars(options))
    theirs_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(seed)  # transformers samples from torch's global generator
    with torch.no_grad():
        theirs = theirs_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=NEW, **their_kwargs)
    return ours[0].tolist(), theirs[0].tolist(), options, theirs_model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_file_s_settings_are_transformers_and_sample_the_same_tokens(tmp_path, seed):
    folder = qwen_folder(tmp_path, **INSTRUCT)
    ours, theirs, options, theirs_model = ours_and_theirs(folder, seed)
    for key in (*INSTRUCT, "typical_p", "no_repeat_ngram_size"):
        assert getattr(options, key) == pytest.approx(getattr(theirs_model.generation_config, key) or
                                                      {"typical_p": 1.0, "no_repeat_ngram_size": 0}.get(key)), key
    assert options.sampling and ours == theirs


def test_a_file_that_leaves_settings_out_gets_transformers_defaults(tmp_path):
    # do_sample and temperature only: transformers samples with its top_k=50, not our 200
    folder = qwen_folder(tmp_path / "partial", do_sample=True, temperature=1.3)
    ours, theirs, options, _ = ours_and_theirs(folder, 5)
    assert (options.top_k, options.temperature, options.top_p) == (50, 1.3, 1.0) and ours == theirs
    # do_sample=False (Qwen2.5 base's file): greedy, whatever our temperature default says
    folder = qwen_folder(tmp_path / "greedy", do_sample=False)
    ours, theirs, options, _ = ours_and_theirs(folder, 0)
    assert not options.sampling and options.num_return_sequences == 1 and ours == theirs
    # a file of token ids alone (GPT-2's): our own defaults stay
    folder = qwen_folder(tmp_path / "ids")
    tok = checkpoint.load_tokenizer(str(folder))
    options, note = resolved(tok)
    assert tok.generation == {} and note == ""
    assert (options.temperature, options.top_k, options.num_return_sequences) == (0.8, 200, 10)


def test_a_flag_the_user_sets_wins_even_at_our_default(tmp_path):
    folder = qwen_folder(tmp_path, **INSTRUCT)
    tok = checkpoint.load_tokenizer(str(folder))
    options, note = resolved(tok, ["--top_k=5", "--temperature=0.8"])  # 0.8: our default, typed
    assert (options.top_k, options.temperature, options.top_p, options.repetition_penalty) == (5, 0.8, 0.8, 1.1)
    assert "top_k" not in note and "temperature" not in note and "top_p=0.8" in note
    options, _ = resolved(tok, ["--temperature=0"])  # greedy from temperature=0 alone
    assert not options.sampling
    options, _ = resolved(tok, ["--num_beams=3"])  # beam search from num_beams alone
    assert options.num_beams == 3 and not options.sampling
    # a config file counts as the user's too
    (tmp_path / "cfg.py").write_text("top_p = 0.5\n")
    options, _ = resolved(tok, [str(tmp_path / "cfg.py")])
    assert options.top_p == 0.5 and options.top_k == 20


def test_sample_and_chat_say_which_values_came_from_the_file(tmp_path):
    folder = qwen_folder(tmp_path / "model", **INSTRUCT)
    model, tok = checkpoint.load_model(str(folder))
    prompt = tok.encode(PROMPT)
    torch.manual_seed(1337)  # sample.py's seed
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval().generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=NEW)
    eos = model.config.eos_token_id[0]
    text = tok.decode([t for t in theirs[0].tolist() if t != eos])
    result = run_script("sample.py", f"--init_from={folder}", f"--start={PROMPT}", "--device=cpu",
                        "--num_samples=1", f"--max_new_tokens={NEW}")
    assert result.returncode == 0, result.stderr
    # (the output is read as text: a random model's \r comes back as \n)
    assert result.stdout.split("\n---------------")[0] == text.replace("\r\n", "\n").replace("\r", "\n")
    assert ("from generation_config.json: do_sample=True, temperature=0.7, top_k=20, top_p=0.8, "
            "repetition_penalty=1.1") in result.stderr
    # chat.py says so too (this base model has no template: it continues the text)
    result = run_script("chat.py", f"--init_from={folder}", f"--prompt={PROMPT}", "--device=cpu",
                        "--max_new_tokens=4", "--top_k=3")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("decoding:"))
    assert "temperature=0.7" in line and "top_k" not in line


def test_a_fine_tuned_run_keeps_the_settings_and_the_llama_ids(tmp_path):
    """A run saved from a Llama folder (as train.py saves it, with tokenizer.spec()) loads back
    with the folder's decoding defaults, its eos ids (generation_config.json's) and its <s>."""
    tok_json = tiny_bpe()
    tok_json.add_special_tokens(["<s>", "</s>", "<|eot_id|>"])
    bos, eos, eot = (tok_json.token_to_id(t) for t in ("<s>", "</s>", "<|eot_id|>"))
    tok_json.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok_json.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                                 bos_token_id=bos, eos_token_id=eos)).save_pretrained(folder)
    GenerationConfig(bos_token_id=bos, eos_token_id=[eot, eos], do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tok_json.to_str(), encoding="utf-8")
    model, tok = checkpoint.load_model(str(folder))
    assert (tok.bos_token, tok.eot_token, tok.eos_tokens) == (bos, eot, [eot, eos])
    assert tok.generation == {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (tmp_path / "run").mkdir()
    checkpoint.save_run(str(tmp_path / "run" / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                        {}, tok.spec(), iter_num=1)
    for back in (checkpoint.load_tokenizer(str(tmp_path / "run")), from_spec(json.loads(json.dumps(tok.spec())))):
        assert (back.bos_token, back.eot_token, back.eos_tokens) == (bos, eot, [eot, eos])
        assert back.generation == tok.generation
    assert engine.stop_token_ids(*checkpoint.load_model(str(tmp_path / "run"))) == sorted([eot, eos])
    assert sample.encode_prompt(back, "a")[0] == bos


def test_a_bad_value_in_the_file_is_a_one_line_error(tmp_path):
    folder = qwen_folder(tmp_path, **INSTRUCT)
    (folder / "generation_config.json").write_text(json.dumps({"top_k": "twenty"}))
    with pytest.raises(Exception) as info:
        checkpoint.load_tokenizer(str(folder))
    assert type(info.value).__name__ == "UserError" and "top_k must be int" in str(info.value)


def test_an_export_keeps_the_settings_and_the_chat_template(tmp_path):
    """export_hf.py's folder gives transformers the same decoding defaults and chat template."""
    from nanogpt import hf
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    template = ("{% for m in messages %}{{ '<|endoftext|>' + m.role + ': ' + m.content }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|endoftext|>assistant: ' }}{% endif %}")
    folder = qwen_folder(tmp_path / "model", **INSTRUCT)
    PreTrainedTokenizerFast(tokenizer_object=tiny_bpe(), chat_template=template,
                            eos_token="<|endoftext|>").save_pretrained(folder)
    model, tok = checkpoint.load_model(str(folder))
    hf.export(model, tok, str(tmp_path / "export"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for key, value in INSTRUCT.items():
        assert getattr(theirs.generation_config, key) == pytest.approx(value), key
    assert theirs.generation_config.eos_token_id == model.config.eos_token_id[0]
    assert checkpoint.load_tokenizer(str(tmp_path / "export")).generation == tok.generation
    messages = [{"role": "user", "content": "Who wrote Hamlet?"}]
    assert AutoTokenizer.from_pretrained(tmp_path / "export").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(messages, add_generation_prompt=True)
    # a tokenizer without settings (GPT-2's, a char vocabulary) exports no generation_config.json
    tok.generation = {}
    hf.export(model, tok, str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "generation_config.json").exists()


def test_hugging_face_habits_on_the_command_line():
    """transformers users' flags: num_return_sequences for several samples, early_stopping
    'never', a bare --do_sample, and beams with do_sample named as the conflict it is."""
    tok = None  # no words to encode, no generation_config.json
    options, _ = resolved(tok, ["--num_return_sequences=3"])
    assert options.num_return_sequences == 3 and options.sampling
    options, _ = resolved(tok, ["--num_beams=4", "--early_stopping=never", "--num_return_sequences=2"])
    assert options.early_stopping == "never" and options.num_beams == 4 and options.temperature == 0
    options, _ = resolved(tok, ["--do_sample", "--num_samples=2"])
    assert options.do_sample is True and options.num_return_sequences == 2
    with pytest.raises(engine.UserError, match="beam sampling, which is not supported"):
        resolved(tok, ["--num_beams=5", "--do_sample=True"])


def test_a_greedy_file_says_what_to_do_and_names_only_what_decoding_uses(tmp_path):
    """A base model's generation_config.json with do_sample=False (Qwen2.5's): several samples
    are refused naming the user's flag and the way out; the note names neither an empty list
    nor a sampling default greedy decoding does not use; a temperature the user sets samples,
    and the note says the file gave way."""
    folder = qwen_folder(tmp_path / "base", do_sample=False, repetition_penalty=1.05)
    _, tok = checkpoint.load_model(str(folder))
    with pytest.raises(engine.UserError, match=r"not num_samples=2: set --do_sample=True"):
        resolved(tok, ["--num_samples=2"])
    options, note = resolved(tok, [])
    assert not options.sampling and "top_k" not in note and ": ;" not in note
    assert note == "from generation_config.json: do_sample=False, repetition_penalty=1.05"
    options, note = resolved(tok, ["--temperature=0.9"])
    assert options.sampling and "gives way to the temperature you set" in note
