"""What Hugging Face users type first: generate()'s eos_token_id and pad_token_id as decoding
flags, and a chat that goes as transformers' pipeline goes (the replies kept as generated), on a
model of a small context, through bad messages. transformers is the oracle where it defines the
behaviour; the models and tokenizers are tiny and built here."""

import io
import sys

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, pipeline

from conftest import assert_user_error, run_script
from nanogpt import engine
from nanogpt.checkpoint import load_model
from test_chat import CHATML, tokenizers_pair  # noqa: F401 (a fixture)
from test_hf_parity import folder, generated, hf_generate, pair  # noqa: F401 (fixtures)

# the ChatML template without trimming the messages, as Qwen2.5's own: a reply's spaces and
# newlines at its ends stay in the next turns' prompts
CHATML_AS_QWEN = CHATML.replace("message.content | trim", "message.content")


# -----------------------------------------------------------------------------
# --eos_token_id and --pad_token_id

def script_generate(model, tokenizer, prompts, **given):
    """engine.generate as sample.py runs it from its decoding flags (given: those set)."""
    flags = {**engine.decoding_flags(), **given}
    options = engine.options_from_flags(flags, set(given), tokenizer, max(map(len, prompts)))
    stop_tokens = engine.stop_token_ids(model, tokenizer, flags["eos_token_id"])
    return engine.generate(model, prompts, stop_tokens=stop_tokens,
                           pad_token_id=engine.pad_token_id(model, flags["pad_token_id"]), **vars(options))


