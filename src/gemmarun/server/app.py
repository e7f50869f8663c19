"""The Starlette app: routes, authentication, the request limits, errors, SSE and the request log."""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..chat import BrokenTemplate
from ..constrain import Grammar, GrammarError
from ..generate import ContextOverflow, check_token_ids
from ..llm import LLM, Prompt
from ..processing.image import MAX_PIXELS
from ..sampling import SamplingParams
from . import inputs
from .generation import Generation
from .protocol import (
    ApiError,
    Envelope,
    bad,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
    sampling_params,
    sse,
)
from .scheduler import EngineFailed, QueueFull, Scheduler

log = logging.getLogger("gemmarun.server")
MEDIA_DECODERS = 2  # requests whose images and audio are decoded at the same time

MAX_BODY_BYTES = 32 * 1024 * 1024
# A request's body is not read any further after these answers: the connection closes with them.
_CLOSE = {"Connection": "close"}


@dataclass
class ServerOptions:
    """Everything `gemmarun serve` sets; the limits are documented in the package docstring."""

    model_name: str | None = None  # default: the model's file or folder name
    api_key: str | None = None
    # Web pages of other origins allowed to call the API (CORS), e.g. "http://localhost:3000"; "*": any.
    # Others are refused: any page the user opens could otherwise make the browser POST to it.
    allow_origins: tuple[str, ...] = ()
    allow_local_files: bool = False
    max_body_bytes: int = MAX_BODY_BYTES  # 413 past it
    max_batch: int = 8  # requests decoded together
    prompt_caches: int = 4  # finished requests' KV caches kept for prompts that start the same way (0: off)
    max_queue: int = 64  # requests waiting for a batch slot; more get 429
    context: int | None = None  # default: the model's
    default_max_tokens: int = 4096  # when a request gives none
    max_tokens_limit: int | None = None  # the most a request may ask for (400 past it); None: the context
    max_image_pixels: int = 50_000_000  # width x height of each image, checked from its header
    max_audio_seconds: float = 600.0  # all of one request's audio together
    body_timeout: float = 60.0  # seconds to receive a whole request body (408 past it)
    header_timeout: float = 30.0  # seconds a connection may go without sending a complete request head
    max_connections: int = 512  # open connections, idle ones included (503 past it)
    log_prompts: bool = False  # log prompt and reply text (never logged otherwise)
    loop_guard: str = "recover"  # recover | stop | off: what to do when a reply falls into a loop
    sampling: dict = field(default_factory=dict)  # overrides protocol.SAMPLING_DEFAULTS

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_batch", "default_max_tokens", "max_image_pixels", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerOptions.{name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_audio_seconds", "body_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerOptions.{name} must be positive, not {getattr(self, name)}")
        for name in ("max_queue", "prompt_caches"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerOptions.{name} must be at least 0, not {getattr(self, name)}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"ServerOptions.max_tokens_limit must be at least 1, not {self.max_tokens_limit}")
        if self.max_image_pixels > MAX_PIXELS:
            raise ValueError(f"ServerOptions.max_image_pixels is over the runtime's own cap ({MAX_PIXELS} pixels)")
        for origin in self.allow_origins:
            if not is_origin(origin):
                raise ValueError(f"allowed origin {origin!r} is not '*', 'null' or scheme://host[:port] (no path)")

    @property
    def media_limits(self) -> inputs.MediaLimits:
        return inputs.MediaLimits(self.max_image_pixels, self.max_audio_seconds)


def is_origin(text: str) -> bool:
    """An Origin header's form (RFC 6454): "null", or scheme://host[:port] with nothing after."""
    from urllib.parse import urlsplit

    if text in ("*", "null"):
        return True
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return False
    return bool(parts.scheme and parts.hostname) and not (parts.path or parts.query or parts.fragment
                                                          or parts.username or parts.password)


def _host_name(host: str) -> str | None:
    """The name in a Host header ("[::1]:8080" -> "::1", "localhost.:80" -> "localhost"), lower
    case; None if malformed."""
    from urllib.parse import urlsplit

    try:
        name = urlsplit("//" + host).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def _bare_origin(origin: str) -> str:
    """An origin without its scheme's default port, lower case, as browsers send it."""
    origin = origin.lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme):
            return origin.removesuffix(port)
    return origin


