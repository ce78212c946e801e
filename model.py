"""
A GPT language model in one file, exactly the GPT-2 architecture:
learned position embeddings, pre-LayerNorm transformer blocks, causal
self-attention, a GELU MLP (tanh-approximate as GPT-2's, or exact as
nanoGPT's), and an output head tied to the token embedding. Parameter names
follow OpenAI's / Hugging Face's GPT-2 so their checkpoints map onto ours
one to one.

References:
1) OpenAI's GPT-2 release: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's implementation: transformers/models/gpt2/modeling_gpt2.py
"""

import math
from dataclasses import dataclass

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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is None:
            # training, or scoring a whole sequence: plain causal attention, the fastest kernel
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.attn_dropout_p if self.training else 0.0)
        else:
            # generation (engine.py): these tokens' keys and values join the ones cached from
            # earlier steps, and the queries attend to all of them that the mask allows
            k, v = kv_cache.append(k, v)
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


class GPT(nn.Module):
    """GPT(config) is a GPT-2 with GPT-2's random init. Built on the meta device, as the loaders
    in checkpoint.py build it (`with torch.device("meta"): GPT(config)`), it has shapes and no
    memory and nothing is initialised: the loaded tensors take the parameters' places."""

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

    def init_weights(self):
        """GPT-2's init: normal(0, 0.02) matrices and embeddings, zero biases, and the residual
        projections scaled by 1/sqrt(2 * n_layer): each block adds two of them to the residual
        stream, and this keeps its variance from growing with depth."""
        self.apply(_init_module)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embedding is left out by default, as is usual.
        The token embedding stays in: it is tied to, and counted as, the output head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache=None):
        """Logits for every position when `targets` are given (and the mean cross-entropy),
        otherwise for the last position only, which is all sampling needs.
        kv_cache (an engine.KVCache) is for generation: it holds the keys and values of the
        tokens before idx, the positions of idx's tokens, and the attention mask."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        if kv_cache is None:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        else:
            pos = kv_cache.positions  # (B, T): rows of left-padded prompts start later
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache.layers[i])
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
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


def embedding(num_embeddings, embedding_dim):
    """nn.Embedding, except on the meta device, where its own random init is skipped: there is
    nothing to initialise, and torch runs normal_ on meta tensors through a Python path whose
    first use imports torch._dynamo (about a second and 300 MB, for nothing)."""
    if torch.get_default_device().type != "meta":
        return nn.Embedding(num_embeddings, embedding_dim)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))

