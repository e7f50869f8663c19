"""`serve`: loopback detection and the warning for an open, keyless bind."""

import pytest
from serverkit import capture_serve

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
    capture_serve(monkeypatch, calls)
    serve(tiny_llm, host, 8123, ServerOptions(api_key=key))
    assert calls[0].host == host and calls[0].port == 8123
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
    configs = []
    capture_serve(monkeypatch, configs)
    folder, _ = tiny_models("e2b")
    base = ["serve", str(folder), "--device", "cpu", "--dtype", "float32", "--model-name", "tiny", "--port", "0"]
    assert main(base) == 0 and main(base + ["--draft", str(tmp_path)]) == 0
    apps = [config.app for config in configs]
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


@pytest.mark.slow
def test_interrupted_server_answers_what_is_in_flight_with_503_and_exits():
    """Ctrl-C (or SIGTERM) with requests in flight: they had run on for uvicorn's graceful
    timeout and were then cancelled, a plain-text 500 each (a stream cut short without an error)
    and a traceback each in the log. The model stops first now: the documented 503, in-band for
    a stream, and the process exits at once; a request still sending its body gets it too (it
    had waited out the 5 s and got a plain-text 500)."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # the embedded 270M: its replies can outlast the signal (a tiny model's whole context takes ms)
    proc = subprocess.Popen([sys.executable, "-m", "gemmarun", "serve", "--port", str(port), "--device", "cpu",
                             "--model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        plain: list = []
        waiter = threading.Thread(target=lambda: plain.append(httpx.post(url + "/v1/completions", timeout=60,
                                                                        json=body)))
        events = []
        upload = socket.create_connection(("127.0.0.1", port), timeout=30)
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        waiter.start()
                        upload.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                       b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
                        time.sleep(0.5)
                        proc.send_signal(signal.SIGINT)
        waiter.join(30)
        answer = b""
        while chunk := upload.recv(65536):
            answer += chunk
        upload.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"shutting down" in payload
        stopped = time.monotonic()
        assert proc.wait(30) in (0, 130)  # 130: Ctrl-C, as a shell reports it
        assert time.monotonic() - stopped < 4  # not uvicorn's 5 s of grace
        assert "shutting down" in json.loads(events[-1])["error"]["message"]
        assert plain[0].status_code == 503 and "shutting down" in plain[0].json()["error"]["message"]
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
