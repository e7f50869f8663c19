"""Image and audio through the server on a tiny multimodal (vision + audio) Gemma 4 model:
content parts, the per-request image budget, browser recordings (WebM/Opus), transcription."""

import base64
import io
import subprocess
import sys

import numpy as np
import openai
import pytest
import soundfile as sf
from serverkit import b64, capture_serve, png_bytes, running
from test_audio import container_bytes

from gemmarun.cli import TRANSCRIBE_PROMPT, main
from gemmarun.sampling import SamplingParams
from gemmarun.server import ServerOptions, create_app


def wav_bytes(seconds=1.3) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def webm_bytes(seconds=1.0, rate=48000) -> bytes:
    """What Chromium's MediaRecorder produces: Opus in WebM."""
    return container_bytes("webm", "libopus", rate, seconds)


def test_webm_with_a_codec_ffmpeg_does_not_know_is_an_audio_input_error():
    # found by fuzz/audio_decode.py: PyAV gives such a stream no codec context (and no .rate)
    from gemmarun.processing.audio import AudioInputError, container_to_wav

    data = webm_bytes(0.1).replace(b"A_OPUS", b"A_OPUX")
    with pytest.raises(AudioInputError, match="codec is not supported"):
        container_to_wav(io.BytesIO(data), "<input_audio>")


@pytest.mark.parametrize("channels", [1, 2, 10])
def test_container_audio_of_any_channel_count_is_the_channel_mean(channels):
    """Found by fuzz/audio_decode.py: a 10-channel WAV sent as MP4 crashed the process (PyAV's
    planar to_ndarray reads past a frame of more than 8 channels); decoded packed now."""
    from gemmarun.processing.audio import container_to_wav

    rng = np.random.default_rng(channels)
    wave = (rng.standard_normal((1600, channels)) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    out, rate = sf.read(io.BytesIO(container_to_wav(io.BytesIO(buf.getvalue()), "<input_audio>")), dtype="float32")
    assert rate == 16000 and out.ndim == 1
    np.testing.assert_allclose(out, wave.mean(axis=1), atol=1e-6)


# The fuzzer's input: mode byte, then an 8-bit 10-channel WAV declared as MP4
TEN_CHANNEL_CRASH = base64.b64decode("LVJJRkbkAwAAV0FWRWZtdCAQAAAAAQAKAEAfAABAHwAAAQAIAGRhdGHAAwAAgIWKj5SZnaCipIpgY6pnaw==")


def test_the_ten_channel_crash_input_decodes_in_a_fresh_process():
    """Reading past the frame crashed only sometimes: twenty decodes in a child process."""
    code = ("import sys; from gemmarun.server.inputs import audio_bytes\n"
            "data = sys.stdin.buffer.read()\n"
            "for _ in range(20): audio_bytes(data, 'mp4', 'input_audio')\n")
    proc = subprocess.run([sys.executable, "-c", code], input=TEN_CHANNEL_CRASH[1:], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(data)}}


def audio_part(data: bytes, fmt="wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


@pytest.fixture(scope="module")
def mm_server(mm_llm, tmp_path_factory):
    opts = ServerOptions(model_name="mm", allow_local_files=True, default_max_tokens=6)
    with running(create_app(mm_llm, opts)) as r:
        yield r


def test_image_and_audio_parts_equal_the_single_request_runtime(mm_server, mm_llm):
    messages = [{"role": "user", "content": [image_part(png_bytes()), audio_part(wav_bytes()),
                                             {"type": "text", "text": "What is this?"}]}]
    r = mm_server.client().chat.completions.create(model="mm", messages=messages, max_tokens=6, temperature=0,
                                                   extra_body={"ignore_eos": True})
    prompt = mm_llm.build_prompt(messages)  # the runtime reads the same OpenAI parts
    expected = "".join(mm_llm.stream_prompt(prompt, SamplingParams(max_tokens=6, ignore_eos=True))).strip()
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(prompt.ids) > 70 + 33  # image and audio soft tokens counted


def test_image_token_budget_is_per_request(mm_server):
    client = mm_server.client()
    messages = [{"role": "user", "content": [image_part(png_bytes(400, 300)), {"type": "text", "text": "hi"}]}]
    used = {}
    for budget in (70, 280):
        r = client.chat.completions.create(model="mm", messages=messages, max_tokens=1,
                                           extra_body={"image_tokens": budget})
        used[budget] = r.usage.prompt_tokens
    assert used[280] > used[70] + 100


def test_browser_recording_webm_is_decoded(mm_server):
    r = mm_server.client().chat.completions.create(
        model="mm", messages=[{"role": "user", "content": [audio_part(webm_bytes(), "webm")]}], max_tokens=2)
    assert r.usage.prompt_tokens > 25  # one second of audio is 25 soft tokens


def test_undecodable_media_is_400_naming_the_problem(mm_server):
    client = mm_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mm", messages=[{"role": "user", "content": [
            image_part(b"this is not an image")]}])
    assert "not an image" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mm", messages=[{"role": "user", "content": [
            audio_part(b"RIFF....WAVEjunk" * 4)]}])
    assert "cannot decode" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mm", messages=[{"role": "user", "content": [
            audio_part(b"\x1a\x45\xdf\xa3 not really webm" * 4, "webm")]}])
    assert "cannot decode audio" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mm", messages=[{"role": "user", "content": [
            audio_part(wav_bytes(), "aiff")]}])
    assert e.value.param.endswith("input_audio.format")


