"""What every fuzz target shares: the contract check, limits, seeds and the atheris entry point.

The contract: for any input a parser either succeeds or raises one of its documented error
types with a non-empty one-line message. Anything else is a bug: another exception, a hang
(CPU time past the target's limit raises `Hang`) or a huge allocation (the address space is
capped, so an allocation sized from hostile input raises MemoryError at once instead of
paging the machine to death).

A target file defines `test_one_input(data: bytes)` (byte level, atheris mutates the bytes)
or a `Structured` property (a Hypothesis strategy; atheris then drives Hypothesis through
`fuzz_one_input`, and tests/test_fuzz.py runs it derandomized). `main()` runs either under
atheris with libFuzzer flags: `python fuzz/<target>.py -max_total_time=60`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = ROOT / "fuzz"
WORK_DIR = Path(os.environ.get("GEMMARUN_FUZZ_WORK") or FUZZ_DIR / "work")  # corpora, dictionaries
sys.path.insert(0, str(ROOT / "tests"))  # the tiny fixtures (tiny_gguf, tiny_tokenizer) seed the targets
ADDRESS_SPACE_LIMIT = 6 << 30  # bytes; the imports (torch included) take well under 1 GiB


class Hang(BaseException):
    """An input ran past its CPU-time limit. A BaseException, so that a parser's own
    `except Exception` cannot turn a hang into one of its documented errors."""


class ContractViolation(AssertionError):
    """A documented error was raised, but not as the contract promises (one line, not hiding
    a MemoryError)."""


@contextlib.contextmanager
def cpu_limit(seconds: float) -> Iterator[None]:
    """Raise `Hang` once this process has spent `seconds` of CPU time in the block. CPU time,
    not wall time, so a loaded machine does not make slow inputs look like hangs; SIGPROF,
    because libFuzzer's own -timeout uses SIGALRM."""

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"input ran longer than {seconds} s of CPU time")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def cap_address_space(limit: int = ADDRESS_SPACE_LIMIT) -> None:
    """Make an allocation sized from hostile input fail at once with MemoryError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _masked_failure(error: BaseException) -> BaseException | None:
    """A MemoryError hidden in the chain of a documented error: an allocation sized from the
    input, which the address-space cap turned into an exception. FFmpeg's ENOMEM (PyAV's
    av.error.MemoryError) is not one: av_malloc refuses sizes past its own cap (INT_MAX)
    without allocating."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        ffmpeg_refusal = type(e).__module__.startswith("av.")
        if isinstance(e, MemoryError) and e is not error and not ffmpeg_refusal:
            return e
        e = e.__cause__ or e.__context__
    return None


def check_error(error: BaseException) -> None:
    """A documented error must read as one non-empty line and not hide a resource failure."""
    message = str(error)
    if not message.strip() or "\n" in message or "\r" in message:
        raise ContractViolation(f"{type(error).__name__} message is not one line: {message!r}") from error
    masked = _masked_failure(error)
    if masked is not None:
        raise ContractViolation(
            f"{type(error).__name__} hides a {type(masked).__name__}: {message}"
        ) from error


def run_contract(call: Callable[[], Any], allowed: tuple[type[BaseException], ...],
                 seconds: float) -> Any:
    """`call()` under a CPU limit; a documented error is checked and returns None, anything
    else propagates to the fuzzer as a crash."""
    with cpu_limit(seconds):
        try:
            return call()
        except allowed as e:
            check_error(e)
            return None


class MemoryFile:
    """A path whose content is the current input, for readers that take a path (GGUF,
    safetensors): an in-memory file (memfd), so nothing is left on disk, however the fuzzer
    exits."""

    def __init__(self, name: str) -> None:
        self._fd = os.memfd_create(name)
        self.path = Path(f"/proc/self/fd/{self._fd}")

    def write(self, data: bytes) -> Path:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        return self.path


@dataclass
class Structured:
    """A property over a Hypothesis strategy, checked by `check(value)`."""

    strategy: Any
    check: Callable[[Any], None]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def hypothesis_test(self, **overrides: Any) -> Callable[[], None]:
        from hypothesis import HealthCheck, given, settings

        options = {"database": None, "deadline": None, "suppress_health_check": list(HealthCheck),
                   **self.settings, **overrides}
        return settings(**options)(given(self.strategy)(self.check))


@contextlib.contextmanager
def instrumented(include: tuple[str, ...] = ("gemmarun",)) -> Iterator[None]:
    """Coverage-instrument the code under test when a target runs under atheris (its own
    process); a plain import (pytest) skips it."""
    main = sys.modules.get("__main__")
    target_is_main = main is not None and Path(getattr(main, "__file__", "")).parent == FUZZ_DIR
    if target_is_main:
        import atheris

        with atheris.instrument_imports(include=list(include)):
            yield
    else:
        yield


def _dictionary_file(tokens: list[bytes], path: Path) -> Path:
    """A libFuzzer -dict file: tokens the mutator splices in (JSON keys, edge-case numbers)."""
    path.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in t) + '"\n' for t in tokens))
    return path


def main(name: str, test_one_input: Callable[[bytes], None],
         seeds: Callable[[], Mapping[str, bytes]] | None = None, *,
         timeout: int = 30, max_len: int = 4096, rss_limit_mb: int = 3072,
         dictionary: list[bytes] | None = None) -> None:
    """Run a target under atheris, with libFuzzer's flags and arguments.

    Directory arguments are corpora (libFuzzer adds what it finds to the first); without any,
    the corpus is fuzz/work/<name>/corpus (git-ignored; $GEMMARUN_FUZZ_WORK moves it), so runs
    build on each other. The seeds (made in code) are written into the first corpus and
    fuzz/corpus/<name>/ is read too. A file argument (a crash artifact) replays just that
    input. Crashes go to fuzz/crashes/.
    """
    import atheris

    argv = list(sys.argv)
    flags = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    work = WORK_DIR / name
    work.mkdir(parents=True, exist_ok=True)
    defaults = {"-timeout": timeout, "-max_len": max_len, "-rss_limit_mb": rss_limit_mb,
                "-artifact_prefix": f"{FUZZ_DIR / 'crashes' / name}-"}
    if dictionary:
        defaults["-dict"] = _dictionary_file(dictionary, work / "tokens.dict")
    argv += [f"{k}={v}" for k, v in defaults.items() if k not in flags]
    if "-artifact_prefix" not in flags:
        (FUZZ_DIR / "crashes").mkdir(exist_ok=True)
    paths = [Path(a) for a in argv[1:] if not a.startswith("-")]
    if not paths:
        paths = [work / "corpus"]
        paths[0].mkdir(exist_ok=True)
        argv.append(str(paths[0]))
    if paths[0].is_dir():  # fuzzing, not replaying a file
        for seed_name, data in (seeds() if seeds else {}).items():
            (paths[0] / f"seed-{seed_name}").write_bytes(data)
        stored = FUZZ_DIR / "corpus" / name
        if stored.is_dir():
            argv.append(str(stored))
    cap_address_space()
    warnings.simplefilter("ignore")  # decoders warn about every corrupt input: noise, not findings
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def main_structured(name: str, target: Structured, **kwargs: Any) -> None:
    """Run a Hypothesis property under atheris (coverage-guided choice of the examples)."""
    test = target.hypothesis_test()
    main(name, test.hypothesis.fuzz_one_input, **kwargs)
