"""Gemma 3 image input against transformers 5.23 (Gemma3ForConditionalGeneration) on a tiny random
model: the PIL image processor's pixels, the SigLIP tower + projector's soft tokens, the
processor's placeholder expansion, full logits with images (image tokens attending to each other
in every layer) and greedy generation from a chat with an image part."""


import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import GEMMA3_IDS as IDS
from reference_models import GEMMA3_SOFT as SOFT
from reference_models import GEMMA3_VISION as VISION
from reference_models import build_gemma3_vision

import gemmarun
from gemmarun.config import ConfigError
from gemmarun.model.gemma3_vision import gemma3_media_config_from_hf
from gemmarun.processing.image import load_image, preprocess_square_image

FULL_IMAGE = "\n\n<start_of_image>" + "<image_soft_token>" * SOFT + "<end_of_image>\n\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3-vision")
    ref = build_gemma3_vision(folder)
    return gemmarun.load(folder, device="cpu"), ref, folder


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("g3media")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (50, 37, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 90, 4), dtype=np.uint8), "RGBA").save(d / "b.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(d / "c.jpg", quality=90)
    return d


def _reference_pixels(paths) -> torch.Tensor:
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]


def _rel(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max() / np.abs(np.asarray(theirs)).max())


def test_config_parsing_and_refusals():
    raw = {"model_type": "gemma3", "vision_config": VISION, "mm_tokens_per_image": SOFT, **IDS}
    cfg = gemma3_media_config_from_hf(raw)
    assert (cfg.vision.patches_per_side, cfg.pooling_kernel, cfg.image_soft_tokens) == (8, 2, 16)
    assert (cfg.tokens.boi, cfg.tokens.image, cfg.tokens.eoi) == (12, 13, 14)
    assert gemma3_media_config_from_hf({"model_type": "gemma3"}) is None
    aliased = {**raw, "image_token_id": 20, "boi_token_id": 21, "eoi_token_id": 22}  # transformers' aliases
    for key in IDS:
        del aliased[key]
    assert (gemma3_media_config_from_hf(aliased).tokens.image, gemma3_media_config_from_hf(aliased).tokens.boi) == (20, 21)
    for bad, words in [({"mm_tokens_per_image": 15}, "15 soft tokens an image .mm_tokens_per_image. are not a square"),
                       ({"mm_tokens_per_image": 9}, "9 soft tokens an image"),  # 3 does not divide 8
                       ({"vision_config": {**VISION, "hidden_act": "relu"}}, "hidden_act"),
                       ({"vision_config": {**VISION, "image_size": 30}}, "image_size=30"),
                       ({"vision_config": {**VISION, "image_size": [32, 48]}}, "non-square"),
                       ({"vision_config": {**VISION, "layer_norm_eps": -1}}, "vision_config.layer_norm_eps=-1"),
                       ({"vision_config": {**VISION, "layer_norm_eps": "abc"}}, "vision_config.layer_norm_eps='abc'"),
                       ({"vision_config": [1, 2]}, r"vision_config=\[1, 2\] must be an object"),
                       ({"vision_config": {**VISION, "num_hidden_layers": 10**6}}, "num_hidden_layers=1000000"),
                       ({"vision_config": {**VISION, "image_size": 2**20, "patch_size": 1}}, "past any image model's"),
                       ({"image_token_index": "13"}, "image_token_index='13' must be a token id"),
                       ({"boi_token_index": 13}, "must differ")]:
        with pytest.raises(ConfigError, match=words):
            gemma3_media_config_from_hf({**raw, **bad})


def test_media_token_ids_past_the_vocabulary_are_refused_at_load(pair, tmp_path):
    """A boi id past the vocabulary had ended an image prompt in an IndexError traceback, an
    image id of 2**64 every prompt (even text) in an OverflowError."""
    import json
    import shutil

    _, _, folder = pair
    for key, value, words in [("boi_token_index", 5000, "the boi token id 5000 is outside the 256-token vocabulary"),
                              ("image_token_index", 2**64, "image_token_index=18446744073709551616 must be a token id")]:
        bad = tmp_path / key
        shutil.copytree(folder, bad)
        raw = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ConfigError, match=words):
            gemmarun.load(bad, device="cpu")


def test_pixels_match_the_reference_processor(media):
    paths = [media / "a.png", media / "b.png", media / "c.jpg"]
    theirs = _reference_pixels(paths)
    ours = torch.stack([preprocess_square_image(load_image(p), 32, SOFT).pixels for p in paths])
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_soft_tokens_match_the_reference(pair, media):
    llm, ref, _ = pair
    for name in ("a.png", "b.png"):
        with torch.no_grad():
            theirs = ref.model.get_image_features(_reference_pixels([media / name])).pooler_output[0].numpy()
        ours = llm.encode_image(media / name)
        assert ours.shape == (SOFT, 64)
        assert _rel(ours, theirs) <= 1e-5


