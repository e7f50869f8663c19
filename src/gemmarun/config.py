"""Typed, frozen model configuration and the per-layer plan derived from it.

Parsing (`from_hf_dict`, and `loading.gguf` for GGUF metadata) is kept apart from derivation
(`derive_layers`). No other module decides a layer's type, width, KV geometry or sharing.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field, replace
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A config value we cannot honour exactly; the message names the key."""


class LayerType(enum.Enum):
    SLIDING = "sliding"
    FULL = "full"


HF_LAYER_TYPES = {"sliding_attention": LayerType.SLIDING, "full_attention": LayerType.FULL}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding for one layer type.

    `rotated_fraction` < 1 is Gemma 4's proportional p-RoPE: only the first
    `int(fraction * head_dim // 2)` frequency pairs rotate, with exponents over the full head dim.
    `factor` divides every frequency (HF "linear" scaling; "proportional" accepts it too).
    """

    theta: float
    rotated_fraction: float = 1.0
    factor: float = 1.0

    def __post_init__(self) -> None:
        for name, ok in (("theta", 0 < self.theta < math.inf), ("factor", 0 < self.factor < math.inf),
                         ("rotated_fraction", 0 <= self.rotated_fraction <= 1)):
            if not ok:
                raise ConfigError(f"rope {name}={getattr(self, name)!r} is out of range")

    def inv_freq(self, head_dim: int) -> "torch.Tensor":
        """Per-pair inverse frequencies (length head_dim // 2, float32, computed as the reference
        does); zeros do not rotate."""
        import torch

        n_rot = int(self.rotated_fraction * head_dim // 2)
        exponents = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).to(torch.float32) / head_dim
        rotated = 1.0 / (self.theta**exponents)
        still = torch.zeros(head_dim // 2 - n_rot, dtype=torch.float32)
        return torch.cat((rotated, still)) / self.factor


@dataclass(frozen=True)
class LayerSpec:
    """Everything one decoder layer needs to know about itself."""

    index: int
    layer_type: LayerType
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # values are the weightless-normed raw key projection (no v_proj)
    kv_source: int  # == index when the layer owns its KV; else the producer it reads
    mlp_dim: int
    moe: bool
    window: int | None  # sliding window (keys visible incl. self), None on full layers
    rope: RopeConfig
    image_blocks: bool = False  # an image's soft tokens see each other (while prefilling)

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.index


@dataclass(frozen=True)
class TextConfig:
    family: str  # "gemma4" or "gemma3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    layer_types: tuple[LayerType, ...]
    sliding_window: int
    rope_sliding: RopeConfig
    rope_full: RopeConfig
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    attention_scale: float = 1.0  # Gemma 4: 1.0 (q/k norms); Gemma 3: query_pre_attn_scalar^-0.5
    global_head_dim: int | None = None
    num_global_kv_heads: int | None = None
    k_eq_v: bool = False
    ple_dim: int = 0  # hidden_size_per_layer_input
    ple_vocab_size: int = 0
    num_kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    expert_dim: int = 0
    bidirectional_vision: bool = False
    has_v_norm: bool = True  # Gemma 4 normalises values (weightless); Gemma 3 does not
    bos_id: int = 2
    eos_ids: tuple[int, ...] = (1,)
    pad_id: int = 0
    layers: tuple[LayerSpec, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_values(self)
        object.__setattr__(self, "layers", derive_layers(self))

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers


_POSITIVE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "intermediate_size", "sliding_window", "max_position_embeddings")
_NON_NEGATIVE = ("ple_dim", "ple_vocab_size", "num_kv_shared_layers", "num_experts", "top_k_experts",
                 "expert_dim", "bos_id", "pad_id")
# Sizes that shape tensors. No real checkpoint comes near the cap (the largest, Gemma's vocabulary,
# is 262144); past it a size is corrupt, and refusing it keeps a hostile file from sizing buffers.
_SHAPING = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "ple_dim", "ple_vocab_size", "num_experts", "expert_dim",
            "global_head_dim", "num_global_kv_heads")
MAX_SIZE = 1 << 20
MAX_LAYERS = 1024  # a layer count past it is a corrupt config (the largest released model has 62)
# Positions and windows are counted in 32 bits (GGUF's uint32 keys, the native kernels): no real
# context comes near it.
MAX_POSITIONS = (1 << 31) - 1


def _check_values(cfg: TextConfig) -> None:
    """Sizes and scales that would crash the model, or silently make it compute garbage, are
    refused here, whichever parser (HF, GGUF) produced them."""
    def bad(name: str, want: str) -> ConfigError:
        return ConfigError(f"{name}={getattr(cfg, name)!r} must be {want}")

    for name in _POSITIVE:
        value = getattr(cfg, name)
        if type(value) is not int or value < 1:
            raise bad(name, "a positive integer")
    for name in _NON_NEGATIVE:
        value = getattr(cfg, name)
        if type(value) is not int or value < 0:
            raise bad(name, "a non-negative integer")
    for name in ("global_head_dim", "num_global_kv_heads"):
        value = getattr(cfg, name)
        if value is not None and (type(value) is not int or value < 1):
            raise bad(name, "a positive integer or null")
    for name in ("final_logit_softcap", "attn_logit_softcap"):
        value = getattr(cfg, name)
        if value is not None and not (type(value) in (int, float) and 0 < value < math.inf):
            raise bad(name, "a positive number or null")
    if not (type(cfg.rms_norm_eps) in (int, float) and 0 <= cfg.rms_norm_eps < math.inf):
        raise bad("rms_norm_eps", "a non-negative number")
    if not (type(cfg.attention_scale) in (int, float) and 0 < cfg.attention_scale < math.inf):
        raise bad("attention_scale", "a positive number")
    for name in _SHAPING:
        if (getattr(cfg, name) or 0) > MAX_SIZE:
            raise bad(name, f"at most {MAX_SIZE}")
    for name in ("sliding_window", "max_position_embeddings"):
        if getattr(cfg, name) > MAX_POSITIONS:
            raise bad(name, f"at most {MAX_POSITIONS}")
    if cfg.ple_dim and not cfg.ple_vocab_size:
        raise bad("ple_vocab_size", "positive when hidden_size_per_layer_input is set")
    if cfg.num_experts and not (1 <= cfg.top_k_experts <= cfg.num_experts and cfg.expert_dim >= 1):
        raise bad("top_k_experts", f"in 1..num_experts={cfg.num_experts}, with a positive expert_dim")
    if any(type(e) is not int or e < 0 for e in cfg.eos_ids):
        raise bad("eos_ids", "non-negative integers")


def derive_layers(cfg: TextConfig) -> tuple[LayerSpec, ...]:
    """The one place that turns config values into per-layer geometry and KV sharing."""
    if len(cfg.layer_types) != cfg.num_layers:
        raise ConfigError(
            f"layer_types has {len(cfg.layer_types)} entries but num_hidden_layers is {cfg.num_layers}"
        )
    if cfg.family == "gemma4" and cfg.layer_types[-1] is not LayerType.FULL:
        raise ConfigError("layer_types: the last Gemma 4 layer must be full_attention")
    first_shared = cfg.first_shared_layer
    if not 0 <= cfg.num_kv_shared_layers < cfg.num_layers:
        raise ConfigError(f"num_kv_shared_layers={cfg.num_kv_shared_layers} out of range")
    producers: dict[LayerType, int] = {}
    for i in range(first_shared):
        producers[cfg.layer_types[i]] = i
    specs = []
    for i, lt in enumerate(cfg.layer_types):
        full = lt is LayerType.FULL
        head_dim = cfg.global_head_dim if (full and cfg.global_head_dim) else cfg.head_dim
        kv_heads = cfg.num_kv_heads
        if full and cfg.k_eq_v and cfg.num_global_kv_heads:
            kv_heads = cfg.num_global_kv_heads
        shared = i >= first_shared
        if shared and lt not in producers:
            raise ConfigError(
                f"num_kv_shared_layers: layer {i} ({lt.value}) has no earlier non-shared layer of its type"
            )
        if cfg.num_heads % kv_heads:
            raise ConfigError(f"num_attention_heads={cfg.num_heads} not divisible by {kv_heads} KV heads")
        specs.append(
            LayerSpec(
                index=i,
                layer_type=lt,
                head_dim=head_dim,
                num_kv_heads=kv_heads,
                k_eq_v=full and cfg.k_eq_v,
                kv_source=producers[lt] if shared else i,
                mlp_dim=cfg.intermediate_size * (2 if (cfg.double_wide_mlp and shared) else 1),
                moe=cfg.num_experts > 0,
                window=None if full else cfg.sliding_window,
                rope=cfg.rope_full if full else cfg.rope_sliding,
                # Gemma 4: sliding layers only (spec 3.3); Gemma 3: every layer
                image_blocks=cfg.bidirectional_vision and (not full or cfg.family == "gemma3"),
            )
        )
    return tuple(specs)


# --------------------------------------------------------------------------------------------
# Parsing HF config.json
# --------------------------------------------------------------------------------------------

# Keys that never change inference math (bookkeeping, training-only, or tokenizer-side).
_INERT_KEYS = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "initializer_range",
    "use_cache", "attention_dropout", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_activation", "attention_bias", "rope_parameters", "rope_scaling",
    "rope_theta", "rope_local_base_freq", "layer_types", "sliding_window_pattern", "_sliding_window_pattern",
    "max_position_embeddings", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "sliding_window", "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar",
    "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "hidden_size_per_layer_input",
    "vocab_size_per_layer_input", "num_kv_shared_layers", "use_double_wide_mlp", "enable_moe_block",
    "num_experts", "top_k_experts", "moe_intermediate_size", "use_bidirectional_attention",
    "output_attentions", "output_hidden_states", "return_dict", "name_or_path", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "add_cross_attention",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "cache_implementation", "router_aux_loss_coef", "output_router_logits",
    "per_layer_config",
}


_REQUIRED: Any = object()


def _hf_value(tc: dict[str, Any], key: str, default: Any, kinds: tuple[type, ...], want: str) -> Any:
    """A config.json value of the JSON type transformers' strict config classes take: 64, not
    "64", 64.5 or true, which they refuse and `int()` would have quietly made something of. A
    missing or null key gives `default` (a KeyError where the key is required)."""
    if tc.get(key) is None and default is _REQUIRED:
        if key in tc:
            raise ConfigError(f"{key}=null must be {want}")
        raise KeyError(key)
    return _hf_checked(tc, key, default, lambda v: type(v) in kinds, want, None)


def _typed(value: Any, key: str, kinds: tuple[type, ...], want: str) -> Any:
    if type(value) not in kinds:
        raise ConfigError(f"{key}={_shown(value)} must be {want}")
    return value


def _hf_int(tc: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    return _hf_value(tc, key, default, (int,), "an integer")


def _hf_number(tc: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = _hf_value(tc, key, default, (int, float), "a number")
    if value is None or type(value) is float:
        return value
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{key}={_shown(value)} is out of a float's range") from None


# Checked readers of any config section (a tower's sub-config, vision_config or audio_config, too:
# its keys are named with their section in messages).


def _hf_checked(d: dict[str, Any], key: str, default: Any, ok: Callable[[Any], bool], want: str,
                section: str | None) -> Any:
    """`d[key]` if `ok` says it is `want`; `default` where missing or null."""
    value = d.get(key)
    if value is None:
        return default
    if not ok(value):
        raise ConfigError(f"{section + '.' if section else ''}{key}={_shown(value)} must be {want}")
    return value


def hf_section(raw: dict[str, Any], key: str, section: str | None = None) -> dict[str, Any] | None:
    """A composite config's sub-config (inside `section`): an object, or None where it is absent
    or null."""
    return _hf_checked(raw, key, None, lambda v: isinstance(v, dict), "an object", section)


def hf_positive_int(d: dict[str, Any], key: str, default: int | None, section: str | None = None,
                    maximum: int = MAX_SIZE) -> int | None:
    """An integer in 1..maximum (sizes: MAX_SIZE; layer counts: MAX_LAYERS)."""
    return _hf_checked(d, key, default, lambda v: type(v) is int and 1 <= v <= maximum,
                       f"an integer in 1..{maximum}", section)


def hf_number(d: dict[str, Any], key: str, default: float, section: str, positive: bool = False) -> float:
    """A finite number; with `positive`, above 0."""
    value = _hf_checked(d, key, default, lambda v: type(v) in (int, float) and -1e308 < v < 1e308
                        and (v > 0 or not positive), f"a {'positive' if positive else 'finite'} number", section)
    return float(value)


def hf_token_id(raw: dict[str, Any], key: str, default: int, alias: str | None = None) -> int:
    """A token id under `key`, or else its `alias`."""
    if raw.get(key) is None and alias is not None:
        key = alias
    return _hf_checked(raw, key, default, lambda v: type(v) is int and 0 <= v < 2**31, "a token id", None)


def hf_bool(d: dict[str, Any], key: str, default: bool, section: str | None = None) -> bool:
    return _hf_checked(d, key, default, lambda v: type(v) is bool, "true or false", section)


def _hf_object(tc: dict[str, Any], key: str) -> dict[str, Any]:
    return hf_section(tc, key) or {}


def _rope_from_hf(params: Any, key: str, default_theta: float) -> RopeConfig:
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{key}={_shown(params)} must be an object")
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = _hf_number(params, "rope_theta", default_theta)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "proportional":
        return RopeConfig(
            theta=theta,
            rotated_fraction=_hf_number(params, "partial_rotary_factor", 1.0),
            factor=_hf_number(params, "factor", 1.0),
        )
    if rope_type == "linear":
        return RopeConfig(theta=theta, factor=_hf_number(params, "factor"))
    raise ConfigError(f"{key}: rope_type {rope_type!r} is not supported (default, proportional, linear)")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return (1,)
    values = value if isinstance(value, list) else [value]
    return tuple(_typed(v, "eos_token_id", (int,), "an integer") for v in values)


def _text_section(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(text section, family). `gemma4_unified` (spec 7.1) has a plain Gemma 4 text decoder."""
    model_type = raw.get("model_type")
    if model_type in ("gemma4", "gemma3", "gemma4_unified") and "text_config" in raw:
        return hf_section(raw, "text_config") or {}, "gemma3" if model_type == "gemma3" else "gemma4"
    if model_type in ("gemma4_text", "gemma3_text", "gemma4_unified_text"):
        return raw, "gemma3" if model_type == "gemma3_text" else "gemma4"
    if model_type in ("gemma4", "gemma3", "gemma4_unified"):  # (the message had listed it as unsupported)
        raise ConfigError(f"model_type {model_type!r} needs a text_config section (the text model's settings)")
    raise ConfigError(
        f"model_type {model_type!r} is not supported "
        "(gemma4, gemma4_text, gemma4_unified, gemma4_unified_text, gemma3, gemma3_text)"
    )


