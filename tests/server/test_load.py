"""The server under load, in CI size: 12 clients for a few seconds on the tiny model with vision
and audio towers, mixing streamed and whole chat completions, completions, image and audio
requests. Every answer must equal its request's answer alone, nothing may be lost or mixed up,
and memory must not grow after warm-up. The full-size run is scripts/server_load.py."""

from __future__ import annotations

import asyncio
import json

import psutil
from serverkit import running

from gemmarun.server import ServerOptions, create_app, uvicorn_settings

CLIENTS = 12
RSS_BOUND = 64 * 2**20


def test_concurrent_mixed_load_answers_as_alone(mm_llm, load_script):
    load = load_script("server_load")
    options = ServerOptions(model_name="mm", max_batch=8, max_queue=CLIENTS)
    cases = load.make_cases(variants=2, max_tokens=8)
    assert {c.kind for c in cases} == set(load.KINDS) and any(c.stream for c in cases if c.kind == "image")
    process = psutil.Process()
    with running(create_app(mm_llm, options), **uvicorn_settings(options)) as r:
        urls = {"text": r.url, "media": r.url}
        report = asyncio.run(load.measure(urls, clients=CLIENTS, seconds=4.0, warmup=2.0, cases=cases,
                                          rss=lambda: {"server and clients": process.memory_info().rss}))
        engine = r.scheduler.engine
        assert not engine.active and not engine.waiting and r.scheduler.in_flight == 0
    print("\n" + report.table())
    assert report.errors == [] and report.wrong == []
    assert report.checked >= report.requests >= CLIENTS  # every client finished at least one request
    assert all(report.latencies[kind] for kind in load.KINDS)
    assert all(growth < RSS_BOUND for growth in report.rss_growth().values()), report.rss_growth()
    assert 0 < load.percentile(report.latencies["chat"], 50) <= load.percentile(report.latencies["chat"], 99)
    # a mix-up shows only if different prompts get different answers (streamed or not, the same)
    by_prompt: dict[str, set[str]] = {}
    for case in cases:
        prompt = json.dumps({k: v for k, v in case.body.items() if not k.startswith("stream")}, sort_keys=True)
        by_prompt.setdefault(prompt, set()).add(report.expected[case.name].text)
    assert all(len(texts) == 1 for texts in by_prompt.values())
    assert len({next(iter(texts)) for texts in by_prompt.values()}) >= len(by_prompt) - 1


def test_percentile_is_nearest_rank(load_script):
    load = load_script("server_load")
    values = [float(i) for i in range(1, 101)]
    assert (load.percentile(values, 50), load.percentile(values, 99), load.percentile(values, 100)) == (50, 99, 100)
    assert load.percentile([3.0], 99) == 3.0


def test_the_script_builds_its_tiny_multimodal_model(tmp_path, load_script):
    """The full-size run serves image and audio requests from this model when the text model has
    no towers (the embedded 270M): its builder must keep up with the tests' helpers."""
    import gemmarun

    folder = load_script("server_load").build_tiny_multimodal(tmp_path)
    llm = gemmarun.load(folder, device="cpu")
    llm.check_media("image")
    llm.check_media("audio")
