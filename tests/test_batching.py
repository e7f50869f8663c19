"""Continuous batching gives each request exactly what it gets alone."""

import pytest
import torch
from reference_models import LOOPING_SEED, seeded_prompt
from test_speculative import N_NEW, N_PROMPT, OracleDrafter, _prompt, random_drafter

import gemmarun
from gemmarun.batching import BatchEngine
from gemmarun.constrain import GrammarError
from gemmarun.control import OutputControl
from gemmarun.llm import Prompt
from gemmarun.sampling import SamplingParams
from gemmarun.speculative import SpeculationConfig


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
    expected = torch.log_softmax(torch.from_numpy(llm.logits([2, 30, 31])[-1]), -1)  # greedy: the top token
    best = torch.topk(expected, 3)
    assert ev[0].token == int(best.indices[0]) and ev[0].logprob == pytest.approx(float(best.values[0]), abs=1e-4)
    assert [i for i, _ in ev[0].top_logprobs] == best.indices.tolist()
    assert [lp for _, lp in ev[0].top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert engine.cancel(a) and not engine.active
    got = []
    while engine.busy:
        got += [e.token for e in engine.step() if e.request_id == b and e.token is not None]
    assert got == llm.generate_ids([2, 40, 41], max_new_tokens=3, ignore_eos=True)


def _run(engine, requests):
    """Add (prompt, params, control) requests together; each one's tokens and finish reason."""
    ids = {engine.add(Prompt(p), sp, control=c): k for k, (p, sp, c) in enumerate(requests)}
    out, reasons = {k: [] for k in ids.values()}, {}
    while engine.busy:
        for ev in engine.step():
            if ev.token is not None:
                out[ids[ev.request_id]].append(ev.token)
            if ev.finish_reason:
                reasons[ids[ev.request_id]] = ev.finish_reason
    return [out[k] for k in range(len(requests))], [reasons[k] for k in range(len(requests))]


def test_loop_guard_and_grammar_in_the_batch_equal_one_request_alone(tiny_models):
    """The tiny Gemma 3 model loops greedily from the LOOPING_SEED prompt (tests/reference_models.py):
    in a batch beside a grammar-constrained and a plain request, the guard stops or recovers it
    exactly as the single-request engine does."""
    import json

    import torch

    from gemmarun.constrain import Grammar
    from gemmarun.generate import generate_step

    folder, _ = tiny_models("gemma3")
    llm = gemmarun.load(folder, device="cpu")
    looping = seeded_prompt(LOOPING_SEED)
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=3)

    def control(policy, grammar=None, p=params):
        return llm.output_control(llm.grammar_state(grammar, p) if grammar else None, policy)

    def alone(policy, grammar=None, p=params, prompt=looping):
        steps = generate_step(llm.model, prompt, p, stop_ids=llm.stop_ids(p), control=control(policy, grammar, p))
        tokens = []
        while True:
            try:
                tokens.append(next(steps))
            except StopIteration as done:
                return tokens, done.value

    expected = [alone("stop"), alone("recover"), alone("off", Grammar.json_schema(schema), sampled, [2, 30, 31])]
    assert expected[0][1] == "loop" and expected[1][1] == "length"
    got_ids, got_reasons = _run(BatchEngine(llm, max_batch=3), [
        (looping, params, control("stop")),
        (looping, params, control("recover")),
        ([2, 30, 31], sampled, control("off", Grammar.json_schema(schema), sampled)),
    ])
    assert got_ids == [ids for ids, _ in expected] and got_reasons == [reason for _, reason in expected]
    answer = json.loads(llm.tokenizer.decode(got_ids[2]))
    assert set(answer) == {"n"} and 0 <= answer["n"] <= 99


# -- speculative decoding in the engine (a request decoding alone) ---------------------------------


