"""The encoder-free `gemma4_unified` variant against transformers 5.23 on a tiny random model:
config parsing, preprocessing vs the reference processors, embedder outputs vs
`get_image_features` / `get_audio_features` / `get_video_features`, and full logits with images and
audio. The LLM integration is applied test-locally (TextModel + merge + UnifiedEncoders); the last
test runs through `gemmarun.load` once the integration patch is in.

torchvision is not installable here, so the reference image/video processors are loaded from
their source with `tvF` replaced by the op torchvision's CPU uint8 bicubic `resize` runs
(`F.interpolate(uint8, antialias=True)`) and its `normalize`; everything else is the reference's.
"""

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from reference_models import COMMON, _randomize
from tiny_tokenizer import MEDIA_IDS, write_tiny_tokenizer

import gemmarun
from gemmarun import masks
from gemmarun.config import ConfigError, text_config_from_hf
from gemmarun.loading.build import build_text_model
from gemmarun.loading.names import map_hf_names, map_hf_tower_names
from gemmarun.loading.safetensors import read_folder
from gemmarun.model import attention as attention_module
from gemmarun.model.multimodal import AUDIO, IMAGE, VIDEO, merge, token_types
from gemmarun.model.unified import UnifiedEncoders, unified_config_from_hf
from gemmarun.processing.audio import load_audio
from gemmarun.processing.image import load_image, stack_inputs
from gemmarun.processing.prompt import PreparedImage, expand
from gemmarun.processing.unified import (
    PreparedRawAudio,
    batch_frames,
    num_audio_tokens,
    num_image_tokens,
    prepare_unified,
    preprocess_unified_image,
    preprocess_unified_video_frames,
    soft_inputs,
)

S, FULL = "sliding_attention", "full_attention"
TEXT = {**COMMON, "num_hidden_layers": 6, "layer_types": [S] * 5 + [FULL], "num_key_value_heads": 2,
        "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
        "use_bidirectional_attention": "vision", "max_position_embeddings": 1024}
VISION = {"mm_embed_dim": 48, "mm_posemb_size": 72, "output_proj_dims": 48}
AUDIO_CFG = {"audio_embed_dim": 640}
BUDGET = 70


# ---------------------------------------------------------------------------------------------
# Reference pieces


class _TorchvisionStub:
    """The two torchvision functions the reference processors call, transcribed for CPU tensors."""

    InterpolationMode = object

    @staticmethod
    def resize(image, size, interpolation, antialias=True):
        shape = image.shape  # resize_image: uint8 bicubic is native on CPU, no float round trip
        out = F.interpolate(image.reshape(-1, *shape[-3:]), size=list(size), mode="bicubic",
                            align_corners=False, antialias=antialias)
        return out.reshape(*shape[:-2], *size)

    @staticmethod
    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


def _reference_module(filename: str):
    import transformers.models.gemma4_unified as pkg

    path = Path(pkg.__file__).with_name(filename)
    name = f"{pkg.__name__}._without_torchvision_{filename[:-3]}"
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__file__, module.__package__, module.tvF = str(path), pkg.__name__, _TorchvisionStub
        sys.modules[name] = module  # registered so auto_docstring can find the source
        src = path.read_text().replace("from torchvision.transforms.v2 import functional as tvF\n", "")
        exec(compile(src, str(path), "exec"), module.__dict__)  # noqa: S102 - the installed reference source
    return sys.modules[name]


@pytest.fixture
def tv_stub(monkeypatch):
    """The reference processor classes (the real ones when torchvision is importable)."""
    try:
        import torchvision  # noqa: F401
        from transformers.models.gemma4_unified import image_processing_gemma4_unified as img
        from transformers.models.gemma4_unified import video_processing_gemma4_unified as vid
    except ImportError:
        import transformers.image_processing_backends as backends

        monkeypatch.setattr(backends, "tvF", _TorchvisionStub, raising=False)  # for `normalize`
        img = _reference_module("image_processing_gemma4_unified.py")
        vid = _reference_module("video_processing_gemma4_unified.py")
    return SimpleNamespace(image=img.Gemma4UnifiedImageProcessor, video=vid.Gemma4UnifiedVideoProcessor)


