"""Ollama's files: its single GGUF holding Gemma 4's text model and towers (as its converter writes
them, see tests/ollama_files.py), and models named from its local store (`ollama:gemma4:e2b`)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

import gemmarun
from gemmarun.cli import main
from gemmarun.loading import LoadError
from gemmarun.loading.ollama import display_name, manifest_parts
from llama_cpp_converter import TOWER_EPS
from ollama_files import write_ollama_gemma3_gguf, write_ollama_gguf
from reference_models import IMAGE_BUDGET, build_gemma3_vision, build_multimodal
from tiny_gguf import rewrite_gguf, tiny_gguf


@pytest.fixture(scope="module")
def ollama(tmp_path_factory):
    """family -> (HF folder, Ollama's GGUF of it with F32 matrices)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"ollama-{family}")
            build_multimodal(family, folder, tower_eps=TOWER_EPS)
            cache[family] = folder, write_ollama_gguf(folder, folder.parent / f"{folder.name}.gguf")
        return cache[family]

    return get


def _message(media, audio: bool = True):
    parts = [{"type": "image", "image": str(media / "a.png")}]
    parts += [{"type": "audio", "audio": str(media / "tone.wav")}] if audio else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": "hello"}]}]


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_ollama_gemma4_file_gives_the_folders_logits(ollama, media, family):
    """Text, image and audio from the one file equal the folder's (checked against transformers
    elsewhere); the image's differ by the F16 rounding of the patch kernel, which Ollama forces."""
    folder, path = ollama(family)
    ours, want_llm = gemmarun.load(path, dtype="float32"), gemmarun.load(folder, dtype="float32")
    assert ours.media_tokens == want_llm.media_tokens
    text = want_llm.build_prompt([{"role": "user", "content": "hello world"}]).ids
    assert ours.build_prompt([{"role": "user", "content": "hello world"}]).ids == text
    assert _rel(ours.logits(text), want_llm.logits(text)) <= 1e-5
    audio = family == "e2b"  # the 31B has no audio tower
    message = _message(media, audio)
    prompt = want_llm.build_prompt(message, image_tokens=IMAGE_BUDGET)
    assert ours.build_prompt(message, image_tokens=IMAGE_BUDGET).ids == prompt.ids
    paths = {"images": [media / "a.png"], "audios": [media / "tone.wav"] if audio else []}
    want = want_llm.logits(prompt.ids, image_tokens=IMAGE_BUDGET, **paths)
    got = ours.logits(prompt.ids, image_tokens=IMAGE_BUDGET, **paths)
    assert 0 < _rel(got, want) <= 1e-3
    if audio:  # no F16 on the audio path: the same soft tokens
        assert _rel(ours.encode_audio(media / "tone.wav"), want_llm.encode_audio(media / "tone.wav")) <= 1e-5


def test_ollama_types_stay_close(ollama, media, tmp_path):
    """Ollama writes matrices F16 (BF16 from a bfloat16 checkpoint): the soft tokens stay within
    that rounding of the folder's."""
    folder, _ = ollama("e2b")
    path = write_ollama_gguf(folder, tmp_path / "f16.gguf", ollama_types=True)
    assert GGUFReader(path).get_tensor(0).tensor_type.name in ("F16", "F32")
    ours, want = gemmarun.load(path, dtype="float32"), gemmarun.load(folder, dtype="float32")
    assert 0 < _rel(ours.encode_image(media / "a.png", IMAGE_BUDGET), want.encode_image(media / "a.png", IMAGE_BUDGET)) < 2e-2
    assert 0 < _rel(ours.encode_audio(media / "tone.wav"), want.encode_audio(media / "tone.wav")) < 2e-2


def test_ollama_tokenizer_is_read_as_gemma4s(ollama):
    """Ollama writes Gemma 4's BPE vocabulary as tokenizer.ggml.model "llama" (pre "gemma4"): read
    as SentencePiece it would split words by the file's order; read as BPE it is the folder's."""
    folder, path = ollama("e2b")
    ours, want = gemmarun.load(path).tokenizer, gemmarun.load(folder).tokenizer
    for text in ("hello world", "the <|turn>user\nhe llo", " leading and  double  spaces", "é ü 漢"):
        assert ours.encode(text, add_bos=False) == want.encode(text, add_bos=False), text


def test_ollama_file_misuse_is_a_one_line_error(ollama, tmp_path):
    folder, path = ollama("e2b")
    with pytest.raises(LoadError, match="holds its own vision/audio towers .* but a projector"):
        gemmarun.load(path, mmproj=path)
    clamps = [t.name for t in GGUFReader(path).tensors if t.name.startswith("v.") and t.name.endswith(("_min", "_max"))]
    packed = rewrite_gguf(path, tmp_path / "packed.gguf", drop=clamps, tensors={"v.clamp_data": np.zeros(60, np.float32)})
    with pytest.raises(LoadError, match="only packed in v.clamp_data"):
        gemmarun.load(packed)
    odd = rewrite_gguf(path, tmp_path / "odd.gguf", tensors={"a.blk.0.strange.weight": np.zeros(4, np.float32)})
    with pytest.raises(LoadError, match="not Gemma 4 vision or audio: a.blk.0.strange.weight"):
        gemmarun.load(odd)
    no_block = rewrite_gguf(path, tmp_path / "noblock.gguf",
                        drop=[t.name for t in GGUFReader(path).tensors if t.name.startswith("a.blk.1.")])
    with pytest.raises(LoadError, match=r"gemma4.audio.block_count=2 but the file holds 1 audio blocks"):
        gemmarun.load(no_block)


def test_ollama_gemma3_file_with_its_siglip_tower_gives_the_folders_logits(tmp_path, media):
    """Ollama's Gemma 3 file holds the SigLIP tower under the checkpoint's names and leaves out
    the eps, RoPE and window keys: its defaults are the checkpoints' values, and its RoPE scaling
    (linear 8 on the full layers, every Gemma 3 with vision) is taken as theirs: the folder's
    logits, bit for bit, with an image and without."""
    folder = tmp_path / "g3"
    build_gemma3_vision(folder, released_layout=True)
    path = write_ollama_gemma3_gguf(folder, tmp_path / "g3.gguf")
    assert not any("rope.scaling" in field for field in GGUFReader(path).fields)
    ours, want = gemmarun.load(path, dtype="float32"), gemmarun.load(folder, dtype="float32")
    assert ours.model.config.rope_full == want.model.config.rope_full and ours.model.config.rope_full.factor == 8.0
    message = [{"role": "user", "content": [{"type": "image", "image": str(media / "a.png")},
                                            {"type": "text", "text": "hello"}]}]
    ids = want.build_prompt(message).ids
    assert ours.build_prompt(message).ids == ids
    images = [media / "a.png"]
    assert np.array_equal(ours.logits(ids, images=images), want.logits(ids, images=images))
    odd = rewrite_gguf(path, tmp_path / "odd.gguf", tensors={"v.blk.0.strange.weight": np.zeros(4, np.float32)})
    with pytest.raises(LoadError, match="not Gemma 3 vision: v.blk.0.strange.weight"):
        gemmarun.load(odd)
    from gguf import GGUFValueType

    grid = rewrite_gguf(path, tmp_path / "grid.gguf", meta={"gemma3.mm.tokens_per_image": (9, GGUFValueType.UINT32)})
    with pytest.raises(LoadError, match="tokens_per_image=9 is not a square grid of soft tokens that divides"):
        gemmarun.load(grid)


# ---------------------------------------------------------------------------------------------
# Ollama's store


def _store(root, name_parts, layers: dict[str, bytes]):
    """An Ollama store under `root` with one manifest: {media type: blob bytes}."""
    entries = []
    for media_type, data in layers.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        entries.append({"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)})
    manifest = root / "manifests" / "/".join(name_parts)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": entries}))
    return manifest


def test_manifest_names_take_ollamas_defaults():
    assert manifest_parts("gemma4") == ("registry.ollama.ai", "library", "gemma4", "latest")
    assert manifest_parts("gemma4:e2b") == ("registry.ollama.ai", "library", "gemma4", "e2b")
    assert manifest_parts("me/mine:q4") == ("registry.ollama.ai", "me", "mine", "q4")
    assert manifest_parts("hf.co/owner/repo:Q4_K_M") == ("hf.co", "owner", "repo", "Q4_K_M")
    # a registry's port is no tag (it had been refused), and a scheme is dropped, as Ollama does
    assert manifest_parts("localhost:5000/me/tiny:v1") == ("localhost:5000", "me", "tiny", "v1")
    assert manifest_parts("https://hf.co/owner/repo") == ("hf.co", "owner", "repo", "latest")
    # what `ollama list` shows (and `serve` reports): the tag always, the default host and namespace not
    assert [display_name(n) for n in ("gemma4", "Registry.Ollama.AI/Library/x:t", "me/x", "hf.co/o/r:q")] == \
        ["gemma4:latest", "x:t", "me/x:latest", "hf.co/o/r:q"]
    for bad in ("", "a:b:c", "../x", "a/b/c/d", "gemma4:", "x y", "..:1/a/b", "a/b:c/d"):
        with pytest.raises(LoadError, match="not an Ollama model name"):
            manifest_parts(bad)


def test_models_load_by_their_ollama_name(ollama, media, tmp_path, monkeypatch, capsys):
    """`ollama:gemma4:e2b` is the blob its manifest names (Ollama's model file with its towers); a
    projector layer is taken as the mmproj."""
    _, path = ollama("e2b")
    root = tmp_path / "models"
    _store(root, ("registry.ollama.ai", "library", "gemma4", "e2b"),
           {"application/vnd.ollama.image.model": path.read_bytes(),
            "application/vnd.ollama.image.template": b"{{ .Prompt }}",
            "application/vnd.ollama.image.params": b'{"stop": ["<turn|>"]}'})
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    llm = gemmarun.load("ollama:gemma4:e2b", dtype="float32")
    assert llm.encoders is not None and llm.info.path.name.startswith("sha256-")
    want = gemmarun.load(path, dtype="float32")
    ids = want.build_prompt(_message(media), image_tokens=IMAGE_BUDGET).ids
    paths = {"images": [media / "a.png"], "audios": [media / "tone.wav"], "image_tokens": IMAGE_BUDGET}
    assert np.array_equal(llm.logits(ids, **paths), want.logits(ids, **paths))
    assert main(["run", "ollama:GEMMA4:e2b", "hello", "--max-tokens", "3", "--raw"]) == 0  # names fold case
    capsys.readouterr()

    # a text-only model, pulled from a registry with a port
    text = tiny_gguf("gemma4")
    _store(root, ("localhost:5000", "me", "tiny", "v1"), {"application/vnd.ollama.image.model": text})
    assert gemmarun.load("ollama:localhost:5000/me/tiny:v1").encoders is None


def test_ollama_projector_layer_is_the_mmproj(tmp_path, monkeypatch, llama_cpp_multimodal, media):
    _, _, text, mmproj = llama_cpp_multimodal("e2b")
    root = tmp_path / "models"
    _store(root, ("registry.ollama.ai", "library", "withproj", "latest"),
           {"application/vnd.ollama.image.model": text.read_bytes(),
            "application/vnd.ollama.image.projector": mmproj.read_bytes()})
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    llm = gemmarun.load("ollama:withproj", dtype="float32")
    want = gemmarun.load(text, mmproj=mmproj, dtype="float32")
    assert np.array_equal(llm.encode_image(media / "a.png", IMAGE_BUDGET), want.encode_image(media / "a.png", IMAGE_BUDGET))


def test_ollama_store_problems_are_one_line_errors(tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    with pytest.raises(LoadError, match=r"no such model in Ollama's store .*`ollama pull gemma4:e2b`"):
        gemmarun.load("ollama:gemma4:e2b")
    manifest = _store(root, ("registry.ollama.ai", "library", "broken", "latest"), {})
    manifest.write_text("{not json")
    with pytest.raises(LoadError, match="not an Ollama manifest"):
        gemmarun.load("ollama:broken")
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.license", "digest": "x"}]}))
    with pytest.raises(LoadError, match="names no model layer"):
        gemmarun.load("ollama:broken")
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": "sha256:" + "0" * 64}]}))
    with pytest.raises(LoadError, match="is missing"):
        gemmarun.load("ollama:broken")
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": "../../etc/passwd"}]}))
    with pytest.raises(LoadError, match="is not sha256"):
        gemmarun.load("ollama:broken")
    _store(root, ("registry.ollama.ai", "library", "tuned", "latest"),
           {"application/vnd.ollama.image.model": b"GGUF", "application/vnd.ollama.image.adapter": b"GGUF"})
    with pytest.raises(LoadError, match="has an adapter layer .* does not apply"):
        gemmarun.load("ollama:tuned")  # not its base model, silently
    with pytest.raises(LoadError, match="not an Ollama model name"):
        gemmarun.load("ollama:" + "a" * 300)  # (a file name that long had been an OSError)
    monkeypatch.setenv("OLLAMA_MODELS", f"'{root}'")  # quoted, as Ollama reads it
    with pytest.raises(LoadError, match="adapter"):
        gemmarun.load("ollama:tuned")
    assert main(["run", "ollama:nothing", "hi"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such model in Ollama's store" in err
    with pytest.raises(SystemExit) as exit:  # a long first word: no model, in one line
        main(["run", "x" * 300, "hi"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such model file or folder" in err
    shutil.rmtree(root)


def test_a_prompt_starting_with_ollama_is_a_prompt(capsys):
    """Only a name Ollama could hold is a model: this one-word prompt runs the embedded model."""
    assert main(["run", "ollama: how do I pull a model?", "--max-tokens", "2", "--raw"]) == 0
    assert capsys.readouterr().out
