"""
Continuous batching: the requests of many clients decoded together, one token of each per
forward pass, joining and leaving the running batch at token boundaries (the scheduling of
Orca, Yu et al. 2022, which vLLM and text-generation-inference use).

- Sequence: one row: its prompt, its own DecodingOptions and random generator, its text so far
  (engine.TextStream, which also ends it at a stop string), and whom to tell of its tokens.
- Batcher: a thread that owns the model. Each step it admits waiting sequences (their prompts
  go through the model together, and their keys and values are copied into the batch's
  cache), picks a token for every row (logits.next_tokens with the row's own options), lets
  the rows that ended or whose client left go, and runs the others one token on in one forward
  pass.

The batch's cache is one kvcache.KVCache of max_rows rows and the whole context, allocated
once. Every row writes its next token into the same slot, so a row's tokens end there and its
`start` slots before them are masked out, as a left-padded prompt's are: each row's tokens get
the positions and the attention they would get alone. The live rows are the first n of the
buffer (a leaving row's place is taken by the last one) and the forward pass runs over those n
only. When the slots run out, the rows move left by the slots none of them uses any more.

compile=True runs the one-token steps through generate's compiled step (kvcache.cache_and_step),
whose shapes are fixed: a static cache, and the rows in buckets of powers of two (the rows past
the live ones in a bucket each attend to their own token alone, and their logits are dropped),
so a handful of shapes is compiled, not one for every number of rows.
"""

import collections
import copy
import threading

import torch
from torch.nn import functional as F

from nanogpt import engine
from nanogpt.kvcache import KVCache, LayerCache, attention_bias, cache_and_step, cache_window, float_weight
from nanogpt.errors import UserError
from nanogpt.logits import next_tokens


class Sequence:
    """One row of the batch: a prompt to continue, how, and what to do with its tokens.

    on_token(sequence, token, text, logprobs) is called with each token that is not a stop
    token: text is the part of the reply that is now final ("" while a character or a possible
    stop string is incomplete); logprobs is None, or (the token's log-probability, [(token,
    log-probability)] of the `logprobs` most likely ones). on_end(sequence, reason, text) is
    called once at the end, with the text held back until then: reason "stop" (a stop token or
    string), "length" (max_new_tokens), "cancelled" (the client left) or "error: ..." (the step
    failed). Both run on the batcher's thread: they must return at once."""

    def __init__(self, prompt, options, stop_tokens, stop_strings, decode, on_token, on_end,
                 logprobs=None):
        self.prompt, self.options, self.stop_tokens = list(prompt), options, set(stop_tokens)
        self.stream = engine.TextStream(decode, self.prompt, stop_strings, show_prompt=False)
        self.on_token, self.on_end, self.logprobs = on_token, on_end, logprobs
        self.tokens = []  # generated so far, a final stop token included
        self.cancelled = False  # set from another thread when the client has gone
        self.logits = None  # (1, vocab) of its next token, from the model
        self.start = 0  # the first slot of its tokens in the batch's cache
        self.generator = None  # its own random numbers, when options.seed is set (join makes it)

    def cancel(self):
        """The client has gone: the row is let go at the next token boundary."""
        self.cancelled = True


