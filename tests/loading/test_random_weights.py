"""Random-weight GGUFs in real shapes: they load, hold every tensor with the planned type, have
sane values, are reproducible, are written in bounded memory; the MoE active-parameter twin."""

import json
import tracemalloc

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from reference_models import config_dict

import gemmarun
from gemmarun.config import ConfigError, text_config_from_hf
from gemmarun.loading import LoadError
from gemmarun.loading.gguf_file import GGUFFile
from gemmarun.loading.random_weights import (
    CONFIGS_JSON,
    TYPES as RANDOM_TYPES,
    WEIGHT_STD,
    _pack_kquant_scales,
    active_twin,
    count_parameters,
    model_tensor_shapes,
    plan_tensors,
    resolve_config,
    tensor_chunks,
    write_random_gguf,
)
from gemmarun.quant import dequantize
from gemmarun.quant.formats import _kquant_scale_min

TYPES = list(RANDOM_TYPES)  # every type the writer offers (it had offered mxfp4 and failed on it)
needs_spec = pytest.mark.skipif(not CONFIGS_JSON.is_file(), reason="../shared/spec not present")


def tiny(family: str, **overrides):
    return text_config_from_hf({**config_dict(family), **overrides})


def kquant_tiny():
    """Tiny E2B whose hidden size is a whole K-quant block, so Q4_K is really written."""
    return tiny("e2b", hidden_size=256, intermediate_size=256)


def _dequantized(f: GGUFFile, name: str) -> torch.Tensor:
    info = f.tensors[name]
    return dequantize(torch.from_numpy(f.raw(name)), info.ggml_type, info.shape)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", ["e2b", "26b", "26b-twin"])
def test_written_file_loads_with_every_planned_tensor(tmp_path, family, qtype):
    if family == "26b-twin":
        cfg = active_twin(tiny("26b"))
        path = write_random_gguf(tiny("26b"), tmp_path / "m.gguf", qtype, twin=True)
    else:
        cfg = kquant_tiny() if (qtype == "q4_k" and family == "e2b") else tiny(family)
        path = write_random_gguf(cfg, tmp_path / "m.gguf", qtype)
    f = GGUFFile(path)
    plan = plan_tensors(cfg, T[qtype.upper()])
    assert [(t.name, t.shape, t.ggml_type) for t in plan] == \
        [(i.name, i.shape, i.ggml_type) for i in f.tensors.values()]
    if family == "e2b":  # the chosen type is really used, not only fallbacks
        assert f.tensors["blk.0.attn_q.weight"].ggml_type == T[qtype.upper()]
    assert gemmarun.load(path, device="cpu").config.layers == cfg.layers


@pytest.mark.parametrize("family, qtype", [("e2b", "q4_0"), ("26b", "q4_k"), ("26b-twin", "bf16")])
def test_random_model_runs(tmp_path, family, qtype):
    cfg = active_twin(tiny("26b")) if family == "26b-twin" else tiny(family, hidden_size=256)
    llm = gemmarun.load(write_random_gguf(cfg, tmp_path / "m.gguf", qtype), device="cpu")
    logits = llm.logits([2, 40, 41, 42])
    assert np.isfinite(logits).all() and logits.std() > 0
    assert len(list(llm.generate_ids([2, 40, 41], max_new_tokens=3))) == 3


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantized_values_are_sane(tmp_path, qtype):
    cfg = kquant_tiny()
    f = GGUFFile(write_random_gguf(cfg, tmp_path / "m.gguf", qtype))
    for name, info in f.tensors.items():
        w = _dequantized(f, name)
        assert torch.isfinite(w).all(), name
        if name == "rope_freqs.weight":
            continue
        if len(info.shape) == 1:  # norms, scales, layer scalars: near 1
            assert (w - 1).abs().max() < 0.15, name
        elif w.numel() >= 4096:
            # Q4_K draws one scale per 256 weights: small tensors have few scales, so more spread.
            tolerance = 0.1 if w.numel() >= 65536 else 0.35
            assert abs(float(w.std()) - WEIGHT_STD) < tolerance * WEIGHT_STD, (name, float(w.std()))
            assert abs(float(w.mean())) < 0.05 * WEIGHT_STD, name


