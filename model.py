"""
The GPT language model, in one file: exactly the GPT-2 architecture (learned position
embeddings, pre-LayerNorm transformer blocks, causal self-attention, a GELU MLP and an output
head tied to the token embedding), with OpenAI's / Hugging Face's parameter names
(transformer.h.N.attn.c_attn, ...), so that their checkpoints map onto ours one to one.

The Llama-style family (Llama, Mistral, Qwen2) lives in llama.py, built on this file's GPT.
Code that reads a saved config of either family makes its model with build(config).

References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
"""

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest context the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257, padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in Linears and LayerNorms, as GPT-2; False is a bit better and faster
    activation: str = "gelu_tanh"  # the MLP's: GPT-2's tanh-approximate GELU, "gelu" (exact, nanoGPT's
    # nn.GELU()) or "relu2" (relu(x)^2, as in modded-nanogpt's speedrun records)
    # saved with the other fields (a checkpoint's model_args), so that build() knows which
    # model a saved config is; fixed per config class
    family: str = field(default="gpt2", init=False)

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        """Heads of keys and values, which the KV cache holds: one per query head here (llama.py's
        grouped-query attention has fewer)."""
        return self.n_head


def causal_attention(q, k, v, dropout_p=0.0):
    """Each query (B, heads, T, head_size) attends to the keys and values at its position and
    before it. PyTorch's fused kernel (flash attention), except when training in bfloat16 on a
    CPU with contexts of up to 256: there the fused kernel's backward pass ran slower than the
    plain matmuls and softmax it fuses (which run on the CPU's bfloat16 units), by 1.5-4x;
    from 512 on the fused kernel was faster (bench/attention.py times both). Without a
    backward pass to follow, the fused kernel runs, and the logits are transformers' to the
    bit. Keys and values may have fewer heads than the queries (grouped-query attention),
    each serving a group."""
    gqa = k.size(1) != q.size(1)
    training = torch.is_grad_enabled() and q.requires_grad
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or not training or q.size(-2) > 256:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                              enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    T = q.size(-2)
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)  # scaled on the smaller side
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return F.dropout(weights, dropout_p) @ v


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        # (B, T, 3 * C) -> query, key and value, each (B, n_head, T, head_size): views, no copies
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if kv_cache is None:
            # training, or scoring a whole sequence: plain causal attention
            y = causal_attention(q, k, v, self.attn_dropout_p if self.training else 0.0)
        else:
            # generation: these tokens' keys and values join the ones cached from earlier
            # steps, and the queries attend to all of them that the mask allows
            k, v = kv_cache.append(qkv[1:])  # keys and values already side by side
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer"), transformers' "relu2"."""

    def forward(self, x):
        return F.relu(x).square()


