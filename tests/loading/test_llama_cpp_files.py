"""GGUFs as llama.cpp's own converter writes them (what users download), against transformers 5.23:
Gemma 4 text models, and the multimodal projector (mmproj) that brings the vision and audio towers
beside a GGUF text model."""

import re

import numpy as np
import pytest
import soundfile as sf
import torch

import gemmarun
from gemmarun.cli import main
from gemmarun.loading import LoadError
from llama_cpp_converter import convert, converter_for_tests
from reference_models import IMAGE_BUDGET, build_reference, reference_image_tokens, seeded_prompt
from tiny_gguf import resident_kib, rewrite_gguf
from tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def llama_cpp():
    return converter_for_tests()


@pytest.mark.parametrize("family", ["e2b", "e4b", "31b", "26b"])
def test_text_gguf_from_llama_cpp_matches_reference(llama_cpp, tmp_path, family):
    ref = build_reference(family, tmp_path)
    write_tiny_tokenizer(tmp_path, "gemma4")
    llm = gemmarun.load(convert(tmp_path, tmp_path / "model.gguf"), dtype="float32")
    ids = seeded_prompt(3)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    ours = llm.logits(ids)
    # the folder's own load is checked against transformers in tests/model/test_text_reference.py
    # (1e-4: float32 sums in another order; e4b is 1.1e-5 away on an AMD Zen 4)
    folder = gemmarun.load(tmp_path, dtype="float32")
    assert np.abs(ours - folder.logits(ids)).max() <= 1e-6 * np.abs(theirs).max()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    assert llm.tokenizer.encode("hello world", add_bos=False) == folder.tokenizer.encode("hello world", add_bos=False)


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_our_convert_writes_the_types_llama_cpps_converter_writes(llama_cpp, tmp_path, outtype):
    """An interop probe found general.file_type written in the tensor types' numbering (llama.cpp
    described our q8_0 file as Q5_0, bf16 as IQ4_XS) and the MoE router quantized, where llama.cpp
    keeps it F32. The same folder through both converters: the same file type, tensor for tensor
    the same types."""
    from gemmarun.loading.convert import convert as our_convert
    from gemmarun.loading.gguf_file import GGUFFile

    build_reference("26b", tmp_path)
    write_tiny_tokenizer(tmp_path, "gemma4")
    theirs = GGUFFile(convert(tmp_path, tmp_path / "theirs.gguf", outtype=outtype))
    ours = GGUFFile(our_convert(tmp_path, tmp_path / "ours.gguf", outtype, progress=False))
    assert ours.metadata["general.file_type"] == theirs.metadata["general.file_type"]
    assert {n: t.ggml_type for n, t in ours.tensors.items()} == {n: t.ggml_type for n, t in theirs.tensors.items()}


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_mmproj_image_soft_tokens_match_reference(llama_cpp_multimodal, media, family):
    folder, ref, text, mmproj = llama_cpp_multimodal(family)
    llm = gemmarun.load(text, mmproj=mmproj, dtype="float32")
    ours = llm.encode_image(media / "a.png", max_soft_tokens=IMAGE_BUDGET)
    theirs = reference_image_tokens(ref, media / "a.png")
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-5


def test_mmproj_prompt_with_image_and_audio_equals_the_folder(llama_cpp_multimodal, media):
    """The whole model, text GGUF + mmproj, gives the folder's logits (the folder's are checked
    against transformers in tests/model/test_multimodal_reference.py)."""
    folder, _, text, mmproj = llama_cpp_multimodal("e2b")
    from_gguf = gemmarun.load(text, mmproj=mmproj, dtype="float32")
    from_folder = gemmarun.load(folder, dtype="float32")
    assert from_gguf.media_tokens == from_folder.media_tokens
    message = [{"role": "user", "content": [{"type": "image", "image": str(media / "a.png")},
                                            {"type": "audio", "audio": str(media / "tone.wav")},
                                            {"type": "text", "text": "hello"}]}]
    prompt = from_folder.build_prompt(message, image_tokens=IMAGE_BUDGET)
    assert from_gguf.build_prompt(message, image_tokens=IMAGE_BUDGET).ids == prompt.ids
    assert len(prompt.media) == 2
    paths = [media / "a.png", media / "tone.wav"]
    want = from_folder.logits(prompt.ids, images=paths[:1], audios=paths[1:], image_tokens=IMAGE_BUDGET)
    got = from_gguf.logits(prompt.ids, images=paths[:1], audios=paths[1:], image_tokens=IMAGE_BUDGET)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    audio = from_gguf.encode_audio(media / "tone.wav")
    assert np.abs(audio - from_folder.encode_audio(media / "tone.wav")).max() <= 1e-5 * np.abs(audio).max()