class Batcher:
    """The thread that decodes every submitted Sequence, max_rows of them at a time; at most
    max_waiting more wait for a row (submit refuses the rest). compile: the one-token steps
    compiled (see the top of this file)."""

    def __init__(self, model, max_rows, max_waiting, context, compile=False):
        self.model, self.max_rows, self.max_waiting = model, max_rows, max_waiting
        self.device = float_weight(model).device
        self.compiled = compile
        # the cache of every row (static on a GPU and when compiled), and what runs the steps
        self.storage, self.decode_step = cache_and_step(model, max_rows, context, compile)
        # the cache the forward pass sees: the storage's buffers cut to the live rows (planned
        # anew whenever rows come or go), its own slots, positions and mask
        self.cache = copy.copy(self.storage)
        self.rows = []  # the live Sequences, in the order of the cache's rows
        self.held = 0  # rows live or joining (changed under the lock)
        self.replanned = True
        self.waiting = collections.deque()
        self.lock = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self.run, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, sequences):
        """Queue the sequences of one request, all or none: False if the queue is full (the
        free rows count as places in it: they take the waiting at the next token)."""
        with self.lock:
            free = self.max_rows - self.held
            if len(self.waiting) + len(sequences) > self.max_waiting + free:
                return False
            self.waiting.extend(sequences)
            self.lock.notify()
        return True

    def load(self):
        """(live rows, waiting sequences), for /health."""
        with self.lock:
            return len(self.rows), len(self.waiting)

    def close(self):
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join()

    @torch.no_grad()
    def run(self):
        while True:
            with self.lock:
                while not self.rows and not self.waiting and not self.closing:
                    self.lock.wait()
                if self.closing:
                    return
                joining = [self.waiting.popleft() for _ in
                           range(min(len(self.waiting), self.max_rows - len(self.rows)))]
                self.held += len(joining)
            try:
                self.release(sum(s.cancelled for s in joining))  # their clients have gone
                joining = [s for s in joining if not s.cancelled]
                if joining:
                    self.join(joining)
                self.step()
            except Exception as e:  # a failed step ends its rows, not the server
                self.fail(joining, e)

    def release(self, rows):
        with self.lock:
            self.held -= rows

    def fail(self, joining, error):
        """End every live and joining row with the error; the batch starts afresh."""
        reason = f"error: {type(error).__name__}: {error}"
        for sequence in dict.fromkeys(self.rows + joining):
            sequence.on_end(sequence, reason, "")
        self.rows, self.cache.size, self.replanned = [], 0, True
        self.release(self.held)

    def join(self, joining):
        """Run the joining sequences' prompts through the model together (left-padded, as
        engine.generate batches prompts) and copy each one's keys and values into a free row
        of the batch, ending at the batch's current slot (the rows move right first if a
        prompt is longer than the slots before it)."""
        n, prompts = len(self.rows), [s.prompt for s in joining]
        ids, width = engine.left_pad(prompts, 1, max(map(len, prompts)))
        prefill = KVCache(self.model, len(joining), width)
        logits = cache_window(self.model, prefill, ids.to(self.device), width)
        if not self.rows:
            self.cache.size = width
        elif self.cache.size < width:
            self.move_rows(width - self.cache.size)
        end = self.cache.size
        for j, sequence in enumerate(joining):
            length = len(sequence.prompt)
            for mine, its in zip(self.storage.layers, prefill.layers):
                mine.kv[:, n + j, :, end - length:end] = its.kv[:, j, :, width - length:]
            sequence.start, sequence.logits = end - length, logits[j:j + 1]
            if sequence.options.seed is not None:
                sequence.generator = torch.Generator(self.device).manual_seed(sequence.options.seed)
            self.rows.append(sequence)
        self.replanned = True

    def leave(self, sequence, reason):
        """Free the sequence's row (the last row moves into it) and tell its client why."""
        i, last = self.rows.index(sequence), self.rows[-1]
        if last is not sequence:
            used = slice(last.start, self.cache.size)
            for layer in self.storage.layers:
                layer.kv[:, i, :, used] = layer.kv[:, len(self.rows) - 1, :, used]
            self.rows[i] = last
        self.rows.pop()
        self.release(1)
        self.replanned = True
        if not self.rows:
            self.cache.size = 0
        sequence.on_end(sequence, reason, sequence.stream.flush())

    def move_rows(self, shift):
        """Move every live row's keys and values `shift` slots right (left if negative)."""
        first, size, n = min(s.start for s in self.rows), self.cache.size, len(self.rows)
        for layer in self.storage.layers:
            layer.kv[:, :n, :, first + shift:size + shift] = layer.kv[:, :n, :, first:size].clone()
        for sequence in self.rows:
            sequence.start += shift
        self.cache.size += shift
        self.replanned = True

    def step(self):
        """Pick a token for every row, let the ended rows go, and run the others one token on."""
        for sequence in list(self.rows):
            reason = "cancelled" if sequence.cancelled else self.advance(sequence)
            if reason:
                self.leave(sequence, reason)
        if not self.rows:
            return
        if self.cache.size == self.cache.length:  # full: drop the slots no row uses any more
            self.move_rows(-min(s.start for s in self.rows))
        if self.replanned:
            self.plan()
        idle = [[0]] * (len(self.cache.pad) - len(self.rows))  # a compiled bucket's rows past the live ones
        tokens = torch.tensor([[s.tokens[-1]] for s in self.rows] + idle, device=self.device)
        logits = self.cache.extend(self.decode_step, tokens)
        for sequence, row in zip(self.rows, logits):
            sequence.logits = row[None]

    def plan(self):
        """Set the cache up for the live rows as KVCache.extend leaves it after a token (each
        row's last token at the slot before `size`), for its next one-token step. Compiled, the
        rows of the bucket past the live ones start at `size`: each sees its own token alone."""
        cache, n, size = self.cache, len(self.rows), self.cache.size
        rows = min(self.max_rows, 1 << (n - 1).bit_length()) if self.compiled else n
        cache.layers = [LayerCache(cache, layer.kv[:, :rows]) for layer in self.storage.layers]
        if self.compiled:  # views of the buffers cache_and_step marked: CUDA graphs write them in place
            for layer in cache.layers:
                torch._dynamo.mark_static_address(layer.kv)
        start = torch.tensor([s.start for s in self.rows] + [size] * (rows - n), device=self.device)
        cache.pad = start
        cache.slots = torch.tensor([size - 1], device=self.device)
        cache.positions = (size - 1 - start)[:, None]
        slots = torch.arange(cache.length, device=self.device)
        visible = (slots >= start[:, None]) & (slots < size)
        cache.next_mask = attention_bias(visible[:, None, None], self.storage.layers[0].kv.dtype)
        self.replanned = False

    def advance(self, sequence):
        """Pick the sequence's next token and tell its client; the reason it ended, or None."""
        options, logits = sequence.options, sequence.logits
        ids = torch.tensor([sequence.prompt + sequence.tokens], device=self.device)
        try:
            token = int(next_tokens(ids, logits, len(sequence.prompt), options,
                                    stop_tokens=sorted(sequence.stop_tokens), generator=sequence.generator)[0])
        except UserError as e:  # this row's options or its logits: the other rows go on
            return f"error: {e}"
        sequence.tokens.append(token)
        if token in sequence.stop_tokens:
            return "stop"
        logprobs = None
        if sequence.logprobs is not None:  # of the model's own distribution, as vLLM reports
            log_probs = F.log_softmax(logits[0], dim=-1)
            top = torch.topk(log_probs, sequence.logprobs) if sequence.logprobs else None
            logprobs = (float(log_probs[token]),
                        [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        sequence.on_token(sequence, token, sequence.stream.add(token), logprobs)
        if sequence.stream.stopped:
            return "stop"
        if len(sequence.tokens) == options.max_new_tokens:
            return "length"
        return None