def _randomize_embedders(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("model.embed_vision.", "model.embed_audio.")):
                continue
            if name.endswith("pos_embedding"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("weight"):  # LayerNorm scales
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _gemma4_text_dict(raw: dict) -> dict:
    """What the proposed config.py change does: per_layer_config -> the released Gemma 4 keys."""
    tc = dict(raw["text_config"])
    (override,) = {json.dumps(v, sort_keys=True) for v in tc.pop("per_layer_config").values()}
    override = json.loads(override)
    return {**tc, "model_type": "gemma4_text", "global_head_dim": override["head_dim"],
            "num_global_key_value_heads": override.get("num_key_value_heads")}


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    folder = tmp_path_factory.mktemp("unified")
    torch.manual_seed(0)
    cfg = Gemma4UnifiedConfig(text_config=TEXT, vision_config=VISION, audio_config=AUDIO_CFG, **MEDIA_IDS)
    ref = Gemma4UnifiedForConditionalGeneration(cfg).float().eval()
    _randomize(ref.model.language_model, gemma3=False)
    _randomize_embedders(ref)
    ref.save_pretrained(folder)
    write_tiny_tokenizer(folder, "gemma4")

    raw = json.loads((folder / "config.json").read_text())
    tensors = read_folder(folder)
    assert not any(k.startswith("model.embed_vision.patch") for k in tensors)  # the file keeps `vision_embedder.`
    patch = {k: t for k, t in tensors.items() if k.startswith("model.vision_embedder.")}
    text_cfg = text_config_from_hf(_gemma4_text_dict(raw))
    state, _ = map_hf_names({k: t for k, t in tensors.items() if k not in patch}, text_cfg)
    model = build_text_model(text_cfg, state, dtype=torch.float32, device=torch.device("cpu"))
    mm_cfg = unified_config_from_hf(raw)
    with torch.device("meta"):
        encoders = UnifiedEncoders(mm_cfg, text_cfg.hidden_size)
    towers = {**map_hf_tower_names(tensors), **{k.removeprefix("model."): t for k, t in patch.items()}}
    encoders.load_state_dict(towers, strict=True, assign=True)  # file names minus `model.`
    return SimpleNamespace(folder=folder, ref=ref, raw=raw, model=model, encoders=encoders.eval(), mm=mm_cfg)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (200, 120, 3), dtype=np.uint8)).save(d / "b.jpg", quality=95)
    t = np.arange(int(1.3 * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(d / "tone.wav", wave.astype(np.float32), 16000)
    return d


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# ---------------------------------------------------------------------------------------------
# Config


def test_config_parsing(unified):
    mm = unified.mm
    assert mm.vision.patch_dim == 6912 and mm.vision.mm_posemb_size == 72 and mm.vision.mm_embed_dim == 48
    assert mm.audio.samples_per_token == 640 and mm.image_soft_tokens == 280
    assert (mm.tokens.image, mm.tokens.audio, mm.tokens.boi, mm.tokens.eoa) == (13, 16, 12, 17)
    assert unified_config_from_hf({**unified.raw, "model_type": "gemma4"}) is None
    bad = [({"vision_config": {**unified.raw["vision_config"], "num_hidden_layers": 2}}, "num_hidden_layers"),
           ({"vision_config": {**unified.raw["vision_config"], "output_proj_dims": 64}}, "output_proj_dims"),
           ({"vision_config": {"model_type": "gemma4_vision"}}, "model_type"),
           ({"vision_config": {"patch_size": 0}}, "patch_size"),
           ({"audio_config": {"audio_embed_dim": 640, "audio_samples_per_token": 320}}, "audio_samples_per_token"),
           ({"vision_soft_tokens_per_image": 100}, "vision_soft_tokens_per_image")]
    for change, key in bad:
        with pytest.raises(ConfigError, match=key):
            unified_config_from_hf({**unified.raw, **change})


# ---------------------------------------------------------------------------------------------
# Preprocessing vs the reference processors


def _images():
    rng = np.random.default_rng(1)
    arr = lambda h, w, c=3: rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)
    return [Image.fromarray(arr(90, 150)), Image.fromarray(arr(200, 120)), Image.fromarray(arr(37, 300)),
            Image.fromarray(arr(336, 480)),  # exactly the 70-token pixel budget: no resize
            Image.fromarray(arr(64, 80, 4), "RGBA"), Image.fromarray(arr(50, 70, 1), "L")]


@pytest.mark.parametrize("budget", [70, 280])
def test_image_preprocessing_matches_reference_processor(tv_stub, budget):
    images = _images()
    theirs = tv_stub.image(max_soft_tokens=budget)(images, return_tensors="pt")
    for i, image in enumerate(images):
        ours = preprocess_unified_image(image, budget)
        assert torch.equal(ours.pixel_values, theirs["pixel_values"][i]), i
        assert torch.equal(ours.position_ids, theirs["image_position_ids"][i]), i
        assert ours.num_soft_tokens == int(theirs["num_soft_tokens_per_image"][i])
        assert num_image_tokens(image.height, image.width, budget) == ours.num_soft_tokens


def test_video_preprocessing_matches_reference_processor(tv_stub):
    rng = np.random.default_rng(2)
    frames = [Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)) for _ in range(3)]
    ours, stamps = preprocess_unified_video_frames(frames, [0.0, 1.5, 61.0])
    assert stamps == ["00:00", "00:01", "01:01"]
    proc = tv_stub.video()
    video = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in frames]).contiguous()
    theirs = proc._preprocess([video], do_resize=True, resample=proc.resample, do_rescale=True,
                              rescale_factor=proc.rescale_factor, do_normalize=proc.do_normalize,
                              image_mean=tuple(proc.image_mean), image_std=tuple(proc.image_std),
                              return_tensors="pt", patch_size=16, max_soft_tokens=70, pooling_kernel_size=3)
    assert torch.equal(torch.stack([o.pixel_values for o in ours]), theirs["pixel_values_videos"])
    assert torch.equal(torch.stack([o.position_ids for o in ours]), theirs["video_position_ids"])
    assert ours[0].num_soft_tokens == int(theirs["num_soft_tokens_per_video"][0])


