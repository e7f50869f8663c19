"""The native CPU kernels (src/gemmarun/native): decode-shaped matmuls read the codes as stored and
match the exact float32 product within the int16 rounding of the activations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_quant_formats import reference
from test_quant_linear import make_raw, rel_err

from gemmarun.native import kernel_status, native_group_gemv
from gemmarun.quant import FORMATS, QuantEmbedding, QuantLinear
from gemmarun.quant import linear as ql
from gemmarun.quant.experts import FLOAT_BLOCK_TYPES, MAPPED_TYPES

QUANT_TYPES = [t for t, f in FORMATS.items() if not f.is_float]
IN_PLACE_TYPES = list(MAPPED_TYPES)  # the MoE experts' formats the block kernels read where they lie
# Activations are rounded to int16 per group of 16/32 (error <= 2^-16 of the group's largest
# value): measured 1e-5 to 3e-5 relative; the weights' own quantization error is ~1e-2.
NATIVE_RTOL = 1e-4

needs_kernel = pytest.mark.skipif(
    os.environ.get("GEMMARUN_NATIVE_KERNELS") == "0", reason="native kernels disabled by the environment")


def test_a_killed_builds_lock_file_does_not_stop_the_next_build(tmp_path, monkeypatch):
    """cpp_extension waits for as long as its `lock` file exists in the build folder: a build
    killed by a signal left one, and every later gemmarun process hung silently. Under the build
    flock nobody else builds, so the file is a leftover and goes."""
    import types

    from torch.utils import cpp_extension

    import gemmarun.native as native

    monkeypatch.delenv("GEMMARUN_NATIVE_KERNELS", raising=False)
    monkeypatch.setattr(native, "_CACHE", tmp_path)
    monkeypatch.setattr(native, "_state", {})
    build_dir, name = native._build_target()
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # what a build killed mid-way leaves
    built = types.ModuleType(name)

    def load(**kw):
        assert kw["build_directory"] == str(build_dir)
        if (build_dir / "lock").exists():  # where cpp_extension's FileBaton.wait() spins forever
            raise AssertionError("the build would wait on the leftover lock file")
        return built

    monkeypatch.setattr(cpp_extension, "load", load)
    assert native._build() is built
    assert native._state["status"] == f"built in {build_dir}"


@needs_kernel
def test_the_kernel_builds_here():
    """A C++ compiler is part of this project's toolchain (CI installs one): a build failure
    must fail loudly here, not quietly fall back to the slow path everywhere."""
    assert native_group_gemv() is not None, kernel_status()


@pytest.fixture
def tiles_forbidden(monkeypatch):
    """Fail if a matmul dequantizes tiles (so a test proves the native path ran)."""
    def no_tiles(*_a, **_k):
        raise AssertionError("the tile path ran")
    monkeypatch.setattr(ql._QuantMatrix, "_rows", no_tiles)


@needs_kernel
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, ql.NATIVE_MAX_ROWS])
def test_native_matches_exact_matmul(qtype: T, batch: int, tiles_forbidden):
    rows, cols = 72, 512
    raw = make_raw(qtype, rows, cols, seed=int(qtype) + batch)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy())
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.float32)
    y = layer(x)
    assert y.shape == (batch, rows) and y.dtype == torch.float32
    assert rel_err(y, x.double() @ w_ref.double().T) < NATIVE_RTOL


@needs_kernel
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q8_0, T.Q3_K], ids=lambda t: t.name)
def test_native_shapes_off_the_vector_width(qtype: T, tiles_forbidden):
    """Rows of 3 x 32 codes (nibble halves not group-aligned: the scalar loop) and 6 x 32 (halves
    of an odd number of groups: one group a step, not two), a single row, a row count that does
    not split evenly over threads."""
    shapes = [(rows, cols) for rows in (1, 7, 1001)
              for cols in ((768,) if FORMATS[qtype].block_size == 256 else (96, 192))]
    for rows, cols in shapes:
        raw = make_raw(qtype, rows, cols, seed=rows)
        w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy()).double()
        layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.float32)
        x = torch.randn(2, cols, generator=torch.Generator().manual_seed(rows))
        assert rel_err(layer(x), x.double() @ w_ref.T) < NATIVE_RTOL


@needs_kernel
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_native_tiles_are_bit_identical_to_the_reference(qtype: T, monkeypatch):
    """Prefill's tiles (dequant.cpp): the exact float32 weights, as gguf-py and the torch formula
    make them, for whole matrices, uneven row counts and gathered rows."""
    for rows, cols in ((37, 512), (3, 256)):
        raw = make_raw(qtype, rows, cols, seed=rows + int(qtype))
        w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy())
        layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.float32)
        calls = []
        real = ql.native_ops
        monkeypatch.setattr(ql, "native_ops", lambda: calls.append(1) or real())
        assert torch.equal(layer.dequantize(), w_ref)
        ids = torch.tensor([[rows - 1, 0], [1, 1]])
        assert torch.equal(layer.gather(ids), w_ref[ids])
        assert calls, "the native tile path did not run"
        monkeypatch.setattr(ql, "native_ops", lambda: None)  # the torch formula, for comparison
        assert torch.equal(layer.dequantize(), w_ref)


@needs_kernel
def test_native_tile_errors_are_one_line():
    ops = ql.native_ops()
    codes = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="codes do not match out"):
        ops.dequantize_tile(codes, torch.ones(4, 2), None, 32, 0, False, torch.empty(4, 32))
    with pytest.raises(RuntimeError, match="group size 8 is not 16 or 32"):
        ops.dequantize_tile(codes, torch.ones(4, 8), None, 8, 0, False, torch.empty(4, 64))


@needs_kernel
def test_native_edge_values(tiles_forbidden):
    """All-zero activation groups (scale 0), extreme codes, huge and tiny activations."""
    rows, cols = 64, 256
    raw = make_raw(T.Q8_0, rows, cols, seed=5)
    w_ref = torch.from_numpy(reference(raw, T.Q8_0).reshape(rows, cols).copy()).double()
    layer = QuantLinear.from_raw(torch.from_numpy(raw), T.Q8_0, rows, cols, torch.float32)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(0))
    x[0, :64] = 0
    x[1] *= 1e6
    x[2] *= 1e-6
    y = layer(x)
    for i in range(3):
        assert rel_err(y[i], x[i].double() @ w_ref.T) < NATIVE_RTOL
    assert torch.equal(layer(torch.zeros(1, cols)), torch.zeros(1, rows))


def _faulty_activations(cols: int) -> torch.Tensor:
    """Rows: a NaN, an inf, a -inf in one group each; then a group of values near 1e-36 (whose
    rounding scale overflows a float) beside ordinary ones, and all values near 1e-36."""
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(3))
    x[0, 40], x[1, 7], x[2, cols - 1] = float("nan"), float("inf"), float("-inf")
    x[3, :32] *= 1e-36
    x[4] *= 1e-36
    return x


@needs_kernel
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_nan_and_inf_activations_stay_non_finite(qtype: T, tiles_forbidden):
    """A NaN or inf in the input made finite, plausible outputs (NaN, left out of the group's
    maximum, rounded to an ordinary code): a fault upstream then went unseen. Now every output it
    enters is NaN (the exact one is NaN or infinite); tiny groups stay exact for their rounding."""
    rows, cols = 16, 256
    raw = make_raw(qtype, rows, cols, seed=int(qtype) + 31)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy()).double()
    layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.float32)
    x = _faulty_activations(cols)
    y = layer(x)
    exact = x.double() @ w_ref.T
    assert not torch.isfinite(exact[:3]).any()
    assert torch.isnan(y[:3]).all()
    assert rel_err(y[3], exact[3]) < NATIVE_RTOL
    assert rel_err(y[4], exact[4]) < 1e-2  # outputs near 1e-36: float32 subnormals keep ~16 bits


@needs_kernel
@pytest.mark.parametrize("qtype", IN_PLACE_TYPES, ids=lambda t: t.name)
def test_nan_and_inf_activations_stay_non_finite_in_place(qtype: T):
    from gemmarun.native import native_block_gemv

    rows, cols = 16, 256
    raw = make_raw(qtype, rows, cols, seed=int(qtype) + 37)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy()).double()
    x = _faulty_activations(cols)
    for int8 in (False, True):
        y = native_block_gemv()(x, torch.from_numpy(raw), int(qtype), int8).double()
        assert torch.isnan(y[:3]).all()
        exact = x.double() @ w_ref.T
        assert rel_err(y[3], exact[3]) < (1e-2 if int8 else NATIVE_RTOL)
        assert rel_err(y[4], exact[4]) < 1e-2  # outputs near 1e-36: float32 subnormals keep ~16 bits


@needs_kernel
def test_bfloat16_decode_reads_codes_and_lookups_round_once(tiles_forbidden):
    """bfloat16 compute: decode goes through the kernel (codes kept, nothing repacked) and a
    table's rows come back rounded once to bfloat16."""
    rows, cols = 96, 512
    raw = make_raw(T.Q8_0, rows, cols, 2)
    w_ref = torch.from_numpy(reference(raw, T.Q8_0).reshape(rows, cols).copy())
    table = QuantEmbedding.from_raw(torch.from_numpy(raw), T.Q8_0, rows, cols, torch.bfloat16)
    x = torch.randn(1, cols, dtype=torch.bfloat16)
    y = table.matmul_transposed(x)
    assert y.dtype == torch.bfloat16 and table._dense is None and table._int4 is None
    assert rel_err(y.float(), x.double() @ w_ref.double().T) < 1e-2
    ids = torch.tensor([3, 7])
    assert torch.equal(table.lookup(ids), w_ref[ids].to(torch.bfloat16))  # gathered rows only


