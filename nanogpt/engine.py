"""
The inference engine: how a GPT (model.py) turns prompts into text.

model.py defines the layers; decoding lives here and in three files beside this one, as
nanochat keeps engine.py apart from gpt.py:

- kvcache.py: the KV cache, its window past block_size, and the compiled one-token step.
- logits.py: the logits processors (penalties, bans, temperature, top-k, top-p, ...).
- quantize.py: the CPU weight layouts a script may give its model for fast decoding.
- here: DecodingOptions, every way of picking the next token, with Hugging Face's meanings
  (plus OpenAI's presence and frequency penalties), checked before anything runs; the
  scripts' decoding flags, read from its fields (decoding_flags, options_from_flags) with
  the one rule for the ids that end a row (stop_token_ids); generate(),
  greedy decoding and sampling of many rows at once; beam_search(); stop strings; and
  TextStream, the text of one row as its tokens arrive, for streaming.

Rows of a batch are left-padded with PAD to the longest prompt; each row's tokens get the
positions and attention they would get alone, so a row's result does not depend on its
neighbours.

References: Hugging Face transformers, generation/utils.py.
"""

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional, Union

import torch
from torch.nn import functional as F

from nanogpt import hf
from nanogpt.errors import UserError
from nanogpt.kvcache import PAD, cache_and_step, cache_window, float_weight, next_logits
from nanogpt.logits import check_model_logits, next_tokens, process_logits
from nanogpt.tokenizer import check_token_ids


# -----------------------------------------------------------------------------
# Decoding options

# the logits are float32: a temperature or repetition_penalty outside its range divides or
# multiplies them into infinities (one below its smallest normal number is 0 there, or nearly)
FLOAT32 = torch.finfo(torch.float32)