def test_a_folder_in_the_released_layout_loads_the_same_tower(pair, media, tmp_path):
    """The released checkpoints hold the tower as vision_tower.vision_model.* (transformers 5.23
    renames it on load), transformers 5.23 writes vision_tower.*: both load, to the same tokens."""
    from safetensors import safe_open

    llm, _, _ = pair
    build_gemma3_vision(tmp_path, released_layout=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "vision_tower.vision_model.post_layernorm.weight" in f.keys()
    released = gemmarun.load(tmp_path, device="cpu")
    assert np.array_equal(released.encode_image(media / "a.png"), llm.encode_image(media / "a.png"))


def test_prompt_expansion_is_the_processors(pair, media):
    """processing_gemma3: each <start_of_image> becomes the full image sequence, blank lines around
    it, and the whole text is tokenized: splicing the pieces must give the same ids."""
    from tokenizers import Tokenizer

    llm, _, folder = pair
    parts = [{"type": "text", "text": "hello"}, {"type": "image", "image": str(media / "a.png")},
             {"type": "text", "text": "the world"}, {"type": "image", "image": str(media / "b.png")}]
    messages = [{"role": "user", "content": parts}]
    prompt = llm.build_prompt(messages)
    text = llm.render_chat(messages)
    assert text.count("<start_of_image>") == 2
    theirs = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        text.replace("<start_of_image>", FULL_IMAGE), add_special_tokens=False).ids
    assert prompt.ids == theirs
    assert prompt.ids.count(13) == 2 * SOFT


def _reference_logits(ref, ids, images):
    t = torch.tensor([ids])
    with torch.no_grad():
        return ref(input_ids=t, pixel_values=_reference_pixels(images), token_type_ids=(t == 13).long()).logits[0].numpy()


def _ids(n_images: int) -> list[int]:
    ids = [2, 40, 41]
    for i in range(n_images):
        ids += [12] + [13] * SOFT + [14] + [50 + i]
    return ids + [60, 61, 62]


@pytest.mark.parametrize("n_images", [1, 2])
def test_full_logits_with_images(pair, media, n_images):
    llm, ref, _ = pair
    images = [media / "a.png", media / "b.png"][:n_images]
    ids = _ids(n_images)
    ours = llm.logits(ids, images=images)
    assert _rel(ours, _reference_logits(ref, ids, images)) <= 1e-4


def test_image_tokens_see_each_other_in_full_layers_too(pair, media):
    """Gemma 3's image blocks are bidirectional in every layer (Gemma 4's on sliding layers only):
    with them on sliding layers alone the logits part from the reference's."""
    llm, ref, _ = pair
    ids = _ids(1)
    theirs = _reference_logits(ref, ids, [media / "a.png"])
    attn = [layer.self_attn for layer in llm.model.layers if layer.self_attn.spec.window is None]
    assert attn and all(a.spec.image_blocks for a in attn)
    from dataclasses import replace

    saved = [a.spec for a in attn]
    try:
        for a in attn:
            a.spec = replace(a.spec, image_blocks=False)
        sliding_only = llm.logits(ids, images=[media / "a.png"])
    finally:
        for a, spec in zip(attn, saved):
            a.spec = spec
    assert _rel(sliding_only, theirs) > 1e-3
    assert _rel(llm.logits(ids, images=[media / "a.png"]), theirs) <= 1e-4


def test_greedy_chat_with_an_image_matches_the_reference(pair, media):
    from gemmarun.generate import generate_step
    from gemmarun.sampling import SamplingParams

    llm, ref, _ = pair
    messages = [{"role": "user", "content": [{"type": "image", "image": str(media / "a.png")},
                                             {"type": "text", "text": "hello"}]}]
    prompt = llm.build_prompt(messages)
    t = torch.tensor([prompt.ids])
    with torch.no_grad():
        theirs = ref.generate(input_ids=t, pixel_values=_reference_pixels([media / "a.png"]),
                              token_type_ids=(t == 13).long(), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, t.shape[1]:].tolist()
    text_ids, embeds, blocks = llm._inputs(prompt)
    ours = list(generate_step(llm.model, text_ids.tolist(), SamplingParams(max_tokens=10), embeds=embeds,
                              vision_blocks=blocks, chunk_size=8))  # chunks never split an image
    assert ours == theirs
    assert list(llm.token_stream(text_ids.tolist(), SamplingParams(max_tokens=10, ignore_eos=True), embeds=embeds,
                                 vision_blocks=blocks)) == theirs  # what generate() and the server decode


def test_gemma3_refuses_video_audio_and_other_budgets(pair, media):
    llm, _, _ = pair
    with pytest.raises(ValueError, match="not video"):
        llm.check_media("video")
    with pytest.raises(ValueError, match="no audio tower"):
        llm.check_media("audio")
    with pytest.raises(ValueError, match="16 soft tokens"):
        llm.encode_image(media / "a.png", max_soft_tokens=70)