def _full_layer_overrides(tc: dict[str, Any], layer_types: tuple[LayerType, ...]) -> tuple[Any, Any]:
    """(global_head_dim, num_global_key_value_heads). transformers 5.23's save_pretrained writes
    them as `per_layer_config` ({"5": {"head_dim": .., "num_key_value_heads": ..}}), which wins
    over the released keys when both are present, as in the reference."""
    per_layer = _hf_object(tc, "per_layer_config")
    if not per_layer:
        return _hf_int(tc, "global_head_dim", None), _hf_int(tc, "num_global_key_value_heads", None)
    full = {i for i, t in enumerate(layer_types) if t is LayerType.FULL}
    seen = set()
    for key, override in per_layer.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= len(layer_types):  # ("²" is a digit)
            raise ConfigError(f"per_layer_config: {key!r} is not a layer index")
        override = hf_section(per_layer, key, "per_layer_config") or {}
        if int(key) not in full:
            raise ConfigError(f"per_layer_config.{key}: overrides on a sliding layer are not supported")
        extra = sorted(set(override) - {"head_dim", "num_key_value_heads"})
        if extra:
            raise ConfigError(f"per_layer_config.{key}: unsupported keys {', '.join(extra)}")
        try:
            seen.add((_hf_int(override, "head_dim", None), _hf_int(override, "num_key_value_heads", None)))
        except ConfigError as e:
            raise ConfigError(f"per_layer_config.{key}.{e}") from None
    if len(seen) != 1 or {int(k) for k in per_layer} != full:
        raise ConfigError("per_layer_config: every full_attention layer must carry the same override")
    return next(iter(seen))