def option(default=MISSING, help=""):
    """A DecodingOptions field: its default, and what it does, which the scripts' --help shows
    for the flag of the same name (decoding_flag_help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DecodingOptions:
    """How to pick each next token. The names and meanings are Hugging Face generate()'s;
    presence_penalty and frequency_penalty are OpenAI's. The fields are also the decoding
    flags of sample.py and chat.py (decoding_flags)."""
    max_new_tokens: int = option(help="tokens to generate per row, fewer if a stop token ends it")
    temperature: float = option(1.0, "divides the logits: 1.0 samples the model's distribution, "
                                     "lower is more conservative, 0 is greedy")
    top_k: Optional[int] = option(None, "sample from the top_k most likely tokens only; None or 0 "
                                        "keeps all")
    top_p: float = option(1.0, "... from the most likely tokens whose probabilities add up to top_p "
                               "(nucleus)")
    min_p: float = option(0.0, "... from tokens at least min_p times as likely as the most likely one")
    repetition_penalty: float = option(1.0, "> 1 makes every token already in the row less likely "
                                            "(Hugging Face's)")
    presence_penalty: float = option(0.0, "OpenAI's: subtracted from the logit of every token "
                                          "generated so far")
    frequency_penalty: float = option(0.0, "OpenAI's: subtracted once per time the token was "
                                           "generated")
    no_repeat_ngram_size: int = option(0, "n > 0: a row never repeats an n-gram (n tokens in a row)")
    num_beams: int = option(1, "> 1: beam search, deterministic (the sampling options do not apply)")
    length_penalty: float = option(1.0, "beam search ranks by log-probability / "
                                        "length ** length_penalty")
    early_stopping: Union[bool, str] = option(False, "beam search: True stops as soon as num_beams "
                                                     "sequences are finished; False or 'never' as "
                                                     "Hugging Face's")
    num_return_sequences: int = option(1, "results per prompt: samples, or the best beams")
    seed: Optional[int] = option(None, "seeds the sampling; None draws from torch's global generator")
    do_sample: Optional[bool] = option(None, "False: greedy whatever the temperature; True: sample; "
                                             "None: temperature > 0 decides")
    typical_p: float = option(1.0, "... from the tokens whose surprise is closest to the entropy "
                                   "(typical sampling), adding up to typical_p")
    min_new_tokens: int = option(0, "the stop tokens are held back until a row has this many new "
                                    "tokens")
    bad_words_ids: tuple = option((), "token sequences a row never completes (a lone id is never "
                                      "picked)")
    suppress_tokens: tuple = option((), "token ids never picked")
    # past block_size: False keeps the last block_size tokens at every step, exactly as nanoGPT
    # crops (each token then costs a forward pass over the whole window); True drops the older
    # half of the window when it is full, which decodes much faster but gives each token
    # between block_size / 2 and block_size tokens of context (all rows shift at the same step,
    # when the longest prompt's row fills the window)
    context_shift: bool = option(False, "past the context: True drops its older half at once "
                                        "(much faster), False crops per token as nanoGPT")

    def __post_init__(self):
        # a NaN passes every comparison below, and an infinity some: a model folder's
        # generation_config.json, a served request or a caller may give either
        for f in fields(self):
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"{f.name} must be a finite number, got {getattr(self, f.name)}")
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not (self.temperature == 0 or FLOAT32.tiny <= self.temperature <= FLOAT32.max):
            raise UserError(f"temperature must be 0 (greedy) or in float32's range, "
                            f"[{FLOAT32.tiny:.3g}, {FLOAT32.max:.3g}], which the logits are "
                            f"divided in, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 or None keeps all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 keeps all tokens), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1] (0 keeps all tokens), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError("repetition_penalty must be > 0 (1 is none), "
                            f"got {self.repetition_penalty}")
        if not FLOAT32.tiny <= self.repetition_penalty <= FLOAT32.max:
            raise UserError(f"repetition_penalty must be in float32's range, [{FLOAT32.tiny:.3g}, "
                            f"{FLOAT32.max:.3g}], which the logits are divided in, "
                            f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must be in [-2, 2] (OpenAI's range), got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            raise UserError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.num_beams < 1:
            raise UserError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_return_sequences < 1:
            raise UserError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise UserError("early_stopping must be True, False or 'never', "
                            f"got {self.early_stopping!r}")
        if self.context_shift not in (True, False):
            raise UserError(f"context_shift must be True or False, got {self.context_shift!r}")
        if self.do_sample not in (None, True, False):
            raise UserError(f"do_sample must be True or False, got {self.do_sample!r}")
        if self.do_sample and self.temperature == 0:
            raise UserError("do_sample=True samples, which needs temperature > 0 (0 is greedy)")
        if not 0 < self.typical_p <= 1:
            raise UserError(f"typical_p must be in (0, 1] (1 keeps all tokens), got {self.typical_p}")
        if self.min_new_tokens < 0:
            raise UserError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # a torch.Generator's range
            raise UserError(f"seed must be in [0, 2**64), got {self.seed}")
        if not all(isinstance(w, (list, tuple)) and w and all(isinstance(i, int) for i in w)
                   for w in self.bad_words_ids):
            raise UserError(f"bad_words_ids must be lists of token ids, got {self.bad_words_ids!r}")
        if not all(isinstance(i, int) for i in self.suppress_tokens):
            raise UserError(f"suppress_tokens must be token ids, got {self.suppress_tokens!r}")
        if self.num_beams == 1 and not self.sampling and self.num_return_sequences > 1:
            raise UserError(f"greedy decoding gives one result per prompt, not "
                            f"num_return_sequences={self.num_return_sequences}: sample "
                            "(temperature > 0) or use beams (num_beams > 1)")
        if self.num_beams > 1:
            try:  # beam search divides a sequence's score by its length ** length_penalty
                float(self.max_new_tokens) ** abs(self.length_penalty)
            except OverflowError:
                raise UserError(f"length_penalty={self.length_penalty} is too far from 0 for "
                                f"max_new_tokens={self.max_new_tokens}: beam search divides a "
                                "score by length ** length_penalty, which would overflow "
                                "(or be 0)") from None
            if self.num_return_sequences > self.num_beams:
                raise UserError(f"num_return_sequences ({self.num_return_sequences}) cannot "
                                f"exceed num_beams ({self.num_beams}): beam search keeps "
                                "num_beams sequences")
            # the sampling filters (top_k, top_p, min_p) do not apply: beams rank every token,
            # and Hugging Face ignores them too
            if self.sampling:
                # generate()'s temperature is nanoGPT's 1 unless given; sample.py's --num_beams
                # alone sets it to 0
                raise UserError(f"num_beams={self.num_beams} is beam search, which does not "
                                f"sample: pass temperature=0 or do_sample=False, got temperature "
                                f"{self.temperature} (sample.py: leave --temperature unset)")

    @property
    def sampling(self):
        return self.temperature > 0 if self.do_sample is None else self.do_sample


# -----------------------------------------------------------------------------
# The decoding flags of the scripts (sample.py, chat.py): DecodingOptions' fields, as a person
# types them, with nanoGPT's defaults, and what a script makes of them

# the flags a script takes besides the fields, or in place of one: {name: (default, help)}
SCRIPT_FLAGS = {
    "num_samples": (10, "samples per prompt, drawn together as one batch"),
    "max_length": (None, "Hugging Face's: the prompt and the new tokens together (replaces "
                         "max_new_tokens)"),
    # in place of bad_words_ids
    "bad_words": (None, "a string or list of strings (or token-id lists) a sample never contains"),
    "stop": (None, "a string, or a list of strings, that ends a sample (it is not printed); "
                   "special tokens count"),
    # Hugging Face generate()'s ids, as its users pass them (stop_token_ids, generate())
    "eos_token_id": (None, "the id, or list of ids, that end a sample, in place of the model's "
                           "own (Hugging Face's)"),
    "pad_token_id": (None, "what fills a finished row of the returned batch (Hugging Face's); "
                           "None: the first eos id"),
}
# the fields a script takes as another flag of SCRIPT_FLAGS
REPLACED = ("bad_words_ids",)
# the scripts' defaults where they are not the engine's: nanoGPT's sample.py samples 500 tokens
# at temperature 0.8 from the 200 most likely, seeded; suppress_tokens takes text too
# (early_stopping=None is False: a default of None lets the command line give True, False or
# "never" alike)
SCRIPT_DEFAULTS = dict(max_new_tokens=500, temperature=0.8, top_k=200, seed=1337,
                       suppress_tokens=None, early_stopping=None)
# the settings that only sampling uses (greedy decoding and beams do not)
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "typical_p")
# the flags besides those whose default is None that None may be given to: the Optional fields
NULLABLE_FLAGS = tuple(f.name for f in fields(DecodingOptions) if type(None) in getattr(f.type, "__args__", ()))


def decoding_flags(without=(), **defaults):
    """{name: default} of every decoding flag, for a script's globals: DecodingOptions' fields
    (but those REPLACED) and SCRIPT_FLAGS, with SCRIPT_DEFAULTS and then the
    script's own `defaults` over the fields' defaults; less the flags `without`, which the
    script does not use."""
    flags = {f.name: f.default for f in fields(DecodingOptions) if f.name not in REPLACED}
    flags.update({name: default for name, (default, _) in SCRIPT_FLAGS.items()})
    unknown = (set(defaults) | set(without)) - set(flags)
    assert not unknown, f"not decoding flags: {sorted(unknown)}"
    return {k: v for k, v in {**flags, **SCRIPT_DEFAULTS, **defaults}.items() if k not in without}


def decoding_flag_help():
    """{name: what it does} of every decoding flag (decoding_flags), for a script's --help."""
    return {**{f.name: f.metadata["help"] for f in fields(DecodingOptions) if f.name not in REPLACED},
            **{name: text for name, (_, text) in SCRIPT_FLAGS.items()}}


