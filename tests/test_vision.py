"""Vision preprocessing, tower and projector against transformers 5.23 (tiny random configs),
image loading from real formats, and video sampling with PyAV."""

from __future__ import annotations

import base64
import builtins
import functools
import io
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from gemmarun.config import ConfigError
from gemmarun.model.vision import MultimodalEmbedder, VisionTower, vision_config_from_hf
from gemmarun.processing.image import (
    MAX_SIDE,
    SOFT_TOKEN_BUDGETS,
    ImageInputError,
    load_image,
    preprocess_image,
    preprocess_video_frames,
    sample_video,
    stack_inputs,
)

VISION = {
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 256, "rms_norm_eps": 1e-6,
}
VARIANTS = {
    "e2b": {**VISION, "use_clipped_linears": True, "standardize": False},
    "31b": {**VISION, "use_clipped_linears": False, "standardize": True},
}
TEXT = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 16,
    "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0,
    "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
}


def _noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Preprocessing vs Gemma4ImageProcessorPil


@pytest.fixture(scope="module")
def pil_processor():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


SIZES = [(1, 1), (20, 20000), (20000, 20), (480, 640), (1080, 1920), (224, 224), (37, 333),
         (768, 768), (3, 500), (700, 9)]


@pytest.mark.parametrize("budget", SOFT_TOKEN_BUDGETS)
def test_preprocess_matches_reference(pil_processor, budget):
    for i, (h, w) in enumerate(SIZES):
        img = _noise_image(h, w, seed=i)
        ref = pil_processor.preprocess([img], max_soft_tokens=budget, return_tensors="np")
        ours = preprocess_image(img, max_soft_tokens=budget)
        assert ours.pixel_values.dtype == torch.float32 and ours.position_ids.dtype == torch.int64
        assert ours.pixel_values.shape == (9 * budget, 768)
        np.testing.assert_array_equal(ours.pixel_values.numpy(), ref["pixel_values"][0], err_msg=f"{h}x{w}")
        np.testing.assert_array_equal(ours.position_ids.numpy(), ref["image_position_ids"][0])
        assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])


def test_preprocess_examples_and_alpha(pil_processor):
    # Spec 4.1 examples at T = 280.
    assert preprocess_image(_noise_image(480, 640)).num_soft_tokens == 266
    assert preprocess_image(_noise_image(1080, 1920)).num_soft_tokens == 264
    with pytest.raises(ValueError, match="soft-token budget must be one of"):
        preprocess_image(_noise_image(10, 10), max_soft_tokens=100)
    # Non-RGB PIL input goes through the same white compositing as the reference.
    rgba = np.random.default_rng(3).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    ref = pil_processor.preprocess([img], max_soft_tokens=70, return_tensors="np")
    np.testing.assert_array_equal(preprocess_image(img, 70).pixel_values.numpy(), ref["pixel_values"][0])


# ---------------------------------------------------------------------------------------------
# Tower + projector vs Gemma4Model.get_image_features


def _randomize(model, variant: str) -> None:
    g = torch.Generator().manual_seed(7)

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("vision_tower.", "embed_vision.")):
                continue
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(uniform(p.shape, 0.1, 0.4))  # attention scale is 1.0: keep q.k moderate
            elif "norm" in name:
                p.copy_(uniform(p.shape, 0.5, 1.5))
            elif "position_embedding_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        tower = model.vision_tower
        if variant == "31b":
            tower.std_bias.copy_(torch.randn(tower.std_bias.shape, generator=g) * 2.0)
            tower.std_scale.copy_(uniform(tower.std_scale.shape, 0.5, 2.0))


