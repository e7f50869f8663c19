"""Web pages the user opens must not drive the local server: a browser lets any page POST to
127.0.0.1 (a text/plain body needs no CORS preflight) and a DNS-rebound name makes a page
same-origin. Clients that are no browser send no Origin and are never affected."""

from __future__ import annotations

import httpx
import pytest
from serverkit import running

from gemmarun.server import ServerOptions, create_app

CHAT = "/v1/chat/completions"
BODY = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'


def _post(url: str, **headers: str) -> httpx.Response:
    # text/plain: what a cross-origin page can send without a preflight
    return httpx.post(url + CHAT, content=BODY, headers={"content-type": "text/plain", **headers}, timeout=60)


def test_a_page_of_another_origin_is_refused(tiny_llm):
    with running(create_app(tiny_llm, ServerOptions())) as r:
        refused = _post(r.url, origin="http://evil.example")
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "origin_not_allowed" and "--allow-origin http://evil.example" in error["message"]
        assert "access-control-allow-origin" not in refused.headers
        assert _post(r.url, origin="null").status_code == 403  # a sandboxed frame or a file:// page
        # the server's own chat page (same origin), and clients that send no Origin, are served
        port = r.url.rsplit(":", 1)[1]
        assert _post(r.url, origin=r.url).status_code == 200
        assert _post(r.url, origin=f"http://localhost:{port}", host=f"localhost:{port}").status_code == 200
        assert _post(r.url).status_code == 200


def test_a_rebound_name_on_the_loopback_address_is_refused(tiny_llm):
    """evil.example re-pointed at 127.0.0.1: the page's requests are same-origin for the browser."""
    with running(create_app(tiny_llm, ServerOptions())) as r:
        port = r.url.rsplit(":", 1)[1]
        page = f"http://evil.example:{port}"
        refused = _post(r.url, origin=page, host=f"evil.example:{port}")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "host_not_allowed"


def test_allowed_origins_get_cors_headers_and_preflight_answers(tiny_llm):
    options = ServerOptions(allow_origins=("http://app.example:3000",))
    with running(create_app(tiny_llm, options)) as r:
        ok = httpx.post(r.url + CHAT, content=BODY, timeout=60,
                        headers={"content-type": "application/json", "origin": "http://app.example:3000"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
        assert ok.headers["access-control-allow-origin"] == "http://app.example:3000" and ok.headers["vary"] == "Origin"
        preflight = httpx.options(r.url + CHAT, timeout=10, headers={
            "origin": "http://app.example:3000", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://app.example:3000"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
        assert _post(r.url, origin="http://app.example:3001").status_code == 403  # another port: another origin
    with running(create_app(tiny_llm, ServerOptions(allow_origins=("*",)))) as r:
        anyone = _post(r.url, origin="http://elsewhere.example")
        assert anyone.status_code == 200 and anyone.headers["access-control-allow-origin"] == "http://elsewhere.example"


@pytest.mark.parametrize("origin", ["localhost:3000", "http://a.example/path", "http://a.example:99999", ""])
def test_malformed_allowed_origins_are_refused_at_start(origin):
    with pytest.raises(ValueError, match="allowed origin"):
        ServerOptions(allow_origins=(origin,))


def test_serve_takes_allow_origin(monkeypatch, tiny_llm):
    from gemmarun import cli

    seen = {}
    monkeypatch.setattr(cli, "_load", lambda model, args: tiny_llm)
    monkeypatch.setattr(cli, "_draft", lambda llm, args: None)
    import gemmarun.server as server

    monkeypatch.setattr(server, "serve", lambda llm, host, port, options, **kw: seen.setdefault("options", options))
    assert cli.main(["serve", "m.gguf", "--port", "0", "--allow-origin", "http://a.example:3000",
                     "--allow-origin", "*"]) == 0
    assert seen["options"].allow_origins == ("http://a.example:3000", "*")


def test_this_machine_under_any_of_its_names_and_listed_proxies_are_same_origin(tiny_llm):
    """(From a review: `serve --host 0.0.0.0` prints http://0.0.0.0:PORT/, whose chat page got
    403 host_not_allowed; so did "localhost." and a proxy on this machine that keeps the public
    Host, which --allow-origin could not let through.)"""
    from gemmarun.server.app import _loopback_address

    with running(create_app(tiny_llm, ServerOptions(allow_origins=("https://chat.example", "http://app.example:80")))) as r:
        port = r.url.rsplit(":", 1)[1]
        for name in ("0.0.0.0", "localhost.", "[::]"):
            assert _post(r.url, origin=f"http://{name}:{port}", host=f"{name}:{port}").status_code == 200, name
        assert _post(r.url, origin="https://chat.example", host="chat.example").status_code == 200  # the proxy
        assert _post(r.url, origin="https://other.example", host="other.example").status_code == 403
        listed = _post(r.url, origin="http://app.example")  # the default port, as browsers send it
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "http://app.example"
    # on a "::" socket IPv4 clients arrive as ::ffff:127.0.0.1, a loopback address too
    assert _loopback_address("::ffff:127.0.0.1") and _loopback_address("::1") and not _loopback_address("10.0.0.2")
