"""Image and video-frame preprocessing for the Gemma 4 vision tower (spec 4.1 and 4.7), and
Gemma 3's one-square images (`preprocess_square_image`).

Mirrors transformers 5.23 `Gemma4ImageProcessorPil` bit for bit: composite on white, resize
(PIL bicubic) to the largest 48-multiple size within the patch budget, rescale by 1/255 in float64
then float32, patchify row-major with (row, col, channel) inside a patch, positions (x=col, y=row),
pad with zero pixels and (-1, -1) positions.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .files import ffmpeg_url, media_file

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
MAX_PIXELS = 100_000_000  # decoded-size cap: a 100 MP RGB image is already 300 MB in memory
# Longest side: Pillow's resize keeps ~32 bytes of filter weights per source pixel along a side, so
# a 1 x 50,000,000 strip (a 68 KB PNG, under the pixel cap) would take 1.6 GB to resize.
MAX_SIDE = 1 << 20
VIDEO_FPS_FALLBACK = 24.0  # what the reference assumes when a container reports no frame rate

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageInputError(ValueError):
    """An image we cannot read; the one-line message names the source and the problem."""


class VideoInputError(ImageInputError):
    """A video we cannot read; the one-line message names the file and the problem."""


@dataclass(frozen=True, eq=False)  # tensors: no element-wise __eq__ trap
class ImageInputs:
    """One preprocessed image (or video frame), padded to the budget's patch count."""

    pixel_values: torch.Tensor  # float32 [max_patches, 3*p*p], zeros in padding rows
    position_ids: torch.Tensor  # int64 [max_patches, 2] as (x=col, y=row), (-1, -1) in padding
    num_soft_tokens: int  # real pooled cells: (th/48)*(tw/48)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Loading


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits. Pillow's own convert("RGB") clips at 255 instead, which turns
    almost every 16-bit image white (transformers inherits that; we do not)."""
    a = np.asarray(image).astype(np.int64)
    if image.mode == "I" and a.size and a.max() <= 255:  # 32-bit container holding 8-bit data
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    a = np.clip(a, 0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference's `convert_to_rgb`: anything with alpha (or a transparency key) is
    composited onto white; 16-bit grey is scaled rather than clipped."""
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        image = _sixteen_bit_to_l(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_size(image: Image.Image, name: str) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{name}: zero-size image ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageInputError(
            f"{name}: image is {w}x{h} ({w * h / 1e6:.0f} megapixels), "
            f"over the {MAX_PIXELS // 1_000_000}-megapixel limit"
        )
    if max(w, h) > MAX_SIDE:
        raise ImageInputError(f"{name}: image is {w}x{h}, a side over the {MAX_SIDE}-pixel limit")


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Any image Pillow reads -> RGB (first frame, EXIF orientation applied, alpha on white).

    Raises ImageInputError with a one-line message for missing, empty, non-image, truncated or
    absurdly large inputs. The size cap is checked from the header, before pixels are decoded.
    """
    if isinstance(source, Image.Image):
        return _decode(source, "<PIL image>")  # the caller's image: never closed here
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = "<image bytes>", bytes(source)
        if not data:
            raise ImageInputError(f"{name}: empty input (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(data)
    elif isinstance(source, (str, Path)):
        fp, name, _ = media_file(source, ImageInputError)
    else:
        raise TypeError(f"load_image: expected a path, bytes or PIL image, got {type(source).__name__}")

    with warnings.catch_warnings():
        # Pillow warns between ~89 and ~179 MP and raises above; our own cap decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageInputError(f"{name}: image too large ({_one_line(e)})") from None
        except Image.UnidentifiedImageError:
            raise ImageInputError(f"{name}: not an image format Pillow can read") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes one line
            raise ImageInputError(f"{name}: cannot open image ({_one_line(e)})") from None
        with opened as image:
            rgb = _decode(image, name)
            return image.copy() if rgb is image else rgb  # closing `image` frees its pixels


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Size check from the header, then decode, orient and convert with one-line errors."""
    _check_size(image, name)
    try:
        image.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one line
        raise ImageInputError(f"{name}: corrupt or truncated image data ({_one_line(e)})") from None
    return to_rgb(_exif_transpose(image))


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken metadata must not reject a decodable image
        return image


# ---------------------------------------------------------------------------------------------
# Preprocessing


def target_size(height: int, width: int, max_soft_tokens: int, patch_size: int = 16,
                pooling_kernel: int = 3) -> tuple[int, int]:
    """Largest (h, w), both multiples of kernel*patch, whose patch count fits 9*T (spec 4.1 step 2,
    the reference's `get_aspect_ratio_preserving_size`, including its thin-image fallbacks)."""
    max_patches = max_soft_tokens * pooling_kernel**2
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel * patch_size
    th = math.floor(factor * height / side) * side
    tw = math.floor(factor * width / side) * side
    if th == 0 and tw == 0:  # unreachable for the supported budgets; kept for parity
        raise ImageInputError(f"cannot resize a {height}x{width} image to a multiple of {side}")
    max_side = (max_patches // pooling_kernel**2) * side
    if th == 0:
        th, tw = side, min(math.floor(width / height) * side, max_side)
    elif tw == 0:
        th, tw = min(math.floor(height / width) * side, max_side), side
    if th * tw > target_px:
        raise ImageInputError(f"resizing {height}x{width} to {th}x{tw} exceeds {max_patches} patches")
    return th, tw


def check_budget(max_soft_tokens: int) -> None:
    """An image's soft-token budget is one of the reference's (the API's `image_tokens`,
    `encode_image`'s `max_soft_tokens`: the message names neither, it had named the second to
    callers of the first)."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ValueError(f"an image's soft-token budget must be one of {SOFT_TOKEN_BUDGETS}, "
                         f"got {max_soft_tokens!r}")


def preprocess_image(image: Image.Image, max_soft_tokens: int = 280, patch_size: int = 16,
                     pooling_kernel: int = 3) -> ImageInputs:
    """One image -> padded patches and positions, exactly as the reference PIL processor."""
    check_budget(max_soft_tokens)
    _check_size(image, "<PIL image>")  # before the conversion copies its pixels
    rgb = to_rgb(image)
    width, height = rgb.size
    th, tw = target_size(height, width, max_soft_tokens, patch_size, pooling_kernel)
    if (th, tw) != (height, width):
        try:
            rgb = rgb.resize((tw, th), resample=Image.Resampling.BICUBIC, reducing_gap=None)
        except MemoryError:
            raise ImageInputError(f"<PIL image>: out of memory resizing {width}x{height} to {tw}x{th}") from None

    pixels = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)  # [th, tw, 3]
    hp, wp = th // patch_size, tw // patch_size
    patches = pixels.reshape(hp, patch_size, wp, patch_size, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(hp * wp, patch_size * patch_size * 3)  # [N, 768]
    grid_x, grid_y = np.meshgrid(np.arange(wp), np.arange(hp), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(hp * wp, 2).astype(np.int64)

    max_patches = max_soft_tokens * pooling_kernel**2
    pixel_values = torch.zeros(max_patches, patches.shape[1], dtype=torch.float32)
    pixel_values[: hp * wp] = torch.from_numpy(patches)
    position_ids = torch.full((max_patches, 2), -1, dtype=torch.int64)
    position_ids[: hp * wp] = torch.from_numpy(positions)
    return ImageInputs(pixel_values, position_ids, (hp * wp) // pooling_kernel**2)


@dataclass(frozen=True, eq=False)
class SquareImage:
    """Gemma 3's image input: the whole image resized to the tower's one square."""

    pixels: torch.Tensor  # float32 [3, S, S], normalised to [-1, 1]
    num_soft_tokens: int


def preprocess_square_image(image: Image.Image, size: int, num_soft_tokens: int) -> SquareImage:
    """One image -> [3, size, size], exactly as transformers 5.23 `Gemma3ImageProcessorPil` with
    the released checkpoints' settings: composite on white, PIL bilinear resize (aspect ratio not
    kept), rescale by 1/255 in float64 then float32, normalise with mean = std = 0.5 (pan and scan
    off, as their preprocessor configs leave it)."""
    _check_size(image, "<PIL image>")
    rgb = to_rgb(image)
    if rgb.size != (size, size):
        try:
            rgb = rgb.resize((size, size), resample=Image.Resampling.BILINEAR, reducing_gap=None)
        except MemoryError:
            raise ImageInputError(f"<PIL image>: out of memory resizing {rgb.size[0]}x{rgb.size[1]} "
                                  f"to {size}x{size}") from None
    pixels = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)  # [S, S, 3]
    half = np.float32(0.5)
    pixels = (pixels - half) / half
    return SquareImage(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), num_soft_tokens)


def stack_inputs(items: list[ImageInputs]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch for the tower: pixel_values [B, N, 768], position_ids [B, N, 2] (one budget)."""
    if not items:
        raise ValueError("stack_inputs: no images")
    if len({it.pixel_values.shape for it in items}) != 1:
        raise ValueError("stack_inputs: images were preprocessed with different budgets")
    return (torch.stack([it.pixel_values for it in items]),
            torch.stack([it.position_ids for it in items]))


# ---------------------------------------------------------------------------------------------
# Video


def format_timestamp(seconds: float) -> str:
    """"mm:ss" as the reference processor writes before each frame (minutes not wrapped)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def preprocess_video_frames(frames: list[Image.Image], timestamps: list[float],
                            max_soft_tokens: int = 70) -> tuple[list[ImageInputs], list[str]]:
    """Each frame is an independent image at the video budget (default 70 soft tokens)."""
    if len(frames) != len(timestamps):
        raise ValueError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    inputs = [preprocess_image(f, max_soft_tokens) for f in frames]
    return inputs, [format_timestamp(t) for t in timestamps]


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Uniform sampling `arange(n) * total // n`; a video shorter than n gives all its frames."""
    n = min(num_frames, total_frames)
    return [i * total_frames // n for i in range(n)]


def sample_video(path: str | Path, num_frames: int = 32) -> tuple[list[Image.Image], list[float]]:
    """Decode `num_frames` uniformly spaced frames with PyAV; timestamps are index / fps."""
    try:
        import av
    except ImportError:
        raise VideoInputError(f"{path}: video input needs PyAV (pip install av)") from None
    path, name, _ = media_file(path, VideoInputError)
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    try:
        container = av.open(ffmpeg_url(path))
    except Exception as e:  # noqa: BLE001 - FFmpeg errors become one line
        raise VideoInputError(f"{name}: cannot open video ({_one_line(e)})") from None
    try:
        with container:
            if not container.streams.video:
                raise VideoInputError(f"{name}: no video stream")
            stream = container.streams.video[0]
            _check_frame(stream.codec_context.width, stream.codec_context.height, name)  # before decoding
            rate = stream.average_rate
            fps = float(rate) if rate else VIDEO_FPS_FALLBACK
            total = int(stream.frames or 0)
            if total <= 0:  # container without a frame count: count packets (no decoding)
                total = sum(1 for p in container.demux(stream) if p.size > 0)
                container.seek(0)
            if total <= 0:
                raise VideoInputError(f"{name}: video has no frames")
            indices = sample_indices(total, num_frames)
            frames, decoded = _decode_at(container, stream, indices, name)
            if len(frames) < len(indices):  # header over-counted: resample over what exists
                container.seek(0)
                indices = sample_indices(decoded, num_frames)
                frames, _ = _decode_at(container, stream, indices, name)
            if not frames:
                raise VideoInputError(f"{name}: no decodable frames")
    except VideoInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise VideoInputError(f"{name}: cannot decode video ({_one_line(e)})") from None
    return frames, [i / fps for i in indices[: len(frames)]]


def _check_frame(width: int, height: int, name: str) -> None:
    """A video frame is held whole like an image (32 of them at once): the same pixel cap."""
    if width * height > MAX_PIXELS:
        raise VideoInputError(f"{name}: video frames are {width}x{height} ({width * height / 1e6:.0f} megapixels), "
                              f"over the {MAX_PIXELS // 1_000_000}-megapixel limit")


def _decode_at(container, stream, indices: list[int], name: str) -> tuple[list[Image.Image], int]:
    """Frames at `indices` (sorted) in decode order, and how many frames were decoded."""
    wanted, frames, count = set(indices), [], 0
    for i, frame in enumerate(container.decode(stream)):
        count = i + 1
        if i in wanted:
            _check_frame(frame.width, frame.height, name)  # the header may not say (or lie)
            frames.append(Image.fromarray(frame.to_ndarray(format="rgb24"), "RGB"))
        if i >= indices[-1]:
            break
    return frames, count
