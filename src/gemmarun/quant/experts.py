"""MoE experts kept quantized, so a token's cost is reading only its selected experts' blocks.

Two layouts. On the CPU, Q4_0, Q8_0, Q5_0, IQ4_NL, MXFP4, Q4_K, Q6_K and IQ4_XS expert tensors (what
llama.cpp's Q4_0, Q8_0, Q4_K_M, IQ4_XS and MXFP4_MOE files hold) stay where they are, in the memory-mapped
GGUF file, and the native kernel reads the selected experts' blocks in place: the 128 experts of a
26B-A4B (13 GB at Q4_0) never become process memory, the OS pages in what routing touches and can
drop it again. Otherwise (other formats, CUDA, no compiler) every expert is repacked at load into a
QuantLinear per projection, like any other weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gguf import GGMLQuantizationType

from ..model.layers import gelu_tanh
from ..model.moe import Experts
from ..native import native_block_gemm, native_block_gemv
from .formats import dequantize
from .linear import NATIVE_MAX_ROWS, QuantLinear

# GGUF block types the native kernel reads in place, and the weights per block of each
MAPPED_TYPES = {GGMLQuantizationType.Q4_0: 32, GGMLQuantizationType.Q8_0: 32, GGMLQuantizationType.Q5_0: 32,
                GGMLQuantizationType.IQ4_NL: 32, GGMLQuantizationType.MXFP4: 32,
                GGMLQuantizationType.Q4_K: 256, GGMLQuantizationType.Q6_K: 256, GGMLQuantizationType.IQ4_XS: 256}


# Up to NATIVE_MAX_ROWS rows of activations (tokens routed to one expert) block_gemv reads the blocks
# in place with the activations rounded as QuantLinear rounds them, so that a row gets the bits it
# gets alone (decode, a batch, a speculative verification). Beyond, Q4_0/Q8_0/Q5_0 blocks under
# float32 compute are dequantized in registers for the activations as they are (block_gemm:
# 1.3-1.5x block_gemv on the gate/up projections at 32 rows, 0.8-1.1x on down; a random 26B-A4B's
# 512-token prefill 15.15 -> 14.12 s), and the other kernels go on. Each reads in place up to the
# rows where dequantizing the expert once for a float32 GEMM takes over (2 threads, 1408x2816
# experts one at a time, 130 of them so they come from memory, 2026-12-06):
FLOAT_BLOCK_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0,
                     GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.MXFP4)
FLOAT_BLOCK_MAX_ROWS = 128  # Q4_0: 7.5 vs 8.7 ms at 128 rows, 23 vs 11 at 256 (x no longer fits in L2)
IN_PLACE_MAX_ROWS = {  # block_gemv
    GGMLQuantizationType.Q4_K: 128,  # 6.8 vs 9.5 ms at 128, 17.2 vs 12.7 at 256
    # Q6_K and IQ4_XS super-blocks unpacked once for all the rows (2026-12-06, 160 experts):
    GGMLQuantizationType.Q6_K: 96,  # 6.6 vs 7.4 ms at 96, 9.6 vs 7.8 at 128 (row by row: 32)
    GGMLQuantizationType.IQ4_XS: 192,  # 12.2 vs 14.0 ms at 192, 17.2 vs 14.6 at 256 (row by row: 32)
    GGMLQuantizationType.Q5_0: 128,  # int16 rows in pairs, bfloat16 compute too: 8.2 vs 12.4 ms at 128
    GGMLQuantizationType.IQ4_NL: 128,  # Q5_0's loops, codes from a table (not measured apart)
    GGMLQuantizationType.MXFP4: 128,
    GGMLQuantizationType.Q4_0: 48,  # int8 activations (bfloat16 compute): level at 48, 6.5-8.7 vs 6.4-6.8 at 64
    GGMLQuantizationType.Q8_0: 32,  # int8 activations: 2.8-3.1 vs 3.5-3.7 ms at 32
}


class MappedExpertBlocks:
    """One projection of every expert as GGUF block rows ``[experts * out, row bytes]``, a view
    of the memory-mapped file; expert ``e`` is rows ``e * out`` to ``(e + 1) * out``."""

    def __init__(self, raw: torch.Tensor, ggml_type: GGMLQuantizationType, experts: int, out_f: int, in_f: int):
        self.raw = raw.view(experts * out_f, -1)
        self.ggml_type, self.out_f, self.in_f = ggml_type, out_f, in_f

    def matmul(self, e: int, x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        """``x @ W_e.T``: read in place (up to NATIVE_MAX_ROWS rows with the activations rounded
        as QuantLinear rounds them, more as they are where the format allows), or, for many rows,
        this expert dequantized once, exactly. The blocks stay in host memory: activations from
        another device (a CPU-loaded model moved there) are multiplied on the CPU and sent back."""
        if x.device.type != "cpu":
            return self.matmul(e, x.cpu(), compute_dtype).to(x.device)
        rows = self.raw[e * self.out_f : (e + 1) * self.out_f]
        x2 = x.reshape(-1, self.in_f).float().contiguous()
        n = x2.shape[0]
        gemm, gemv = native_block_gemm(), native_block_gemv()
        if (gemm is not None and compute_dtype == torch.float32 and self.ggml_type in FLOAT_BLOCK_TYPES
                and NATIVE_MAX_ROWS < n <= FLOAT_BLOCK_MAX_ROWS):
            y = gemm(x2, rows, int(self.ggml_type))
        elif gemv is not None and n <= IN_PLACE_MAX_ROWS[self.ggml_type]:
            y = gemv(x2, rows, int(self.ggml_type), compute_dtype != torch.float32)
        else:
            y = x2 @ dequantize(rows, self.ggml_type, (self.out_f, self.in_f)).T
        return y.to(x.dtype).view(*x.shape[:-1], self.out_f)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


class FloatLinear(nn.Module):
    """One expert's projection stored as floats (a GGUF expert tensor whose rows no block fits)."""

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
        self.mapped: dict[str, MappedExpertBlocks] = {}  # projection name -> blocks left in the file

    @classmethod
    def ensure(cls, model: nn.Module, name: str, compute_dtype: torch.dtype) -> "QuantExperts":
        """The QuantExperts at `name` in `model`, swapping out a float Experts module first."""
        current = model.get_submodule(name)
        if isinstance(current, QuantExperts):
            return current
        swapped = cls(current.num_experts, compute_dtype)
        model.set_submodule(name, swapped)
        return swapped

    def set_weight(self, leaf: str, weight, keep_mapped: bool = False) -> bool:
        """`weight`: a QuantizedTensor of shape (E, out, in) with raw bytes (E*out, bytes per
        row), or a float tensor (E, out, in) when only the other projection is quantized.
        `keep_mapped`: leave blocks of MAPPED_TYPES in the file when the native kernel can read them
        (CPU). Returns whether it did (the caller must then keep the mapping's pages)."""
        E, out_f, in_f = weight.shape
        if E != self.num_experts:
            raise ValueError(f"expert tensor {leaf} has {E} experts, expected {self.num_experts}")
        target = self.repacked(leaf)
        if isinstance(weight, torch.Tensor):
            target.extend(FloatLinear(weight[e]) for e in range(E))  # in the caller's dtype: the activations
            return False
        if (keep_mapped and weight.ggml_type in MAPPED_TYPES and in_f % MAPPED_TYPES[weight.ggml_type] == 0
                and native_block_gemv() is not None):
            self.mapped[leaf] = MappedExpertBlocks(weight.raw, weight.ggml_type, E, out_f, in_f)
            return True
        raw = weight.raw.view(E, out_f, -1)
        target.extend(QuantLinear.from_raw(raw[e], weight.ggml_type, out_f, in_f, self.compute_dtype)
                      for e in range(E))
        return False

    def repacked(self, leaf: str) -> nn.ModuleList:
        """One projection's per-expert modules (empty where its blocks stay mapped)."""
        return self.gate_up if leaf == "gate_up_proj" else self.down

    def _project(self, leaf: str, e: int, x: torch.Tensor) -> torch.Tensor:
        mapped = self.mapped.get(leaf)
        if mapped is not None:
            return mapped.matmul(e, x, self.compute_dtype)
        return self.repacked(leaf)[e](x)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._project("gate_up_proj", e, x).chunk(2, dim=-1)
        return self._project("down_proj", e, gelu_tanh(gate) * up)
