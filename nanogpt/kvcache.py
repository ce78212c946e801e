"""
The KV cache: the keys and values of every token a model has seen, in buffers allocated once.

The prompts go through the model in one forward pass (prefill), then one token per step. Rows
of a batch are left-padded (PAD) to the longest prompt; each row's tokens get the positions and
attention they would get alone, so a row's result does not depend on its neighbours.

- KVCache, LayerCache: the buffers, and the slots, positions and mask of the tokens fed next.
- fastest_attention(): the attention kernel a GPU's one-token steps run fastest with.
- cache_window(), next_logits(): the window of the last block_size tokens, and how it moves
  once a sequence outgrows it (nanoGPT's cropping, or llama.cpp's context shift).
- cache_and_step(), decode_step(): a generate call's cache, and its compiled one-token step.
"""

import contextlib
import time
import warnings
import weakref

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanogpt import hardware

PAD = -1  # fills the left of rows whose prompt is shorter than the longest; never a token


class KVCache:
    """The keys and values of the tokens the model has seen, per layer, in buffers allocated once:
    `length` slots for each of `rows` rows, `size` of them filled. reset(pad) empties it;
    extend(model, idx) runs the next tokens through the model and caches theirs.

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
        # set by reset() and extend()
        self.pad = self.slots = self.positions = self.mask = self.next_mask = None

    def reset(self, pad):
        """Empty the cache, for rows that start with pad[i] padding tokens (pad: a LongTensor
        (rows,) on the cache's device)."""
        self.size, self.pad = 0, pad

    def extend(self, model, idx):
        """Run the next tokens of every row, idx (rows, T), through the model: their keys and
        values are cached, and the logits after the last of them returned (rows, vocab)."""
        T = idx.size(1)
        if T == 1 and self.size:
            self.plan_next_token()
        else:
            self.plan_window(T, idx.device)
        with contextlib.nullcontext() if self.backends is None else \
                sdpa_kernel(self.backends, set_priority=True):
            logits, _ = model(idx, kv_cache=self)
        self.size += T
        return logits[:, -1].float()

    def plan_window(self, T, device):
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

    def plan_next_token(self):
        """Slots, positions and mask for one token after the cached ones: it takes the next
        slot and position and sees what the token before it saw, and itself: a few small
        kernels at every token of a decode, where building the mask anew takes many more."""
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
    `rows` rows, measured once per shape and kept. On a GPU the backends differ several-fold
    for these small queries, and attention runs once per layer per token. The CPU keeps torch's
    own choice (one backend, the same numbers in every run)."""
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
        mask = attention_bias(visible, weight.dtype)  # the kind of mask KVCache.extend makes
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
    are the activations', whatever quantize.py did to the Linear layers."""
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


def cache_window(model, cache, ids, end, keep=None):
    """Cache the context of the token after ids[:, :end] and return its logits: the last `keep`
    tokens of each row (by default block_size of them, as nanoGPT crops). Once a sequence
    outgrows block_size every token moves to a new position, so all keys and values change and
    are computed afresh."""
    begin = max(0, end - (keep or cache.length))
    window = ids[:, begin:end]
    cache.reset((window == PAD).sum(dim=1))
    return cache.extend(model, window.clamp(min=0))  # padding goes in as token 0, masked out


def next_logits(model, cache, ids, end, context_shift=False, step=None):
    """Logits of the token after ids[:, :end], when the cache holds ids[:, :end - 1]; step: what
    runs the one-token forward passes (the model, or its compiled decode step).
    With the cache full, nanoGPT's exact cropping re-reads the whole window for every token;
    context_shift instead drops the older half of the window once and re-reads the newer half,
    after which block_size / 2 tokens decode from the cache again (llama.cpp's context shift)."""
    if cache.size < cache.length:
        return cache.extend(model if step is None else step, ids[:, end - 1:end])
    return cache_window(model, cache, ids, end, max(1, cache.length // 2) if context_shift else None)


_compiled_steps = weakref.WeakKeyDictionary()  # model -> its compiled one-token step
_kept_caches = weakref.WeakKeyDictionary()  # model -> the cache its compiled step last wrote


def cache_and_step(model, rows, length, compile):
    """The KV cache of one generate call (or of the batcher's rows), and what runs its one-token
    steps (decode_step).
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

