"""GGML block formats, decoded with torch ops (so the same code runs on CPU and CUDA).

Every supported quantized format is *affine per group*: each group of ``group_size``
consecutive elements of a block is ``w = code * scale + bias`` with small integer codes and
one float32 ``scale`` (and optionally ``bias``) per group.  ``decode_blocks`` exposes exactly
that triple; ``dequantize_blocks`` evaluates it.  Keeping the triple separate is what lets
:mod:`gemmarun.quant.linear` hold weights as int8/int4 codes and still reproduce the reference
float values bit for bit.

Bit-exactness against ``gguf.quants.dequantize`` (numpy) comes from doing the same float32
operations in the same order: f16 fields are widened to f32 first, composite scales such as
``d * sc`` are formed in f32, then ``code * scale`` is rounded once and ``bias`` is added once
(``a - b`` and ``a + (-b)`` round identically in IEEE arithmetic, so K-quant mins are stored
negated as ``bias``).  No fused multiply-add is used anywhere.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "BlockFormat",
    "Decoded",
    "FORMATS",
    "SUPPORTED_TYPE_NAMES",
    "UnsupportedQuantType",
    "dequantize",
    "get_format",
    "type_name",
]

QK_K = 256
# Elements dequantized per step in `dequantize`; bounds the temporaries to a few tens of MB.
_CHUNK_ELEMENTS = 1 << 19


class UnsupportedQuantType(ValueError):
    """A tensor uses a GGML type gemmarun cannot decode."""


class Decoded(NamedTuple):
    """Affine decomposition of a run of blocks: ``w = codes * scale + bias`` per group.

    codes: int8 ``[n_blocks, block_size]``; scale / bias: float32 ``[n_blocks, groups]``
    where ``groups = block_size // group_size``; bias is None for symmetric formats.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None


FORMATS: dict[GGMLQuantizationType, type["BlockFormat"]] = {}


class BlockFormat:
    """One GGML block format; subclasses self-register in :data:`FORMATS`.

    ``is_float`` formats (F32/F16/BF16) have one element per block and no codes.  For the
    others, ``group_size`` is the number of elements sharing a scale and ``code_min`` /
    ``code_max`` bound the integer codes (a range of at most 16 values can be stored as
    nibbles).
    """

    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    is_float: ClassVar[bool] = False
    group_size: ClassVar[int] = 0
    code_min: ClassVar[int] = 0
    code_max: ClassVar[int] = 0

    def __init_subclass__(cls, ggml_type: GGMLQuantizationType, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.ggml_type = ggml_type
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
        assert ggml_type not in FORMATS, ggml_type
        FORMATS[ggml_type] = cls

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        """Split uint8 ``[n, type_size]`` blocks into integer codes and per-group scale/bias."""
        raise NotImplementedError(f"{cls.ggml_type.name} is a float format")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, type_size]`` -> float32 ``[n, block_size]``, bit-exact with gguf-py."""
        codes, scale, bias = cls.decode_blocks(blocks)
        n, groups = scale.shape
        w = codes.reshape(n, groups, -1).to(torch.float32) * scale.unsqueeze(-1)
        if bias is not None:
            w = w + bias.unsqueeze(-1)
        return w.view(n, cls.block_size)


# ---------------------------------------------------------------------------------- helpers


def _f16(field: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 2]`` little-endian half -> float32 ``[n, 1]`` (exact widening)."""
    return field.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.uint8, device=like.device).view(*shape)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """Low nibbles of each ``run`` bytes, then their high nibbles (gguf's element order)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, run) >> _shifts((0, 4), (1, 1, 2, 1), qs)
    return (q & 0x0F).reshape(n, -1)


def _bits(qh: torch.Tensor, run: int) -> torch.Tensor:
    """Bit ``i`` of byte ``j`` of each ``run``-byte row -> element ``i * run + j``."""
    n = qh.shape[0]
    q = qh.reshape(n, -1, 1, run) >> _shifts(range(8), (1, 1, 8, 1), qh)
    return (q & 0x01).reshape(n, -1)


def _le_bits32(qh: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 4]`` (a little-endian uint32) -> its 32 bits, LSB first, as uint8."""
    q = qh.unsqueeze(-1) >> _shifts(range(8), (1, 1, 8), qh)
    return (q & 0x01).reshape(qh.shape[0], 32)


def _kquant_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scale/min field of Q4_K / Q5_K into 8 + 8 uint8 values."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


# ---------------------------------------------------------------------------- float formats


class F32(BlockFormat, ggml_type=GGMLQuantizationType.F32):
    is_float = True

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32)


class F16(BlockFormat, ggml_type=GGMLQuantizationType.F16):
    is_float = True

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).to(torch.float32)


class BF16(BlockFormat, ggml_type=GGMLQuantizationType.BF16):
    is_float = True

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        # bf16 -> f32 is a 16-bit left shift of the bit pattern, exactly as gguf-py does it.
        return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


# ---------------------------------------------------------------------- 32-element formats


