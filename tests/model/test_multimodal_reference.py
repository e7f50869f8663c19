"""Image and audio prompts end to end against transformers 5.23 (Gemma4ForConditionalGeneration)
on tiny random models: E2B-like (PLE, KV sharing, clipped vision, audio) and 31B-like (K=V,
bidirectional image attention on sliding layers, standardised vision)."""

import base64

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import gemmarun
from gemmarun.processing.audio import batch_features, load_audio, num_audio_soft_tokens, split_clips
from gemmarun.processing.image import load_image, preprocess_image, stack_inputs
from reference_models import IMAGE_BUDGET as BUDGET
from reference_models import build_multimodal, reference_image_tokens


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (200, 120, 3), dtype=np.uint8)).save(d / "b.jpg", quality=95)
    t = np.arange(int(1.3 * 16000)) / 16000
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32), 16000)
    return d


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"mm-{family}")
            ref = build_multimodal(family, folder)
            cache[family] = (gemmarun.load(folder, device="cpu"), ref)
        return cache[family]

    return get


def _prompt(llm, n_images: list[int], n_audio: list[int]) -> list[int]:
    tok = llm.media_tokens
    ids = [2, 40, 41]
    for n in n_images:
        ids += [tok.boi] + [tok.image] * n + [tok.eoi] + [50]
    for n in n_audio:
        ids += [tok.boa] + [tok.audio] * n + [tok.eoa] + [51]
    return ids + [60, 61, 62]


def _reference_inputs(llm, ids, images, audios):
    kw = {}
    if images:
        pix, pos = stack_inputs([preprocess_image(load_image(p), BUDGET) for p in images])
        kw.update(pixel_values=pix, image_position_ids=pos)
    if audios:
        feats, mask = batch_features([load_audio(a) for a in audios])
        kw.update(input_features=torch.from_numpy(feats), input_features_mask=torch.from_numpy(mask))
    t = torch.tensor([ids])
    tok = llm.media_tokens
    types = torch.zeros_like(t)
    types[t == tok.image] = 1
    types[t == tok.audio] = 3
    kw["mm_token_type_ids"] = types
    return t, kw


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_image_soft_tokens_match_reference(pair, media, family):
    llm, ref = pair(family)
    ours = llm.encode_image(media / "a.png", max_soft_tokens=BUDGET)
    theirs = reference_image_tokens(ref, media / "a.png", BUDGET)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    # unset, the budget is the model's own, as in prompts (it had been a fixed 280)
    assert np.array_equal(llm.encode_image(media / "a.png"), ours)
    # a data: URL, as an image_url part takes it (it had been opened as a file name)
    url = "data:image/png;base64," + base64.b64encode((media / "a.png").read_bytes()).decode()
    assert np.array_equal(llm.encode_image(url, max_soft_tokens=BUDGET), ours)
    with pytest.raises(ValueError, match="got '70'"):  # it had said "got 70"
        llm.encode_image(media / "a.png", max_soft_tokens="70")


def test_audio_soft_tokens_match_reference(pair, media):
    llm, ref = pair("e2b")
    ours = llm.encode_audio(media / "tone.wav")
    assert ours.shape[0] == num_audio_soft_tokens(int(1.3 * 16000)) == 33
    feats, mask = batch_features([load_audio(media / "tone.wav")])
    with torch.no_grad():
        out = ref.model.get_audio_features(torch.from_numpy(feats), torch.from_numpy(mask))
        theirs = out.pooler_output[out.attention_mask].numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4


def test_audio_given_as_samples_is_the_files_audio(pair, media):
    """A 1-D array of 16 kHz samples (numpy, torch or a list), as transformers' processor takes
    audio, gives the same soft tokens and the same reply as the file holding those samples."""
    llm, _ = pair("e2b")
    wave = load_audio(media / "tone.wav")
    from_file = llm.encode_audio(media / "tone.wav")
    for samples in (wave, torch.from_numpy(wave), wave.tolist()):
        assert np.array_equal(llm.encode_audio(samples), from_file)

    def chat(audio):
        return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "hi"}]}]

    assert llm.generate(chat(wave), max_tokens=4) == llm.generate(chat(str(media / "tone.wav")), max_tokens=4)
    for bad, problem in ((np.zeros((2, 1600), np.float32), "1-D array"), (np.array([], np.float32), "no audio samples"),
                         (np.array([0.1, np.nan], np.float32), "non-finite"), ({"x": 1}, "file path"),
                         (["a", "b"], "not an array of numbers")):
        with pytest.raises(ValueError, match=problem) as e:
            llm.encode_audio(bad)
        assert "\n" not in str(e.value)