def test_bfloat16_quantized_gguf_with_mmproj_takes_image_and_audio(llama_cpp_multimodal, media, tmp_path):
    """Under bfloat16 on a CPU a quantized text model computes in float32 (its quantized matrices
    in bfloat16) while the towers are bfloat16: their soft tokens join the float32 prompt."""
    from gemmarun.loading.convert import convert as our_convert

    folder, _, _, mmproj = llama_cpp_multimodal("e2b")
    text = our_convert(folder, tmp_path / "text-q8_0.gguf", "q8_0", progress=False)
    low = gemmarun.load(text, mmproj=mmproj, dtype="bfloat16", device="cpu")
    exact = gemmarun.load(text, mmproj=mmproj, dtype="float32", device="cpu")
    assert low.model.dtype == torch.float32 and next(low.encoders.parameters()).dtype == torch.bfloat16
    message = [{"role": "user", "content": [{"type": "image", "image": str(media / "a.png")},
                                            {"type": "audio", "audio": str(media / "tone.wav")},
                                            {"type": "text", "text": "hello"}]}]
    ids = exact.build_prompt(message, image_tokens=IMAGE_BUDGET).ids
    paths = [media / "a.png", media / "tone.wav"]
    want = exact.logits(ids, images=paths[:1], audios=paths[1:], image_tokens=IMAGE_BUDGET)
    got = low.logits(ids, images=paths[:1], audios=paths[1:], image_tokens=IMAGE_BUDGET)
    assert 0 < np.abs(got - want).max() / np.abs(want).max() <= 0.1


def test_31b_gguf_with_mmproj_sees_image_blocks_as_the_folder_does(llama_cpp_multimodal, media):
    """GGUF has no key for use_bidirectional_attention: a 31B-like text GGUF (no PLE) takes it as
    every such checkpoint has it ("vision"), so an image prompt gives the folder's logits; it had
    attended causally inside the image, and parted from the folder."""
    folder, _, text, mmproj = llama_cpp_multimodal("31b")
    from_gguf = gemmarun.load(text, mmproj=mmproj, dtype="float32")
    from_folder = gemmarun.load(folder, dtype="float32")
    message = [{"role": "user", "content": [{"type": "image", "image": str(media / "a.png")},
                                            {"type": "text", "text": "hello"}]}]
    ids = from_folder.build_prompt(message, image_tokens=IMAGE_BUDGET).ids
    want = from_folder.logits(ids, images=[media / "a.png"], image_tokens=IMAGE_BUDGET)
    got = from_gguf.logits(ids, images=[media / "a.png"], image_tokens=IMAGE_BUDGET)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


@pytest.mark.parametrize("outtype, tolerance", [("f16", 2e-3), ("q8_0", 6e-2)])
def test_mmproj_in_lower_precision_stays_close(llama_cpp_multimodal, media, outtype, tolerance):
    """The mmproj files users download are mostly f16 (llama.cpp keeps convolutions and position
    tables f32): their soft tokens are the f32 file's within the weights' rounding."""
    folder, _, text, mmproj = llama_cpp_multimodal("e2b")
    exact = gemmarun.load(text, mmproj=mmproj, dtype="float32")
    low_path = convert(folder, folder / f"mmproj-{outtype}.gguf", outtype, mmproj=True)
    low = gemmarun.load(text, mmproj=low_path, dtype="float32")
    # the file's pages read to make the float32 copies are given back (all had stayed in RSS; the
    # pages these tiny tensors share with their neighbours stay, and the kernel may map a few
    # more around a fault: 55-61 % of this 351 KiB file from run to run)
    assert resident_kib(low_path) <= 0.75 * low_path.stat().st_size / 1024
    for encode, source in ((lambda m: m.encode_image(media / "a.png", IMAGE_BUDGET), "image"),
                           (lambda m: m.encode_audio(media / "tone.wav"), "audio")):
        want, got = encode(exact), encode(low)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < rel <= tolerance, f"{source}: {rel:.2e}"


