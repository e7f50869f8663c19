"""Run every fuzz target (or some) for a fixed time each, one after another; exit non-zero if any
found a crash.

    python fuzz/run.py --seconds 60                  # all targets, a minute each
    python fuzz/run.py --seconds 600 --only gguf_reader,chat_template
    python fuzz/run.py --seconds 30 -- -rss_limit_mb=2048   # extra libFuzzer flags

Each target's output goes to fuzz/work/<target>/last.log; a crash leaves its input in
fuzz/crashes/ (replay it with `python fuzz/<target>.py <file>`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
TARGETS = sorted(p.stem for p in FUZZ_DIR.glob("*.py") if not p.name.startswith("_") and p.name != "run.py")


def run_target(name: str, seconds: int, extra: list[str], work: Path) -> tuple[int, str]:
    """(exit status, one-line summary) of fuzzing `name` for `seconds`."""
    log = work / name / "last.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(FUZZ_DIR / f"{name}.py"), f"-max_total_time={seconds}", *extra]
    start = time.monotonic()
    with open(log, "w") as out:
        # the whole run plus imports, seeding and one slow last input; then it is stuck
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 300).returncode
    text = log.read_text(errors="replace")
    runs = re.findall(r"Done (\d+) runs", text)
    crash = re.findall(r"Test unit written to (\S+)", text)
    summary = f"{name:<20} {time.monotonic() - start:6.0f} s  {runs[-1] if runs else '?':>8} runs  "
    summary += f"CRASH {crash[-1]}" if crash else ("ok" if status == 0 else f"exit {status} (see {log})")
    return status, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    parser.add_argument("--only", default="", help="comma-separated target names (default: all)")
    parser.add_argument("extra", nargs="*", help="libFuzzer flags passed to every target (after --)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or TARGETS
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)} (have {', '.join(TARGETS)})")
    sys.path.insert(0, str(FUZZ_DIR))
    from _harness import WORK_DIR

    failed = 0
    for name in names:
        status, summary = run_target(name, args.seconds, args.extra, WORK_DIR)
        print(summary, flush=True)
        failed += status != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
