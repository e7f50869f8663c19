"""Media preprocessing for the encoder-free `gemma4_unified` variant (spec 7.1).

Mirrors transformers 5.23's `Gemma4UnifiedImageProcessor`, `Gemma4UnifiedVideoProcessor` and
`Gemma4UnifiedAudioFeatureExtractor`. The image and video processors exist only as torchvision
backends, so they are re-implemented here from their source with PIL (decoding, RGB) and the very
torch op torchvision's `resize` runs for a CPU uint8 image: `F.interpolate(mode="bicubic",
antialias=True)` on the uint8 tensor itself (no float round trip), which differs from PIL's bicubic
in about 0.5% of pixels by one level.

Image: resize to the largest 48-multiple size within the budget (the same rule as Gemma 4), scale
by 1/255 (`uint8 * (1/255)`; video frames divide by 255 in float32 because the video processor
fuses its identity normalisation), cut into 48x48 patches row-major with (row, col, channel)
inside a patch (exactly what its 16-pixel patchify + 3x3 `patches_merge` produces), positions
(x=col, y=row) on the 48-pixel grid, padded to `max_soft_tokens` rows with zeros and (-1, -1).
Audio: the whole waveform (no 30 s clips, no cap) cut into 640-sample frames, the last one
zero-padded: ceil(samples / 640) soft tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .audio import load_audio
from .image import (
    ImageInputs,
    check_budget,
    format_timestamp,
    load_image,
    sample_video,
    target_size,
    to_rgb,
)
from .prompt import Prepared, PreparedAudio, PreparedImage, PreparedVideo

SAMPLES_PER_TOKEN = 640  # 40 ms at 16 kHz
VIDEO_SOFT_TOKENS = 70  # the video processor's default max_soft_tokens per frame


@dataclass(frozen=True)
class PreparedRawAudio(PreparedAudio):
    """One unified audio input: a single clip (never split) of raw 16 kHz samples.

    A PreparedAudio, so `expand` writes one <|audio> ... <audio|> block per clip and the LLM
    counts it as audio; only `counts` (and the features, see `batch_frames`) differ."""

    samples_per_token: int = SAMPLES_PER_TOKEN

    @property
    def counts(self) -> list[int]:
        return [num_audio_tokens(len(c), self.samples_per_token) for c in self.clips]


# ---------------------------------------------------------------------------------------------
# Images and video frames


def _resize_uint8(pixels: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """torchvision v2 `resize_image` for CPU uint8 bicubic with antialias: interpolate the uint8
    tensor directly ([..., 3, h, w] -> [..., 3, th, tw])."""
    if tuple(pixels.shape[-2:]) == (th, tw):
        return pixels
    shape = pixels.shape
    flat = pixels.reshape(-1, *shape[-3:])
    out = F.interpolate(flat, size=[th, tw], mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(*shape[:-2], th, tw)


def _patchify(pixels: torch.Tensor, side: int, max_soft_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, H, W] float -> ([max_soft_tokens, 3*side*side] zero-padded, [max_soft_tokens, 2] (x, y),
    -1 in padding rows)."""
    _, h, w = pixels.shape
    hp, wp = h // side, w // side
    patches = pixels.reshape(3, hp, side, wp, side).permute(1, 3, 2, 4, 0).reshape(hp * wp, -1)
    gy, gx = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    positions = torch.stack([gx, gy], dim=-1).reshape(hp * wp, 2)
    n = hp * wp
    if n > max_soft_tokens:
        raise ValueError(f"{n} patches exceed the budget of {max_soft_tokens}")
    out = torch.zeros(max_soft_tokens, patches.shape[1], dtype=patches.dtype)
    out[:n] = patches
    pos = torch.full((max_soft_tokens, 2), -1, dtype=torch.int64)
    pos[:n] = positions
    return out, pos


def _uint8_chw(image: Image.Image) -> torch.Tensor:
    rgb = to_rgb(image)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()  # [3, h, w] uint8