def with_generation_config(flags, passed, tokenizer):
    """The flags, with the model's own decoding defaults for those the user did not set
    (passed: the keys the command line or a config file gave): its generation_config.json's
    settings, which the tokenizer carries, and transformers' defaults for those the file
    leaves out, as transformers' generate() resolves them (a file with do_sample and
    temperature samples with top_k=50). A file's do_sample gives way to a temperature or
    num_beams the user set: those choose sampling, greedy or beams themselves. Returns
    (flags, note), note saying which values came from the file ("" if none did)."""
    given = getattr(tokenizer, "generation", None) or {}
    overruled = {"temperature", "num_beams"} & set(passed)
    skip = set(passed) | ({"do_sample"} if overruled else set())
    taken = {k: v for k, v in {**hf.GENERATION_DEFAULTS, **given}.items() if k not in skip and k in flags}
    if not given or not taken:
        return flags, ""
    samples = taken.get("do_sample", flags["do_sample"]) is not False
    parts = []
    from_file = [f"{k}={v!r}" for k, v in taken.items() if k in given and (samples or k not in SAMPLING)]
    if from_file:
        parts.append("from generation_config.json: " + ", ".join(from_file))
    # transformers' defaults for what the file leaves out, those that decoding uses
    filled = [f"{k}={v!r}" for k, v in taken.items()
              if k not in given and v != flags[k] and (samples or k not in SAMPLING)]
    if filled:
        parts.append(f"transformers' defaults for what it leaves out: {', '.join(filled)}")
    if given.get("do_sample") is False and "temperature" in passed and flags["temperature"] > 0:
        # transformers would decode greedily and warn that the temperature is unused
        parts.append("the file's do_sample=False gives way to the temperature you set: sampling")
    return {**flags, **taken}, "; ".join(parts)


