"""Block decoding must be bit-exact with gguf-py's numpy reference for every supported type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from gemmarun.quant import (
    FORMATS,
    SUPPORTED_TYPE_NAMES,
    UnsupportedQuantType,
    dequantize,
    get_format,
)
from gemmarun.quant import formats as fm

# Byte offsets of the float16 fields (d, dmin, m) inside each block: random bytes there could
# be inf/NaN, which never compare equal; everything else in a block may be any byte.
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.MXFP4: (),  # MXFP4's exponent byte is finite whatever it holds
}
# Types gguf-py can quantize (the others are covered with random block bytes only).
QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4)
REQUIRED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def finite_f16(rng: np.random.Generator, n: int, scale: float | None) -> np.ndarray:
    """``n`` finite halves: scaled normals, or (``scale=None``) any finite bit pattern."""
    if scale is not None:
        return (rng.standard_normal(n) * scale).astype(np.float16)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent all ones (inf/NaN) -> finite
    return bits.view(np.float16)


def random_raw(
    rng: np.random.Generator, qtype: T, rows: int, cols: int, scale: float | None = 0.02
) -> np.ndarray:
    """Raw bytes ``[rows, bytes_per_row]`` of a valid tensor: random codes, finite scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    if qtype == T.F32:
        bits = rng.integers(0, 1 << 32, rows * cols, dtype=np.uint32)
        if scale is not None:
            bits = (rng.standard_normal(rows * cols) * scale).astype(np.float32).view(np.uint32)
        bits[(bits & 0x7F800000) == 0x7F800000] &= 0xBFFFFFFF
        return bits.view(np.uint8).reshape(rows, -1)
    if qtype == T.F16:
        return finite_f16(rng, rows * cols, scale).view(np.uint8).reshape(rows, -1)
    if qtype == T.BF16:
        bits = rng.integers(0, 1 << 16, rows * cols, dtype=np.uint16)
        if scale is not None:
            data = (rng.standard_normal(rows * cols) * scale).astype(np.float32)
            bits = gq.quantize(data, T.BF16).view(np.uint16)
        bits[(bits & 0x7F80) == 0x7F80] &= 0xBFFF
        return bits.view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = finite_f16(rng, n_blocks, scale).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return raw.view(np.float32)
    return gq.dequantize(raw, qtype)


def test_registry_covers_required_types():
    for name in REQUIRED:
        assert name in SUPPORTED_TYPE_NAMES
    for qtype, fmt in FORMATS.items():
        assert fmt.ggml_type == qtype
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]
        assert get_format(qtype) is fmt
        assert get_format(int(qtype)) is fmt
    assert tuple(t.name for t in FORMATS) == SUPPORTED_TYPE_NAMES


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [0.02, None], ids=["normal-scales", "any-finite-scales"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf-py on MXFP4's 2^127 scales
def test_random_blocks_bit_exact(qtype: T, scale: float | None):
    rng = np.random.default_rng(int(qtype) * 7 + (scale is None))
    rows, cols = 6, 512
    raw = random_raw(rng, qtype, rows, cols, scale)
    ref = reference(raw, qtype).reshape(rows, cols)
    # 2-D [rows, bytes_per_row] input
    out = dequantize(torch.from_numpy(raw), qtype, (rows, cols))
    assert out.dtype == torch.float32 and out.shape == (rows, cols)
    assert np.array_equal(out.numpy(), ref)
    # flat input, other shape, and the per-block entry point
    flat = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, (rows * cols,))
    assert np.array_equal(flat.numpy(), ref.reshape(-1))
    fmt = FORMATS[qtype]
    blocks = torch.from_numpy(raw.reshape(-1, fmt.type_size))
    per_block = fmt.dequantize_blocks(blocks)
    assert per_block.dtype == torch.float32
    assert per_block.shape == (rows * cols // fmt.block_size, fmt.block_size)
    assert np.array_equal(per_block.numpy().reshape(rows, cols), ref)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_data_bit_exact(qtype: T):
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3.0, (8, 1))).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block (scale 0)
    raw = np.ascontiguousarray(gq.quantize(data, qtype)).view(np.uint8).reshape(8, -1)
    out = dequantize(torch.from_numpy(raw), qtype, data.shape)
    ref = gq.dequantize(gq.quantize(data, qtype), qtype)
    assert np.array_equal(out.numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.F16], ids=lambda t: t.name)
def test_chunked_dequantize_matches(qtype: T, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(1)
    raw = random_raw(rng, qtype, 12, 768)
    monkeypatch.setattr(fm, "_CHUNK_ELEMENTS", 700)  # several uneven chunks
    out = dequantize(torch.from_numpy(raw), qtype, (12, 768))
    assert np.array_equal(out.numpy(), reference(raw, qtype).reshape(12, 768))


def test_decoded_codes_are_affine_and_in_range():
    rng = np.random.default_rng(2)
    for qtype, fmt in FORMATS.items():
        if fmt.is_float:
            continue
        raw = torch.from_numpy(random_raw(rng, qtype, 2, 512).reshape(-1, fmt.type_size))
        codes, scale, bias = fmt.decode_blocks(raw)
        assert codes.dtype == torch.int8 and codes.shape == (raw.shape[0], fmt.block_size)
        assert scale.dtype == torch.float32
        assert scale.shape == (raw.shape[0], fmt.block_size // fmt.group_size)
        assert int(codes.min()) >= fmt.code_min and int(codes.max()) <= fmt.code_max
        assert bias is None or bias.shape == scale.shape


def test_unsupported_type_message():
    with pytest.raises(UnsupportedQuantType) as info:
        dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (256,), "blk.3.ffn_up.weight")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    assert "blk.3.ffn_up.weight" in msg and "IQ2_XXS" in msg
    for name in REQUIRED:
        assert name in msg
    with pytest.raises(UnsupportedQuantType, match="9999"):
        get_format(9999, "x")
    with pytest.raises(UnsupportedQuantType, match="TQ1_0"):
        get_format(T.TQ1_0)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected 68 bytes"):
        dequantize(torch.zeros(67, dtype=torch.uint8), T.Q8_0, (64,), "w")
    with pytest.raises(ValueError, match="multiple"):
        dequantize(torch.zeros(34, dtype=torch.uint8), T.Q8_0, (33,), "w")
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(17, dtype=torch.int16), T.Q8_0, (32,), "w")


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_decoding_stays_on_the_input_device(qtype: T):
    """The meta device stands in for CUDA: a CPU tensor made while decoding would fail."""
    fmt = FORMATS[qtype]
    raw = torch.empty(2 * fmt.type_size * (256 // fmt.block_size), dtype=torch.uint8)
    out = dequantize(raw.to("meta"), qtype, (2, 256))
    assert out.device.type == "meta" and out.shape == (2, 256)
