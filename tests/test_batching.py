"""Continuous batching gives each request exactly what it gets alone."""

import pytest

import gemmarun
from gemmarun.batching import BatchEngine
from gemmarun.llm import Prompt
from gemmarun.sampling import SamplingParams


@pytest.mark.parametrize("family", ["e2b", "31b", "26b"])
def test_batched_greedy_equals_alone(tiny_models, family):
    folder, _ = tiny_models(family)
    llm = gemmarun.load(folder, device="cpu")
    prompts = [[2] + [(7 * i + 3 * j) % 200 + 20 for j in range(5 + 3 * i)] for i in range(6)]
    params = [SamplingParams(max_tokens=10 + 2 * i, ignore_eos=True) for i in range(6)]
    alone = [llm.generate_ids(p, max_new_tokens=sp.max_tokens, ignore_eos=True) for p, sp in zip(prompts, params)]

    engine = BatchEngine(llm, max_batch=4)
    ids = {}
    for p, sp in zip(prompts[:3], params[:3]):
        ids[engine.add(Prompt(p), sp)] = len(ids)
    out = {i: [] for i in range(6)}
    finished = set()
    steps = 0
    while engine.busy:
        if steps == 2:  # requests join while others are mid-generation
            for p, sp in zip(prompts[3:], params[3:]):
                ids[engine.add(Prompt(p), sp)] = len(ids)
        for ev in engine.step():
            if ev.token is not None:
                out[ids[ev.request_id]].append(ev.token)
            if ev.finish_reason:
                finished.add(ids[ev.request_id])
        steps += 1
        assert len(engine.active) <= 4
    assert finished == set(range(6))
    assert [out[i] for i in range(6)] == alone


def test_cancel_frees_the_slot_and_logprobs(tiny_models):
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    engine = BatchEngine(llm, max_batch=1)
    a = engine.add(Prompt([2, 30, 31]), SamplingParams(max_tokens=50, ignore_eos=True), top_logprobs=3)
    b = engine.add(Prompt([2, 40, 41]), SamplingParams(max_tokens=3, ignore_eos=True))
    ev = engine.step()
    assert [e.request_id for e in ev] == [a] and len(ev[0].top_logprobs) == 3
    assert ev[0].logprob == pytest.approx(ev[0].top_logprobs[0][1]) or ev[0].logprob <= ev[0].top_logprobs[0][1]
    assert engine.cancel(a) and not engine.active
    got = []
    while engine.busy:
        got += [e.token for e in engine.step() if e.request_id == b and e.token is not None]
    assert got == llm.generate_ids([2, 40, 41], max_new_tokens=3, ignore_eos=True)
