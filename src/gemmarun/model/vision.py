"""The Gemma 4 vision tower and its projector into the text model (spec 4.2-4.6).

Submodule and parameter names equal the transformers 5.23 state-dict names under
`model.vision_tower.` and `model.embed_vision.` (prefix removed), so loading is an identity map.
Nothing here is computed at construction time (RoPE frequencies are made in `forward`), so the
modules can be built on the `meta` device and filled by a loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_LAYERS, MAX_SIZE, ConfigError, hf_bool, hf_number, hf_positive_int, hf_section
from .layers import ClippableLinear, RMSNorm, apply_rope, gelu_tanh, rms_norm


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int  # Hv
    intermediate_size: int  # Iv
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # dv, a multiple of 4 (two rotate-half RoPE halves)
    rms_norm_eps: float
    rope_theta: float
    patch_size: int
    pooling_kernel: int
    position_embedding_size: int
    use_clipped_linears: bool
    standardize: bool
    default_output_length: int | None = None  # soft-token budget the checkpoint suggests

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


def vision_config_from_hf(d: dict[str, Any]) -> VisionConfig:
    """Parse an HF `vision_config` dict (class defaults of 5.23 for missing keys); values we
    cannot honour exactly raise ConfigError naming the key."""
    model_type = d.get("model_type", "gemma4_vision")
    if model_type != "gemma4_vision":
        raise ConfigError(f"vision_config.model_type={model_type!r} is not supported (gemma4_vision)")
    act = d.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"vision_config.hidden_activation={act!r} is not supported (gelu_pytorch_tanh)")
    if d.get("attention_bias"):
        raise ConfigError("vision_config.attention_bias=true is not supported")
    rope = hf_section(d, "rope_parameters", "vision_config") or {}
    rope_type = rope.get("rope_type", "axial")
    if rope_type not in ("axial", "default"):  # HF rewrites "default" to "axial" for vision
        raise ConfigError(f"vision_config.rope_parameters.rope_type={rope_type!r} is not supported (axial)")
    s = "vision_config"
    hidden = hf_positive_int(d, "hidden_size", 768, s)
    heads = hf_positive_int(d, "num_attention_heads", 12, s)
    kv_heads = hf_positive_int(d, "num_key_value_heads", heads, s)
    head_dim = hf_positive_int(d, "head_dim", hidden // heads, s)
    if head_dim % 4 or not head_dim:
        raise ConfigError(f"vision_config.head_dim={head_dim} must be a multiple of 4 (2-D RoPE)")
    if heads % kv_heads:
        raise ConfigError(f"vision_config.num_key_value_heads={kv_heads} does not divide {heads} heads")
    patch = hf_positive_int(d, "patch_size", 16, s)
    if 3 * patch * patch > MAX_SIZE:  # (a patch's pixels are one input row)
        raise ConfigError(f"vision_config.patch_size={patch} is past any image model's "
                          f"({3 * patch * patch} inputs a patch)")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=hf_positive_int(d, "intermediate_size", 3072, s),
        num_layers=hf_positive_int(d, "num_hidden_layers", 16, s, maximum=MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_number(d, "rms_norm_eps", 1e-6, s, positive=True),
        rope_theta=hf_number(rope, "rope_theta", 100.0, f"{s}.rope_parameters", positive=True),
        patch_size=patch,
        pooling_kernel=hf_positive_int(d, "pooling_kernel_size", 3, s),
        position_embedding_size=hf_positive_int(d, "position_embedding_size", 10 * 1024, s),
        use_clipped_linears=hf_bool(d, "use_clipped_linears", False, s),
        standardize=hf_bool(d, "standardize", False, s),
        default_output_length=hf_positive_int(d, "default_output_length", None, s),
    )


class PatchEmbedder(nn.Module):
    """Pixels in [0, 1] -> [-1, 1] -> linear, plus learned x and y position rows (spec 4.3)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(
            torch.empty(2, cfg.position_embedding_size, cfg.hidden_size), requires_grad=False
        )

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        # pixel_values [B, N, 3p²] float, positions [B, N, 2] (x, y), pad [B, N] bool
        x = 2 * (pixel_values - 0.5)
        w = self.input_proj.weight
        if w.dtype.is_floating_point:
            x = x.to(w.dtype)
        x = self.input_proj(x)  # [B, N, Hv]
        pos = positions.clamp(min=0)
        limit = self.position_embedding_table.shape[1]
        if pos.numel() and int(pos.max()) >= limit:
            raise ValueError(f"patch position {int(pos.max())} exceeds the {limit}-row position table")
        table = self.position_embedding_table
        pe = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        pe = torch.where(pad.unsqueeze(-1), 0.0, pe)
        return x + pe