def test_cli_run_takes_an_image_with_mmproj(llama_cpp_multimodal, media, capsys):
    folder, _, text, mmproj = llama_cpp_multimodal("e2b")
    args = ["--image", str(media / "a.png"), "--image-tokens", "70", "--max-tokens", "6", "--loop-guard", "off"]
    assert main(["run", str(folder), "describe", *args]) == 0
    from_folder = capsys.readouterr().out
    assert main(["run", str(text), "describe", "--mmproj", str(mmproj), *args]) == 0
    assert capsys.readouterr().out == from_folder
    assert main(["run", str(text), "describe", *args]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"--mmproj FILE, or load\(\.\.\., mmproj=FILE\)\) \({re.escape(str(mmproj.parent))}/mmproj-\S+\.gguf "
                     r"is beside it\)", err), err
    assert main(["inspect", str(text), "--mmproj", str(mmproj), "--no-tensors"]) == 0
    assert "encoders   vision_tower 0.1 M, embed_vision 0.0 M, audio_tower 0.1 M" in capsys.readouterr().out



def test_chat_attaches_images_and_audio_with_commands(llama_cpp_multimodal, media, monkeypatch, capsys):
    """/image FILE and /audio FILE go with the next message (as llama.cpp's mtmd chat takes them):
    the answer is run's for the same parts; a model without the tower, a missing file or no file
    is said at once and the message goes on as text (the exit status then 1)."""
    import io
    import sys

    _, _, text, mmproj = llama_cpp_multimodal("e2b")
    options = ["--max-tokens", "6", "--loop-guard", "off"]
    image, audio = media / "a.png", media / "tone.wav"
    assert main(["run", str(text), "describe", "--mmproj", str(mmproj), "--image", str(image), "--audio", str(audio),
                 *options]) == 0
    from_run = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image '{image}'\n/audio {audio}\ndescribe\n"))
    assert main(["chat", str(text), "--mmproj", str(mmproj), *options]) == 0
    out = capsys.readouterr()
    assert out.out == from_run and f"{image} goes with your next message" in out.err
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image}\n/image\n/audio nowhere.wav\nhello\n"))
    assert main(["chat", str(text), *options]) == 1
    err = capsys.readouterr().err
    assert "this GGUF holds the text model only" in err and "/image takes a file" in err
    assert "nowhere.wav: no such file" not in err  # the model's lack is said first
    monkeypatch.setattr(sys, "stdin", io.StringIO("/audio nowhere.wav\nhello\n"))
    assert main(["chat", str(text), "--mmproj", str(mmproj), *options]) == 1
    assert "nowhere.wav: no such file" in capsys.readouterr().err
    short = media.parent / "short.wav"  # decodes, but too short for one audio token: said when attached, by name
    sf.write(short, np.zeros(40, np.float32), 16000)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/audio {short}\nhello\n"))
    assert main(["chat", str(text), "--mmproj", str(mmproj), *options]) == 1
    err = capsys.readouterr().err
    assert f"gemmarun: error: {short}: the audio is empty" in err and "goes with your next message" not in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image}\n"))  # then the input ends
    assert main(["chat", str(text), "--mmproj", str(mmproj), *options]) == 0
    assert "gemmarun: note: 1 attached file(s) not sent: no message followed" in capsys.readouterr().err