def options_from_flags(flags, passed, tokenizer, prompt_width):
    """The decoding flags (decoding_flags' names) as DecodingOptions, which checks them.
    num_samples is what the engine (and Hugging Face) call num_return_sequences when sampling.
    Beam search and greedy decoding run from num_beams=N or temperature=0 alone: the sampling
    flags left at their (nanoGPT) defaults do not apply to them; one the user set (passed)
    that conflicts is an error. Words given as text are encoded with the model's tokenizer."""
    beams, samples, temp = flags["num_beams"], flags["num_samples"], flags["temperature"]
    if beams > 1 and flags["do_sample"]:
        raise UserError(f"num_beams={beams} with do_sample=True is beam sampling, which is not "
                        "supported: drop do_sample for beam search, or num_beams to sample")
    if beams > 1 and "temperature" not in passed:
        temp = 0.0
    greedy = not (temp > 0 if flags["do_sample"] is None else flags["do_sample"])
    if beams == 1 and "num_return_sequences" in passed:
        # Hugging Face's name for several samples per prompt (pipeline(), generate())
        if "num_samples" in passed and samples != flags["num_return_sequences"]:
            raise UserError(f"num_samples={samples} and num_return_sequences="
                            f"{flags['num_return_sequences']} both count the samples per prompt: "
                            "give one of them")
        samples = flags["num_return_sequences"]
    elif (beams > 1 or greedy) and "num_samples" not in passed:
        samples = 1
    if samples < 1:
        raise UserError(f"num_samples must be >= 1, got {samples}")
    if beams > 1 and samples != 1:
        raise UserError(f"num_beams={beams} is beam search, which gives num_return_sequences "
                        "results per prompt, not samples: leave num_samples unset (or 1)")
    if greedy and beams == 1 and samples > 1:
        raise UserError(f"greedy decoding (do_sample=False, or temperature=0) gives one result "
                        f"per prompt, not num_samples={samples}: set --do_sample=True and a "
                        "temperature > 0 to sample several")
    new_tokens, max_length = flags["max_new_tokens"], flags["max_length"]
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise UserError(f"max_length must be a whole number of tokens (or None: max_new_tokens "
                            f"counts), got {max_length!r}")
        if max_length <= prompt_width:
            raise UserError(f"max_length={max_length} leaves no room after the {prompt_width}-token "
                            "prompt: it counts the prompt and the new tokens together")
        new_tokens = max_length - prompt_width
    suppressed = token_lists(flags["suppress_tokens"], tokenizer, "suppress_tokens")
    bad_words = token_lists(flags["bad_words"], tokenizer, "bad_words")
    banned = {i for ids in suppressed for i in ids} | {w[0] for w in bad_words if len(w) == 1}
    if banned and len(banned) == tokenizer.vocab_size:
        raise UserError(f"suppress_tokens and bad_words ban all {tokenizer.vocab_size:,} tokens of "
                        "the vocabulary: no token would be left to pick")
    resolved = dict(max_new_tokens=new_tokens, temperature=temp, num_beams=beams,
                    early_stopping=False if flags["early_stopping"] is None else flags["early_stopping"],
                    num_return_sequences=samples if beams == 1 else flags["num_return_sequences"],
                    bad_words_ids=bad_words, suppress_tokens=tuple(i for ids in suppressed for i in ids))
    # every other field is its flag as given
    return DecodingOptions(**resolved, **{f.name: flags[f.name] for f in fields(DecodingOptions)
                                          if f.name not in resolved})


