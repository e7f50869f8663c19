"""Gemma 4 mixture of experts (spec 3.8): a router over all experts, top-k on probabilities,
renormalised and scaled per expert; only the selected experts run, tokens grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .layers import gelu_tanh, rms_norm


class Router(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps
        self.root_size = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts), requires_grad=False)

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r: (N, H) post-attention residual. Returns float32 weights and indices, (N, K)."""
        z = rms_norm(r, None, self.eps) * self.scale * self.root_size
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """Expert weights as 3-D tensors: gate_up (E, 2*Im, H) with gate rows first, down (E, H, Im)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        E, H, Im = cfg.num_experts, cfg.hidden_size, cfg.expert_dim
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Im, H), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, Im), requires_grad=False)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(gelu_tanh(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (N, H); weights/index (N, K). Reads only the experts some token selected."""
        if x.shape[0] == 1:  # decode: no grouping to do; the same sums, in the same (expert) order
            chosen = sorted(zip(index[0].tolist(), range(index.shape[1])))
            out = torch.zeros_like(x)
            for e, slot in chosen:
                out.add_((self.expert(e, x) * weights[0, slot]).to(out.dtype))
            return out
        out = torch.zeros_like(x)
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start : start + n]
            start += n
            token, slot = sel // index.shape[1], sel % index.shape[1]
            y = self.expert(e, x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
