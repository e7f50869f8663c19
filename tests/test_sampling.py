"""Logits processors on hand-made distributions; seeded sampling; penalties."""

import math

import pytest
import torch

from gemmarun.sampling import UnusableLogits, Sampler, SamplingParams, apply_penalties, filter_logits, greedy_token


def _probs(logits, **kw):
    p = SamplingParams(temperature=kw.pop("temperature", 1.0), **kw)
    return torch.softmax(filter_logits(torch.tensor(logits), p), -1)


def test_top_k_keeps_k_best():
    probs = _probs([1.0, 3.0, 2.0, 0.0], top_k=2)
    assert (probs > 0).tolist() == [False, True, True, False]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert (_probs(logits, top_p=0.7) > 0).tolist() == [True, True, False, False]
    assert (_probs(logits, top_p=0.5) > 0).tolist() == [True, False, False, False]
    assert (_probs(logits, top_p=0.81) > 0).tolist() == [True, True, True, False]
    # llama.cpp's and Ollama's readings (which had been refused): top_p 0 keeps the top token
    # alone, top_k -1 is off
    assert (_probs(logits, top_p=0) > 0).tolist() == [True, False, False, False]
    assert SamplingParams(top_k=-1).top_k == 0


def test_min_p_is_relative_to_the_top_token():
    logits = torch.log(torch.tensor([0.6, 0.25, 0.1, 0.05])).tolist()
    assert (_probs(logits, min_p=0.2) > 0).tolist() == [True, True, False, False]


def test_temperature_sharpens_and_flattens():
    logits = [2.0, 1.0]
    hot, cold = _probs(logits, temperature=2.0), _probs(logits, temperature=0.5)
    assert cold[0] > _probs(logits)[0] > hot[0]
    assert hot[0].item() == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-6)


def test_temperature_comes_before_the_filters():
    """As in transformers and vLLM: top-p and min-p see the tempered distribution. At temperature 2,
    [.5, .3, .15, .05] becomes [.38, .29, .21, .12], so top-p 0.7 keeps three tokens (two
    untempered) and min-p 0.5 keeps three (two untempered)."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert (_probs(logits, top_p=0.7, temperature=2.0) > 0).tolist() == [True, True, True, False]
    assert (_probs(logits, min_p=0.5, temperature=2.0) > 0).tolist() == [True, True, True, False]
    assert (_probs(logits, min_p=0.5) > 0).tolist() == [True, True, False, False]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_penalties(logits, torch.tensor([0, 1, 1]), torch.tensor([], dtype=torch.long),
                          SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_presence_penalty_only_on_generated_tokens():
    logits = torch.zeros(4)
    out = apply_penalties(logits, torch.tensor([0, 2]), torch.tensor([2, 2, 3]), SamplingParams(presence_penalty=0.5))
    assert out.tolist() == [0.0, 0.0, -0.5, -0.5]


def test_greedy_ignores_seed_and_sampling_follows_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    none = torch.tensor([], dtype=torch.long)
    assert Sampler(SamplingParams())(logits, none, none) == 0
    sampler = Sampler(SamplingParams(temperature=1.0, seed=123))
    counts = torch.bincount(torch.tensor([sampler(logits, none, none) for _ in range(4000)]), minlength=3)
    assert counts.tolist() == pytest.approx([2800, 800, 400], abs=120)
    a = Sampler(SamplingParams(temperature=1.0, seed=5))
    b = Sampler(SamplingParams(temperature=1.0, seed=5))
    assert [a(logits, none, none) for _ in range(50)] == [b(logits, none, none) for _ in range(50)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("inf")), dict(top_p=-0.1),
                                 dict(top_p=1.5), dict(min_p=1.0), dict(top_k=-2), dict(max_tokens=-1),
                                 dict(repetition_penalty=0), dict(repetition_penalty=1e-300),
                                 dict(repetition_penalty=1e30), dict(presence_penalty=-1e39),
                                 dict(presence_penalty=2.5)])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError, match=f"^{next(iter(bad))} must "):
        SamplingParams(**bad)


@pytest.mark.parametrize("temperature", [1e-38, 1e-6])
def test_a_vanishing_temperature_is_greedy(temperature):
    """logits / 1e-38 overflow float32 (a draw from NaN probabilities raised): such a temperature
    is the argmax."""
    p = SamplingParams(temperature=temperature, seed=0)
    assert p.temperature == 0.0
    logits = torch.tensor([30.0, 29.0, -5.0, 31.0])
    none = torch.tensor([], dtype=torch.long)
    assert Sampler(p)(logits, none, none) == 3
    assert SamplingParams(temperature=1e-4).temperature == 1e-4


def test_one_stop_string_is_not_its_characters():
    """stop="Paris" had stopped at any of P, a, r, i, s (OpenAI and vLLM take a plain string)."""
    assert SamplingParams(stop="Paris").stop == ("Paris",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)


@pytest.mark.parametrize("where", [0, 7, 99])
def test_nan_logits_are_a_fault_not_a_token(where):
    """argmax counts NaN as the largest and multinomial refuses NaN with torch's own words: one
    named error instead, greedy or sampled (an inf logit makes every probability NaN too)."""
    logits = torch.randn(100)
    logits[where] = float("nan")
    with pytest.raises(UnusableLogits, match="logits hold NaN"):
        greedy_token(logits)
    with pytest.raises(UnusableLogits):
        greedy_token(logits.double())  # torch's argmax path
    seen = torch.tensor([], dtype=torch.long)
    for bad in (float("nan"), float("inf")):
        logits[where] = bad
        with pytest.raises(UnusableLogits):
            Sampler(SamplingParams(temperature=0.8, seed=1))(logits, seen, seen)


def test_all_equal_logits_are_a_fault_not_token_zero():
    """All-zero weights give all-zero logits: argmax's first of equals, <pad> (printed as nothing),
    had been "generated" every step with exit status 0."""
    for logits in (torch.zeros(100), torch.full((100,), 30.0), torch.zeros(100, dtype=torch.float64)):
        with pytest.raises(UnusableLogits, match="logits are all equal"):
            greedy_token(logits)
    near = torch.zeros(100)
    near[57] = 1e-30
    assert greedy_token(near) == 57
    first = torch.zeros(100)
    first[0] = 1.0
    assert greedy_token(first) == 0  # id 0 itself, when it is the largest, is still a token


def test_a_model_with_a_nan_weight_fails_its_generation_in_one_line(tiny_models):
    import gemmarun

    llm = gemmarun.load(tiny_models("gemma3")[0], device="cpu")
    with torch.no_grad():
        llm.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(UnusableLogits):
        llm.generate_ids([2, 40, 41], max_new_tokens=4)


def test_a_model_with_all_zero_weights_fails_its_generation_in_one_line(tiny_models):
    import gemmarun

    llm = gemmarun.load(tiny_models("gemma3")[0], device="cpu")
    with torch.no_grad():  # the tied head then gives every token the same logit
        llm.model.embed_tokens.weight.zero_()
    with pytest.raises(UnusableLogits, match="all equal"):
        llm.generate_ids([2, 40, 41], max_new_tokens=4)


def test_seeds_past_32_bits_draw_differently():
    """torch's CPU generator keeps 32 bits of a seed: 1 and 2**32 + 1 had drawn the same tokens."""
    from gemmarun.sampling import generator_seed

    logits = torch.zeros(1000)
    none = torch.tensor([], dtype=torch.long)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits, none, none) for _ in range(8)]

    assert draws(1) != draws(2**32 + 1) and draws(12345) != draws(12345 + 7 * 2**32)
    assert draws(5) == draws(5) and generator_seed(5) == 5  # seeds below 2**32 draw as they always did
    assert draws(2**40) == draws(2**40) and 0 <= generator_seed(-3) < 2**32