def token_lists(words, tokenizer, name):
    """A flag of words (a string, or a list of strings and token-id lists) as token-id tuples,
    each id one of the tokenizer's."""
    words = [words] if isinstance(words, (str, int)) else words or []
    if not isinstance(words, (list, tuple)):
        raise UserError(f"{name} must be a string, a token id, or a list of them, got {words!r}")
    out = []
    for word in words:
        ids = tokenizer.encode(word) if isinstance(word, str) else [word] if isinstance(word, int) else word
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError(f"{name}: {word!r} is not text or token ids")
        check_token_ids(name, ids, tokenizer.vocab_size)
        out.append(tuple(ids))
    return tuple(out)


def stop_token_ids(model, tokenizer, eos_token_id=None):
    """The ids that end a row: eos_token_id (the flag: an id or a list, in its order) alone, as
    Hugging Face's generate() takes it in place of the model's; else, sorted, the model config's
    end-of-text ids (a hub model's eos_token_id: an instruct model has several), the tokenizer's
    end-of-text token and those its model folder named, and its chat template's end-of-turn
    token."""
    if eos_token_id is not None:
        return list(dict.fromkeys(checked_token_ids(model, "eos_token_id", eos_token_id, several=True)))
    ids = {tokenizer.eot_token, *(getattr(model.config, "eos_token_id", None) or []),
           *getattr(tokenizer, "eos_tokens", [])}
    eos = (getattr(tokenizer, "special_tokens", None) or {}).get("eos_token")
    if eos is not None:
        ids.add(tokenizer.tok.token_to_id(eos))
    return sorted(i for i in ids if i is not None)


def pad_token_id(model, flag):
    """The pad_token_id flag, checked: an id of the model's vocabulary, or None (the default:
    the first stop token)."""
    return None if flag is None else checked_token_ids(model, "pad_token_id", flag, several=False)[0]


def checked_token_ids(model, name, value, several):
    """A token-id flag as a list of ids, each in the model's vocabulary; several: a list of
    them is allowed too."""
    ids = value if several and isinstance(value, (list, tuple)) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        what = "a token id or a list of them" if several else "a token id"
        raise UserError(f"{name} must be {what}, got {value!r}")
    check_token_ids(name, ids, model.config.vocab_size)
    return list(ids)


# -----------------------------------------------------------------------------
# Greedy decoding and sampling

def left_pad(prompts, copies, width):
    """A (len(prompts) * copies, width) buffer of token ids: each prompt `copies` times, right-
    aligned at the prompt width (PAD on its left), PAD after it where the new tokens will go."""
    prompt_width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts) * copies, width), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i * copies:(i + 1) * copies, prompt_width - len(p):prompt_width] = torch.tensor(p)
    return ids, prompt_width


def as_token_lists(prompts):
    """Prompts as lists of token ids: from a (B, T) tensor, or a list of lists."""
    prompts = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token (start an empty one with the "
                        "end-of-text token, if the tokenizer has one)")
    return prompts


