"""
The Llama-style family (Llama, Mistral, Qwen2 on the hub), built on model.py's GPT: RMSNorm,
rotary position embeddings on the queries and keys (no position table), grouped-query
attention (fewer key / value heads than query heads), a SwiGLU MLP, and an output head tied
to the token embedding or not. Parameter names follow Hugging Face's LlamaForCausalLM
(model.layers.N.self_attn.q_proj, ..., model.norm, lm_head), so that checkpoints map onto ours
one to one. GPT's loss, generation, cropping and FLOP counts apply as they are.

References:
1) Hugging Face's implementations: transformers/models/{llama,qwen2,mistral}/modeling_*.py
2) RoFormer (rotary embeddings): https://arxiv.org/abs/2104.09864; SwiGLU: https://arxiv.org/abs/2002.05202
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, causal_attention, embedding


@dataclass
class LlamaConfig:
    block_size: int = 1024   # the longest context (max_position_embeddings)
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # where GPT-2's applies
    n_kv_head: Optional[int] = None  # key / value heads (grouped-query attention); None: n_head
    norm_eps: float = 1e-5          # the RMSNorms' epsilon
    rope_theta: float = 10000.0     # the base of the rotary embedding's wavelengths
    rope_scaling: Optional[dict] = None  # None, {"rope_type": "linear", "factor": f}, or Llama 3.1's
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}, the inverse frequencies as transformers computes them
    mlp_hidden: Optional[int] = None  # the SwiGLU MLP's intermediate size; None: 4 * n_embd
    tie_embeddings: bool = True     # lm_head shares the token embedding's weight
    qkv_bias: bool = False          # biases on q_proj, k_proj and v_proj only (Qwen2)
    attn_bias: bool = False         # biases on all four attention projections (Llama's attention_bias)
    mlp_bias: bool = False          # biases on the MLP's three projections (Llama's mlp_bias)
    hf_model_type: Optional[str] = None  # Hugging Face's name (llama, mistral, qwen2), for export
    eos_token_id: Optional[list] = None  # ids that end a text (a hub config's); None: the tokenizer's
    # GPT-2's flag, read by code that handles any config's shape (train.py's --bias); always
    # False here: the norms have no biases, and the projections only those named above
    bias: bool = False
    # saved with the other fields (a checkpoint's model_args): see model.build
    family: str = field(default="llama", init=False)

    def __post_init__(self):
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_size % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_size}")
        if not 0 < self.norm_eps < math.inf:  # under the square root of a mean of squares
            raise ValueError(f"norm_eps (a config.json's rms_norm_eps) must be a positive number, "
                             f"got {self.norm_eps}")
        rope_inv_freq(self)  # refuses an unknown rope_scaling

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        """Heads of keys and values: n_head, or fewer with grouped-query attention."""
        return self.n_kv_head or self.n_head


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
        # the cache stores the n_kv_head heads, and the attention shares them out
        if kv_cache is None:
            y = causal_attention(q, k, v, self.attn_dropout_p if self.training else 0.0)
        else:
            k, v = kv_cache.append(torch.stack((k, v)))  # rotated: a cached key keeps its position
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask,
                                               enable_gqa=self.n_kv_head != self.n_head)
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


class Llama(GPT):
    """A Llama-style model in Hugging Face's LlamaForCausalLM layout, with GPT-2's random init
    (the RMSNorm gains start at 1). There is no position table: positions enter as rotations
    of the queries and keys in every layer. Its layers are its own; the rest is GPT's."""

    residual_projections = ("o_proj.weight", "down_proj.weight")

    def __init__(self, config):
        nn.Module.__init__(self)  # not GPT.__init__, which makes GPT-2's layers
        self.config = config
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
        return self.model.layers

    @property
    def embeddings(self):
        return [self.model.embed_tokens]

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without a token embedding not tied to the output head,
        which is only looked up. A tied one stays in: it is counted as the head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.lm_head.weight is not self.model.embed_tokens.weight:
            n_params -= self.model.embed_tokens.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache=None):
        # rotary embeddings have no table: cropping to the last block_size tokens (generate)
        # works for them as for GPT-2's, since only the distances between tokens matter
        pos = self.positions(idx, kv_cache)
        x = self.model.drop(self.model.embed_tokens(idx))
        rope = rotary(self.config, pos, x.dtype)  # once for all layers
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, None if kv_cache is None else kv_cache.layers[i])
        x = self.model.norm(x)
        return self.logits_and_loss(x, targets)

    def crop_block_size(self, block_size):
        """Shrink the context. There is no position table to cut: only the limit changes."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
