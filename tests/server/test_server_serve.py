"""`serve`: loopback detection and the warning for an open, keyless bind."""

import pytest
import uvicorn

from gemmarun.server import ServerOptions, is_loopback, serve


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("no-such-host.invalid", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host, key, warned", [("127.0.0.1", None, False), ("0.0.0.0", None, True),
                                               ("0.0.0.0", "k", False)])
def test_open_bind_without_key_warns(tiny_llm, monkeypatch, capsys, host, key, warned):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    serve(tiny_llm, host, 8123, ServerOptions(api_key=key))
    assert calls[0]["host"] == host and calls[0]["port"] == 8123
    err = capsys.readouterr().err
    assert ("warning" in err and "--api-key" in err) is warned
    assert "http://" in err


def test_serve_with_a_draft_folder_speculates_and_answers_as_without(tiny_models, monkeypatch, tmp_path, capsys):
    """`gemmarun serve --draft`: the engine gets the drafter; a lone greedy request comes back as
    it does without one, through speculative rounds; a missing folder is a one-line error."""
    from serverkit import running
    from test_speculative import _hf_drafter

    from gemmarun.cli import main

    _hf_drafter(monkeypatch, ordered=True).save_pretrained(tmp_path)
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    folder, _ = tiny_models("e2b")
    base = ["serve", str(folder), "--device", "cpu", "--dtype", "float32", "--model-name", "tiny"]
    assert main(base) == 0 and main(base + ["--draft", str(tmp_path)]) == 0
    plain_app, draft_app = apps
    assert plain_app.state.scheduler.engine.drafter is None
    engine = draft_app.state.scheduler.engine
    assert engine.drafter is not None
    rounds = []
    real = engine._speculate
    monkeypatch.setattr(engine, "_speculate", lambda r, depth: rounds.append(depth) or real(r, depth))
    kw = {"model": "tiny", "prompt": "hello world", "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    texts = []
    for app in apps:
        with running(app) as r:
            texts.append(r.client().completions.create(**kw).choices[0].text)
    assert texts[1] == texts[0] and rounds
    capsys.readouterr()
    assert main(base + ["--draft", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmarun: error:") and "missing" in err and len(err.splitlines()) == 1
