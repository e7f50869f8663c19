"""The token generator's contract: stop ids, max_tokens, context end."""

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
    # prompt + reply fill the context, no more (one more had been sampled from the last position's
    # logits: 11 tokens in a context of 10, where the server, capping max_tokens, stopped at 10)
    assert len(out) == context - 4
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


_DECODE_SCRIPT = """
import sys, torch, gemmarun
from gemmarun.cache import make_cache
from gemmarun.generate import decode_step, prefill
torch.set_num_threads(1)
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) / 1024
model = gemmarun.load(sys.argv[1], dtype="bfloat16", device="cpu").model
cache = make_cache(model.config, 260, dtype=model.dtype)
token = int(torch.argmax(prefill(model, torch.arange(2, 12), cache)))
for position in range(10, 250):
    token = int(torch.argmax(decode_step(model, token, position, cache)))
    if position == 40:
        start = anon()
print(anon() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bfloat16_decode_memory_stays_flat(tiny_models):
    """Each token's attention has a new cache length; as bfloat16 torch matmuls, each new shape
    left a ~1 MiB oneDNN primitive behind (+2 MiB a token on E2B). 210 tokens must not grow."""
    folder, _ = tiny_models("e2b")
    out = subprocess.run([sys.executable, "-c", _DECODE_SCRIPT, str(folder)], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout) < 20, f"RSS grew by {float(out.stdout):.0f} MiB over 210 bfloat16 decode steps"