# transformers' Gemma3TextConfig defaults: Gemma 3's multimodal checkpoints (gemma-3-4b-it and up)
# name only a few text keys and rely on these for the rest.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "rope_theta": 1e6,
    "rope_local_base_freq": 1e4,
}


def _sliding_window(window: Any, layer_types: tuple[LayerType, ...]) -> int:
    """null is refused where a layer slides (the reference fails on it too); a model without
    sliding layers never reads the window."""
    if window is None:
        if LayerType.SLIDING in layer_types:
            raise ConfigError("sliding_window=null, but the model has sliding_attention layers")
        return 512
    return _typed(window, "sliding_window", (int,), "an integer")


def text_config_from_hf(raw: dict[str, Any]) -> TextConfig:
    """Parse a HF `config.json` dict. Values that would change the math and that we do not
    implement raise `ConfigError` naming the key."""
    tc, family = _text_section(raw)
    if family == "gemma3":
        tc = {**GEMMA3_TEXT_DEFAULTS, **tc}
    unknown = sorted(k for k in tc if k not in _INERT_KEYS and not k.startswith("_"))
    if unknown:
        # Unknown keys are reported, never silently honoured or dropped.
        import logging

        logging.getLogger("gemmarun").info("config keys not used by gemmarun: %s", ", ".join(unknown))
    if tc.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"hidden_activation={tc['hidden_activation']!r} is not supported")
    if hf_bool(tc, "attention_bias", False):
        raise ConfigError("attention_bias=true is not supported (Gemma has no attention biases)")
    # A composite config's class (ForConditionalGeneration) ties its head by its own top-level
    # flag, whatever its text_config says (transformers 5.23): one untied there had loaded with the
    # embedding as its head, silently, and one tied there had been refused.
    composite = "text_config" in raw and raw.get("model_type") in ("gemma4", "gemma3", "gemma4_unified")
    if not hf_bool(raw if composite else tc, "tie_word_embeddings", True):
        raise ConfigError("tie_word_embeddings=false is not supported (Gemma ties its head)")
    num_layers = _hf_int(tc, "num_hidden_layers")
    if not 1 <= num_layers <= MAX_LAYERS:  # checked before the per-layer plan loops over it
        raise ConfigError(f"num_hidden_layers={num_layers} must be in 1..{MAX_LAYERS}")
    unified = str(raw.get("model_type", "")).startswith("gemma4_unified")
    bidir = tc.get("use_bidirectional_attention", "vision" if unified else None)  # the classes' defaults
    if family == "gemma4" and bidir not in (None, "vision"):
        raise ConfigError(f"use_bidirectional_attention={bidir!r} is not supported (null, 'vision')")
    if family == "gemma3" and bidir:
        raise ConfigError("use_bidirectional_attention=true (Gemma 3 embedding model) is not supported")

    if tc.get("layer_types") is not None:
        names = tc["layer_types"]
        if not isinstance(names, list) or not all(isinstance(t, str) for t in names):
            raise ConfigError(f"layer_types={_shown(names)} must be a list of layer type names")
        try:
            layer_types = tuple(HF_LAYER_TYPES[t] for t in names)
        except KeyError as e:
            raise ConfigError(f"layer_types: unknown layer type {e.args[0]!r}") from None
    else:
        pattern = tc.get("sliding_window_pattern", 6)
        layer_types = layer_types_from_pattern(pattern, num_layers, "sliding_window_pattern")

    rope = _hf_object(tc, "rope_parameters")
    if "full_attention" in rope or "sliding_attention" in rope:
        rope_full = _rope_from_hf(rope.get("full_attention"), "rope_parameters.full_attention", 1e6)
        rope_sliding = _rope_from_hf(
            rope.get("sliding_attention"), "rope_parameters.sliding_attention", 1e4
        )
    elif family == "gemma3":  # legacy flat keys
        rope_full = _rope_from_hf(
            {**_hf_object(tc, "rope_scaling"), "rope_theta": tc.get("rope_theta", 1e6)}, "rope_scaling", 1e6
        )
        rope_sliding = RopeConfig(theta=_hf_number(tc, "rope_local_base_freq", 1e4))
    else:
        rope_full = RopeConfig(theta=1e6, rotated_fraction=0.25)
        rope_sliding = RopeConfig(theta=1e4)

    common = dict(
        family=family,
        vocab_size=_hf_int(tc, "vocab_size"),
        hidden_size=_hf_int(tc, "hidden_size"),
        num_layers=num_layers,
        num_heads=_hf_int(tc, "num_attention_heads"),
        num_kv_heads=_hf_int(tc, "num_key_value_heads"),
        head_dim=_hf_int(tc, "head_dim", 256),
        intermediate_size=_hf_int(tc, "intermediate_size"),
        layer_types=layer_types,
        sliding_window=_sliding_window(tc.get("sliding_window", 512), layer_types),
        rope_sliding=rope_sliding,
        rope_full=rope_full,
        rms_norm_eps=_hf_number(tc, "rms_norm_eps", 1e-6),
        max_position_embeddings=_hf_int(tc, "max_position_embeddings", 131072),
        final_logit_softcap=_hf_number(tc, "final_logit_softcapping", None),
        bos_id=_hf_int(tc, "bos_token_id", 2),
        eos_ids=_eos_ids(raw.get("eos_token_id", tc.get("eos_token_id"))),
        pad_id=_hf_int(tc, "pad_token_id", 0),
    )
    if family == "gemma3":
        # attn_logit_softcapping stays unused: Gemma 3's attention in the reference (and llama.cpp)
        # never applies it, whatever the config says.
        scalar = _hf_number(tc, "query_pre_attn_scalar")
        if not 0 < scalar < math.inf:
            raise ConfigError(f"query_pre_attn_scalar={_shown(scalar)} must be a positive number")
        if composite:  # Gemma3ForConditionalGeneration applies no final softcap (the released configs: null)
            common["final_logit_softcap"] = None
        # its image tokens see each other in every layer (the reference's token_type_ids masks)
        return TextConfig(**common, attention_scale=scalar**-0.5, has_v_norm=False,
                          bidirectional_vision=composite and bool(raw.get("vision_config")))
    global_head_dim, global_kv_heads = _full_layer_overrides(tc, layer_types)
    moe = hf_bool(tc, "enable_moe_block", False)
    if moe and not (tc.get("num_experts") and tc.get("top_k_experts") and tc.get("moe_intermediate_size")):
        raise ConfigError("enable_moe_block=true needs num_experts, top_k_experts, moe_intermediate_size")
    ple_dim = _hf_int(tc, "hidden_size_per_layer_input", 0)
    return TextConfig(
        **common,
        global_head_dim=global_head_dim or 512,  # the reference class default
        num_global_kv_heads=global_kv_heads,
        k_eq_v=hf_bool(tc, "attention_k_eq_v", False),
        ple_dim=ple_dim,
        ple_vocab_size=_hf_int(tc, "vocab_size_per_layer_input", common["vocab_size"]) if ple_dim else 0,
        num_kv_shared_layers=_hf_int(tc, "num_kv_shared_layers", 0),
        double_wide_mlp=hf_bool(tc, "use_double_wide_mlp", False),
        num_experts=_hf_int(tc, "num_experts") if moe else 0,
        top_k_experts=_hf_int(tc, "top_k_experts") if moe else 0,
        expert_dim=_hf_int(tc, "moe_intermediate_size") if moe else 0,
        bidirectional_vision=bidir == "vision",
    )