def preprocess_unified_image(image: Image.Image, max_soft_tokens: int = 280, patch_size: int = 16,
                             pooling_kernel: int = 3) -> ImageInputs:
    """One image -> 48x48 patches (ImageInputs with 6912 values per row), as the reference."""
    check_budget(max_soft_tokens)
    pixels = _uint8_chw(image)
    th, tw = target_size(pixels.shape[1], pixels.shape[2], max_soft_tokens, patch_size, pooling_kernel)
    scaled = _resize_uint8(pixels, th, tw) * (1 / 255)  # float32, the reference's `rescale`
    values, positions = _patchify(scaled, patch_size * pooling_kernel, max_soft_tokens)
    return ImageInputs(values, positions, (th // (patch_size * pooling_kernel)) * (tw // (patch_size * pooling_kernel)))


def preprocess_unified_video_frames(frames: list[Image.Image], timestamps: list[float],
                                    max_soft_tokens: int = VIDEO_SOFT_TOKENS, patch_size: int = 16,
                                    pooling_kernel: int = 3) -> tuple[list[ImageInputs], list[str]]:
    """Sampled frames (one size) -> per-frame ImageInputs and "mm:ss" stamps, as the reference
    video processor (frames resized together; x / 255 in float32)."""
    if len(frames) != len(timestamps):
        raise ValueError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    if not frames:
        return [], []
    check_budget(max_soft_tokens)
    video = torch.stack([_uint8_chw(f) for f in frames])  # [F, 3, h, w]; one decoder, one size
    th, tw = target_size(video.shape[2], video.shape[3], max_soft_tokens, patch_size, pooling_kernel)
    scaled = _resize_uint8(video, th, tw).to(torch.float32) / 255
    side = patch_size * pooling_kernel
    out = []
    for frame in scaled:
        values, positions = _patchify(frame, side, max_soft_tokens)
        out.append(ImageInputs(values, positions, (th // side) * (tw // side)))
    return out, [format_timestamp(t) for t in timestamps]


def num_image_tokens(height: int, width: int, max_soft_tokens: int = 280, patch_size: int = 16,
                     pooling_kernel: int = 3) -> int:
    """Soft tokens of an image of this size (the processor's `_get_num_multimodal_tokens`)."""
    th, tw = target_size(height, width, max_soft_tokens, patch_size, pooling_kernel)
    return (th // (patch_size * pooling_kernel)) * (tw // (patch_size * pooling_kernel))


# ---------------------------------------------------------------------------------------------
# Audio


def num_audio_tokens(num_samples: int, samples_per_token: int = SAMPLES_PER_TOKEN) -> int:
    """ceil(samples / 640): every started frame is a soft token (no cap, no downsampling)."""
    return math.ceil(num_samples / samples_per_token)


def audio_frames(wave: np.ndarray, samples_per_token: int = SAMPLES_PER_TOKEN) -> np.ndarray:
    """1-D waveform -> [ceil(n / 640), 640] float32 frames, the last zero-padded."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"audio_frames expects a 1-D waveform, got shape {tuple(wave.shape)}")
    pad = (-len(wave)) % samples_per_token
    if pad:
        wave = np.pad(wave, (0, pad))
    return wave.reshape(-1, samples_per_token).astype(np.float32)


def batch_frames(waves: list[np.ndarray], samples_per_token: int = SAMPLES_PER_TOKEN
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Several waveforms right-padded to the longest: ([B, T, 640] float32, [B, T] bool), the
    reference extractor's `input_features` / `input_features_mask`."""
    per = [audio_frames(w, samples_per_token) for w in waves]
    t_max = max((len(f) for f in per), default=0)
    feats = np.zeros((len(per), t_max, samples_per_token), np.float32)
    mask = np.zeros((len(per), t_max), bool)
    for b, f in enumerate(per):
        feats[b, : len(f)] = f
        mask[b, : len(f)] = True
    return feats, mask


# ---------------------------------------------------------------------------------------------
# Prompt media


def prepare_unified(kind: str, source: Any, image_tokens: int, cfg) -> Prepared:
    """`processing.prompt.prepare` for a unified model; `cfg` is its `UnifiedConfig`."""
    vision = cfg.vision
    if kind in ("image", "video") and vision is None:
        raise ValueError(f"this model has no vision embedder: it cannot take {kind} input")
    if kind == "audio" and cfg.audio is None:
        raise ValueError("this model has no audio embedder: it cannot take audio input")
    if kind == "image":
        return PreparedImage(preprocess_unified_image(load_image(source), image_tokens, vision.patch_size,
                                                      vision.pooling_kernel_size))
    if kind == "audio":
        wave = load_audio(source)
        if not len(wave):
            raise ValueError(f"{_label(source)}: the audio is empty")
        return PreparedRawAudio((wave,), cfg.audio.samples_per_token)
    if kind == "video":
        frames, times = sample_video(source)
        inputs, stamps = preprocess_unified_video_frames(frames, times, VIDEO_SOFT_TOKENS, vision.patch_size,
                                                         vision.pooling_kernel_size)
        return PreparedVideo(tuple(inputs), tuple(stamps))
    raise ValueError(f"unknown media kind {kind!r}")


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


def soft_inputs(item: Prepared) -> tuple[str, tuple[torch.Tensor, torch.Tensor]]:
    """("images" | "audio", encoder inputs) for one prepared item: what `LLM._soft` passes to
    `UnifiedEncoders.images` / `.audio` (float tensors still float32, on the CPU)."""
    if isinstance(item, PreparedRawAudio):
        feats, mask = batch_frames(list(item.clips), item.samples_per_token)
        return "audio", (torch.from_numpy(feats), torch.from_numpy(mask))
    if isinstance(item, PreparedAudio):
        raise TypeError("this audio was prepared for Gemma 4's audio tower (mel clips), not a unified model")
    from .image import stack_inputs

    frames = [item.inputs] if isinstance(item, PreparedImage) else list(item.frames)
    return "images", stack_inputs(frames)