# the MLP's nonlinearity, by GPTConfig.activation: OpenAI trained GPT-2 with GELU's tanh
# approximation; nanoGPT's runs use the exact GELU
ACTIVATIONS = {"gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "gelu": nn.GELU,
               "relu2": ReLUSquared}


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = ACTIVATIONS[config.activation]()  # GPT-2's name for it, whichever it is
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2, with GPT-2's random init. Built on the meta device, as the loaders in
    checkpoint.py build it (`with torch.device("meta"): build(config)`), it has shapes and no
    memory and nothing is initialised: the loaded tensors take the parameters' places."""

    # the projections whose outputs are added to the residual stream (two per block)
    residual_projections = ("c_proj.weight",)

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=embedding(config.vocab_size, config.n_embd),
            wpe=embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output head reads logits off the token embedding
        # (https://paperswithcode.com/method/weight-tying)
        self.transformer.wte.weight = self.lm_head.weight
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @property
    def blocks(self):
        """The transformer blocks, lowest first (what fine-tuning freezes and Muon trains)."""
        return self.transformer.h

    @property
    def embeddings(self):
        """The input embeddings: the tokens' and the positions'."""
        return [self.transformer.wte, self.transformer.wpe]

    def init_weights(self):
        """GPT-2's init: normal(0, 0.02) matrices and embeddings, zero biases, and the residual
        projections scaled by 1/sqrt(2 * n_layer): each block adds two of them to the residual
        stream, and this keeps its variance from growing with depth."""
        self.apply(_init_module)
        for name, p in self.named_parameters():
            if name.endswith(self.residual_projections):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the position embeddings, which are only looked
        up, as is usual. The token embedding stays in: it is tied to the output head, which
        multiplies by it."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache=None):
        """Logits for every position when `targets` are given (and the mean cross-entropy),
        otherwise for the last position only, which is all sampling needs.
        kv_cache (a KVCache, see generate) is for generation: it holds the keys and values of
        the tokens before idx, the positions of idx's tokens, and the attention mask."""
        pos = self.positions(idx, kv_cache)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache.layers[i])
        x = self.transformer.ln_f(x)
        return self.logits_and_loss(x, targets)

    def positions(self, idx, kv_cache=None):
        """The positions of idx's tokens: 0, 1, ... from the first, or the cache's.
        They count from the window's first token: past block_size, generate crops to the last
        block_size tokens, which then take positions 0 ... again (nanoGPT's crop)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        if kv_cache is None:
            return torch.arange(T, dtype=torch.long, device=idx.device)
        return kv_cache.positions  # (B, T): rows of left-padded prompts start later

    def logits_and_loss(self, x, targets=None):
        """(logits, loss) from the last layer's output x (B, T, n_embd): with targets, every
        position's logits and the mean cross-entropy; without, the last position's and None."""
        if targets is None:
            # a slice keeps the time dimension as nanoGPT's [-1] index does, but as a view:
            # no index tensor built and no gather, in every decoding step
            return self.lm_head(x[:, -1:, :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to fine-tune a 1024-context GPT-2 at 256 for speed."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self):
        """Forward + backward matmul FLOPs per token, as in the PaLM paper, appendix B."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s as a fraction of the device's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, **options):
        """Take a conditioning sequence of indices idx (LongTensor of shape (b, t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each
        time. Most likely you'll want to make sure to be in model.eval() mode for this.
        temperature=0 is greedy. The keys and values of the tokens seen stay in a KV cache, so
        each step runs only the newest token through the model.
        Any other option (top_p, min_p, penalties, num_beams, stop_tokens, seed, ...: see
        engine.generate), or prompts of several lengths (lists of token ids), hands the whole
        call to engine.generate."""
        from nanogpt import engine  # decoding with every option lives in engine.py, which builds on this file
        if options or not torch.is_tensor(idx):
            if options.get("num_beams", 1) > 1 and temperature == 1.0 and "do_sample" not in options:
                # nanoGPT's default temperature means "sample"; beams without do_sample are
                # deterministic, as in transformers
                temperature = 0
            return engine.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                   **options)
        engine.DecodingOptions(max_new_tokens, temperature=temperature, top_k=top_k)  # refuses bad ones
        from nanogpt.kvcache import KVCache  # the generation engine's cache: buffers allocated once
        block_size = self.config.block_size
        cache = KVCache(self, idx.size(0), min(block_size, idx.size(1) + max_new_tokens))
        no_padding = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
        for _ in range(max_new_tokens):
            if cache.size in (0, cache.length):
                # the first step, or the cache is full: crop the sequence to its last block_size
                # tokens, as nanoGPT does, and run them all (each has moved to a new position)
                cache.reset(no_padding)
                idx_cond = idx[:, -block_size:]
            else:
                idx_cond = idx[:, -1:]  # the tokens before it are in the cache
            # the logits (b, vocab_size) after the last token, its keys and values cached
            logits = cache.extend(self, idx_cond)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                # scale by the desired temperature
                logits = logits / temperature
                # optionally crop the logits to only the top k options
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("Inf")
                # apply softmax to convert logits to (normalized) probabilities, and sample
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)
            # append sampled index to the running sequence and continue
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def _init_module(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def embedding(num_embeddings, embedding_dim):
    """nn.Embedding, except on the meta device, where its own random init is skipped: there is
    nothing to initialise there, and torch runs normal_ on meta tensors through a Python path
    whose first use imports torch._dynamo, which takes time and memory for nothing."""
    if torch.get_default_device().type != "meta":
        return nn.Embedding(num_embeddings, embedding_dim)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))


# -----------------------------------------------------------------------------
# Either family, from a saved config

def config_class(family):
    """The config class of a family, as a saved config (a checkpoint's model_args) names it:
    GPTConfig for "gpt2" (nanoGPT's checkpoints name none), llama.LlamaConfig for "llama"."""
    if family == "gpt2":
        return GPTConfig
    if family == "llama":
        from nanogpt.llama import LlamaConfig  # llama.py builds on this file
        return LlamaConfig
    raise ValueError(f"family must be 'gpt2' or 'llama', got {family!r}")


def build(config):
    """The model of a config of either family: a GPT, or a llama.Llama."""
    if config.family == "llama":
        from nanogpt.llama import Llama
        return Llama(config)
    return GPT(config)
