"""QuantLinear / QuantEmbedding: weights stay quantized, results match the exact float path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from gemmarun.quant import FORMATS, QuantEmbedding, QuantLinear, UnsupportedQuantType
from gemmarun.quant import linear as ql
from test_quant_formats import QUANTIZABLE, random_raw, reference

ALL_TYPES = list(FORMATS)
# Fast path vs exact float32 matmul.  Tiles are bit-identical to the reference weights, so
# the only difference is GEMM summation order (measured: 0 to ~1e-8 on CPU).
FAST_PATH_RTOL = 1e-5


@pytest.fixture(autouse=True)
def portable_path(monkeypatch):
    """This file tests the portable path (tiles by the torch formula, torch's int4 kernel);
    decode-sized CPU matmuls and CPU tiles otherwise go to the native kernels, tested in
    test_native_kernels.py."""
    monkeypatch.setattr(ql, "native_group_gemv", lambda: None)
    monkeypatch.setattr(ql, "native_ops", lambda: None)  # tiles by the torch formula


def make_raw(qtype: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """Realistic weights via gguf-py's quantizer where it has one, random blocks otherwise."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        q = gq.quantize(w, qtype) if qtype != T.F32 else w
        return np.ascontiguousarray(q).view(np.uint8).reshape(rows, -1)
    return random_raw(rng, qtype, rows, cols, scale=0.01)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_linear_matches_exact_matmul(qtype: T):
    rows, cols = 40, 512
    raw = make_raw(qtype, rows, cols, seed=int(qtype))
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy())
    layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.float32)
    assert (layer.out_features, layer.in_features) == (rows, cols)
    assert torch.equal(layer.dequantize(), w_ref)  # bit-exact weights

    x = torch.randn(2, 3, cols, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    assert y.shape == (2, 3, rows) and y.dtype == torch.float32
    assert rel_err(y, x @ w_ref.T) < FAST_PATH_RTOL

    layer.reference = True
    assert torch.equal(layer(x), F.linear(x, w_ref))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_weights_stay_quantized(qtype: T):
    rows, cols = 16, 256
    layer = QuantLinear.from_raw(
        torch.from_numpy(make_raw(qtype, rows, cols, 3)), qtype, rows, cols, torch.float32
    )
    fmt = FORMATS[qtype]
    per_weight = layer.nbytes / (rows * cols)
    if fmt.is_float:
        assert layer.scale is None and per_weight == fmt.type_size
    else:
        assert layer.data.dtype in (torch.int8, torch.uint8)
        assert per_weight <= 1.25
        if fmt.code_max - fmt.code_min < 16:
            assert layer.data.shape == (rows, cols // 2)  # 4-bit codes stay 4-bit
        # no float buffer anywhere near the size of the weight matrix
        assert all(b.numel() <= rows * cols // 16 for b in layer.buffers() if b.is_floating_point())
    assert set(layer.state_dict()) <= {"data", "scale", "bias"}


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0, T.F16], ids=lambda t: t.name)
def test_many_uneven_tiles(qtype: T, monkeypatch: pytest.MonkeyPatch):
    rows, cols = 37, 256
    raw = make_raw(qtype, rows, cols, 5)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy())
    layer = QuantLinear.from_raw(torch.from_numpy(raw.reshape(-1)), qtype, rows, cols)
    monkeypatch.setattr(ql, "_TILE_ELEMENTS_CPU", 5 * cols)  # 8 tiles of <= 5 rows
    x = torch.randn(4, cols)
    assert rel_err(layer(x), x @ w_ref.T) < FAST_PATH_RTOL
    monkeypatch.setattr(ql, "_LOAD_CHUNK_ELEMENTS", 3 * cols)
    layer2 = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols)
    assert torch.equal(layer2.dequantize(), w_ref)


def test_reduced_precision_compute_and_io():
    rows, cols = 64, 256
    raw = make_raw(T.Q4_K, rows, cols, 7)
    w_ref = torch.from_numpy(reference(raw, T.Q4_K).reshape(rows, cols).copy())
    layer = QuantLinear.from_raw(torch.from_numpy(raw), T.Q4_K, rows, cols, torch.bfloat16)
    x = torch.randn(5, cols)
    y = layer(x)
    assert y.dtype == torch.float32 and rel_err(y, x @ w_ref.T) < 1e-2
    xb = x.to(torch.bfloat16)
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16 and rel_err(yb.float(), x @ w_ref.T) < 2e-2
    f32_layer = QuantLinear.from_raw(torch.from_numpy(raw), T.Q4_K, rows, cols, torch.float32)
    assert f32_layer(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_bf16_on_cpu_runs_4bit_formats_on_the_int4_kernel(qtype: T):
    """The int4 kernel reads the same codes: equal to the exact weights up to bfloat16 rounding
    of activations and group scales; a linear keeps only the packed layout, an embedding keeps
    its rows for lookups."""
    rows, cols = 96, 512
    raw = make_raw(qtype, rows, cols, 11)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy())
    x = torch.randn(4, cols, generator=torch.Generator().manual_seed(1))
    layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.bfloat16)
    tile_bytes = layer.nbytes
    y = layer(x)
    assert layer._int4 is not None and layer.data.numel() == 0 and layer.nbytes <= tile_bytes * 1.25
    assert y.dtype == torch.float32 and rel_err(y, x @ w_ref.T) < 1e-2
    assert rel_err(layer(x[:1]), x[:1] @ w_ref.T) < 1e-2  # the decode shape

    table = QuantEmbedding.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.bfloat16)
    assert rel_err(table.matmul_transposed(x), x @ w_ref.T) < 1e-2 and table._int4 is not None
    # rows are exact, rounded once to the compute dtype like a table stored in it
    assert torch.equal(table.lookup(torch.tensor([3, 7])), w_ref[[3, 7]].to(torch.bfloat16))


