"""The loaded model as users see it: ids and text in, logits, ids and text out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import chat
from .config import TextConfig
from .generate import generate_step
from .model.text import TextModel
from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer

Messages = list[dict[str, Any]]


@dataclass
class ModelInfo:
    """Where a model came from, for `inspect` and error messages."""

    path: Path
    format: str  # "safetensors" or "gguf"
    chat_template: str | None
    tensors: list[tuple[str, str, tuple[int, ...], int]]  # name, type, shape, bytes


class LLM:
    """A loaded Gemma model. Create it with `gemmarun.load(path)`."""

    def __init__(self, model: TextModel, tokenizer: Tokenizer, info: ModelInfo):
        self.model = model
        self.config: TextConfig = model.config
        self.tokenizer = tokenizer
        self.info = info

    # -- ids ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> np.ndarray:
        """One forward pass without a cache: float32 logits [len(ids), vocab]."""
        if not len(ids):
            raise ValueError("ids is empty")
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(f"{len(ids)} ids exceed the context of {self.config.max_position_embeddings}")
        self._check_ids(ids)
        t = torch.tensor([list(ids)], device=self.model.device)
        positions = torch.arange(len(ids), device=self.model.device)
        return self.model(t, positions).float()[0].cpu().numpy()

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 16, temperature: float = 0.0,
                     **sampling: Any) -> list[int]:
        """The new token ids (the prompt is not repeated), using the KV cache."""
        self._check_ids(prompt_ids)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, **sampling)
        return list(generate_step(self.model, list(prompt_ids), params, stop_ids=self.stop_ids(params)))

    # -- text ----------------------------------------------------------------------------------

    def generate(self, prompt: str | Messages, **sampling: Any) -> str:
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str | Messages, *, enable_thinking: bool = False, **sampling: Any) -> Iterator[str]:
        """Yield UTF-8-safe text pieces. A string is continued as raw text (BOS prepended); a
        list of messages is rendered with the model's chat template."""
        params = SamplingParams(**sampling) if sampling else SamplingParams()
        ids = self.encode_prompt(prompt, enable_thinking=enable_thinking)
        yield from self.stream_ids(ids, params)

    def encode_prompt(self, prompt: str | Messages, *, enable_thinking: bool = False) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        text = self.render_chat(prompt, enable_thinking=enable_thinking)
        return self.tokenizer.encode(text, add_bos=False)

    def render_chat(self, messages: Messages, *, enable_thinking: bool = False, tools=None,
                    add_generation_prompt: bool = True) -> str:
        """The checkpoint's own template (sandboxed) when it ships one; otherwise ours."""
        if self.info.chat_template:
            return chat.render_template(self.info.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking, tools=tools)
        if self.config.family == "gemma3":
            return chat.render_gemma3(messages, add_generation_prompt=add_generation_prompt)
        return chat.render_gemma4(messages, add_generation_prompt=add_generation_prompt,
                                  enable_thinking=enable_thinking, tools=tools)

    @property
    def has_chat_template(self) -> bool:
        return self.info.chat_template is not None

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        if params.ignore_eos:
            return frozenset(params.stop_token_ids)
        return frozenset(self.config.eos_ids) | frozenset(self.tokenizer.eos_ids) | frozenset(params.stop_token_ids)

    def stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        decoder = IncrementalDecoder(self.tokenizer)
        pending = ""  # text held back because it may be the start of a stop string
        hold = max((len(s) for s in params.stop), default=0)
        # Stop strings are matched on text, so token-level max_tokens still bounds the work.
        for token in generate_step(self.model, ids, params, stop_ids=self.stop_ids(params)):
            pending += decoder.push(token)
            if params.stop:
                cut = _find_stop(pending, params.stop)
                if cut is not None:
                    if pending[:cut]:
                        yield pending[:cut]
                    return
                safe = len(pending) - (hold - 1)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            elif pending:
                yield pending
                pending = ""
        pending += decoder.flush()
        if params.stop:
            cut = _find_stop(pending, params.stop)
            pending = pending if cut is None else pending[:cut]
        if pending:
            yield pending

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= int(i) < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")



def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
