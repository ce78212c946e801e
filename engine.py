"""
The inference engine: how a GPT (model.py) turns prompts into text.

model.py defines the layers; everything about decoding lives here, as nanochat keeps
engine.py apart from gpt.py:

- KVCache: the keys and values of every token seen so far, in buffers allocated once. The
  prompts go through the model in one forward pass (prefill), then one token per step.
- DecodingOptions: every way of picking the next token, with Hugging Face's meanings (plus
  OpenAI's presence and frequency penalties), checked before anything runs.
- process_logits(): Hugging Face's order: penalties, the n-gram ban, the caller's own
  processors, then temperature -> top-k -> top-p -> min-p.
- generate(): greedy decoding and sampling of many rows at once; beam_search().
- quantize_int8(): int8 weight-only Linear layers, for fast decoding on a CPU; ThinLinear, the
  routes generate() gives float32 / bfloat16 Linear layers on a CPU for the few rows decoding
  feeds them, where one is faster than nn.Linear's (measured once per process and dtype).
- TextStream: the text of one row as its tokens arrive, for streaming and stop strings.

Rows of a batch are left-padded to the longest prompt; each row's tokens get the positions
and attention they would get alone, so a row's result does not depend on its neighbours.

References: Hugging Face transformers, generation/utils.py and generation/logits_process.py;
OpenAI's API reference for the presence and frequency penalties.
"""

import contextlib
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hardware
from errors import UserError

PAD = -1  # fills the left of rows whose prompt is shorter than the longest; never a token


# -----------------------------------------------------------------------------
# The KV cache