def test_without_the_kernel_results_are_the_exact_tiles(monkeypatch):
    """No compiler: the portable tile path, bit-identical weights, GEMM summation order only."""
    monkeypatch.setattr(ql, "native_group_gemv", lambda: None)
    rows, cols = 40, 512
    raw = make_raw(T.Q6_K, rows, cols, 1)
    w_ref = torch.from_numpy(reference(raw, T.Q6_K).reshape(rows, cols).copy())
    layer = QuantLinear.from_raw(torch.from_numpy(raw), T.Q6_K, rows, cols, torch.float32)
    x = torch.randn(1, cols)
    assert rel_err(layer(x), x @ w_ref.T) < 1e-6


def test_large_batches_take_the_tiles(monkeypatch):
    """Prefill-sized batches are compute-bound: tiles + GEMM, exact up to summation order."""
    calls = []
    real = ql._QuantMatrix._rows
    monkeypatch.setattr(ql._QuantMatrix, "_rows", lambda self, *a: calls.append(1) or real(self, *a))
    rows, cols = 40, 256
    raw = make_raw(T.Q8_0, rows, cols, 4)
    w_ref = torch.from_numpy(reference(raw, T.Q8_0).reshape(rows, cols).copy())
    layer = QuantLinear.from_raw(torch.from_numpy(raw), T.Q8_0, rows, cols, torch.float32)
    x = torch.randn(ql.NATIVE_MAX_ROWS + 1, cols)
    assert rel_err(layer(x), x @ w_ref.T) < 1e-6 and calls