def test_audio_frames_match_reference_feature_extractor():
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    rng = np.random.default_rng(3)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.3 for n in (20800, 1920, 100)]
    fe = Gemma4UnifiedAudioFeatureExtractor()
    theirs = fe(waves, return_tensors="np")
    feats, mask = batch_frames(waves)
    np.testing.assert_array_equal(feats, theirs["input_features"])
    np.testing.assert_array_equal(mask, theirs["input_features_mask"])
    fake = SimpleNamespace(feature_extractor=fe, boa_token="[", audio_token="a", eoa_token="]")
    for b, w in enumerate(waves):
        n = num_audio_tokens(len(w))
        assert n == Gemma4UnifiedProcessor._compute_audio_num_tokens(fake, w, 16000) == [33, 3, 1][b]
        assert Gemma4UnifiedProcessor.replace_audio_token(fake, theirs, b) == "[" + "a" * n + "]"


def test_prompt_expansion(unified, media):
    tok = unified.mm.tokens
    image = prepare_unified("image", media / "a.png", BUDGET, unified.mm)
    audio = prepare_unified("audio", media / "tone.wav", BUDGET, unified.mm)
    assert isinstance(audio, PreparedRawAudio) and len(audio.clips) == 1 and audio.counts == [33]
    ids = expand("x<|image|>y<|audio|>", [image, audio], lambda s: [100 + ord(c) % 50 for c in s], tok, "gemma4")
    n = image.inputs.num_soft_tokens
    assert ids == [120] + [tok.boi] + [tok.image] * n + [tok.eoi] + [121] + [tok.boa] + [tok.audio] * 33 + [tok.eoa]


# ---------------------------------------------------------------------------------------------
# Embedders vs get_*_features


def test_image_features_match_reference(unified, media):
    items = [preprocess_unified_image(load_image(media / p), BUDGET) for p in ("a.png", "b.jpg")]
    pix, pos = stack_inputs(items)
    ours = unified.encoders.images(pix, pos)
    with torch.no_grad():
        theirs = unified.ref.model.get_image_features(pix, pos).pooler_output
    assert [o.shape[0] for o in ours] == [it.num_soft_tokens for it in items]
    for o, t in zip(ours, theirs):
        assert _rel(o, t) <= 1e-4


def test_audio_features_match_reference(unified, media):
    waves = [load_audio(media / "tone.wav"), np.random.default_rng(4).standard_normal(1000).astype(np.float32)]
    feats, mask = (torch.from_numpy(a) for a in batch_frames(waves))
    ours = unified.encoders.audio(feats, mask)
    with torch.no_grad():
        out = unified.ref.model.get_audio_features(feats, mask)
    assert [o.shape[0] for o in ours] == [33, 2]
    for b, o in enumerate(ours):
        assert _rel(o, out.pooler_output[b][out.attention_mask[b]]) <= 1e-4


def test_video_features_match_reference(unified):
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)) for _ in range(2)]
    inputs, _ = preprocess_unified_video_frames(frames, [0.0, 1.0])
    pix, pos = stack_inputs(inputs)
    ours = torch.cat(unified.encoders.images(pix, pos))
    with torch.no_grad():
        theirs = unified.ref.model.get_video_features(pix, pos, num_frames_per_video=torch.tensor([2])).pooler_output
    assert _rel(ours, theirs[0]) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Full logits


def _prompt(unified, media):
    tok = unified.mm.tokens
    prepared = [prepare_unified("image", media / "a.png", BUDGET, unified.mm),
                prepare_unified("image", media / "b.jpg", BUDGET, unified.mm),
                prepare_unified("audio", media / "tone.wav", BUDGET, unified.mm)]
    ids = [2] + expand("ab<|image|>c<|image|>d<|audio|>efg", prepared, lambda s: [60 + ord(c) % 100 for c in s],
                       tok, "gemma4")
    return ids, prepared


