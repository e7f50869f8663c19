"""The encoder-free "unified" Gemma 4 variant (`gemma4_unified`, spec 7.1): media embedders.

There is no vision or audio tower. An image soft token is one raw 48x48 RGB patch (6912 values)
taken through LayerNorm -> Linear -> LayerNorm -> + factorised 2-D position table -> LayerNorm ->
weightless RMSNorm -> Linear; an audio soft token is one raw 640-sample waveform frame taken
through weightless RMSNorm -> Linear. The text decoder is a plain Gemma 4 decoder.

`UnifiedEncoders` has the interface of `multimodal.Encoders` (`cfg.tokens`,
`cfg.image_soft_tokens`, `images`, `audio`) so the LLM code can hold either. Its tensor names are
the checkpoint's minus `model.` (`vision_embedder.patch_ln1.weight`,
`embed_vision.embedding_projection.weight`, `embed_audio.embedding_projection.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import MAX_SIZE, ConfigError, hf_number, hf_positive_int, hf_section
from .layers import rms_norm
from .multimodal import MediaTokens, media_tokens_from_hf

LAYER_NORM_EPS = 1e-5  # the reference's nn.LayerNorm default; not a config value
# Keys any transformers sub-config may carry that never change inference math.
_GENERIC_KEYS = {
    "model_type", "initializer_range", "dtype", "torch_dtype", "transformers_version", "architectures",
    "name_or_path", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "add_cross_attention",
    "tokenizer_class", "prefix", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "tie_word_embeddings",
}


@dataclass(frozen=True)
class UnifiedVisionConfig:
    """`Gemma4UnifiedVisionConfig`: raw-patch geometry and the embedder's widths."""

    patch_size: int = 16  # the processor's "teacher" patch
    pooling_kernel_size: int = 3  # k x k teacher patches form one 48-pixel model patch
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120  # rows of the [size, 2, mm_embed_dim] position table
    output_proj_dims: int = 3840  # input width of the final projection (= mm_embed_dim)
    rms_norm_eps: float = 1e-6

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.model_patch_size**2


@dataclass(frozen=True)
class UnifiedAudioConfig:
    """`Gemma4UnifiedAudioConfig`: one soft token per `audio_embed_dim` raw samples."""

    audio_embed_dim: int = 640  # = samples per token (40 ms at 16 kHz)
    rms_norm_eps: float = 1e-6

    @property
    def samples_per_token(self) -> int:
        return self.audio_embed_dim


@dataclass(frozen=True)
class UnifiedConfig:
    """Same field names as `MultimodalConfig`, so code reading `.tokens` / `.image_soft_tokens`
    / `.vision` / `.audio` works for both variants."""

    vision: UnifiedVisionConfig | None
    audio: UnifiedAudioConfig | None
    tokens: MediaTokens
    image_soft_tokens: int = 280  # the processor's default max_soft_tokens / image_seq_length


