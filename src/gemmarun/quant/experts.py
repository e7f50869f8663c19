"""MoE experts kept quantized: one QuantLinear per expert and projection, so a token's cost is
reading only its selected experts' blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import gelu_tanh
from ..model.moe import Experts
from .linear import QuantLinear


class _FloatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class QuantExperts(Experts):
    def __init__(self, num_experts: int, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.compute_dtype = compute_dtype
        self.gate_up = nn.ModuleList()
        self.down = nn.ModuleList()

    @classmethod
    def ensure(cls, model: nn.Module, name: str, compute_dtype: torch.dtype) -> "QuantExperts":
        """The QuantExperts at `name` in `model`, swapping out a float Experts module first."""
        current = model.get_submodule(name)
        if isinstance(current, QuantExperts):
            return current
        swapped = cls(current.num_experts, compute_dtype)
        model.set_submodule(name, swapped)
        return swapped

    def set_weight(self, leaf: str, weight) -> None:
        """`weight`: a QuantizedTensor of shape (E, out, in) with raw bytes (E*out, bytes per
        row), or a float tensor (E, out, in) when only the other projection is quantized."""
        E, out_f, in_f = weight.shape
        if E != self.num_experts:
            raise ValueError(f"expert tensor {leaf} has {E} experts, expected {self.num_experts}")
        target = self.gate_up if leaf == "gate_up_proj" else self.down
        if isinstance(weight, torch.Tensor):
            target.extend(_FloatLinear(weight[e].to(self.compute_dtype)) for e in range(E))
            return
        raw = weight.raw.view(E, out_f, -1)
        target.extend(QuantLinear.from_raw(raw[e], weight.ggml_type, out_f, in_f, self.compute_dtype)
                      for e in range(E))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e](x).chunk(2, dim=-1)
        return self.down[e](gelu_tanh(gate) * up)
