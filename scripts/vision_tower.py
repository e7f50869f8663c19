"""What one image costs: a released checkpoint's vision tower and projector, gemmarun against
transformers, on the same random weights with the real shapes.

Gemma 4's towers (e2b, e4b, 31b, 26b-a4b: a 280-token budget, a 640x480 image) and Gemma 3's
SigLIP tower (`gemma3`: the 4B, 12B and 27B share it; every image is 896 x 896 pixels, 4096
patches, 256 soft tokens). Each runtime encodes the same preprocessed pixels `--passes` times
(the fastest pass counts); the soft tokens must agree. `--write FILE` records the table.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

# gemma-3-4b-it's vision_config and text width (the 12B and 27B use the same tower; their text
# widths are 3840 and 5376). transformers' SiglipVisionConfig defaults fill the rest.
GEMMA3_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 896, "patch_size": 14, "vision_use_head": False, "model_type": "siglip_vision_model"}
GEMMA3_TEXT_WIDTH = 2560
GEMMA4_BUDGET = 280


def _fastest(encode, passes: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    with torch.inference_mode():
        for _ in range(passes):
            began = time.perf_counter()
            out = encode()
            best = min(best, time.perf_counter() - began)
    return best, out


def _randomize(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02, generator=generator)


def _reference_with(reference: torch.nn.Module, ours: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' model holding our towers' weights (its text model, one tiny layer, unused)."""
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or any(not name.startswith("language_model.") for name in missing):
        raise SystemExit(f"the towers' names differ: {unexpected or missing}")
    return reference.to(dtype).eval()


def _tiny_text(hidden: int) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": 1, "vocab_size": 16, "intermediate_size": 8,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8, "layer_types": ["full_attention"]}


def gemma3(passes: int, dtype: torch.dtype) -> tuple[float, float, float, str]:
    """(gemmarun s, transformers s, max relative difference, setup) for Gemma 3's tower."""
    from transformers import Gemma3Config, Gemma3Model

    from gemmarun.model.gemma3_vision import Gemma3Encoders, gemma3_media_config_from_hf
    from gemmarun.processing.image import preprocess_square_image

    raw = {"model_type": "gemma3", "vision_config": GEMMA3_VISION, "mm_tokens_per_image": 256}
    ours = Gemma3Encoders(gemma3_media_config_from_hf(raw), GEMMA3_TEXT_WIDTH)
    _randomize(ours)
    ours = ours.to(dtype).eval()
    config = Gemma3Config(text_config=_tiny_text(GEMMA3_TEXT_WIDTH), vision_config=GEMMA3_VISION)
    reference = _reference_with(Gemma3Model(config), ours, dtype)
    pixels = preprocess_square_image(_image(), GEMMA3_VISION["image_size"], 256).pixels[None].to(dtype)
    ours_s, a = _fastest(lambda: ours.images(pixels)[0], passes)
    theirs_s, b = _fastest(lambda: reference.get_image_features(pixels).pooler_output[0], passes)
    return ours_s, theirs_s, _rel(a, b), "gemma3 (4B/12B/27B SigLIP), an 896x896 image, 256 soft tokens"


def gemma4(name: str, passes: int, dtype: torch.dtype) -> tuple[float, float, float, str]:
    from transformers import Gemma4Config, Gemma4Model

    from gemmarun.loading.random_weights import released_config
    from gemmarun.model.multimodal import Encoders, multimodal_config_from_hf
    from gemmarun.processing.image import preprocess_image, stack_inputs

    full, raw = released_config(name)
    raw = {**raw, "audio_config": None}
    hidden = raw["text_config"]["hidden_size"]
    ours = Encoders(multimodal_config_from_hf(raw), hidden)
    _randomize(ours)
    ours = ours.to(dtype).eval()
    # (the released config's "dtype": "bfloat16" would make transformers compute parts in bfloat16)
    vision = {k: v for k, v in raw["vision_config"].items() if k not in ("dtype", "torch_dtype")}
    config = Gemma4Config(text_config=_tiny_text(hidden), vision_config=vision, audio_config=None)
    reference = _reference_with(Gemma4Model(config), ours, dtype)
    pixels, positions = stack_inputs([preprocess_image(_image(), GEMMA4_BUDGET)])
    pixels = pixels.to(dtype)
    ours_s, a = _fastest(lambda: ours.images(pixels, positions)[0], passes)
    theirs_s, b = _fastest(lambda: reference.get_image_features(pixels, positions).pooler_output[0], passes)
    return ours_s, theirs_s, _rel(a, b), f"{full}, a 640x480 image, {GEMMA4_BUDGET}-token budget"


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", action="append", default=None,
                        help="gemma3, e2b, e4b, 31b or 26b-a4b (repeatable; default: gemma3 and e2b)")
    parser.add_argument("--passes", type=int, default=2, help="encodes per runtime; the fastest counts")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", metavar="FILE", default=None, help="record the table into this markdown file")
    args = parser.parse_args(argv)
    from gemmarun.bench import check_write_option, publish_script_section

    check_write_option(parser, args.write)
    if args.passes < 1:
        parser.error("--passes must be at least 1")
    towers = args.tower or ["gemma3", "e2b"]
    unknown = sorted(set(towers) - {"gemma3", "e2b", "e4b", "31b", "26b-a4b"})
    if unknown:
        parser.error(f"--tower {unknown[0]}: give gemma3, e2b, e4b, 31b or 26b-a4b")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = ["| tower | gemmarun | transformers 5.23 | speed, gemmarun / transformers | soft tokens differ by |",
            "|---|---|---|---|---|"]
    for tower in towers:
        ours, theirs, rel, setup = gemma3(args.passes, dtype) if tower == "gemma3" else gemma4(tower, args.passes, dtype)
        rows.append(f"| {setup} | {ours:.2f} s | {theirs:.2f} s | {theirs / ours:.2f}x | {rel:.1e} of the largest |")
    lines = [f"- random weights with the real shapes, {args.dtype}, the fastest of {args.passes} pass(es) each, "
             "the same preprocessed pixels", "", *rows, ""]
    publish_script_section(__file__, argv, f"one image through the vision tower, {args.dtype}", args.threads,
                           lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
