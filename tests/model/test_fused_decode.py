"""The native decode step (model/fused_decode.py, native/decode_step.cpp) against the module path:
the same logits, bit for bit, and the same cache, on every family it takes; the rest keep the
module path."""

import numpy as np
import pytest
import torch

import gemmarun
from gemmarun.cache import make_cache
from gemmarun.generate import decode_step, prefill
from gemmarun.loading.convert import convert
from gemmarun.native import native_ops
from reference_models import WINDOW

pytestmark = pytest.mark.skipif(native_ops() is None, reason="native kernels unavailable")

# the 31B's and 26B's full layers store values only (K=V); the 26B's MoE experts are float32
# (safetensors) or left in the mapped GGUF (q4_0, q8_0)
FUSED = ["e2b", "e4b", "31b", "26b", "26b-top4", "gemma3"]
PROMPT = [2] + list(range(20, 20 + WINDOW + 3))  # the sliding rings already wrapped
STEPS = 2 * WINDOW + 5  # and wrap again while decoding


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """(family, format) -> a loaded float32 CPU model; formats: the safetensors folder (float
    weights, at::linear) and GGUF q4_0 / q8_0 (codes, group_gemv)."""
    cache = {}

    def get(family, fmt):
        if (family, fmt) not in cache:
            folder, _ = tiny_models(family)
            path = folder
            if fmt != "safetensors":
                path = tmp_path_factory.mktemp("fused") / f"{family}-{fmt}.gguf"
                convert(folder, path, fmt, progress=False)
            cache[family, fmt] = gemmarun.load(path, dtype="float32", device="cpu").model
        return cache[family, fmt]

    return get


def _decode(model, fused: bool):
    """Prompt logits, then STEPS greedy decode steps: (stacked logits, the cache)."""
    model.fused_decode = fused
    try:
        cache = make_cache(model.config, len(PROMPT) + STEPS + 1)
        out = [prefill(model, torch.tensor(PROMPT), cache)]
        for position in range(len(PROMPT), len(PROMPT) + STEPS):
            out.append(decode_step(model, int(torch.argmax(out[-1])), position, cache))
        return torch.stack(out), cache
    finally:
        model.fused_decode = True


def _layer_state(layer):
    if layer is None:
        return None
    return [t.clone() for t in (layer.keys, layer.values) if t is not None], getattr(layer, "used", None), \
        getattr(layer, "end", None), getattr(layer, "positions", None)


def _assert_native_step_equals_the_modules(model):
    modules, module_cache = _decode(model, fused=False)
    fused, fused_cache = _decode(model, fused=True)
    assert model._decode_plan, "the plan should have been built"
    assert torch.equal(fused, modules)
    for a, b in zip(module_cache.layers, fused_cache.layers):
        sa, sb = _layer_state(a), _layer_state(b)
        if sa is None:
            assert sb is None
            continue
        assert all(torch.equal(x, y) for x, y in zip(sa[0], sb[0]))
        assert sa[1:3] == sb[1:3]
        assert (sa[3] is None) == (sb[3] is None) and (sa[3] is None or torch.equal(sa[3], sb[3]))


@pytest.mark.parametrize("fmt", ["safetensors", "q4_0", "q8_0"])
@pytest.mark.parametrize("family", FUSED)
def test_native_step_equals_the_modules_bit_for_bit(models, family, fmt):
    _assert_native_step_equals_the_modules(models(family, fmt))


def _load_26b_q8_0(tiny_models, tmp_path):
    folder, _ = tiny_models("26b")
    path = tmp_path / "26b-q8_0.gguf"
    convert(folder, path, "q8_0", progress=False)
    return gemmarun.load(path, dtype="float32", device="cpu").model


def test_repacked_moe_experts_take_the_native_step_too(tiny_models, tmp_path, monkeypatch):
    """Experts repacked at load (formats the in-place kernel cannot read; forced here) go through
    the native step as one matrix each."""
    from gemmarun.quant import experts as quant_experts

    with monkeypatch.context() as m:
        m.setattr(quant_experts, "native_block_gemv", lambda: None)
        model = _load_26b_q8_0(tiny_models, tmp_path)
    assert not model.layers[0].experts.mapped and len(model.layers[0].experts.gate_up) > 0
    _assert_native_step_equals_the_modules(model)