def _calibrate_clips(model, pixel_values, position_ids) -> None:
    """Set every clip bound inside the observed activation range so the clamps really bite."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    seen, hooks = {}, []

    def record(name):
        def hook(module, args, out):
            seen[name] = (args[0].detach(), out.detach())
        return hook

    for name, mod in model.vision_tower.named_modules():
        if isinstance(mod, Gemma4ClippableLinear):
            hooks.append(mod.register_forward_hook(record(name)))
    with torch.no_grad():
        model.get_image_features(pixel_values, position_ids)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(11)
    mods = dict(model.vision_tower.named_modules())
    with torch.no_grad():
        for name, (x, y) in seen.items():
            m = mods[name]
            for lo, hi, t in ((m.input_min, m.input_max, x), (m.output_min, m.output_max, y)):
                q = torch.quantile(t.flatten()[:100000].float(), torch.tensor([0.03, 0.97]))
                shrink = float(torch.rand((), generator=g)) * 0.3 + 0.6
                lo.fill_(float(q[0]) * shrink)
                hi.fill_(float(q[1]) * shrink)


def _batch(sizes, budget):
    items = [preprocess_image(_noise_image(h, w, seed=10 + i), budget) for i, (h, w) in enumerate(sizes)]
    return stack_inputs(items)


@functools.cache
def _reference(variant: str):
    from transformers import Gemma4Config, Gemma4Model

    torch.manual_seed(0)
    cfg = Gemma4Config(text_config=TEXT, vision_config=VARIANTS[variant], audio_config=None)
    model = Gemma4Model(cfg).float().eval()
    _randomize(model, variant)
    if VARIANTS[variant]["use_clipped_linears"]:
        _calibrate_clips(model, *_batch([(96, 144), (40, 300)], 70))
    return model


def _ours(model, variant: str):
    cfg = vision_config_from_hf(model.config.vision_config.to_dict())
    assert cfg.use_clipped_linears == VARIANTS[variant]["use_clipped_linears"]
    tower = VisionTower(cfg).eval()
    embedder = MultimodalEmbedder(cfg.hidden_size, model.config.text_config.hidden_size, cfg.rms_norm_eps)
    state = model.state_dict()
    tower_sd = {k[len("vision_tower."):]: v for k, v in state.items() if k.startswith("vision_tower.")}
    embed_sd = {k[len("embed_vision."):]: v for k, v in state.items() if k.startswith("embed_vision.")}
    # Identity map: exactly the same names, both ways.
    assert set(tower_sd) == set(tower.state_dict())
    assert set(embed_sd) == set(embedder.state_dict())
    tower.load_state_dict(tower_sd, strict=True)
    embedder.load_state_dict(embed_sd, strict=True)
    return tower, embedder


def _compare(model, tower, embedder, pixel_values, position_ids):
    with torch.no_grad():
        ref = model.get_image_features(pixel_values, position_ids).pooler_output
        soft = tower(pixel_values, position_ids)
        assert [t.shape[0] for t in soft] == [r.shape[0] for r in ref]
        ours = [embedder(t) for t in soft]
    for o, r in zip(ours, ref):
        rel = float((o - r).abs().max() / r.abs().max())
        assert rel < 1e-4, rel
    return ours


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_tower_matches_reference(variant):
    model = _reference(variant)
    tower, embedder = _ours(model, variant)
    # One image, then a batch of three sizes (different real patch counts), at two budgets.
    _compare(model, tower, embedder, *_batch([(96, 144)], 70))
    pv, pos = _batch([(96, 144), (40, 300), (20, 2000)], 70)
    batched = _compare(model, tower, embedder, pv, pos)
    assert [t.shape[0] for t in batched] == [60, 66, 70]
    single = [embedder(t) for t in tower(pv[1:2], pos[1:2])]  # batching changes nothing
    torch.testing.assert_close(single[0], batched[1], rtol=1e-5, atol=1e-6)
    _compare(model, tower, embedder, *_batch([(64, 64), (200, 30)], 140))


def test_clip_bounds_bite():
    model = _reference("e2b")
    tower, _ = _ours(model, "e2b")
    pv, pos = _batch([(96, 144)], 70)
    with torch.no_grad():
        clipped = tower(pv, pos)[0]
        for name, buf in tower.named_buffers():
            buf.fill_(float("-inf") if name.endswith("_min") else float("inf"))
        free = tower(pv, pos)[0]
    assert float((clipped - free).abs().max()) > 1e-2 * float(free.abs().max())


def test_vision_config_errors():
    base = dict(VARIANTS["e2b"])
    for key, value in [("hidden_activation", "gelu"), ("attention_bias", True),
                       ("rope_parameters", {"rope_type": "yarn"}), ("head_dim", 18),
                       ("model_type", "siglip_vision_model")]:
        with pytest.raises(ConfigError, match=key.split("_")[0]):
            vision_config_from_hf({**base, key: value})
    cfg = vision_config_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 100.0}})
    assert (cfg.hidden_size, cfg.num_layers, cfg.head_dim, cfg.rope_theta) == (768, 16, 64, 100.0)
    # values of the wrong JSON type or range: named, not cast (int("32")) or left to fail in a tower
    for key, value, words in [("hidden_size", "32", r"hidden_size='32' must be an integer in 1\.\.1048576"),
                              ("num_hidden_layers", 0, r"num_hidden_layers=0 must be an integer in 1\.\.1024"),
                              ("num_hidden_layers", 10**6, r"num_hidden_layers=1000000 must be an integer in 1\.\.1024"),
                              ("hidden_size", 2**63, "hidden_size=9223372036854775808 must be an integer"),
                              ("patch_size", 1024, "patch_size=1024 is past any image model's"),
                              ("rms_norm_eps", -1, "rms_norm_eps=-1 must be a positive number"),
                              ("rms_norm_eps", "abc", "rms_norm_eps='abc' must be a positive number"),
                              ("standardize", "yes", "standardize='yes' must be true or false"),
                              ("rope_parameters", [], r"rope_parameters=\[\] must be an object")]:
        with pytest.raises(ConfigError, match=f"vision_config.{words}"):
            vision_config_from_hf({**base, key: value})


def test_tower_builds_on_meta():
    cfg = vision_config_from_hf({**VARIANTS["31b"], "position_embedding_size": 10240})
    with torch.device("meta"):
        tower = VisionTower(cfg)
    assert all(t.is_meta for t in tower.state_dict().values())


# ---------------------------------------------------------------------------------------------
# Loading real formats


def _rgb_pattern(w: int = 40, h: int = 24) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 6 % 256, y * 10 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _all_inputs(tmp_path: Path, data: bytes, suffix: str):
    path = tmp_path / f"img{suffix}"
    path.write_bytes(data)
    return [load_image(path), load_image(str(path)), load_image(data),
            load_image(Image.open(io.BytesIO(data)))]


def test_load_formats(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    base = _rgb_pattern()
    cases = {
        ".png": (_saved(base, "PNG"), np.asarray(base)),
        ".webp": (_saved(base, "WEBP", lossless=True), np.asarray(base)),
    }
    jpeg = _saved(base, "JPEG", quality=90)
    cases[".jpg"] = (jpeg, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    gif = _saved(base, "GIF", save_all=True, append_images=[Image.new("RGB", base.size, (9, 9, 9))])
    cases[".gif"] = (gif, np.asarray(Image.open(io.BytesIO(gif)).convert("RGB")))  # frame 0
    for suffix, (data, want) in cases.items():
        for got in _all_inputs(tmp_path, data, suffix):
            assert got.mode == "RGB" and got.size == base.size
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=suffix)

    # 16-bit grey: scaled to 8 bits (Pillow's convert would clip everything above 255).
    a16 = (np.arange(24 * 40).reshape(24, 40) * 68).astype(np.uint16)
    im16 = Image.fromarray(a16)
    data = _saved(im16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    want = ((a16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    for got in _all_inputs(tmp_path, data, ".png"):
        np.testing.assert_array_equal(np.asarray(got), np.repeat(want[..., None], 3, axis=-1))

    # Palette with a transparent index, RGBA and LA: composited on white, as the reference.
    pal = base.quantize(16)
    pal.info["transparency"] = 0
    rgba = base.copy()
    rgba.putalpha(Image.fromarray((np.arange(40)[None, :].repeat(24, 0) * 6).astype(np.uint8)))
    la = rgba.convert("LA")
    for img in (pal, rgba, la):
        data = _saved(img, "PNG", **({"transparency": 0} if img.mode == "P" else {}))
        want = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
        for got in _all_inputs(tmp_path, data, ".png"):
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=img.mode)
    assert np.asarray(load_image(_saved(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]  # alpha 0


def test_load_exif_rotation(tmp_path):
    base = _rgb_pattern(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = _saved(base, "JPEG", quality=95, exif=exif.tobytes())
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    for got in _all_inputs(tmp_path, data, ".jpg"):
        assert got.size == (24, 40)
        np.testing.assert_array_equal(np.asarray(got), want)


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\0IEND\xaeB`\x82")


def test_load_errors(tmp_path):
    def one_line_error(source, *words):
        with pytest.raises(ImageInputError) as e:
            load_image(source)
        msg = str(e.value)
        assert "\n" not in msg
        for w in words:
            assert w in msg, msg

    jpeg = _saved(_noise_image(64, 64), "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    one_line_error(truncated, str(truncated), "truncated")
    one_line_error(jpeg[: len(jpeg) // 2], "<image bytes>", "truncated")
    one_line_error(Image.open(io.BytesIO(jpeg[: len(jpeg) // 2])), "<PIL image>", "truncated")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    one_line_error(text, str(text), "not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    one_line_error(empty, str(empty), "empty")
    one_line_error(tmp_path / "missing.png", "missing.png", "no such file")
    # a name the OS refuses (a data URL taken for a path, say): one line, the name cut short
    with pytest.raises(ImageInputError, match="cannot read") as e:
        load_image("data:image/png;base64," + "A" * 5000)
    assert len(str(e.value)) < 300
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(12000, 10000))  # 120 MP: under Pillow's own error threshold
    one_line_error(huge, str(huge), "megapixel")
    one_line_error(Image.new("RGB", (0, 5)), "<PIL image>", "zero-size")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30000, 30000))  # Pillow's DecompressionBombError
    one_line_error(bomb, str(bomb), "too large")
    # a 1-pixel strip under the pixel cap, whose resize would have taken 32 bytes a pixel of its
    # length (a 1 x 70M PNG, 68 KB, raised MemoryError from Pillow)
    strip = tmp_path / "strip.png"
    strip.write_bytes(_png_header(1, MAX_SIDE + 1))
    one_line_error(strip, str(strip), f"1x{MAX_SIDE + 1}", "side over")
    with pytest.raises(ImageInputError, match="side over"):
        preprocess_image(Image.new("L", (MAX_SIDE + 1, 1)))
    # a URL is not fetched (it had read as "https:/example.com/cat.png: no such file")
    one_line_error("https://example.com/cat.png", "https://example.com/cat.png", "local files only")


# ---------------------------------------------------------------------------------------------
# Video


def _write_video(path: Path, frames: int, fps: int, h: int, w: int) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0] = i * 4
            a[:, : (i * 9) % w, 1] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _reference_video_processor(monkeypatch):
    """Gemma4VideoProcessor needs torchvision only for resizing (skipped when frames are already
    at the target size) and for `normalize`; stub the latter with torchvision's tensor formula."""
    import transformers.image_processing_backends as backends

    # `tvF.InterpolationMode` is evaluated in a class-body annotation at import time.
    monkeypatch.setattr(builtins, "tvF", types.SimpleNamespace(InterpolationMode=object), raising=False)
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    monkeypatch.delattr(builtins, "tvF")
    monkeypatch.setattr(backends, "tvF", types.SimpleNamespace(
        normalize=lambda t, mean, std, inplace=False: (t - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)),
        raising=False)
    return Gemma4VideoProcessor()