def json_problem(e: ValueError | RecursionError) -> str:
    """What json.loads objected to, in one line."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return " ".join(str(e).split())[:200]


def read_json_object(path: Path, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A JSON file that holds an object (config.json, tokenizer_config.json, a shard index), or
    `error` with one line naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, over-long integer or too deep nesting
        raise error(f"{path}: not valid JSON ({json_problem(e)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


def load_hf_config(folder: str | Path) -> TextConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model folder")
    return text_config_from_file(path)


_Parsed = TypeVar("_Parsed")


def text_config_from_file(path: Path) -> TextConfig:
    """A HF config.json's text config; every problem a one-line ConfigError naming the file."""
    return config_from_file(path, text_config_from_hf)


def config_from_file(path: Path, parse: Callable[[dict[str, Any]], _Parsed]) -> _Parsed:
    """`parse` of a JSON config file; every problem in it a one-line ConfigError naming the file
    (a missing key, a value of the wrong type)."""
    raw = read_json_object(path)
    try:
        return parse(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"{path}: required key {e.args[0]!r} is missing") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:  # a value of the wrong type
        raise ConfigError(f"{path}: malformed config ({type(e).__name__}: {' '.join(str(e).split())})") from None


# --------------------------------------------------------------------------------------------
# The speculative-decoding drafter (`gemma4_assistant`, spec 7)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssistantConfig:
    """A Gemma 4 MTP drafter: a small Gemma 4 text stack whose every layer reads the keys and
    values of its target's producer layers, plus the projections between the two hidden sizes.

    `text` is parsed with no KV sharing (every drafter layer would be a consumer, which a plain
    TextConfig cannot express); `layers` is the drafter's real plan: each spec's `kv_source` is
    `external_kv_slot(type)`, a slot numbered past the drafter's own layers where the target's
    producer of that type is put, so no drafter layer owns KV. Sliding specs see `window + 1`
    keys: the reference's bidirectional window is inclusive (|q - k| <= window), measured from the
    newest key the target has written.
    """

    text: TextConfig
    backbone_hidden_size: int  # the target's hidden size
    use_ordered_embeddings: bool = False  # the centroid ("masked embedding") head
    num_centroids: int = 2048
    centroid_top_k: int = 32  # centroid_intermediate_top_k
    layers: tuple[LayerSpec, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        t = self.text
        for ok, message in (
            (t.family == "gemma4", "a gemma4_assistant drafter has a Gemma 4 text config"),
            (t.ple_dim == 0, "hidden_size_per_layer_input must be 0 in a drafter"),
            (t.num_experts == 0, "enable_moe_block must be false in a drafter"),
            (not t.double_wide_mlp, "use_double_wide_mlp must be false in a drafter"),
            (t.num_kv_shared_layers == 0, "the drafter's text config is parsed without KV sharing"),
            (not self.use_ordered_embeddings or (self.num_centroids > 0 and t.vocab_size % self.num_centroids == 0),
             f"num_centroids={self.num_centroids} must divide vocab_size={t.vocab_size}"),
            (not self.use_ordered_embeddings or 0 < self.centroid_top_k <= self.num_centroids,
             f"centroid_intermediate_top_k={self.centroid_top_k} must be in 1..num_centroids"),
        ):
            if not ok:
                raise ConfigError(message)
        specs = tuple(
            replace(spec, kv_source=self.external_kv_slot(spec.layer_type),
                    window=None if spec.window is None else spec.window + 1)
            for spec in t.layers
        )
        object.__setattr__(self, "layers", specs)

    def external_kv_slot(self, layer_type: LayerType) -> int:
        """Where the target's producer of `layer_type` sits among the keys the drafter reads."""
        return self.text.num_layers + (0 if layer_type is LayerType.SLIDING else 1)


def assistant_config_from_hf(raw: dict[str, Any]) -> AssistantConfig:
    """Parse a HF `gemma4_assistant` config.json dict (names from transformers 5.23's
    `Gemma4AssistantConfig`)."""
    if raw.get("model_type") != "gemma4_assistant":
        raise ConfigError(f"model_type {raw.get('model_type')!r} is not a drafter (gemma4_assistant)")
    tc = raw.get("text_config")
    if not isinstance(tc, dict):
        raise ConfigError("gemma4_assistant config has no text_config object")
    num_layers = tc.get("num_hidden_layers")
    shared = tc.get("num_kv_shared_layers") or 0
    if shared not in (0, num_layers):  # the reference fills 0 in as "all layers"
        raise ConfigError(f"text_config.num_kv_shared_layers={shared}: every drafter layer must be shared ({num_layers})")
    if not hf_bool(raw, "tie_word_embeddings", True):
        raise ConfigError("tie_word_embeddings=false is not supported (the drafter ties its head)")
    text = text_config_from_hf({**tc, "model_type": tc.get("model_type", "gemma4_text"), "num_kv_shared_layers": 0})
    if "backbone_hidden_size" not in raw:
        raise ConfigError("gemma4_assistant config has no backbone_hidden_size")
    return AssistantConfig(
        text=text,
        backbone_hidden_size=_hf_int(raw, "backbone_hidden_size"),
        use_ordered_embeddings=hf_bool(raw, "use_ordered_embeddings", False),
        num_centroids=_hf_int(raw, "num_centroids", 2048),
        centroid_top_k=_hf_int(raw, "centroid_intermediate_top_k", 32),
    )


# --------------------------------------------------------------------------------------------
# Parsing GGUF metadata (llama.cpp conventions, spec section 10)
# --------------------------------------------------------------------------------------------

GGUF_ARCHITECTURES = ("gemma4", "gemma3")
GGUF_ASSISTANT_ARCHITECTURE = "gemma4-assistant"  # llama.cpp's name for a gemma4_assistant drafter


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def gguf_int(value: Any, key: str, minimum: int = 1) -> int:
    """An integer metadata value; GGUF stores these as integers, so anything else is corrupt."""
    if type(value) is not int or value < minimum:
        raise ConfigError(f"GGUF metadata {key}={_shown(value)} is not an integer >= {minimum}")
    return value


def gguf_float(value: Any, key: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ConfigError(f"GGUF metadata {key}={_shown(value)} is not a finite number")
    return float(value)


def layer_types_from_pattern(pattern: Any, n: int, key: str) -> tuple[LayerType, ...]:
    """A sliding-window pattern as checkpoints write it: an integer P means every P-th layer is
    full and the rest sliding (HF's `sliding_window_pattern`, llama.cpp's swa pattern); a list
    says per layer whether it slides (GGUF); a single true/false holds for every layer."""
    if isinstance(pattern, bool) or (isinstance(pattern, list) and all(isinstance(s, bool) for s in pattern)):
        return tuple(LayerType.SLIDING if s else LayerType.FULL for s in _per_layer(pattern, n, key))
    if isinstance(pattern, int) and 1 <= pattern <= MAX_SIZE:
        return tuple(LayerType.FULL if (i + 1) % pattern == 0 else LayerType.SLIDING for i in range(n))
    raise ConfigError(f"{key}={_shown(pattern)} must be a positive integer period or one true/false per layer")


def _per_layer(value: Any, n: int, key: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise ConfigError(f"{key} has {len(value)} entries for {n} layers")
        return value
    return [value] * n


# Gemma 3's RoPE scaling keys in a GGUF (the factor's older key too), and the linear factor every
# released Gemma 3 with a vision tower (4B, 12B, 27B) applies on its full layers
GGUF_ROPE_SCALING_KEYS = ("rope.scaling.type", "rope.scaling.factor", "rope.scale_linear")
GEMMA3_VISION_ROPE_FACTOR = 8.0
# Ollama's converter writes no RoPE scaling for Gemma 3, and its older files give the 1B a final
# softcap of 30 (the checkpoint has none). Its runtime corrects sliding-window files of the released
# sizes by their layer count, and so does the reader here: the 4B, 12B and 27B get the factor
# above, the 1B no softcap. (`gemmarun convert` writes these sizes so that nothing is corrected.)
GEMMA3_SCALED_LAYER_COUNTS = frozenset({34, 48, 62})
GEMMA3_1B_LAYER_COUNT = 26


def gemma3_ollama_corrections(num_layers: int, sliding_window: int, context: int) -> tuple[bool, bool]:
    """(RoPE factor 8 where the file has no scaling key, no final softcap): Ollama's corrections."""
    released = sliding_window < context
    return released and num_layers in GEMMA3_SCALED_LAYER_COUNTS, released and num_layers == GEMMA3_1B_LAYER_COUNT


def gemma3_gguf_attention_scale(num_layers: int, hidden: int, num_heads: int, head_dim: int) -> float:
    """The query scale a Gemma 3 GGUF implies (GGUF has no key for it). llama.cpp: the 27B (62
    layers) scales by (hidden / heads)^-0.5, every other size by head_dim^-0.5."""
    return (hidden // num_heads if num_layers == 62 else head_dim) ** -0.5


def text_config_from_gguf(
    meta: dict[str, Any],
    tensor_shapes: dict[str, tuple[int, ...]],
    rope_freqs: list[float] | None = None,
    drafter: bool = False,
) -> TextConfig:
    """Map GGUF metadata onto the same TextConfig the HF path builds.

    Supplies what llama.cpp hard-codes and files may lack: Gemma 3's 5:1 pattern, local RoPE
    base 1e4 and attention scale; Gemma 4's p-RoPE fraction comes from the `rope_freqs`
    divisors (1.0 = rotating pair) and K=V from the absence of `attn_v` on full layers, exactly
    as llama.cpp reads them. Every value is type- and range-checked: a corrupt or hostile file
    is a ConfigError naming the key. `drafter`: a `gemma4-assistant` file, read as Gemma 4 text
    with no KV sharing of its own (every layer reads the target's).
    """
    arch = meta.get("general.architecture")
    expected = (GGUF_ASSISTANT_ARCHITECTURE,) if drafter else GGUF_ARCHITECTURES
    if arch not in expected:
        what = "a drafter" if drafter else "supported"
        raise ConfigError(f"general.architecture={_shown(arch)} is not {what} ({', '.join(expected)})")

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ConfigError(f"GGUF metadata key {full!r} is missing")
        return default

    def integer(key: str, default: Any = KeyError, minimum: int = 1) -> int:
        return gguf_int(get(key, default), f"{arch}.{key}", minimum)

    def number(key: str, default: float) -> float:
        return gguf_float(get(key, default), f"{arch}.{key}")

    def per_layer_ints(key: str) -> list[int]:
        return [gguf_int(v, f"{arch}.{key}") for v in _per_layer(get(key), n, key)]

    def token_id(key: str, default: int) -> int:
        return gguf_int(meta.get(f"tokenizer.ggml.{key}", default), f"tokenizer.ggml.{key}", 0)

    def rows(tensor: str) -> int:
        shape = tensor_shapes.get(tensor)
        if shape is None:
            raise ConfigError(f"GGUF has no {tensor} tensor")
        if len(shape) != 2 or shape[0] < 1:
            raise ConfigError(f"GGUF tensor {tensor} has shape {list(shape)}, expected [rows, width]")
        return shape[0]

    n = integer("block_count")
    if n > len(tensor_shapes):  # every layer has tensors: a larger count is corrupt, not a model
        raise ConfigError(f"{arch}.block_count={n} but the file holds only {len(tensor_shapes)} tensors")
    vocab = rows("token_embd.weight")
    hidden = integer("embedding_length")
    layer_types = layer_types_from_pattern(get("attention.sliding_window_pattern", 6), n,
                                           f"{arch}.attention.sliding_window_pattern")
    kv_heads = per_layer_ints("attention.head_count_kv")
    ffn = per_layer_ints("feed_forward_length")
    num_heads = per_layer_ints("attention.head_count")[0]
    first_full = layer_types.index(LayerType.FULL) if LayerType.FULL in layer_types else 0
    first_sliding = layer_types.index(LayerType.SLIDING) if LayerType.SLIDING in layer_types else 0
    eos = [token_id("eos_token_id", 1)]
    if "tokenizer.ggml.eot_token_id" in meta:
        eos.append(token_id("eot_token_id", 1))
    final_softcap = get("final_logit_softcapping", None)
    common = dict(
        family="gemma4" if drafter else arch,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=n,
        num_heads=num_heads,
        num_kv_heads=kv_heads[first_sliding],
        intermediate_size=ffn[0],
        layer_types=layer_types,
        sliding_window=integer("attention.sliding_window", 512),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=integer("context_length", 131072),
        final_logit_softcap=None if final_softcap is None else number("final_logit_softcapping", 0.0),
        bos_id=token_id("bos_token_id", 2),
        eos_ids=tuple(eos),
        pad_id=token_id("padding_token_id", 0),
    )
    if arch == "gemma3":
        head_dim = integer("attention.key_length", max(hidden // num_heads, 1))
        scaling = get("rope.scaling.type", "linear")  # llama.cpp's default when the key is absent
        if scaling not in ("none", "linear"):
            raise ConfigError(f"{arch}.rope.scaling.type={_shown(scaling)} is not supported (linear)")
        # llama.cpp reads the factor's old key, rope.scale_linear, too, and takes 0 as unscaled
        factor = number("rope.scaling.factor", number("rope.scale_linear", 1.0)) if scaling == "linear" else 1.0
        factor = factor or 1.0
        scaled, uncapped = gemma3_ollama_corrections(n, common["sliding_window"], common["max_position_embeddings"])
        if scaled and not any(f"{arch}.{key}" in meta for key in GGUF_ROPE_SCALING_KEYS):
            factor = GEMMA3_VISION_ROPE_FACTOR
        if uncapped:
            common["final_logit_softcap"] = None
        if hidden // num_heads < 1:
            raise ConfigError(f"{arch}.embedding_length={hidden} is smaller than attention.head_count={num_heads}")
        return TextConfig(  # no attention softcap: llama.cpp's gemma3 graph has none (see the HF parse)
            **common,
            head_dim=head_dim,
            rope_full=RopeConfig(theta=number("rope.freq_base", 1e6), factor=factor),
            rope_sliding=RopeConfig(theta=number("rope.freq_base_swa", 1e4)),
            attention_scale=gemma3_gguf_attention_scale(n, hidden, num_heads, head_dim),
            has_v_norm=False,
        )

    head_dim = integer("attention.key_length_swa", get("attention.key_length"))
    global_head_dim = integer("attention.key_length", head_dim)
    shared = 0 if drafter else integer("attention.shared_kv_layers", 0, minimum=0)
    if shared >= n:
        raise ConfigError(f"{arch}.attention.shared_kv_layers={shared} is not below block_count={n}")
    ple_dim = integer("embedding_length_per_layer_input", 0, minimum=0)
    k_eq_v = f"blk.{first_full}.attn_v.weight" not in tensor_shapes and first_full < n - shared
    if rope_freqs is not None:  # p-RoPE as llama.cpp writes it: 1.0 for the pairs that rotate, then 1e30
        rotated = next((i for i, f in enumerate(rope_freqs) if f != 1.0), len(rope_freqs))
        fraction = 2 * rotated / global_head_dim
    else:
        fraction = 0.25
    global_kv = kv_heads[first_full]
    if global_kv != kv_heads[first_sliding] and not k_eq_v:
        raise ConfigError("attention.head_count_kv differs on full layers without K=V, which Gemma 4 does not define")
    n_experts = integer("expert_count", 0, minimum=0)
    cfg = TextConfig(
        **common,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_kv_heads=global_kv if k_eq_v else None,
        k_eq_v=k_eq_v,
        rope_full=RopeConfig(theta=number("rope.freq_base", 1e6), rotated_fraction=fraction),
        rope_sliding=RopeConfig(theta=number("rope.freq_base_swa", 1e4)),
        ple_dim=ple_dim,
        ple_vocab_size=rows("per_layer_token_embd.weight") if ple_dim else 0,
        num_kv_shared_layers=shared,
        double_wide_mlp=any(ffn[i] == 2 * ffn[0] for i in range(n - shared, n)) if shared else False,
        num_experts=n_experts,
        top_k_experts=integer("expert_used_count", 0, minimum=0) if n_experts else 0,
        expert_dim=integer("expert_feed_forward_length", 0, minimum=0) if n_experts else 0,
        # GGUF has no key for use_bidirectional_attention: every released checkpoint without PLE
        # (31B, 26B-A4B) has "vision", every one with it (E2B, E4B) null
        bidirectional_vision=not ple_dim and not drafter,
    )
    derived = [spec.mlp_dim for spec in cfg.layers]
    if derived != ffn:
        raise ConfigError(f"{arch}.feed_forward_length {ffn} does not match the layer plan {derived}")
    if rope_freqs is not None and (len(rope_freqs) != global_head_dim // 2
                                   or not all(f >= 1e29 for f in rope_freqs[rotated:])):
        raise ConfigError(f"rope_freqs.weight must be {global_head_dim // 2} values, 1.0 for the pairs that rotate "
                          "then 1e30 (p-RoPE); other frequency factors are not supported")
    return cfg


def assistant_config_from_gguf(
    meta: dict[str, Any],
    tensor_shapes: dict[str, tuple[int, ...]],
    rope_freqs: list[float] | None = None,
) -> AssistantConfig:
    """A drafter as llama.cpp's converter writes it (`gemma4-assistant`): a Gemma 4 text model's
    keys under its own prefix, plus the target's hidden size. The converter drops the centroid
    head, so the drafter's head is the full tied one (slower drafts, the same output: speculation
    never changes what is accepted). K=V, which the text parse reads off the absent attn_v, is
    inert in a drafter, whose layers project no keys or values."""
    text = text_config_from_gguf(meta, tensor_shapes, rope_freqs, drafter=True)
    key = f"{GGUF_ASSISTANT_ARCHITECTURE}.embedding_length_out"
    if key not in meta:
        raise ConfigError(f"GGUF metadata key {key!r} (the target's hidden size) is missing")
    return AssistantConfig(text=text, backbone_hidden_size=gguf_int(meta[key], key))