def _rounded_like_the_kernel(x: torch.Tensor, group: int, qmax: int) -> torch.Tensor:
    """x rounded per group as the kernel does (max |x| -> qmax), in float64."""
    g = x.double().view(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, (qmax / amax.float()).double(), torch.zeros_like(amax))
    return (torch.round((g.float() * inv.float()).double()) * (amax.float() / qmax).double()).view_as(x)


@needs_kernel
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("int8_activations", [False, True], ids=["int16", "int8"])
def test_kernel_is_exact_for_its_rounded_activations(qtype: T, int8_activations: bool):
    """Against the exact weights times the activations rounded the kernel's way, the kernel
    differs only by float32 summation order: catches any indexing or scale mistake that the
    looser end-to-end tolerances could hide."""
    fmt = FORMATS[qtype]
    rows, cols = 48, 512
    raw = make_raw(qtype, rows, cols, seed=int(qtype) + 100)
    layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.float32)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy()).double()
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(7))
    nib_q8_ok = not layer.nibbles or fmt.group_size == 32
    qmax = 127 if int8_activations and nib_q8_ok else 32767
    gemv = native_group_gemv()
    y = gemv(x, layer.data, layer.scale, layer.bias, layer.group_size, float(layer.code_min),
             layer.nibbles, int8_activations).double()
    expected = _rounded_like_the_kernel(x, fmt.group_size, qmax) @ w_ref.T
    assert rel_err(y, expected) < 1e-6


@needs_kernel
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q5_1, T.Q4_K], ids=lambda t: t.name)
def test_each_activation_row_gets_the_same_bits_as_alone(qtype: T):
    """Several activation rows (batched decode, speculative verification) share each pass over the
    codes, eight, four or two at a time: every output row is still the bits that row gets alone,
    whatever the batch size and the row's place in it."""
    rows, cols = 40, 512
    layer = QuantLinear.from_raw(torch.from_numpy(make_raw(qtype, rows, cols, 9)), qtype, rows, cols)
    gemv = native_group_gemv()
    args = (layer.data, layer.scale, layer.bias, layer.group_size, float(layer.code_min), layer.nibbles, False)
    x = torch.randn(16, cols, generator=torch.Generator().manual_seed(4))
    alone = torch.cat([gemv(x[i : i + 1], *args) for i in range(16)])
    for m in (2, 3, 4, 7, 8, 11, 16):
        assert torch.equal(gemv(x[:m], *args), alone[:m]), m


@needs_kernel
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q8_0, T.Q6_K, T.Q5_0], ids=lambda t: t.name)
def test_bfloat16_decode_within_bfloat16_tolerance(qtype: T, tiles_forbidden):
    rows, cols = 64, 512
    raw = make_raw(qtype, rows, cols, 21)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy()).double()
    layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, rows, cols, torch.bfloat16)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), x.double() @ w_ref.T) < 2e-2


