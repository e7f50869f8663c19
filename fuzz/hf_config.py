"""Fuzz target: HF config.json -> text config, towers' config, and the models built from them on
`meta` (structured, Hypothesis).

A model folder's config.json comes from strangers as much as its weights do. This target starts
from realistic configs -- the released Gemma 4 ones (../shared/spec/gemma4-configs.json, when
present) and the tiny ones the test suite builds with transformers' config classes (the Gemma 4
text families, the Gemma 4 multimodal config of `build_multimodal`, Gemma 3 text, Gemma 3 with its
SigLIP tower, gemma4_unified) -- then replaces, drops or adds keys at the top level and inside
text_config / vision_config / audio_config / rope_parameters (and rope_scaling, per_layer_config)
with values of every JSON type (huge, zero and negative integers, 1e308, -0.0, NaN, digit strings,
booleans, null, lists, nested objects), or replaces a whole section by a non-object.

Contract, with the parsers called directly (not through `config_from_file`, whose safety net
turns any TypeError/ValueError/AttributeError into a "malformed config" ConfigError and so would
hide a parser that forgot a check): `text_config_from_hf` gives a config whose LayerSpecs cover
every layer, or a one-line ConfigError (or the KeyError of a required key, which
`config_from_file` reports as "required key ... is missing"); `media_config_from_hf` gives the
towers' config, None, or a one-line ConfigError. When both parse, building what `load_hf_folder`
builds before reading a weight -- the TextModel and the towers (`build_encoders`' class) on the
`meta` device -- gives modules or a one-line ConfigError/ValueError, within the CPU budget and the
address-space cap.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from _harness import ROOT, Structured, instrumented, main_structured, run_contract

with instrumented():
    import torch
    from hypothesis import strategies as st

    from gemmarun.config import ConfigError, text_config_from_hf
    from gemmarun.loading.build import encoders_class
    from gemmarun.loading.hf import media_config_from_hf
    from gemmarun.model.text import TextModel

NAME = "hf_config"
SECONDS_PER_INPUT = 10.0
RELEASED = ROOT.parent / "shared" / "spec" / "gemma4-configs.json"
# Keys whose absence text_config_from_hf reports as a KeyError (config_from_file: "required key
# ... is missing"); any other KeyError is a finding.
REQUIRED_KEYS = {"num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "query_pre_attn_scalar", "factor", "num_experts", "top_k_experts",
                 "moe_intermediate_size"}
S, F = "sliding_attention", "full_attention"
# tests/model/test_unified_reference.py's tiny gemma4_unified model (its text on top of COMMON)
UNIFIED_TEXT = {"num_hidden_layers": 6, "layer_types": [S] * 5 + [F], "num_key_value_heads": 2, "global_head_dim": 32,
                "num_global_key_value_heads": 1, "attention_k_eq_v": True, "use_bidirectional_attention": "vision",
                "max_position_embeddings": 1024}
UNIFIED_VISION = {"mm_embed_dim": 48, "mm_posemb_size": 72, "output_proj_dims": 48}
UNIFIED_AUDIO = {"audio_embed_dim": 640}


def _json(d: dict) -> dict:
    """As config.json holds it (tuples become lists, keys strings)."""
    return json.loads(json.dumps(d))


@lru_cache(maxsize=None)
def baselines() -> tuple[str, ...]:
    """The starting configs, as JSON text (each case parses its own copy)."""
    from reference_models import (COMMON, FAMILIES, GEMMA3, GEMMA3_IDS, GEMMA3_SOFT, GEMMA3_VISION, IMAGE_BUDGET,
                                  TOWER_AUDIO, TOWER_VISION, config_dict)
    from tiny_tokenizer import MEDIA_IDS
    from transformers import Gemma3Config, Gemma3TextConfig, Gemma4Config, Gemma4TextConfig, Gemma4UnifiedConfig

    out = []
    if RELEASED.exists():
        for name, raw in json.loads(RELEASED.read_text()).items():
            if not name.startswith("_"):
                out.append({k: v for k, v in raw.items() if not k.startswith("_")})
    for family in FAMILIES:
        out.append(config_dict(family))  # as build_reference saves it: the released full-layer keys
        out.append(Gemma4TextConfig(**{**COMMON, **FAMILIES[family]}).to_dict())  # with per_layer_config
    out.append(config_dict("gemma3"))
    out.append(Gemma3TextConfig(**GEMMA3).to_dict())
    for family in ("e2b", "31b"):
        e_like = family == "e2b"
        text = {**COMMON, **FAMILIES[family], "max_position_embeddings": 1024}
        vision = {**TOWER_VISION, "use_clipped_linears": e_like, "standardize": not e_like}
        out.append(Gemma4Config(text_config=text, vision_config=vision, audio_config=TOWER_AUDIO if e_like else None,
                                vision_soft_tokens_per_image=IMAGE_BUDGET, **MEDIA_IDS).to_dict())
    out.append(Gemma3Config(text_config={**GEMMA3, "max_position_embeddings": 1024}, vision_config=GEMMA3_VISION,
                            mm_tokens_per_image=GEMMA3_SOFT, **GEMMA3_IDS).to_dict())
    out.append(Gemma4UnifiedConfig(text_config={**COMMON, **UNIFIED_TEXT}, vision_config=UNIFIED_VISION,
                                   audio_config=UNIFIED_AUDIO, **MEDIA_IDS).to_dict())
    return tuple(json.dumps(_json(d)) for d in out)


@lru_cache(maxsize=None)
def known_keys() -> tuple[str, ...]:
    """Every key any baseline has at any depth, plus a few no baseline has."""
    keys = {"rope_scaling", "rope_theta", "rope_local_base_freq", "sliding_window_pattern", "per_layer_config",
            "rope_type", "type", "factor", "partial_rotary_factor", "mm_tokens_per_image", "image_token_index",
            "boi_token_index", "eoi_token_index", "model_patch_size", "audio_samples_per_token", "num_channels",
            "hidden_act", "default_output_length", "standardize", "use_clipped_linears", "eoa_token_index"}

    def walk(d: Any) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                keys.add(k)
                walk(v)

    for text in baselines():
        walk(json.loads(text))
    return tuple(sorted(keys))


# Where keys are mutated: a path of object keys from the top.
SECTIONS = [(), ("text_config",), ("vision_config",), ("audio_config",), ("rope_parameters",),
            ("text_config", "rope_parameters"), ("rope_parameters", "full_attention"),
            ("rope_parameters", "sliding_attention"), ("text_config", "rope_parameters", "full_attention"),
            ("text_config", "rope_parameters", "sliding_attention"), ("vision_config", "rope_parameters"),
            ("rope_scaling",), ("text_config", "rope_scaling"), ("per_layer_config",),
            ("text_config", "per_layer_config")]

BIG = [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 48, 64, 70, 128, 256, 280, 640, 2**20, 2**20 + 1, 2**31 - 1, 2**31,
       2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 10**400, -(2**63)]
FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, 1e-6, 5e-324, 1e-320, 1e308, 1.7976931348623157e308, -1e308, float("inf"),
          float("-inf"), float("nan"), 16.0, 2.0**63]
STRINGS = ["", "64", "1e3", "-1", "0x10", "nan", "true", "null", "gemma4", "gemma4_text", "gemma3", "gemma4_unified",
           "gemma4_vision", "gemma4_audio", "siglip_vision_model", "vision", S, F, "default", "proportional", "linear",
           "axial", "dynamic", "yarn", "gelu_pytorch_tanh", "gelu_tanh", "silu", "relu", "a\nb", "\r", "\x00",
           "\ud800", "x" * 10_000]
SCALAR = st.one_of(st.none(), st.booleans(), st.sampled_from(BIG), st.integers(-(2**70), 2**70), st.integers(0, 64),
                   st.sampled_from(FLOATS), st.floats(), st.sampled_from(STRINGS), st.text(max_size=8))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=8)
# Values shaped like the real ones, but wrong in count, order or content.
LAYER_TYPES = st.one_of(st.lists(st.sampled_from([S, F]), max_size=16), st.lists(SCALAR, max_size=4))
ROPE = st.fixed_dictionaries({}, optional={"rope_type": st.one_of(st.sampled_from(["default", "proportional", "linear",
                                                                                   "yarn", "axial"]), SCALAR),
                                           "rope_theta": SCALAR, "factor": SCALAR, "partial_rotary_factor": SCALAR,
                                           "type": SCALAR})
PER_LAYER = st.dictionaries(st.one_of(st.sampled_from(["0", "2", "5", "11", "-1", "x", "05"]), st.text(max_size=3)),
                            st.one_of(st.fixed_dictionaries({}, optional={"head_dim": SCALAR,
                                                                          "num_key_value_heads": SCALAR}), JSON),
                            max_size=3)
VALUES = st.one_of(SCALAR, JSON, LAYER_TYPES, ROPE, st.fixed_dictionaries({"full_attention": ROPE,
                                                                           "sliding_attention": ROPE}), PER_LAYER)


def _section(raw: dict, path: tuple[str, ...], create: bool) -> dict | None:
    """The object at `path` (made where `create` and the parent is an object), or None."""
    d: Any = raw
    for key in path:
        if not isinstance(d, dict):
            return None
        if key not in d and create:
            d[key] = {}
        d = d.get(key)
    return d if isinstance(d, dict) else None


@st.composite
def hostile_config(draw: st.DrawFn) -> dict:
    raw = json.loads(draw(st.sampled_from(baselines())))
    keys = known_keys()
    for _ in range(draw(st.integers(1, 6))):
        present = [p for p in SECTIONS if _section(raw, p, create=False) is not None]
        path = draw(st.sampled_from(present) if draw(st.integers(0, 3)) else st.sampled_from(SECTIONS))
        op = draw(st.sampled_from(["replace", "replace", "drop", "add", "section"]))
        if op == "section":  # the whole section: a non-object (or an empty one)
            parent = _section(raw, path[:-1], create=False) if path else None
            if parent is not None:
                parent[path[-1]] = draw(st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.just({})))
            continue
        d = _section(raw, path, create=op == "add")
        if d is None:
            continue
        if op == "add" or not d:
            d[draw(st.one_of(st.sampled_from(keys), st.text(max_size=8)))] = draw(VALUES)
        elif op == "drop":
            del d[draw(st.sampled_from(sorted(d)))]
        else:
            d[draw(st.sampled_from(sorted(d)))] = draw(VALUES)
    return raw


def _text(raw: dict):
    try:
        cfg = text_config_from_hf(raw)
    except KeyError as e:
        if len(e.args) == 1 and e.args[0] in REQUIRED_KEYS:
            raise ConfigError(f"required key {e.args[0]!r} is missing") from None
        raise
    assert len(cfg.layers) == cfg.num_layers
    return cfg


def _build(text_cfg, mm_cfg) -> None:
    """What load_hf_folder builds before it reads a weight (build_text_model, build_encoders)."""
    with torch.device("meta"):
        model = TextModel(text_cfg)
        encoders = None if mm_cfg is None else encoders_class(mm_cfg)(mm_cfg, text_cfg.hidden_size)
    model.state_dict()
    if encoders is not None:
        encoders.state_dict()


def check(raw: dict) -> None:
    text_cfg = run_contract(lambda: _text(raw), (ConfigError,), SECONDS_PER_INPUT)
    mm = run_contract(lambda: ("ok", media_config_from_hf(raw)), (ConfigError,), SECONDS_PER_INPUT)
    if text_cfg is not None and mm is not None:
        run_contract(lambda: _build(text_cfg, mm[1]), (ConfigError, ValueError), SECONDS_PER_INPUT)


TARGET = Structured(hostile_config(), check)

if __name__ == "__main__":
    main_structured(NAME, TARGET, max_len=16384)
