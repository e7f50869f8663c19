"""Sampling parameters shared by the CLI, the Python API and the server, and the pure logits
processors built from them."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import Any

import torch

# Below this temperature sampling is greedy (vLLM's rule too): logits / 1e-38 overflow float32,
# and no draw at such a temperature differs from the argmax anyway.
GREEDY_BELOW = 1e-5
# Penalties past these would push logits beyond float32 (presence: OpenAI's own range).
MAX_PENALTY = 2.0  # presence_penalty's and frequency_penalty's
MAX_LOGIT_BIAS = 100.0  # OpenAI's: -100 bans a token, 100 all but forces it
REPETITION_PENALTY_RANGE = (1e-3, 1e3)


NON_FINITE = ("hold NaN or inf (corrupt weights, or activations past the compute dtype's range: Gemma models "
              "overflow float16, use bfloat16 or float32)")
ALL_EQUAL = "are all equal (weights all zero, or activations saturated)"


class UnusableLogits(RuntimeError):
    """The model's logits choose no token: NaN (or inf, which makes the probabilities NaN) from
    corrupt weights or an overflow upstream, or every logit equal (all-zero weights), where a
    greedy pick would be id 0 (<pad>, printed as nothing) every step. A fault, not a bad request."""

    def __init__(self, problem: str = NON_FINITE) -> None:
        super().__init__(f"the model's logits {problem}: no token can be chosen")


def _collection(value: object) -> bool:
    """A list, tuple, set, array or generator of values (not a string, whose characters are not
    stop strings, nor a dict, whose keys are not what anyone meant)."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