@needs_kernel
@pytest.mark.parametrize("qtype", IN_PLACE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("int8_activations", [False, True], ids=["int16", "int8"])
def test_blocks_read_in_place_are_exact_for_their_rounded_activations(qtype: T, int8_activations: bool):
    """GGUF block rows read as they lie in the file (the mapped MoE experts' path). The K-quant
    rows (and Q5_0's) take int16 activations whatever is asked."""
    from gemmarun.native import native_block_gemv

    rows, cols = 40, 768
    raw = make_raw(qtype, rows, cols, seed=int(qtype) + 7)
    w_ref = torch.from_numpy(reference(raw, qtype).reshape(rows, cols).copy()).double()
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(11))
    y = native_block_gemv()(x, torch.from_numpy(raw), int(qtype), int8_activations).double()
    int8 = int8_activations and qtype in (T.Q4_0, T.Q8_0)
    expected = _rounded_like_the_kernel(x, 32, 127 if int8 else 32767) @ w_ref.T
    assert rel_err(y, expected) < 1e-6
    # a row slice of a bigger tensor (one expert of many) reads only its rows
    y_part = native_block_gemv()(x, torch.from_numpy(raw)[8:24], int(qtype), int8_activations).double()
    assert torch.allclose(y_part, y[:, 8:24], rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("qtype", IN_PLACE_TYPES, ids=lambda t: t.name)
def test_block_rows_get_the_bits_they_get_alone(qtype: T):
    """block_gemv with several activation rows (a batch, a speculative verification, a short
    prefill's tokens routed to one expert) gives each row the bits of a decode step's one row:
    two rows to a register, an odd last row, groups of 16."""
    from gemmarun.native import native_block_gemv

    gemv = native_block_gemv()
    rows, cols = 40, 512
    raw = torch.from_numpy(make_raw(qtype, rows, cols, seed=int(qtype) + 13))
    x = torch.randn(20, cols, generator=torch.Generator().manual_seed(8))
    alone = torch.cat([gemv(x[i : i + 1], raw, int(qtype), False) for i in range(20)])
    for m in (2, 3, 4, 7, 16, 17, 20):
        assert torch.equal(gemv(x[:m], raw, int(qtype), False), alone[:m]), m
    assert torch.equal(gemv(x[3:12], raw, int(qtype), False), alone[3:12])


@needs_kernel
@pytest.mark.parametrize("qtype", FLOAT_BLOCK_TYPES, ids=lambda t: t.name)
def test_blocks_dequantized_in_registers_take_the_activations_as_they_are(qtype: T):
    """block_gemm (MoE prefill): float32 weights made from each block, float32 activations
    unrounded, so the result is x @ W.T up to float32 summation; every activation row gets the
    same bits in any batch (its chain of FMAs does not depend on the tile it falls in)."""
    from gemmarun.native import native_block_gemm

    gemm = native_block_gemm()
    rows, cols = 37, 768  # rows: not a multiple of any weight-row tile
    raw = torch.from_numpy(make_raw(qtype, rows, cols, seed=int(qtype) + 3))
    w_ref = torch.from_numpy(reference(raw.numpy(), qtype).reshape(rows, cols).copy()).double()
    x = torch.randn(19, cols, generator=torch.Generator().manual_seed(12))
    y = gemm(x, raw, int(qtype))
    assert rel_err(y.double(), x.double() @ w_ref.T) < 1e-6
    for m in (1, 2, 3, 8, 13):  # tiles of 8, 4, 2 and 1 activation rows
        assert torch.equal(gemm(x[:m], raw, int(qtype)), y[:m]), m
    assert torch.equal(gemm(x[5:6], raw, int(qtype)), y[5:6])
    # one expert of many: a row slice reads its own rows only
    assert torch.equal(gemm(x, raw[8:24], int(qtype)), y[:, 8:24])
    with pytest.raises(RuntimeError, match="Q4_0, Q8_0, Q5_0, IQ4_NL and MXFP4"):
        gemm(x[:, :256], torch.zeros(2, 144, dtype=torch.uint8), int(T.Q4_K))
    with pytest.raises(RuntimeError, match="do not match"):
        gemm(x, raw[:, :-1], int(qtype))


@needs_kernel
def test_block_kernel_rejects_what_it_cannot_read():
    from gemmarun.native import native_block_gemv

    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="Q4_0, Q8_0, Q5_0, IQ4_NL, MXFP4, Q4_K, Q6_K and IQ4_XS"):
        native_block_gemv()(x, torch.zeros(2, 36, dtype=torch.uint8), int(T.Q4_1), False)
    with pytest.raises(RuntimeError, match="do not match"):
        native_block_gemv()(x, torch.zeros(2, 35, dtype=torch.uint8), int(T.Q4_0), False)
    with pytest.raises(RuntimeError, match="do not match"):  # K-quant rows come in 256s
        native_block_gemv()(x, torch.zeros(2, 36, dtype=torch.uint8), int(T.Q4_K), False)
    with pytest.raises(RuntimeError, match="CPU tensors only"):  # never a device pointer read on the CPU
        native_block_gemv()(x.to("meta"), torch.zeros(2, 36, dtype=torch.uint8), int(T.Q4_0), False)


# ---- decode_ops.cpp: the model's small float32 operations, against their torch formulas ---------

from gemmarun.config import RopeConfig
from gemmarun.masks import visible
from gemmarun.model import attention as attention_module
from gemmarun.model import layers
from gemmarun.native import native_ops


@pytest.fixture
def torch_formulas(monkeypatch):
    """Calls the model's functions with the native module hidden: their torch formulas."""
    def without_native(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(layers, "native_ops", lambda: None)
            m.setattr(attention_module, "native_ops", lambda: None)
            return fn(*args)
    return without_native


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 640), (2, 3, 4, 256), (5, 7), (3, 1, 1)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_its_formula(shape, with_weight, torch_formulas):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g) if with_weight else None
    got = layers.rms_norm(x, w, 1e-6)
    want = torch_formulas(layers.rms_norm, x, w, 1e-6)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    # a non-contiguous view (a transposed head layout) gives the same values
    xt = x.transpose(0, -1)
    if xt.shape[-1] == shape[-1] or w is None:
        torch.testing.assert_close(layers.rms_norm(xt, None, 1e-6), torch_formulas(layers.rms_norm, xt, None, 1e-6),
                                   rtol=2e-6, atol=1e-6)