def test_video_against_reference(tmp_path, monkeypatch):
    pytest.importorskip("av")
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import default_sample_indices_fn, load_video

    path = tmp_path / "clip.mp4"
    _write_video(path, frames=50, fps=25, h=336, w=480)  # 336x480 is its own 70-token target size
    frames, timestamps = sample_video(path)
    ref_video, meta = load_video(str(path), backend="pyav",
                                 sample_indices_fn=functools.partial(default_sample_indices_fn, num_frames=32))
    assert len(frames) == 32
    assert timestamps == pytest.approx(meta.timestamps)
    assert timestamps[:3] == [0.0, 1 / 25, 3 / 25]
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in frames]), ref_video)

    inputs, stamps = preprocess_video_frames(frames, timestamps)
    ref = _reference_video_processor(monkeypatch)([ref_video], video_metadata=[meta], do_sample_frames=False,
                                        do_convert_rgb=False, return_tensors="pt")
    pv, pos = stack_inputs(inputs)
    assert pv.shape == (32, 630, 768)
    torch.testing.assert_close(pv, ref["pixel_values_videos"], rtol=0, atol=0)
    torch.testing.assert_close(pos, ref["video_position_ids"], rtol=0, atol=0)
    n = inputs[0].num_soft_tokens
    assert n == ref["num_soft_tokens_per_video"][0] == 70

    # Prompt text: the reference's own replacement code with our timestamps.
    fake = types.SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    want = Gemma4Processor.replace_video_token(
        fake, {"num_soft_tokens_per_video": [n], "video_metadata": [meta]}, 0)
    assert " ".join(f"{s} <|image>{'<|video|>' * n}<image|>" for s in stamps) == want
    assert stamps[-1] == "00:01"


