"""
The inference engine: how a GPT (model.py) turns prompts into text.

model.py defines the layers; decoding lives here and in three files beside this one, as
nanochat keeps engine.py apart from gpt.py:

- kvcache.py: the KV cache, its window past block_size, and the compiled one-token step.
- logits.py: the logits processors (penalties, bans, temperature, top-k, top-p, ...).
- quantize.py: the CPU weight layouts a script may give its model for fast decoding.
- here: DecodingOptions, every way of picking the next token, with Hugging Face's meanings
  (plus OpenAI's presence and frequency penalties), checked before anything runs; generate(),
  greedy decoding and sampling of many rows at once; beam_search(); stop strings; and
  TextStream, the text of one row as its tokens arrive, for streaming.

Rows of a batch are left-padded with PAD to the longest prompt; each row's tokens get the
positions and attention they would get alone, so a row's result does not depend on its
neighbours.

References: Hugging Face transformers, generation/utils.py.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.nn import functional as F

from errors import UserError
from kvcache import PAD, cache_and_step, cache_window, float_weight, next_logits
from logits import process_logits


# -----------------------------------------------------------------------------
# Decoding options

@dataclass
class DecodingOptions:
    """How to pick each next token. The names and meanings are Hugging Face generate()'s;
    presence_penalty and frequency_penalty are OpenAI's."""
    max_new_tokens: int  # tokens to generate per row, fewer if a stop token ends it
    temperature: float = 1.0  # divides the logits; 0 is greedy: always the most likely token
    top_k: Optional[int] = None  # sample from the k most likely tokens only (None or 0: all)
    top_p: float = 1.0  # ... from the fewest most likely tokens whose probabilities sum to top_p
    min_p: float = 0.0  # ... from tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # > 1 makes every token already in the row less likely
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    no_repeat_ngram_size: int = 0  # n > 0: a row never repeats an n-gram (n tokens in a row)
    num_beams: int = 1  # > 1: beam search, deterministic (temperature 0; top_k, top_p, min_p ignored)
    length_penalty: float = 1.0  # beams are ranked by log-probability / length ** length_penalty
    early_stopping: Union[bool, str] = False  # beams: True, False or "never", as Hugging Face's
    num_return_sequences: int = 1  # results per prompt: samples, or the best beams
    seed: Optional[int] = None  # seeds the sampling; None draws from torch's global generator
    do_sample: Optional[bool] = None  # False: greedy whatever the temperature; None: temperature > 0
    typical_p: float = 1.0  # ... from the tokens closest to the expected surprise, adding up to typical_p
    min_new_tokens: int = 0  # the stop tokens are banned until a row has this many new tokens
    bad_words_ids: tuple = ()  # token sequences a row never completes (a lone id is never picked)
    suppress_tokens: tuple = ()  # ids never picked
    # past block_size: False keeps the last block_size tokens at every step, exactly as nanoGPT
    # crops (each token then costs a forward pass over the whole window); True drops the older
    # half of the window when it is full, which decodes many times faster but gives each token
    # between block_size / 2 and block_size tokens of context (all rows shift at the same step,
    # when the longest prompt's row fills the window)
    context_shift: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 or None keeps all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 keeps all tokens), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1] (0 keeps all tokens), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError("repetition_penalty must be > 0 (1 is none), "
                            f"got {self.repetition_penalty}")
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
             pad_token_id=None, logits_processors=(), on_token=None, compile=False, **options):
    """Continue each prompt (a (B, T) tensor, or lists of token ids of any lengths) by up to
    max_new_tokens tokens, decoding as `options` (DecodingOptions' fields) say.

    stop_tokens: ids that end a row (Hugging Face's eos_token_id: the tokenizer's end-of-text,
    or a list such as Qwen's); stop_strings: texts that end a row once a new token completes
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
        logits = process_logits(ids[:, :t], logits, width, opts, logits_processors, stop_tokens)
        if opts.sampling:
            token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(dim=-1)
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
    finished_ids = ids.view(P, K, total).clone()
    finished = torch.full((P, K), -1e9, device=device)  # length-penalised scores
    is_finished = torch.zeros(P, K, dtype=torch.bool, device=device)
    improvable = torch.ones(P, 1, dtype=torch.bool, device=device)
    # candidates per step, as Hugging Face keeps them: num_beams more than could end on a stop
    # token (each beam's best continuations may be every stop token), and at least twice the beams
    n_candidates = max(2, 1 + len(stop_tokens)) * K
    top_k_mask = torch.arange(n_candidates, device=device) < K
    offsets = torch.arange(P, device=device)[:, None] * K

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

        # candidates among the top K that end join the finished ones, if they rank there;
        # Hugging Face's -1e9 penalties shut out the others, and all of a prompt that is done
        # (every slot finished with early_stopping=True, or no improvement possible)
        generated = t + 1 - width
        final = cand_scores / generated ** opts.length_penalty
        full = is_finished.all(dim=1, keepdim=True) & (opts.early_stopping is True)
        for shut_out in (full, ~improvable, ~(ends & top_k_mask)):
            final = final - 1e9 * shut_out.float()
        merged_scores = torch.cat((finished, final), dim=1)
        keep = torch.topk(merged_scores, K).indices
        finished = merged_scores.gather(1, keep)
        is_finished = torch.cat((is_finished, ends & top_k_mask), dim=1).gather(1, keep)
        merged_ids = torch.cat((finished_ids, cand_ids), dim=1)
        finished_ids = merged_ids.gather(1, keep[:, :, None].expand(-1, -1, total))

        # can a running beam still beat the worst finished one? Log-probabilities only fall as a
        # sequence grows, so Hugging Face estimates its best final score by its score now
        # divided by the current length; "never" with a positive penalty divides by the longest
        # possible length, where the penalty favours it most
        never = opts.early_stopping == "never" and opts.length_penalty > 0
        length = max_new_tokens if never else generated
        best_possible = running[:, :1] / length ** opts.length_penalty
        worst = torch.where(is_finished, finished.min(dim=1, keepdim=True).values, -1e9)
        improvable &= (best_possible > worst).any(dim=1, keepdim=True)
        all_full = is_finished.all() and opts.early_stopping is True
        if not improvable.any() or all_full or ends.all():
            break
        logits = next_logits(model, cache, ids, t + 1, opts.context_shift, step)

    # the best num_return_sequences of each prompt, cut to the longest of them; the slots
    # after a sequence's end still hold PAD, and take the fill token
    out = finished_ids[:, :n].reshape(P * n, total)
    longest = int((out[:, width:] != PAD).sum(dim=1).max())
    out = out[:, :width + longest]
    out[:, width:] = out[:, width:].masked_fill(out[:, width:] == PAD, fill_token)
    return out, finished[:, :n].reshape(-1)


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