def _same_origin(origin: str, host: str) -> bool:
    """Whether a page of `origin` is served by this Host: the names and ports agree (the scheme
    is left out: a proxy that ends TLS sends https pages' requests to us over http)."""
    def bare(netloc: str) -> str:
        return netloc.removesuffix(":80").removesuffix(":443")

    _scheme, sep, netloc = origin.partition("://")
    return bool(sep) and bare(netloc) == bare(host)


@functools.cache
def _own_names() -> frozenset[str]:
    """This machine's names (a lookup: once, not on the event loop for every request)."""
    import socket

    return frozenset(n.lower().rstrip(".") for n in (socket.gethostname(), socket.getfqdn()))


def _ip(text: str | None):
    """`text` as an IP address (IPv4-mapped IPv6 as the IPv4 it carries), or None."""
    import ipaddress

    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def _loopback_address(text: str) -> bool:
    """Whether a connection came in on a loopback address ("::ffff:127.0.0.1" on a "::" socket)."""
    address = _ip(text)
    return address is not None and address.is_loopback


def _local_host_name(name: str | None) -> bool:
    """A Host naming this machine: localhost, a loopback or unspecified address (0.0.0.0, as
    `serve --host 0.0.0.0` prints its URL), or the machine's own name."""
    if name is None:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _ip(name)
    if address is not None:
        return address.is_loopback or address.is_unspecified
    return name in _own_names()  # (reached through 127.0.1.1, say)


