"""
GPT language models in one file, in two families chosen by GPTConfig.family:

- "gpt2", exactly the GPT-2 architecture: learned position embeddings, pre-LayerNorm
  transformer blocks, causal self-attention, a GELU MLP (tanh-approximate as GPT-2's, or exact
  as nanoGPT's), and an output head tied to the token embedding. Parameter names follow
  OpenAI's / Hugging Face's GPT-2 (transformer.h.N.attn.c_attn, ...).
- "llama", the Llama-style models (Llama, Mistral, Qwen2 on the hub): RMSNorm, rotary position
  embeddings on the queries and keys (no position table), grouped-query attention (fewer key /
  value heads than query heads), a SwiGLU MLP, and an output head tied to the token embedding
  or not. Parameter names follow Hugging Face's LlamaForCausalLM (model.layers.N.self_attn.q_proj,
  ..., model.norm, lm_head).

Either way the names are the checkpoints', so they map onto ours one to one.

References:
1) OpenAI's GPT-2 release: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's implementations: transformers/models/{gpt2,llama,qwen2,mistral}/modeling_*.py
3) RoFormer (rotary embeddings): https://arxiv.org/abs/2104.09864; SwiGLU: https://arxiv.org/abs/2002.05202
"""

import math
from dataclasses import dataclass
from typing import Optional

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
    activation: str = "gelu_tanh"  # GPT-2's tanh-approximate GELU; "gelu" is exact (nanoGPT's nn.GELU())
    # The fields below choose and shape the Llama-style family; their defaults are GPT-2's
    # behaviour, and the gpt2 family ignores them. For "llama", block_size is the
    # longest context (max_position_embeddings), bias and activation are unused (its MLP is
    # always SiLU-gated), and dropout applies where GPT-2's does.
    family: str = "gpt2"            # "gpt2" or "llama"
    n_kv_head: Optional[int] = None  # key / value heads (grouped-query attention); None: n_head
    norm_eps: float = 1e-5          # the RMSNorms' epsilon (GPT-2's LayerNorms have 1e-5 built in)
    rope_theta: float = 10000.0     # the base of the rotary embedding's wavelengths
    rope_scaling: Optional[dict] = None  # None, {"rope_type": "linear", "factor": f}, or Llama 3.1's
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}, the inverse frequencies as transformers computes them
    mlp_hidden: Optional[int] = None  # the SwiGLU MLP's intermediate size; None: 4 * n_embd
    tie_embeddings: bool = True     # lm_head shares the token embedding's weight (GPT-2 always does)
    qkv_bias: bool = False          # biases on q_proj, k_proj and v_proj only (Qwen2)
    attn_bias: bool = False         # biases on all four attention projections (Llama's attention_bias)
    mlp_bias: bool = False          # biases on the MLP's three projections (Llama's mlp_bias)
    hf_model_type: Optional[str] = None  # Hugging Face's name (llama, mistral, qwen2), for export
    eos_token_id: Optional[list] = None  # ids that end a text (a hub config's); None: the tokenizer's

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"family must be 'gpt2' or 'llama', got {self.family!r}")
        if self.family == "llama":
            if self.n_head % self.kv_heads != 0:
                raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
            if self.head_size % 2 != 0:
                raise ValueError(f"rotary embeddings need an even head size, got {self.head_size}")
            rope_inv_freq(self)  # refuses an unknown rope_scaling

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        """Heads of keys and values: n_head, or fewer with grouped-query attention."""
        return self.n_kv_head or self.n_head


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
            # training, or scoring a whole sequence: plain causal attention, the fastest kernel
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.attn_dropout_p if self.training else 0.0)
        else:
            # generation (engine.py): these tokens' keys and values join the ones cached from
            # earlier steps, and the queries attend to all of them that the mask allows
            k, v = kv_cache.append(qkv[1:])  # keys and values already side by side
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # OpenAI trained GPT-2 with the tanh approximation; nanoGPT's runs use the exact GELU
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
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


# -----------------------------------------------------------------------------
# The Llama-style family

class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) times a learned gain, no mean
    subtracted and no bias. Computed in float32 and cast back before the gain, as Llama's."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config, device=None):
    """The rotary embedding's inverse frequencies theta^(-2i/d), i < d/2 (float32), rescaled as
    config.rope_scaling asks: "linear" divides them all by factor (positions interpolated);
    "llama3" (Llama 3.1) divides the low frequencies by factor, keeps the high ones, and blends
    the two in between."""
    d = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    scaling = config.rope_scaling
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        # wavelengths shorter than old_context / high: kept; longer than old_context / low:
        # divided by factor; in between, a mix that slides from one to the other
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        mixed = (1 - smooth) * scaled / factor + smooth * scaled
        between = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        return torch.where(between, mixed, scaled)
    raise ValueError(f"rope_scaling of type {kind!r} is not implemented: None, 'linear' or 'llama3'")