class KVCache:
    """The keys and values of the tokens the model has seen, per layer, in buffers allocated once.

    GPT.forward reads three things from it: `positions` of the tokens it is fed, `mask` (which
    cached tokens each of them may attend to, as an additive mask) and `layers[i].append(kv)`,
    which stores layer i's new keys and values (stacked: (2, rows, heads, T, head size)) and
    returns the layer's keys and values to attend over, stacked so.

    static=False: attention runs over the slots filled so far, a key length that grows by one
    each step (the least work, the CPU's choice). static=True: over the whole buffer, the
    unfilled slots masked out, so every step has the same shapes: no kernel is planned anew per
    length on a GPU, and a compiled step (generate(compile=True)) is traced once. Inside the
    model's forward the cache is read only through tensors (slots, positions, mask), never a
    Python counter, so a compiled step does not depend on how full the cache is."""

    def __init__(self, model, rows, length, static=False):
        cfg = model.config
        dtype, device = float_weight(model).dtype, float_weight(model).device
        if static:
            # slots in multiples of 16 (within the context), so that the mask's rows are aligned
            # as attention kernels want them: the memory-efficient one copies an unaligned mask
            # into an aligned one at every call. The extra slots stay masked: no result changes
            length = max(length, min(cfg.block_size, -(-length // 16) * 16))
        # keys and values side by side, of the un-repeated key / value heads
        shape = (2, rows, cfg.kv_heads, length, cfg.head_size)
        # zeros, not empty: the masked slots of a static cache must hold finite numbers (a NaN
        # times an attention weight of 0 is still NaN)
        self.layers = [LayerCache(self, torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(cfg.n_layer)]
        self.length = length  # slots per row
        self.static = static
        # on a GPU, the attention kernel measured fastest for this cache's one-token steps
        # first, the others after it, for shapes it cannot take (a prompt's many queries)
        self.backends = None
        if device.type == "cuda":
            best = fastest_attention(model, rows, length)
            self.backends = [best, *(b for b in ATTENTION_BACKENDS if b != best)]
        self.size = 0  # slots filled
        # set by reset() and feed()
        self.pad = self.slots = self.positions = self.mask = self.next_mask = None

    def reset(self, pad):
        """Empty the cache, for rows that start with pad[i] padding tokens."""
        self.size, self.pad = 0, pad

    def feed(self, model, idx):
        """Run the next tokens of every row, idx (rows, T), through the model: their keys and
        values are cached, and the logits after the last of them returned (rows, vocab)."""
        T = idx.size(1)
        if T == 1 and self.size:
            self.see_one_more()
        else:
            self.see_window(T, idx.device)
        with contextlib.nullcontext() if self.backends is None else \
                sdpa_kernel(self.backends, set_priority=True):
            logits, _ = model(idx, kv_cache=self)
        self.size += T
        return logits[:, -1].float()

    def see_window(self, T, device):
        """Slots, positions and mask for T tokens after the cached ones (a prompt, a window)."""
        new = torch.arange(self.size, self.size + T, device=device)  # the slots they fill
        self.slots = new
        self.positions = (new - self.pad[:, None]).clamp(min=0)
        slots = torch.arange(self.length, device=device)
        # causal, and not padding
        visible = (slots <= new[:, None]) & (slots >= self.pad[:, None, None])
        # a padding token attends to itself alone: its output is never used, but with nothing
        # to attend to it would be NaN, and NaN values poison the rows that mask them out
        visible |= slots == new[:, None]
        # (rows, 1 for all heads, T, slots), as the additive mask attention would make of a
        # boolean one in every layer: made once a step here, one kernel less per layer
        mask = attention_bias(visible[:, None], self.layers[0].kv.dtype)
        self.mask = mask if self.static else mask[..., :self.size + T]
        # the token after these sees what the last of them saw (no padding), and then itself
        self.next_mask = mask[:, :, -1:].clone()

    def see_one_more(self):
        """Slots, positions and mask for one token after the cached ones: it takes the next
        slot and position and sees what the token before it saw, and itself. Three small
        kernels, where building the mask anew took a dozen, at every token of a decode."""
        self.slots = self.slots[-1:] + 1
        self.positions = self.positions[:, -1:] + 1
        self.next_mask[..., self.size] = 0
        self.mask = self.next_mask if self.static else self.next_mask[..., :self.size + 1]

    def reorder(self, rows):
        """Beam search: row i continues from what row rows[i] was."""
        for layer in self.layers:
            layer.kv[:, :, :, :self.size] = layer.kv[:, rows, :, :self.size]
        self.pad, self.positions, self.next_mask = (self.pad[rows], self.positions[rows],
                                                    self.next_mask[rows])


def attention_bias(visible, dtype):
    """An attention mask to add to the scores: 0 where `visible`, -inf elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, -float("inf"))


ATTENTION_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
_fastest_attention = {}  # (device, dtype, shapes) -> the backend measured fastest for them


@torch.no_grad()
def fastest_attention(model, rows, length, candidates=ATTENTION_BACKENDS):
    """The scaled_dot_product_attention backend (of candidates that run a masked one-token
    query, with the math backend's result) that attends fastest over `length` cached slots of
    `rows` rows, measured once per shape and kept. On a GPU the choice matters: torch's
    default took 0.37 ms a call where cuDNN's took 0.08 (H100, bfloat16, 10 rows x 6 heads over
    256 slots), and attention runs once per layer per token. The CPU keeps torch's own choice
    (one backend, the same numbers in every run)."""
    cfg, weight = model.config, float_weight(model)
    key = (weight.device, weight.dtype, rows, length, cfg.n_head, cfg.kv_heads, cfg.head_size)
    if key not in _fastest_attention:
        own = torch.Generator(weight.device).manual_seed(0)  # the run's random numbers untouched

        def make(heads, slots):
            return torch.randn(rows, heads, slots, cfg.head_size, dtype=weight.dtype,
                               device=weight.device, generator=own)
        q, k, v = make(cfg.n_head, 1), make(cfg.kv_heads, length), make(cfg.kv_heads, length)
        # slots masked out at random (the first kept), so a backend that ignored the mask shows
        visible = torch.rand(rows, 1, 1, length, device=weight.device, generator=own) < 0.7
        visible[..., 0] = True
        mask = attention_bias(visible, weight.dtype)  # the kind of mask KVCache.feed makes
        gqa = cfg.kv_heads != cfg.n_head

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

        with sdpa_kernel(SDPBackend.MATH):  # the reference each backend must agree with
            reference = attend()
        tolerance = 5e-3 if weight.dtype == torch.float32 else 3e-2  # TF32 may be on
        times = {}
        for backend in candidates:
            try:
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # each backend that cannot run says why
                    for _ in range(3):  # the first calls plan and compile kernels
                        out = attend()
                    if not torch.allclose(out.float(), reference.float(), atol=tolerance,
                                          rtol=tolerance):
                        continue  # runs, but not right for these inputs: not taken
                    hardware.synchronize(weight.device)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        attend()
                    hardware.synchronize(weight.device)
                    times[backend] = time.perf_counter() - t0
            except RuntimeError:  # not for these inputs (no mask support, a dtype, ...)
                continue
        _fastest_attention[key] = min(times, key=times.get)
    return _fastest_attention[key]


def float_weight(model):
    """The model's first floating-point parameter (the token embedding): its dtype and device
    are the activations', whatever quantize_int8 did to the Linear layers."""
    return next(p for p in model.parameters() if p.is_floating_point())


class LayerCache:
    """One layer's slice of the cache, handed to its attention by GPT.forward."""

    def __init__(self, cache, kv):
        self.cache, self.kv = cache, kv  # kv: (2 for keys and values, rows, heads, slots, head size)

    @property
    def mask(self):
        return self.cache.mask

    def append(self, kv):
        """Store the new tokens' keys and values, kv (2, rows, heads, T, head size), in their
        slots (one copy for both) and return the keys and values to attend over, stacked so."""
        self.kv.index_copy_(3, self.cache.slots, kv)
        if self.cache.static:
            return self.kv
        return self.kv[:, :, :, :self.cache.size + kv.size(3)]


def fill(model, cache, ids, end, keep=None):
    """Cache the context of the token after ids[:, :end] and return its logits: the last `keep`
    tokens of each row (by default block_size of them, as nanoGPT crops). Once a sequence
    outgrows block_size every token moves to a new position, so all keys and values change and
    are computed afresh."""
    begin = max(0, end - (keep or cache.length))
    window = ids[:, begin:end]
    cache.reset((window == PAD).sum(dim=1))
    return cache.feed(model, window.clamp(min=0))  # padding goes in as token 0, masked out


def next_logits(model, cache, ids, end, context_shift=False, step=None):
    """Logits of the token after ids[:, :end], when the cache holds ids[:, :end - 1]; step: what
    runs the one-token forward passes (the model, or its compiled decode step).
    With the cache full, nanoGPT's exact cropping re-reads the whole window for every token;
    context_shift instead drops the older half of the window once and re-reads the newer half,
    after which block_size / 2 tokens decode from the cache again (llama.cpp's context shift)."""
    if cache.size < cache.length:
        return cache.feed(model if step is None else step, ids[:, end - 1:end])
    return fill(model, cache, ids, end, max(1, cache.length // 2) if context_shift else None)


_compiled_steps = weakref.WeakKeyDictionary()  # model -> its compiled one-token step
_kept_caches = weakref.WeakKeyDictionary()  # model -> the cache its compiled step last wrote


def cache_and_step(model, rows, length, compile):
    """The KV cache of one generate call, and what runs its one-token steps (decode_step).
    Static on a GPU and when compiled. A compiled step writes the cache inside its CUDA graph,
    which CUDA graphs allow only for tensors whose address never changes (parameters, buffers,
    tensors marked static; any other mutated input makes torch skip the graphs): so the
    buffers are marked static and kept for the model's next call of the same shape, emptied
    (zeroed) for it, as gpt-fast keeps its caches. Their length (the slots per row) is the
    sequence's, or more: the masked slots change no result."""
    weight = float_weight(model)
    device = weight.device
    if not compile:
        return KVCache(model, rows, length, static=device.type == "cuda"), model
    # a length in powers of two (at least 64, at most the context), not each call's own: a
    # few shapes to compile and capture, not one for every max_new_tokens
    length = min(model.config.block_size, max(64, 1 << (length - 1).bit_length()))
    cache = _kept_caches.get(model)
    key = (rows, length, weight.dtype, device)
    if cache is None or cache.key != key:
        _kept_caches.pop(model, None)  # the old buffers go before the new ones are made
        cache = KVCache(model, rows, length, static=True)
        cache.key = key
        for layer in cache.layers:
            torch._dynamo.mark_static_address(layer.kv)
        _kept_caches[model] = cache
    else:
        for layer in cache.layers:
            layer.kv.zero_()
    return cache, decode_step(model)


def decode_step(model):
    """The model compiled once for the static cache's fixed shapes, kept for the model's
    lifetime; on CUDA as CUDA graphs (mode="reduce-overhead", gpt-fast's way), which replay a
    whole step in one launch. Prompts and re-reads of a cropped window run eagerly: their
    shapes vary."""
    if model not in _compiled_steps:
        cuda = float_weight(model).device.type == "cuda"
        compiled = torch.compile(model, mode="reduce-overhead" if cuda else None, dynamic=False)

        def step(idx, kv_cache):
            # a compiled graph is traced for its input's strides too, and a column of ids has
            # the stride of ids' width, which differs from call to call: a copy of fixed strides
            # (contiguous() would keep it for a single row)
            idx = idx.clone(memory_format=torch.contiguous_format)
            logits, loss = compiled(idx, kv_cache=kv_cache)
            # a CUDA graph's outputs live in its memory pool and are overwritten by its next
            # replay: the logits leave as a copy of their own
            return logits.clone(), loss
        _compiled_steps[model] = step
    return _compiled_steps[model]


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
# Logits processing. Each function takes the tokens so far, ids (rows, T) with PAD on the
# left of shorter prompts, and the next-token logits (rows, vocab); it returns new logits.

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


def process_logits(ids, logits, prompt_width, opts, processors=(), stop_tokens=()):
    """Apply the decoding options to next-token logits, in Hugging Face's order: penalties and
    bans, then the caller's processors (callables (ids, logits) -> logits), then, when
    sampling, temperature -> top-k -> top-p -> min-p -> typical. ids: the tokens so far (rows,
    T), left-padded with PAD; the generated ones start at column prompt_width. stop_tokens:
    what min_new_tokens holds back."""
    if opts.repetition_penalty != 1:
        logits = repetition_penalty(ids, logits, opts.repetition_penalty)
    if opts.presence_penalty or opts.frequency_penalty:
        logits = presence_frequency_penalty(ids[:, prompt_width:], logits,
                                            opts.presence_penalty, opts.frequency_penalty)
    if opts.no_repeat_ngram_size:
        logits = no_repeat_ngram(ids, logits, opts.no_repeat_ngram_size)
    if opts.bad_words_ids:
        logits = bad_words(ids, logits, opts.bad_words_ids)
    if opts.min_new_tokens and ids.size(1) - prompt_width < opts.min_new_tokens and len(stop_tokens):
        logits = ban(logits, list(stop_tokens))
    if opts.suppress_tokens:
        logits = ban(logits, list(opts.suppress_tokens))
    for processor in processors:
        logits = processor(ids, logits)
    if not opts.sampling:
        return logits  # greedy and beam search rank the tokens: the filters below keep the top ones
    if opts.temperature != 1:
        logits = logits / opts.temperature
    if opts.top_k:
        logits = top_k_filter(logits, opts.top_k)
    if opts.top_p < 1:
        logits = top_p_filter(logits, opts.top_p)
    if opts.min_p > 0:
        logits = min_p_filter(logits, opts.min_p)
    if opts.typical_p < 1:
        logits = typical_filter(logits, opts.typical_p)
    return logits


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
    (decode_step), with results identical to the eager ones.

    Returns a (rows, width) tensor: prompt i's num_return_sequences results are rows
    i * num_return_sequences onwards; prompts shorter than the longest are left-padded with
    PAD, and a row that ended early is filled with pad_token_id to the end."""
    opts = DecodingOptions(max_new_tokens, **options)
    prompts = as_token_lists(prompts)
    stop_strings = check_stop_strings(stop_strings)
    if stop_strings and tokenizer is None:
        raise UserError("stop_strings need the tokenizer that decodes the ids (tokenizer=...)")
    use_thin_linears(model)
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
    logits = fill(model, cache, ids, width)
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
    logits = fill(model, cache, ids, width)

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
# Linear layers for decoding on a CPU

class ThinLinear(nn.Linear):
    """nn.Linear, with other routes for the few rows of input that decoding gives it on a CPU.

    Decoding multiplies one row per sequence by every weight matrix, so its speed is the speed at
    which the weights stream from memory, and which of PyTorch's routes streams them fastest
    depends on the machine: on an AMD EPYC (MKL) F.linear's float32 matrix-vector product keeps
    one core busy, while a batched matmul over the two halves of the weight ("halves") keeps
    both at work, 2x faster; on an Intel Xeon with AMX F.linear is the faster by 2x, and its
    bfloat16 products are compute-bound where torch.mv ("mv", one row only) reads 1.4x faster.
    So use_thin_linears measures the routes once per process and dtype (fastest_route), and
    ThinLinear takes the winner. Many rows (a prompt, training) take nn.Linear's route, and so
    do small weights (under SMALL elements, such as the key / value projections of
    grouped-query attention: 896 x 128 in Qwen2.5-0.5B), which one core reads in microseconds,
    less than it takes to hand half of them to another: on a busy machine that other core may
    be away for a whole time slice."""

    SMALL = 2 ** 19  # 524,288 elements (GPT-2's smallest matrix, 768 x 768, has more)

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        route = _fastest_route.get(self.weight.dtype) if self.suits(self.weight) else "plain"
        if route == "halves" and rows <= 4 and x.dtype == torch.float32:
            return self.halves(self.weight, self.bias, x)
        if route == "mv" and rows == 1 and x.dtype == self.weight.dtype:
            return self.mv(self.weight, self.bias, x)
        return super().forward(x)

    @classmethod
    def suits(cls, weight):
        """Whether a weight is one these routes are for: a big float32 / bfloat16 one on a CPU."""
        return (weight.device.type == "cpu" and weight.dtype in ROUTES
                and weight.numel() >= cls.SMALL)

    @staticmethod
    def halves(weight, bias, x):
        """x @ weight.T + bias as one batched matmul over the two halves of weight's rows."""
        rows = x.numel() // x.size(-1)
        out_features, in_features = weight.shape
        half = out_features // 2
        columns = x.reshape(rows, in_features).t()
        y = torch.bmm(weight[:2 * half].view(2, half, in_features), columns.expand(2, -1, -1))
        y = y.reshape(2 * half, rows)
        if 2 * half < out_features:  # the odd row out (GPT-2's vocabulary has 50257 tokens)
            y = torch.cat((y, weight[2 * half:] @ columns))
        y = y.t() if bias is None else y.t() + bias
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def mv(weight, bias, x):
        """x @ weight.T + bias for one row x, as a matrix-vector product."""
        y = torch.mv(weight, x.reshape(-1))
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], weight.size(0))


ROUTES = {torch.float32: ("plain", "halves", "mv"), torch.bfloat16: ("plain", "mv")}
_fastest_route = {}  # dtype -> the route measured fastest on this machine for one row


@torch.no_grad()
def fastest_route(linears, dtype):
    """The route (ROUTES) that decodes one row through these Linear layers (a model's own: its
    real shapes, and all of its weights, more than the CPU caches hold) fastest: each runs
    them all three times, taking turns, and the best pass of each counts (noise only adds
    time); another route than nn.Linear's ("plain") must win by 10%. About three tokens' worth
    of decoding per route, once per process and dtype."""
    if dtype not in _fastest_route:
        rows = {layer: torch.randn(1, layer.in_features, dtype=dtype) for layer in linears}
        run = {"plain": lambda layer: F.linear(rows[layer], layer.weight, layer.bias),
               "halves": lambda layer: ThinLinear.halves(layer.weight, layer.bias, rows[layer]),
               "mv": lambda layer: ThinLinear.mv(layer.weight, layer.bias, rows[layer])}
        best = dict.fromkeys(ROUTES[dtype], float("inf"))
        for _ in range(3):
            for name in best:
                t0 = time.perf_counter()
                for layer in linears:
                    run[name](layer)
                best[name] = min(best[name], time.perf_counter() - t0)
        winner = min(best, key=best.get)
        _fastest_route[dtype] = winner if best[winner] < 0.9 * best["plain"] else "plain"
    return _fastest_route[dtype]


def use_thin_linears(model):
    """Give every plain nn.Linear of a CPU model ThinLinear's routes, in place (merged LoRA
    layers included), where one of them is faster than nn.Linear's on this machine
    (fastest_route). The parameters stay the very same tensors, under the same names, so ties,
    state dicts and training are unchanged."""
    if float_weight(model).device.type != "cpu":
        return model
    slots = [(module, name, child) for module in list(model.modules())
             for name, child in module.named_children() if type(child) is nn.Linear]
    big = [child for _, _, child in slots if ThinLinear.suits(child.weight)]
    if not big or fastest_route(big, big[0].weight.dtype) == "plain":
        return model
    for module, name, child in slots:
        with torch.device("meta"):  # no memory for weights about to be replaced
            thin = ThinLinear(child.in_features, child.out_features, bias=False)
        thin.weight, thin.bias = child.weight, child.bias
        thin.train(child.training)
        setattr(module, name, thin)
    return model


# -----------------------------------------------------------------------------
# int8 weights

class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored in int8, with one scale per output row
    (symmetric, weight-only quantisation). Decoding reads every weight once per token and is
    bound by memory bandwidth, so a quarter of the bytes is most of the time saved. The matmul
    is PyTorch's int8 CPU kernel, which takes bfloat16 inputs."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias

    def forward(self, x):
        flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        if flat.size(0) <= 32:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        else:
            # the kernel's time grows with every row; for a long prompt a bfloat16 matmul with
            # the weight widened once is faster (the crossover lies between 32 and 64 rows)
            y = flat @ (self.weight.to(torch.bfloat16) * self.scale[:, None]).t()
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize_int8(model):
    """Replace every Linear of the model (the output head included) by an Int8Linear, in
    place. The token embedding keeps its own weights: a lookup reads one row per token."""
    if float_weight(model).device.type != "cpu":
        raise UserError("quantize=int8 uses PyTorch's CPU kernel: run it with --device=cpu")
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


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