@needs_kernel
def test_rms_norm_leaves_other_dtypes_to_torch():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = layers.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    assert y.dtype == torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("layout", ["decode", "prefill", "batched rows", "cache keys", "sliced"])
def test_rope_matches_its_formula(layout, torch_formulas):
    g = torch.Generator().manual_seed(1)
    D = 16
    if layout == "decode":  # (B, H, T, D) transposed from (B, T, H, D), cos (T, D)
        x, cos_shape = torch.randn(1, 1, 4, D, generator=g).transpose(1, 2), (1, D)
    elif layout == "prefill":
        x, cos_shape = torch.randn(2, 5, 3, D, generator=g).transpose(1, 2), (5, D)
    elif layout == "batched rows":  # one position per row: cos (B, 1, 1, D)
        x, cos_shape = torch.randn(3, 2, 1, D, generator=g), (3, 1, 1, D)
    elif layout == "cache keys":  # K=V keys rebuilt over a strided cache slice
        x, cos_shape = torch.randn(1, 2, 9, D, generator=g)[:, :, :6], (6, D)
    else:  # vision's 2D RoPE rotates each half of a head on its own
        x, cos_shape = torch.randn(2, 3, 7, 2 * D, generator=g)[..., :D], (7, D)
    angles = torch.rand(cos_shape, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    got = layers.apply_rope(x, cos, sin)
    want = torch_formulas(layers.apply_rope, x, cos, sin)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_rope_with_cos_rows_the_kernel_cannot_read_takes_the_formula(torch_formulas):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 3, 8, generator=g)
    angles = torch.rand(3, 16, generator=g)
    cos, sin = angles.cos()[:, ::2], angles.sin()[:, ::2]  # every other column: not row-contiguous
    got = layers.apply_rope(x, cos, sin)
    torch.testing.assert_close(got, torch_formulas(layers.apply_rope, x, cos, sin), rtol=0, atol=0)
    native = layers.apply_rope(x, cos.contiguous(), sin.contiguous())
    torch.testing.assert_close(got, native, rtol=1e-6, atol=1e-6)


def _cache(g, kv, slots, D, strided):
    k = torch.randn(1, kv, slots + (5 if strided else 0), D, generator=g)
    v = torch.randn(1, kv, slots + (5 if strided else 0), D, generator=g)
    return (k[:, :, :slots], v[:, :, :slots]) if strided else (k, v)


def _bare_attention(window, cap):
    """An Attention with only what _attend_one and _attend read: window, scale, soft-cap."""
    attn = attention_module.Attention.__new__(attention_module.Attention)
    torch.nn.Module.__init__(attn)
    attn.spec, attn.scale, attn.logit_softcap = type("Spec", (), {"window": window})(), 0.125, cap
    return attn


