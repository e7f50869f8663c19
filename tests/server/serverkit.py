"""Helpers for the server tests: a real uvicorn server on a free loopback port, a tokenizer whose
markers are printed tokens (as in real Gemma 4 vocabularies), a scripted engine for replies a
random tiny model never writes (thinking, tool calls), and small media files."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tiny_tokenizer import SPECIALS, tiny_vocab

from gemmarun.batching import BatchEngine, Event

# Printed (USER_DEFINED) in real Gemma 4 vocabularies: channel and tool markers.
PRINTED = ["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
           '<|"|>', "<|tool>", "<tool|>"]


@dataclass
class Running:
    url: str
    app: object

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def client(self, api_key: str = "none", **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def async_client(self, api_key: str = "none"):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=300)


@contextlib.contextmanager
def running(app, **settings):
    """uvicorn in a thread on a free 127.0.0.1 port; stopped (and the model thread with it) on exit.
    `settings`: more uvicorn.Config keywords (`gemmarun.server.uvicorn_settings` gives serve's)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **{**settings, "timeout_graceful_shutdown": 2}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def write_printed_tokenizer(folder: Path) -> None:
    """The tiny tokenizer with the channel and tool markers as printed (non-special) tokens, as in
    real Gemma 4 vocabularies; the tool markers get ids past the tiny model's vocabulary, so only a
    scripted engine may see them."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=tiny_vocab(), merges=[("h", "e"), ("l", "l"), ("ll", "o")], unk_token="<unk>",
                        byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS if s not in PRINTED])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in PRINTED])
    tok.save(str(folder / "tokenizer.json"))


class ScriptedEngine:
    """BatchEngine's interface; each request's reply is `script(prompt text)`, one token a step."""

    def __init__(self, llm, script, max_batch: int = 4, context: int = 256):
        self.llm, self.script, self.max_batch, self.context = llm, script, max_batch, context
        self.waiting, self.active, self.prompts = [], [], []
        self._next = 0

    def add(self, prompt, params, top_logprobs=None, control=None):
        text = self.llm.tokenizer.decode(prompt.ids)
        self.prompts.append(text)
        self._next += 1
        ids = self.llm.tokenizer.encode(self.script(text), add_bos=False)
        self.waiting.append(SimpleNamespace(id=self._next, ids=ids, pos=0, params=params, top=top_logprobs))
        return self._next

    def cancel(self, rid):
        for pool in (self.waiting, self.active):
            for r in pool:
                if r.id == rid:
                    pool.remove(r)
                    return True
        return False

    @property
    def busy(self):
        return bool(self.waiting or self.active)

    def step(self):
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.pop(0))
        events = []
        for r in list(self.active):
            if r.pos >= len(r.ids):
                self.active.remove(r)
                events.append(Event(r.id, None, "stop"))
                continue
            token = r.ids[r.pos]
            r.pos += 1
            done = r.pos >= r.params.max_tokens
            if done:
                self.active.remove(r)
            top = tuple((token, -0.5) for _ in range(r.top or 0))
            events.append(Event(r.id, token, "length" if done else None, -0.5 if r.top is not None else None, top))
        return events


def png_bytes(w: int = 150, h: int = 90, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'


def script(prompt: str) -> str:
    """The scripted model: a tool call when offered the weather tool, an answer once it has the
    result, thoughts when thinking is on, and otherwise text strewn with special tokens."""
    if "<|tool_response>response:get_weather" in prompt:
        return "It is sunny in Paris.<turn|>"
    if "<|tool>declaration:get_weather" in prompt:
        return f"Let me check.{CALL}<|tool_response>"
    if "<|think|>" in prompt:
        return "<|channel>thought\nThe user says hello.\n<channel|>Hello! <turn|>"
    return "Plain <bos>answer<|image|>.<|channel>"


class SlowEngine(BatchEngine):
    """At least `delay` s a step, so a long request is surely still running when the test acts."""

    def __init__(self, llm, max_batch, delay=0.02):
        super().__init__(llm, max_batch=max_batch)
        self.delay = delay

    def step(self):
        time.sleep(self.delay)
        return super().step()


def wait_for(cond, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def status_of_raw_upload(url, headers: list[str], chunks, limit_seconds=30) -> tuple[int, int]:
    """Sends a request by hand and stops writing once the server answers: (status, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=limit_seconds)
    sock.sendall(("\r\n".join(["POST /v1/chat/completions HTTP/1.1", f"Host: {host}", *headers]) + "\r\n\r\n")
                 .encode())
    sent, answer = 0, b""
    sock.setblocking(False)
    deadline = time.monotonic() + limit_seconds
    try:
        for chunk in chunks:
            try:
                answer += sock.recv(65536)
                break
            except BlockingIOError:
                pass
            view = memoryview(chunk)
            while view and time.monotonic() < deadline:
                try:
                    n = sock.send(view)
                    view, sent = view[n:], sent + n
                except BlockingIOError:
                    time.sleep(0.01)
                    try:
                        answer += sock.recv(65536)
                        break
                    except BlockingIOError:
                        pass
            if answer:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.setblocking(True)
    try:
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    return int(answer.split(b" ", 2)[1]), sent


def capture_serve(monkeypatch, into: list) -> None:
    """`serve` hands its uvicorn.Config to `into` instead of running a server."""
    import gemmarun.server

    class Captured:
        def __init__(self, config):
            self.config = config

        def run(self):
            into.append(self.config)

    monkeypatch.setattr(gemmarun.server, "_server_that_stops_the_model_first", lambda base, app: Captured)
