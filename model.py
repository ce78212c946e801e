"""
A GPT language model in one file, exactly the GPT-2 architecture:
learned position embeddings, pre-LayerNorm transformer blocks, causal
self-attention, a tanh-approximate GELU MLP, and an output head tied to the
token embedding. Parameter names follow OpenAI's / Hugging Face's GPT-2 so
their checkpoints map onto ours one to one.

References:
1) OpenAI's GPT-2 release: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's implementation: transformers/models/gpt2/modeling_gpt2.py
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import engine
from configurator import UserError


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest context the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257, padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in Linears and LayerNorms, as GPT-2; False is a bit better and faster

    def __post_init__(self):
        if self.n_head < 1 or self.n_embd % self.n_head != 0:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class Linear(nn.Linear):
    """nn.Linear, with a faster route for the few rows of input that decoding gives it on a CPU.

    Decoding multiplies one row per sequence by every weight matrix, so its speed is the speed
    at which the weights stream from memory. For such thin float32 inputs, PyTorch's CPU
    matrix-vector route reaches about 12 GB/s on our 2-core machine (torch 2.13), while the same
    product as a batched matmul over the two halves of the weight reaches about 30, with both
    cores at work: GPT-2 decodes 2.3x faster (bench_generate.py). Training's many rows, and
    other devices and dtypes, take nn.Linear's route."""

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        if rows > 4 or x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)
        out_features, in_features = self.weight.shape
        half = out_features // 2
        columns = x.reshape(rows, in_features).t()
        y = torch.bmm(self.weight[:2 * half].view(2, half, in_features), columns.expand(2, -1, -1))
        y = y.reshape(2 * half, rows)
        if 2 * half < out_features:  # the odd row out (GPT-2's vocabulary has 50257 tokens)
            y = torch.cat((y, self.weight[2 * half:] @ columns))
        y = y.t() if self.bias is None else y.t() + self.bias
        return y.reshape(*x.shape[:-1], out_features)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        # query, key and value projections for all heads, in one matmul
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
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
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output head reads logits off the token embedding
        # (https://paperswithcode.com/method/weight-tying)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two
        # of them to the residual stream, and this keeps its variance from growing with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, kind="adamw"):
        """The optimizer for the parameters that train, with weight decay on matrices (matmul
        weights, embeddings) only: biases and LayerNorm gains are left undecayed.
        kind="adamw": AdamW for all. kind="muon": PyTorch's Muon for the matrices inside the
        blocks, AdamW for the rest (embeddings, the tied head, gains), as Muon's authors advise.
        Muon orthogonalises each matrix's update (Newton-Schulz iterations); with the update
        scaled to AdamW's size (match_rms_adamw) the same learning rate serves both. It learns
        far more per step: on char Shakespeare it reached val 1.65 in 1150 steps, where AdamW
        took 4600 steps to reach 1.62."""
        if kind not in ("adamw", "muon"):
            raise UserError(f"optim must be 'adamw' or 'muon', got {kind!r}")
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        to_muon = {n for n, p in named
                   if kind == "muon" and p.dim() == 2 and n.startswith("transformer.h.")}
        muon = [p for n, p in named if n in to_muon]
        rest = [p for n, p in named if n not in to_muon]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel does the whole update in one launch per group
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
        if not muon:
            return adamw
        return Optimizers(adamw, torch.optim.Muon(muon, lr=learning_rate, weight_decay=weight_decay,
                                                  adjust_lr_fn="match_rms_adamw"))

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
        return engine.generate(self, idx, max_new_tokens, **options)


class Optimizers:
    """Several optimizers that step as one, each over its own parameters: train.py sets the
    learning rate of every group, steps, zeroes and checkpoints them as it would one optimizer
    (and torch.amp.GradScaler unscales and steps them through param_groups and step())."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)