def test_long_audio_goes_through_the_tower_one_clip_at_a_time(pair, tmp_path):
    """Each 30 s clip is a tower call of its own (at the released size its activations take ~140
    MiB a clip), and its soft tokens are the reference's for that clip alone."""
    llm, ref = pair("e2b")
    wave = (0.1 * np.random.default_rng(3).standard_normal(16000 * 62)).astype(np.float32)
    sf.write(tmp_path / "long.wav", wave, 16000)
    batches = []
    hook = llm.encoders.audio_tower.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        ours = llm.encode_audio(tmp_path / "long.wav")
    finally:
        hook.remove()
    assert batches == [1, 1, 1]
    expected = []
    for clip in split_clips(load_audio(tmp_path / "long.wav")):
        feats, mask = batch_features([clip])
        with torch.no_grad():
            out = ref.model.get_audio_features(torch.from_numpy(feats), torch.from_numpy(mask))
        expected.append(out.pooler_output[out.attention_mask].numpy())
    theirs = np.concatenate(expected)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4


@pytest.mark.parametrize("family, with_audio", [("e2b", True), ("31b", False), ("26b", False)])
def test_full_logits_with_images_and_audio(pair, media, family, with_audio):
    llm, ref = pair(family)
    images = [media / "a.png", media / "b.jpg"]
    n_img = [preprocess_image(load_image(p), BUDGET).num_soft_tokens for p in images]
    audios = [media / "tone.wav"] if with_audio else []
    ids = _prompt(llm, n_img, [33] * len(audios))
    ours = llm.logits(ids, images=images, audios=audios, image_tokens=BUDGET)
    t, kw = _reference_inputs(llm, ids, images, audios)
    with torch.no_grad():
        theirs = ref(input_ids=t, **kw).logits[0].numpy()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-4, f"rel {rel:.2e}"


def test_one_medium_given_alone_is_one_medium(pair, media):
    """images="photo.png" had been read as the characters of the path ("/: not a regular file")."""
    llm, _ = pair("e2b")
    ids = _prompt(llm, [preprocess_image(load_image(media / "a.png"), BUDGET).num_soft_tokens], [33])
    alone = llm.logits(ids, images=str(media / "a.png"), audios=media / "tone.wav", image_tokens=BUDGET)
    listed = llm.logits(ids, images=[media / "a.png"], audios=[media / "tone.wav"], image_tokens=BUDGET)
    assert np.array_equal(alone, listed)


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_placeholder_ids_without_media_read_as_pad_like_the_reference(pair, family):
    """A media placeholder that no medium fills (one that decoding generates) is embedded as the pad
    token, table and PLE rows, as the reference's every forward does: gemmarun had embedded its
    own rows, and a greedy answer parted from the reference's after such a token."""
    from gemmarun.cache import make_cache

    llm, ref = pair(family)
    tok = llm.media_tokens
    ids = [2, 40, tok.image, 41, tok.audio, 42, tok.image]
    t = torch.tensor([ids])
    with torch.inference_mode():
        whole = llm.model(t, torch.arange(len(ids)))[0].float().numpy()
        cache = make_cache(llm.config, 16)
        llm.model(t[:, :-1], torch.arange(len(ids) - 1), cache)
        step = llm.model(t[:, -1:], torch.tensor([len(ids) - 1]), cache)[0, -1].float().numpy()  # the decode path
    with torch.no_grad():
        theirs = ref(input_ids=t).logits[0].numpy()
    assert np.abs(whole - theirs).max() / np.abs(theirs).max() <= 1e-4
    assert np.abs(step - theirs[-1]).max() / np.abs(theirs[-1]).max() <= 1e-4


def test_bidirectional_vision_matters_on_31b(pair, media):
    llm, _ = pair("31b")
    n = preprocess_image(load_image(media / "a.png"), BUDGET).num_soft_tokens
    ids = _prompt(llm, [n], [])
    with_blocks = llm.logits(ids, images=[media / "a.png"], image_tokens=BUDGET)
    object.__setattr__(llm.config, "bidirectional_vision", False)
    try:
        causal = llm.logits(ids, images=[media / "a.png"], image_tokens=BUDGET)
    finally:
        object.__setattr__(llm.config, "bidirectional_vision", True)
    assert np.abs(with_blocks - causal).max() > 1e-4