@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop_tokens=(), stop_strings=(), tokenizer=None,
             pad_token_id=None, logits_processors=(), on_token=None, compile=False, eos_token_id=None,
             **options):
    """Continue each prompt (a (B, T) tensor, or lists of token ids of any lengths) by up to
    max_new_tokens tokens, decoding as `options` (DecodingOptions' fields) say.

    stop_tokens: ids that end a row (the tokenizer's end-of-text, or a list such as Qwen's);
    eos_token_id: Hugging Face's name for them (an id or a list), which replaces stop_tokens;
    stop_strings: texts that end a row once a new token completes
    one, even one begun in the prompt (tokenizer: what decodes the ids, needed for them);
    pad_token_id: what fills a row after it ended (the first stop token by default; without
    one a row repeats its last token); logits_processors: callables (ids, logits) -> logits,
    applied after the built-in penalties (ids: the tokens so far, (rows, T), left-padded with
    PAD = -1); on_token(row, token): called with each new token of each row as it is picked,
    stop tokens aside (streaming); returning True ends that row. Beam search picks its
    sequences at the end and calls no on_token. compile: run the one-token steps compiled
    (kvcache.decode_step), with results identical to the eager ones.

    The model is used as it is, never changed: on a CPU, quantize.py's layouts decode faster,
    and a caller that owns its model gives it one (sample.py and chat.py do).

    Returns a (rows, width) tensor: prompt i's num_return_sequences results are rows
    i * num_return_sequences onwards; prompts shorter than the longest are left-padded with
    PAD, and a row that ended early is filled with pad_token_id to the end."""
    opts = DecodingOptions(max_new_tokens, **options)
    if eos_token_id is not None:  # Hugging Face's name: it replaces stop_tokens
        stop_tokens = checked_token_ids(model, "eos_token_id", eos_token_id, several=True)
    prompts = as_token_lists(prompts)
    stop_strings = check_stop_strings(stop_strings)
    if stop_strings and tokenizer is None:
        raise UserError("stop_strings need the tokenizer that decodes the ids (tokenizer=...)")
    if opts.num_beams > 1:
        return beam_search(model, prompts, opts, stop_tokens, logits_processors, stop_strings,
                           tokenizer, pad_token_id, compile)[0]

    device = float_weight(model).device
    pad_token_id = default_pad(pad_token_id, stop_tokens)
    total = max(map(len, prompts)) + max_new_tokens
    ids, width = left_pad(prompts, opts.num_return_sequences, total)
    ids = ids.to(device)
    if max_new_tokens == 0:
        return ids
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=device)
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device).manual_seed(opts.seed)
    cache, step = cache_and_step(model, ids.size(0), min(model.config.block_size, total), compile)
    # whether every row has ended is asked of the device every `check_every` steps only (each
    # ask waits for it), unless tokens go to the host anyway (streaming, stop strings)
    host_work = on_token is not None or bool(stop_strings)
    check_every = 1 if host_work or device.type == "cpu" else 8
    last_live = torch.tensor(width, device=device)  # the last step at which a row was live
    logits = cache_window(model, cache, ids, width)
    for t in range(width, total):
        token = next_tokens(ids[:, :t], logits, width, opts, logits_processors, stop_tokens, generator)
        # an ended row is padded, or (with no pad token) repeats its last token
        ids[:, t] = torch.where(done, ids[:, t - 1] if pad_token_id is None else pad_token_id, token)
        last_live = torch.where(done.all(), last_live, t)
        stopped = torch.isin(token, stops) & ~done
        for row in (~done & ~stopped).nonzero()[:, 0].tolist() if host_work else ():
            ended = bool(stop_strings) and completes_stop_string(tokenizer, ids[row, :t + 1], stop_strings)
            if on_token is not None and on_token(row, token[row].item()):
                ended = True
            if ended:
                stopped[row] = True
        done |= stopped
        if t + 1 == total or ((t + 1 - width) % check_every == 0 and done.all()):
            return ids[:, :int(last_live) + 1]
        logits = next_logits(model, cache, ids, t + 1, opts.context_shift, step)


def default_pad(pad_token_id, stop_tokens):
    """What fills a row after it ended: pad_token_id, else the first stop token (Hugging Face's
    default), else None."""
    if pad_token_id is None and len(stop_tokens):
        return list(stop_tokens)[0]
    return pad_token_id


def check_stop_strings(stop_strings):
    """stop_strings as a list of non-empty strings (a lone string is one)."""
    stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings or []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise UserError(f"stop must be a non-empty string or a list of them, got {stop_strings!r}")
    return list(stops)


def find_stop_string(text, before, stop_strings):
    """Where the first stop string starts among those that occur in text and end past its first
    `before` characters (that is, overlap the newest token's text); -1 if none does."""
    starts = [text.find(s, max(0, before - len(s) + 1)) for s in stop_strings]
    return min((i for i in starts if i >= 0), default=-1)


def completes_stop_string(tokenizer, ids, stop_strings):
    """Whether the last of ids (a row, PAD allowed on the left) completes a stop string: the
    string occurs in the text and overlaps the last token's text, as Hugging Face's
    StopStringCriteria decides. Only the last few tokens are decoded: a stop string of n
    characters overlaps at most n + 1 tokens."""
    tail = [i for i in ids[-(max(map(len, stop_strings)) + 2):].tolist() if i != PAD]
    text = tokenizer.decode(tail)
    return find_stop_string(text, len(tokenizer.decode(tail[:-1])), stop_strings) >= 0


# -----------------------------------------------------------------------------
# Beam search

