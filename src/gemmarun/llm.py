"""The loaded model as users see it: ids and text in, logits, ids and text out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

from . import chat
from .config import TextConfig
from .constrain import Grammar, GrammarState
from .control import NUMBER_CHARS, OutputControl, make_loop_guard
from .generate import Caching, check_token_ids, generate_step
from .loopguard import LoopGuardConfig
from .model.gemma3_vision import Gemma3Encoders
from .model.multimodal import AUDIO, IMAGE, TEXT, VIDEO, Encoders, MediaTokens, merge, token_types
from .model.unified import UnifiedEncoders
from .model.text import TextModel
from .prompt_cache import Held, PromptCache
from .sampling import SamplingParams, params_from_options
from .tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from .model.assistant import Assistant

Messages = list[dict[str, Any]]
Draft = Union["Assistant", str, Path]  # a speculative drafter, or its gemma4_assistant folder


@dataclass
class ModelInfo:
    """Where a model came from, for `inspect` and error messages."""

    path: Path
    format: str  # "safetensors" or "gguf"
    chat_template: str | None  # the checkpoint's (its "default" one where it names several)
    tensors: list[tuple[str, str, tuple[int, ...], int]]  # name, type, shape, bytes
    tool_template: str | None = None  # its "tool_use" template, for prompts with tools


@dataclass(frozen=True)
class Prompt:
    """Prompt ids (placeholders expanded) and the media that fill them, in order."""

    ids: list[int]
    media: tuple = ()  # processing.prompt.Prepared items


def _check_prompt_and_params(prompt: object, params: object) -> None:
    """stream_prompt and stream_reply take what `build_prompt` makes and a SamplingParams (given
    messages, a string or a dict they had failed on "'list' object has no attribute 'ids'")."""
    if not isinstance(prompt, Prompt):
        raise TypeError(f"prompt must be a Prompt: LLM.build_prompt(messages or text), "
                        f"not {type(prompt).__name__}")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a gemmarun.SamplingParams, not {type(params).__name__}")


def _not_a_grammar(grammar: object) -> TypeError:
    return TypeError(f"grammar must be a gemmarun.Grammar (Grammar.json_schema, regex, lark or svg), "
                     f"not {type(grammar).__name__}")


class LLM:
    """A loaded Gemma model. Create it with `gemmarun.load(path)`."""

    def __init__(self, model: TextModel, tokenizer: Tokenizer, info: ModelInfo,
                 encoders: Encoders | UnifiedEncoders | Gemma3Encoders | None = None):
        self.model = model
        self.config: TextConfig = model.config
        self.tokenizer = tokenizer
        self.info = info
        self.encoders = encoders
        if encoders is not None and self.config.family == "gemma4":  # (Gemma 3 embeds its own rows)
            tokens = encoders.cfg.tokens
            model.read_placeholders_as_pad((tokens.image, tokens.video, tokens.audio))
        # The last generation's KV cache, kept so that a prompt starting the same way (the next
        # turn of a chat) prefills only what is new; PromptCache(0) turns that off.
        self.prompt_cache = PromptCache(1)

    # -- ids ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, ids: list[int], images: list | None = None, audios: list | None = None,
               videos: list | None = None, image_tokens: int | None = None) -> np.ndarray:
        """One forward pass without a cache: float32 logits [len(ids), vocab]. With media, `ids`
        already hold the expanded placeholders; the media fill them in order."""
        self._check_ids(ids)
        if not len(ids):
            raise ValueError("ids is empty")
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(f"{len(ids)} ids exceed the context of {self.config.max_position_embeddings}")
        media = [("image", m) for m in _media_list(images)] + [("audio", m) for m in _media_list(audios)] + \
                [("video", m) for m in _media_list(videos)]
        prepared = tuple(self.prepare_media(kind, source, image_tokens) for kind, source in media)
        text_ids, embeds, blocks = self._inputs(Prompt(list(ids), prepared))
        positions = torch.arange(len(ids), device=self.model.device)
        out = self.model(text_ids[None], positions, embeds=embeds, vision_blocks=blocks)
        return out.float()[0].cpu().numpy()

    # -- media -------------------------------------------------------------------------------

    @property
    def media_tokens(self) -> MediaTokens:
        return self.encoders.cfg.tokens if self.encoders is not None else MediaTokens()

    def encode_image(self, source, max_soft_tokens: int | None = None) -> np.ndarray:
        """Projected soft tokens of one image: [n_soft_tokens, hidden]; the budget is the model's
        own (as in prompts) unless given."""
        item = self.prepare_media("image", source, max_soft_tokens)
        return self._soft(item)[0].float().cpu().numpy()

    def encode_audio(self, source) -> np.ndarray:
        """Projected soft tokens of one audio file (all its 30 s clips; one clip for a unified
        model): [n_soft_tokens, hidden]."""
        item = self.prepare_media("audio", source, None)
        return torch.cat(self._soft(item)).float().cpu().numpy()

    def check_media(self, kind: str) -> None:
        """ValueError, saying why, unless this model takes `kind` ("image", "video" or "audio")
        input; nothing is read."""
        if self.encoders is None:
            if self.info.format == "gguf":
                beside = sorted(self.info.path.parent.glob("*mmproj*.gguf"))
                hint = f" ({beside[0]} is beside it)" if beside else ""
                raise ValueError(f"this GGUF holds the text model only; for {kind} input give llama.cpp's multimodal "
                                 f"projector GGUF with it (--mmproj FILE, or load(..., mmproj=FILE)){hint}")
            raise ValueError(f"this model takes text only; it cannot take {kind} input")
        if kind == "audio" and self.encoders.embed_audio is None:
            raise ValueError("this model has no audio tower: it cannot take audio")
        if kind != "audio" and self.encoders.embed_vision is None:
            raise ValueError("this model has no vision tower: it cannot take images or video")
        if kind == "video" and isinstance(self.encoders, Gemma3Encoders):
            raise ValueError("Gemma 3 takes images, not video (give frames as images)")

    def prepare_media(self, kind: str, source, image_tokens: int | None = None):
        """One medium ("image", "audio" or "video": a path, bytes, an image, samples) decoded and
        preprocessed for this model, as a prompt's media part takes it; ValueError naming the
        source where it cannot be. A prepared item is taken as it is (`gemmarun chat` prepares a
        file when it is attached, so the history keeps it whatever becomes of the file)."""
        from .processing.prompt import PreparedAudio, PreparedImage, PreparedVideo, prepare, source_of

        self.check_media(kind)
        if isinstance(source, (PreparedImage, PreparedAudio, PreparedVideo)):
            return source
        if isinstance(source, str) and source.startswith("data:"):  # as an image_url part takes it
            source = source_of(source)
        budget = self.encoders.cfg.image_soft_tokens if image_tokens is None else image_tokens
        if isinstance(self.encoders, Gemma3Encoders):
            from .processing.image import load_image, preprocess_square_image

            if budget != self.encoders.cfg.image_soft_tokens:
                raise ValueError(f"Gemma 3 gives every image {self.encoders.cfg.image_soft_tokens} soft tokens; "
                                 f"it takes no other budget ({budget} asked)")
            return PreparedImage(preprocess_square_image(load_image(source), self.encoders.cfg.vision.image_size,
                                                         budget))
        if isinstance(self.encoders, UnifiedEncoders):
            from .processing.unified import prepare_unified

            return prepare_unified(kind, source, budget, self.encoders.cfg)
        return prepare(kind, source, budget)

    def _soft(self, item) -> list[torch.Tensor]:
        """Soft tokens of one prepared media item (several tensors for clips or frames)."""
        from .processing.audio import batch_features
        from .processing.image import stack_inputs
        from .processing.prompt import PreparedAudio, PreparedImage

        device = self.model.device
        dtype = next(self.encoders.parameters()).dtype  # the towers' own: bfloat16 by a float32 text model
        if isinstance(self.encoders, Gemma3Encoders):
            return self.encoders.images(item.inputs.pixels[None].to(device, dtype))
        if isinstance(self.encoders, UnifiedEncoders):  # raw patches / waveform frames
            from .processing.unified import soft_inputs

            kind, (values, where) = soft_inputs(item)
            encode = self.encoders.audio if kind == "audio" else self.encoders.images
            return encode(values.to(device, dtype), where.to(device))
        if isinstance(item, PreparedAudio):
            # One 30 s clip at a time: the tower's activations take ~140 MiB a clip (float32),
            # and an hour of audio is 120 clips.
            soft = []
            for clip in item.clips:
                features, mask = batch_features([clip])
                soft += self.encoders.audio(torch.from_numpy(features).to(device, dtype),
                                            torch.from_numpy(mask).to(device))
            return soft
        frames = [item.inputs] if isinstance(item, PreparedImage) else list(item.frames)
        pixels, positions = stack_inputs(frames)
        return self.encoders.images(pixels.to(device, dtype), positions.to(device))

    def _inputs(self, prompt: Prompt, held: Held | None = None, pool: PromptCache | None = None):
        """(ids for the token tables, merged embeddings or None, vision blocks or None). With
        `pool`, soft tokens of media it has seen (by `held.media`'s digests) are not encoded again."""
        from .processing.prompt import PreparedAudio, PreparedImage

        ids = torch.tensor(prompt.ids, device=self.model.device)
        if not prompt.media and (self.encoders is None or not (token_types(ids, self.media_tokens) != TEXT).any()):
            return ids, None, None  # (placeholders without their media: merge names the mismatch)
        soft: dict[int, list[torch.Tensor]] = {IMAGE: [], VIDEO: [], AUDIO: []}
        cached = pool is not None and pool.capacity > 0 and held is not None and len(held.media) == len(prompt.media)
        for i, item in enumerate(prompt.media):
            kind = IMAGE if isinstance(item, PreparedImage) else AUDIO if isinstance(item, PreparedAudio) else VIDEO
            encode = partial(self._soft, item)
            soft[kind].extend(pool.soft_tokens(self.model, held.media[i], encode) if cached else encode())
        return merge(self.model, ids, self.media_tokens, soft, self.config.pad_id, self.config.bidirectional_vision)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int | None = None, temperature: float = 0.0,
                     draft: Draft | None = None, **sampling: Any) -> list[int]:
        """The new token ids (the prompt is not repeated), using the KV cache. `max_tokens`, as the
        other methods name it, may stand for `max_new_tokens` (transformers' name; 16 if neither)."""
        self._check_ids(prompt_ids)
        self._inputs(Prompt(list(prompt_ids)))  # media placeholders (no media here): merge names them
        options = {"temperature": temperature, **sampling}
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        elif "max_tokens" not in options:
            options["max_tokens"] = 16
        params = params_from_options(options)
        if params.stop:  # (they had been ignored: ids are cut by ids)
            raise ValueError("generate_ids matches no stop strings, which are text: give stop_token_ids, "
                             "or use generate/stream")
        return list(self.token_stream(list(prompt_ids), params, draft=draft))

    def token_stream(self, ids: list[int], params: SamplingParams, *, embeds: torch.Tensor | None = None,
                     vision_blocks: torch.Tensor | None = None, control: OutputControl | None = None,
                     draft: Draft | None = None, held: Held | None = None):
        """Generated token ids; the generator returns the finish reason. With `draft` (a
        gemma4_assistant drafter or its folder), decoding is speculative: the same tokens when
        greedy, the same distribution when sampling. The cache comes from `prompt_cache` (`held`:
        the prompt's ids with their media placeholders and items, where `ids` has pads there;
        with `embeds` and no `held`, caching is off for this generation)."""
        caching = None  # merged embeddings without `held` say nothing of their media: not cached
        if self.prompt_cache.capacity and (held is not None or embeds is None):
            caching = Caching(self.prompt_cache, held if held is not None else Held(list(ids)))
        seen = held.ids if held is not None else None  # the penalties count placeholders, as transformers'
        if draft is None:
            return generate_step(self.model, ids, params, stop_ids=self.stop_ids(params), embeds=embeds,
                                 vision_blocks=vision_blocks, control=control, caching=caching, seen_prompt=seen)
        from .speculative import speculative_generate_step

        return speculative_generate_step(self.model, self.load_draft(draft), ids, params, stop_ids=self.stop_ids(params),
                                         embeds=embeds, vision_blocks=vision_blocks, control=control, caching=caching,
                                         seen_prompt=seen)

    def held(self, prompt: Prompt, pool: PromptCache | None = None) -> Held:
        """What prompt caching compares of `prompt`: its ids and its media items' content (not
        hashed where `pool`, by default this LLM's prompt cache, is off)."""
        if not (pool if pool is not None else self.prompt_cache).capacity:
            return Held(list(prompt.ids))
        return Held.prompt(prompt.ids, prompt.media, self.media_tokens)

    def load_draft(self, draft: Draft) -> Assistant:
        """A drafter for this model, checked against it: a folder or GGUF is loaded onto the model's
        device and dtype (load it once and pass the result when generating repeatedly)."""
        from .model.assistant import Assistant, check_pairing

        if not isinstance(draft, Assistant):
            from .loading.assistant import load_assistant

            draft = load_assistant(draft, dtype=self.model.dtype, device=self.model.device)
        check_pairing(draft.config, self.config)
        if draft.device != self.model.device:  # (torch had failed deep in the first draft: "same device")
            raise ValueError(f"the drafter is on {draft.device}, the model on {self.model.device}: load it onto "
                             "the model's device (or give its path)")
        return draft

    # -- text ----------------------------------------------------------------------------------

    def generate(self, prompt: str | Messages, **sampling: Any) -> str:
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str | Messages, *, enable_thinking: bool = False, image_tokens: int | None = None,
               tools: list | None = None, grammar=None, loop_guard: LoopGuardConfig | str | bool | None = None,
               draft: Draft | None = None, **sampling: Any) -> "TextStream":
        """UTF-8-safe text pieces (a `TextStream`: its `finish_reason`, "stop", "length" or
        "loop", is set once it is used up). A string is continued as raw text (BOS prepended); a
        list of messages (text, image, audio and video parts) is rendered with the model's chat
        template, with `tools` (OpenAI-style function declarations) declared to the model; the
        reply's calls come back in its text (`chat.parse_reply` splits them out).
        `grammar` (a `constrain.Grammar`) constrains the answer (after any thinking);
        `loop_guard` ("recover", "stop", "off", True, False or a LoopGuardConfig; off by default
        here, on by default in the CLI and server) catches degenerate repetition inside the
        engine; `draft` decodes speculatively (see `token_stream`). Stop strings (`stop=`) match
        this raw text, thinking and markers included; `stream_reply` (and the server) match the
        answer only."""
        params = params_from_options(sampling)
        if grammar is not None and not isinstance(grammar, Grammar):
            raise _not_a_grammar(grammar)
        prompt_ = self.build_prompt(prompt, enable_thinking=enable_thinking, image_tokens=image_tokens, tools=tools)
        state = self.grammar_state(grammar, params, thinking=enable_thinking) if grammar is not None else None
        return self.stream_prompt(prompt_, params, grammar=state, loop_guard=loop_guard, draft=draft)

    def grammar_state(self, grammar, params: SamplingParams, thinking: bool = False):
        """A fresh `constrain.GrammarState` for one generation of this model."""
        from .constrain import GrammarState

        opens = self.tokenizer.token_to_id("<|channel>") if thinking and self.config.family == "gemma4" else None
        closes = self.tokenizer.token_to_id("<channel|>") if opens is not None else None
        ends = tuple(sorted(set(self.config.eos_ids) | set(self.tokenizer.eos_ids)))
        return GrammarState(grammar, self.tokenizer, self.config.vocab_size, ends, opens_with=opens,
                            start_after=closes)

    def output_control(self, grammar=None,
                       loop_guard: LoopGuardConfig | str | bool | None = None) -> OutputControl:
        """One generation's grammar (a `GrammarState`) and loop guard, as the engines drive them."""
        return OutputControl(grammar, make_loop_guard(loop_guard, constrained=grammar is not None),
                             piece=lambda t: self.tokenizer.decode([t]), number_ids=self.number_ids)

    @cached_property
    def number_ids(self) -> frozenset[int]:
        """The tokens "0" to "9", ".", "e", "E", "+" and "-" (Gemma's tokenizers split numbers
        into digits), and their byte-fallback twins ("<0x65>" decodes to "e" too: sampled, it got
        past the cap on run-on numbers)."""
        ids = [self.tokenizer.encode(c, add_bos=False) for c in NUMBER_CHARS]
        twins = (self.tokenizer.token_to_id(f"<0x{ord(c):02X}>") for c in NUMBER_CHARS)
        return frozenset([i[0] for i in ids if len(i) == 1] + [i for i in twins if i is not None])

    def build_prompt(self, prompt: str | Messages, *, enable_thinking: bool = False,
                     image_tokens: int | None = None, tools: list | None = None) -> Prompt:
        if isinstance(prompt, str):
            if tools is not None:
                raise ValueError("tools are declared in a chat: give a list of messages, not a string")
            return Prompt(self.tokenizer.encode(prompt, add_bos=True))
        self.check_tools(tools)
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"a prompt is a string or a list of chat messages, not {type(prompt).__name__}")
        if not prompt:  # (a template renders [] as a bare generation prompt)
            raise ValueError("the chat has no messages: give at least one")
        from .processing.prompt import collect_media, expand

        messages, media = collect_media(prompt)
        for kind in dict.fromkeys(kind for kind, _ in media):  # before any template sees the parts
            self.check_media(kind)
        text = self.render_chat(messages, enable_thinking=enable_thinking, tools=tools)
        if not media:
            return Prompt(self.tokenizer.encode(text, add_bos=False))
        prepared = tuple(self.prepare_media(kind, source, image_tokens) for kind, source in media)
        ids = expand(text, list(prepared), lambda t: self.tokenizer.encode(t, add_bos=False), self.media_tokens,
                     self.config.family)
        return Prompt(ids, prepared)

    def encode_prompt(self, prompt: str | Messages, *, enable_thinking: bool = False) -> list[int]:
        """Prompt ids (text only; use `build_prompt` for prompts with media)."""
        built = self.build_prompt(prompt, enable_thinking=enable_thinking)
        if built.media:
            raise ValueError("this prompt has media parts: use build_prompt()")
        return built.ids

    def tool_grammar(self, tools: list[dict], *, only: str | None = None, text_first: bool = False) -> Grammar:
        """`Grammar.tool_calls` in this vocabulary: the answer is one call or more of `only` (or of
        any of `tools`), or with `text_first` free text and then any calls; each call's
        arguments follow its function's parameters. For `stream_reply(..., tools=True)`."""
        self.check_tools(tools)
        functions = [t.get("function", t) if isinstance(t, dict) else None for t in tools or ()]
        for fn in functions:
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and chat.TOOL_NAME.fullmatch(fn["name"])
                    and isinstance(fn.get("parameters") or {}, dict)):
                raise ValueError("each tool must be {type: function, function: {name, parameters?}} with a name of "
                                 "1-64 letters, digits, '_', '.' or '-'")
        if not functions:
            raise ValueError("no tools to call")
        if only is not None and only not in [fn["name"] for fn in functions]:
            raise ValueError(f"no tool is named {only!r}")
        ids = {m: self.tokenizer.token_to_id(m) for m in chat.MARKERS}
        for marker in (chat.CALL_OPEN, chat.CALL_CLOSE, chat.QUOTE, chat.RESPONSE_OPEN):
            if ids[marker] is None:
                raise ValueError(f"the vocabulary has no {marker} token: tool calls cannot be constrained")
        return Grammar.tool_calls(functions, {m: i for m, i in ids.items() if i is not None}, only, text_first)

    def check_tools(self, tools: list | None) -> None:
        """Tools are declared in Gemma 4's chat format only (Gemma 3 has none)."""
        if tools and self.config.family != "gemma4":
            raise ValueError("tools need a Gemma 4 model")

    def render_chat(self, messages: Messages, *, enable_thinking: bool = False, tools=None,
                    add_generation_prompt: bool = True) -> str:
        """The checkpoint's own template (sandboxed) when it ships one, its "tool_use" one for a
        prompt with tools where it names one (as transformers picks); otherwise ours."""
        template = self.info.tool_template if tools is not None and self.info.tool_template else self.info.chat_template
        if template is None and self.info.tool_template is not None:
            raise chat.ChatTemplateError("the checkpoint's chat templates are named but none is \"default\": only "
                                         "its \"tool_use\" one, for prompts with tools")
        if template:
            return chat.render_template(template, messages, add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking, tools=tools)
        if self.config.family == "gemma3":
            return chat.render_gemma3(messages, add_generation_prompt=add_generation_prompt)
        return chat.render_gemma4(messages, add_generation_prompt=add_generation_prompt,
                                  enable_thinking=enable_thinking, tools=tools)

    @property
    def has_chat_template(self) -> bool:
        return self.info.chat_template is not None or self.info.tool_template is not None

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The ids that end a generation; and the check that params' ids (stop_token_ids,
        logit_bias) are inside the vocabulary, each error naming its field."""
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [i for i, _ in params.logit_bias])):
            try:
                check_token_ids(ids, self.config.vocab_size)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if params.ignore_eos:
            return frozenset(params.stop_token_ids)
        return frozenset(self.config.eos_ids) | frozenset(self.tokenizer.eos_ids) | frozenset(params.stop_token_ids)

    def stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        yield from self.stream_prompt(Prompt(list(ids)), params)

    def stream_prompt(self, prompt: Prompt, params: SamplingParams, grammar=None,
                      loop_guard: LoopGuardConfig | str | bool | None = None,
                      draft: Draft | None = None) -> "TextStream":
        """Text pieces of one generation; the returned iterator's `finish_reason` is set when it
        ends ("stop", "length" or "loop")."""
        _check_prompt_and_params(prompt, params)
        control = self.output_control(self._state_of(grammar, prompt, params), loop_guard)
        return TextStream(self._stream_pieces(prompt, params, control, draft), control)

    def stream_reply(self, prompt: Prompt, params: SamplingParams, grammar=None,
                     loop_guard: LoopGuardConfig | str | bool | None = None, draft: Draft | None = None,
                     tools: bool = False) -> "TextStream":
        """A chat reply as `reply.Delta`s: the answer, Gemma 4's reasoning and (with `tools`) its
        tool calls apart, as the server sends them; the iterator's `finish_reason` as in
        `stream_prompt`."""
        _check_prompt_and_params(prompt, params)
        control = self.output_control(self._state_of(grammar, prompt, params), loop_guard)
        return TextStream(self._reply_deltas(prompt, params, control, draft, tools), control)

    def _state_of(self, grammar, prompt: Prompt, params: SamplingParams):
        """A Grammar made into its state as `stream` makes it (stream_prompt/stream_reply had
        failed on it); thinking is on where the prompt's <|think|> turned it on."""
        if isinstance(grammar, Grammar):
            think = self.tokenizer.token_to_id("<|think|>")
            return self.grammar_state(grammar, params, thinking=think is not None and think in prompt.ids)
        if grammar is not None and not isinstance(grammar, GrammarState):
            raise _not_a_grammar(grammar)
        return grammar

    def _prompt_tokens(self, prompt: Prompt, params: SamplingParams, control: OutputControl, draft):
        """The token ids of one generation from `prompt` (its media encoded, or their soft tokens
        kept by the prompt cache), as `token_stream` yields them."""
        held = self.held(prompt)
        text_ids, embeds, blocks = self._inputs(prompt, held, self.prompt_cache)
        return self.token_stream(text_ids.tolist(), params, embeds=embeds, vision_blocks=blocks,
                                 control=control, draft=draft, held=held)

    def _reply_deltas(self, prompt: Prompt, params: SamplingParams, control: OutputControl, draft, tools: bool):
        from .reply import ReplyStream

        reply = ReplyStream(self.tokenizer, stop=params.stop, tools=tools)
        grammar = control.grammar
        tokens = self._prompt_tokens(prompt, params, control, draft)
        while not reply.done:  # a stop string or the tool-response marker ends it early
            try:
                yield reply.push(next(tokens))
            except StopIteration as done:
                tail = reply.finish()
                yield tail
                # a stop string in the text of a call it ended inside
                return _under_grammar(grammar, tail.done or done.value, cut=tail.done is not None)
        tokens.close()
        yield reply.finish()
        return _under_grammar(grammar, "stop", cut=True)

    def _stream_pieces(self, prompt: Prompt, params: SamplingParams, control: OutputControl, draft):
        decoder = IncrementalDecoder(self.tokenizer)
        pending = ""  # text held back because it may be the start of a stop string
        hold = max((len(s) for s in params.stop), default=0)
        grammar = control.grammar
        tokens = self._prompt_tokens(prompt, params, control, draft)
        # Stop strings are matched on text, so token-level max_tokens still bounds the work.
        while True:
            try:
                token = next(tokens)
            except StopIteration as done:
                reason = done.value
                break
            pending += decoder.push(token)
            if params.stop:
                cut = _find_stop(pending, params.stop)
                if cut is not None:
                    if pending[:cut]:
                        yield pending[:cut]
                    return _under_grammar(grammar, "stop", cut=True)
                safe = len(pending) - (hold - 1)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            elif pending:
                yield pending
                pending = ""
        pending += decoder.flush()
        cut = _find_stop(pending, params.stop) if params.stop else None
        if cut is not None:
            pending, reason = pending[:cut], "stop"
        if pending:
            yield pending
        return _under_grammar(grammar, reason, cut=cut is not None)

    def _check_ids(self, ids: list[int]) -> None:
        check_token_ids(ids, self.config.vocab_size)


