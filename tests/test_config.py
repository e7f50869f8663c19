"""Config parsing and the per-layer plan, checked on the released checkpoints' configs."""

import json
from pathlib import Path

import pytest
import torch

from gemmarun.config import ConfigError, LayerType, RopeConfig, text_config_from_hf

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "gemma4-configs.json"
CONFIGS_JSON = json.loads(SPEC.read_text()) if SPEC.exists() else {}


def _real(name: str) -> dict:
    raw = CONFIGS_JSON[name]
    return {k: v for k, v in raw.items() if not k.startswith("_")}


needs_spec = pytest.mark.skipif(not CONFIGS_JSON, reason="../shared/spec not present")


@needs_spec
def test_e2b_plan():
    cfg = text_config_from_hf(_real("google/gemma-4-E2B-it"))
    assert cfg.num_layers == 35 and cfg.ple_dim == 256
    full = [s.index for s in cfg.layers if s.layer_type is LayerType.FULL]
    assert full == [4, 9, 14, 19, 24, 29, 34]
    # KV sharing per layer type: sliding consumers read layer 13, full consumers layer 14.
    assert [s.kv_source for s in cfg.layers[15:]] == [14 if s.layer_type is LayerType.FULL else 13 for s in cfg.layers[15:]]
    assert all(s.owns_kv for s in cfg.layers[:15])
    # double-wide MLP only in the shared layers
    assert {s.mlp_dim for s in cfg.layers[:15]} == {6144} and {s.mlp_dim for s in cfg.layers[15:]} == {12288}
    assert cfg.layers[4].head_dim == 512 and cfg.layers[0].head_dim == 256
    assert cfg.layers[4].num_kv_heads == 1 and not cfg.layers[4].k_eq_v
    assert cfg.eos_ids == (1, 106)


@needs_spec
def test_e4b_plan():
    cfg = text_config_from_hf(_real("google/gemma-4-E4B-it"))
    shared = cfg.layers[24:]
    assert {s.kv_source for s in shared if s.layer_type is LayerType.SLIDING} == {22}
    assert {s.kv_source for s in shared if s.layer_type is LayerType.FULL} == {23}
    assert {s.mlp_dim for s in cfg.layers} == {10240}


@needs_spec
def test_31b_and_26b_plans():
    dense = text_config_from_hf(_real("google/gemma-4-31B-it"))
    full = dense.layers[5]
    assert full.layer_type is LayerType.FULL and full.k_eq_v and full.num_kv_heads == 4 and full.head_dim == 512
    assert dense.layers[0].num_kv_heads == 16 and not dense.layers[0].k_eq_v
    assert all(s.owns_kv for s in dense.layers) and dense.layers[-1].layer_type is LayerType.FULL
    moe = text_config_from_hf(_real("google/gemma-4-26B-A4B-it"))
    assert moe.num_experts == 128 and moe.top_k_experts == 8 and moe.expert_dim == 704
    assert all(s.moe for s in moe.layers) and moe.layers[5].num_kv_heads == 2


@needs_spec
def test_rope_parameters_parsed():
    cfg = text_config_from_hf(_real("google/gemma-4-E2B-it"))
    assert cfg.rope_full == RopeConfig(theta=1e6, rotated_fraction=0.25)
    assert cfg.rope_sliding == RopeConfig(theta=1e4)


def test_prope_rotates_exactly_the_first_64_pairs_of_512():
    inv = RopeConfig(theta=1e6, rotated_fraction=0.25).inv_freq(512)
    assert inv.shape == (256,)
    assert torch.all(inv[:64] > 0) and torch.all(inv[64:] == 0)
    # exponent denominator is the full head dim: pair j has 1e6^(-2j/512)
    assert inv[1].item() == pytest.approx(1e6 ** (-2 / 512), rel=1e-6)
    assert inv[63].item() == pytest.approx(1e6 ** (-126 / 512), rel=1e-6)
    # rotating dims are 0..63 paired with 256..319: apply to a one-hot and see which move
    from gemmarun.model.layers import RotaryTable, apply_rope

    table = RotaryTable(inv)
    cos, sin = table(torch.tensor([7]), torch.float32)
    moved = []
    for d in range(512):
        x = torch.zeros(1, 1, 1, 512)
        x[..., d] = 1.0
        if not torch.equal(apply_rope(x, cos, sin), x):
            moved.append(d)
    assert moved == list(range(64)) + list(range(256, 320))


def test_default_rope_rotates_every_pair():
    inv = RopeConfig(theta=1e4).inv_freq(256)
    assert torch.all(inv > 0) and inv[0].item() == 1.0


def _minimal(**overrides) -> dict:
    base = dict(model_type="gemma4_text", vocab_size=32, hidden_size=16, intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                layer_types=["sliding_attention", "full_attention"])
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(hidden_activation="relu"), "hidden_activation"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(use_bidirectional_attention="all"), "use_bidirectional_attention"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
        (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}), "rope_type"),
        (dict(model_type="llama"), "model_type"),
        (dict(num_kv_shared_layers=1, layer_types=["full_attention", "full_attention"]), None),
    ],
)
def test_unsupported_values_are_named(overrides, key):
    if key is None:
        text_config_from_hf(_minimal(**overrides))  # a valid sharing config is accepted
        return
    with pytest.raises(ConfigError, match=key):
        text_config_from_hf(_minimal(**overrides))