def _ours(unified, ids, prepared):
    """The proposed LLM._inputs path: soft tokens per item, merged, one cacheless forward."""
    soft = {IMAGE: [], VIDEO: [], AUDIO: []}
    for item in prepared:
        kind, (a, b) = soft_inputs(item)
        soft[AUDIO if kind == "audio" else IMAGE].extend(getattr(unified.encoders, kind)(a, b))
    text_ids, embeds, blocks = merge(unified.model, torch.tensor(ids), unified.mm.tokens, soft,
                                     unified.model.config.pad_id, unified.model.config.bidirectional_vision)
    with torch.no_grad():
        out = unified.model(text_ids[None], torch.arange(len(ids)), embeds=embeds, vision_blocks=blocks)
    return out[0].numpy(), blocks


def _reference(unified, media, ids, generate_masks: bool):
    ref = unified.ref
    images = [load_image(media / p) for p in ("a.png", "b.jpg")]
    pix, pos = stack_inputs([preprocess_unified_image(im, BUDGET) for im in images])
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    audio = Gemma4UnifiedAudioFeatureExtractor()([load_audio(media / "tone.wav")], return_tensors="pt")
    t = torch.tensor([ids])
    types = token_types(t, unified.mm.tokens)
    kw = {"input_ids": t, "pixel_values": pix, "image_position_ids": pos,
          "input_features": audio["input_features"], "input_features_mask": audio["input_features_mask"],
          "mm_token_type_ids": types}
    if generate_masks:  # what the reference's generate builds: image blocks on sliding layers only
        kw["attention_mask"] = ref.create_masks_for_generate(
            config=ref.config, inputs_embeds=torch.empty(1, len(ids), 0), attention_mask=None,
            past_key_values=None, position_ids=torch.arange(len(ids))[None], mm_token_type_ids=types)
    with torch.no_grad():
        return ref(**kw).logits[0].numpy()


def test_full_logits_match_reference_generate_masks(unified, media):
    """Gemma 4 semantics (spec 3.3): bidirectional image blocks on sliding layers only, as the
    reference's `create_masks_for_generate` builds them."""
    ids, prepared = _prompt(unified, media)
    ours, blocks = _ours(unified, ids, prepared)
    assert blocks is not None and int(blocks.max()) == 1  # two image blocks
    assert _rel(ours, _reference(unified, media, ids, generate_masks=True)) <= 1e-4


def _visible_with_whole_blocks(blocks: torch.Tensor):
    """`masks.visible` where the image blocks are OR-ed in after the window, on every layer."""

    def visible(q_pos, k_pos, window, _blocks=None):
        n = blocks.numel()
        bq = torch.where(q_pos < n, blocks[q_pos.clamp(0, n - 1)], -1)[:, None]
        bk = torch.where((k_pos >= 0) & (k_pos < n), blocks[k_pos.clamp(0, n - 1)], -2)[None, :]
        return masks.visible(q_pos, k_pos, window) | ((bq == bk) & (bq >= 0))

    return visible


def test_full_logits_match_reference_forward_with_whole_blocks(unified, media, monkeypatch):
    """The reference's plain `forward` hands the image blocks to `create_masks_for_generate`,
    which ORs them in after the causal / sliding-window mask on every layer: an image sees all of
    itself on full layers and beyond the window on sliding ones. Matched by patching `visible`."""
    ids, prepared = _prompt(unified, media)
    blocks = masks.vision_blocks(token_types(torch.tensor(ids), unified.mm.tokens))
    monkeypatch.setattr(attention_module, "visible", _visible_with_whole_blocks(blocks))
    ours, _ = _ours(unified, ids, prepared)
    forward = _reference(unified, media, ids, generate_masks=False)
    assert _rel(ours, forward) <= 1e-4
    # ... and the two reference paths really differ on this prompt.
    assert _rel(forward, _reference(unified, media, ids, generate_masks=True)) > 1e-4


def test_load_and_logits_through_gemmarun(unified, media):
    """End to end through `gemmarun.load` and `LLM.logits`."""
    text_cfg = text_config_from_hf(unified.raw)
    assert text_cfg == unified.model.config  # per_layer_config read as the released global keys
    llm = gemmarun.load(unified.folder, device="cpu")
    assert isinstance(llm.encoders, UnifiedEncoders)
    ids, _ = _prompt(unified, media)
    ours = llm.logits(ids, images=[media / "a.png", media / "b.jpg"], audios=[media / "tone.wav"],
                      image_tokens=BUDGET)
    assert _rel(ours, _reference(unified, media, ids, generate_masks=True)) <= 1e-4
    soft = llm.encode_audio(media / "tone.wav")
    assert soft.shape == (33, TEXT["hidden_size"])
    prepared = llm.prepare_media("image", media / "a.png", BUDGET)
    assert isinstance(prepared, PreparedImage) and prepared.inputs.pixel_values.shape[-1] == 6912
