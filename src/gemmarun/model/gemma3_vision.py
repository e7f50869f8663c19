"""Gemma 3's vision input: a SigLIP encoder and the projector into the text model.

An image is resized to one square (896 px for the released checkpoints) and cut into 14 px
patches (a 64 x 64 grid); the SigLIP encoder (pre-LayerNorm blocks, biased projections, GELU-tanh
MLP, a learned position per patch) runs over all of them bidirectionally; the projector averages
4 x 4 patches into 256 soft tokens, RMS-normalises them (Gemma's `1 + w` scale) and multiplies by
a [Hv, H] matrix. The text decoder sees the soft tokens between `<start_of_image>` and
`<end_of_image>`, every image's tokens attending to each other in every layer.

Module and parameter names equal transformers 5.23's (`model.vision_tower.*`,
`model.multi_modal_projector.*`, prefix removed; the released files' `vision_tower.vision_model.*`
are renamed in `loading.names`). The reference: transformers' `SiglipVisionModel` and
`Gemma3MultiModalProjector`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_LAYERS, MAX_SIZE, ConfigError, hf_number, hf_positive_int, hf_section, hf_token_id
from .layers import gelu_tanh
from .multimodal import MediaTokens

# Gemma3Config's defaults (transformers 5.23), the released checkpoints' values.
GEMMA3_MEDIA_TOKENS = MediaTokens(image=262144, boi=255999, eoi=256000, audio=-1, video=-1, boa=-1, eoa=-1)


@dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int  # Hv
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # the square every image is resized to
    patch_size: int
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        """The sizes a tower can be built from, whichever file gave them (config.json, an mmproj)."""
        for name in ("hidden_size", "intermediate_size", "num_heads", "image_size", "patch_size", "num_layers"):
            limit = MAX_LAYERS if name == "num_layers" else MAX_SIZE
            if not 1 <= getattr(self, name) <= limit:
                raise ConfigError(f"vision: {name}={getattr(self, name)} is not in 1..{limit}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision: hidden_size={self.hidden_size} is not a multiple of "
                              f"num_attention_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.patches_per_side**2 > MAX_SIZE or 3 * self.patch_size**2 > MAX_SIZE:
            raise ConfigError(f"vision: image_size={self.image_size} and patch_size={self.patch_size} are past any "
                              "image model's")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class Gemma3MediaConfig:
    """`.tokens`, `.image_soft_tokens` and `.audio` (None) as `MultimodalConfig` names them, so
    code reading those works for every variant; `.vision` is the SigLIP tower's."""

    vision: SiglipConfig
    tokens: MediaTokens = GEMMA3_MEDIA_TOKENS
    image_soft_tokens: int = 256  # mm_tokens_per_image: fixed, one square image -> one grid
    audio: None = None

    def __post_init__(self) -> None:
        side, per_side = math.isqrt(self.image_soft_tokens), self.vision.patches_per_side
        if side * side != self.image_soft_tokens or per_side % side:
            raise ConfigError(f"{self.image_soft_tokens} soft tokens an image (mm_tokens_per_image) are not a square "
                              f"grid that divides the {per_side} x {per_side} patch grid")

    @property
    def pooling_kernel(self) -> int:
        return self.vision.patches_per_side // math.isqrt(self.image_soft_tokens)


