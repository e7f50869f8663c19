"""Gemma 4 audio tower (USM-style conformer) and its text-space embedder (spec §5.2-5.6).

Submodule and parameter names equal the transformers 5.23 state-dict names under
`model.audio_tower.` and `model.embed_audio.`, so loading is an identity map. The blocked
chunked attention is ported operation for operation (block split, context unfold, relative
shift) because the relative-position table only lines up with real distances through those exact
steps; that keeps any config the reference accepts bit-compatible, not just the released one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_LAYERS, MAX_SIZE, ConfigError, hf_bool, hf_number, hf_positive_int
from ..processing.audio import NUM_MEL_BINS  # the features' width: the feature extractor's to set
from .layers import ClippableLinear, RMSNorm, rms_norm


# The reference builds the feed-forward and conformer-layer norms without an eps argument, so
# they take its RMSNorm default whatever the config says (the subsampling and light-conv norms and
# the projection's take the config's).
DEFAULT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class AudioConfig:
    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 8
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    chunk_size: int = 12  # attention_chunk_size
    context_left: int = 13  # attention_context_left (includes the frame itself)
    context_right: int = 0  # attention_context_right
    logit_cap: float = 50.0
    invalid_logit: float = -1e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_past(self) -> int:
        return self.context_left - 1

    @property
    def context_size(self) -> int:
        """Key slots per query block (24 for the released config)."""
        return self.chunk_size + self.max_past + self.context_right


# HF keys that never change the math.
_AUDIO_INERT = {
    "model_type",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "architectures",
    "initializer_range",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "name_or_path",
}
_AUDIO_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "conv_kernel_size": "conv_kernel_size",
    "residual_weight": "residual_weight",
    "attention_chunk_size": "chunk_size",
    "attention_context_left": "context_left",
    "attention_context_right": "context_right",
    "attention_logit_cap": "logit_cap",
    "attention_invalid_logits_value": "invalid_logit",
    "use_clipped_linears": "use_clipped_linears",
    "rms_norm_eps": "rms_norm_eps",
    "gradient_clipping": "gradient_clipping",
    "output_proj_dims": "output_proj_dims",
}


def audio_config_from_hf(d: dict[str, Any]) -> AudioConfig:
    """Parse an HF `audio_config` dict; a value we do not implement raises ConfigError naming
    its key."""
    if d.get("model_type", "gemma4_audio") != "gemma4_audio":
        raise ConfigError(
            f"audio_config.model_type={d['model_type']!r} is not supported (gemma4_audio)"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"audio_config.hidden_act={d['hidden_act']!r} is not supported (silu)")
    unknown = sorted(
        k
        for k in d
        if k not in _AUDIO_INERT
        and k not in _AUDIO_KEYS
        and not k.startswith("_")
        and k not in ("hidden_act", "subsampling_conv_channels")
    )
    if unknown:
        logging.getLogger("gemmarun").info(
            "audio_config keys not used by gemmarun: %s", ", ".join(unknown)
        )
    kw: dict[str, Any] = {}
    defaults, s = AudioConfig(), "audio_config"
    for hf_key, name in _AUDIO_KEYS.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            kw[name] = hf_bool(d, hf_key, default, s)
        elif hf_key == "attention_context_right":  # (0: no frames ahead)
            value = d.get(hf_key)
            if value is not None and (type(value) is not int or not 0 <= value <= MAX_SIZE):
                raise ConfigError(f"{s}.{hf_key}={value!r} must be an integer in 0..{MAX_SIZE}")
            kw[name] = default if value is None else value
        elif isinstance(default, int):
            kw[name] = hf_positive_int(d, hf_key, default, s, MAX_LAYERS if hf_key == "num_hidden_layers" else MAX_SIZE)
        else:
            positive = hf_key in ("rms_norm_eps", "gradient_clipping", "attention_logit_cap")
            kw[name] = hf_number(d, hf_key, default, s, positive=positive)
    channels = d.get("subsampling_conv_channels", (128, 32))
    if not isinstance(channels, (list, tuple)) or not all(type(c) is int and 0 < c <= MAX_SIZE for c in channels):
        raise ConfigError(f"{s}.subsampling_conv_channels={channels!r} must be a list of positive integers")
    channels = tuple(channels)
    if len(channels) != 2:
        raise ConfigError(
            f"audio_config.subsampling_conv_channels={list(channels)} must have 2 entries"
        )
    if channels[0] // 4 != NUM_MEL_BINS // 4:
        # transformers sizes input_proj_linear as (channels[0] // 4) * channels[1], which equals the
        # flattened conv output (128 mel bins / 4 * channels[1]) only for these values.
        raise ConfigError(
            f"audio_config.subsampling_conv_channels[0]={channels[0]} is not supported "
            f"(must give {NUM_MEL_BINS // 4} when divided by 4, to match {NUM_MEL_BINS} mel bins)"
        )
    cfg = AudioConfig(subsampling_conv_channels=channels, **kw)  # type: ignore[arg-type]
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"audio_config.hidden_size={cfg.hidden_size} not divisible by "
            f"num_attention_heads={cfg.num_heads}"
        )
    return cfg


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _clip_value(gradient_clipping: float, dtype: torch.dtype) -> float:
    """The reference's stability clamp, limited to the dtype's range (a no-op unless fp16)."""
    return min(gradient_clipping, torch.finfo(dtype).max)


class SubSampleLayer(nn.Module):
    """Mask, 3x3 stride-2 conv, channel LayerNorm (weight only), ReLU; halves time and frequency."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False
        )
        self.norm = nn.LayerNorm(out_channels, eps=eps, elementwise_affine=True, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * mask[:, None, :, None]  # (B, C, T, F): zero padding frames
        x = self.conv(x.to(self.conv.weight.dtype))  # (B, C', ceil(T/2), ceil(F/2))
        x = torch.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous())
        return x, mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        c0, c1 = cfg.subsampling_conv_channels
        self.layer0 = SubSampleLayer(1, c0, cfg.rms_norm_eps)
        self.layer1 = SubSampleLayer(c0, c1, cfg.rms_norm_eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, cfg.hidden_size, bias=False)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.layer0(features.unsqueeze(1), mask)  # (B, c0, T/2, 64)
        x, mask = self.layer1(x, mask)  # (B, c1, T/4, 32)
        b, _, t, _ = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, t, -1)  # (B, T/4, 32 * c1), index freq * c1 + ch
        return self.input_proj_linear(x), mask