def rotary(config, pos, dtype):
    """(cos, sin), each (rows or 1, 1, T, head_size), of the rotation at positions pos ((T,) or
    (rows, T)): angle pos * inv_freq for each pair of channels (i, i + head_size / 2), in
    float32, then cast to the activations' dtype."""
    pos = pos if pos.dim() == 2 else pos[None]
    angles = pos[:, None, :, None].float() * rope_inv_freq(config, pos.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate each pair of channels (i, i + head_size / 2) of x (B, heads, T, head_size) by its
    angle: the dot product of a rotated query and key then depends on their distance alone."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        qkv_bias = config.qkv_bias or config.attn_bias
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_size, bias=qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_size, bias=qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=config.attn_bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, kv_cache=None):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # grouped-query attention: each key / value head serves n_head / n_kv_head query heads;
        # the cache stores the n_kv_head heads, and SDPA shares them out
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.attn_dropout_p if self.training else 0.0,
                enable_gqa=gqa)
        else:
            k, v = kv_cache.append(torch.stack((k, v)))  # rotated: a cached key keeps its position
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)
        return self.resid_dropout(self.o_proj(y))


class SwiGLU(nn.Module):
    """The gated MLP of Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.mlp_bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class LlamaBlock(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, rope, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    """GPT(config) is a GPT-2, or a Llama-style model if config.family == "llama", with GPT-2's
    random init. Built on the meta device, as the loaders in checkpoint.py build it
    (`with torch.device("meta"): GPT(config)`), it has shapes and no memory and nothing is
    initialised: the loaded tensors take the parameters' places."""

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        if config.family == "llama":
            self._init_llama(config)
            return
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

    def _init_llama(self, config):
        """Hugging Face's LlamaForCausalLM layout, names included. There is no position table:
        positions enter as rotations of the queries and keys in every layer."""
        self.model = nn.ModuleDict(dict(
            embed_tokens=embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # the small ones (Qwen2-0.5B, Llama 3.2 1B) tie; most do not
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @property
    def blocks(self):
        """The transformer blocks, lowest first, whichever the family."""
        return self.model.layers if self.config.family == "llama" else self.transformer.h

    @property
    def embeddings(self):
        """The input embeddings: the tokens' (and GPT-2's positions')."""
        if self.config.family == "llama":
            return [self.model.embed_tokens]
        return [self.transformer.wte, self.transformer.wpe]

    def init_weights(self):
        """GPT-2's init: normal(0, 0.02) matrices and embeddings, zero biases, and the residual
        projections scaled by 1/sqrt(2 * n_layer): each block adds two of them to the residual
        stream, and this keeps its variance from growing with depth. The Llama-style family
        takes the same scheme (its residual projections are o_proj and down_proj; RMSNorm gains
        start at 1)."""
        self.apply(_init_module)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the embeddings that are only looked up, as is
        usual: GPT-2's position table, and a token embedding not tied to the output head. A
        tied one stays in: it is counted as the head, which multiplies by it."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.config.family == "gpt2":
                n_params -= self.transformer.wpe.weight.numel()
            elif self.lm_head.weight is not self.model.embed_tokens.weight:
                n_params -= self.model.embed_tokens.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache=None):
        """Logits for every position when `targets` are given (and the mean cross-entropy),
        otherwise for the last position only, which is all sampling needs.
        kv_cache (an engine.KVCache) is for generation: it holds the keys and values of the
        tokens before idx, the positions of idx's tokens, and the attention mask."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        # positions count from 0 at the window's first token; past block_size generation crops
        # to the last block_size tokens (engine.fill), which then take positions 0 ... again.
        # That is nanoGPT's crop for GPT-2's learned table, and it works the same for rotary
        # embeddings, which have no table: only the distances between tokens matter to them
        if kv_cache is None:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        else:
            pos = kv_cache.positions  # (B, T): rows of left-padded prompts start later
        if self.config.family == "gpt2":
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for i, block in enumerate(self.transformer.h):
                x = block(x, None if kv_cache is None else kv_cache.layers[i])
            x = self.transformer.ln_f(x)
        else:
            x = self.model.drop(self.model.embed_tokens(idx))
            rope = rotary(self.config, pos, x.dtype)  # once for all layers
            for i, layer in enumerate(self.model.layers):
                x = layer(x, rope, None if kv_cache is None else kv_cache.layers[i])
            x = self.model.norm(x)
        if targets is None:
            # a slice keeps the time dimension as nanoGPT's [-1] index does, but as a view:
            # no index tensor built and no gather, in every decoding step
            return self.lm_head(x[:, -1:, :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to fine-tune a 1024-context GPT-2 at 256 for speed. A
        Llama-style model has no position table to cut: only the limit changes."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.family == "gpt2":
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self):
        """Forward + backward matmul FLOPs per token, as in the PaLM paper, appendix B."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s as a fraction of the device's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    def generate(self, idx, max_new_tokens, **options):
        """Continue each row of idx (B, T) by max_new_tokens tokens. Sampling at temperature 1
        by default; engine.generate lists the options (temperature=0 is greedy, top_k, top_p,
        min_p, penalties, num_beams, stop_tokens, ...)."""
        import engine  # decoding lives in engine.py, which builds on this file
        return engine.generate(self, idx, max_new_tokens, **options)


def _init_module(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)
    if isinstance(module, RMSNorm):
        torch.nn.init.ones_(module.weight)


def embedding(num_embeddings, embedding_dim):
    """nn.Embedding, except on the meta device, where its own random init is skipped: there is
    nothing to initialise, and torch runs normal_ on meta tensors through a Python path whose
    first use imports torch._dynamo (about a second and 300 MB, for nothing)."""
    if torch.get_default_device().type != "meta":
        return nn.Embedding(num_embeddings, embedding_dim)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))