@torch.no_grad()
def beam_search(model, prompts, opts, stop_tokens=(), logits_processors=(), stop_strings=(),
                tokenizer=None, pad_token_id=None, compile=False):
    """Hugging Face's beam search: each prompt keeps the num_beams most likely sequences (by
    summed log-probability), extends each by every token, and keeps the best num_beams again.
    A sequence that picks a stop token, completes a stop string or reaches max_new_tokens is
    finished: it joins the
    prompt's num_beams best finished ones, ranked by log-probability / generated length **
    length_penalty. The search stops when no running beam can beat the finished ones (the
    estimate depends on early_stopping), or with early_stopping=True as soon as num_beams
    sequences are finished.
    Returns (sequences, scores): the num_return_sequences best finished sequences of each
    prompt, best first, laid out as generate's, and their scores."""
    P, K, max_new_tokens = len(prompts), opts.num_beams, opts.max_new_tokens
    device = float_weight(model).device
    ids, width = left_pad(prompts, K, max(map(len, prompts)) + max_new_tokens)
    ids = ids.to(device)
    total = ids.size(1)
    n = opts.num_return_sequences
    if max_new_tokens == 0:
        return ids.view(P, K, -1)[:, :n].reshape(P * n, -1), torch.zeros(P * n, device=device)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    # a finished sequence is padded with pad_token_id, as Hugging Face's (the first eos by default)
    pad_token_id = default_pad(pad_token_id, stop_tokens)
    fill_token = PAD if pad_token_id is None else pad_token_id
    cache, step = cache_and_step(model, P * K, min(model.config.block_size, total), compile)
    logits = cache_window(model, cache, ids, width)

    # the beams of all prompts run as rows P * K; only the first starts live, so that step
    # one does not pick the same token K times
    running = torch.zeros(P, K, device=device)
    running[:, 1:] = -1e9
    done = FinishedBeams(ids.view(P, K, total), opts)
    # candidates per step, as Hugging Face keeps them: num_beams more than could end on a stop
    # token (each beam's best continuations may be every stop token), and at least twice the beams
    n_candidates = max(2, 1 + len(stop_tokens)) * K
    offsets = torch.arange(P, device=device)[:, None] * K

    check_model_logits(logits)
    for t in range(width, total):
        log_probs = F.log_softmax(logits, dim=-1)
        log_probs = process_logits(ids[:, :t], log_probs, width, opts, logits_processors, stop_tokens)
        vocab_size = log_probs.size(-1)
        scores = (log_probs.view(P, K, vocab_size) + running[:, :, None]).view(P, K * vocab_size)
        cand_scores, flat = torch.topk(scores, n_candidates)  # (P, 2K), best first
        parent = offsets + torch.div(flat, vocab_size, rounding_mode="floor")  # rows they extend
        token = flat % vocab_size
        cand_ids = ids[parent.view(-1)].view(P, n_candidates, total)
        cand_ids[:, :, t] = token
        ends = torch.isin(token, stops) | (t + 1 == total)
        if stop_strings:
            ends |= torch.tensor([completes_stop_string(tokenizer, row[:t + 1], stop_strings)
                                  for row in cand_ids.view(-1, total)], device=device).view_as(ends)

        # the best candidates that go on become the running beams
        going = cand_scores - 1e9 * ends.float()
        best = torch.topk(going, K).indices
        running = going.gather(1, best)
        rows = parent.gather(1, best).view(-1)
        ids = cand_ids.gather(1, best[:, :, None].expand(-1, -1, total)).view(P * K, total)
        cache.reorder(rows)

        generated = t + 1 - width
        done.add(cand_ids, cand_scores, ends, generated)
        if done.search_is_over(running, generated, max_new_tokens) or ends.all():
            break
        logits = next_logits(model, cache, ids, t + 1, opts.context_shift, step)

    # the best num_return_sequences of each prompt, cut to the longest of them; the slots
    # after a sequence's end still hold PAD, and take the fill token
    out = done.ids[:, :n].reshape(P * n, total)
    longest = int((out[:, width:] != PAD).sum(dim=1).max())
    out = out[:, :width + longest]
    out[:, width:] = out[:, width:].masked_fill(out[:, width:] == PAD, fill_token)
    return out, done.scores[:, :n].reshape(-1)