def _check_keys(d: dict[str, Any], section: str, known: set[str]) -> None:
    unknown = sorted(k for k in d if k not in known and k not in _GENERIC_KEYS and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{section}: unsupported keys {', '.join(unknown)}")


def unified_vision_config_from_hf(d: dict[str, Any]) -> UnifiedVisionConfig:
    s = "vision_config"
    if d.get("model_type", "gemma4_unified_vision") != "gemma4_unified_vision":
        raise ConfigError(f"{s}.model_type={d['model_type']!r} is not supported (gemma4_unified_vision)")
    _check_keys(d, s, {"patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size",
                       "output_proj_dims", "rms_norm_eps", "model_patch_size"})
    cfg = UnifiedVisionConfig(
        patch_size=hf_positive_int(d, "patch_size", 16, s),
        pooling_kernel_size=hf_positive_int(d, "pooling_kernel_size", 3, s),
        mm_embed_dim=hf_positive_int(d, "mm_embed_dim", 3840, s),
        mm_posemb_size=hf_positive_int(d, "mm_posemb_size", 1120, s),
        output_proj_dims=hf_positive_int(d, "output_proj_dims", 3840, s),
        rms_norm_eps=hf_number(d, "rms_norm_eps", 1e-6, s, positive=True),
    )
    if cfg.patch_dim > MAX_SIZE:
        raise ConfigError(f"{s}: patch_size={cfg.patch_size} x pooling_kernel_size={cfg.pooling_kernel_size} "
                          "is past any image model's patch")
    if d.get("model_patch_size", cfg.model_patch_size) != cfg.model_patch_size:
        raise ConfigError(f"{s}.model_patch_size={d['model_patch_size']!r} is not "
                          f"patch_size * pooling_kernel_size = {cfg.model_patch_size}")
    if cfg.output_proj_dims != cfg.mm_embed_dim:  # the projection reads the mm_embed_dim states
        raise ConfigError(f"{s}.output_proj_dims={cfg.output_proj_dims} differs from "
                          f"mm_embed_dim={cfg.mm_embed_dim} (the reference cannot run it either)")
    return cfg


def unified_audio_config_from_hf(d: dict[str, Any]) -> UnifiedAudioConfig:
    s = "audio_config"
    if d.get("model_type", "gemma4_unified_audio") != "gemma4_unified_audio":
        raise ConfigError(f"{s}.model_type={d['model_type']!r} is not supported (gemma4_unified_audio)")
    aliases = ("hidden_size", "output_proj_dims", "audio_samples_per_token")  # setters of audio_embed_dim
    _check_keys(d, s, {"audio_embed_dim", "rms_norm_eps", *aliases})
    dim = hf_positive_int(d, "audio_embed_dim", 640, s)
    for key in aliases:
        if key in d and d[key] != dim:
            raise ConfigError(f"{s}.{key}={d[key]!r} differs from audio_embed_dim={dim} (one value in the reference)")
    return UnifiedAudioConfig(audio_embed_dim=dim, rms_norm_eps=hf_number(d, "rms_norm_eps", 1e-6, s, positive=True))


def unified_config_from_hf(raw: dict[str, Any]) -> UnifiedConfig | None:
    """The media embedders of a `gemma4_unified` config.json; None for any other model type or
    when it has neither vision nor audio."""
    if raw.get("model_type") != "gemma4_unified":
        return None
    vision, audio = hf_section(raw, "vision_config"), hf_section(raw, "audio_config")
    vision = unified_vision_config_from_hf(vision) if vision else None
    audio = unified_audio_config_from_hf(audio) if audio else None
    if vision is None and audio is None:
        return None
    tokens, budget = media_tokens_from_hf(raw)
    return UnifiedConfig(vision=vision, audio=audio, tokens=tokens, image_soft_tokens=budget)


class UnifiedMultimodalEmbedder(nn.Module):
    """Weightless RMSNorm (float32, like the reference) then a bias-free Linear into the text width."""

    def __init__(self, in_dim: int, text_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dim, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(rms_norm(x, None, self.eps))


class UnifiedPatchEmbedder(nn.Module):
    """Raw 48x48 patches -> mm_embed_dim states: LN -> Linear -> LN -> + (x row + y row of the
    position table) -> LN (`Gemma4UnifiedVisionEmbedder` up to its multimodal embedder)."""

    def __init__(self, cfg: UnifiedVisionConfig):
        super().__init__()
        d = cfg.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim, eps=LAYER_NORM_EPS)
        self.patch_dense = nn.Linear(cfg.patch_dim, d)
        self.patch_ln2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.mm_posemb_size, 2, d), requires_grad=False)
        self.pos_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[..., n, 6912] patches, [..., n, 2] (x, y) positions (-1 on an axis: no embedding)
        -> [..., n, mm_embed_dim]. Rows are independent, so callers may drop padding rows first."""
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(patches.to(self.patch_dense.weight.dtype))))
        table = self.pos_embedding
        valid = (positions != -1).to(table.dtype).unsqueeze(-1)  # [..., n, 2, 1]
        axes = torch.arange(2, device=positions.device)
        return self.pos_norm(x + (table[positions.clamp(min=0).long(), axes] * valid).sum(-2))


class UnifiedEncoders(nn.Module):
    """`Encoders` for `gemma4_unified`: `vision_embedder` + `embed_vision` and `embed_audio`.

    Names follow the checkpoint files, which transformers renames on load (its
    conversion_mapping: `vision_embedder.*` -> `embed_vision.*`, `embed_vision.embedding_projection`
    -> `embed_vision.multimodal_embedder.embedding_projection`): loading stays an identity map."""

    def __init__(self, cfg: UnifiedConfig, text_hidden: int):
        super().__init__()
        self.cfg = cfg
        vc = cfg.vision
        self.vision_embedder = UnifiedPatchEmbedder(vc) if vc else None
        self.embed_vision = UnifiedMultimodalEmbedder(vc.output_proj_dims, text_hidden, vc.rms_norm_eps) if vc else None
        self.embed_audio = (UnifiedMultimodalEmbedder(cfg.audio.audio_embed_dim, text_hidden, cfg.audio.rms_norm_eps)
                            if cfg.audio else None)

    @torch.inference_mode()
    def images(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        """[B, N, 6912], [B, N, 2] -> one [n_i, H] tensor per image (or video frame); rows whose
        position is (-1, -1) are padding and are dropped, as `get_image_features` does."""
        if self.vision_embedder is None:
            raise ValueError("this model has no vision embedder: it cannot take images or video")
        vc = self.cfg.vision
        if pixel_values.shape[-1] != vc.patch_dim:
            raise ValueError(f"pixel_values have {pixel_values.shape[-1]} values per patch; this model "
                             f"takes {vc.model_patch_size}x{vc.model_patch_size} RGB patches ({vc.patch_dim})")
        keep = (position_ids != -1).all(-1)  # [B, N]
        if position_ids.numel() and int(position_ids.max()) >= vc.mm_posemb_size:
            raise ValueError(f"patch position {int(position_ids.max())} is outside the "
                             f"{vc.mm_posemb_size}-row position table")
        return [self.embed_vision(self.vision_embedder(p[k], q[k])) for p, q, k in zip(pixel_values, position_ids, keep)]

    @torch.inference_mode()
    def audio(self, features: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """[B, T, 640] waveform frames, [B, T] valid mask -> one [n_i, H] tensor per clip."""
        if self.embed_audio is None:
            raise ValueError("this model has no audio embedder: it cannot take audio")
        if features.shape[-1] != self.cfg.audio.audio_embed_dim:
            raise ValueError(f"audio frames have {features.shape[-1]} samples; this model takes "
                             f"{self.cfg.audio.audio_embed_dim}")
        return [self.embed_audio(f[m.bool()]) for f, m in zip(features, mask)]
