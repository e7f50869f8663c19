"""Speculative decoding with a gemma4_assistant drafter: exactness, acceptance, fall-back, and the
drafter itself against transformers 5.23 (which can build it only with a test-side patch)."""

import itertools
import json
from dataclasses import replace

import pytest
import torch
from reference_models import WINDOW

import gemmarun
from gemmarun.config import (
    AssistantConfig,
    ConfigError,
    LayerType,
    assistant_config_from_hf,
    text_config_from_hf,
)
from gemmarun.generate import generate_step
from gemmarun.loading.assistant import load_assistant
from gemmarun.model.assistant import Assistant, DraftPairingError, check_pairing
from gemmarun.sampling import SamplingParams
from gemmarun.speculative import (
    SpeculationConfig,
    SpeculationStats,
    accept_or_resample,
    speculative_generate_step,
)

S, F = "sliding_attention", "full_attention"
EXACT = SpeculationConfig(check_every=None, compare_speed=False, probe_steps=0)  # always speculate


def drafter_text(family: str) -> dict:
    """A tiny drafter text config whose attention geometry can read the tiny target's K/V."""
    kv = {"e2b": {"num_key_value_heads": 1},
          "31b": {"num_key_value_heads": 2, "attention_k_eq_v": True, "num_global_key_value_heads": 1}}[family]
    return dict(model_type="gemma4_text", vocab_size=256, hidden_size=32, intermediate_size=48,
                num_attention_heads=4, head_dim=16, global_head_dim=32, num_hidden_layers=4,
                layer_types=[S, S, S, F], sliding_window=WINDOW, rms_norm_eps=1e-6,
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, final_logit_softcapping=1.0, **kv)  # set, small: the reference never applies it


