"""Measure the output guards on the real Gemma 3 270M (issue 6): loop-guard false positives over
varied prompts, the guard's and the grammar's cost per token, and llguidance against
outlines-core on CPU. Prints markdown tables; `--record` writes them into docs/benchmarks.md.

    python scripts/output_guards.py [--prompts N] [--max-tokens 256] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import gemmarun
from gemmarun.constrain import Grammar
from gemmarun.loopguard import LoopGuard, LoopGuardConfig
from gemmarun.sampling import SamplingParams

# Varied asks, many of them inviting legitimate repetition (lists, tables, code, verse, data).
PROMPTS = [
    "Write a markdown table of the planets with their number of moons.",
    "List twenty fruits, one per line.",
    "Write a Python function that prints a multiplication table from 1 to 9.",
    "Write a short poem with a refrain that repeats after every stanza.",
    "Give me a CSV file with 15 rows of made-up sales data: date, region, amount.",
    "Explain how a bicycle works, step by step.",
    "Write an HTML page with a navigation bar of five links.",
    "Count from 1 to 40 in words.",
    "Write a JSON array of ten users with id, name and email.",
    "Write the lyrics of a children's counting song.",
    "Write a C program that draws a box of asterisks.",
    "Summarize the plot of Romeo and Juliet.",
    "Write a bash script that loops over files and prints their sizes.",
    "Write an SVG of a house with a door and two windows.",
    "What are the days of the week in French, Spanish and German? Use a table.",
    "Write a SQL schema for a library with books, authors and loans.",
    "Write ten tongue twisters.",
    "Draw an ASCII-art cat, then explain each part.",
    "Write a recipe for pancakes with a list of ingredients and numbered steps.",
    "Describe the water cycle for a ten-year-old.",
    "Write a YAML config for a web server with three virtual hosts.",
    "Write a Rust struct for a 3D vector with add, sub and dot methods.",
    "Repeat the word 'hello' five times, then say goodbye.",
    "Write a limerick about a cat.",
]

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                       "minItems": 1, "maxItems": 3}},
             "required": ["tags"], "additionalProperties": False},
    "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"},
                                               "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
              "required": ["x", "y", "code"], "additionalProperties": False},
}
EXAMPLES = {"person": {"name": "Ada Lovelace", "age": 36}, "tags": {"tags": ["red", "blue"]},
            "point": {"x": 1.5, "y": -20.25, "code": "ABC-12"}}


def false_positives(llm, n_prompts: int, max_tokens: int) -> tuple[list[list[str]], float]:
    """Greedy and sampled answers with the guard in "stop" mode, decoded together by the batch
    engine (the same OutputControl as a single request): every firing is listed."""
    from gemmarun.batching import BatchEngine

    engine = BatchEngine(llm, max_batch=16)
    asks, out, reasons = {}, {}, {}
    for i, ask in enumerate(PROMPTS[:n_prompts]):
        prompt = llm.build_prompt([{"role": "user", "content": ask}])
        for temp in (0.0, 1.0):
            params = SamplingParams(max_tokens=max_tokens, temperature=temp, seed=i)
            rid = engine.add(prompt, params, control=llm.output_control(loop_guard="stop"))
            asks[rid], out[rid] = (ask, temp), []
    while engine.busy:
        for ev in engine.step():
            if ev.token is not None:
                out[ev.request_id].append(ev.token)
            if ev.finish_reason:
                reasons[ev.request_id] = ev.finish_reason
                print(f"{len(reasons)}/{len(asks)} done", file=sys.stderr, flush=True)
    rows, per_token = [], []
    for rid, (ask, temp) in asks.items():
        ids = out[rid]
        pieces = [llm.tokenizer.decode([t]) for t in ids]
        guard = LoopGuard(LoopGuardConfig(policy="stop"))
        t0 = time.perf_counter()
        for t, p in zip(ids, pieces):
            guard.push(t, p)
        per_token.append((time.perf_counter() - t0) / max(1, len(ids)))
        fired = reasons[rid] == "loop"
        rows.append([ask[:48], f"{temp:g}", str(len(ids)), reasons[rid],
                     repr("".join(pieces)[-60:]) if fired else ""])
    return rows, statistics.median(per_token) * 1e6


def llguidance_costs(llm, schema: dict, example: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    state = llm.grammar_state(Grammar.json_schema(schema), SamplingParams())
    compile_s = time.perf_counter() - t0
    ids = llm.tokenizer.encode(json.dumps(example), add_bos=False)
    logits = torch.zeros(llm.config.vocab_size)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        state.mask(logits)
        times.append(time.perf_counter() - t0)
        state.advance(t)
    return compile_s, statistics.median(times) * 1e3


def outlines_costs(llm, schema: dict, example: dict) -> tuple[float, float] | None:
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    tok = llm.tokenizer
    eos = llm.config.eos_ids[0]
    t0 = time.perf_counter()
    vocab: dict[bytes, list[int]] = {}
    for i in range(llm.config.vocab_size):
        if i == eos:
            continue
        raw = tok.piece_bytes(i)
        if raw:
            vocab.setdefault(raw, []).append(i)
    vocabulary = Vocabulary(eos, vocab)
    regex = build_regex_from_schema(json.dumps(schema), r"( )?")
    index = Index(regex, vocabulary)
    compile_s = time.perf_counter() - t0
    guide = Guide(index)
    ids = tok.encode(json.dumps(example), add_bos=False)
    mask = torch.zeros((llm.config.vocab_size + 31) // 32, dtype=torch.int32)
    logits = torch.zeros(llm.config.vocab_size)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        bits = mask.view(torch.uint8).unsqueeze(-1).bitwise_right_shift(torch.arange(8, dtype=torch.uint8)) & 1
        allowed = bits.reshape(-1)[: llm.config.vocab_size].bool()
        logits.masked_fill(~allowed, float("-inf"))
        times.append(time.perf_counter() - t0)
        guide.advance(t)
    return compile_s, statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--record", action="store_true", help="write the tables into docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    llm = gemmarun.load(None)  # the embedded default: the real Gemma 3 270M
    rows, guard_us = false_positives(llm, args.prompts, args.max_tokens)
    fired = sum(r[3] == "loop" for r in rows)
    lines = [f"Loop guard (policy stop, defaults) on the real Gemma 3 270M Q4_K_M: {len(rows)} answers "
             f"({args.prompts} prompts, greedy and temperature 1, up to {args.max_tokens} tokens); "
             f"fired on {fired}. Guard cost: {guard_us:.1f} us per token (median).", "",
             "| prompt | temp | tokens | finish | repeated tail (when fired) |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    lines += ["", "Grammar engines on the same tokenizer (262,144 tokens): compile = first grammar for this "
              "tokenizer + schema; mask = median ms per token (mask computed and applied to the logits).", "",
              "| schema | llguidance compile s | llguidance mask ms | outlines-core compile s | outlines-core mask ms |",
              "|---|---|---|---|---|"]
    for name, schema in SCHEMAS.items():
        ll = llguidance_costs(llm, schema, EXAMPLES[name])
        oc = outlines_costs(llm, schema, EXAMPLES[name])
        oc_cells = ["not installed", ""] if oc is None else [f"{oc[0]:.2f}", f"{oc[1]:.3f}"]
        lines.append(f"| {name} | {ll[0]:.2f} | {ll[1]:.3f} | " + " | ".join(oc_cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.record:
        import datetime
        from pathlib import Path

        from gemmarun.bench import record, script_command
        from gemmarun.machine import describe

        setup = "Output guards: loop guard and grammar engines on the real Gemma 3 270M"
        command = script_command(__file__, None)
        record(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", setup,
               f"### {setup}\n\n{describe(torch.get_num_threads())}, {datetime.date.today()}. "
               f"Command: `{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