def test_seed_minus_one_asks_for_a_random_seed():
    """llama.cpp and Ollama read seed -1 as "random": it had been a fixed seed, every run the same."""
    assert SamplingParams(seed=-1).seed is None and SamplingParams(seed=-2).seed == -2
    logits = torch.zeros(1000)
    none = torch.tensor([], dtype=torch.long)
    runs = [[Sampler(SamplingParams(temperature=1.0, seed=-1))(logits, none, none) for _ in range(4)] for _ in range(3)]
    assert len({tuple(r) for r in runs}) > 1


def test_empty_stop_strings_are_ignored():
    """An empty string matches everywhere: stream_reply had returned an empty answer."""
    assert SamplingParams(stop=("", "x", "")).stop == ("x",) and SamplingParams(stop="").stop == ()


def test_frequency_penalty_counts_and_logit_bias_adds():
    """OpenAI's two: frequency_penalty subtracts once per time a token was generated (presence
    once per token), logit_bias is added to the model's logits before anything else."""
    logits = torch.zeros(6)
    generated = torch.tensor([2, 2, 2, 4])
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={1: 3.0, 5: -100})
    out = apply_penalties(logits, torch.tensor([0, 2, 2, 2, 4]), generated, p)
    assert out.tolist() == [0.0, 3.0, -1.75, 0.0, -0.75, -100.0]
    assert logits.tolist() == [0.0] * 6  # (pure)
    assert Sampler(SamplingParams(logit_bias={3: 100}))(torch.zeros(6), torch.tensor([]), torch.tensor([])) == 3
    for bad, error in [({"a": 1}, TypeError), ({1: "x"}, TypeError), ({1: 100.5}, ValueError), (5, TypeError),
                       ({True: 1}, TypeError)]:
        with pytest.raises(error, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    with pytest.raises(ValueError, match="^frequency_penalty must be in"):
        SamplingParams(frequency_penalty=3)
