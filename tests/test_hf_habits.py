"""What Hugging Face users type first: generate()'s eos_token_id and pad_token_id as decoding
flags. transformers is the oracle; the models and tokenizers are tiny and built here."""

from conftest import assert_user_error, run_script
from nanogpt import engine
from test_hf_parity import folder, generated, hf_generate, pair  # noqa: F401 (fixtures)

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
    for flag in (f"--eos_token_id=[{eos}, {vocab}]", "--eos_token_id", "--pad_token_id=-1"):
        name = flag[2:].split("=")[0]
        assert_user_error(run_script("sample.py", f"--init_from={folder}", "--device=cpu", flag),
                          name, f"[0, {vocab})")


def test_serve_stops_at_the_eos_token_id_flag(pair):
    import serve
    _, ours, _, tok = pair
    flags = {**engine.decoding_flags(**serve.OPENAI_DEFAULTS), "eos_token_id": [5, 3]}
    server = serve.Server(ours, tok, flags, {"eos_token_id"}, "tiny", 128, 1, 1)
    try:
        assert server.stop_tokens == [5, 3]
    finally:
        server.batcher.close()