class _BrowserGuard:
    """Pure ASGI middleware, outermost, against the web pages the user happens to open.

    A browser lets any page POST to a local server (a text/plain body needs no CORS preflight),
    and a name the attacker re-points at 127.0.0.1 (DNS rebinding) makes the page same-origin.
    Browsers send Origin with such requests: one from another origin gets 403 unless listed in
    `allow_origins` (which also get CORS headers and preflight answers); a same-origin one that
    came in on a loopback address must name this machine, unless its origin is listed (a proxy
    on this machine that keeps the public Host). Clients that are no browser (curl, the SDKs)
    send no Origin, and pass."""

    def __init__(self, app, allow_origins: tuple[str, ...]) -> None:
        self.app, self.any = app, "*" in allow_origins
        self.allowed = frozenset(_bare_origin(o) for o in allow_origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = _bare_origin(headers.get(b"origin", b"").decode("latin-1"))
        if not origin:
            return await self.app(scope, receive, send)
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if _same_origin(origin, host):
            server = scope.get("server")
            if (server and _loopback_address(server[0]) and not _local_host_name(_host_name(host))
                    and origin not in self.allowed):
                error = ApiError(403, f"a browser request for host {host!r} on a loopback address was refused "
                                      "(a DNS-rebinding attempt?): open the server as localhost or 127.0.0.1, or "
                                      f"start it with --allow-origin {origin} (a proxy that keeps this Host)",
                                 code="host_not_allowed")
                return await _error_response(error, _CLOSE)(scope, receive, send)
            return await self.app(scope, receive, send)
        if not (self.any or origin in self.allowed):
            error = ApiError(403, f"a request from the web page origin {origin!r} was refused: start the server with "
                                  f"--allow-origin {origin} to let that page use it", code="origin_not_allowed")
            return await _error_response(error, _CLOSE)(scope, receive, send)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:  # a preflight
            asked = headers.get(b"access-control-request-headers", b"authorization, content-type")
            await send({"type": "http.response.start", "status": 204, "headers": [
                *cors, (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", asked), (b"access-control-max-age", b"600")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class ServerStopping(Exception):
    """The server shut down while the request's body was still coming."""


@dataclass
class OpenRequests:
    """POST /v1/* requests being answered: from their head to the end of their reply; and the
    waits for a body's next piece, which a shutdown ends (`stop`)."""

    n: int = 0
    uploads: set = field(default_factory=set)  # anyio.CancelScope of each wait
    stopping: bool = False

    def stop(self) -> None:
        """Ends every wait for a body with ServerStopping (a 503): left to uvicorn, an upload in
        progress ran on for its graceful timeout and was then cancelled, a plain-text 500."""
        self.stopping = True
        for scope in list(self.uploads):
            scope.cancel()


class _Guard:
    """Pure ASGI middleware, in front of everything that reads a body: the bearer-key check on
    /v1/*; the cap on requests in flight (POST /v1/*: at most the scheduler's capacity, so bodies
    past it are never read; 429); the body limit, enforced on the declared length and again while
    the body is read (chunked uploads), so an oversize body is never buffered (413); and the time
    a client may take to send its body (408)."""

    def __init__(self, app, api_key: str | None, limit: int, capacity: int, body_timeout: float,
                 counter: OpenRequests) -> None:
        self.app, self.key, self.limit = app, api_key.encode() if api_key else None, limit
        self.capacity, self.body_timeout, self.counter = capacity, body_timeout, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                 code="invalid_api_key")
                return await _error_response(error, {"WWW-Authenticate": "Bearer", **_CLOSE})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error_response(_too_large(self.limit), _CLOSE)(scope, receive, send)
        counted = scope["method"] == "POST" and scope["path"].startswith("/v1/")
        if counted and self.counter.n >= self.capacity:
            return await _error_response(busy(self.counter.n, self.capacity), _CLOSE)(scope, receive, send)
        seen, done = 0, False
        deadline = time.monotonic() + self.body_timeout

        async def limited():
            nonlocal seen, done
            if done:  # the body is in: from here on only a disconnect can come, whenever it does
                return await receive()
            with anyio.CancelScope() as upload:
                if self.counter.stopping:
                    upload.cancel()
                self.counter.uploads.add(upload)
                try:
                    with anyio.move_on_after(max(deadline - time.monotonic(), 0)):
                        message = await receive()
                        if message["type"] == "http.request":
                            seen += len(message.get("body", b""))
                            if seen > self.limit:
                                raise BodyTooLarge
                            done = not message.get("more_body", False)
                        else:
                            done = True
                        return message
                finally:
                    self.counter.uploads.discard(upload)
            if upload.cancel_called:
                raise ServerStopping
            raise BodyTimeout

        self.counter.n += counted
        try:
            await self.app(scope, limited, send)
        finally:
            self.counter.n -= counted


def busy(in_flight: int, capacity: int) -> ApiError:
    return ApiError(429, f"the server is busy: {in_flight} requests in flight (limit {capacity})", code="queue_full",
                    headers={"retry-after": "1"})  # the OpenAI SDK waits that long before its retry


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the {limit / (1024 * 1024):g} MiB limit",
                    code="request_too_large")


def _error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={**error.headers, **(headers or {})})


class SSEResponse:
    """Streams `chunks` as text/event-stream; stops at once when the client disconnects, and
    always runs `on_close` (which frees the request's slot). An error after the stream began is
    sent in-band as `data: {"error": ...}`."""

    headers = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no"))

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": list(self.headers)})
            async with anyio.create_task_group() as tg:
                async def pump() -> None:
                    try:
                        try:
                            async for chunk in self.chunks:
                                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        except Exception as e:
                            error = e if isinstance(e, ApiError) else ApiError(500, _one_line(e))
                            if not isinstance(e, (ApiError, EngineFailed)):
                                log.exception("stream failed")
                            await send({"type": "http.response.body", "body": sse(error.body()), "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # the client went away while we wrote
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(pump)
                await _wait_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.chunks.aclose()
            self.on_close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _api_error(e: Exception) -> ApiError:
    """Any error as the API reports it (unexpected ones are logged with their traceback)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineFailed):
        return ApiError(e.status, str(e))
    if isinstance(e, ContextOverflow):
        return bad(str(e), "messages", "context_length_exceeded")
    if isinstance(e, BrokenTemplate):  # the model's template, not the request: as llama.cpp's server, a 500
        return ApiError(500, str(e))
    if isinstance(e, ValueError):  # the runtime's media, template and input errors: one line
        return inputs.media_error(e)
    log.error("unhandled error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}")


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
    """Runs `work` while watching the (already read) request for a disconnect; returns
    (result, disconnected). Exceptions from `work` propagate unwrapped."""
    box: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            await _wait_disconnect(request.receive)
            box["gone"] = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            box["result"] = await work()
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the task group
            box["error"] = e
        tg.cancel_scope.cancel()
    if "error" in box:
        raise box["error"]
    return box.get("result"), "gone" in box and "result" not in box


def create_app(llm: LLM, options: ServerOptions | None = None, *, engine=None, drafter=None) -> Starlette:
    """The ASGI app. `engine` replaces the BatchEngine (tests script one); `drafter` (a loaded
    gemma4_assistant) makes a request that decodes alone speculative."""
    opts = options or ServerOptions()
    path = llm.info.path
    name = opts.model_name or (path.stem if path.suffix == ".gguf" else path.name)
    scheduler = Scheduler(llm, max_batch=opts.max_batch, max_queue=opts.max_queue, context=opts.context,
                          engine=engine, drafter=drafter, prompt_caches=opts.prompt_caches)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    limits = opts.media_limits
    # Media is decoded a few requests at a time, so a burst of large images or long audio cannot
    # hold more than this many decoded copies at once (text-only prompts skip the queue).
    media_slots = anyio.CapacityLimiter(MEDIA_DECODERS)
    open_requests = OpenRequests()

    async def read_json(request: Request) -> dict:
        return parse_json(await request.body())

    def past_context(tokens: str, param: str) -> ApiError:
        return bad(f"this model's maximum context length is {scheduler.context} tokens; the prompt has {tokens} "
                   "tokens", param, "context_length_exceeded")

    def fit(prompt: Prompt, params, given: bool, param: str = "messages"):
        """The request's params with max_tokens checked (given) or capped (defaulted); `param`
        names the prompt's field in errors."""
        n = len(prompt.ids)
        if n >= scheduler.context:
            raise past_context(f"{n}", param)
        try:
            llm.stop_ids(params)  # stop_token_ids and logit_bias inside the vocabulary
        except ValueError as e:
            raise bad(str(e), str(e).split(":", 1)[0]) from None
        limit = scheduler.context if opts.max_tokens_limit is None else opts.max_tokens_limit
        if given and params.max_tokens > limit:
            shown = params.max_tokens if params.max_tokens < 10**12 else f"a {len(str(params.max_tokens))}-digit number"
            raise bad(f"max_tokens is too large: {shown}; this server allows at most {limit}", "max_tokens")
        # prompt + reply never past the context, given or not (the engines stop there too), so
        # max_tokens and usage say what the reply can hold
        room = scheduler.context - n
        cap = room if opts.max_tokens_limit is None else min(room, opts.max_tokens_limit)
        return replace(params, max_tokens=min(params.max_tokens, cap))

    def submit(prompt: Prompt, params, top_logprobs, control):
        try:
            return scheduler.submit(prompt, params, top_logprobs, control)
        except QueueFull:
            raise busy(scheduler.in_flight, scheduler.capacity) from None

    async def run(request: Request, gen: Generation, stream: bool, respond: Callable[[Generation], Response]):
        """Submit, then either stream SSE chunks or answer once; the job is closed either way."""
        started = time.monotonic()
        if opts.log_prompts:
            log.info("%s prompt: %r", gen.env.id, llm.tokenizer.decode(gen.prompt.ids))
        job = submit(gen.prompt, gen.params, gen.top_logprobs, gen.control)

        def close(outcome: str) -> None:
            if not job.closed:
                job.close()
                _log_request(gen, outcome, time.monotonic() - started, opts.log_prompts)

        try:
            first, gone = await _unless_disconnected(request, job.next_events)  # errors keep their status
            if gone:
                close("client gone")
                return Response(status_code=499)
            if stream:
                return SSEResponse(gen.chunks(job, first),
                                   lambda: close("streamed" if gen.finish_reason else "client gone"))
            _, gone = await _unless_disconnected(request, lambda: gen.collect(job, first))
            close("client gone" if gone else "answered")
            return Response(status_code=499) if gone else respond(gen)
        except BaseException as e:
            close(f"failed: {type(e).__name__}")
            raise

    def check_length(text: Any, param: str, tools: Any = None) -> None:
        """Refuse a prompt that cannot fit before rendering and tokenizing it: tokenizing holds the
        GIL, so a 30 MiB message (or tool description, or 300k empty messages) had stalled every
        stream and /health for ~20 s to learn it was too long."""
        fewest = inputs.fewest_tokens(text, tools, llm.tokenizer.longest_piece)
        if fewest >= scheduler.context:
            raise past_context(f"at least {fewest}", param)

    async def build_off_loop(build: Callable[[], Prompt], has_media: bool) -> Prompt:
        return await anyio.to_thread.run_sync(build, limiter=media_slots if has_media else None)

    async def output_control(grammar: Grammar | None, params: SamplingParams, thinking: bool = False,
                             given_by: str = "response_format.json_schema.schema"):
        """The request's loop guard and grammar (`given_by`: the request's field it comes from).
        The grammar's tokenizer view is built on first use (seconds for a 262k vocabulary): off
        the loop."""
        try:
            state = grammar and await anyio.to_thread.run_sync(
                lambda: llm.grammar_state(grammar, params, thinking=thinking))
        except GrammarError as e:  # a schema no text satisfies
            raise bad(str(e), given_by) from None
        return llm.output_control(state, opts.loop_guard)

    async def tool_grammar(req) -> Grammar | None:
        """The answer's grammar where tool_choice forces a call (every call's arguments follow
        its parameters) or a function is strict (its calls' arguments do, as OpenAI applies
        `strict` function by function)."""
        if req.calls is None or not req.calls.constrained:
            return None
        if req.calls.only is not None:  # the named function alone (another's schema does not matter)
            tools = [tool for tool in req.tools if tool["function"]["name"] == req.calls.only]
        elif req.calls.required:
            tools = req.tools
        else:
            tools = [tool if tool["function"].get("strict") is True else
                     {"function": {"name": tool["function"]["name"], "parameters": {}}} for tool in req.tools]
        try:  # (a large schema takes a while to compile: off the loop)
            return await anyio.to_thread.run_sync(
                lambda: llm.tool_grammar(tools, only=req.calls.only, text_first=not req.calls.required))
        except ValueError as e:  # a vocabulary without the tool markers; a schema llguidance refuses
            raise bad(str(e), "tool_choice" if req.calls.required else "tools") from None

    async def chat(request: Request) -> Response:
        req = parse_chat(await read_json(request), opts.default_max_tokens, opts.sampling)
        check_length(req.messages, "messages", req.tools)

        def build() -> Prompt:
            messages = inputs.prepare_messages(req.messages, opts.allow_local_files, limits)
            return inputs.build_prompt(llm, messages, thinking=req.thinking, tools=req.tools,
                                       image_tokens=req.image_tokens, max_audio_seconds=limits.max_audio_seconds)

        prompt = await build_off_loop(build, inputs.has_media(req.messages))
        grammar, given_by = (req.grammar, "response_format.json_schema.schema") if req.grammar else (
            await tool_grammar(req), "tools")
        gen = Generation.chat(llm, Envelope(new_id("chatcmpl"), name, "chat.completion.chunk"), prompt,
                              fit(prompt, req.params, req.max_tokens_given), req,
                              await output_control(grammar, req.params, req.thinking, given_by))
        return await run(request, gen, req.stream, lambda g: JSONResponse(g.chat_response()))

    async def completions(request: Request) -> Response:
        req = parse_completion(await read_json(request), opts.default_max_tokens, opts.sampling)
        if isinstance(req.prompt, str):
            check_length(req.prompt, "prompt")
            try:
                prompt = await anyio.to_thread.run_sync(lambda: llm.build_prompt(req.prompt))
            except ValueError as e:  # e.g. a lone surrogate
                raise bad(_one_line(e), "prompt") from None
        else:
            if len(req.prompt) >= scheduler.context:  # before a look at each of millions of ids
                raise past_context(f"{len(req.prompt)}", "prompt")
            try:
                check_token_ids(req.prompt, llm.config.vocab_size)
            except (TypeError, ValueError) as e:
                raise bad(str(e), "prompt") from None
            prompt = Prompt(list(req.prompt))
        gen = Generation.completion(llm, Envelope(new_id("cmpl"), name, "text_completion"), prompt,
                                    fit(prompt, req.params, req.max_tokens_given, "prompt"), req,
                                    await output_control(req.grammar, req.params))
        return await run(request, gen, req.stream, lambda g: JSONResponse(g.completion_response()))

    async def transcriptions(request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=16)
        except (BodyTooLarge, BodyTimeout, ServerStopping):  # the request guard's 413 / 408 / 503 (closing)
            raise
        except Exception as e:  # noqa: BLE001 - python-multipart's parse errors
            raise bad(f"the request is not valid multipart/form-data ({' '.join(str(e).split())})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad("'file' (the audio upload) is missing", "file")
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text"):
            raise bad(f"response_format {fmt!r} is not supported (json, text)", "response_format")
        if str(form.get("stream", "false")).lower() == "true":
            raise bad("streaming transcription is not supported", "stream")
        data = await upload.read()
        if not data:
            raise bad("the uploaded file is empty", "file")
        try:
            temperature = float(form.get("temperature") or 0.0)
        except ValueError:
            raise bad("'temperature' must be a number", "temperature") from None
        suffix = (upload.filename or "").rsplit(".", 1)[-1].lower()

        def build() -> Prompt:
            from ..cli import TRANSCRIBE_PROMPT

            audio = inputs.audio_input(data, suffix, "upload", "file", inputs.AudioBudget(limits.max_audio_seconds))
            messages = [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                     {"type": "text", "text": TRANSCRIBE_PROMPT}]}]
            try:
                return inputs.build_prompt(llm, messages, thinking=False, tools=None, image_tokens=None,
                                           max_audio_seconds=limits.max_audio_seconds)
            except (ApiError, ValueError) as e:  # what is wrong is the upload: the request has no messages
                error = _api_error(e)
                raise ApiError(error.status, error.message, param="file", code=error.code) from None

        prompt = await build_off_loop(build, True)
        params = fit(prompt, sampling_params({"temperature": temperature}, opts.default_max_tokens, opts.sampling)[0],
                     False)
        gen = Generation(llm, Envelope(new_id("tr"), name, "transcription"), prompt, params)
        if fmt == "text":
            return await run(request, gen, False, lambda g: PlainTextResponse(g.text()))
        return await run(request, gen, False, lambda g: JSONResponse({"text": g.text()}))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(name)]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != name:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(_model_card(name))

    async def health(request: Request) -> Response:
        engine = scheduler.engine
        return JSONResponse({"status": "ok", "model": name, "modalities": inputs.modalities(llm),
                             "active": len(engine.active), "waiting": len(engine.waiting),
                             "in_flight": scheduler.in_flight, "open_requests": open_requests.n,
                             "capacity": scheduler.capacity, "context": scheduler.context})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def http_error(request: Request, e: HTTPException) -> Response:
        status = e.status_code
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed"}.get(
            status, str(e.detail))
        return _error_response(ApiError(status, message), e.headers)  # 405's Allow

    async def too_large(request: Request, e: BodyTooLarge) -> Response:
        return _error_response(_too_large(opts.max_body_bytes), _CLOSE)

    async def too_slow(request: Request, e: BodyTimeout) -> Response:
        error = ApiError(408, f"the request body did not arrive within {opts.body_timeout:g} s", code="request_timeout")
        return _error_response(error, _CLOSE)

    async def stopping(request: Request, e: ServerStopping) -> Response:
        return _error_response(ApiError(503, "the server is shutting down"), _CLOSE)

    async def gone(request: Request, e: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client left while sending its body: nobody to answer

    async def error(request: Request, e: Exception) -> Response:
        return _error_response(_api_error(e))

    routes = [
        Route("/", index), Route("/health", health),
        Route("/v1/models", models), Route("/v1/models/{model:path}", model),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, BodyTooLarge: too_large, BodyTimeout: too_slow,
                            ServerStopping: stopping,
                            ClientDisconnect: gone, ApiError: error, EngineFailed: error, ValueError: error, Exception: error},
        lifespan=_lifespan(scheduler),
    )
    app.add_middleware(_Guard, api_key=opts.api_key, limit=opts.max_body_bytes, capacity=scheduler.capacity,
                       body_timeout=opts.body_timeout, counter=open_requests)
    app.add_middleware(_BrowserGuard, allow_origins=opts.allow_origins)  # added last: outermost
    app.state.scheduler = scheduler
    app.state.options = opts
    app.state.model_name = name
    app.state.open_requests = open_requests
    return app


def _log_request(gen: Generation, outcome: str, seconds: float, with_text: bool) -> None:
    """One line per request: its id, size, time and how it ended; its text only when asked for."""
    log.info("%s %s: %d prompt + %d completion tokens, %.2f s, finish %s", gen.env.id, outcome,
             len(gen.prompt.ids), gen.tokens, seconds, gen.finish_reason)
    if with_text:
        log.info("%s reply: %r", gen.env.id, gen.text())


def _lifespan(scheduler: Scheduler):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(scheduler.stop)

    return lifespan


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "gemmarun"}