def _request(engine, request_id):
    return next(r for r in engine.active if r.id == request_id)


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_speculation_alone_and_batching_together_give_the_plain_greedy_tokens(tiny_models, family):
    """Request A speculates while alone (partial acceptance: rollbacks mid-round), decodes in the
    batch while B is there, then speculates again: both get exactly their plain greedy tokens."""
    llm = gemmarun.load(tiny_models(family)[0], dtype="float32", device="cpu")
    prompts = [_prompt(N_PROMPT, seed=5), _prompt(N_PROMPT, seed=6)]
    params = [SamplingParams(max_tokens=N_NEW, ignore_eos=True), SamplingParams(max_tokens=6, ignore_eos=True)]
    plain = [llm.generate_ids(p, max_new_tokens=sp.max_tokens, ignore_eos=True) for p, sp in zip(prompts, params)]
    oracle = OracleDrafter(random_drafter(family, seed=1), N_PROMPT, plain[0], wrong_every=3)
    config = SpeculationConfig(num_draft=3, check_every=None, compare_speed=False, probe_steps=0)
    engine = BatchEngine(llm, max_batch=2, drafter=oracle, speculation=config)
    a = engine.add(Prompt(prompts[0]), params[0])
    out = {a: []}
    spec = None
    steps = 0
    while engine.busy:
        if steps == 4:  # B joins mid-generation: A's next tokens come from batched steps
            b = engine.add(Prompt(prompts[1]), params[1])
            out[b] = []
        for ev in engine.step():
            if ev.token is not None:
                out[ev.request_id].append(ev.token)
        if spec is None:
            spec = _request(engine, a).speculation
        steps += 1
    assert [out[a], out[b]] == plain
    assert spec.stats.rounds > 0 and 0 < spec.stats.accepted < spec.stats.drafted
    assert steps < N_NEW  # rounds produced several tokens a step


def test_speculation_in_the_engine_falls_back_per_request(tiny_models):
    llm = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    prompt = _prompt(N_PROMPT, seed=11)
    plain = llm.generate_ids(prompt, max_new_tokens=N_NEW, ignore_eos=True)
    never = next(t for t in range(256) if t not in plain)
    oracle = OracleDrafter(random_drafter("e2b"), N_PROMPT, [never] * N_NEW, None)
    config = SpeculationConfig(num_draft=3, check_every=2, compare_speed=False, probe_steps=1)
    engine = BatchEngine(llm, max_batch=2, drafter=oracle, speculation=config)
    a = engine.add(Prompt(prompt), SamplingParams(max_tokens=N_NEW, ignore_eos=True), top_logprobs=2)
    events = engine.step()
    spec = _request(engine, a).speculation
    while engine.busy:
        events += engine.step()
    tokens = [ev for ev in events if ev.token is not None]
    assert [ev.token for ev in tokens] == plain
    assert all(ev.logprob is not None and len(ev.top_logprobs) == 2 for ev in tokens)
    assert spec.stats.rounds == 2 and spec.stats.accepted == 0 and not spec.on
    assert spec.stats.fell_back_at == 1 + 1 + 2  # the prefill's token, one probe step, two rejected rounds


def test_a_drafter_with_nan_logits_does_not_end_the_engines_requests(tiny_models):
    """The server's rounds stop drafting at a drafter's NaN logits, as the single-request path does."""
    llm = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    prompt = _prompt(N_PROMPT, seed=12)
    plain = llm.generate_ids(prompt, max_new_tokens=8, ignore_eos=True)
    broken = random_drafter("e2b")
    with torch.no_grad():
        broken.norm.weight.fill_(float("nan"))
    config = SpeculationConfig(num_draft=3, check_every=None, compare_speed=False, probe_steps=0)
    engine = BatchEngine(llm, max_batch=2, drafter=broken, speculation=config)
    a = engine.add(Prompt(prompt), SamplingParams(max_tokens=8, ignore_eos=True))
    events = engine.step()
    spec = _request(engine, a).speculation
    while engine.busy:
        events += engine.step()
    assert [ev.token for ev in events if ev.token is not None] == plain
    assert spec.stats.rounds > 0 and spec.stats.drafted == 0


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_engine_rounds_are_those_of_the_single_request_path(tiny_models, monkeypatch, sampled):
    """Alone, a request's rounds draft from the same hidden states and K/V, verify and settle as
    `speculative_generate_step`'s: the same drafts every round, and the same tokens even when
    sampling (the same draws from the request's seeded generator)."""
    import gemmarun.batching as batching
    import gemmarun.speculative as speculative
    from gemmarun.speculative import speculative_generate_step

    llm = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    prompt = _prompt(N_PROMPT, seed=9)
    params = SamplingParams(max_tokens=N_NEW, ignore_eos=True, **({"temperature": 1.0, "seed": 4} if sampled else {}))
    drafter = random_drafter("e2b", seed=2)
    config = SpeculationConfig(num_draft=3, check_every=None, compare_speed=False, probe_steps=0)
    drafted = []

    def recording(*args, **kwargs):
        drafts, proposals = real(*args, **kwargs)
        drafted[-1].append(tuple(drafts))
        return drafts, proposals

    real = speculative.draft_tokens
    monkeypatch.setattr(speculative, "draft_tokens", recording)
    monkeypatch.setattr(batching, "draft_tokens", recording)
    drafted.append([])
    alone = list(speculative_generate_step(llm.model, drafter, prompt, params, speculation=config))
    drafted.append([])
    engine = BatchEngine(llm, drafter=drafter, speculation=config)
    engine.add(Prompt(prompt), params)
    got = []
    while engine.busy:
        got += [ev.token for ev in engine.step() if ev.token is not None]
    assert got == alone
    assert len(drafted[0]) > 3 and drafted[1] == drafted[0]


