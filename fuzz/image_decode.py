"""Fuzz target: image bytes from a stranger, decoded and preprocessed (byte level, atheris).

`load_image` on arbitrary bytes (every format Pillow opens: PNG, JPEG, GIF, BMP, WebP, TIFF,
ICO, PPM...), then `preprocess_image` at the soft-token budget the first input byte picks.
Seeds are tiny valid files in many formats and pixel modes (palette with transparency, 16-bit
grey, CMYK, float, 1-bit, animated), so mutations start inside the decoders. Contract: patches
of the budget's shape, or a one-line ImageInputError.
"""

from __future__ import annotations

import io

from _harness import instrumented, main, run_contract

with instrumented(("gemmarun", "PIL")):
    import numpy as np
    from PIL import Image

    from gemmarun.processing.image import SOFT_TOKEN_BUDGETS, ImageInputError, load_image, preprocess_image

NAME = "image_decode"
SECONDS_PER_INPUT = 20.0


def _check(data: bytes) -> None:
    if not data:
        return
    budget = SOFT_TOKEN_BUDGETS[data[0] % len(SOFT_TOKEN_BUDGETS)]
    image = load_image(data[1:])
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    inputs = preprocess_image(image, budget)
    assert inputs.pixel_values.shape == (budget * 9, 768) and 0 < inputs.num_soft_tokens <= budget


def test_one_input(data: bytes) -> None:
    run_contract(lambda: _check(data), (ImageInputError,), SECONDS_PER_INPUT)


def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), "RGB")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    grey16 = Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16).astype(np.int32), "I").convert("I;16")
    frames = [rgb, rgb.rotate(90, expand=True)]
    out = {}
    for name, image, fmt, options in [
        ("rgb.png", rgb, "PNG", {}), ("rgba.png", rgb.convert("RGBA"), "PNG", {}),
        ("palette.png", palette, "PNG", {"transparency": 0}), ("grey16.png", grey16, "PNG", {}),
        ("bits.png", rgb.convert("1"), "PNG", {}), ("la.png", rgb.convert("LA"), "PNG", {}),
        ("rgb.jpg", rgb, "JPEG", {"quality": 50}), ("cmyk.jpg", rgb.convert("CMYK"), "JPEG", {}),
        ("progressive.jpg", rgb, "JPEG", {"progressive": True}),
        ("anim.gif", frames[0], "GIF", {"save_all": True, "append_images": frames[1:], "loop": 0}),
        ("rgb.bmp", rgb, "BMP", {}), ("rgb.webp", rgb, "WEBP", {"quality": 30}),
        ("lossless.webp", rgb.convert("RGBA"), "WEBP", {"lossless": True}),
        ("float.tiff", rgb.convert("F"), "TIFF", {}), ("rgb.tiff", rgb, "TIFF", {"compression": "tiff_lzw"}),
        ("rgb.ico", rgb, "ICO", {}), ("rgb.ppm", rgb, "PPM", {}), ("rgb.tga", rgb, "TGA", {}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out[name] = bytes([len(out) % len(SOFT_TOKEN_BUDGETS)]) + buffer.getvalue()
    return out


if __name__ == "__main__":
    main(NAME, test_one_input, seeds, max_len=8192)