class Q4_0(BlockFormat, ggml_type=GGMLQuantizationType.Q4_0):
    group_size, code_min, code_max = 32, -8, 7

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        codes = _nibbles(blocks[:, 2:], 16).to(torch.int8) - 8
        return Decoded(codes, _f16(blocks[:, 0:2]), None)


class Q4_1(BlockFormat, ggml_type=GGMLQuantizationType.Q4_1):
    group_size, code_min, code_max = 32, 0, 15

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        codes = _nibbles(blocks[:, 4:], 16).to(torch.int8)
        return Decoded(codes, _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4]))


class Q5_0(BlockFormat, ggml_type=GGMLQuantizationType.Q5_0):
    group_size, code_min, code_max = 32, -16, 15

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        q = _nibbles(blocks[:, 6:], 16) | (_le_bits32(blocks[:, 2:6]) << 4)
        return Decoded(q.to(torch.int8) - 16, _f16(blocks[:, 0:2]), None)


class Q5_1(BlockFormat, ggml_type=GGMLQuantizationType.Q5_1):
    group_size, code_min, code_max = 32, 0, 31

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        q = _nibbles(blocks[:, 8:], 16) | (_le_bits32(blocks[:, 4:8]) << 4)
        return Decoded(q.to(torch.int8), _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4]))


class Q8_0(BlockFormat, ggml_type=GGMLQuantizationType.Q8_0):
    group_size, code_min, code_max = 32, -128, 127

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        codes = blocks.contiguous().view(torch.int8)[:, 2:]
        return Decoded(codes, _f16(blocks[:, 0:2]), None)


# ---------------------------------------------------------- K-quants (256-element blocks)


class Q2_K(BlockFormat, ggml_type=GGMLQuantizationType.Q2_K):
    group_size, code_min, code_max = 16, 0, 3

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        n = blocks.shape[0]
        scales, qs = blocks[:, 0:16], blocks[:, 16:80]
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        scale = d * _f32(scales & 0x0F)
        bias = -(dmin * _f32(scales >> 4))
        q = (qs.reshape(n, -1, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qs)) & 0x03
        return Decoded(q.reshape(n, QK_K).to(torch.int8), scale, bias)


class Q3_K(BlockFormat, ggml_type=GGMLQuantizationType.Q3_K):
    group_size, code_min, code_max = 16, -4, 3

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        n = blocks.shape[0]
        hmask, qs, scales = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
        d = _f16(blocks[:, 108:110])
        lo = (scales[:, 0:8].reshape(n, 1, 8) >> _shifts((0, 4), (1, 2, 1), scales)).reshape(n, 16)
        hi = scales[:, 8:12].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), (1, 4, 1), scales)
        sc = (lo & 0x0F) | ((hi.reshape(n, 16) & 0x03) << 4)
        scale = d * _f32(sc.to(torch.int8) - 32)
        ql = (qs.reshape(n, -1, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qs)) & 0x03
        qh = _bits(hmask, 32) ^ 0x01  # the -4 offset applies where the mask bit is *clear*
        q = ql.reshape(n, QK_K).to(torch.int8) - (qh << 2).to(torch.int8)
        return Decoded(q, scale, None)


class Q4_K(BlockFormat, ggml_type=GGMLQuantizationType.Q4_K):
    group_size, code_min, code_max = 32, 0, 15

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _kquant_scale_min(blocks[:, 4:16])
        codes = _nibbles(blocks[:, 16:144], 32).to(torch.int8)
        return Decoded(codes, d * _f32(sc), -(dmin * _f32(mn)))


class Q5_K(BlockFormat, ggml_type=GGMLQuantizationType.Q5_K):
    group_size, code_min, code_max = 32, 0, 31

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _kquant_scale_min(blocks[:, 4:16])
        q = _nibbles(blocks[:, 48:176], 32) | (_bits(blocks[:, 16:48], 32) << 4)
        return Decoded(q.to(torch.int8), d * _f32(sc), -(dmin * _f32(mn)))


class Q6_K(BlockFormat, ggml_type=GGMLQuantizationType.Q6_K):
    group_size, code_min, code_max = 16, -32, 31

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        n = blocks.shape[0]
        ql, qh = blocks[:, 0:128], blocks[:, 128:192]
        scales = blocks[:, 192:208].contiguous().view(torch.int8)
        d = _f16(blocks[:, 208:210])
        lo = _nibbles(ql, 64)
        hi = (qh.reshape(n, -1, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qh)) & 0x03
        q = (lo | (hi.reshape(n, QK_K) << 4)).to(torch.int8) - 32
        return Decoded(q, d * _f32(scales), None)


# ------------------------------------------ codebook formats (a 4-bit index into 16 int8 values)
# The code is a table value, not the index: still ``w = code * scale`` per 32 weights, with codes
# spanning more than 16 values (kept as int8).

_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 values, doubled


