"""Each documented limit is enforced with OpenAI's error shape and the right status, before the
costly work: image pixels from the header (decompression bombs), a request's seconds of audio,
max_tokens, requests in flight (bodies past the cap are never read); and the `serve` flags."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import tracemalloc
import zlib

import httpx
import numpy as np
import pytest
import soundfile as sf
from serverkit import SlowEngine, png_bytes, running, status_of_raw_upload, wait_for

from gemmarun.processing.image import MAX_PIXELS
from gemmarun.server import ServerOptions, create_app, uvicorn_settings
from gemmarun.server.inputs import build_prompt, prepare_messages
from gemmarun.server.protocol import ApiError

CHAT = "/v1/chat/completions"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) with next to no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def black_png(width: int, height: int) -> bytes:
    """A complete, valid all-black PNG: a few hundred kB that decode to width x height pixels."""
    z = zlib.compressobj()
    row = b"\0" * (width + 1)  # filter byte + grey pixels
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def image_message(data: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what is it?"}]}]


def audio_message(*clips: bytes, fmt: str = "wav") -> list[dict]:
    parts = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(c).decode(), "format": fmt}}
             for c in clips]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "what is it?"}]}]


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def chat(server, messages: list[dict], **fields) -> httpx.Response:
    body = {"model": "mm", "messages": messages, "max_tokens": 2, "temperature": 0, **fields}
    return httpx.post(server.url + CHAT, json=body, timeout=120)


@pytest.fixture(scope="module")
def defaults(mm_llm):
    """The multimodal model behind `serve`'s default limits."""
    options = ServerOptions(model_name="mm")
    with running(create_app(mm_llm, options), **uvicorn_settings(options)) as r:
        yield r


@pytest.fixture(scope="module")
def strict(mm_llm):
    """Small limits, so real inputs cross them."""
    options = ServerOptions(model_name="mm", max_image_pixels=20_000, max_audio_seconds=2.0, max_tokens_limit=8)
    with running(create_app(mm_llm, options), **uvicorn_settings(options)) as r:
        yield r


def _peak_bytes_during(work) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_decompression_bomb_is_refused_from_its_header(defaults):
    bomb = png_claiming(50_000, 50_000)  # 2.5 gigapixels claimed in under 200 bytes
    assert len(bomb) < 200
    resp, peak = _peak_bytes_during(lambda: chat(defaults, image_message(bomb)))
    err = error_of(resp, 400)
    assert err["code"] == "image_too_large" and err["param"] == "messages[0].content[0].image_url.url"
    assert "50-megapixel limit" in err["message"]
    assert peak < 20 * 2**20  # nothing of the size claimed was ever allocated


def test_a_real_image_over_the_limit_is_refused_before_decoding(defaults):
    big = black_png(9000, 9000)  # 81 megapixels: 243 MB once decoded to RGB
    assert len(big) < 2 * 2**20
    resp, peak = _peak_bytes_during(lambda: chat(defaults, image_message(big)))
    err = error_of(resp, 400)
    assert err["code"] == "image_too_large" and "9000x9000" in err["message"]
    assert peak < 40 * 2**20  # the request's own JSON and base64, never the pixels


def test_image_pixels_limit_is_the_servers(strict):
    assert chat(strict, image_message(png_bytes(150, 90))).status_code == 200  # 13 500 pixels
    err = error_of(chat(strict, image_message(png_bytes(200, 120))), 400)  # 24 000
    assert err["code"] == "image_too_large"  # (it had said "0.0 megapixels, over ... 0.02-megapixel limit")
    assert "200x120 (0.024 megapixels), over this server's 0.02-megapixel limit" in err["message"]


def test_audio_seconds_are_counted_over_the_whole_request(strict):
    assert chat(strict, audio_message(wav(1.3))).status_code == 200
    err = error_of(chat(strict, audio_message(wav(1.3), wav(1.3))), 400)
    assert err["code"] == "audio_too_long" and "2.6 s" in err["message"] and "2 s limit" in err["message"]
    assert err["param"] == "messages[0].content[1].input_audio.data"


