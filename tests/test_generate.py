"""The token generator's contract: stop ids, max_tokens, context end."""

import os
import subprocess
import sys

import pytest
import torch

import gemmarun
from gemmarun.generate import ContextOverflow, generate_step
from gemmarun.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_models):
    folder, _ = tiny_models("26b")
    return gemmarun.load(folder, device="cpu").model


def test_max_tokens_and_zero(model):
    assert len(list(generate_step(model, [2, 5, 6], SamplingParams(max_tokens=7)))) == 7
    assert list(generate_step(model, [2, 5, 6], SamplingParams(max_tokens=0))) == []


def test_stop_id_ends_without_being_yielded(model):
    free = list(generate_step(model, [2, 5, 6], SamplingParams(max_tokens=12)))
    stop = free[5]
    cut = list(generate_step(model, [2, 5, 6], SamplingParams(max_tokens=12), stop_ids=frozenset({stop})))
    assert cut == free[: free.index(stop)]


def test_generation_ends_at_the_context_and_never_overflows(model):
    context = 10
    out = list(generate_step(model, [2, 5, 6, 7], SamplingParams(max_tokens=100), context=context))
    assert len(out) == context - 4 + 1  # the last token is sampled from the final position's logits
    with pytest.raises(ContextOverflow):
        list(generate_step(model, list(range(2, 12)), SamplingParams(max_tokens=1), context=context))


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="empty"):
        list(generate_step(model, [], SamplingParams(max_tokens=1)))


def test_chunk_size_does_not_change_tokens(model):
    prompt = torch.randint(12, 250, (23,), generator=torch.Generator().manual_seed(4)).tolist()
    a = list(generate_step(model, prompt, SamplingParams(max_tokens=10), chunk_size=5))
    b = list(generate_step(model, prompt, SamplingParams(max_tokens=10), chunk_size=64))
    assert a == b


_SHAPES_SCRIPT = """
import gemmarun, torch
torch.set_num_threads(1)
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) / 1024
w = torch.randn(256, 256, dtype=torch.bfloat16)
for m in range(1, 301):  # a new shape each call, like decode's attention over a growing cache
    torch.nn.functional.linear(torch.randn(m, 256, dtype=torch.bfloat16), w)
    if m == 60:
        start = anon()
print(anon() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bfloat16_matmuls_of_new_shapes_do_not_grow_memory_without_bound():
    """oneDNN keeps each new shape's primitive (~1 MiB); importing gemmarun bounds its caches
    (unbounded, 240 new shapes grew RSS by ~180 MiB; bounded, it stays flat)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", _SHAPES_SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) < 40, f"RSS grew by {float(out.stdout):.0f} MiB over 240 new bfloat16 shapes"
