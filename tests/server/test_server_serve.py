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
