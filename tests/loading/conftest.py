"""Fixtures of the loader tests."""

import numpy as np
import pytest
import soundfile as sf
from PIL import Image


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """A 150x90 PNG (a.png) and a 1.3 s 440 Hz tone (tone.wav)."""
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(d / "a.png")
    t = np.arange(int(1.3 * 16000)) / 16000
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return d
