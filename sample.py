"""
Sample from a trained model, or from pretrained GPT-2 weights:

$ python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --temperature=0.8 --top_k=50
$ python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9 --num_samples=3
$ python sample.py --init_from=gpt2 --start=FILE:prompts.txt --temperature=0 --stop=.    # one sentence each
$ python sample.py --init_from=gpt2 --num_beams=5 --temperature=0 --num_samples=1 --num_return_sequences=3

Decoding is engine.py's: a KV cache, Hugging Face's decoding options, and every sample of every
prompt in one batch. A lone sample is printed as it is produced.
The checkpoint carries its tokenizer, so no data folder is needed.
`python sample.py --help` lists every setting.
"""

import json
import os
import sys
import time

from configurator import configure, knobs, run  # first: Ctrl-C while the rest loads exits quietly

import checkpoint
import engine
import hardware
import hf
from errors import UserError
from quantize import fast_cpu_linears, quantize_int8

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' loads out_dir/ckpt.pt; or gpt2 ... gpt2-xl, a hub id, a folder, a nanoGPT ckpt.pt
out_dir = "out"
start = "\n"  # the prompt; "FILE:prompts.txt" has one prompt a line, "FILE:prompts.jsonl" one JSON string a line
num_samples = 10  # samples per prompt, drawn together as one batch
max_new_tokens = 500
max_length = None  # Hugging Face's: the prompt and the new tokens together (replaces max_new_tokens)
min_new_tokens = 0  # the end-of-text token is held back until a sample has this many new tokens
temperature = 0.8  # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
do_sample = None  # False: greedy whatever the temperature; True: sample; None: temperature decides
top_k = 200  # sample from the top_k most likely tokens only; None or 0 keeps all
top_p = 1.0  # ... from the most likely tokens whose probabilities add up to top_p (nucleus)
min_p = 0.0  # ... from tokens at least min_p times as likely as the most likely one
typical_p = 1.0  # ... from the tokens whose surprise is closest to the entropy (typical sampling)
repetition_penalty = 1.0  # > 1 makes tokens already in the text less likely (Hugging Face's)
presence_penalty = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
frequency_penalty = 0.0  # OpenAI's: subtracted once per time the token was generated
no_repeat_ngram_size = 0  # n > 0: no n tokens in a row appear twice in a sample
bad_words = None  # a string or list of strings (or token-id lists) a sample never contains
suppress_tokens = None  # a list of token ids (or strings, each one token) never generated
num_beams = 1  # > 1: beam search (deterministic: the sampling options left at their defaults do not apply)
length_penalty = 1.0  # beam search ranks by log-probability / length**length_penalty
early_stopping = False  # beam search: stop as soon as num_beams sequences are finished
num_return_sequences = 1  # beam search: print this many of the best beams
context_shift = False  # past the context: True drops its older half at once (much faster), False crops per token as nanoGPT
stop = None  # a string, or a list of strings, that ends a sample (it is not printed); special tokens count
skip_special_tokens = False  # True: special tokens (<|endoftext|>, [CLS], ...) are not printed
return_full_text = True  # False: print the generated text only, not the prompt before it
stream = True  # print a lone sample as it is produced
seed = 1337
device = None  # None (or 'auto') picks cuda, then mps, then cpu
dtype = None  # weights in 'float32', 'bfloat16' or 'float16'; None (or 'auto'): float32 on CPUs (fastest there), else the GPU's best
quantize = None  # 'int8': int8 weights in every matmul, for fast decoding on a CPU
compile = False  # compile the one-token decode step (CUDA graphs on a GPU); pays off for long generations
merge_lora = True  # a LoRA run: bake its adapters into the base weights, to decode at the base's speed
# -----------------------------------------------------------------------------
# the knobs besides those whose default is None that None may be given to
NULLABLE = ("top_k", "seed")
# the decoding flags, which chat.py takes too
DECODING = ("num_samples", "max_new_tokens", "max_length", "min_new_tokens", "temperature",
            "do_sample", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "bad_words",
            "suppress_tokens", "num_beams", "length_penalty", "early_stopping",
            "num_return_sequences", "context_shift", "stop", "seed")