def test_a_seeded_sampled_request_comes_out_the_same_whatever_the_timings(tiny_models, monkeypatch):
    """As in `speculative_generate_step`: with the default, timed speculation, a seeded sampled
    request gives the same tokens under a clock that makes rounds look as cheap as plain steps
    and one that makes them ever slower."""
    import itertools

    import gemmarun.batching as batching

    from gemmarun.generate import generate_step

    llm = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    prompt = _prompt(N_PROMPT, seed=4)
    params = SamplingParams(max_tokens=N_NEW, temperature=1.0, top_k=2, seed=3, ignore_eos=True)
    sampled = list(generate_step(llm.model, prompt, params))  # drafts that are sometimes accepted
    outs = []
    for clock in ((i * 1e-3 for i in itertools.count()), (i * i * 1e-3 for i in itertools.count())):
        monkeypatch.setattr(batching.time, "perf_counter", lambda clock=clock: next(clock))
        drafter = OracleDrafter(random_drafter("e2b", seed=5), N_PROMPT, sampled, None)
        engine = BatchEngine(llm, drafter=drafter, speculation=SpeculationConfig(num_draft=2, check_every=2),
                             prompt_caches=0)
        engine.add(Prompt(prompt), params)
        tokens = []
        while engine.busy:
            tokens += [ev.token for ev in engine.step() if ev.token is not None]
        outs.append(tokens)
    assert outs[0] == outs[1]


