"""The chat page in a real headless browser: Debian's Chromium driven by playwright-core (npm).
Skips when node, chromium or tests/server/web/node_modules are missing; set them up with
    apt-get install -y chromium nodejs npm && npm ci --prefix tests/server/web
The screenshot lands in tests/server/artifacts/web-chat.png."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from serverkit import ScriptedEngine, png_bytes, running, script

from gemmarun.server import ServerOptions, create_app

WEB = Path(__file__).parent / "web"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install -y chromium)"
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (npm ci --prefix tests/server/web)"
    return None


def _drive(url: str, shot: Path, arg: str) -> dict:
    env = {**os.environ, "CHROMIUM": CHROMIUM}
    proc = subprocess.run(["node", str(WEB / "chat_page.mjs"), url + "/", str(shot), arg], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_chat_page_streams_text_image_and_recording(mm_llm, tmp_path):
    image = tmp_path / "picture.png"
    image.write_bytes(png_bytes(120, 80))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-chat.png"
    shot.unlink(missing_ok=True)
    with running(create_app(mm_llm, ServerOptions(model_name="tiny-mm"))) as r:
        result = _drive(r.url, shot, str(image))
        assert not r.scheduler.engine.busy
    assert result["errors"] == [] and result["external"] == []
    assert result["model"] == "tiny-mm"
    replies = result["replies"]
    assert len(replies) == 3 and not any(x["failed"] for x in replies)
    assert all(re.search(r"finish: (length|stop) .* \d+ prompt \+ \d+ completion tokens", x["stats"]) for x in replies)
    assert all(n >= 2 for n in result["updates"][:3])  # each answer arrived in pieces
    first, with_image, recorded = result["requests"]
    assert first["stream"] is True and first["messages"][0]["content"] == "Hello there" and first["thinking"] is False
    assert with_image["messages"][2]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    part = recorded["messages"][4]["content"][0]
    assert recorded["thinking"] is True and part["type"] == "input_audio"
    assert part["input_audio"]["format"] in ("webm", "ogg", "mp4") and "recording" in result["recording"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_chat_page_shows_thinking_apart_from_the_answer(printed_llm):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-thinking.png"
    engine = ScriptedEngine(printed_llm, script, context=4096)
    with running(create_app(printed_llm, ServerOptions(model_name="scripted"), engine=engine)) as r:
        result = _drive(r.url, shot, "--thinking")
    assert result["errors"] == [] and result["thinkingOpen"]
    (reply,) = result["replies"]
    assert reply["reasoning"] == "The user says hello." and reply["content"] == "Hello!"
    assert result["requests"][0]["thinking"] is True
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
