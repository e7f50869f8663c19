"""Numeric primitives shared by the decoder: RMSNorm, RoPE, gated GELU MLP, soft-capping."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..native import native_ops
from ..quant.linear import project


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4 RMSNorm: computed in float32, weight multiplies directly (no +1 offset).

    Gemma 3 checkpoints store `w` where the math uses `1 + w`; the loaders add the 1 once at
    load time (as llama.cpp's converter does), so one norm serves both families.
    """
    if x.dtype == torch.float32 and x.device.type == "cpu" and (weight is None or weight.dtype == torch.float32):
        ops = native_ops()  # one call for the formula below (decode runs ~100 norms a token)
        if ops is not None:
            return ops.rms_norm(x, weight, eps)
    # (dtype checks instead of no-op .float()/.type_as calls: each is a dispatch)
    x32 = x if x.dtype == torch.float32 else x.float()
    y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * (weight if weight.dtype == torch.float32 else weight.float())
    return y if y.dtype == x.dtype else y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh` in place: the same kernel, so the same bits for a contiguous `x` (torch rounds
    strided inputs differently); a prefill's [tokens, width] activations are not held twice."""
    return torch.ops.aten.gelu_(x, approximate="tanh")


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


class MLP(nn.Module):
    """Gated tanh-GELU MLP: down(gelu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def input_projections(self) -> tuple[nn.Module, ...]:
        """The projections that read the MLP's input (stacked into one matmul where they can be)."""
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, *self.input_projections())  # fresh contiguous tensors: reused in place
        return self.down_proj(gelu_tanh_(gate).mul_(up))


class RotaryTable(nn.Module):
    """cos/sin for one (rope config, head dim) pair, in rotate-half (NeoX) layout.

    Frequency pairs with inv_freq 0 (p-RoPE's non-rotating pairs) get cos=1, sin=0 exactly.
    """

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)
        self._rotating: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotating(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin [>= n, r] of positions 0, 1, ... for the r frequency pairs that rotate
        (p-RoPE's still pairs come last). A K=V layer makes every visible key from its position at
        every decode step; these rows are kept between steps, grown by doubling (r = 64 on Gemma 4's
        full layers: 512 bytes a position)."""
        table = self._rotating
        if table is None or table[0].shape[0] < n or table[0].device != self.inv_freq.device:
            size = max(n, 256, 2 * table[0].shape[0] if table is not None else 0)
            r = int((self.inv_freq != 0).sum())
            positions = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)
            angles = positions[:, None] * self.inv_freq[None, :r]
            table = self._rotating = (angles.cos(), angles.sin())
        return table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((angles, angles), dim=-1)  # (T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) with cos/sin broadcastable to it: dim j pairs with j + D/2."""
    if (x.device.type == "cpu" and x.dtype == cos.dtype == sin.dtype == torch.float32
            and cos.stride(-1) == sin.stride(-1) == 1):
        ops = native_ops()  # one call for the formula below
        if ops is not None:
            return ops.rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ClippableLinear(nn.Module):
    """Bias-free linear with optional scalar clamps on its input and output (spec 1.3); vision and audio
    towers use it, with the four scalar bounds stored in the checkpoint."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.clipped = clipped
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            self.register_buffer("input_min", torch.tensor(-math.inf))
            self.register_buffer("input_max", torch.tensor(math.inf))
            self.register_buffer("output_min", torch.tensor(-math.inf))
            self.register_buffer("output_max", torch.tensor(math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        y = self.linear(x)
        if self.clipped:
            y = torch.clamp(y, self.output_min, self.output_max)
        return y