def test_bf16_weights_native_matmul():
    rows, cols = 24, 64
    raw = make_raw(T.BF16, rows, cols, 9)
    layer = QuantLinear.from_raw(torch.from_numpy(raw), T.BF16, rows, cols, torch.bfloat16)
    assert layer.data.dtype == torch.bfloat16
    x = torch.randn(3, cols, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.data))


def test_linear_errors():
    raw = torch.zeros(4 * 66, dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantType, match="blk.0.attn_q.weight"):
        QuantLinear.from_raw(raw, T.IQ2_XXS, 4, 256, tensor_name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="block size 256"):
        QuantLinear.from_raw(torch.zeros(144, dtype=torch.uint8), T.Q4_K, 2, 128)
    with pytest.raises(ValueError, match="expected"):
        QuantLinear.from_raw(torch.zeros(100, dtype=torch.uint8), T.Q8_0, 2, 64)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q4_K, T.Q5_0, T.F32], ids=lambda t: t.name)
def test_embedding_lookup_and_tied_head(qtype: T, monkeypatch: pytest.MonkeyPatch):
    vocab, dim = 300, 256
    raw = make_raw(qtype, vocab, dim, 11)
    table = torch.from_numpy(reference(raw, qtype).reshape(vocab, dim).copy())
    emb = QuantEmbedding.from_raw(torch.from_numpy(raw), qtype, vocab, dim)
    assert (emb.num_rows, emb.dim) == (vocab, dim)

    ids = torch.tensor([[0, 299, 5], [5, 17, 0]])
    rows = emb.lookup(ids)
    assert rows.shape == (2, 3, dim) and rows.dtype == torch.float32
    assert torch.equal(rows, table[ids])  # bit-exact rows
    assert torch.equal(emb(ids), rows)

    monkeypatch.setattr(ql, "_TILE_ELEMENTS_CPU", 64 * dim)  # 5 tiles
    x = torch.randn(2, 4, dim)
    logits = emb.matmul_transposed(x)
    assert logits.shape == (2, 4, vocab)
    assert rel_err(logits, x @ table.T) < FAST_PATH_RTOL


def test_device_moves_and_dtype_casts():
    rows, cols = 8, 256
    raw = torch.from_numpy(make_raw(T.Q4_K, rows, cols, 13))
    layer = QuantLinear.from_raw(raw, T.Q4_K, rows, cols)
    exact = layer.dequantize()
    layer.to(torch.bfloat16)  # a dtype cast keeps the exact float32 scales ...
    assert layer.compute_dtype == torch.bfloat16 and layer.scale.dtype == torch.float32
    assert torch.equal(layer.dequantize(), exact)
    layer.float()
    assert layer.compute_dtype == torch.float32
    # The meta device stands in for CUDA: any CPU-only tensor made in forward would fail.
    layer.to("meta")
    assert layer.data.device.type == "meta" and layer.scale.device.type == "meta"
    assert layer(torch.empty(3, cols, device="meta")).shape == (3, rows)
    emb = QuantEmbedding.from_raw(raw, T.Q4_K, rows, cols).to("meta")
    assert emb.lookup(torch.tensor([1, 2], device="meta")).shape == (2, cols)
    assert emb.matmul_transposed(torch.empty(2, cols, device="meta")).shape == (2, rows)


def test_workspace_made_under_inference_mode_serves_calls_outside_it():
    """Regression: the reused tile buffer was an inference tensor when first created inside
    torch.inference_mode, and every later call outside it failed writing into it."""
    import threading

    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from gemmarun.quant import QuantLinear

    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    raw = torch.from_numpy(quantize(w, GGMLQuantizationType.Q8_0))
    layer = QuantLinear.from_raw(raw, GGMLQuantizationType.Q8_0, 64, 96)
    x = torch.randn(3, 96)
    out = {}

    def run():  # a fresh thread has a fresh thread-local workspace
        with torch.inference_mode():
            out["inside"] = layer(x)
        out["outside"] = layer(x)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert torch.equal(out["inside"], out["outside"])


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_bf16_on_cpu_without_the_native_kernel_repacks_the_rest_dense(qtype: T):
    """5/6/8-bit codes (and float16) under bfloat16 compute and no native kernel: one bfloat16
    matrix (one rounding of the exact weights) instead of dequantizing tiles every token."""
    rows, cols = 64, 512
    raw = make_raw(qtype, rows, cols, 13)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy())
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(2))
    table = QuantEmbedding.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.bfloat16)
    y = table.matmul_transposed(x.to(torch.bfloat16))
    assert table._dense is not None and table.data.numel() == 0
    assert torch.equal(table._dense, w_ref.to(torch.bfloat16))
    assert rel_err(y.float(), x @ w_ref.T) < 1e-2
    ids = torch.tensor([0, 5, 63])
    assert torch.equal(table.lookup(ids), w_ref[ids].to(torch.bfloat16))
    assert torch.equal(table.dequantize(), w_ref.to(torch.bfloat16).float())