@needs_kernel
@pytest.mark.parametrize("heads,kv", [(4, 1), (8, 2), (3, 3)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("strided", [False, True])
def test_one_query_attention_matches_its_formula(heads, kv, window, cap, strided, torch_formulas):
    g = torch.Generator().manual_seed(2)
    D, slots, position = 32, 12, 9
    keys, values = _cache(g, kv, slots, D, strided)
    # a ring buffer's positions: empty slots (-1), a future one (a rejected draft's), an old one
    key_pos = torch.tensor([0, 1, 2, 3, -1, 5, 6, 7, 8, 9, 11, -1])
    q = torch.randn(1, heads, 1, D, generator=g)
    attn = _bare_attention(window, cap)
    got = attn._attend_one(q, keys, values, key_pos, position)
    want = torch_formulas(attn._attend_one, q, keys, values, key_pos, position)
    # and the general (masked SDPA / eager) path agrees with both
    mask = visible(torch.tensor([position]), key_pos, window)
    general = torch_formulas(attn._attend, q, keys, values, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, general, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("heads,kv", [(4, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("window", [None, 512])
@pytest.mark.parametrize("D", [64, 256])  # 256: the values accumulate in registers, 128 floats a pass
def test_one_query_attention_over_a_long_cache_matches_its_formula(heads, kv, window, D, torch_formulas):
    """Long caches are split into chunks whose partial softmaxes are merged: a sliding ring with
    empty slots and a rejected draft's position, a full cache, the query's own key in any chunk."""
    g = torch.Generator().manual_seed(3)
    slots, position = 700, 650
    keys, values = _cache(g, kv, slots, D, strided=True)
    key_pos = torch.arange(slots)
    key_pos[[5, 300, 699]] = -1
    key_pos[10] = position + 3
    q = torch.randn(1, heads, 1, D, generator=g)
    attn = _bare_attention(window, None)
    got = attn._attend_one(q, keys, values, key_pos, position)
    want = torch_formulas(attn._attend_one, q, keys, values, key_pos, position)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _values_as_keys_attention(window, cap, key_weight):
    """A bare Attention of a K=V layer: what _attend_one_values_as_keys and keys_from_values read."""
    attn = _bare_attention(window, cap)
    attn.k_norm = torch.nn.Module()
    attn.k_norm.weight = torch.nn.Parameter(key_weight, requires_grad=False)
    return attn


@needs_kernel
@pytest.mark.parametrize("heads,kv", [(4, 1), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("rotated_fraction", [0.25, 1.0])  # Gemma 4's p-RoPE on full layers; all pairs
@pytest.mark.parametrize("slots,D", [(12, 32), (700, 256)])
def test_one_query_attention_of_a_k_eq_v_layer_makes_its_keys_from_the_values(
        heads, kv, window, cap, rotated_fraction, slots, D, torch_formulas):
    """The kernel makes each key row from its value row; the same attention as materializing the
    keys with the torch formula first (empty slots, a rejected draft's position, long caches)."""
    g = torch.Generator().manual_seed(5)
    position = slots - 3
    _, values = _cache(g, kv, slots, D, strided=True)
    key_pos = torch.arange(slots)
    key_pos[[1, slots - 1]] = -1
    key_pos[slots - 2] = position + 1
    q = torch.randn(1, heads, 1, D, generator=g)
    rotary = layers.RotaryTable(RopeConfig(theta=10000.0, rotated_fraction=rotated_fraction).inv_freq(D))
    attn = _values_as_keys_attention(window, cap, 1 + 0.3 * torch.randn(D, generator=g))
    got = attn._attend_one_values_as_keys(q, values, key_pos, rotary, position)
    keys = torch_formulas(attn.keys_from_values, values, key_pos, rotary)
    want = torch_formulas(attn._attend_one, q, keys, values, key_pos, position)
    # Both sum 700 keys in their own order: ~1e-6 apart near outputs of 2.5 on an AMD Zen 4 (each as far
    # from the float64 result), so the absolute tolerance follows the outputs' scale.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item())


def test_rotating_rows_are_the_rotary_tables_rotating_columns():
    inv_freq = RopeConfig(theta=1e6, rotated_fraction=0.25).inv_freq(512)
    rotary = layers.RotaryTable(inv_freq)
    cos, sin = rotary.rotating(300)
    assert cos.shape[0] >= 300 and cos.shape[1] == 64 == int((inv_freq != 0).sum())
    full_cos, full_sin = rotary(torch.arange(cos.shape[0]), torch.float32)
    torch.testing.assert_close(cos, full_cos[:, :64], rtol=0, atol=0)
    torch.testing.assert_close(sin, full_sin[:, :64], rtol=0, atol=0)
    assert torch.equal(full_cos[:, 64:256], torch.ones(cos.shape[0], 192))  # the rest does not rotate
    assert rotary.rotating(10)[0] is cos  # kept
    longer = rotary.rotating(cos.shape[0] + 1)[0]
    assert longer.shape[0] >= 2 * cos.shape[0]
    torch.testing.assert_close(longer[: cos.shape[0]], cos, rtol=0, atol=0)


@needs_kernel
def test_decode_ops_reject_what_they_cannot_read():
    ops = native_ops()
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(torch.ones(4, dtype=torch.float64), None, 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(3), 1e-6)
    with pytest.raises(RuntimeError, match="key_positions"):
        ops.attend_one(torch.ones(2, 8), torch.ones(1, 3, 8), torch.ones(1, 3, 8), torch.arange(4), 2, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="head"):
        ops.attend_one(torch.ones(3, 8), torch.ones(2, 3, 8), torch.ones(2, 3, 8), torch.arange(3), 2, 0, 1.0, 0.0)
    table = torch.ones(2, 2)  # positions 0 and 1 only
    with pytest.raises(RuntimeError, match="table ends before position 2"):
        ops.attend_one_values_as_keys(torch.ones(2, 8), torch.ones(1, 3, 8), torch.ones(8), table, table,
                                      torch.arange(3), 2, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="r <= D/2"):
        ops.attend_one_values_as_keys(torch.ones(2, 8), torch.ones(1, 3, 8), torch.ones(8), torch.ones(4, 5),
                                      torch.ones(4, 5), torch.arange(3), 2, 0, 1.0, 0.0)


@needs_kernel
def test_argmax_is_torchs_argmax():
    """First index of the largest value; NaN counts as the largest (first NaN wins), as in torch."""
    from gemmarun.sampling import greedy_token

    ops = native_ops()
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 33, 262144):
        x = torch.randn(n, generator=g)
        assert ops.argmax(x) == int(torch.argmax(x)) == greedy_token(x)
    for _ in range(500):  # ties, infinities and NaNs at every place
        n = int(torch.randint(1, 40, (), generator=g))
        x = torch.randint(-2, 3, (n,), generator=g).float()
        r = torch.rand(n, generator=g)
        x[r < 0.05] = float("nan")
        x[(r > 0.9) & (r < 0.95)] = float("-inf")
        x[r > 0.97] = float("inf")
        assert ops.argmax(x) == int(torch.argmax(x)), x
    assert ops.argmax(torch.full((20,), float("-inf"))) == 0
    assert ops.argmax(torch.arange(10.0).flip(0)[::2]) == 0  # strided
    with pytest.raises(RuntimeError, match="empty"):
        ops.argmax(torch.ones(0))
    assert greedy_token(torch.tensor([1.0, 3.0, 3.0], dtype=torch.float64)) == 1  # torch's, other dtypes


@needs_kernel
def test_a_quantized_matrix_with_its_kernel_bound_pickles_and_copies(tmp_path):
    """The kernel closure binds the module's buffers; a copy or a saved module makes its own."""
    import copy

    raw = make_raw(T.Q8_0, 32, 64, 5)
    layer = QuantLinear.from_raw(torch.from_numpy(raw), T.Q8_0, 32, 64, torch.float32)
    x = torch.randn(1, 64)
    y = layer(x)
    assert layer._native is not None
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    twin = copy.deepcopy(layer)
    twin.data.zero_()  # the copy's own codes, not the original's
    assert torch.equal(loaded(x), y) and torch.equal(layer(x), y)
    assert not torch.equal(twin(x), y)


def test_every_in_place_format_has_a_row_limit_that_keeps_decode_bits():
    from gemmarun.quant.experts import IN_PLACE_MAX_ROWS
    from gemmarun.quant.linear import NATIVE_MAX_ROWS

    assert set(IN_PLACE_MAX_ROWS) == set(MAPPED_TYPES)
    assert min(IN_PLACE_MAX_ROWS.values()) >= NATIVE_MAX_ROWS


@needs_kernel
@pytest.mark.parametrize("qtype", IN_PLACE_TYPES, ids=lambda t: t.name)
def test_moe_experts_read_in_place_match_repacked_experts(qtype: T):
    """QuantExperts keeps mapped blocks of these types where they lie and gives what repacked
    experts give (the model-level check with GGUF files covers Q4_0/Q8_0/MXFP4: gguf-py cannot
    write K-quants or IQ4)."""
    from gemmarun.loading.build import QuantizedTensor
    from gemmarun.native import native_block_gemm, native_block_gemv
    from gemmarun.quant.experts import FLOAT_BLOCK_MAX_ROWS, IN_PLACE_MAX_ROWS, QuantExperts
    from gemmarun.quant.linear import NATIVE_MAX_ROWS

    E, out_f, in_f = 3, 16, 512
    raw = torch.from_numpy(make_raw(qtype, E * out_f, in_f, seed=int(qtype) + 31))
    q = QuantizedTensor(raw, qtype, (E, out_f, in_f), mapped=True)
    in_place, repacked = QuantExperts(E, torch.float32), QuantExperts(E, torch.float32)
    assert in_place.set_weight("down_proj", q, keep_mapped=True)
    assert not repacked.set_weight("down_proj", q, keep_mapped=False)
    assert "down_proj" in in_place.mapped and len(repacked.down) == E
    x = torch.randn(2, in_f, generator=torch.Generator().manual_seed(5))
    for e in range(E):
        a, b = in_place._project("down_proj", e, x), repacked._project("down_proj", e, x)
        assert rel_err(a, b) < 1e-4
    # the 32 rows a 512-token prefill chunk routes to one of 128 experts on average (top 8): in place,
    # 32-weight blocks dequantized in registers, 256-weight ones (K-quants, IQ4_XS) with int16 activations
    chunk = torch.randn(32, in_f, generator=torch.Generator().manual_seed(6))
    blocks = raw.view(E * out_f, -1)[out_f : 2 * out_f]
    in_registers = qtype in FLOAT_BLOCK_TYPES
    kernel = native_block_gemm() if in_registers else native_block_gemv()
    expected = kernel(chunk, blocks, int(qtype)) if in_registers else kernel(chunk, blocks, int(qtype), False)
    assert torch.equal(in_place._project("down_proj", 1, chunk), expected)
    # up to NATIVE_MAX_ROWS rows: the bits each row gets alone (decode, a batch, a verification)
    few = chunk[:NATIVE_MAX_ROWS]
    alone = torch.cat([in_place._project("down_proj", 1, few[i : i + 1]) for i in range(NATIVE_MAX_ROWS)])
    assert torch.equal(in_place._project("down_proj", 1, few), alone)
    # more: this expert dequantized once, exactly
    w = torch.from_numpy(reference(raw.numpy(), qtype).reshape(E, out_f, in_f).copy())
    big = torch.randn((FLOAT_BLOCK_MAX_ROWS if in_registers else IN_PLACE_MAX_ROWS[qtype]) + 1, in_f)
    assert torch.equal(in_place._project("down_proj", 1, big), big @ w[1].T)


def _linears(types, cols=512, rows=(64, 16, 16), seed=0):
    layers = []
    for i, (qtype, r) in enumerate(zip(types, rows)):
        raw = make_raw(qtype, r, cols, seed=seed + i)
        layers.append(QuantLinear.from_raw(torch.from_numpy(raw), qtype, r, cols, torch.float32))
    return layers


@needs_kernel
def test_stacked_projections_give_the_same_bits_in_one_call(monkeypatch):
    """q/k/v-like siblings (Q5_0, Q5_0, Q8_0: the same repacked layout) stack into one matrix whose
    views they become: no extra memory, and each output row is the same computation as alone."""
    q, k, v = _linears([T.Q5_0, T.Q5_0, T.Q8_0])
    x = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(3))
    alone = [m(x) for m in (q, k, v)]
    held = sum(m.nbytes for m in (q, k, v))
    stack = ql.stack_rows([q, k, v])
    assert stack is not None and stack.sizes == (64, 16, 16)
    assert stack.matrix.nbytes == held  # the members' buffers are views of the stacked ones
    assert q.data.untyped_storage().data_ptr() == stack.matrix.data.untyped_storage().data_ptr()
    calls = []
    real = stack.matrix.forward
    monkeypatch.setattr(stack.matrix, "forward", lambda t: calls.append(1) or real(t))
    together = ql.project(x, q, k, v)
    assert len(calls) == 1
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    # a different selection or order is not the stack: one call each, same results
    assert all(torch.equal(a, b) for a, b in zip(ql.project(x, k, q), (alone[1], alone[0])))
    assert torch.equal(ql.project(x, q)[0], alone[0]) and len(calls) == 1
    wide = torch.randn(ql.NATIVE_MAX_ROWS + 1, 512)  # prefill-sized: the tiles, one matrix at a time
    assert all(torch.equal(a, m(wide)) for a, m in zip(ql.project(wide, q, k, v), (q, k, v))) and len(calls) == 1
    # moved or cast members leave the stack and still compute alone
    q.to(torch.bfloat16)
    assert q.stack is None and len(ql.project(x, q, k, v)) == 3 and len(calls) == 1


def _own_mapping(t: torch.Tensor) -> bool:
    """Whether `t`'s memory is a mapping of its own: page-aligned in an anonymous region of
    /proc/self/maps (the kernel may merge it with a neighbour), not in malloc's heap, and not one of
    malloc's own mapped chunks (those start after a chunk header, never on a page boundary). The
    garbage collector stays off while the list is read: a collection in the middle unmapped earlier
    tests' buffers and the read then missed regions."""
    import gc

    ptr = t.untyped_storage().data_ptr()
    gc.disable()
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    finally:
        gc.enable()
    for line in lines:
        fields = line.split()
        lo, hi = (int(a, 16) for a in fields[0].split("-"))
        if lo <= ptr < hi:
            return ptr % 4096 == 0 and len(fields) == 5  # no path: anonymous, not [heap]
    return False


@needs_kernel
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_large_weights_live_outside_the_heap(monkeypatch):
    """Repacked and stacked weights of 1 MiB or more get mappings of their own: the stacking frees
    the unstacked copies, and holes left between weights in the heap were faulted back in by
    later allocations (a prefill's RSS grew ~100 MiB past what it held). Small ones stay in it."""
    monkeypatch.setattr(ql, "_OWN_MAPPING_BYTES", 64 * 1024)
    q, k, v = _linears([T.Q8_0, T.Q8_0, T.Q8_0], cols=1024, rows=(64, 64, 64))  # 64 KiB of codes each
    assert all(_own_mapping(m.data) for m in (q, k, v))
    assert not _own_mapping(q.scale)  # 4 KiB of scales
    stack = ql.stack_rows([q, k, v])
    assert _own_mapping(stack.matrix.data) and q.data.data_ptr() == stack.matrix.data.data_ptr()
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ql.project(x, q, k, v)[2], v(x))


@needs_kernel
def test_layouts_that_differ_do_not_stack():
    assert ql.stack_rows(_linears([T.Q4_K, T.Q8_0], cols=512)) is None  # nibbles vs int8 codes
    assert ql.stack_rows(_linears([T.Q6_K, T.Q8_0])) is None  # groups of 16 vs 32
    a, b = _linears([T.Q8_0, T.Q8_0])
    assert ql.stack_rows([a, torch.nn.Linear(512, 16, bias=False)]) is None
    assert ql.stack_rows([a]) is None
    b.to(torch.bfloat16)
    assert ql.stack_rows([a, b]) is None  # compute dtypes differ


@needs_kernel
def test_a_copy_of_a_stacked_linear_multiplies_on_its_own():
    import copy
    a, b = _linears([T.Q8_0, T.Q8_0])
    ql.stack_rows([a, b])
    x = torch.randn(1, 512)
    c = copy.deepcopy(a)
    assert c.stack is None and torch.equal(c(x), a(x))


@needs_kernel
@pytest.mark.parametrize("bf16_units", [True, False])
def test_bf16_prefill_multiplies_bfloat16_tiles_where_the_cpu_does(monkeypatch, bf16_units):
    """Rows past the native kernel's (a prefill) under bfloat16 compute: bfloat16 tiles times
    bfloat16 activations on a CPU with bfloat16 matrix units (2.2-2.6x the float32 GEMM), else
    the exact tiles times the activations in a float32 GEMM (an emulated bfloat16 one is 3-4x
    slower)."""
    rows, cols = 96, 256
    raw = make_raw(T.Q8_0, rows, cols, 3)
    w_ref = torch.from_numpy(reference(raw, T.Q8_0).reshape(rows, cols).copy())
    monkeypatch.setattr(ql, "cpu_multiplies_bf16", lambda: bf16_units)
    layer = QuantLinear.from_raw(torch.from_numpy(raw), T.Q8_0, rows, cols, torch.bfloat16)
    x = torch.randn(ql.NATIVE_MAX_ROWS + 8, cols)
    y = layer(x)
    assert y.dtype == torch.float32
    if bf16_units:
        want = (x.bfloat16() @ w_ref.bfloat16().T).float()
        assert torch.equal(y, want)
    else:
        assert rel_err(y, x.bfloat16().float() @ w_ref.T) < 1e-5