class VisionAttention(nn.Module):
    """Bidirectional attention within one image; q/k RMSNorm + 2-D RoPE, weightless v norm,
    scale 1.0 (spec 4.4)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, d, c = cfg.hidden_size, cfg.head_dim, cfg.use_clipped_linears
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps
        self.q_proj = ClippableLinear(H, cfg.num_heads * d, c)
        self.k_proj = ClippableLinear(H, cfg.num_kv_heads * d, c)
        self.v_proj = ClippableLinear(H, cfg.num_kv_heads * d, c)
        self.o_proj = ClippableLinear(cfg.num_heads * d, H, c)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        # x [B, N, Hv]; cos/sin [B, 1, N, dv]; key_mask [B, 1, 1, N] bool (True = attend) or None
        B, N, _ = x.shape
        d = self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, N, -1, d)).transpose(1, 2)  # [B, nH, N, dv]
        k = self.k_norm(self.k_proj(x).view(B, N, -1, d)).transpose(1, 2)  # [B, nKV, N, dv]
        v = rms_norm(self.v_proj(x).view(B, N, -1, d), None, self.eps).transpose(1, 2)
        q, k = _rope_2d(q, cos, sin), _rope_2d(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0)  # [B, nH, N, dv]
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))


def _rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """First half of the head dim rotates with x (column), second half with y (row); each half
    is an ordinary rotate-half RoPE."""
    half = x.shape[-1] // 2
    return torch.cat((apply_rope(x[..., :half], cos[..., :half], sin[..., :half]),
                      apply_rope(x[..., half:], cos[..., half:], sin[..., half:])), dim=-1)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, I, c = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(H, I, c)
        self.up_proj = ClippableLinear(H, I, c)
        self.down_proj = ClippableLinear(I, H, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    """Sandwich-normed attention and MLP blocks, as in the text decoder without PLE/scalar."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, key_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    """Patch embedding -> encoder -> 3x3 average pooling, x sqrt(Hv), optional standardisation.

    `forward` returns one [n_i, Hv] tensor per image holding only its real pooled cells, in
    row-major order over the pooled grid (the order of the prompt's soft tokens).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.empty(cfg.hidden_size))
            self.register_buffer("std_scale", torch.empty(cfg.hidden_size))

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, 1, N, dv] laid out (fx, fx, fy, fy), each of width dv/4 (spec 4.4)."""
        half = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (
            torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
        freqs = positions[..., None].float() * inv_freq  # [B, N, 2, dv/4]
        fx, fy = freqs[..., 0, :], freqs[..., 1, :]
        angles = torch.cat((fx, fx, fy, fy), dim=-1).unsqueeze(1)  # [B, 1, N, dv]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        # pixel_values [B, N, 3p²] (N = 9T padded rows), position_ids [B, N, 2], (-1, -1) = padding
        B, N, _ = pixel_values.shape
        k2 = self.cfg.pooling_kernel**2
        if N % k2:
            raise ValueError(f"{N} patch rows is not a multiple of pooling_kernel² = {k2}")
        real = ~(position_ids == -1).all(dim=-1)  # [B, N]
        empty = (~real.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"image(s) {empty} of the batch have no real patches")
        # Trailing rows that are padding in every image change no real output: drop them.
        keep = int(real.any(dim=0).nonzero().max()) + 1
        pv, pos, real = pixel_values[:, :keep], position_ids[:, :keep], real[:, :keep]
        pad = ~real

        x = self.patch_embedder(pv, pos, pad)  # [B, n, Hv]
        cos, sin = self.rope_tables(pos, x.dtype)
        key_mask = real[:, None, None, :] if bool(pad.any()) else None
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, key_mask)
        return [self._pool(x[b], pos[b], real[b], N // k2) for b in range(B)]

    def _pool(self, h: torch.Tensor, pos: torch.Tensor, real: torch.Tensor, length: int) -> torch.Tensor:
        """3x3 average by positions into `length` cells, keep the cells that received patches,
        x sqrt(Hv), standardise (spec 4.5). float32 inside, as the reference."""
        # h [n, Hv] one image's encoder output; pos [n, 2]; real [n] bool
        k = self.cfg.pooling_kernel
        p = pos.clamp(min=0)
        cols = (p[:, 0].max() + 1) // k
        cell = p[:, 0] // k + cols * (p[:, 1] // k)  # [n]
        if int(cell.max()) >= length:
            raise ValueError(f"pooled cell {int(cell.max())} out of range for {length} soft tokens")
        weight = torch.tensor(1.0 / (k * k), dtype=torch.float32)
        contrib = h[real].float() * weight
        pooled = torch.zeros(length, h.shape[-1], dtype=torch.float32, device=h.device)
        pooled.index_add_(0, cell[real], contrib)
        hit = torch.zeros(length, dtype=torch.bool, device=h.device)
        hit[cell] = True  # the reference also marks padding's clamped cell (0); it is real anyway
        y = pooled[hit].to(h.dtype).float() * math.sqrt(self.cfg.hidden_size)
        if self.cfg.standardize:
            y = (y - self.std_bias.float()) * self.std_scale.float()
        return y.to(h.dtype)


class MultimodalEmbedder(nn.Module):
    """Soft tokens [n, Hv] -> text embeddings [n, H]: weightless RMSNorm then a linear (spec 4.6)."""

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(vision_hidden, text_hidden, bias=False)

    def forward(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(rms_norm(soft_tokens, None, self.eps))
