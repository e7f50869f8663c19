"""Prompt caching in a chat: time to first token of each turn, caching off and on.

A chat whose first message carries a document (~800 tokens on the real 270M) and two follow-up
questions, through `LLM.stream_reply` as `gemmarun chat` runs it. With caching off every turn
prefills the whole conversation; with it on (the default) a turn prefills only what the kept cache
of the previous one does not hold. Rounds alternate off/on; medians are reported, and the replies
must be identical both ways (greedy). `--vision NAME` also times what the kept soft tokens save
a turn that sends an image again: one pass of that released checkpoint's vision tower (random
weights, its real shapes) over a 280-token image. `--write FILE` records the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import gemmarun
from gemmarun.prompt_cache import PromptCache
from gemmarun.sampling import SamplingParams

COLOURS = ("red", "green", "blue", "amber")
QUESTIONS = ("Summarize the list above in one sentence.", "Which box holds the most marbles?", "And the fewest?")


def document(items: int) -> str:
    return " ".join(f"Item {i}: the {COLOURS[i % 4]} box holds {i * 7 % 13} marbles." for i in range(items))


def chat(llm, capacity: int, doc: str, max_tokens: int) -> list[tuple[int, int, float, str]]:
    """Per turn: prompt tokens, positions found cached, seconds to the first token, the reply."""
    llm.prompt_cache = PromptCache(capacity)
    messages, turns = [], []
    for i, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": f"{doc}\n\n{question}" if i == 0 else question})
        prompt = llm.build_prompt(messages)
        began, first, pieces = time.perf_counter(), None, []
        for delta in llm.stream_reply(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)):
            if first is None:
                first = time.perf_counter() - began
            pieces.append(delta.content)
        reply = "".join(pieces)
        messages.append({"role": "assistant", "content": reply})
        turns.append((len(prompt.ids), llm.prompt_cache.reused, first or 0.0, reply))
    return turns


def vision_tower_seconds(name: str, budget: int = 280, passes: int = 2) -> float:
    """Fastest of `passes` encodes of a 640x480 image by `name`'s vision tower, random weights."""
    import numpy as np
    from PIL import Image

    from gemmarun.loading.random_weights import released_config
    from gemmarun.model.vision import VisionTower, vision_config_from_hf
    from gemmarun.processing.image import preprocess_image, stack_inputs

    tower = VisionTower(vision_config_from_hf(released_config(name)[1]["vision_config"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    pixels, positions = stack_inputs([preprocess_image(image, budget)])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(passes):
            began = time.perf_counter()
            tower(pixels, positions)
            best = min(best, time.perf_counter() - began)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded Gemma 3 270M)")
    parser.add_argument("--items", type=int, default=60, help="items in the document of the first message")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vision", metavar="NAME", default=None,
                        help="also time this released checkpoint's vision tower on one image (e2b, e4b, 31b, 26b-a4b)")
    parser.add_argument("--write", metavar="FILE", default=None, help="record the table into this markdown file")
    args = parser.parse_args(argv)
    from gemmarun.bench import check_write_option

    check_write_option(parser, args.write)
    torch.set_num_threads(args.threads)
    llm = gemmarun.load(args.model)
    doc = document(args.items)
    runs: dict[int, list[list[tuple]]] = {0: [], 1: []}
    for _ in range(args.rounds):
        for capacity in (0, 1):
            runs[capacity].append(chat(llm, capacity, doc, args.max_tokens))
    replies = {tuple(t[3] for t in run) for capacity in runs for run in runs[capacity]}
    if len(replies) != 1:
        print("problem: the replies differ with caching on and off", file=sys.stderr)
        return 1
    rows = ["| turn | prompt tokens | cached (on) | time to first token, off | on | speed-up |",
            "|---|---|---|---|---|---|"]
    for turn in range(len(QUESTIONS)):
        off = statistics.median(run[turn][2] for run in runs[0])
        on = statistics.median(run[turn][2] for run in runs[1])
        n, cached = runs[1][0][turn][:2]
        rows.append(f"| {turn + 1} | {n} | {cached} | {off * 1000:.0f} ms | {on * 1000:.0f} ms | {off / on:.1f}x |")
    from gemmarun.bench import publish_script_section

    model = args.model or "embedded gemma-3-270m Q4_K_M"
    lines = [f"- greedy, {args.max_tokens} tokens a reply, median of {args.rounds} alternating rounds; "
             "the replies are identical with caching off and on", "", *rows, ""]
    if args.vision:
        seconds = vision_tower_seconds(args.vision)
        lines.append(f"An image sent again with each turn: its soft tokens are kept by content, so the "
                     f"{args.vision} vision tower does not run again ({seconds:.2f} s a 280-token image here, "
                     f"random weights with its real shapes, float32, {args.threads} threads).\n")
    publish_script_section(__file__, argv, f"prompt caching: {model}, a three-turn chat", args.threads, lines,
                           args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