def gemma3_media_config_from_hf(raw: dict[str, Any]) -> Gemma3MediaConfig | None:
    """The vision side of a `gemma3` config.json; None when it has no vision_config."""
    d = hf_section(raw, "vision_config") if raw.get("model_type") == "gemma3" else None
    if not d:
        return None
    s = "vision_config"
    if d.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConfigError(f"{s}.model_type={d.get('model_type')!r} is not supported (siglip_vision_model)")
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{s}.hidden_act={act!r} is not supported (gelu_pytorch_tanh)")
    if hf_positive_int(d, "num_channels", 3, s) != 3:
        raise ConfigError(f"{s}.num_channels={d['num_channels']} is not supported (3: RGB)")
    if isinstance(d.get("image_size"), (list, tuple)) or isinstance(d.get("patch_size"), (list, tuple)):
        raise ConfigError(f"{s}: a non-square image_size or patch_size is not supported")
    vision = SiglipConfig(
        hidden_size=hf_positive_int(d, "hidden_size", 768, s),
        intermediate_size=hf_positive_int(d, "intermediate_size", 3072, s),
        num_layers=hf_positive_int(d, "num_hidden_layers", 12, s, maximum=MAX_LAYERS),
        num_heads=hf_positive_int(d, "num_attention_heads", 12, s),
        image_size=hf_positive_int(d, "image_size", 224, s), patch_size=hf_positive_int(d, "patch_size", 16, s),
        layer_norm_eps=hf_number(d, "layer_norm_eps", 1e-6, s, positive=True),
    )
    soft = hf_positive_int(raw, "mm_tokens_per_image", 256)
    ids = {field: hf_token_id(raw, f"{field}_token_index", getattr(GEMMA3_MEDIA_TOKENS, field), f"{field}_token_id")
           for field in ("image", "boi", "eoi")}  # (transformers maps *_token_id to *_token_index)
    if len(set(ids.values())) != 3:
        raise ConfigError(f"image_token_index, boi_token_index and eoi_token_index must differ: {ids}")
    tokens = MediaTokens(**ids, audio=-1, video=-1, boa=-1, eoa=-1)
    return Gemma3MediaConfig(vision=vision, tokens=tokens, image_soft_tokens=soft)


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [B, Hv, g, g]
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # row-major patches


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, H = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch; scale d^-0.5
        return self.out_proj(out.transpose(1, 2).reshape(B, N, H))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers))


class SiglipVisionModel(nn.Module):
    """Pixels [B, 3, S, S] -> patch states [B, (S/p)², Hv] (no pooling head: Gemma 3 reads the
    last hidden state)."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Gemma3Projector(nn.Module):
    """Patch states -> soft tokens [B, n, H]: k x k average pooling over the patch grid, Gemma's
    RMSNorm (x * (1 + w), float32 inside), then x @ W with W stored [Hv, H]."""

    def __init__(self, cfg: Gemma3MediaConfig, text_hidden: int):
        super().__init__()
        self.grid, self.kernel = cfg.vision.patches_per_side, cfg.pooling_kernel
        self.eps = cfg.vision.layer_norm_eps
        self.mm_input_projection_weight = nn.Parameter(torch.empty(cfg.vision.hidden_size, text_hidden))
        self.mm_soft_emb_norm = nn.Module()
        self.mm_soft_emb_norm.weight = nn.Parameter(torch.empty(cfg.vision.hidden_size))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        B, N, Hv = states.shape
        grid = states.transpose(1, 2).reshape(B, Hv, self.grid, self.grid)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # [B, n, Hv]
        x = pooled.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.mm_soft_emb_norm.weight.float())
        return torch.matmul(x.type_as(pooled), self.mm_input_projection_weight).type_as(states)


class Gemma3Encoders(nn.Module):
    """Gemma 3's vision tower and projector, with the interface of `multimodal.Encoders`."""

    def __init__(self, cfg: Gemma3MediaConfig, text_hidden: int):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionModel(cfg.vision)
        self.multi_modal_projector = Gemma3Projector(cfg, text_hidden)
        self.embed_audio = None

    @property
    def embed_vision(self) -> nn.Module:  # (what LLM.check_media asks for)
        return self.multi_modal_projector

    @torch.inference_mode()
    def images(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, S, S] normalised pixels -> one [n, H] tensor of projected soft tokens per image."""
        S = self.cfg.vision.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"Gemma 3 images are [batch, 3, {S}, {S}] pixels, not {list(pixels.shape)}")
        return list(self.multi_modal_projector(self.vision_tower(pixels)))