def _media_list(media: Any) -> list:
    """One path (or bytes, or an image) is one medium, not a sequence of characters."""
    if media is None:
        return []
    return list(media) if isinstance(media, (list, tuple)) else [media]


# What a generation under a grammar ends with where its answer does not parse (GrammarState.
# answer_cut): reported as "length", as the server reports it.
GRAMMAR_CUT = "grammar cut"


def _under_grammar(grammar, reason: str | None, cut: bool) -> str | None:
    """`reason`, or GRAMMAR_CUT for a "stop" that leaves the grammar's answer unfinished or cut."""
    return GRAMMAR_CUT if reason == "stop" and grammar is not None and grammar.answer_cut(cut) else reason


class TextStream:
    """An iterator of text pieces that remembers why its generation ended: `finish_reason`,
    `grammar_cut` where a stop string or stop token cut a constrained answer ("length"), and
    `loop_recoveries`, the loops the guard cut and resampled past (the text went on after them)."""

    def __init__(self, pieces, control: OutputControl | None = None):
        self._pieces = pieces
        self._control = control
        self.finish_reason: str | None = None
        self.grammar_cut = False

    def close(self) -> None:
        """End the generation early (as a generator's close: LLM.stream had been one)."""
        self._pieces.close()

    @property
    def loop_recoveries(self) -> int:
        guard = self._control.guard if self._control is not None else None
        return guard.recoveries if guard is not None else 0

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as done:
            self.grammar_cut = done.value == GRAMMAR_CUT
            self.finish_reason = "length" if self.grammar_cut else done.value
            raise


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