def test_mmproj_misuse_is_a_one_line_error(llama_cpp_multimodal, tmp_path):
    folder, _, text, mmproj = llama_cpp_multimodal("31b")
    with pytest.raises(LoadError, match="multimodal projector .mmproj. GGUF, not a text model"):
        gemmarun.load(mmproj)
    with pytest.raises(LoadError, match="a model folder holds its own towers"):
        gemmarun.load(folder, mmproj=mmproj)
    with pytest.raises(LoadError, match="not 'clip': not a multimodal projector"):
        gemmarun.load(text, mmproj=text)
    with pytest.raises(LoadError, match="no such mmproj file"):
        gemmarun.load(text, mmproj=tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(LoadError, match="not a GGUF file"):
        gemmarun.load(text, mmproj=tmp_path / "junk.gguf")


def test_mmproj_from_another_checkpoint_is_refused(llama_cpp_multimodal, tmp_path):
    _, _, _, mmproj = llama_cpp_multimodal("31b")
    build_reference("31b", tmp_path, hidden_size=32)
    write_tiny_tokenizer(tmp_path, "gemma4")
    text = convert(tmp_path, tmp_path / "narrow.gguf")
    with pytest.raises(LoadError, match="vision tokens are 64 wide, the text model's embeddings 32"):
        gemmarun.load(text, mmproj=mmproj)


def _rewritten(src, dst, rename=lambda name: name, meta=None):
    """A copy of GGUF `src` at `dst` with tensors renamed and metadata keys replaced."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = (meta or {}).get(field.name, field.contents())
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, kind)
    for t in reader.tensors:
        writer.add_tensor(rename(t.name), t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _gemma3_reference_tokens(ref, image, f16_projection: bool):
    """transformers' soft tokens for one image; with `f16_projection`, through the projection
    rounded to float16 as llama.cpp's converter always stores it."""
    from gemmarun.processing.image import load_image, preprocess_square_image

    pixels = preprocess_square_image(load_image(image), 32, 16).pixels[None]
    weight = ref.model.multi_modal_projector.mm_input_projection_weight
    saved = weight.detach().clone()
    with torch.no_grad():
        if f16_projection:
            weight.copy_(weight.half().float())
        try:
            return ref.model.get_image_features(pixels).pooler_output[0].numpy()
        finally:
            weight.copy_(saved)


def test_gemma3_mmproj_gives_the_references_image_tokens(llama_cpp_multimodal, media):
    """Gemma 3's mmproj (projector type gemma3): the SigLIP tower and projector from llama.cpp's
    converter (its 1 + w norm undone, the projection in float16) give transformers' soft tokens;
    the whole model, text GGUF + mmproj, the folder's logits."""
    folder, ref, text, mmproj = llama_cpp_multimodal("gemma3")
    llm = gemmarun.load(text, mmproj=mmproj, dtype="float32")
    ours = llm.encode_image(media / "a.png")
    theirs = _gemma3_reference_tokens(ref, media / "a.png", f16_projection=True)
    assert ours.shape == (16, 64)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-5
    folder_llm = gemmarun.load(folder, dtype="float32")
    ids = [2, 40, 41, 12] + [13] * 16 + [14, 50, 60]
    assert llm.config.bidirectional_vision and llm.model.layers[-1].self_attn.spec.image_blocks
    a, b = llm.logits(ids, images=[media / "a.png"]), folder_llm.logits(ids, images=[media / "a.png"])
    assert np.abs(a - b).max() / np.abs(b).max() <= 2e-3  # (the float16 projection)


def test_gemma3_mmproj_with_swapped_feed_forward_names_loads_the_same(llama_cpp_multimodal, media, tmp_path):
    """Early conversions wrote fc1 as ffn_down and fc2 as ffn_up; llama.cpp swaps them back by shape."""
    _, _, text, mmproj = llama_cpp_multimodal("gemma3")
    swap = {"ffn_up": "ffn_down", "ffn_down": "ffn_up"}
    old = _rewritten(mmproj, tmp_path / "old.gguf",
                     lambda n: re.sub(r"\.(ffn_up|ffn_down)\.", lambda m: f".{swap[m.group(1)]}.", n))
    expected = gemmarun.load(text, mmproj=mmproj, dtype="float32").encode_image(media / "a.png")
    assert np.array_equal(gemmarun.load(text, mmproj=old, dtype="float32").encode_image(media / "a.png"), expected)


def test_gemma3_mmproj_misuse_is_a_one_line_error(llama_cpp_multimodal, tmp_path):
    _, _, gemma3_text, gemma3_mmproj = llama_cpp_multimodal("gemma3")
    _, _, gemma4_text, gemma4_mmproj = llama_cpp_multimodal("31b")
    with pytest.raises(LoadError, match="a Gemma 3 projector .'gemma3'. goes with a Gemma 3 text model; this one is gemma4"):
        gemmarun.load(gemma4_text, mmproj=gemma3_mmproj)
    with pytest.raises(LoadError, match="its projector is 'gemma4v'; a Gemma 3 text model takes Gemma 3's"):
        gemmarun.load(gemma3_text, mmproj=gemma4_mmproj)
    bad_mean = _rewritten(gemma3_mmproj, tmp_path / "mean.gguf", meta={"clip.vision.image_mean": [0.0, 0.0, 0.0]})
    with pytest.raises(LoadError, match=r"clip.vision.image_mean=\[0.0, 0.0, 0.0\]; Gemma 3's image processor"):
        gemmarun.load(gemma3_text, mmproj=bad_mean)
    few = _rewritten(gemma3_mmproj, tmp_path / "blocks.gguf", meta={"clip.vision.block_count": 3})
    with pytest.raises(LoadError, match="clip.vision.block_count=3 but the file holds 2 vision blocks"):
        gemmarun.load(gemma3_text, mmproj=few)
    grid = _rewritten(gemma3_mmproj, tmp_path / "grid.gguf", meta={"clip.vision.projector.scale_factor": 3})
    with pytest.raises(LoadError, match="scale_factor=3 does not divide the 8 patches a side"):
        gemmarun.load(gemma3_text, mmproj=grid)
    huge = _rewritten(gemma3_mmproj, tmp_path / "huge.gguf", meta={
        "clip.vision.image_size": 2**31, "clip.vision.patch_size": 2**31, "clip.vision.projector.scale_factor": 1})
    with pytest.raises(LoadError, match=r"vision: image_size=2147483648 is not in 1\.\.1048576"):  # (not an overflow)
        gemmarun.load(gemma3_text, mmproj=huge)
    stray = _rewritten(gemma3_mmproj, tmp_path / "stray.gguf", lambda n: n.replace("v.post_ln.bias", "v.post_ln.extra"))
    with pytest.raises(LoadError, match="tensors that are not Gemma 3 vision: v.post_ln.extra"):
        gemmarun.load(gemma3_text, mmproj=stray)


@pytest.mark.parametrize("ordered", [False, True])
def test_drafter_gguf_from_llama_cpp(llama_cpp, tiny_models, monkeypatch, tmp_path, ordered):
    """llama.cpp's GGUF of a gemma4_assistant drafter drafts as the folder does; its converter drops
    the centroid head, so an ordered drafter's GGUF drafts from the full tied head. Either way a
    greedy answer with it is the plain one."""
    from test_speculative import _hf_drafter

    from gemmarun.config import LayerType
    from gemmarun.loading.assistant import load_assistant

    _hf_drafter(monkeypatch, ordered).save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path, "gemma4")
    path = convert(tmp_path, tmp_path / "drafter.gguf")
    folder = load_assistant(tmp_path, dtype="float32", device="cpu")
    gguf = load_assistant(path, dtype="float32", device="cpu")
    assert gguf.config.use_ordered_embeddings is False and folder.config.use_ordered_embeddings is ordered
    folder.masked_embedding = None  # the full head, as the GGUF has it
    g = torch.Generator().manual_seed(4)
    n = 10
    kv = {7: (torch.randn(1, 1, n, 16, generator=g), torch.randn(1, 1, n, 16, generator=g), torch.arange(n)),
          9: (torch.randn(1, 1, n, 32, generator=g), torch.randn(1, 1, n, 32, generator=g), torch.arange(n))}
    embed, hidden = torch.randn(1, 1, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    producers = {LayerType.SLIDING: 7, LayerType.FULL: 9}
    with torch.no_grad():
        want = folder(embed, hidden, folder.context(kv, producers, n))
        got = gguf(embed, hidden, gguf.context(kv, producers, n))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    target = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    prompt = seeded_prompt(5)
    assert target.generate_ids(prompt, max_new_tokens=12, draft=path) == target.generate_ids(prompt, max_new_tokens=12)
    if not ordered:
        from gemmarun.loading.convert import convert as gemmarun_convert

        text = gemmarun_convert(tiny_models("e2b")[0], tmp_path / "text.gguf", "f32", progress=False)
        with pytest.raises(LoadError, match="general.architecture='gemma4' is not a drafter .gemma4-assistant."):
            load_assistant(text)
        from gguf import GGUFValueType

        no_heads = rewrite_gguf(path, tmp_path / "no-heads.gguf",
                            meta={"gemma4-assistant.attention.head_count": (0, GGUFValueType.UINT32)})
        with pytest.raises(LoadError, match="gemma4-assistant.attention.head_count=0 is not an integer"):
            load_assistant(no_heads)  # the file's own key
        # unused K/V projections load, as from a folder; a head untied from the table does not
        extra = {"blk.0.attn_k.weight": np.ones((16, 32), np.float32), "output.weight": np.ones((256, 32), np.float32)}
        with_kv = rewrite_gguf(path, tmp_path / "with-kv.gguf", tensors={"blk.0.attn_k.weight": extra["blk.0.attn_k.weight"]})
        assert torch.equal(load_assistant(with_kv).post_projection.weight, gguf.post_projection.weight)
        untied = rewrite_gguf(path, tmp_path / "untied.gguf", tensors={"output.weight": extra["output.weight"]})
        with pytest.raises(LoadError, match="output.weight is a head untied from token_embd.weight"):
            load_assistant(untied)


def _hostile_mmproj_cases():
    from gguf import GGUFValueType as T

    u32 = T.UINT32
    return {
        "no audio heads": (dict(meta={"clip.audio.attention.head_count": (0, u32)}),
                           "clip.audio.attention.head_count=0 is not an integer >= 1"),
        "audio heads past the width": (dict(meta={"clip.audio.attention.head_count": (64, u32)}),
                                       "head_count=64 heads of 16 .a.blk.0.per_dim_scale. do not make"),
        "a billion blocks": (dict(meta={"clip.vision.block_count": (10**9, u32)}),
                             "block_count=1000000000 but the file holds 2 vision blocks"),
        "negative patch": (dict(meta={"clip.vision.patch_size": (-16, T.INT32)}),
                           "clip.vision.patch_size=-16 is not an integer >= 1"),
        "negative eps": (dict(meta={"clip.vision.attention.layer_norm_epsilon": (-1.0, T.FLOAT32)}),
                         "layer_norm_epsilon=-1.0 must be positive"),
        "no pooling": (dict(meta={"clip.vision.projector.scale_factor": (0, u32)}),
                       "scale_factor=0 is not an integer >= 1"),
        "vision flag off": (dict(meta={"clip.has_vision_encoder": (False, T.BOOL)}),
                            "clip.has_vision_encoder is False but the file holds vision tensors"),
        "flat patch kernel": (dict(tensors={"v.patch_embd.weight": np.ones((32, 768), np.float32)}),
                              r"v.patch_embd.weight has shape \[32, 768\], expected \[hidden, 3, patch, patch\]"),
        "negative per_dim_scale": (dict(tensors={"a.blk.0.per_dim_scale.weight": -np.ones(16, np.float32)}),
                                   "a.blk.0.per_dim_scale.weight holds values that are not positive"),
        "one clip bound missing": (dict(drop=("v.blk.0.attn_q.input_max",)),
                                   "missing tensors: vision_tower.encoder.layers.0.self_attn.q_proj.input_max"),
        "no head count": (dict(meta={"clip.vision.attention.head_count": None}),
                          "metadata key 'clip.vision.attention.head_count' is missing"),
        "no query norm": (dict(drop=("v.blk.0.attn_q_norm.weight",)), "no v.blk.0.attn_q_norm.weight tensor"),
        "a gemma3 projector": (dict(meta={"clip.vision.projector_type": ("gemma3", T.STRING)}),
                               r"a Gemma 3 projector \('gemma3'\) goes with a Gemma 3 text model; this one is gemma4"),
    }


def test_hostile_mmproj_files_are_one_line_errors_before_any_weight_is_read(llama_cpp_multimodal, tmp_path,
                                                                             monkeypatch):
    """Each had been a traceback, a hang (a billion blocks built before any check), a torch message
    naming no tensor, or a load that failed only at generation; and each came after the whole text
    model was read. Now the header's checks run first."""
    import gemmarun.loading.gguf as gguf_loader

    _, _, text, mmproj = llama_cpp_multimodal("e2b")
    built = []
    real_build = gguf_loader.build_text_model
    monkeypatch.setattr(gguf_loader, "build_text_model", lambda *a, **k: built.append(1) or real_build(*a, **k))
    for label, (edit, message) in _hostile_mmproj_cases().items():
        case = rewrite_gguf(mmproj, tmp_path / f"{label.replace(' ', '-')}.gguf", **edit)
        built.clear()
        with pytest.raises(LoadError, match=message) as e:
            gemmarun.load(text, mmproj=case)
        assert "\n" not in str(e.value) and str(case) in str(e.value) and str(case) + ": " + str(case) not in str(e.value)
        if label != "negative per_dim_scale":  # (only the tensor's values can tell)
            assert not built, f"{label}: the text model was read before the mmproj was checked"
    with pytest.raises(LoadError, match="a folder, not an mmproj GGUF file"):
        gemmarun.load(text, mmproj=tmp_path)
    with pytest.raises(LoadError, match="'': no such mmproj file"):
        gemmarun.load(text, mmproj="")