class FeedForward(nn.Module):
    """Macaron half-step: x + residual_weight * post_norm(ffw2(silu(ffw1(pre_norm(x)))))."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        h, clipped = cfg.hidden_size, cfg.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(h, 4 * h, clipped)
        self.ffw_layer_2 = ClippableLinear(4 * h, h, clipped)
        self.pre_layer_norm = RMSNorm(h, DEFAULT_NORM_EPS)
        self.post_layer_norm = RMSNorm(h, DEFAULT_NORM_EPS)
        self.gradient_clipping = cfg.gradient_clipping
        self.residual_weight = cfg.residual_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = _clip_value(self.gradient_clipping, x.dtype)
        h = self.pre_layer_norm(torch.clamp(x, -clip, clip))
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(h)))
        h = self.post_layer_norm(torch.clamp(h, -clip, clip))
        return h * self.residual_weight + x


class LightConv1d(nn.Module):
    """GLU, causal depthwise conv over time, RMSNorm, SiLU, projection; residual."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        h, clipped = cfg.hidden_size, cfg.use_clipped_linears
        self.linear_start = ClippableLinear(h, 2 * h, clipped)
        self.linear_end = ClippableLinear(h, h, clipped)
        self.depthwise_conv1d = nn.Conv1d(h, h, cfg.conv_kernel_size, groups=h, bias=False)
        self.pre_layer_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.conv_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.gradient_clipping = cfg.gradient_clipping
        self.left_pad = cfg.conv_kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # (B, T, H)
        h = F.pad(h.transpose(1, 2), (self.left_pad, 0))  # (B, H, K-1+T): causal
        h = self.depthwise_conv1d(h).transpose(1, 2)  # (B, T, H)
        clip = _clip_value(self.gradient_clipping, h.dtype)
        h = F.silu(self.conv_norm(torch.clamp(h, -clip, clip)))
        return self.linear_end(h) + x