def test_video_short_and_errors(tmp_path, monkeypatch):
    pytest.importorskip("av")
    path = tmp_path / "short.mp4"
    _write_video(path, frames=5, fps=10, h=48, w=64)
    frames, timestamps = sample_video(path)  # fewer frames than 32: all of them
    assert len(frames) == 5 and timestamps == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    frames, timestamps = sample_video(path, num_frames=2)
    assert timestamps == pytest.approx([0.0, 0.2])
    inputs, stamps = preprocess_video_frames(frames, [65.5, 3600.0])
    assert stamps == ["01:05", "60:00"] and inputs[0].pixel_values.shape == (630, 768)
    mkv = tmp_path / "nocount.mkv"  # Matroska reports no frame count: packets are counted
    _write_video(mkv, frames=7, fps=10, h=48, w=64)
    frames, timestamps = sample_video(mkv, num_frames=4)
    assert len(frames) == 4 and timestamps == pytest.approx([0.0, 0.1, 0.3, 0.5])
    # a name with a colon had gone to FFmpeg as a protocol ("Protocol not found"; pipe: read stdin)
    monkeypatch.chdir(tmp_path)  # (a relative name: FFmpeg looks for a protocol before any "/")
    for name in ("rec-12:30.mp4", "pipe:0.mp4"):
        (tmp_path / name).write_bytes(path.read_bytes())
        assert len(sample_video(name)[0]) == 5
    bad = tmp_path / "bad.mp4"
    bad.write_text("no video here")
    with pytest.raises(ImageInputError, match="bad.mp4"):
        sample_video(bad)


