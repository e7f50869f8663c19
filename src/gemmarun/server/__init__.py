"""An OpenAI-compatible HTTP server for a loaded model (`gemmarun serve`), with a chat page at `/`.

Endpoints
    POST /v1/chat/completions      streaming (SSE) or not; text, image and audio content parts
    POST /v1/completions           raw continuation (no chat template)
    POST /v1/audio/transcriptions  multipart upload, as OpenAI's (response_format json or text;
                                   `prompt` and `language` are accepted and ignored)
    GET  /v1/models                the one loaded model
    GET  /health                   status, batch occupancy and queue size (no key needed)
    GET  /                         the chat page (no key needed; it asks for the key itself)

Requests follow OpenAI's API; `model` may name any model (a string): the loaded one answers, as
llama.cpp's server does. Content parts: `text`; `image_url` with a base64 data URL (paths and
`file://` URLs only when the server runs with --allow-local-files; remote URLs are never
fetched); `input_audio` `{data: base64, format}` with format wav, mp3, flac, ogg, opus, webm, mp4
or m4a (WebM/MP4 - what browsers record - is decoded with PyAV). Sampling: temperature, top_p,
seed, stop (string or list, cuts the answer), max_tokens / max_completion_tokens, presence_penalty,
frequency_penalty, logit_bias ({"token id": -100..100}), logprobs / top_logprobs (at most 20;
completions: logprobs 0-5), stream_options.include_usage.
Fields a request leaves out take temperature 1.0, top_p 0.95, top_k 64 (the Gemma cards'), and
max_tokens from --max-tokens (4096; completions too, as vLLM and llama.cpp's server do, not
OpenAI's 16), never past the context.

Extensions (extra JSON fields; with the openai client pass them in `extra_body`):
    top_k, min_p, repetition_penalty   more sampling controls (0 / 0.0 / 1.0 turn them off)
    ignore_eos                         keep generating past end-of-turn (benchmarks)
    stop_token_ids: [id, ...]          token ids that end the reply too (at most 256, in the vocabulary)
    thinking: true|false               Gemma 4 thinking; also `reasoning_effort` ("none" = off,
                                       "minimal"/"low"/"medium"/"high" = on; Gemma has no levels)
                                       and `chat_template_kwargs: {"enable_thinking": ...}`
    image_tokens: 70|140|280|560|1120  Gemma 4's soft-token budget of each image in this request
                                       (default: the model's, 280): more tokens see finer detail,
                                       cost more; Gemma 3 takes only its fixed 256 (400 otherwise)

Structured output: `response_format` {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema"}} constrains the answer (after any thinking; on /v1/completions
too, as llama.cpp's server takes it) with a grammar, so an answer that ends with finish_reason
"stop" always parses and validates (one cut short, by max_tokens, a stop string or the loop guard,
ends with "length"); a schema no text satisfies is a 400; "text" is free. A loop guard watches
every reply (--loop-guard recover, the default, rolls a degenerate repetition back and resamples;
stop ends the reply with finish_reason "stop", "length" inside a grammar, and `"stop_reason":
"loop"` in the choice; off): replies stream 64 tokens behind the model so a loop is cut before it
is sent. A request whose generation fails (a grammar that cannot go on) gets its error alone; the
other requests in the batch go on.

Replies: the thinking text comes back as `reasoning_content` (in the message, or in stream deltas),
never inside `content`. With `tools`, the model's tool-call syntax becomes OpenAI `tool_calls`
(finish_reason "tool_calls"; when streaming, one tool_calls delta per complete call); send results
back as `tool` messages. The reply ends where the model writes <|tool_response> to wait for them.
Tool names are 1-64 letters, digits, '_', '.' or '-', each given once. tool_choice "required" or
a named function makes the answer one call or more (of that function), every call's arguments
following its parameters; a function's `strict: true` makes its own calls follow them
(LLM.tool_grammar; bounds like lengths and patterns are not enforced). Special tokens never appear in the text. `usage` counts prompt tokens
(image and audio soft tokens included) and completion tokens (thinking included, also reported as
completion_tokens_details.reasoning_tokens).

Not supported (400): n > 1, best_of > 1, response_format other than text/json_object/json_schema,
response_format json with tools, parallel_tool_calls false, the deprecated
functions/function_call, completions `suffix`, `echo` with `stream`.
Other unknown fields are ignored.

Concurrency: one model thread runs continuous batching (`BatchEngine`): up to --max-batch requests
decode together, one token each per step, and new requests join between steps; a step prefills at
most 1024 positions of text prompts (batching.PREFILL_PER_STEP), so a long one is read in over
several steps while the others go on decoding (a prompt with media is read in at once). Up to
--max-queue more wait for a slot. A client that disconnects frees its slot at once (within a step
while its text prompt is read in). A streamed reply's
headers are sent when its first token is ready, so errors found while the request joins the batch
still get their status. A request that decodes alone takes the single-request path; with --draft (a
gemma4_assistant drafter) it decodes speculatively then (the same tokens when greedy, the same
distribution when sampling), each request switching speculation off when its rounds do not pay.

Limits (`ServerOptions` field, `gemmarun serve` flag, default), each refused with an OpenAI error:
    body size          max_body_bytes, --max-body-mb 32       413 request_too_large, from Content-Length
                                                              or while reading: never buffered past it
    body time          body_timeout, --body-timeout 60 s      408 request_timeout (a stalled upload)
    request head       header_timeout, --header-timeout 30 s  the connection is closed: a new or kept-alive
                                                              connection that sends no complete head in time
    connections        max_connections, --max-connections 512 503 too_many_connections, before the body is
                                                              read (idle ones count until their head timeout
                                                              closes them)
    requests in flight max_batch + max_queue, 8 + 64          429 queue_full (Retry-After: 1), counted from the
                                                              request head, so a body past the cap is never read
    image size         max_image_pixels, --max-image-mp 50    400 image_too_large, from the image's header
                                                              before any pixel is decoded (decompression bombs)
    audio length       max_audio_seconds, --max-audio-seconds 600   400 audio_too_long: all of a request's
                                                              audio, from headers (WebM/MP4 stop decoding past
                                                              it), and the decoded length again
    prompt             context, --context (the model's)       400 context_length_exceeded
    reply length       max_tokens_limit, --max-tokens-limit   400 past it (default: the context); without
                                                              max_tokens a request gets --max-tokens (4096),
                                                              capped by both; a reply the prompt leaves no
                                                              room for stops at the context's end ("length",
                                                              as llama.cpp's server; OpenAI refuses it)
Images and audio are decoded two requests at a time (app.MEDIA_DECODERS), so a burst holds few
decoded copies. Memory is then bounded by the batch's KV caches, the --prompt-caches (4) kept ones
(full layers no more than twice the tokens each holds, sliding rings window + 64 slots, and what
the rings saved for a rewind to the end of the prompt: up to a ring more) and 64 MiB of recent
media's soft tokens, two requests'
decoded media, and
the bodies in flight: up to (max_batch + max_queue) x about 3 x --max-body-mb (the body, its JSON,
the decoded base64) - 6.8 GiB at the defaults if all 72 slots send 32 MiB at once, so lower
--max-body-mb or --max-queue on a small machine.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 bad input, 401 bad
key, 404, 408, 413, 429, 500, 503 (too many connections, or shutting down). With --api-key, /v1/* needs
`Authorization: Bearer KEY` (compared in constant time, `hmac.compare_digest`); binding an address
other than loopback without a key prints a warning. Browsers: a request with an Origin of another
web page gets 403 origin_not_allowed, unless --allow-origin lists it (CORS headers and preflight
answers then); a same-origin one that arrives on a loopback address naming a host that is not
(DNS rebinding) gets 403 host_not_allowed (browsers send Origin with every POST; a same-origin GET
carries none and can read /health, the page and, without a key, /v1/models).

Logs: one line per request at info (its id, prompt and completion tokens, seconds, finish reason)
beside uvicorn's access lines (method, path, status). The API key, the Authorization header and
prompt or reply text are never logged, unless --log-prompts logs the prompt and reply text.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

from .app import MAX_BODY_BYTES, ServerOptions, create_app

__all__ = ["MAX_BODY_BYTES", "ServerOptions", "check_listen", "create_app", "is_loopback", "serve", "uvicorn_settings"]


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (0.0.0.0 and :: are not)."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_listen(host: str, port: int) -> None:
    """ValueError, in one line, unless the server could listen on host:port now (uvicorn's own
    failure is a log line and exit status 3, after the model has loaded). The socket is bound as
    uvicorn binds it (uvicorn.Config.bind_socket): IPv6 when the host has a colon, else IPv4."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except (socket.gaierror, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise ValueError(f"--host {host}: not an address to listen on ({reason})") from None
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def server_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with two of serve's limits.

    The head timeout closes a connection that goes `header_timeout` seconds without a complete
    request head: a new connection that sends nothing, or one that trickles its headers
    (uvicorn's keep-alive timer covers neither: any byte received disarms it).

    The connection limit counts as uvicorn's `limit_concurrency` does (open connections, idle
    ones included, and requests in flight) at the same moment, when a request's head is read,
    but answers with an OpenAI error, as every other limit does, not uvicorn's plain text."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ServerProtocol(H11Protocol):
        _head_timer = None

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.app = _connection_limit(self.app, self.max_connections, self.connections, self.tasks)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._in_request():
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing() and not self._in_request():
                self._head_timer = self.loop.call_later(self.header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    ServerProtocol.header_timeout, ServerProtocol.max_connections = header_timeout, max_connections
    return ServerProtocol


def _connection_limit(app, limit: int, connections: set, tasks: set):
    """`app` behind the connection limit. It runs as the request's task, which uvicorn has already
    added to `tasks`, on a connection already in `connections`: both are past the limit when
    they count more than `limit` (uvicorn's own check refused the limit-th connection)."""
    from starlette.responses import JSONResponse

    from .protocol import ApiError

    async def limited(scope, receive, send) -> None:
        if scope["type"] == "http" and (len(connections) > limit or len(tasks) > limit):
            error = ApiError(503, f"the server has too many open connections (its limit is {limit}, "
                                  "--max-connections): retry later", code="too_many_connections")
            logging.getLogger("gemmarun.server").warning(
                "503: %d connections and %d requests open (--max-connections %d)",
                len(connections), len(tasks) - 1, limit)
            await JSONResponse(error.body(), status_code=503, headers={"connection": "close"})(scope, receive, send)
            return
        await app(scope, receive, send)

    return limited


def uvicorn_settings(options: ServerOptions) -> dict:
    """The uvicorn.Config keywords `serve` runs with: the protocol with the head timeout and the
    connection limit, and uvicorn's own timeouts."""
    return {"http": server_protocol(options.header_timeout, options.max_connections),
            "timeout_keep_alive": 5, "timeout_graceful_shutdown": 5}


def log_config(level: str) -> dict:
    """uvicorn's logging setup, with the server's own lines (one per request) beside its own."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["gemmarun"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def serve(llm, host: str = "127.0.0.1", port: int = 8080, options: ServerOptions | None = None, *,
          log_level: str = "info", drafter=None) -> None:
    """Run the server until interrupted (Ctrl-C stops it gracefully). `drafter`: see `create_app`."""
    import uvicorn

    opts = options or ServerOptions()
    if not is_loopback(host) and not opts.api_key:
        print(f"gemmarun: warning: serving on {host}, reachable from other machines, without --api-key: "
              "anyone who can reach this port can use the model", file=sys.stderr)
    app = create_app(llm, opts, drafter=drafter)
    shown = f"[{host}]" if ":" in host else host
    print(f"gemmarun: serving {app.state.model_name} on http://{shown}:{port}/ (OpenAI API under /v1)",
          file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=log_config(log_level),
                            **uvicorn_settings(opts))
    _server_that_stops_the_model_first(uvicorn.Server, app)(config).run()


def _server_that_stops_the_model_first(base, app):
    """uvicorn's server, whose shutdown first ends every request in flight with the documented
    503 (in-band for a stream), those still sending their body included. Left to uvicorn, they
    ran on for its graceful timeout and were then cancelled: a plain-text 500 each (a stream cut
    short), with a traceback in the log."""

    class Server(base):
        async def shutdown(self, sockets=None) -> None:
            import anyio

            app.state.open_requests.stop()
            await anyio.to_thread.run_sync(app.state.scheduler.stop)
            await super().shutdown(sockets=sockets)

    return Server