def test_loaded_weights_stay_quantized_and_the_ple_table_mapped(tmp_path):
    cfg = tiny("e2b", hidden_size_per_layer_input=16)  # PLE rows of 10 x 16: whole Q4_0 blocks
    llm = gemmarun.load(write_random_gguf(cfg, tmp_path / "m.gguf", "q4_0"), device="cpu")
    from gemmarun.quant import QuantEmbedding, QuantLinear

    assert isinstance(llm.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(llm.model.embed_tokens, QuantEmbedding)
    ple = llm.model.ple
    assert ple.table_type == T.Q4_0  # raw blocks, a view of the mapped file
    assert ple.table.dtype == torch.uint8 and tuple(ple.table.shape) == (256, 160 // 32 * 18)


def test_same_seed_same_bytes(tmp_path):
    cfg = tiny("26b")
    a = write_random_gguf(cfg, tmp_path / "a.gguf", "q4_0", seed=3).read_bytes()
    b = write_random_gguf(cfg, tmp_path / "b.gguf", "q4_0", seed=3).read_bytes()
    c = write_random_gguf(cfg, tmp_path / "c.gguf", "q4_0", seed=4).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


@pytest.mark.parametrize("qtype", ["q4_0", "f16"])
def test_writer_memory_stays_bounded(tmp_path, qtype):
    """A 16384 x 1024 table (64 MB as float32) is written with a fraction of that in memory."""
    cfg = tiny("e2b", hidden_size=1024, vocab_size=16384, vocab_size_per_layer_input=16384)
    chunk = 1 << 18
    embed = next(t for t in plan_tensors(cfg, T[qtype.upper()]) if t.name == "token_embd.weight")
    sizes = [c.nbytes for c in tensor_chunks(cfg, embed, np.random.default_rng(0), chunk)]
    assert sum(sizes) == embed.nbytes and max(sizes) <= chunk
    float_copy = 16384 * 1024 * 4
    tracemalloc.start()
    try:
        write_random_gguf(cfg, tmp_path / "m.gguf", qtype, chunk_bytes=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < float_copy / 8, f"peak {peak / 1e6:.1f} MB"  # ~4 MB measured; 136 MB with 64 MB chunks


def test_kquant_scale_field_round_trips():
    rng = np.random.default_rng(0)
    sc, mn = (rng.integers(0, 64, (100, 8), dtype=np.uint8) for _ in range(2))
    got_sc, got_mn = _kquant_scale_min(torch.from_numpy(_pack_kquant_scales(sc, mn)))
    assert np.array_equal(got_sc.numpy(), sc) and np.array_equal(got_mn.numpy(), mn)


def test_synthetic_vocab_round_trips_text(tmp_path):
    llm = gemmarun.load(write_random_gguf(tiny("31b", vocab_size=1024), tmp_path / "m.gguf", "q8_0"), device="cpu")
    tok = llm.tokenizer
    ids = tok.encode("Hi there, ünïcode!", add_bos=False)
    assert tok.decode(ids) == "Hi there, ünïcode!"
    assert (tok.bos_id, tok.pad_id) == (2, 0) and 1 in tok.eos_ids


def test_tiny_twin_matches_active_ffn_width():
    cfg = tiny("26b")
    twin = active_twin(cfg)
    assert twin.intermediate_size == cfg.intermediate_size + cfg.top_k_experts * cfg.expert_dim
    assert twin.num_experts == 0 and all(not s.moe for s in twin.layers)
    with pytest.raises(ConfigError, match="already dense"):
        active_twin(twin)


def _ffn_parameters(cfg) -> int:
    """Matmul weights of the feed-forward blocks a token goes through (routed experts pro rata)."""
    n = 0
    for name, shape in model_tensor_shapes(cfg).items():
        if ".mlp." in name:
            n += int(np.prod(shape))
        elif ".experts." in name:
            n += int(np.prod(shape)) * cfg.top_k_experts // cfg.num_experts
    return n


@needs_spec
def test_26b_a4b_twin_has_the_same_active_parameters():
    cfg, _ = resolve_config("26b-a4b")
    twin = active_twin(cfg)
    # Attention is untouched.
    assert [(s.layer_type, s.head_dim, s.num_kv_heads, s.k_eq_v) for s in twin.layers] == \
        [(s.layer_type, s.head_dim, s.num_kv_heads, s.k_eq_v) for s in cfg.layers]
    # The FFN work per token is equal exactly; what differs is the router and the MoE-only norms.
    assert _ffn_parameters(twin) == _ffn_parameters(cfg)
    moe, dense = count_parameters(cfg), count_parameters(twin)
    h, e = cfg.hidden_size, cfg.num_experts
    router_and_norms = cfg.num_layers * (e * h + h + e + 3 * h)
    assert moe.active - dense.active == router_and_norms
    assert router_and_norms < 0.005 * moe.active
    assert dense.total == dense.active
    # The leads' count (which leaves out the 30 one-element layer scalars).
    spec = json.loads(CONFIGS_JSON.read_text())["google/gemma-4-26B-A4B-it"]["_spec_notes"]["parameter_counts_computed"]
    assert moe.active - cfg.num_layers == spec["text_active_per_token"]
    assert moe.total - cfg.num_layers == spec["text_total"]


@needs_spec
def test_e2b_active_parameters_leave_out_the_ple_table():
    cfg, _ = resolve_config("e2b")
    counts = count_parameters(cfg)
    spec = json.loads(CONFIGS_JSON.read_text())["google/gemma-4-E2B-it"]["_spec_notes"]["parameter_counts_computed"]
    assert counts.total - cfg.num_layers == spec["text_total"]  # the leads leave out the layer scalars
    assert counts.active - cfg.num_layers == spec["text_without_ple_table"]


@needs_spec
@pytest.mark.parametrize("name", ["e2b", "E2B", "google/gemma-4-E2B-it", "gemma-4-E2B-it"])
def test_released_names_resolve(name):
    cfg, shown = resolve_config(name)
    assert shown == "gemma-4-E2B-it" and cfg.num_layers == 35 and cfg.ple_dim == 256


def test_config_json_path_resolves(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_dict("31b")))
    cfg, _ = resolve_config(tmp_path / "config.json")
    assert cfg == resolve_config(tmp_path)[0] == tiny("31b")
    # the model folders' reader: a list, or a value of the wrong type, is one line, not a traceback
    for text, message in (("[1, 2]", "must hold a JSON object"),
                          (json.dumps({**config_dict("31b"), "vocab_size": [256]}),
                           r"vocab_size=\[256\] must be an integer")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConfigError, match=message):
            resolve_config(tmp_path / "bad.json")


def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown config 'e9b'"):
        write_random_gguf("e9b", tmp_path / "m.gguf")
    with pytest.raises(LoadError, match="type 'q3_x' is not supported"):
        write_random_gguf(tiny("e2b"), tmp_path / "m.gguf", "q3_x")
    import gemmarun.loading.random_weights as rw

    monkeypatch.setattr(rw.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(LoadError, match="only 0.00 GB is free"):
        write_random_gguf(tiny("e2b"), tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.partial"))
    assert not list(tmp_path.iterdir())