def test_long_browser_recordings_stop_decoding_at_the_limit(strict):
    from test_server_media import webm_bytes

    err = error_of(chat(strict, audio_message(webm_bytes(seconds=4.0), fmt="webm")), 400)
    assert err["code"] == "audio_too_long"


def test_transcription_uploads_have_the_same_limit(strict):
    resp = httpx.post(strict.url + "/v1/audio/transcriptions", files={"file": ("long.wav", wav(3.0))},
                      data={"model": "mm"}, timeout=120)
    err = error_of(resp, 400)
    assert err["code"] == "audio_too_long" and err["param"] == "file"


def test_decoded_audio_is_measured_again(mm_llm):
    """A header can under-declare its length (MP3 estimates it): the decoded samples decide."""
    messages = prepare_messages(audio_message(wav(1.3)), allow_local_files=False)  # no header check
    with pytest.raises(ApiError) as e:
        build_prompt(mm_llm, messages, thinking=False, tools=None, image_tokens=None, max_audio_seconds=1.0)
    assert e.value.status == 400 and e.value.code == "audio_too_long" and "1.3 s" in e.value.message


def test_max_tokens_limit(strict):
    err = error_of(chat(strict, [{"role": "user", "content": "hi"}], max_tokens=9), 400)
    assert err["param"] == "max_tokens" and "at most 8" in err["message"]
    resp = httpx.post(strict.url + "/v1/completions", json={"model": "mm", "prompt": "hi", "max_tokens": 50},
                      timeout=60)
    assert error_of(resp, 400)["param"] == "max_tokens"
    body = {"model": "mm", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}
    unset = httpx.post(strict.url + CHAT, json=body, timeout=120).json()  # the default 4096 is capped too
    assert 1 <= unset["usage"]["completion_tokens"] <= 8


def test_max_tokens_past_the_context_and_sampling_values_past_float32(defaults):
    """Without --max-tokens-limit the context (1024 here) is the limit; a temperature too small
    for float32 is greedy (it made a NaN draw that failed the whole batch), penalties that
    overflow the logits are a 400."""
    err = error_of(chat(defaults, [{"role": "user", "content": "hi"}], max_tokens=1025), 400)
    assert err["param"] == "max_tokens" and "at most 1024" in err["message"]
    resp = httpx.post(defaults.url + "/v1/completions", json={"model": "mm", "prompt": "hi " * 1100}, timeout=60)
    assert error_of(resp, 400)["param"] == "prompt"
    greedy = chat(defaults, [{"role": "user", "content": "hi"}], max_tokens=4)
    tiny = chat(defaults, [{"role": "user", "content": "hi"}], max_tokens=4, temperature=1e-38)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
    for field, value in (("presence_penalty", -1e39), ("repetition_penalty", 1e-300)):
        err = error_of(chat(defaults, [{"role": "user", "content": "hi"}], temperature=1.0, **{field: value}), 400)
        assert err["param"] == field