def random_drafter(family: str, seed: int = 0, ordered: bool = False) -> Assistant:
    cfg = AssistantConfig(text=text_config_from_hf(drafter_text(family)), backbone_hidden_size=64,
                          use_ordered_embeddings=ordered, num_centroids=16, centroid_top_k=4)
    drafter = Assistant(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in drafter.state_dict().items():
            if name.endswith("token_ordering"):
                t.copy_(torch.randperm(t.numel(), generator=g))
            elif t.dim() < 2:  # norms and layer scalars
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return drafter.eval()


class OracleDrafter(Assistant):
    """Drafts the plain greedy continuation itself, wrong on every `wrong_every`-th token (by
    index in the generation): partial acceptance on a real target, without training anything."""

    def __init__(self, base: Assistant, n_prompt: int, continuation: list[int], wrong_every: int | None):
        super().__init__(base.config)
        self.load_state_dict(base.state_dict())
        self.n_prompt, self.continuation, self.wrong_every = n_prompt, continuation, wrong_every
        self.step = 0

    def context(self, target_kv, producers, query_position):
        self.next_index = query_position + 1 - self.n_prompt  # generation index of the first draft
        return super().context(target_kv, producers, query_position)

    def forward(self, token_embed, hidden, ctx):
        logits, hidden = super().forward(token_embed, hidden, ctx)  # the real drafter still runs
        index = self.next_index
        self.next_index += 1
        token = self.continuation[index] if index < len(self.continuation) else 0
        if self.wrong_every and index % self.wrong_every == self.wrong_every - 1:
            token = (token + 1) % logits.shape[-1]
        forced = torch.full_like(logits, -10.0)
        forced[..., token] = 10.0
        return forced, hidden


@pytest.fixture
def targets(tiny_text_models):
    return tiny_text_models


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(20, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


N_PROMPT, N_NEW = 2 * WINDOW + 1, 3 * WINDOW + 5  # both cross the sliding window several times


@pytest.mark.parametrize("family", ["e2b", "31b"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculation_equals_plain_greedy(targets, family, k):
    target = targets(family)
    prompt = _prompt(N_PROMPT, seed=k)
    params = SamplingParams(max_tokens=N_NEW)
    plain = list(generate_step(target, prompt, params))
    assert len(set(plain)) > 3, "degenerate continuation tests the cache poorly"
    base = random_drafter(family, seed=k)
    config = SpeculationConfig(num_draft=k, check_every=None, compare_speed=False, probe_steps=0)
    for drafter, wrong_every in ((base, None), (OracleDrafter(base, N_PROMPT, plain, 3), 3),
                                 (OracleDrafter(base, N_PROMPT, plain, None), None)):
        stats = SpeculationStats()
        out = list(speculative_generate_step(target, drafter, prompt, params, speculation=config, stats=stats))
        assert out == plain, (type(drafter).__name__, wrong_every)
        assert stats.rounds > 0 and stats.round_tokens <= N_NEW
        if isinstance(drafter, OracleDrafter) and wrong_every:
            assert 0 < stats.accepted < stats.drafted  # partial acceptance: rollbacks mid-round
        elif isinstance(drafter, OracleDrafter):
            assert stats.accepted == stats.drafted


def test_accurate_drafter_saves_target_forwards(targets):
    target = targets("e2b")
    prompt = _prompt(N_PROMPT, seed=7)
    params = SamplingParams(max_tokens=N_NEW)
    plain = list(generate_step(target, prompt, params))
    stats = SpeculationStats()
    oracle = OracleDrafter(random_drafter("e2b"), N_PROMPT, plain, None)
    config = SpeculationConfig(num_draft=4, check_every=None, compare_speed=False, probe_steps=0)
    assert list(speculative_generate_step(target, oracle, prompt, params, speculation=config, stats=stats)) == plain
    assert stats.acceptance == 1.0
    # Each round yields its k drafts and the bonus token: after the prefill's token, 5 per round
    # (the last token, with no room for a draft, comes from a plain step).
    assert stats.rounds == (N_NEW - 1) // 5 and stats.round_tokens == 5 * stats.rounds


def test_stop_and_length_rules_are_those_of_generate_step(targets):
    target = targets("31b")
    prompt = _prompt(N_PROMPT, seed=3)
    plain = list(generate_step(target, prompt, SamplingParams(max_tokens=N_NEW)))
    stop = frozenset({plain[6]})
    oracle = OracleDrafter(random_drafter("31b"), N_PROMPT, plain, None)
    for params, stop_ids, context in ((SamplingParams(max_tokens=N_NEW), stop, None),
                                      (SamplingParams(max_tokens=7), frozenset(), None),
                                      (SamplingParams(max_tokens=N_NEW), frozenset(), N_PROMPT + 5)):
        want = generate_step(target, prompt, params, stop_ids=stop_ids, context=context)
        got = speculative_generate_step(target, oracle, prompt, params, stop_ids=stop_ids, context=context,
                                        speculation=EXACT)
        assert _drain(got) == _drain(want)


def _drain(gen):
    tokens = []
    while True:
        try:
            tokens.append(next(gen))
        except StopIteration as done:
            return tokens, done.value


def test_fall_back_when_nothing_is_accepted(targets):
    target = targets("e2b")
    prompt = _prompt(N_PROMPT, seed=11)
    params = SamplingParams(max_tokens=N_NEW)
    plain = list(generate_step(target, prompt, params))
    # A drafter that always proposes a token the target never picks here: nothing is accepted.
    never = next(t for t in range(256) if t not in plain)
    oracle = OracleDrafter(random_drafter("e2b"), N_PROMPT, [never] * N_NEW, None)
    stats = SpeculationStats()
    config = SpeculationConfig(num_draft=3, check_every=2, compare_speed=False, probe_steps=1)
    out = list(speculative_generate_step(target, oracle, prompt, params, speculation=config, stats=stats))
    assert out == plain
    assert stats.rounds == 2 and stats.accepted == 0
    assert stats.fell_back_at == 1 + 1 + 2  # the prefill's token, one probe step, two rejected rounds


def test_accept_or_resample_reproduces_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(6, generator=g) * 1.5, 0)
    q[2], p[4] = 0.0, 0.0  # a token the drafter never proposes, one the target never picks
    q /= q.sum()
    p /= p.sum()
    n = 20000
    counts = torch.zeros(6)
    accepted = 0
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g))
        token, was_draft = accept_or_resample(p, q, draft, g)
        counts[token] += 1
        accepted += was_draft
    tv = 0.5 * float((counts / n - p).abs().sum())
    assert tv < 0.015, f"total variation {tv:.4f}"
    assert counts[4] == 0
    assert abs(accepted / n - float(torch.minimum(p, q).sum())) < 0.015  # the known acceptance rate


def test_greedy_accept_or_resample_is_argmax_without_randomness():
    p = torch.tensor([0.0, 0.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert accept_or_resample(p, torch.tensor([0.0, 0.0, 1.0, 0.0]), 2, g) == (2, True)
    assert accept_or_resample(p, torch.tensor([1.0, 0.0, 0.0, 0.0]), 0, g) == (2, False)
    assert torch.equal(g.get_state(), state)


class ProposalDrafter(Assistant):
    """Proposes fixed logits after each of a few known tokens (recognised by their embedding)."""

    def __init__(self, base: Assistant, target, proposals: dict[int, torch.Tensor]):
        super().__init__(base.config)
        self.load_state_dict(base.state_dict())
        self.proposals = proposals
        with torch.inference_mode():
            self.embeddings = {a: target.embed(torch.tensor([[a]])) for a in proposals}

    def forward(self, token_embed, hidden, ctx):
        _, hidden = super().forward(token_embed, hidden, ctx)
        after = next(a for a, e in self.embeddings.items() if torch.equal(e, token_embed))
        return self.proposals[after].view(1, 1, -1), hidden


def test_sampled_speculation_matches_the_target_distribution(targets):
    """The second token comes from a speculative round whose drafter proposes the target's top 3
    in other proportions: the joint frequencies of the first two tokens match the target's
    own sampling distribution (temperature 0.8, top-k 3), not the drafter's."""
    target = targets("31b")
    prompt = _prompt(N_PROMPT, seed=5)
    params = SamplingParams(max_tokens=3, temperature=0.8, top_k=3)  # token 2 comes from a 1-draft round
    with torch.inference_mode():
        first = target(torch.tensor([prompt]), torch.arange(N_PROMPT))[0, -1] / 0.8
    top = torch.topk(first, 3)
    target_joint, drafter_joint, proposals = {}, {}, {}
    q = [0.1, 0.2, 0.7]  # the drafter's weights on the target's top 3, most likely first
    for a, pa in zip(top.indices.tolist(), torch.softmax(top.values, 0).tolist()):
        with torch.inference_mode():
            second = target(torch.tensor([prompt + [a]]), torch.arange(N_PROMPT + 1))[0, -1]
        best = torch.topk(second, 3)
        proposal = torch.full_like(second, -30.0)
        proposal[best.indices] = 0.8 * torch.tensor(q).log()  # same support, other weights
        proposals[a] = proposal
        p = torch.softmax(best.values / 0.8, 0).tolist()
        for b, pb, qb in zip(best.indices.tolist(), p, q):
            target_joint[(a, b)], drafter_joint[(a, b)] = pa * pb, pa * qb
    drafter = ProposalDrafter(random_drafter("31b"), target, proposals)
    gap = 0.5 * sum(abs(target_joint[key] - drafter_joint[key]) for key in target_joint)
    assert gap > 0.25, "the drafter must disagree with the target for the test to mean anything"
    config = SpeculationConfig(num_draft=2, check_every=None, compare_speed=False, probe_steps=0)
    n = 400
    counts = dict.fromkeys(target_joint, 0)
    for seed in range(n):
        out = speculative_generate_step(target, drafter, prompt, replace(params, seed=seed), speculation=config)
        counts[tuple(out)[:2]] += 1
    tv = 0.5 * sum(abs(counts[key] / n - target_joint[key]) for key in target_joint)
    assert tv < 0.12, f"total variation {tv:.3f} (the drafter's own: {gap:.3f})"


# -- the drafter itself ----------------------------------------------------------------------


def _hf_drafter(monkeypatch, ordered: bool, seed: int = 0):
    """transformers 5.23 raises when every layer is KV-shared (spec 7); patch that one property,
    here only, so the reference can be built."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig
    from transformers.models.gemma4 import configuration_gemma4

    original = configuration_gemma4.Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    monkeypatch.setattr(configuration_gemma4.Gemma4TextConfig, "kv_sharing_modes", property(modes))
    text = {k: v for k, v in drafter_text("e2b").items() if k != "model_type"}
    cfg = Gemma4AssistantConfig(text_config=Gemma4TextConfig(**text, num_kv_shared_layers=4),
                                backbone_hidden_size=64, use_ordered_embeddings=ordered, num_centroids=16,
                                centroid_intermediate_top_k=4)
    model = Gemma4AssistantForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or "embed_scale" in name:
                continue
            if name.endswith("token_ordering"):
                t.copy_(torch.randperm(t.numel(), generator=g))
            elif t.is_floating_point():
                small = t.dim() < 2  # norms and layer scalars
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if small else torch.randn(t.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("ordered", [False, True])
def test_drafter_matches_transformers(monkeypatch, tmp_path, ordered):
    ref = _hf_drafter(monkeypatch, ordered)
    ref.save_pretrained(tmp_path)
    ours = load_assistant(tmp_path, dtype="float32", device="cpu")
    assert ours.config.use_ordered_embeddings == ordered
    g = torch.Generator().manual_seed(1)
    n = 3 * WINDOW  # more context than the sliding window
    sliding = (torch.randn(1, 1, n, 16, generator=g), torch.randn(1, 1, n, 16, generator=g))
    full = (torch.randn(1, 1, n, 32, generator=g), torch.randn(1, 1, n, 32, generator=g))
    embed, hidden = torch.randn(1, 1, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    with torch.no_grad():
        theirs = ref(inputs_embeds=torch.cat((embed, hidden), -1), position_ids=torch.tensor([[n]]),
                     shared_kv_states={S: sliding, F: full})
        positions = torch.arange(n)
        # The target's producers, under any layer numbers: 7 (sliding) and 9 (full).
        ctx = ours.context({7: (*sliding, positions), 9: (*full, positions)},
                           {LayerType.SLIDING: 7, LayerType.FULL: 9}, n)
        logits, projected = ours(embed, hidden, ctx)
    assert torch.allclose(logits, theirs.logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(projected, theirs.last_hidden_state, atol=1e-4, rtol=1e-4)


def test_drafter_config_errors_are_one_line():
    raw = {"model_type": "gemma4_assistant", "backbone_hidden_size": 64, "text_config": drafter_text("e2b")}
    assert assistant_config_from_hf(raw).layers[0].window == WINDOW + 1
    with pytest.raises(ConfigError, match="not a drafter"):
        assistant_config_from_hf({**raw, "model_type": "gemma4"})
    with pytest.raises(ConfigError, match="num_kv_shared_layers=2"):
        assistant_config_from_hf({**raw, "text_config": {**drafter_text("e2b"), "num_kv_shared_layers": 2}})
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input"):
        assistant_config_from_hf({**raw, "text_config": {**drafter_text("e2b"), "hidden_size_per_layer_input": 8,
                                                         "vocab_size_per_layer_input": 256}})


def test_drafter_that_cannot_read_the_target_is_refused(targets, tmp_path):
    drafter = random_drafter("e2b")
    with pytest.raises(DraftPairingError, match="backbone_hidden_size=96"):
        check_pairing(AssistantConfig(text=drafter.config.text, backbone_hidden_size=96), targets("e2b").config)
    with pytest.raises(DraftPairingError, match="head_dim"):
        wrong = text_config_from_hf({**drafter_text("e2b"), "head_dim": 8})
        check_pairing(AssistantConfig(text=wrong, backbone_hidden_size=64), targets("e2b").config)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_text"}))
    with pytest.raises(ConfigError, match="not a drafter"):
        load_assistant(tmp_path)


def test_a_corrupt_drafter_is_refused_at_load(monkeypatch, tmp_path):
    """A token ordering past the vocabulary loaded, then failed every generation (the server's
    every request a 500); a null backbone size was a TypeError traceback; integer weights were
    cast and failed at the first draft with a dtype message."""
    from safetensors.torch import load_file, save_file

    from gemmarun.loading import LoadError

    _hf_drafter(monkeypatch, ordered=True).save_pretrained(tmp_path / "good")
    weights = load_file(tmp_path / "good" / "model.safetensors")
    ordering = next(name for name in weights if name.endswith("token_ordering"))
    matrix = next(name for name, t in weights.items() if t.dim() == 2)
    cases = {
        "ordering": ({ordering: weights[ordering] + 1000}, None, "token_ordering is not an ordering of the 256"),
        "repeated": ({ordering: torch.zeros_like(weights[ordering])}, None, "token_ordering is not an ordering"),
        "integer": ({matrix: weights[matrix].long()}, None, "holds torch.int64, not floating point"),
        "null size": ({}, {"backbone_hidden_size": None}, "backbone_hidden_size=null must be an integer"),
    }
    for label, (tensors, config, message) in cases.items():
        folder = tmp_path / label
        folder.mkdir()
        save_file({**weights, **tensors}, folder / "model.safetensors")
        raw = json.loads((tmp_path / "good" / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, **(config or {})}))
        with pytest.raises((LoadError, ConfigError), match=message) as e:
            load_assistant(folder)
        assert "\n" not in str(e.value), label


def test_llm_and_cli_take_a_draft_folder(tiny_models, monkeypatch, tmp_path, capsys):
    from gemmarun.cli import main

    _hf_drafter(monkeypatch, ordered=True).save_pretrained(tmp_path)
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, dtype="float32", device="cpu")
    prompt = _prompt(N_PROMPT, seed=2)
    assert llm.generate_ids(prompt, max_new_tokens=12, draft=tmp_path) == llm.generate_ids(prompt, max_new_tokens=12)
    args = ["run", str(folder), "hello", "--raw", "--max-tokens", "12", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft", str(tmp_path)]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--draft", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmarun: error:") and "missing" in err and len(err.splitlines()) == 1
    elsewhere = llm.load_draft(tmp_path).to("meta")  # a drafter on another device than the model's
    with pytest.raises(ValueError, match="the drafter is on meta, the model on cpu"):
        llm.load_draft(elsewhere)


def one_token_exposures(model) -> tuple[list, object]:
    """Records, for each one-token forward of `model`, whether it exposed its states (a hook)."""
    seen: list[bool] = []

    def hook(module, args, kwargs):
        if args[0].shape == (1, 1):
            seen.append(kwargs.get("expose") is not None)

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_plain_steps_timed_for_the_speed_check_run_as_plain_decoding(targets):
    """Every probe step had exposed its states for the drafter, which on the CPU forgoes the
    native whole-token step (~3x slower): rounds were compared with a plain speed plain decoding
    never has, and a drafter that lost to it stayed on. Only the step before a round exposes now;
    the timed ones (between the untimed first and that one) do not."""
    target = targets("e2b")
    config = SpeculationConfig(num_draft=2, check_every=None, compare_speed=True, probe_steps=4)
    assert [config.probe(n) for n in range(5)] == [
        (False, False), (True, False), (True, False), (False, True), (False, True)]
    stats = SpeculationStats()
    seen, hook = one_token_exposures(target)
    try:
        list(speculative_generate_step(target, random_drafter("e2b"), _prompt(N_PROMPT, seed=3),
                                       SamplingParams(max_tokens=12), speculation=config, stats=stats))
    finally:
        hook.remove()
    assert seen[:4] == [False, False, False, True]
    assert stats.plain_steps == 2 and stats.rounds > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_drafter_with_nan_logits_costs_speed_not_the_answer(targets, temperature):
    """Its NaN logits ended the generation with the target's "logits hold NaN" error; a drafter
    may only ever change the speed."""
    target = targets("e2b")
    broken = random_drafter("e2b")
    with torch.no_grad():
        broken.norm.weight.fill_(float("nan"))
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=3)
    prompt = _prompt(N_PROMPT, seed=4)
    config = SpeculationConfig(num_draft=2, check_every=None, compare_speed=False, probe_steps=0)
    stats = SpeculationStats()
    with_broken = list(speculative_generate_step(target, broken, prompt, params, speculation=config, stats=stats))
    assert with_broken == list(generate_step(target, prompt, params))
    assert stats.rounds > 0 and stats.drafted == 0


def test_a_seeded_sampled_generation_comes_out_the_same_whatever_the_timings(targets, monkeypatch):
    """Rounds draw from the generator otherwise than plain steps, so where the timed fall-back
    switched changed the text of a seeded run; a seeded sampled run now falls back on acceptance
    alone. Two fake clocks: one makes rounds look as cheap as plain steps, the other ever slower."""
    import gemmarun.speculative as speculative

    from gemmarun.speculative import SEEDED_MIN_ACCEPTANCE, for_params

    target, drafter = targets("e2b"), random_drafter("e2b", seed=5)
    params = SamplingParams(max_tokens=N_NEW, temperature=1.0, seed=3)
    config = SpeculationConfig(num_draft=2, check_every=2, probe_steps=3)
    assert for_params(config, params) == replace(config, compare_speed=False, min_acceptance=SEEDED_MIN_ACCEPTANCE)
    assert for_params(config, replace(params, seed=None)) == config
    assert for_params(config, replace(params, temperature=0.0)) == config
    outs = []
    for clock in ((i * 1e-3 for i in itertools.count()), (i * i * 1e-3 for i in itertools.count())):
        monkeypatch.setattr(speculative.time, "perf_counter", lambda clock=clock: next(clock))
        stats = SpeculationStats()
        outs.append(list(speculative_generate_step(target, drafter, _prompt(N_PROMPT, seed=4), params,
                                                   speculation=config, stats=stats)))
        assert stats.rounds > 0
    assert outs[0] == outs[1]