def _table_codes(nibbles: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    table = torch.tensor(values, dtype=torch.int8, device=nibbles.device)
    return table[nibbles.long()]


class IQ4_NL(BlockFormat, ggml_type=GGMLQuantizationType.IQ4_NL):
    group_size, code_min, code_max = 32, -127, 113

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        return Decoded(_table_codes(_nibbles(blocks[:, 2:], 16), _IQ4_VALUES), _f16(blocks[:, 0:2]), None)


class IQ4_XS(BlockFormat, ggml_type=GGMLQuantizationType.IQ4_XS):
    """256 weights: float16 d, eight 6-bit scales (low 4 bits in 4 bytes, high 2 in a uint16),
    then 32-weight runs of IQ4_NL nibbles; w = d * (scale - 32) * value."""

    group_size, code_min, code_max = 32, -127, 113

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        n = blocks.shape[0]
        d = _f16(blocks[:, 0:2])
        high = blocks[:, 2:4].to(torch.int32)
        high = (high[:, 0] | (high[:, 1] << 8)).view(n, 1) >> (2 * torch.arange(8, device=blocks.device))
        low = blocks[:, 4:8].reshape(n, 4, 1) >> _shifts((0, 4), (1, 1, 2), blocks)
        sc = (low.reshape(n, 8) & 0x0F).to(torch.int32) | ((high & 0x03) << 4)
        codes = _table_codes(_nibbles(blocks[:, 8:], 16), _IQ4_VALUES)
        return Decoded(codes, d * _f32(sc - 32), None)


class MXFP4(BlockFormat, ggml_type=GGMLQuantizationType.MXFP4):
    """32 weights: an E8M0 exponent byte e and 16 bytes of E2M1 nibbles; w = 2^(e-128) * value
    (values doubled, so the scale is half the exponent's power of two, as ggml's
    e8m0_to_fp32_half: e < 2 gives the float32 subnormals 2^-128 and 2^-127)."""

    group_size, code_min, code_max = 32, -12, 12

    @classmethod
    def decode_blocks(cls, blocks: torch.Tensor) -> Decoded:
        e = blocks[:, 0:1].to(torch.int32)
        bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
        return Decoded(_table_codes(_nibbles(blocks[:, 1:], 16), MXFP4_VALUES), bits.view(torch.float32), None)


# ------------------------------------------------------------------------------ module API

SUPPORTED_TYPE_NAMES: tuple[str, ...] = tuple(t.name for t in FORMATS)


def type_name(ggml_type: GGMLQuantizationType | int) -> str:
    """Readable name of a GGML type id, also for ids this gguf version does not know."""
    try:
        return GGMLQuantizationType(int(ggml_type)).name
    except ValueError:
        return f"<unknown GGML type id {int(ggml_type)}>"


def get_format(
    ggml_type: GGMLQuantizationType | int, tensor_name: str | None = None
) -> type[BlockFormat]:
    """The registered format for ``ggml_type``, or a one-line :class:`UnsupportedQuantType`."""
    try:
        fmt = FORMATS.get(GGMLQuantizationType(int(ggml_type)))
    except ValueError:
        fmt = None
    if fmt is None:
        who = f"tensor {tensor_name!r}" if tensor_name else "tensor"
        raise UnsupportedQuantType(
            f"{who} uses GGML type {type_name(ggml_type)}, which gemmarun cannot decode; "
            f"supported types: {', '.join(SUPPORTED_TYPE_NAMES)}"
        )
    return fmt


def as_blocks(
    raw: torch.Tensor, fmt: type[BlockFormat], n_elements: int, tensor_name: str | None = None
) -> torch.Tensor:
    """View raw bytes (flat or ``[rows, bytes_per_row]``) as uint8 ``[n_blocks, type_size]``."""
    who = f"tensor {tensor_name!r}" if tensor_name else "tensor"
    if raw.dtype != torch.uint8:
        raise TypeError(f"{who}: raw data must be uint8, got {raw.dtype}")
    if n_elements % fmt.block_size:
        raise ValueError(
            f"{who}: {n_elements} elements is not a multiple of the "
            f"{fmt.ggml_type.name} block size {fmt.block_size}"
        )
    n_blocks = n_elements // fmt.block_size
    if raw.numel() != n_blocks * fmt.type_size:
        raise ValueError(
            f"{who}: expected {n_blocks * fmt.type_size} bytes of {fmt.ggml_type.name} data "
            f"for {n_elements} elements, got {raw.numel()}"
        )
    return raw.contiguous().view(n_blocks, fmt.type_size)


def dequantize(
    raw: torch.Tensor,
    ggml_type: GGMLQuantizationType | int,
    shape: Sequence[int],
    tensor_name: str | None = None,
) -> torch.Tensor:
    """Exact float32 tensor of ``shape`` from raw GGML bytes (chunked to bound temporaries).

    ``shape`` is in PyTorch/numpy order (last dim = ggml ``ne[0]``, the blocked one).
    """
    fmt = get_format(ggml_type, tensor_name)
    n_elements = math.prod(shape)
    blocks = as_blocks(raw, fmt, n_elements, tensor_name)
    out = torch.empty(blocks.shape[0], fmt.block_size, dtype=torch.float32, device=raw.device)
    step = max(1, _CHUNK_ELEMENTS // fmt.block_size)
    for start in range(0, blocks.shape[0], step):
        stop = start + step
        out[start:stop] = fmt.dequantize_blocks(blocks[start:stop])
    return out.view(*shape)