class FinishedBeams:
    """The num_beams best finished sequences of each prompt and their scores (log-probability /
    generated length ** length_penalty), as Hugging Face's beam hypotheses keep them."""

    def __init__(self, ids, opts):
        P, K, _ = ids.shape
        self.opts, self.K = opts, K
        self.ids = ids.clone()  # (P, K, total)
        self.scores = torch.full((P, K), -1e9, device=ids.device)
        self.is_finished = torch.zeros(P, K, dtype=torch.bool, device=ids.device)
        self.improvable = torch.ones(P, 1, dtype=torch.bool, device=ids.device)

    def add(self, cand_ids, cand_scores, ends, generated):
        """Candidates among the top K that end join the finished ones, if they rank there;
        Hugging Face's -1e9 penalties shut out the others, and all of a prompt that is done
        (every slot finished with early_stopping=True, or no improvement possible)."""
        joining = ends & (torch.arange(cand_scores.size(1), device=ends.device) < self.K)
        final = cand_scores / generated ** self.opts.length_penalty
        full = self.is_finished.all(dim=1, keepdim=True) & (self.opts.early_stopping is True)
        for shut_out in (full, ~self.improvable, ~joining):
            final = final - 1e9 * shut_out.float()
        merged_scores = torch.cat((self.scores, final), dim=1)
        keep = torch.topk(merged_scores, self.K).indices
        self.scores = merged_scores.gather(1, keep)
        self.is_finished = torch.cat((self.is_finished, joining), dim=1).gather(1, keep)
        merged_ids = torch.cat((self.ids, cand_ids), dim=1)
        self.ids = merged_ids.gather(1, keep[:, :, None].expand(-1, -1, merged_ids.size(2)))

    def search_is_over(self, running, generated, max_new_tokens):
        """True when no running beam can beat the worst finished one of its prompt (or, with
        early_stopping=True, every prompt has num_beams finished). Log-probabilities only fall
        as a sequence grows, so Hugging Face estimates a beam's best final score by its score
        now divided by the current length; "never" with a positive penalty divides by the
        longest possible length, where the penalty favours it most."""
        opts = self.opts
        never = opts.early_stopping == "never" and opts.length_penalty > 0
        length = max_new_tokens if never else generated
        best_possible = running[:, :1] / length ** opts.length_penalty
        worst = torch.where(self.is_finished, self.scores.min(dim=1, keepdim=True).values, -1e9)
        self.improvable &= (best_possible > worst).any(dim=1, keepdim=True)
        return not self.improvable.any() or bool(self.is_finished.all() and opts.early_stopping is True)


# -----------------------------------------------------------------------------
# Text

class TextStream:
    """The text of one row as its tokens arrive. add() returns the text that is now final:
    it holds back an incomplete multi-byte character at the end (decoded as U+FFFD) and any
    end that could be the start of a stop string. When a stop string appears, the text up to
    it is final, `stopped` is set, and the stop string itself is never returned."""

    def __init__(self, decode, prompt, stop_strings=(), show_prompt=True):
        self.decode, self.tokens, self.stop_strings = decode, list(prompt), list(stop_strings)
        self.text = decode(self.tokens)
        self.start = len(self.text)  # where the new text starts
        self.first = 0 if show_prompt else self.start  # where the text shown starts
        self.shown = self.first  # characters returned so far
        self.new_tokens = 0
        self.stopped = False

    def add(self, token):
        before = len(self.text)
        self.tokens.append(token)
        self.new_tokens += 1
        self.text = self.decode(self.tokens)
        # a stop string counts once a new token completes it, even one begun in the prompt
        # (as generate() decides); the prompt itself is never cut
        hit = find_stop_string(self.text, before, self.stop_strings)
        if hit >= 0:
            self.stopped = True
            self.text = self.text[:max(hit, self.start)]
            return self.flush()
        end = len(self.text.rstrip("\ufffd"))
        held = max((n for s in self.stop_strings for n in range(1, len(s))
                    if self.text[self.start:end].endswith(s[:n])), default=0)
        return self._take(end - held)

    def flush(self):
        """All the text not yet returned (at the end of a row)."""
        return self._take(len(self.text))

    def shown_text(self):
        """The row's whole text as shown: with the prompt or without, the stop string cut off."""
        return self.text[self.first:]

    def _take(self, end):
        new = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return new