def test_models_it_cannot_take_keep_the_module_path(tiny_models, tmp_path):
    """A matrix the native kernels cannot multiply (here one switched to the exact reference path)
    keeps the whole step on the module path."""
    model = _load_26b_q8_0(tiny_models, tmp_path)
    model.layers[1].self_attn.o_proj.reference = True
    logits, _ = _decode(model, fused=True)
    assert model._decode_plan is False
    assert torch.isfinite(logits).all()


def test_a_move_or_cast_drops_the_plan(models):
    model = models("gemma3", "q8_0")
    _decode(model, fused=True)
    assert model._decode_plan
    model.to("cpu")
    assert model._decode_plan is None


@pytest.mark.parametrize("family, fmt", [("e2b", "q4_0"), ("gemma3", "q8_0")])
def test_bfloat16_on_the_cpu_is_float32_but_for_prefill_gemms(tiny_models, tmp_path, monkeypatch, family, fmt):
    """`dtype="bfloat16"` on a CPU: a quantized model computes as in float32 (the native step,
    its logits and cache bit for bit float32's) but for its prefill tiles, which multiply in
    bfloat16 (forced here: a CPU without bfloat16 units keeps them float32)."""
    from gemmarun.quant import QuantEmbedding, QuantLinear
    from gemmarun.quant import linear as quant_linear

    monkeypatch.setattr(quant_linear, "cpu_multiplies_bf16", lambda: True)
    folder, _ = tiny_models(family)
    path = tmp_path / f"{family}-{fmt}.gguf"
    convert(folder, path, fmt, progress=False)
    low, exact = (gemmarun.load(path, dtype=dtype, device="cpu") for dtype in ("bfloat16", "float32"))
    model = low.model
    assert model.dtype == torch.float32 and model.embed_tokens.compute_dtype == torch.float32
    matrices = [m for m in model.modules() if isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding)]
    assert matrices and all((m.compute_dtype, m.prefill_dtype) == (torch.float32, torch.bfloat16) for m in matrices)
    _assert_native_step_equals_the_modules(model)
    short, cache = _decode(model, fused=True)  # a prompt of at most 16 rows: native, as float32
    assert torch.equal(short, _decode(exact.model, fused=True)[0])
    assert next(t for t in cache.layers if t is not None).values.dtype == torch.float32
    prompt = PROMPT + list(range(30, 60))  # past 16 rows: the tiles multiply in bfloat16
    got, want = low.logits(prompt)[-1], exact.logits(prompt)[-1]  # the next token's
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert 0 < rel < 5e-2, rel  # bfloat16 rounding (1.8-2.2 %; the all-bfloat16 folders': 2.6-2.7 %)
    low.model.to(torch.float32)  # a cast means float32 compute: its prefill too (it had stayed bfloat16)
    assert np.array_equal(low.logits(prompt)[-1], want)


def test_bfloat16_float_weights_stay_bfloat16(tiny_models, tmp_path):
    """Float (unquantized) weights under bfloat16 are held and multiplied in bfloat16: a copy to
    float32 would double the memory of a bfloat16 checkpoint. So is every weight of a file whose
    float matrices are a tenth of its matrix weights or more (the tiny 26B's down projections and
    experts are too narrow for Q8_0's blocks: 27 %); its float32-held experts had failed."""
    folder, _ = tiny_models("e2b")
    model = gemmarun.load(folder, dtype="bfloat16", device="cpu").model
    assert model.dtype == torch.bfloat16
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    folder, _ = tiny_models("26b")
    convert(folder, tmp_path / "26b-q8_0.gguf", "q8_0", progress=False)
    llm = gemmarun.load(tmp_path / "26b-q8_0.gguf", dtype="bfloat16", device="cpu")
    assert llm.model.dtype == torch.bfloat16 and llm.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert np.isfinite(llm.logits(PROMPT)).all()
