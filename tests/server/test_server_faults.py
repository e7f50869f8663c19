"""Misbehaving clients against a real uvicorn server with `serve`'s settings: streams dropped
midway, bodies that stall or stop, a 100 MB body, hundreds of idle or trickling connections.
Each time the slot or connection must be freed and the other clients served correctly."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import tracemalloc

import httpx
import pytest
from serverkit import running, status_of_raw_upload, wait_for

from gemmarun.batching import BatchEngine
from gemmarun.constrain import GrammarError
from gemmarun.server import ServerOptions, create_app, uvicorn_settings

CHAT = "/v1/chat/completions"


def _body(i: int, max_tokens: int, stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"hello world the {i}"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "ignore_eos": True}


def _serve(llm, options: ServerOptions, engine=None):
    return running(create_app(llm, options, engine=engine), **uvicorn_settings(options))


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_reply(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (or `seconds` pass)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


async def _stream_text(client: httpx.AsyncClient, url: str, body: dict, quit_after: int | None = None) -> str:
    """The streamed content; with `quit_after`, the connection is dropped after that many events."""
    import json

    text, events = "", 0
    async with client.stream("POST", url + CHAT, json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            events += 1
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if quit_after is not None and events >= quit_after:
                return text  # leaving the block closes the connection mid-stream
    return text


def test_clients_leaving_mid_stream_free_their_slots_and_the_others_finish(tiny_llm):
    with _serve(tiny_llm, ServerOptions(max_batch=4)) as r:
        stayers = [_body(i, 8, True) for i in range(2)]

        async def main():
            async with httpx.AsyncClient(timeout=300) as client:
                alone = [await _stream_text(client, r.url, b) for b in stayers]
                quitters = [_stream_text(client, r.url, _body(10 + i, 120, True), quit_after=1) for i in range(2)]
                together = await asyncio.gather(*(_stream_text(client, r.url, b) for b in stayers), *quitters)
                return alone, together[:2]

        alone, together = asyncio.run(main())
        assert together == alone and all(alone)
        engine = r.scheduler.engine
        assert wait_for(lambda: not engine.active and not engine.waiting and r.scheduler.in_flight == 0, 30)
        assert r.scheduler.cancelled == 2  # each 120-token request stopped when its client left
        assert wait_for(lambda: r.app.state.open_requests.n == 0, 5)  # its finally runs after the reply is out


class _OneFails(BatchEngine):
    """A request whose prompt holds `marker` fails at its fourth token, as a grammar that cannot go
    on does (GrammarError): the engine ends it alone."""

    marker: int

    def _sample(self, r, logits, chosen=None):
        if self.marker in r.prompt.ids and len(r.control.generated) == 3:
            raise GrammarError("the grammar allows no token here (no text can satisfy it)")
        return super()._sample(r, logits, chosen)


def test_a_request_that_fails_gets_its_error_alone(tiny_llm):
    engine = _OneFails(tiny_llm, max_batch=4)
    engine.marker = tiny_llm.tokenizer.encode("9", add_bos=False)[-1]  # in request 99's prompt only
    with _serve(tiny_llm, ServerOptions(max_batch=4), engine=engine) as r:
        alone = [httpx.post(r.url + CHAT, json=_body(i, 12, False), timeout=120).json() for i in range(2)]

        async def main():
            async with httpx.AsyncClient(timeout=300) as client:
                replies = [client.post(r.url + CHAT, json=_body(i, 12, False)) for i in range(2)]
                return await asyncio.gather(client.post(r.url + CHAT, json=_body(99, 12, False)), *replies)

        failed, *others = asyncio.run(main())
        assert failed.status_code == 400 and "no text can satisfy it" in failed.json()["error"]["message"]
        assert [o.json()["choices"][0]["message"] for o in others] == [a["choices"][0]["message"] for a in alone]


def test_a_body_that_stalls_is_timed_out_and_others_are_served(tiny_llm):
    with _serve(tiny_llm, ServerOptions(body_timeout=1.0)) as r:
        stalled = _connect(r.url)
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n" + b'{"messages": [' + b" " * 400)
        started = time.monotonic()
        ok = httpx.post(r.url + CHAT, json=_body(0, 3, False), timeout=30)  # served while the other stalls
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        reply = _read_reply(stalled, 10)  # the server answers, then closes the connection
        waited = time.monotonic() - started
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert b'"code":"request_timeout"' in body and 0.9 < waited < 8
        stalled.close()
        assert wait_for(lambda: r.app.state.open_requests.n == 0)

        # the same for an audio upload (multipart: its parser's errors had swallowed the timeout)
        upload = _connect(r.url)
        upload.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n"
                       b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF')
        head, _, body = _read_reply(upload, 10).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
        upload.close()
        assert wait_for(lambda: r.app.state.open_requests.n == 0)

        # half a body, then the client hangs up: nothing waits for the rest
        quitter = _connect(r.url)
        quitter.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mess")
        time.sleep(0.2)
        quitter.close()
        assert wait_for(lambda: r.app.state.open_requests.n == 0, 5)
        assert httpx.post(r.url + CHAT, json=_body(1, 2, False), timeout=30).status_code == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_100_mb_body_is_refused_without_being_buffered(tiny_llm, framing):
    limit = 4 * 1024 * 1024
    total = 100 * 1024 * 1024
    piece = b"x" * 65536
    with _serve(tiny_llm, ServerOptions(max_body_bytes=limit)) as r:
        if framing == "chunked":
            headers = ["Content-Type: application/json", "Transfer-Encoding: chunked"]
            frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            chunks = (frame for _ in range(total // len(piece)))
        else:
            headers = ["Content-Type: application/json", f"Content-Length: {total}"]
            chunks = (piece for _ in range(total // len(piece)))
        tracemalloc.start()
        try:
            status, sent = status_of_raw_upload(r.url, headers, chunks)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert status == 413 and sent < total // 4
        assert peak < 3 * limit  # at most the limit's worth was read, never the 100 MB
        ok = httpx.post(r.url + CHAT, json=_body(0, 2, False), timeout=30)
        assert ok.status_code == 200
        assert wait_for(lambda: r.app.state.open_requests.n == 0, 5)  # its finally runs after the reply is out


def test_hundreds_of_idle_connections_neither_block_others_nor_stay_open(tiny_llm):
    with _serve(tiny_llm, ServerOptions(header_timeout=3.0)) as r:
        idle = [_connect(r.url) for _ in range(200)]
        trickling = [_connect(r.url) for _ in range(20)]
        for sock in trickling:  # a request head that never ends (slowloris)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

        def served(i: int, out: list) -> None:
            out.append(httpx.post(r.url + CHAT, json=_body(i, 3, False), timeout=30).status_code)

        codes: list[int] = []
        threads = [threading.Thread(target=served, args=(i, codes)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [200] * 4
        for sock in trickling:
            sock.sendall(b"X-Slow: 1\r\n")  # still sending, never finishing the head
        assert wait_for(lambda: all(_closed_by_server(s) for s in idle + trickling), 15)
        for sock in idle + trickling:
            sock.close()
        assert httpx.get(r.url + "/health", timeout=10).status_code == 200


def test_a_limit_of_one_connection_serves_one(tiny_llm):
    """(The request's own connection had been counted against it: a lone request got 503.)"""
    with _serve(tiny_llm, ServerOptions(max_connections=1)) as r:
        assert httpx.get(r.url + "/health", timeout=10).status_code == 200


def test_connections_past_the_limit_get_503_until_idle_ones_time_out(tiny_llm):
    with _serve(tiny_llm, ServerOptions(max_connections=30, header_timeout=1.0)) as r:
        idle = [_connect(r.url) for _ in range(30)]
        time.sleep(0.2)
        refused = httpx.get(r.url + "/health", timeout=10)
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        error = refused.json()["error"]  # OpenAI's shape, as every other limit answers
        assert error["code"] == "too_many_connections" and error["type"] == "server_error"
        assert "--max-connections" in error["message"] and "30" in error["message"]
        assert wait_for(lambda: all(_closed_by_server(s) for s in idle), 10)
        assert httpx.get(r.url + "/health", timeout=10).status_code == 200
        for sock in idle:
            sock.close()


def test_a_template_that_does_not_compile_is_a_server_error(tiny_models):
    """A probe found every chat request answered 400 invalid_request_error for the model's own
    broken template, which blamed the client; a template raising on the messages stays a 400."""
    import gemmarun

    llm = gemmarun.load(tiny_models("gemma3")[0], device="cpu")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for template, status, kind in (("{% for m in messages %}{{ m.content }", 500, "server_error"),
                                   ("{{ raise_exception('no system role') }}", 400, "invalid_request_error")):
        llm.info.chat_template = template
        with _serve(llm, ServerOptions(model_name="m")) as srv:
            r = httpx.post(srv.url + CHAT, json=body, timeout=30)
        assert r.status_code == status and r.json()["error"]["type"] == kind, r.text