@pytest.mark.parametrize("header_says", [True, False])
def test_video_frames_are_held_to_the_image_pixel_cap(tmp_path, monkeypatch, header_says):
    """32 frames are held at once before resizing: a frame over the image cap is refused, from
    the stream's header before decoding, else from the first decoded frame."""
    pytest.importorskip("av")
    import gemmarun.processing.image as image_module

    path = tmp_path / "v.mp4"
    _write_video(path, frames=3, fps=10, h=48, w=64)
    monkeypatch.setattr(image_module, "MAX_PIXELS", 48 * 64 - 1)
    if not header_says:  # a stream whose header gives no size: the decoded frame is checked
        monkeypatch.setattr(image_module, "_check_frame", _check_only_decoded(image_module._check_frame))
    with pytest.raises(ImageInputError, match=r"v.mp4: video frames are 64x48 .*megapixel limit"):
        sample_video(path)


def _check_only_decoded(check):
    calls = []

    def wrapped(width, height, name):
        calls.append((width, height))
        if len(calls) > 1:  # the first call is the header's
            check(width, height, name)

    return wrapped


def test_media_parts_take_data_urls_in_the_python_api():
    """transformers' chat form {"type": "image", "url": "data:..."}: the bytes, not a path."""
    from gemmarun.processing.prompt import part_source

    png = _saved(_noise_image(8, 8), "PNG")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    for part in ({"type": "image", "url": url}, {"type": "image", "image": url},
                 {"type": "image_url", "image_url": {"url": url}}):
        assert part_source(part) == png
    assert part_source({"type": "image", "path": "file:///tmp/a.png"}) == "/tmp/a.png"
    for bad in ("UklGRg==", None, {"format": "wav"}):  # the data must sit in an object
        with pytest.raises(ValueError, match="input_audio part has no base64 data"):
            part_source({"type": "input_audio", "input_audio": bad})
    assert load_image(part_source({"type": "image", "url": url})).size == (8, 8)