@pytest.mark.parametrize("family", ["e2b", "31b", "26b"])
def test_greedy_generation_with_media_matches_reference(pair, media, family):
    llm, ref = pair(family)
    images = [media / "a.png"]
    audios = [media / "tone.wav"] if family == "e2b" else []
    n_img = [preprocess_image(load_image(images[0]), BUDGET).num_soft_tokens]
    ids = _prompt(llm, n_img, [33] * len(audios))
    from gemmarun.llm import Prompt
    from gemmarun.sampling import SamplingParams

    prepared = tuple(llm.prepare_media("image", p, BUDGET) for p in images) + tuple(llm.prepare_media("audio", a, None) for a in audios)
    text_ids, embeds, blocks = llm._inputs(Prompt(ids, prepared))
    from gemmarun.generate import generate_step

    ours = list(generate_step(llm.model, text_ids.tolist(), SamplingParams(max_tokens=12), embeds=embeds,
                              vision_blocks=blocks, chunk_size=8))
    t, kw = _reference_inputs(llm, ids, images, audios)
    with torch.no_grad():
        theirs = ref.generate(input_ids=t, **kw, max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs


def test_chat_messages_with_image_and_audio_parts(pair, media):
    llm, _ = pair("e2b")
    messages = [{"role": "user", "content": [
        {"type": "image", "image": str(media / "a.png")},
        {"type": "text", "text": "hello"},
        {"type": "audio", "audio": str(media / "tone.wav")},
    ]}]
    prompt = llm.build_prompt(messages, image_tokens=BUDGET)
    tok = llm.media_tokens
    n = preprocess_image(load_image(media / "a.png"), BUDGET).num_soft_tokens
    assert prompt.ids.count(tok.image) == n and prompt.ids.count(tok.audio) == 33
    head = llm.tokenizer.encode("<bos><|turn>user\n", add_bos=False)
    assert prompt.ids[: len(head)] == head and prompt.ids[len(head)] == tok.boi
    out = llm.generate(messages, max_tokens=5, image_tokens=BUDGET)
    assert isinstance(out, str)


def test_cli_run_with_image_and_audio_and_transcribe(pair, media, capsys, tmp_path):
    from gemmarun.cli import main

    llm, _ = pair("e2b")
    folder = str(llm.info.path)
    assert main(["run", folder, "Describe this", "--image", str(media / "a.png"), "--audio",
                 str(media / "tone.wav"), "--image-tokens", "70", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["transcribe", folder, str(media / "tone.wav"), "--max-tokens", "4"]) == 0
    assert "stopped at 4 tokens" in capsys.readouterr().err  # (the notice of a cut answer)
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    assert main(["transcribe", folder, str(bad)]) == 1
    err = capsys.readouterr().err
    assert "notes.wav" in err and len(err.strip().splitlines()) == 1
    assert main(["run", folder, "x", "--image", str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err
    # a URL is not fetched (its "//" had been folded into a path: "https:/example.com/cat.png: no such file")
    want = "https://example.com/cat.png: a URL; gemmarun reads media from local files only"
    assert main(["run", folder, "x", "--image", "https://example.com/cat.png"]) == 1
    assert capsys.readouterr().err.strip() == f"gemmarun: error: {want} (download it first)"
    import io
    import sys

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", io.StringIO("/audio https://example.com/a.wav\n/bye\n"))
        assert main(["chat", folder, "--max-tokens", "2"]) == 1
    assert "https://example.com/a.wav: a URL; gemmarun reads media from local files only" in capsys.readouterr().err
    # convert writes the text model and says the towers stay behind (it had said nothing at all)
    assert main(["convert", folder, str(tmp_path / "text.gguf"), "--type", "f32"]) == 0
    err = capsys.readouterr().err
    assert "gemmarun: note: the vision/audio towers (" in err and "tensors) are not written" in err
    assert f"gemmarun: wrote {tmp_path / 'text.gguf'} (" in err


def test_text_only_model_refuses_media_clearly(tiny_models, media):
    folder, _ = tiny_models("31b")
    llm = gemmarun.load(folder, device="cpu")
    with pytest.raises(ValueError, match="text only"):
        llm.encode_image(media / "a.png")


def test_placeholders_without_their_media_are_a_clear_error(pair):
    """A text prompt holding an image or audio placeholder id (typed, or given as ids) has no soft
    tokens for it: it was embedded as the placeholder's own row; now the mismatch is named."""
    llm, _ = pair("e2b")
    tok = llm.media_tokens
    for placeholder, name in ((tok.image, "image"), (tok.audio, "audio")):
        with pytest.raises(ValueError, match=f"1 {name} soft-token positions but the {name} inputs give 0"):
            llm.generate_ids([2, 40, placeholder, 41], max_new_tokens=1)
    assert len(llm.generate_ids([2, 40, 41], max_new_tokens=2)) == 2


def test_penalties_count_a_media_prompt_as_its_ids_in_every_path(pair, media, monkeypatch):
    """The single-request path handed the sampler the prompt with pads where the image and audio
    placeholders are (what the token tables read): a repetition penalty fell on <pad>, not on
    the placeholders as in the batch engine and transformers."""
    import gemmarun.batching as batching
    import gemmarun.generate as generate
    from gemmarun.batching import BatchEngine
    from gemmarun.sampling import Sampler, SamplingParams

    llm, _ = pair("e2b")
    seen_first = []

    class Spy(Sampler):
        def __call__(self, logits, seen, generated):
            if not len(generated):
                seen_first.append(seen.tolist())
            return super().__call__(logits, seen, generated)

    monkeypatch.setattr(generate, "Sampler", Spy)
    monkeypatch.setattr(batching, "Sampler", Spy)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(media / "a.png")},
                                             {"type": "audio", "audio": str(media / "tone.wav")},
                                             {"type": "text", "text": "hi"}]}]
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=4, repetition_penalty=5.0, ignore_eos=True)
    prompt = llm.build_prompt(messages, image_tokens=BUDGET)
    list(llm.stream_prompt(prompt, params))
    engine = BatchEngine(llm)
    engine.add(prompt, params)
    while engine.busy:
        engine.step()
    assert seen_first == [prompt.ids, prompt.ids]  # the single path's first draw, then the engine's