def relative_position_table(cfg: AudioConfig) -> torch.Tensor:
    """Sinusoids [sin | cos] for distances context_size//2 .. 0 (descending), (P, hidden) float32,
    computed as Gemma4AudioRelPositionalEncoding does."""
    n = cfg.hidden_size // 2
    increment = math.log(10000.0) / max(n - 1, 1)
    inv_timescales = torch.exp(torch.arange(n) * -increment)  # (n,) float32
    positions = torch.arange(cfg.context_size // 2, -1, -1)[:, None]  # (P, 1) int64
    scaled = positions * inv_timescales[None, :]  # (P, n)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1)


def blocked_attention_mask(key_valid: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """True where a logit is blocked, in block layout (B, 1, blocks, chunk, context).

    Query i may see key j iff j is a real frame and 0 <= i - j < context_left - 1 (the frame and
    the 11 before it), or 0 < j - i < context_right; block padding is always blocked.
    """
    b, t = key_valid.shape
    c, p = cfg.chunk_size, cfg.max_past
    blocks = (t + c - 1) // c
    starts = torch.arange(blocks, device=key_valid.device) * c
    q = (
        starts[:, None, None] + torch.arange(c, device=key_valid.device)[None, :, None]
    )  # (nb, C, 1)
    k = (
        starts[:, None, None] - p + torch.arange(cfg.context_size, device=key_valid.device)
    )  # (nb, 1, W)
    dist = q - k
    window = ((dist >= 0) & (dist < cfg.max_past)) | ((dist < 0) & (-dist < cfg.context_right))
    in_range = (k >= 0) & (k < t) & (q < t)
    valid = key_valid[:, k.clamp(0, max(t - 1, 0))]  # (B, nb, 1, W)
    allowed = window & in_range & valid
    return ~allowed[:, None]


class AudioAttention(nn.Module):
    """Chunked local self-attention with learned relative-position keys, all in float32."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        h, clipped = cfg.hidden_size, cfg.use_clipped_linears
        self.cfg = cfg
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_scale = (self.head_dim**-0.5) / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj = ClippableLinear(h, h, clipped)
        self.k_proj = ClippableLinear(h, h, clipped)
        self.v_proj = ClippableLinear(h, h, clipped)
        self.post = ClippableLinear(h, h, clipped)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim), requires_grad=False)

    def _to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, nH, D) -> (B, blocks, chunk, nH, D), zero-padded at the end."""
        b, t, nh, d = x.shape
        c = self.cfg.chunk_size
        blocks = (t + c - 1) // c
        x = F.pad(x, (0, 0, 0, 0, 0, blocks * c - t))
        return x.reshape(b, blocks, c, nh, d)

    def _block_context(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, nH, D) -> (B, blocks, context, nH, D): keys at 12b - past ... per block."""
        cfg = self.cfg
        x = F.pad(x, (0, 0, 0, 0, cfg.max_past, cfg.context_right + cfg.chunk_size - 1))
        x = x.unfold(1, cfg.context_size, cfg.chunk_size)  # (B, blocks, nH, D, W)
        return torch.movedim(x, -1, 2).contiguous()

    def _rel_shift(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nH, blocks, chunk, P) -> (B, nH, blocks, chunk, W): Transformer-XL shift."""
        b, nh, nb, c, p = x.shape
        w = self.cfg.context_size
        x = F.pad(x, (0, w + 1 - p)).view(b, nh, nb, c * (w + 1))
        return x[..., : c * w].view(b, nh, nb, c, w)

    def forward(
        self, x: torch.Tensor, rel_table: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).float().view(shape)
        k = self.k_proj(x).float().view(shape)
        v = self.v_proj(x).float().view(shape)
        q = q * self.q_scale * F.softplus(self.per_dim_scale)
        k = k * self.k_scale

        q = self._to_blocks(q)  # (B, nb, C, nH, D)
        k = self._block_context(k)  # (B, nb, W, nH, D)
        v = self._block_context(v)
        nb = q.shape[1]
        rel = (
            self.relative_k_proj(rel_table.to(x.dtype))
            .view(-1, self.num_heads, self.head_dim)
            .float()
        )

        queries = q.permute(0, 3, 1, 2, 4)  # (B, nH, nb, C, D)
        content = queries @ k.permute(0, 3, 1, 4, 2)  # (B, nH, nb, C, W)
        position = queries.reshape(b, self.num_heads, -1, self.head_dim) @ rel.permute(1, 2, 0)
        position = self._rel_shift(position.reshape(b, self.num_heads, nb, self.cfg.chunk_size, -1))

        cap = self.cfg.logit_cap
        logits = torch.tanh((content + position) / cap) * cap
        logits = logits.masked_fill(blocked, self.cfg.invalid_logit)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        out = probs @ v.permute(0, 3, 1, 2, 4)  # (B, nH, nb, C, D)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, nb * self.cfg.chunk_size, -1)[:, :t]
        return self.post(out.contiguous().to(x.dtype))


class ConformerLayer(nn.Module):
    """FF/2, attention, light conv, FF/2, output norm (§5.4)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        h = cfg.hidden_size
        self.feed_forward1 = FeedForward(cfg)
        self.feed_forward2 = FeedForward(cfg)
        self.self_attn = AudioAttention(cfg)
        self.lconv1d = LightConv1d(cfg)
        self.norm_pre_attn = RMSNorm(h, DEFAULT_NORM_EPS)
        self.norm_post_attn = RMSNorm(h, DEFAULT_NORM_EPS)
        self.norm_out = RMSNorm(h, DEFAULT_NORM_EPS)
        self.gradient_clipping = cfg.gradient_clipping

    def forward(
        self, x: torch.Tensor, rel_table: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        clip = _clip_value(self.gradient_clipping, self.norm_pre_attn.weight.dtype)
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(torch.clamp(x, -clip, clip)), rel_table, blocked)
        x = self.norm_post_attn(torch.clamp(h, -clip, clip)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(torch.clamp(x, -clip, clip))


# --------------------------------------------------------------------------------------------
# Tower and embedder
# --------------------------------------------------------------------------------------------


class AudioTower(nn.Module):
    """Log-mel features -> audio soft tokens (output_proj space), one tensor per clip."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.subsample_conv_projection = SubSampleConvProjection(cfg)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_layers))
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.output_proj_dims, bias=True)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """features (B, T, 128), mask (B, T) bool -> per clip (n_i, output_proj_dims), valid
        frames only."""
        if features.shape[1] == 0:
            return [
                features.new_zeros(0, self.cfg.output_proj_dims) for _ in range(features.shape[0])
            ]
        mask = mask.to(torch.bool)
        x, mask = self.subsample_conv_projection(features, mask)  # (B, T', H), (B, T')
        rel_table = relative_position_table(self.cfg).to(x.device)
        blocked = blocked_attention_mask(mask, self.cfg)
        for layer in self.layers:
            x = layer(x, rel_table, blocked)
        y = self.output_proj(x)  # (B, T', out)
        return [y[i][mask[i]] for i in range(y.shape[0])]


class AudioEmbedder(nn.Module):
    """Soft tokens -> text embedding space: weightless RMSNorm then a linear projection."""

    def __init__(self, in_dims: int, text_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dims, text_hidden, bias=False)

    @torch.no_grad()
    def forward(self, soft: torch.Tensor) -> torch.Tensor:
        """(n, in_dims) -> (n, text_hidden)."""
        return self.embedding_projection(rms_norm(soft, None, self.eps))
