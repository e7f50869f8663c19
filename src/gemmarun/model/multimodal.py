"""Gemma 4's encoders and how their soft tokens enter the text model (spec section 6).

`Encoders` holds the towers and their projections under the checkpoint's own names
(`vision_tower`, `embed_vision`, `audio_tower`, `embed_audio`). `merge` turns a prompt's ids
plus encoded media into the decoder's inputs: placeholders become the pad id for the token
table and the PLE lookup, and their embedding rows are replaced by the soft tokens, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, hf_section, hf_token_id
from ..masks import vision_blocks
from ..processing.image import SOFT_TOKEN_BUDGETS
from .audio import AudioConfig, AudioEmbedder, AudioTower, audio_config_from_hf
from .vision import MultimodalEmbedder, VisionConfig, VisionTower, vision_config_from_hf

TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3  # mm token types, as the reference processor numbers them


@dataclass(frozen=True)
class MediaTokens:
    """Token ids of the media placeholders and delimiters (spec 6.1; config-overridable)."""

    image: int = 258880
    audio: int = 258881
    video: int = 258884
    boi: int = 255999
    eoi: int = 258882
    boa: int = 256000
    eoa: int = 258883

    def check(self, vocab_size: int) -> None:
        """ConfigError unless the delimiters, which prompts embed, are in the vocabulary (the
        placeholders never are embedded; -1: a medium the model has no token for)."""
        for name in ("boi", "eoi", "boa", "eoa"):
            value = getattr(self, name)
            if value >= vocab_size:
                raise ConfigError(f"the {name} token id {value} is outside the {vocab_size}-token vocabulary")


@dataclass(frozen=True)
class MultimodalConfig:
    vision: VisionConfig | None
    audio: AudioConfig | None
    tokens: MediaTokens
    image_soft_tokens: int = 280  # default per-image budget (vision_soft_tokens_per_image)


def media_tokens_from_hf(raw: dict[str, Any]) -> tuple[MediaTokens, int]:
    """Media token ids and the default image budget of a multimodal config.json (shared by the
    gemma4 and gemma4_unified parsers)."""
    defaults = MediaTokens()
    tokens = MediaTokens(
        image=hf_token_id(raw, "image_token_id", defaults.image),
        audio=hf_token_id(raw, "audio_token_id", defaults.audio),
        video=hf_token_id(raw, "video_token_id", defaults.video),
        boi=hf_token_id(raw, "boi_token_id", defaults.boi),
        eoi=hf_token_id(raw, "eoi_token_id", defaults.eoi),
        boa=hf_token_id(raw, "boa_token_id", defaults.boa),
        eoa=hf_token_id(raw, "eoa_token_index", defaults.eoa, "eoa_token_id"),
    )
    budget = raw.get("vision_soft_tokens_per_image")
    budget = 280 if budget is None else budget
    if type(budget) is not int or budget not in SOFT_TOKEN_BUDGETS:
        raise ConfigError(f"vision_soft_tokens_per_image={budget!r:.40} is not one of {SOFT_TOKEN_BUDGETS}")
    return tokens, budget


def multimodal_config_from_hf(raw: dict[str, Any]) -> MultimodalConfig | None:
    """The towers of a `gemma4` config.json; None for text-only models."""
    if raw.get("model_type") != "gemma4":
        return None
    vision, audio = hf_section(raw, "vision_config"), hf_section(raw, "audio_config")
    vision = vision_config_from_hf(vision) if vision else None
    audio = audio_config_from_hf(audio) if audio else None
    if vision is None and audio is None:
        return None
    tokens, budget = media_tokens_from_hf(raw)
    return MultimodalConfig(vision=vision, audio=audio, tokens=tokens, image_soft_tokens=budget)


class Encoders(nn.Module):
    """Vision and audio towers with their projections into the text space."""

    def __init__(self, cfg: MultimodalConfig, text_hidden: int):
        super().__init__()
        self.cfg = cfg
        vc, ac = cfg.vision, cfg.audio
        # each projection's norm takes its own tower's eps, as the reference's embedders do
        self.vision_tower = VisionTower(vc) if vc else None
        self.embed_vision = MultimodalEmbedder(vc.hidden_size, text_hidden, vc.rms_norm_eps) if vc else None
        self.audio_tower = AudioTower(ac) if ac else None
        self.embed_audio = AudioEmbedder(ac.output_proj_dims, text_hidden, ac.rms_norm_eps) if ac else None

    @torch.inference_mode()
    def images(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        """[B, N, 768], [B, N, 2] -> one [n_i, H] tensor of projected soft tokens per image."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower: it cannot take images or video")
        soft = self.vision_tower(pixel_values, position_ids)
        return [self.embed_vision(s) for s in soft]

    @torch.inference_mode()
    def audio(self, features: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """[B, T, 128], [B, T] -> one [n_i, H] tensor of projected soft tokens per clip."""
        if self.audio_tower is None:
            raise ValueError("this model has no audio tower: it cannot take audio")
        return [self.embed_audio(s) for s in self.audio_tower(features, mask)]


def token_types(ids: torch.Tensor, tokens: MediaTokens) -> torch.Tensor:
    types = torch.zeros_like(ids)
    types[ids == tokens.image] = IMAGE
    types[ids == tokens.video] = VIDEO
    types[ids == tokens.audio] = AUDIO
    return types


def merge(
    model,  # TextModel
    ids: torch.Tensor,  # (T,) prompt ids with expanded placeholders
    tokens: MediaTokens,
    soft: dict[int, list[torch.Tensor]],  # token type -> soft tokens in prompt order
    pad_id: int,
    bidirectional_vision: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ids with placeholders -> pad, merged input embeddings (1, T, H), vision blocks or None)."""
    types = token_types(ids, tokens)
    text_ids = torch.where(types == TEXT, ids, torch.full_like(ids, pad_id))
    x = model.embed(text_ids[None])  # (1, T, H): soft tokens are written after the √H scaling
    for kind, name in ((IMAGE, "image"), (VIDEO, "video"), (AUDIO, "audio")):
        where = (types == kind).nonzero().flatten()
        given = soft.get(kind, [])
        n_soft = sum(s.shape[0] for s in given)
        if where.numel() != n_soft:
            raise ValueError(f"the prompt has {where.numel()} {name} soft-token positions but the "
                             f"{name} inputs give {n_soft} soft tokens")
        if n_soft:
            x[0, where] = torch.cat(given).to(device=x.device, dtype=x.dtype)
    blocks = vision_blocks(types) if bidirectional_vision and bool((types == IMAGE).any() | (types == VIDEO).any()) else None
    return text_ids, x, blocks