def test_eos_and_pad_token_id_flags_end_and_pad_rows_as_transformers(pair):
    theirs, ours, _, tok = pair
    prompts = [tok.encode("ROMEO: hello"), tok.encode("to be")]
    free = hf_generate(theirs, prompts, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    b = free[0, 12 + 5].item()  # ends the first row early; a never comes; pad is neither
    a, pad = [t for t in range(tok.vocab_size) if t not in free[:, 12:].flatten().tolist()][:2]
    for eos_token_id, pad_token_id in (([a, b], pad), (b, None)):  # a list, an id; pad by default
        expected = hf_generate(theirs, prompts, max_new_tokens=20, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id)
        got = script_generate(ours, tok, prompts, max_new_tokens=20, temperature=0,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        # ours left-pads the prompts with PAD, transformers with its pad id: compare what was generated
        assert generated(got, 12) == generated(expected, 12)
        fill = b if pad_token_id is None else pad  # transformers' default pad: the first eos id
        assert any(row[-2:] == [fill, fill] for row in generated(got, 12))  # a row ended and was padded
    # beams: a token of the best free beam ends beams halfway, which are padded with pad
    prompt = tok.encode("ROMEO:")
    beams = dict(max_new_tokens=10, num_beams=3, num_return_sequences=3)
    free = hf_generate(theirs, [prompt], eos_token_id=None, pad_token_id=0, **beams)
    eos = [a, free[0, len(prompt) + 6].item()]
    expected = hf_generate(theirs, [prompt], eos_token_id=eos, pad_token_id=pad, **beams)
    got = script_generate(ours, tok, [prompt], eos_token_id=eos, pad_token_id=pad, **beams)
    assert got.tolist() == expected.tolist() and pad in got[:, len(prompt):].flatten().tolist()


def test_sample_takes_eos_and_pad_token_id_and_refuses_ids_outside_the_vocabulary(folder, pair):
    theirs, _, hf_tok, tok = pair
    prompt = tok.encode("to be or")
    free = hf_generate(theirs, [prompt], max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    eos = free[0, len(prompt) + 6].item()  # an ordinary character, as transformers allows
    expected = hf_generate(theirs, [prompt], max_new_tokens=20, eos_token_id=eos)
    new = expected[0, len(prompt):].tolist()
    assert new[-1] == eos and len(new) < 20
    result = run_script("sample.py", f"--init_from={folder}", "--device=cpu", "--start=to be or",
                        "--temperature=0", "--max_new_tokens=20", f"--eos_token_id={eos}",
                        "--pad_token_id=0", "--return_full_text=False")
    assert result.returncode == 0, result.stderr
    # the text up to the eos token, which is not printed (as the end-of-text token is not)
    assert result.stdout == hf_tok.decode(new[:-1]) + "\n---------------\n"
    vocab = pair[1].config.vocab_size
    for flag, words in ((f"--eos_token_id=[{eos}, {vocab}]", [f"{vocab} is not a token id", f"has {vocab:,} tokens"]),
                        ("--pad_token_id=-1", ["-1 is not a token id"]),
                        ("--eos_token_id", ["must be a token id or a list of them"])):
        name = flag[2:].split("=")[0]
        assert_user_error(run_script("sample.py", f"--init_from={folder}", "--device=cpu", flag), name, *words)


# -----------------------------------------------------------------------------
# chat.py

def make_qwen_folder(tokenizers_pair, tmp_path_factory, context):
    """A tiny random Qwen2 of a context of `context` tokens saved by transformers, with a ChatML
    tokenizer whose template keeps the messages as they are: (folder, transformers' model and
    tokenizer)."""
    ours, _ = tokenizers_pair
    folder = tmp_path_factory.mktemp("tiny-qwen")
    theirs = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(ours.tok.to_str()),
                                     chat_template=CHATML_AS_QWEN, eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=ours.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, tie_word_embeddings=True,
                         eos_token_id=ours.tok.token_to_id("<|im_end|>"))
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(folder)
    theirs.save_pretrained(folder)
    return folder, model, theirs


@pytest.fixture(scope="module")
def qwen_folder(tokenizers_pair, tmp_path_factory):
    """make_qwen_folder's, with a context of 160 tokens: a small one for chat's replies."""
    return make_qwen_folder(tokenizers_pair, tmp_path_factory, 160)


@pytest.fixture(scope="module")
def roomy_qwen_folder(tokenizers_pair, tmp_path_factory):
    """make_qwen_folder's, with a context that holds three turns with any tokenizer the tests
    train (the stand-in text's, without ../shared, takes more tokens a word)."""
    return make_qwen_folder(tokenizers_pair, tmp_path_factory, 1024)


def greedy_chat(folder, max_new_tokens):
    import chat
    model, tokenizer = load_model(str(folder))
    options = engine.DecodingOptions(max_new_tokens, temperature=0)
    return chat.Chat(model.eval(), tokenizer, options, engine.stop_token_ids(model, tokenizer))


def test_chat_keeps_replies_as_generated_as_transformers_pipeline(roomy_qwen_folder):
    folder, model, theirs = roomy_qwen_folder
    talk = greedy_chat(folder, 12)
    pipe = pipeline("text-generation", model=model, tokenizer=theirs)
    users = ["Who wrote Hamlet?", "And Macbeth?", "Thanks!"]
    messages = []
    for user in users[:2]:
        messages = pipe(messages + [{"role": "user", "content": user}], max_new_tokens=12,
                        do_sample=False)[0]["generated_text"]
        reply, _, _ = talk.reply(user)
        assert reply == messages[-1]["content"]
    assert any(m["content"] != m["content"].strip() for m in messages[1::2])  # spaces at an end
    ids, _, dropped = talk.prompt_ids(users[2])
    expected = theirs.apply_chat_template(messages + [{"role": "user", "content": users[2]}],
                                          add_generation_prompt=True, return_dict=False)
    assert dropped == 0 and ids == list(expected)


def test_chat_on_a_small_context_caps_replies_and_a_bad_message_asks_again(qwen_folder):
    folder, _, theirs = qwen_folder
    phrase = "Tell me of Denmark, "
    long_message = phrase * (110 // len(theirs.encode(phrase)))  # more than half the 160-token context
    talk = run_script("chat.py", f"--init_from={folder}", "--device=cpu", "--temperature=0",
                      input=f"Who wrote Hamlet?\n{long_message}\n/system Be brief.\nAnd Macbeth?\n/exit\n")
    assert talk.returncode == 0, talk.stderr
    assert talk.stdout.count("> ") == 5  # every line was read: the long one did not end the chat
    notes = [line for line in talk.stderr.splitlines() if "replies are cut" in line]
    assert len(notes) == 1 and "160 tokens" in notes[0] and "max_new_tokens=512" in notes[0]
    errors = [line for line in talk.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shorten" in errors[0] and "--max_new_tokens" in errors[0]
    assert "Traceback" not in talk.stderr
    system = next(line for line in talk.stderr.splitlines() if line.startswith("(a new conversation)"))
    assert "system prompt" in system and "forgotten" in system
    # with room for the reply, the long message is answered
    once = run_script("chat.py", f"--init_from={folder}", "--device=cpu", "--temperature=0",
                      "--max_new_tokens=8", f"--prompt={long_message}")
    assert once.returncode == 0 and "replies are cut" not in once.stderr, once.stderr


def test_chat_refuses_bytes_that_are_not_utf8_and_asks_again(qwen_folder, monkeypatch, capsys):
    import chat
    talk = greedy_chat(qwen_folder[0], 4)
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9?\nHi\n/exit\n"), encoding="utf-8")  # Latin-1's é
    monkeypatch.setattr(sys, "stdin", stdin)
    chat.repl(talk)
    out, err = capsys.readouterr()
    assert out.count("> ") == 3 and "error: the message is not UTF-8 text (character 4" in err
    assert [m["content"] for m in talk.history[::2]] == ["Hi"]


def test_chat_takes_only_the_flags_it_uses():
    shown = run_script("chat.py", "--help").stdout
    assert "--temperature" in shown and "--eos_token_id" in shown
    for flag in ("num_samples", "num_return_sequences", "num_beams", "max_length", "pad_token_id"):
        assert f"--{flag} " not in shown
        assert_user_error(run_script("chat.py", f"--{flag}=2"), "unknown config key", flag)


def test_serve_stops_at_the_eos_token_id_flag(pair):
    import serve
    _, ours, _, tok = pair
    flags = {**engine.decoding_flags(**serve.OPENAI_DEFAULTS), "eos_token_id": [5, 3]}
    server = serve.Server(ours, tok, flags, {"eos_token_id"}, "tiny", 128, 1, 1)
    try:
        assert server.stop_tokens == [5, 3]
    finally:
        server.batcher.close()


def test_python_generate_takes_eos_token_id_as_transformers(pair):
    """model.generate(x, n, eos_token_id=...) as transformers' generate takes it: the rows end
    at it, and a bad id is one UserError."""
    from nanogpt.errors import UserError
    theirs, ours, _, tok = pair
    prompt = tok.encode("ROMEO: hello")
    free = hf_generate(theirs, [prompt], max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    eos = free[0, len(prompt) + 5].item()
    expected = hf_generate(theirs, [prompt], max_new_tokens=20, eos_token_id=eos)
    got = ours.generate(torch.tensor([prompt]), 20, temperature=0, eos_token_id=eos)
    assert generated(got, len(prompt)) == generated(expected, len(prompt))
    assert generated(got, len(prompt))[0][-1] == eos and got.size(1) <= len(prompt) + 6  # ended there
    with pytest.raises(UserError, match="is not a token id"):
        ours.generate(torch.tensor([prompt]), 5, eos_token_id=ours.config.vocab_size)