def read_prompts(text):
    """The prompts --start gives: the text itself, or a file's. A .jsonl file holds one JSON
    string a line; any other file one prompt a line, except that a file of one line is one
    prompt, newline included, as nanoGPT reads it. Blank lines are skipped."""
    if not isinstance(text, str):
        raise UserError(f"start must be the prompt's text or FILE:path, got {text!r} (an empty "
                        "prompt is --start='')")
    if not text.startswith("FILE:"):
        return [text]
    path = text[len("FILE:"):]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read prompt file {path!r}: {e.strerror}") from None
    if b"\0" in data:
        raise UserError(f"prompt file {path!r} is binary (it holds NUL bytes, first at byte "
                        f"{data.index(0)}), not text: give a UTF-8 text file")
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path!r} is not UTF-8 text (byte {e.start}: {e.reason}): "
                        "save it as UTF-8") from None
    lines = content.splitlines()
    if not path.endswith(".jsonl"):
        prompts = [content] if len(lines) <= 1 else [line for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompts.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(prompts[-1], str):
                raise UserError(f"{path}, line {n}: each line must be a JSON string (a prompt)")
    if not prompts:
        raise UserError(f"prompt file {path!r} holds no prompt")
    return prompts


def encode_prompt(tokenizer, text):
    ids = tokenizer.encode(text)
    if tokenizer.bos_token is not None:  # BERT vocabularies: [CLS] starts a text
        return [tokenizer.bos_token] + ids
    if ids:
        return ids
    if tokenizer.eot_token is None:
        raise UserError("the prompt is empty: give --start some text (this tokenizer has no "
                        "end-of-text token to start from)")
    return [tokenizer.eot_token]  # GPT-2 samples unconditionally after its end-of-text token


def decoding_defaults(cfg, passed, tokenizer):
    """cfg with the model's own decoding defaults for the flags the user did not set (passed:
    the keys the command line or a config file gave): its generation_config.json's settings,
    which the tokenizer carries, and transformers' defaults for those the file leaves out, as
    transformers' generate() resolves them (a file with do_sample and temperature samples with
    top_k=50). A file's do_sample gives way to a temperature or num_beams the user set: those
    choose sampling, greedy or beams themselves. Returns (cfg, note), note saying which values
    came from the file ("" if none did)."""
    given = getattr(tokenizer, "generation", None) or {}
    skip = set(passed) | ({"do_sample"} if {"temperature", "num_beams"} & set(passed) else set())
    taken = {k: v for k, v in {**hf.GENERATION_DEFAULTS, **given}.items() if k not in skip and k in cfg}
    if not given or not taken:
        return cfg, ""
    note = "from generation_config.json: " + ", ".join(f"{k}={v!r}" for k, v in taken.items() if k in given)
    filled = [f"{k}={v!r}" for k, v in taken.items() if k not in given and v != cfg[k]]
    if filled:
        note += f"; transformers' defaults for what it leaves out: {', '.join(filled)}"
    return {**cfg, **taken}, note


def decoding_options(cfg, passed, tokenizer, prompt_width):
    """The decoding flags of cfg (the knobs named in DECODING) as engine.DecodingOptions, which
    checks them. num_samples is what the engine (and Hugging Face) call num_return_sequences
    when sampling. Beam search and greedy decoding run from --num_beams=N or --temperature=0
    alone: the sampling flags left at their (nanoGPT) defaults do not apply to them; one the
    user set (passed) that conflicts is an error. Words given as text are encoded with the
    model's tokenizer. chat.py decodes with the same flags."""
    beams, samples, temp = cfg["num_beams"], cfg["num_samples"], cfg["temperature"]
    if beams > 1 and "temperature" not in passed:
        temp = 0.0
    greedy = not (temp > 0 if cfg["do_sample"] is None else cfg["do_sample"])
    if (beams > 1 or greedy) and "num_samples" not in passed:
        samples = 1
    if samples < 1:
        raise UserError(f"num_samples must be >= 1, got {samples}")
    if beams > 1 and samples != 1:
        raise UserError(f"num_beams={beams} is beam search, which gives num_return_sequences "
                        "results per prompt, not samples: leave num_samples unset (or 1)")
    if beams == 1 and cfg["num_return_sequences"] != 1:
        raise UserError("num_return_sequences counts the beams to print (with num_beams > 1); "
                        "for several samples per prompt set num_samples")
    new_tokens, max_length = cfg["max_new_tokens"], cfg["max_length"]
    if max_length is not None:
        if max_length <= prompt_width:
            raise UserError(f"max_length={max_length} leaves no room after the {prompt_width}-token "
                            "prompt: it counts the prompt and the new tokens together")
        new_tokens = max_length - prompt_width
    same = ("top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "no_repeat_ngram_size", "length_penalty", "early_stopping", "seed",
            "context_shift", "do_sample", "min_new_tokens")
    suppressed = token_lists(cfg["suppress_tokens"], tokenizer, "suppress_tokens")
    return engine.DecodingOptions(
        max_new_tokens=new_tokens, temperature=temp, num_beams=beams,
        num_return_sequences=samples if beams == 1 else cfg["num_return_sequences"],
        bad_words_ids=token_lists(cfg["bad_words"], tokenizer, "bad_words"),
        suppress_tokens=tuple(i for ids in suppressed for i in ids), **{k: cfg[k] for k in same})


def check_generation_memory(model, n_prompts, prompt_width, options, device):
    """Refuse, before anything is allocated, a generation whose buffers cannot fit in memory:
    the token ids (int64), the KV cache and a step's logits for every row (num_samples or
    num_beams per prompt) over the prompt and max_new_tokens. Counted from the sizes, against
    this machine's memory (a CUDA device's free memory when it runs there)."""
    import torch
    cfg = model.config
    rows = n_prompts * max(options.num_beams, options.num_return_sequences)
    total = prompt_width + options.max_new_tokens
    itemsize = next(model.parameters()).element_size()
    cache = 2 * cfg.n_layer * rows * cfg.kv_heads * min(cfg.block_size, total) * cfg.head_size * itemsize
    need = rows * total * 8 + cache + 4 * rows * cfg.vocab_size * 4
    if torch.device(device).type == "cuda":
        have, where = torch.cuda.mem_get_info(torch.device(device))[0], f"free on {device}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of this machine's memory"
    if need > have:
        raise UserError(f"{rows:,} rows (num_samples or num_beams per prompt) of {total:,} tokens "
                        f"(max_new_tokens={options.max_new_tokens:,} after the prompt) need "
                        f"{need / 1e9:,.1f} GB for their ids, KV cache and logits, more than the "
                        f"{have / 1e9:,.0f} GB {where}: lower num_samples or max_new_tokens")


def token_lists(words, tokenizer, name):
    """A flag of words (a string, or a list of strings and token-id lists) as token-id tuples."""
    words = [words] if isinstance(words, (str, int)) else words or []
    if not isinstance(words, (list, tuple)):
        raise UserError(f"{name} must be a string, a token id, or a list of them, got {words!r}")
    out = []
    for word in words:
        ids = tokenizer.encode(word) if isinstance(word, str) else [word] if isinstance(word, int) else word
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError(f"{name}: {word!r} is not text or token ids")
        out.append(tuple(ids))
    return tuple(out)


def main():
    # None only where the default is None, and for top_k (keep all) and seed (unseeded)
    passed = set(configure(globals(), nullable=NULLABLE).passed)  # what the user set (a config file or a flag)
    if not init_from:
        raise UserError("init_from must be 'resume', a GPT-2 size (gpt2 ... gpt2-xl), a hub id, "
                        "a model folder or a nanoGPT ckpt.pt")
    stops = engine.check_stop_strings(stop)
    if quantize not in (None, "int8"):
        raise UserError(f"quantize must be None or 'int8', got {quantize!r}")
    texts = read_prompts(start)
    dev, _, precision, _ = hardware.setup(device, dtype, training=False)

    # the parameters are loaded in the run's precision (bfloat16 / float16 halve memory)
    source = os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else init_from
    model, tokenizer = checkpoint.load_model(source, dev, precision, merge_lora=merge_lora)
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    # the model folder's generation_config.json decides what the user leaves unset
    cfg, note = decoding_defaults(knobs(globals()), passed, tokenizer)
    options = decoding_options(cfg, passed, tokenizer, max(map(len, prompts)))
    check_generation_memory(model, len(prompts), max(map(len, prompts)), options, dev)
    model.eval().to(dev)
    # this script owns the model: on a CPU its Linear layers get the layout that decodes fastest
    if quantize == "int8":
        quantize_int8(model)
    else:
        fast_cpu_linears(model)

    # each prompt has options.num_return_sequences rows of output, and each row a TextStream
    # that hides the stop strings (and, for a lone sample, prints the text as it comes)
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    streams = [engine.TextStream(decode, p, stops, show_prompt=return_full_text)
               for p in prompts for _ in range(options.num_return_sequences)]
    live = stream and len(streams) == 1 and num_beams == 1
    if live:
        print(streams[0].flush(), end="", flush=True)

    def on_token(row, token):
        text = streams[row].add(token)
        if live:
            print(text, end="", flush=True)
        return streams[row].stopped

    # the model's own end-of-text ids (an instruct model has several), else the tokenizer's
    stop_tokens = list(getattr(model.config, "eos_token_id", None) or
                       ([] if tokenizer.eot_token is None else [tokenizer.eot_token]))
    t0 = time.perf_counter()
    out = engine.generate(model, prompts, stop_tokens=stop_tokens, stop_strings=stops,
                          tokenizer=tokenizer, on_token=None if num_beams > 1 else on_token,
                          compile=compile, **vars(options))
    seconds = time.perf_counter() - t0
    if num_beams > 1:  # beam search chooses its sequences at the end: read them now
        width = max(map(len, prompts))
        for row, tokens in enumerate(out[:, width:].tolist()):
            for token in tokens:
                if token in stop_tokens or token == engine.PAD or streams[row].stopped:
                    break
                on_token(row, token)
    for s in streams:
        print(s.flush() if live else s.shown_text())
        print("---------------")
    new = sum(s.new_tokens for s in streams)
    print(f"{len(prompts)} prompt(s) of {sum(map(len, prompts))} tokens; {new} tokens generated "
          f"in {seconds:.2f} s, {new / max(seconds, 1e-9):.1f} tok/s{'; ' + note if note else ''}",
          file=sys.stderr)


if __name__ == "__main__":
    run(main)