def test_kv_sharing_without_producer_of_type_is_an_error():
    # layers 1 and 2 are shared, but no non-shared sliding layer precedes sliding layer 1
    raw = _minimal(num_hidden_layers=3, num_kv_shared_layers=2,
                   layer_types=["full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="num_kv_shared_layers"):
        text_config_from_hf(raw)


@pytest.mark.parametrize("layers", [10**12, 0, -3, "many", None])
def test_absurd_layer_counts_are_refused_before_the_layer_plan(layers):
    """A fuzz finding: 10**12 layers looped in the per-layer plan before any size check ran."""
    raw = _minimal(num_hidden_layers=layers)
    raw.pop("layer_types")
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        text_config_from_hf(raw)


def test_gemma3_multimodal_configs_take_the_reference_text_defaults():
    """google/gemma-3-4b-it's config.json names a few text keys; transformers' Gemma3TextConfig
    fills the rest (it failed to load: no vocab_size)."""
    from transformers import Gemma3Config

    raw = {"model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}
    ours = text_config_from_hf(raw)
    ref = Gemma3Config(**raw).text_config
    assert (ours.vocab_size, ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.sliding_window) == (
        ref.vocab_size, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim, ref.sliding_window)
    assert ours.attention_scale == ref.query_pre_attn_scalar**-0.5 and ours.rope_full.factor == 8.0
    bare = text_config_from_hf({"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64,
                                "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 16})
    assert bare.sliding_window == 4096 and bare.attention_scale == 256**-0.5  # not 512, not head_dim


def test_gemma3_attention_softcap_is_not_applied_as_in_the_reference():
    """Gemma 3's attention in transformers (and llama.cpp) ignores attn_logit_softcapping."""
    raw = {"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "attn_logit_softcapping": 2.0}
    assert text_config_from_hf(raw).attn_logit_softcap is None


def test_a_null_sliding_window_is_refused_where_a_layer_slides():
    """null had become Gemma 4's 512 silently, on Gemma 3 too (whose default is 4096); the
    reference fails on it. A model without sliding layers never reads the window."""
    with pytest.raises(ConfigError, match="sliding_window=null, but the model has sliding_attention layers"):
        text_config_from_hf(_minimal(sliding_window=None))
    with pytest.raises(ConfigError, match="sliding_window=null"):
        text_config_from_hf({"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "sliding_window": None,
                             "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "head_dim": 16})
    full_only = text_config_from_hf(_minimal(sliding_window=None, layer_types=["full_attention"] * 2))
    assert all(spec.window is None for spec in full_only.layers)
    assert text_config_from_hf(_minimal(sliding_window=7)).sliding_window == 7


@pytest.mark.parametrize("pattern", [0, -2, "6", None, [True], [1, 0]])
def test_hf_sliding_window_pattern_must_be_a_period(pattern):
    raw = _minimal(sliding_window_pattern=pattern)
    raw.pop("layer_types")
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        text_config_from_hf(raw)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "64"), ("hidden_size", 64.5), ("hidden_size", None), ("rms_norm_eps", "1e-6"),
    ("sliding_window", True), ("tie_word_embeddings", 0), ("attention_k_eq_v", "false"),
    ("max_position_embeddings", True), ("final_logit_softcapping", "30"), ("rope_parameters", "x"),
    ("rope_parameters", [1, 2]), ("num_kv_shared_layers", 1.0), ("eos_token_id", ["1"]),
])
def test_values_of_the_wrong_json_type_are_refused(key, value):
    """A loader probe's finding: int()/float()/bool() made something of each ("64" and 64.5 became
    64, a rope_parameters string fell back to the default RoPE, true became a window of 1) and the
    model ran with other math; transformers' strict config classes refuse them."""
    with pytest.raises(ConfigError, match=key):
        text_config_from_hf(_minimal(**{key: value}))


@pytest.mark.parametrize("key, value, fragment", [
    ("sliding_window", 10**30, "at most 2147483647"),  # an OverflowError out of the mask
    ("max_position_embeddings", 2**40, "at most 2147483647"),
    ("final_logit_softcapping", 10**400, "out of a float's range"),
])
def test_sizes_past_what_positions_and_floats_hold_are_refused(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        text_config_from_hf(_minimal(**{key: value}))
    assert text_config_from_hf(_minimal(final_logit_softcapping=10**30)).final_logit_softcap == 1e30


def test_gemma3_query_scalar_must_be_positive():
    raw = {"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "query_pre_attn_scalar": -4}
    with pytest.raises(ConfigError, match="query_pre_attn_scalar=-4.0 must be a positive number"):
        text_config_from_hf(raw)


@pytest.mark.parametrize("model_type, text_type", [("gemma3", "gemma3_text"), ("gemma4", "gemma4_text"),
                                                   ("gemma4_unified", "gemma4_unified_text")])
def test_a_composite_config_ties_its_head_by_its_top_level_flag(model_type, text_type):
    """transformers' ForConditionalGeneration classes read the top-level tie_word_embeddings and
    ignore their text_config's: a checkpoint untied there (its own lm_head.weight) had loaded with
    the embedding as its head, every logit wrong without a word; one tied there had been refused."""
    def composite(top, text):
        return {"model_type": model_type, "tie_word_embeddings": top,
                "text_config": _minimal(model_type=text_type, tie_word_embeddings=text)}

    assert text_config_from_hf(composite(True, False)).hidden_size == 16
    with pytest.raises(ConfigError, match="tie_word_embeddings=false is not supported"):
        text_config_from_hf(composite(False, True))
    with pytest.raises(ConfigError, match="tie_word_embeddings=false is not supported"):
        text_config_from_hf(_minimal(model_type=text_type, tie_word_embeddings=False))


@pytest.mark.parametrize("model_type", ["gemma4", "gemma3", "gemma4_unified"])
def test_a_composite_config_without_its_text_section_says_so(model_type):
    """It had been "model_type 'gemma4' is not supported (gemma4, ...)"."""
    with pytest.raises(ConfigError, match=f"model_type '{model_type}' needs a text_config section"):
        text_config_from_hf({"model_type": model_type, "hidden_size": 64})
