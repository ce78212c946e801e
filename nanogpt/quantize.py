"""
Weight layouts for decoding on a CPU: rewrite a model's Linear layers, in place, for the few
rows of input that decoding feeds them. A script that owns its loaded model applies one
(sample.py, chat.py); engine.generate() never changes the model it is given.

- fast_cpu_linears(): the same float weights, through whichever of PyTorch's matmul routes
  streams them fastest on this machine (SmallBatchLinear, measured once per process and dtype).
- quantize_int8(): int8 weights with one scale per output row (Int8Linear), a quarter of the
  bytes to read per token.
"""

import time

import torch
from torch import nn
from torch.nn import functional as F

from nanogpt.errors import UserError
from nanogpt.kvcache import float_weight


# -----------------------------------------------------------------------------
# The fastest route for float weights

class SmallBatchLinear(nn.Linear):
    """nn.Linear, with other routes for the few rows of input that decoding gives it on a CPU.

    Decoding multiplies one row per sequence by every weight matrix, so its speed is the speed
    at which the weights stream from memory, and which of PyTorch's routes streams them fastest
    depends on the machine's BLAS and cores: F.linear's float32 matrix-vector product may keep
    one core busy where a batched matmul over the two halves of the weight ("split_matmul")
    keeps two at work; elsewhere F.linear is the faster, and for bfloat16 torch.mv ("matvec",
    one row only) may beat it. So fast_cpu_linears measures the routes once per process and
    dtype (fastest_route), and SmallBatchLinear takes the winner. Many rows (a prompt,
    training) take nn.Linear's route, and so do small weights (under MIN_ELEMENTS, such as the
    key / value projections of grouped-query attention), which one core reads in less time
    than it takes to hand half of them to another: on a busy machine that other core may be
    away for a whole time slice."""

    MIN_ELEMENTS = 2 ** 19  # GPT-2's smallest matrix, 768 x 768, has more

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        route = _fastest_route.get(self.weight.dtype) if self.benefits(self.weight) else "linear"
        if route == "split_matmul" and rows <= 4 and x.dtype == torch.float32:
            return self.split_matmul(self.weight, self.bias, x)
        if route == "matvec" and rows == 1 and x.dtype == self.weight.dtype:
            return self.matvec(self.weight, self.bias, x)
        return super().forward(x)

    @classmethod
    def benefits(cls, weight):
        """Whether a weight is one the routes are for: a big float32 / bfloat16 one on a CPU."""
        return (weight.device.type == "cpu" and weight.dtype in ROUTES
                and weight.numel() >= cls.MIN_ELEMENTS)

    @staticmethod
    def split_matmul(weight, bias, x):
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
    def matvec(weight, bias, x):
        """x @ weight.T + bias for one row x, as a matrix-vector product."""
        y = torch.mv(weight, x.reshape(-1))
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], weight.size(0))


ROUTES = {torch.float32: ("linear", "split_matmul", "matvec"), torch.bfloat16: ("linear", "matvec")}
_fastest_route = {}  # dtype -> the route measured fastest on this machine for one row


@torch.no_grad()
def fastest_route(linears, dtype):
    """The route (ROUTES) that decodes one row through these Linear layers (a model's own: its
    real shapes, and all of its weights, more than the CPU caches hold) fastest: each runs
    them all three times, taking turns, and the best pass of each counts (noise only adds
    time); another route than nn.Linear's ("linear") must win by 10%. About three tokens' worth
    of decoding per route, once per process and dtype."""
    if dtype not in _fastest_route:
        rows = {layer: torch.randn(1, layer.in_features, dtype=dtype) for layer in linears}
        run = {"linear": lambda layer: F.linear(rows[layer], layer.weight, layer.bias),
               "split_matmul": lambda layer: SmallBatchLinear.split_matmul(layer.weight, layer.bias,
                                                                          rows[layer]),
               "matvec": lambda layer: SmallBatchLinear.matvec(layer.weight, layer.bias, rows[layer])}
        best = dict.fromkeys(ROUTES[dtype], float("inf"))
        for _ in range(3):
            for name in best:
                t0 = time.perf_counter()
                for layer in linears:
                    run[name](layer)
                best[name] = min(best[name], time.perf_counter() - t0)
        winner = min(best, key=best.get)
        _fastest_route[dtype] = winner if best[winner] < 0.9 * best["linear"] else "linear"
    return _fastest_route[dtype]


def fast_cpu_linears(model):
    """Give every plain nn.Linear of a CPU model SmallBatchLinear's routes, in place (merged
    LoRA layers included), where one of them is faster than nn.Linear's on this machine
    (fastest_route); a model elsewhere is left alone. The parameters stay the very same
    tensors, under the same names, so ties, state dicts and training are unchanged.
    Returns the model."""
    if float_weight(model).device.type != "cpu":
        return model
    slots = [(module, name, child) for module in list(model.modules())
             for name, child in module.named_children() if type(child) is nn.Linear]
    big = [child for _, _, child in slots if SmallBatchLinear.benefits(child.weight)]
    if not big or fastest_route(big, big[0].weight.dtype) == "linear":
        return model
    for module, name, child in slots:
        with torch.device("meta"):  # no memory for weights about to be replaced
            layer = SmallBatchLinear(child.in_features, child.out_features, bias=False)
        layer.weight, layer.bias = child.weight, child.bias
        layer.train(child.training)
        setattr(module, name, layer)
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
    place. The token embedding keeps its own weights: a lookup reads one row per token.
    Returns the model."""
    if float_weight(model).device.type != "cpu":
        raise UserError("quantize=int8 uses PyTorch's CPU kernel: run it with --device=cpu")
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model
