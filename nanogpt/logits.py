"""
Logits processing: how the decoding options (engine.DecodingOptions) turn a model's next-token
logits into the ones a token is picked from, in Hugging Face's order (process_logits): the
penalties and bans, the caller's own processors, then temperature -> top-k -> top-p -> min-p ->
typical; and how the next token is picked from them (next_tokens), which names the step that
left a row nothing to pick.

Each function takes the tokens so far, ids (rows, T) with PAD on the left of shorter prompts,
and the next-token logits (rows, vocab); it returns new logits.

References: Hugging Face transformers, generation/logits_process.py; OpenAI's API reference for
the presence and frequency penalties.
"""

import torch

from nanogpt.errors import UserError
from nanogpt.kvcache import PAD


def token_counts(ids, vocab_size):
    """(rows, vocab_size): how many times each token occurs in each row, padding aside."""
    # padding is counted in a spare column past the vocabulary, then dropped
    ids = ids.masked_fill(ids == PAD, vocab_size)
    counts = torch.zeros(ids.size(0), vocab_size + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    return counts[:, :vocab_size]


def repetition_penalty(ids, logits, penalty):
    """CTRL's penalty (Keskar et al. 2019) as Hugging Face applies it: every token already in
    the row, prompt included, has its logit divided by the penalty if positive, multiplied if
    negative, so it becomes less likely either way."""
    seen = token_counts(ids, logits.size(-1)) > 0
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def presence_frequency_penalty(generated, logits, presence, frequency):
    """OpenAI's penalties, over the generated tokens (not the prompt):
    logit[j] -= frequency * count[j] + presence * (count[j] > 0)."""
    counts = token_counts(generated, logits.size(-1)).to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def no_repeat_ngram(ids, logits, n):
    """Ban every token that would complete an n-gram already in the row (Paulus et al. 2017)."""
    T, vocab_size = ids.size(1), logits.size(-1)
    if T < n:
        return logits
    # the next token completes the n-gram (last n-1 tokens, next); it is banned wherever those
    # n-1 tokens occurred before, followed by it. Padding is a token of its own here: it only
    # ever matches padding, and bans go to a spare column past the vocabulary
    ids = ids.masked_fill(ids == PAD, vocab_size)
    prefix = ids[:, T - n + 1:]
    grams = ids.unfold(1, n, 1)  # (rows, T - n + 1, n): every n-gram so far
    match = (grams[..., :-1] == prefix[:, None, :]).all(dim=-1)
    banned = torch.zeros(ids.size(0), vocab_size + 1, dtype=torch.bool, device=ids.device)
    banned.scatter_(1, torch.where(match, grams[..., -1], vocab_size), True)
    return logits.masked_fill(banned[:, :vocab_size], -float("inf"))


def ban(logits, token_ids):
    """Make the given tokens impossible (ids outside the vocabulary are ignored)."""
    banned = torch.tensor([i for i in token_ids if 0 <= i < logits.size(-1)], dtype=torch.long,
                          device=logits.device)
    return logits.index_fill(-1, banned, -float("inf"))


def bad_words(ids, logits, words):
    """Ban the token that would complete any of the words (token sequences) in each row: a
    word's last token is banned where the row ends with the rest of it (always, for a word of
    one token), as Hugging Face's NoBadWordsLogitsProcessor does."""
    banned = torch.zeros_like(logits, dtype=torch.bool)
    for word in words:
        *prefix, last = word
        if not 0 <= last < logits.size(-1):
            continue
        if not prefix:
            banned[:, last] = True
        elif ids.size(1) >= len(prefix):
            tail = ids[:, ids.size(1) - len(prefix):]
            banned[:, last] |= (tail == torch.tensor(prefix, device=ids.device)).all(dim=1)
    return logits.masked_fill(banned, -float("inf"))


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (ties with the k-th included)."""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[:, -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens whose probabilities
    add up to p, dropping the least likely ones whose total is at most 1 - p. Always keeps
    the most likely token."""
    ascending, order = torch.sort(logits)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


def typical_filter(logits, mass):
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprise is closest
    to the distribution's entropy, fewest first, until their probabilities add up to mass;
    always the closest one."""
    log_probs = logits.log_softmax(dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum(dim=-1, keepdim=True)
    distance, order = torch.sort((-log_probs - entropy).abs(), dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    # the last kept token is the first at which the kept probability reaches mass
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=logits.size(-1) - 1)
    drop = distance > distance.gather(-1, last)
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))


def min_p_filter(logits, p):
    """Keep the tokens at least p times as likely as the most likely one (Nguyen et al. 2024)."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < p * probs.amax(dim=-1, keepdim=True), -float("inf"))


def logits_steps(ids, prompt_width, opts, processors=(), stop_tokens=()):
    """process_logits' steps, in order, for the options that are set: [(the option, as the
    user set it, a function of the logits)]."""
    steps = []
    if opts.repetition_penalty != 1:
        steps.append((f"repetition_penalty={opts.repetition_penalty}",
                      lambda x: repetition_penalty(ids, x, opts.repetition_penalty)))
    if opts.presence_penalty or opts.frequency_penalty:
        steps.append((f"presence_penalty={opts.presence_penalty}, frequency_penalty={opts.frequency_penalty}",
                      lambda x: presence_frequency_penalty(ids[:, prompt_width:], x, opts.presence_penalty,
                                                           opts.frequency_penalty)))
    if opts.no_repeat_ngram_size:
        steps.append((f"no_repeat_ngram_size={opts.no_repeat_ngram_size}",
                      lambda x: no_repeat_ngram(ids, x, opts.no_repeat_ngram_size)))
    if opts.bad_words_ids:
        steps.append(("bad_words", lambda x: bad_words(ids, x, opts.bad_words_ids)))
    if opts.min_new_tokens and ids.size(1) - prompt_width < opts.min_new_tokens and len(stop_tokens):
        steps.append((f"min_new_tokens={opts.min_new_tokens}",  # which bans the stop tokens
                      lambda x: ban(x, list(stop_tokens))))
    if opts.suppress_tokens:
        steps.append(("suppress_tokens", lambda x: ban(x, list(opts.suppress_tokens))))
    for processor in processors:
        steps.append((f"the logits processor {getattr(processor, '__name__', processor)}",
                      lambda x, processor=processor: processor(ids, x)))
    if not opts.sampling:
        return steps  # greedy and beam search rank the tokens: the filters below keep the top ones
    if opts.temperature != 1:
        steps.append((f"temperature={opts.temperature}", lambda x: x / opts.temperature))
    if opts.top_k:
        steps.append((f"top_k={opts.top_k}", lambda x: top_k_filter(x, opts.top_k)))
    if opts.top_p < 1:
        steps.append((f"top_p={opts.top_p}", lambda x: top_p_filter(x, opts.top_p)))
    if opts.min_p > 0:
        steps.append((f"min_p={opts.min_p}", lambda x: min_p_filter(x, opts.min_p)))
    if opts.typical_p < 1:
        steps.append((f"typical_p={opts.typical_p}", lambda x: typical_filter(x, opts.typical_p)))
    return steps


def process_logits(ids, logits, prompt_width, opts, processors=(), stop_tokens=()):
    """Apply the decoding options to next-token logits, in Hugging Face's order: penalties and
    bans, then the caller's processors (callables (ids, logits) -> logits), then, when
    sampling, temperature -> top-k -> top-p -> min-p -> typical. ids: the tokens so far (rows,
    T), left-padded with PAD; the generated ones start at column prompt_width. stop_tokens:
    what min_new_tokens holds back."""
    for _, step in logits_steps(ids, prompt_width, opts, processors, stop_tokens):
        logits = step(logits)
    return logits


def next_tokens(ids, logits, prompt_width, opts, processors=(), stop_tokens=(), generator=None):
    """The next token of each row, (rows,), from its logits (the model's): processed
    (process_logits), then drawn with generator when opts sample, else the most likely. Logits
    that leave a row nothing to draw from are refused with a UserError naming the step after
    which they do (nothing_to_sample); the model's own are checked at a row's first new token,
    where greedy decoding would pick from NaNs silently."""
    if ids.size(1) == prompt_width:
        check_model_logits(logits)
    processed = process_logits(ids, logits, prompt_width, opts, processors, stop_tokens)
    if not opts.sampling:
        return processed.argmax(dim=-1)
    probs = processed.softmax(dim=-1)
    # asked before multinomial is: its own check of the probabilities fails on a GPU
    # asynchronously, as a device-side assert that ends the process
    if probs.isnan().any():
        raise UserError(nothing_to_sample(ids, logits, prompt_width, opts, processors, stop_tokens))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def nothing_to_sample(ids, logits, prompt_width, opts, processors, stop_tokens):
    """Why a row of logits is left without a token to sample: the first step of process_logits
    after which its probabilities are NaN (all its tokens banned, or an infinity among them)."""
    check_model_logits(logits)
    at = f"no token can be sampled at new token {ids.size(1) - prompt_width + 1}"
    steps = logits_steps(ids, prompt_width, opts, processors, stop_tokens)
    for i, (what, step) in enumerate(steps):
        logits = step(logits)
        if not pickable(logits):
            before = ", ".join(earlier for earlier, _ in steps[:i])
            return (f"{at}: after {what}{f' (and {before} before it)' if before else ''}, no token "
                    "of a row has a finite, positive probability")
    # reached only where a caller's processor gives other logits when run again
    return f"{at}: no token of a row has a finite, positive probability"


def pickable(logits):
    """Whether every row of logits is a distribution to draw from: its softmax holds no NaN,
    which a row of -inf alone gives, or one with an infinity or a NaN in it."""
    return not bool(logits.softmax(dim=-1).isnan().any())


def check_model_logits(logits):
    """Refuse a model's next-token logits that are NaN or infinite, which no decoding can pick
    from: a damaged model."""
    if not pickable(logits):
        raise UserError("the model's next-token logits are not finite numbers (NaN or "
                        "infinite): its weights or its config are damaged")
