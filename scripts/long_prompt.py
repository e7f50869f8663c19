"""A long prompt joining a batch while another reply streams: what the streaming reply waits.

The continuous-batching engine the server runs (`BatchEngine`) reads a text prompt in at most
`prefill_per_step` positions a step, so a reply already decoding gets its next token between
them. This runs a short request until it decodes, adds a long one (random ids, greedy), and
reports the longest wait between the short request's tokens while the long prompt is read in,
and the long prompt's time to first token, with the engine's step budget and with the whole
prompt in one step (as before the budget). Rounds alternate; medians are reported, and the long
request's tokens must be the same both ways. `--write FILE` records the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import gemmarun
from gemmarun.batching import PREFILL_PER_STEP, BatchEngine
from gemmarun.llm import Prompt
from gemmarun.sampling import SamplingParams

AT_ONCE = 1 << 30  # a step budget no prompt reaches: the whole prompt in the step that admits it


def run(llm, long_ids: list[int], prefill_per_step: int) -> tuple[float, float, int, list[int]]:
    """(longest wait between the short request's tokens while the long prompt is read in, the
    long prompt's time to first token, the short request's tokens meanwhile, the long request's
    tokens)."""
    engine = BatchEngine(llm, max_batch=2, prefill_per_step=prefill_per_step, prompt_caches=0)
    short = engine.add(Prompt([2, 651, 1000, 2000]), SamplingParams(max_tokens=10_000, ignore_eos=True))
    for _ in range(3):  # the short request decodes
        engine.step()
    long = engine.add(Prompt(long_ids), SamplingParams(max_tokens=8, ignore_eos=True))
    began = last = time.perf_counter()
    waits, first, tokens, streamed = [], None, [], 0
    while long in (r.id for r in engine.waiting + engine.active):
        events = engine.step()
        now = time.perf_counter()
        if first is None:
            got = any(e.request_id == short and e.token is not None for e in events)
            streamed += got
            if got or any(e.request_id == long and e.token is not None for e in events):
                waits.append(now - last)  # (the last wait ends with the long prompt's first token)
                last = now
        tokens += [e.token for e in events if e.request_id == long and e.token is not None]
        if first is None and tokens:
            first = now - began
    engine.cancel(short)
    return max(waits), first or 0.0, streamed, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded Gemma 3 270M)")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", metavar="FILE", default=None, help="record the table into this markdown file")
    args = parser.parse_args(argv)
    from gemmarun.bench import check_write_option

    check_write_option(parser, args.write)
    torch.set_num_threads(args.threads)
    llm = gemmarun.load(args.model)
    generator = torch.Generator().manual_seed(0)
    top = min(llm.config.vocab_size, 200_000)  # below Gemma's reserved tail
    long_ids = [2] + torch.randint(10, top, (args.prompt_tokens - 1,), generator=generator).tolist()
    budgets = {"the whole prompt in one step": AT_ONCE, f"{PREFILL_PER_STEP} positions a step": PREFILL_PER_STEP}
    runs: dict[str, list[tuple]] = {name: [] for name in budgets}
    for _ in range(args.rounds):
        for name, budget in budgets.items():
            runs[name].append(run(llm, long_ids, budget))
    if len({tuple(r[3]) for rs in runs.values() for r in rs}) != 1:
        print("problem: the long request's tokens differ between the step budgets", file=sys.stderr)
        return 1
    rows = ["| prefill | longest wait between the streaming reply's tokens | its tokens meanwhile "
            "| the long prompt's time to first token |", "|---|---|---|---|"]
    for name, rs in runs.items():
        wait = statistics.median(r[0] for r in rs)
        first = statistics.median(r[1] for r in rs)
        rows.append(f"| {name} | {wait:.2f} s | {statistics.median(r[2] for r in rs):.0f} | {first:.2f} s |")
    from gemmarun.bench import publish_script_section

    model = args.model or "embedded gemma-3-270m Q4_K_M"
    setup = f"a long prompt joining the batch: {model}, {args.prompt_tokens} tokens"
    lines = [f"- BatchEngine, 2 requests: one decoding, then one with {args.prompt_tokens} random prompt ids; "
             f"median of {args.rounds} alternating rounds; the long request's greedy tokens are the same both ways",
             "", *rows, ""]
    publish_script_section(__file__, argv, setup, args.threads, lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
