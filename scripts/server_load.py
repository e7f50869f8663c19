"""Load test of `gemmarun serve`: N concurrent clients mix streamed and whole chat completions,
completions, image and audio requests for a bounded time, over loopback.

Every answer must equal the same request's answer when it was sent alone (greedy; those are
computed first, one request at a time), every request must be answered (ids unique, one id per
stream, `[DONE]` last), and the server's resident memory must not grow past a small bound after a
warm-up round. Prints p50/p99 latency per kind and the throughput; `--write` records the table as
a section of docs/benchmarks.md (replacing an older run of the same setup).

    python scripts/server_load.py --clients 64 --seconds 60 [--model PATH] [--write docs/benchmarks.md]

Text requests go to MODEL (default: the embedded Gemma 3 270M). Image and audio requests go to
the same server when the model has vision and audio towers; otherwise to a tiny random Gemma 4
with both towers (built as the tests build theirs), served beside it. The output says which.
Each server runs as its own `gemmarun serve` process, so its RSS is its own.

tests/server/test_load.py runs `measure` in-process for a few seconds on the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
KINDS = ("chat", "chat-stream", "completion", "completion-stream", "image", "audio")
TOPICS = ("lighthouses", "bread", "glaciers", "chess", "owls", "rivers", "clocks", "bees")


@dataclass(frozen=True)
class Case:
    """One request of the mix; `target` names the server that answers it ("text" or "media")."""

    name: str
    kind: str
    target: str
    path: str
    body: dict

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    completion_tokens: int


class WrongAnswer(Exception):
    """The reply is malformed: a missing [DONE], mixed ids, an in-band error."""


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float, hz: float) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_cases(variants: int = 4, max_tokens: int = 16) -> list[Case]:
    """`variants` different requests of each kind (small PNGs and WAVs for the media kinds)."""
    common = {"model": "m", "max_tokens": max_tokens, "temperature": 0}
    usage = {"stream_options": {"include_usage": True}}
    cases = []
    for i in range(variants):
        topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" {i}")
        chat = {**common, "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}]}
        completion = {**common, "prompt": f"The long history of {topic} begins"}
        png = base64.b64encode(_png(48 + 16 * i, 40 + 8 * i, seed=i)).decode()
        image = {**common, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            {"type": "text", "text": f"Describe the picture ({topic})."}]}]}
        wav = base64.b64encode(_wav(0.5 + 0.25 * i, 220.0 * (i + 1))).decode()
        audio = {**common, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
            {"type": "text", "text": "What do you hear?"}]}]}
        streamed = {"stream": True, **usage} if i % 2 else {}
        cases += [
            Case(f"chat {i}", "chat", "text", "/v1/chat/completions", chat),
            Case(f"chat-stream {i}", "chat-stream", "text", "/v1/chat/completions", {**chat, "stream": True, **usage}),
            Case(f"completion {i}", "completion", "text", "/v1/completions", completion),
            Case(f"completion-stream {i}", "completion-stream", "text", "/v1/completions",
                 {**completion, "stream": True, **usage}),
            Case(f"image {i}", "image", "media", "/v1/chat/completions", {**image, **streamed}),
            Case(f"audio {i}", "audio", "media", "/v1/chat/completions", {**audio, **streamed}),
        ]
    return cases


def _choice_text(choice: dict, chat: bool, streamed: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta" if streamed else "message") or {}
    return part.get("content") or ""


async def ask(client, url: str, case: Case, ids: set[str]) -> Answer:
    """Send one case; the answer, checked for shape. Each reply's id is added to `ids` (a reused
    id means two requests were mixed up)."""
    chat = case.path.endswith("/chat/completions")
    if not case.stream:
        resp = await client.post(url + case.path, json=case.body)
        if resp.status_code != 200:
            raise WrongAnswer(f"HTTP {resp.status_code}: {resp.text[:200]}")
        data = resp.json()
        _new_id(ids, data["id"])
        choice = data["choices"][0]
        return Answer(_choice_text(choice, chat, False), choice["finish_reason"], data["usage"]["completion_tokens"])
    text, finish, tokens, reply_ids, done = [], None, None, set(), False
    async with client.stream("POST", url + case.path, json=case.body) as resp:
        if resp.status_code != 200:
            raise WrongAnswer(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if done:
                raise WrongAnswer("data after [DONE]")
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise WrongAnswer(f"in-band error: {chunk['error'].get('message')}")
            reply_ids.add(chunk["id"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text.append(_choice_text(choice, chat, True))
                finish = choice.get("finish_reason") or finish
    if not done or len(reply_ids) != 1 or tokens is None:
        raise WrongAnswer(f"stream ended badly: [DONE] {done}, ids {len(reply_ids)}, usage {tokens is not None}")
    _new_id(ids, reply_ids.pop())
    return Answer("".join(text), finish, tokens)


def _new_id(ids: set[str], rid: str) -> None:
    if rid in ids:
        raise WrongAnswer(f"id {rid} was already used by another reply")
    ids.add(rid)


@dataclass
class LoadReport:
    clients: int
    seconds: float  # the measured round's wall time
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    completion_tokens: int = 0
    checked: int = 0  # answers compared with their answer alone (warm-up round included)
    wrong: list[str] = field(default_factory=list)  # answers unlike the request's answer alone
    errors: list[str] = field(default_factory=list)  # requests that failed outright
    rss_before: dict[str, int] = field(default_factory=dict)  # after warm-up
    rss_after: dict[str, int] = field(default_factory=dict)
    expected: dict[str, Answer] = field(default_factory=dict)  # each case's answer alone

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def rss_growth(self) -> dict[str, int]:
        return {k: self.rss_after[k] - self.rss_before[k] for k in self.rss_after if k in self.rss_before}

    def table(self) -> str:
        rows = ["| kind | requests | p50 latency | p99 latency |", "|---|---|---|---|"]
        everything = [x for v in self.latencies.values() for x in v]
        for kind, values in [*self.latencies.items(), ("all", everything)]:
            if values:
                rows.append(f"| {kind} | {len(values)} | {percentile(values, 50):.2f} s | "
                            f"{percentile(values, 99):.2f} s |")
        memory = "; ".join(f"{name} {self.rss_before[name] / MIB:.0f} -> {self.rss_after[name] / MIB:.0f} MiB "
                           f"({growth / MIB:+.0f})" for name, growth in self.rss_growth().items())
        rate = (f"- {self.clients} clients for {self.seconds:.1f} s: {self.requests / self.seconds:.2f} requests/s, "
                f"{self.completion_tokens / self.seconds:.1f} completion tokens/s")
        same = (f"- answers identical to the same request sent alone: {self.checked - len(self.wrong)}/{self.checked} "
                f"(warm-up included); failed requests: {len(self.errors)}")
        return "\n".join([*rows, "", rate, same, f"- server RSS after warm-up -> after the run: {memory or 'not sampled'}"])


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


async def answers_alone(client, urls: dict[str, str], cases: list[Case]) -> dict[str, Answer]:
    """Each case's answer with nothing else running."""
    ids: set[str] = set()
    return {case.name: await ask(client, urls[case.target], case, ids) for case in cases}