def test_local_files_when_allowed(mm_server, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    for url in (f"file://{path}", str(path)):
        r = mm_server.client().chat.completions.create(model="mm", max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
        assert r.usage.prompt_tokens > 70


def test_transcription_upload(mm_server, mm_llm):
    client = mm_server.client()
    wav = wav_bytes()
    got = client.audio.transcriptions.create(model="mm", file=("speech.wav", wav), response_format="json")
    messages = [{"role": "user", "content": [{"type": "audio", "audio": wav},
                                             {"type": "text", "text": TRANSCRIBE_PROMPT}]}]
    expected = "".join(mm_llm.stream_prompt(mm_llm.build_prompt(messages),
                                            SamplingParams(max_tokens=6, temperature=0.0))).strip()
    assert got.text == expected
    text = client.audio.transcriptions.create(model="mm", file=("speech.wav", wav), response_format="text")
    assert text == expected
    webm = client.audio.transcriptions.create(model="mm", file=("rec.webm", webm_bytes()))
    assert isinstance(webm.text, str)
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="mm", file=("x.wav", b"garbage" * 10))
    assert "not audio" in str(e.value) and e.value.param == "file"  # the upload, not "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="mm", file=("speech.wav", wav), response_format="srt")
    assert e.value.param == "response_format"


def test_transcription_needs_an_audio_model(tiny_llm):
    with running(create_app(tiny_llm)) as r:
        with pytest.raises(openai.BadRequestError) as e:
            r.client().audio.transcriptions.create(model="m", file=("speech.wav", wav_bytes()))
        assert "text only" in str(e.value)


def test_health_lists_the_media_a_model_can_project():
    """Both kinds of encoders (Gemma 4's towers, gemma4_unified's projections) have embed_vision
    and embed_audio, None where the checkpoint has none; the unified ones have no `*_tower`,
    which had counted as present."""
    from types import SimpleNamespace

    from gemmarun.server.inputs import modalities

    def model(vision, audio):
        return SimpleNamespace(encoders=SimpleNamespace(embed_vision=vision, embed_audio=audio))

    assert modalities(SimpleNamespace(encoders=None)) == ["text"]
    assert modalities(model(object(), None)) == ["text", "image"]
    assert modalities(model(None, object())) == ["text", "audio"]
    assert modalities(model(object(), object())) == ["text", "image", "audio"]


def test_serve_with_mmproj_answers_image_and_audio_parts_as_the_folder(llama_cpp_multimodal, monkeypatch):
    """`gemmarun serve TEXT.gguf --mmproj MMPROJ.gguf`: OpenAI image_url and input_audio parts get
    the answer the HF folder's server gives."""
    folder, _, text, mmproj = llama_cpp_multimodal("e2b")
    configs = []
    capture_serve(monkeypatch, configs)
    for model in ([str(folder)], [str(text), "--mmproj", str(mmproj)]):
        assert main(["serve", *model, "--device", "cpu", "--dtype", "float32", "--model-name", "m", "--port", "0"]) == 0
    content = [image_part(png_bytes()), audio_part(wav_bytes()), {"type": "text", "text": "What is this?"}]
    answers = []
    for config in configs:
        with running(config.app) as r:
            reply = r.client().chat.completions.create(
                model="m", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True, "image_tokens": 70})  # the folder's budget; an mmproj's is 280
            answers.append((reply.choices[0].message.content, reply.usage.prompt_tokens))
    assert answers[1] == answers[0] and answers[0][1] > 60  # the soft tokens are in the prompt


def test_gemma3_image_parts_equal_the_single_request_runtime(tmp_path):
    """A Gemma 3 folder with its SigLIP tower answers image_url parts as the runtime does (its
    soft tokens in the prompt count); a budget other than its fixed 256 (here 16) is a 400 naming it."""
    import gemmarun
    from reference_models import GEMMA3_SOFT, build_gemma3_vision

    build_gemma3_vision(tmp_path)
    llm = gemmarun.load(tmp_path, device="cpu", dtype="float32")
    messages = [{"role": "user", "content": [image_part(png_bytes(50, 40)), {"type": "text", "text": "What is this?"}]}]
    with running(create_app(llm, ServerOptions(model_name="g3"))) as r:
        client = r.client()
        reply = client.chat.completions.create(model="g3", messages=messages, max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="g3", messages=messages, max_tokens=1, extra_body={"image_tokens": 70})
    prompt = llm.build_prompt(messages)
    expected = "".join(llm.stream_prompt(prompt, SamplingParams(max_tokens=6, ignore_eos=True))).strip()
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(prompt.ids) > GEMMA3_SOFT
    assert "Gemma 3 gives every image 16 soft tokens" in str(e.value)