class _FailingControl(OutputControl):
    """An output control whose mask raises at its `after`-th token, as a grammar that cannot go on does."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def mask(self, logits):
        if len(self.generated) == self.after:
            raise GrammarError("the grammar allows no token here (no text can satisfy it)")
        return super().mask(logits)


@pytest.mark.parametrize("after", [0, 3])  # at admission (prefill's token), and mid-batch
def test_a_request_that_fails_ends_alone_and_the_others_go_on(tiny_models, after):
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    engine = BatchEngine(llm, max_batch=4)
    prompts = [[2, 30, 31, 32], [2, 40, 41], [2, 50, 51, 52, 53]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ids = [engine.add(Prompt(p), params, control=_FailingControl(after) if i == 1 else None)
           for i, p in enumerate(prompts)]
    out = {i: [] for i in ids}
    errors = {}
    while engine.busy:
        for ev in engine.step():
            if ev.token is not None:
                out[ev.request_id].append(ev.token)
            if ev.finish_reason == "error":
                errors[ev.request_id] = ev.error
    assert list(errors) == [ids[1]] and isinstance(errors[ids[1]], GrammarError)
    assert len(out[ids[1]]) <= after
    for i in (0, 2):
        assert out[ids[i]] == llm.generate_ids(prompts[i], max_new_tokens=8, ignore_eos=True)


def test_the_engine_times_plain_steps_as_plain_decoding_runs(tiny_models):
    """As in speculative_generate_step: of the plain steps before the first round, only the last
    exposes its states (the drafter reads them); the timed ones take the plain path."""
    from test_speculative import one_token_exposures

    llm = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    config = SpeculationConfig(num_draft=2, check_every=None, compare_speed=True, probe_steps=4)
    engine = BatchEngine(llm, max_batch=2, drafter=random_drafter("e2b"), speculation=config)
    seen, hook = one_token_exposures(llm.model)
    try:
        a = engine.add(Prompt(_prompt(N_PROMPT, seed=12)), SamplingParams(max_tokens=12, ignore_eos=True))
        engine.step()
        spec = _request(engine, a).speculation
        while engine.busy:
            engine.step()
    finally:
        hook.remove()
    assert seen[:4] == [False, False, False, True]
    assert spec.stats.plain_steps == 2 and spec.stats.rounds > 0


def _long_prompt(n: int) -> list[int]:
    return [2] + [(11 * j) % 180 + 20 for j in range(n - 1)]


def test_a_long_prompt_is_prefilled_a_few_chunks_a_step_while_others_decode(tiny_models):
    """A step prefills at most prefill_per_step positions: a request decoding meanwhile gets a
    token every step (it had waited for the whole prompt), and both answers are the ones alone."""
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    engine = BatchEngine(llm, max_batch=4, chunk_size=4, prefill_per_step=8)
    short, long = [2, 30, 31], _long_prompt(41)
    a = engine.add(Prompt(short), SamplingParams(max_tokens=12, ignore_eos=True))
    first = engine.step()
    assert [e.request_id for e in first] == [a]
    b = engine.add(Prompt(long), SamplingParams(max_tokens=4, ignore_eos=True))
    out, steps_to_first = {a: [first[0].token], b: []}, None
    for step in range(1, 40):
        events = engine.step()
        tokens = {e.request_id: e.token for e in events if e.token is not None}
        if steps_to_first is None:
            assert a in tokens or not engine.busy  # a token for the short request every step
            if b in tokens:
                steps_to_first = step
        for rid, token in tokens.items():
            out[rid].append(token)
        if not engine.busy:
            break
    assert steps_to_first == 6  # 41 positions, 8 a step
    assert out[b] == llm.generate_ids(long, max_new_tokens=4, ignore_eos=True)
    assert out[a] == llm.generate_ids(short, max_new_tokens=12, ignore_eos=True)


def test_a_request_cancelled_while_its_prompt_is_read_in_leaves_at_once(tiny_models):
    """It leaves within a step (it had held the model until its whole prompt was in), and what it
    had prefilled is kept: the same prompt sent again starts from there."""
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    engine = BatchEngine(llm, max_batch=2, chunk_size=4, prefill_per_step=8)
    long = _long_prompt(41)
    b = engine.add(Prompt(long), SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.step() == [] and engine.step() == []  # 16 positions in, no token yet
    assert engine.cancel(b) and not engine.busy
    c = engine.add(Prompt(long), SamplingParams(max_tokens=3, ignore_eos=True))
    events, steps = [], 0
    while engine.busy:
        events += engine.step()
        steps += 1
    assert [e.token for e in events if e.token is not None] == llm.generate_ids(long, max_new_tokens=3, ignore_eos=True)
    assert events[0].request_id == c and events[0].cached_tokens == 16
    assert steps == 4 + 2  # the 25 positions left, 8 a step, then two more tokens


def test_prefill_per_step_is_a_multiple_of_the_chunk(tiny_models):
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    with pytest.raises(ValueError, match="multiple of the chunk size 4"):
        BatchEngine(llm, chunk_size=4, prefill_per_step=6)


def test_the_long_prompt_script_runs(tiny_models, load_script, tmp_path):
    """scripts/long_prompt.py (its table is in docs/benchmarks.md) on a tiny model: both step
    budgets give the long request the same tokens, and a section is recorded."""
    script = load_script("long_prompt")
    out = tmp_path / "b.md"
    folder, _ = tiny_models("e2b")
    assert script.main(["--model", str(folder), "--prompt-tokens", "40", "--rounds", "1", "--threads", "1",
                        "--write", str(out)]) == 0
    assert "| 1024 positions a step |" in out.read_text()
