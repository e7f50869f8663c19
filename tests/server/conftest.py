"""Fixtures for the server tests (helpers live in serverkit.py)."""

from __future__ import annotations

import logging
import shutil

import pytest
from serverkit import running, write_printed_tokenizer

import gemmarun
from gemmarun.server import ServerOptions, create_app

SERVER_LOGGERS = ("gemmarun", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _server_loggers_as_they_were():
    """Every uvicorn.Config (serve's included) points these loggers at the sys.stderr of its
    moment: in a test with capsys, a stream closed when the test ends, where a later test's
    server thread then wrote ("--- Logging error --- I/O operation on closed file" in full runs)."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in SERVER_LOGGERS}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.fixture(scope="session")
def tiny_llm(tiny_models):
    folder, _ = tiny_models("e2b")
    return gemmarun.load(folder, device="cpu")


@pytest.fixture(scope="session")
def mm_llm(tmp_path_factory):
    """A tiny Gemma 4 E2B-like model with vision and audio towers (context 1024)."""
    from reference_models import build_multimodal

    folder = tmp_path_factory.mktemp("server-mm")
    build_multimodal("e2b", folder)
    return gemmarun.load(folder, device="cpu")


@pytest.fixture(scope="session")
def server(tiny_llm):
    """One shared server on the tiny text model (batch 16)."""
    with running(create_app(tiny_llm, ServerOptions(model_name="tiny", max_batch=16))) as r:
        yield r


@pytest.fixture(scope="session")
def printed_llm(tiny_models, tmp_path_factory):
    """The tiny E2B model with a tokenizer whose markers are printed tokens."""
    src, _ = tiny_models("e2b")
    folder = tmp_path_factory.mktemp("printed")
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    write_printed_tokenizer(folder)
    return gemmarun.load(folder, device="cpu")