RANDOM_SEED = -1  # the seed that asks for a fresh random one, as llama.cpp and Ollama read it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables (-1 too, as vLLM and llama.cpp read it)
    top_p: float = 1.0  # 0 keeps the most likely token alone, as llama.cpp and Ollama read it
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already seen (prompt and output)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted once for each time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); a dict too
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-turn ids
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if not (value is None and name == "seed") and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise TypeError(f"{name} must be an integer, not {value!r:.40}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"{name} must be a number, not {value!r:.40}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be true or false, not {self.ignore_eos!r:.40}")
        # plain ints (numpy's seed reached torch's generator as np.int64: a TypeError); None is
        # "none", as OpenAI clients send it
        for name in ("max_tokens", "top_k", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        if self.seed == RANDOM_SEED:  # llama.cpp's and Ollama's "a random seed", not a fixed one
            object.__setattr__(self, "seed", None)
        if self.top_k == -1:  # vLLM's and llama.cpp's "no top-k"
            object.__setattr__(self, "top_k", 0)
        stop_ids = () if self.stop_token_ids is None else self.stop_token_ids
        ids = tuple(stop_ids) if _collection(stop_ids) else None
        if ids is None or any(isinstance(i, bool) or not isinstance(i, Integral) for i in ids):
            raise TypeError(f"stop_token_ids must be a list of integers, not {self.stop_token_ids!r:.40}")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        # one stop string, as OpenAI accepts it (not its characters)
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        stop = tuple(stop) if _collection(stop) else None
        if stop is None or not all(isinstance(x, str) for x in stop):
            raise TypeError(f"stop must be a string or a list of strings, not {self.stop!r:.40}")
        # an empty stop string matches everywhere: ignored, as the server and OpenAI ignore it
        object.__setattr__(self, "stop", tuple(x for x in stop if x != ""))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        low, high = REPETITION_PENALTY_RANGE
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (0 <= self.temperature < math.inf, "temperature must be >= 0 and finite"),
            (self.top_k >= 0, "top_k must be >= 0 (or -1: off)"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (low <= self.repetition_penalty <= high, f"repetition_penalty must be in [{low:g}, {high:g}]"),
            (abs(self.presence_penalty) <= MAX_PENALTY,
             f"presence_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (abs(self.frequency_penalty) <= MAX_PENALTY,
             f"frequency_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed must fit in 64 bits"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)


def _logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias as sorted (id, bias) pairs: a dict or pairs of an integer id and a
    number in [-100, 100] (its range; ids are checked against the vocabulary by LLM.stop_ids)."""
    refused = TypeError(f"logit_bias must map token ids to numbers, not {bias!r:.60}")
    if not isinstance(bias, Mapping) and not _collection(bias):
        raise refused
    out = {}
    for pair in bias.items() if isinstance(bias, Mapping) else bias:
        token, value = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
        if isinstance(token, bool) or not isinstance(token, Integral) or isinstance(value, bool) or not isinstance(
                value, Real):
            raise refused
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], not {value!r:.20}")
        out[int(token)] = float(value)
    return tuple(sorted(out.items()))


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor, p: SamplingParams):
    """logits (V,) float32; seen/generated: 1-D id tensors. Returns the logits biased
    (logit_bias, as OpenAI adds it to the model's logits) and penalised."""
    if p.logit_bias:
        logits = logits.clone()
        ids, values = zip(*p.logit_bias)
        logits[torch.tensor(ids)] += torch.tensor(values)
    if p.repetition_penalty != 1.0 and seen.numel():
        ids = torch.unique(seen)
        vals = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty and generated.numel():
        logits = logits.clone()
        logits[torch.unique(generated)] -= p.presence_penalty
    if p.frequency_penalty and generated.numel():
        ids, counts = torch.unique(generated, return_counts=True)
        logits = logits.clone()
        logits[ids] -= p.frequency_penalty * counts.float()
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as masks to -inf (pure; logits (V,) float32)."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        drop[0] = False  # (top_p 0: the mass before it, 0, already "reaches" it)
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def params_from_options(options: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from a caller's keyword options: transformers' `max_new_tokens` may stand for
    `max_tokens`, and an unknown name is a TypeError that lists the known ones (not the dataclass's
    "__init__() got an unexpected keyword argument")."""
    options = dict(options)
    if "max_new_tokens" in options:
        if "max_tokens" in options:
            raise TypeError("give max_new_tokens or max_tokens, not both")
        options["max_tokens"] = options.pop("max_new_tokens")
    known = [f.name for f in fields(SamplingParams)]
    unknown = [name for name in options if name not in known]
    if unknown:
        raise TypeError(f"unknown sampling option {unknown[0]!r:.40} (the options: {', '.join(known)})")
    return SamplingParams(**options)


@dataclass
class Sampler:
    """Stateful only in its random generator, so a seed reproduces a whole generation."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(generator_seed(self.params.seed))
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor) -> int:
        if self.params.temperature == 0.0:
            return greedy_token(apply_penalties(logits.float().cpu(), seen, generated, self.params))
        probs = self.distribution(logits, seen, generated)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def distribution(self, logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The probabilities (V,) float32 on the CPU that `__call__` draws from; one-hot on the
        argmax when greedy. Speculative decoding compares the target's with the drafter's."""
        logits = apply_penalties(logits.float().cpu(), seen, generated, self.params)
        if self.params.temperature == 0.0:
            probs = torch.zeros_like(logits)
            probs[greedy_token(logits)] = 1.0
            return probs
        probs = torch.softmax(filter_logits(logits, self.params), dim=-1)
        if math.isnan(probs[0]):  # one NaN or inf logit makes every probability NaN
            raise UnusableLogits()
        return probs


def generator_seed(seed: int) -> int:
    """The 32 bits torch's CPU generator keeps of a seed (it drops the rest: seeds 1 and 2**32 + 1
    drew the same tokens). Seeds below 2**32 are themselves; the others, negative ones included,
    are hashed into that range, so no simple pattern of 64-bit seeds collides."""
    if 0 <= seed < 2**32:
        return seed
    digest = hashlib.blake2b((seed % 2**64).to_bytes(8, "little"), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def greedy_token(logits: torch.Tensor) -> int:
    """`int(torch.argmax(logits))` for a 1-D vector, through the native kernel for float32 on the
    CPU: torch's CPU argmax is a scalar loop, 0.4 ms over a 262k vocabulary, a few percent of a
    small model's decode token. NaN logits raise UnusableLogits (argmax would pick the first NaN,
    and a generation would go on as if nothing were wrong)."""
    token = None
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() == 1 and logits.numel():
        from .native import native_ops

        ops = native_ops()
        if ops is not None:
            token = ops.argmax(logits)
    if token is None:
        token = int(torch.argmax(logits))
    if math.isnan(logits[token]):  # argmax counts NaN as the largest: one NaN is enough to land here
        raise UnusableLogits()
    if token == 0 and logits.numel() > 1 and bool(logits.min() == logits[0]):  # the first of equals
        raise UnusableLogits(ALL_EQUAL)
    return token