async def _round(client, urls: dict[str, str], cases: list[Case], expected: dict[str, Answer], clients: int,
                 seconds: float, report: LoadReport, timed: bool) -> float:
    """`clients` loops, each sending the cases in turn (from its own offset) until `seconds`
    pass; the round's wall time. Problems go to `report`, and latencies too when `timed`."""
    ids: set[str] = set()
    deadline = time.monotonic() + seconds

    async def one_client(offset: int) -> None:
        k = offset
        while time.monotonic() < deadline:
            case = cases[k % len(cases)]
            k += 1
            started = time.monotonic()
            try:
                answer = await ask(client, urls[case.target], case, ids)
            except Exception as e:  # noqa: BLE001 - every failure is a finding, reported below
                report.errors.append(f"{case.name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
                continue
            if timed:
                report.latencies[case.kind].append(time.monotonic() - started)
                report.completion_tokens += answer.completion_tokens
            report.checked += 1
            if answer != expected[case.name]:
                report.wrong.append(f"{case.name}: got {answer}, alone {expected[case.name]}")

    started = time.monotonic()
    await asyncio.gather(*(one_client(i * 7) for i in range(clients)))
    return time.monotonic() - started


async def measure(urls: dict[str, str], *, clients: int, seconds: float, cases: list[Case],
                  warmup: float = 3.0, rss: Callable[[], dict[str, int]] | None = None) -> LoadReport:
    """The answers alone, a warm-up round, RSS, the measured round, RSS again."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        expected = await answers_alone(client, urls, cases)
        report = LoadReport(clients, 0.0, expected=expected)
        await _round(client, urls, cases, expected, clients, warmup, report, timed=False)
        report.rss_before = rss() if rss else {}
        report.seconds = await _round(client, urls, cases, expected, clients, seconds, report, timed=True)
        report.rss_after = rss() if rss else {}
    return report


# ------------------------------------------------------------------------------ the script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gemmarun serve` in a child process, on a free loopback port."""

    def __init__(self, model: str | None, max_batch: int, max_queue: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "gemmarun", "serve", *([model] if model else []), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning"]
        self.process = subprocess.Popen(command)

    def wait_ready(self, seconds: float = 900) -> dict:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}")
            try:
                return httpx.get(self.url + "/health", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {seconds:.0f} s")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def build_tiny_multimodal(folder: Path) -> Path:
    """A tiny random Gemma 4 E2B-like model with vision and audio towers, as the tests build it."""
    sys.path[:0] = [str(ROOT / "tests")]
    from reference_models import build_multimodal

    build_multimodal("e2b", folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the measured round")
    parser.add_argument("--warmup", type=float, default=5.0, help="length of the warm-up round before RSS is read")
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded Gemma 3 270M)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--variants", type=int, default=4, help="different requests of each kind")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rss-bound-mib", type=float, default=64.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--write", metavar="FILE", default=None, help="record the table into this markdown file")
    args = parser.parse_args(argv)
    from gemmarun.bench import check_write_option

    check_write_option(parser, args.write)

    servers: list[ServerProcess] = []
    try:
        text = ServerProcess(args.model, args.max_batch, args.clients + 16)
        servers.append(text)
        health = text.wait_ready()
        model = args.model or "embedded gemma-3-270m Q4_K_M"
        if {"image", "audio"} <= set(health.get("modalities", [])):
            media, media_model = text, model
        else:
            folder = build_tiny_multimodal(Path(tempfile.mkdtemp(prefix="gemmarun-load-mm-")))
            media = ServerProcess(str(folder), args.max_batch, args.clients + 16)
            servers.append(media)
            media.wait_ready()
            media_model = "tiny random Gemma 4 E2B-like with vision and audio towers (the model has none)"
        print(f"text requests: {model}\nimage and audio requests: {media_model}", file=sys.stderr)

        def rss() -> dict[str, int]:
            return {("server" if len(servers) == 1 else f"{name} server"): s.rss()
                    for name, s in zip(("text", "media"), servers)}

        cases = make_cases(args.variants, args.max_tokens)
        report = asyncio.run(measure({"text": text.url, "media": media.url}, clients=args.clients,
                                     seconds=args.seconds, cases=cases, warmup=args.warmup, rss=rss))
    finally:
        for s in servers:
            s.stop()

    from gemmarun.bench import publish_script_section
    from gemmarun.machine import usable_cpus

    setup = f"server load: {model}, {args.clients} clients, {args.seconds:g} s"
    lines = [f"- text requests: {model}; image and audio requests: {media_model}",
             f"- greedy, max_tokens {args.max_tokens}, {args.variants} requests of each kind, --max-batch {args.max_batch}",
             "", report.table(), ""]
    publish_script_section(__file__, argv, setup, usable_cpus(), lines, args.write)
    for line in (report.errors + report.wrong)[:20]:
        print("problem:", line, file=sys.stderr)
    grown = {k: v for k, v in report.rss_growth().items() if v > args.rss_bound_mib * MIB}
    if grown:
        print(f"problem: RSS grew past {args.rss_bound_mib:g} MiB after warm-up: {grown}", file=sys.stderr)
    return 1 if report.errors or report.wrong or grown or not report.requests else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
