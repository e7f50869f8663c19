"""What the server writes to its logs: one line per request with sizes and times, never the API
key, the Authorization header or the prompt's text (unless --log-prompts); and the key check
is a constant-time comparison."""

from __future__ import annotations

import contextlib
import hmac
import logging

import httpx
import pytest
from serverkit import running

from gemmarun.server import ServerOptions, create_app, uvicorn_settings

KEY = "sk-test-7f3a9c1e5b"
WRONG_KEY = "sk-wrong-2b8d4f6a0c"
SECRET_PROMPT = "zebra quantum marmalade"  # tokenizes into pieces; the text itself must not appear
LOGGERS = ("uvicorn.error", "uvicorn.access", "gemmarun", "starlette", "asyncio")  # the server side


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # the message with its arguments and any traceback


@contextlib.contextmanager
def captured_logs():
    """Every record of the server's and uvicorn's loggers at DEBUG, as formatted text."""
    handler = _Collect()
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        for logger, level in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _requests(url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    messages = [{"role": "user", "content": f"Please remember: {SECRET_PROMPT}."}]
    body = {"model": "m", "messages": messages, "max_tokens": 4, "temperature": 0}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60).status_code == 200
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=auth,
                      timeout=60) as resp:
        assert resp.status_code == 200 and list(resp.iter_lines())
    completion = {"model": "m", "prompt": SECRET_PROMPT, "max_tokens": 3}
    assert httpx.post(url + "/v1/completions", json=completion, headers=auth, timeout=60).status_code == 200
    too_long = {**body, "messages": [{"role": "user", "content": f"{SECRET_PROMPT} " * 200}]}  # context 256
    assert httpx.post(url + "/v1/chat/completions", json=too_long, headers=auth, timeout=60).status_code == 400
    bad_part = {**body, "messages": [{"role": "user", "content": [{"type": "video", "text": SECRET_PROMPT}]}]}
    assert httpx.post(url + "/v1/chat/completions", json=bad_part, headers=auth, timeout=60).status_code == 400
    wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=wrong, timeout=60).status_code == 401


@pytest.mark.parametrize("log_prompts", [False, True])
def test_logs_hold_no_key_and_no_prompt_unless_asked(tiny_llm, log_prompts):
    options = ServerOptions(api_key=KEY, log_prompts=log_prompts)
    with running(create_app(tiny_llm, options), **uvicorn_settings(options)) as r, captured_logs() as lines:
        _requests(r.url)
    text = "\n".join(lines)
    assert "POST /v1/chat/completions" in text  # uvicorn's access lines were captured
    per_request = [line for line in lines if "prompt +" in line and "completion tokens" in line]
    assert len(per_request) == 3  # chat, streamed chat, completion; each with its sizes and time
    assert KEY not in text and WRONG_KEY not in text and "Bearer" not in text
    assert (SECRET_PROMPT in text) is log_prompts
    assert ("zebra" in text) is log_prompts


def test_the_key_is_compared_in_constant_time(tiny_llm, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with running(create_app(tiny_llm, ServerOptions(api_key=KEY))) as r:
        assert httpx.get(r.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(r.url + "/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"}).status_code == 401
    assert calls == [(KEY.encode(), KEY.encode()), (WRONG_KEY.encode(), KEY.encode())]