def test_requests_past_capacity_get_429_before_their_body_is_read(tiny_llm):
    options = ServerOptions(max_batch=1, max_queue=0)
    with running(create_app(tiny_llm, options, engine=SlowEngine(tiny_llm, max_batch=1, delay=0.05)),
                 **uvicorn_settings(options)) as r:
        release = threading.Event()
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 240,
                "temperature": 0, "stream": True, "ignore_eos": True}

        def hold():
            with httpx.stream("POST", r.url + CHAT, json=body, timeout=120):
                release.wait(60)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert wait_for(lambda: r.app.state.open_requests.n == 1, 30)
            total = 20 * 2**20  # under the 32 MiB body limit
            status, sent = status_of_raw_upload(r.url, ["Content-Type: application/json", f"Content-Length: {total}"],
                                                (b" " * 65536 for _ in range(total // 65536)))
            assert status == 429 and sent < total // 4
            refused = httpx.post(r.url + CHAT, json={**body, "stream": False}, timeout=30)
            err = error_of(refused, 429)
            assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
            assert refused.headers["retry-after"] == "1"  # when the OpenAI SDK's retry comes
            assert httpx.get(r.url + "/health", timeout=10).json()["open_requests"] == 1  # GETs still answered
        finally:
            release.set()
            holder.join(60)
        assert wait_for(lambda: r.app.state.open_requests.n == 0 and r.scheduler.in_flight == 0, 30)
        started = time.monotonic()
        ok = httpx.post(r.url + CHAT, json={**body, "stream": False, "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and time.monotonic() - started < 60


@pytest.mark.parametrize("field, value", [("max_body_bytes", 0), ("max_batch", 0), ("max_queue", -1),
                                          ("max_image_pixels", MAX_PIXELS + 1), ("max_audio_seconds", 0),
                                          ("body_timeout", 0), ("header_timeout", -1), ("max_connections", 0),
                                          ("max_tokens_limit", 0), ("prompt_caches", -1)])
def test_server_options_refuse_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        ServerOptions(**{field: value})


def test_serve_flags_set_the_limits(monkeypatch, tiny_llm):
    import gemmarun.server
    from gemmarun import cli

    seen = {}
    monkeypatch.delenv("GEMMARUN_API_KEY", raising=False)
    monkeypatch.setattr(cli, "_load", lambda model, args: tiny_llm)
    monkeypatch.setattr(gemmarun.server, "serve", lambda llm, host, port, options, **kw: seen.update(o=options))
    args = cli.build_parser().parse_args([
        "serve", "--max-body-mb", "8", "--max-queue", "5", "--max-tokens-limit", "100", "--max-image-mp", "12.5",
        "--max-audio-seconds", "30", "--body-timeout", "20", "--header-timeout", "7", "--max-connections", "64",
        "--log-prompts", "--loop-guard", "stop"])
    assert args.func(args) == 0
    o = seen["o"]
    assert o.loop_guard == "stop"  # (serve had no --loop-guard, though the README showed it)
    assert (o.max_body_bytes, o.max_queue, o.max_tokens_limit, o.max_image_pixels, o.max_audio_seconds) == (
        8 * 2**20, 5, 100, 12_500_000, 30.0)
    assert (o.body_timeout, o.header_timeout, o.max_connections, o.log_prompts) == (20.0, 7.0, 64, True)
    defaults = cli.build_parser().parse_args(["serve"])
    assert defaults.func(defaults) == 0
    assert seen["o"] == ServerOptions()  # each flag's default is the option's


def test_serve_runs_uvicorn_with_the_limits_and_the_request_log(monkeypatch, tiny_llm):
    from serverkit import capture_serve
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from gemmarun.server import serve

    calls = []
    capture_serve(monkeypatch, calls)
    serve(tiny_llm, "127.0.0.1", 8123, ServerOptions(max_connections=77, header_timeout=9), log_level="warning")
    config = calls[0]
    # serve's protocol applies the connection limit itself (an OpenAI error, not uvicorn's text)
    assert config.limit_concurrency is None and issubclass(config.http, H11Protocol)
    assert (config.http.max_connections, config.http.header_timeout) == (77, 9)
    assert config.log_config["loggers"]["gemmarun"]["level"] == "WARNING"


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(monkeypatch, capsys):
    """(uvicorn had failed after the model loaded: an ERROR log line and exit status 3, the
    "serving on ..." line before it false.)"""
    import socket

    from gemmarun import cli

    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 1
        assert capsys.readouterr().err.strip() == f"gemmarun: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert cli.main(["serve", "--host", "999.1.1.1"]) == 1
    assert "--host 999.1.1.1: not an address to listen on" in capsys.readouterr().err
    # bound as uvicorn binds: IPv4 for a name (localhost had been tried as the resolver's first
    # answer, ::1 on a stock hosts file, while uvicorn binds 127.0.0.1)
    from gemmarun.server import check_listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match="Address already in use"):
            check_listen("localhost", taken.getsockname()[1])


def test_serve_says_when_the_context_asked_for_is_past_the_model(monkeypatch, tiny_llm, capsys):
    from serverkit import capture_serve

    from gemmarun import cli

    calls = []
    capture_serve(monkeypatch, calls)
    monkeypatch.setattr(cli, "_load", lambda *a: tiny_llm)
    positions = tiny_llm.config.max_position_embeddings
    assert cli.main(["serve", "--port", "0", "--context", str(positions * 4)]) == 0
    assert f"--context {positions * 4} is past the model's {positions} positions: serving {positions}" in \
        capsys.readouterr().err and calls
