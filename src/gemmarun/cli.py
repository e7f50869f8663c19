"""The `gemmarun` command: run, chat, inspect, convert. Errors are one line on stderr."""

from __future__ import annotations

import argparse
import io
import re
import shlex
import sys
from collections.abc import Callable
from typing import NoReturn

from .sampling import SamplingParams


def _first_line(e: BaseException) -> str:
    """An error as one line: every expected failure has a one-line message."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _integer(text: str) -> int:
    """For the argparse types below: argparse would name the function ("invalid _at_least_one
    value") where a conversion fails."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (context lengths, where 0 had silently meant the default)."""
    n = _integer(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _at_least_zero(text: str) -> int:
    n = _integer(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {n}")
    return n


def _origin(text: str) -> str:
    """A web page origin for --allow-origin (checked as the server checks it)."""
    try:
        from .server.app import is_origin
    except ImportError:  # no server extra: serve says so when it starts
        return text
    if not is_origin(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not '*', 'null' or scheme://host[:port] (no path)")
    return text


def _port(text: str) -> int:
    n = _integer(text)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {n}")
    return n


def _positive_number(text: str) -> float:
    import math

    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return x


def _add_model_options(p: argparse.ArgumentParser, threads: bool = True, mmproj: bool = True) -> None:
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute dtype (default auto: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    if mmproj:
        p.add_argument("--mmproj", metavar="FILE", default=None,
                       help="llama.cpp's multimodal projector GGUF: images, video and audio with a GGUF text model")
    else:
        p.set_defaults(mmproj=None)
    if threads:
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default: $OMP_NUM_THREADS, else the physical cores)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="the most tokens generated (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the likeliest one's probability (default 0.0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen, prompt included (default 1.0: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract from the logits of tokens already generated (default 0.0: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times the count of each token already generated (default 0.0: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampled tokens (-1: a random one, as unset)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=[],
                   help="also stop at this token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-turn tokens (benchmarks)")
    _add_loop_guard_option(p)
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE", default=None, help="constrain the answer to this JSON Schema")
    constraint.add_argument("--regex", default=None, help="constrain the answer to this regular expression")


def _add_loop_guard_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loop-guard", choices=["recover", "stop", "off"], default="recover",
                   help="catch degenerate repetition: roll back and resample (default), stop, or off")


def _add_draft_option(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--draft", metavar="PATH", default=None,
                   help="gemma4_assistant drafter (a folder, or llama.cpp's GGUF of it): speculative decoding "
                        "(the same tokens when greedy, the same distribution when sampling; switches itself off "
                        "when it does not pay" + note + ")")


def _draft(llm, args: argparse.Namespace):
    return llm.load_draft(args.draft) if getattr(args, "draft", None) else None


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos,
    )


def _load(model: str | None, args: argparse.Namespace):
    from .loading import load

    return load(model, dtype=args.dtype, device=args.device, mmproj=args.mmproj)


def _media(kind: str, source) -> dict:
    """A chat message part ("image", "video" or "audio"): a file's path, or the medium prepared."""
    return {"type": kind, kind: source}


def _user_message(text: str, parts: list[dict]) -> dict:
    return {"role": "user", "content": parts + [{"type": "text", "text": text}] if parts else text}


TEXT_FILE_LIMIT = 64 * 2**20  # an SVG or a schema past it is not what the user meant (/dev/zero)


def _file_bytes(path: str, named: str, kind: str) -> bytes:
    """A file the user named, or a one-line error saying why not (`named`: the file as messages
    name it; `kind`: what it should be). Reads at most TEXT_FILE_LIMIT bytes: a device or a pipe
    that never ends is refused, not read forever."""
    try:
        with open(path, "rb") as f:
            data = f.read(TEXT_FILE_LIMIT + 1)
        if len(data) > TEXT_FILE_LIMIT:
            raise ValueError(f"{named}: over {TEXT_FILE_LIMIT // 2**20} MiB, not {kind}")
        return data
    except FileNotFoundError:
        raise ValueError(f"{named}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{named}: a folder, not {kind}") from None
    except OSError as e:
        raise ValueError(f"{named}: cannot read ({e.strerror or e})") from None


def _schema_text(path: str) -> str:
    """The --json-schema file's text, or a one-line error naming the file."""
    if not path:
        raise ValueError("--json-schema needs a file name (its file holds the schema)")
    named = f"--json-schema {path}"
    try:
        return _file_bytes(path, named, "a JSON schema file").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{named}: not UTF-8 text") from None


def _grammar(args: argparse.Namespace):
    from .constrain import Grammar

    if getattr(args, "json_schema", None) is not None:  # ("" too: a file name that names nothing)
        text = getattr(args, "json_schema_text", None)
        return Grammar.json_schema(text if text is not None else _schema_text(args.json_schema))
    if getattr(args, "regex", None) is not None:  # ("" too: the empty answer)
        return Grammar.regex(args.regex)
    return None


def _stream_to_stdout(llm, prompt, params: SamplingParams, args: argparse.Namespace, thinking: bool = False,
                      draft=None) -> str:
    from .loopguard import LoopGuardConfig

    grammar = _grammar(args)
    state = llm.grammar_state(grammar, params, thinking=thinking) if grammar is not None else None
    guard = LoopGuardConfig(policy=args.loop_guard)
    pieces = []
    if thinking and llm.config.family == "gemma4":  # the reasoning to stderr (dim), the answer alone to stdout
        stream = llm.stream_reply(prompt, params, grammar=state, loop_guard=guard, draft=draft)
        thinking_open, dim = False, sys.stderr.isatty()
        for delta in stream:
            if delta.reasoning:
                print(f"\033[2m{delta.reasoning}\033[0m" if dim else delta.reasoning, end="", file=sys.stderr, flush=True)
                thinking_open = True
            if delta.content and thinking_open:  # the reasoning's line ends where the answer begins
                print("", file=sys.stderr, flush=True)
                thinking_open = False
            pieces.append(delta.content)
            sys.stdout.write(delta.content)
            sys.stdout.flush()
        if thinking_open:
            print("", file=sys.stderr)
    else:
        stream = llm.stream_prompt(prompt, params, grammar=state, loop_guard=guard, draft=draft)
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stream.loop_recoveries:  # the text jumped where a loop was cut: say so
        n = stream.loop_recoveries
        print(f"gemmarun: note: the loop guard cut {'a repetition' if n == 1 else f'{n} repetitions'} and "
              "resampled past it (--loop-guard stop ends the answer there instead)", file=sys.stderr)
    if stream.finish_reason == "loop":
        print("gemmarun: stopped: the output started repeating itself (loop guard)", file=sys.stderr)
    elif stream.grammar_cut:
        print("gemmarun: stopped: a stop string or stop token cut the answer before its grammar was complete",
              file=sys.stderr)
    elif stream.finish_reason == "length":
        context = llm.config.max_position_embeddings
        if len(prompt.ids) + params.max_tokens > context:  # the context ended first
            print(f"gemmarun: stopped at the context's end ({context} tokens, the prompt {len(prompt.ids)})",
                  file=sys.stderr)
        else:
            print(f"gemmarun: stopped at {params.max_tokens} tokens (--max-tokens)", file=sys.stderr)
    return "".join(pieces)


def _note_thinking(llm, args: argparse.Namespace) -> None:
    if args.think and llm.config.family != "gemma4":
        print("gemmarun: note: --think is ignored: Gemma 3 has no thinking mode", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    model, text = (None, *args.words) if len(args.words) == 1 else args.words  # (_check_options: 1 or 2)
    if text == "-":
        text = sys.stdin.read()
    _check_utf8(text, "stdin" if args.words[-1] == "-" else "the prompt")
    llm = _load(model, args)
    _note_thinking(llm, args)
    has_media = bool(args.image or args.audio or args.video)
    if args.raw and has_media:  # (the placeholders' expansion is a chat turn's)
        print("gemmarun: note: --raw is ignored: images, audio and video go in a chat turn", file=sys.stderr)
    use_chat = has_media or (not args.raw and (llm.has_chat_template or llm.config.family == "gemma4"))
    parts = [_media("image", p) for p in args.image] + [_media("video", p) for p in args.video] + \
            [_media("audio", p) for p in args.audio]
    source = [_user_message(text, parts)] if use_chat else text
    prompt = llm.build_prompt(source, enable_thinking=args.think, image_tokens=args.image_tokens)
    _stream_to_stdout(llm, prompt, _sampling(args), args, thinking=args.think, draft=_draft(llm, args))
    return 0


# The transcription instruction from the Gemma model cards' audio examples.
TRANSCRIBE_PROMPT = (
    "Transcribe the following speech segment in its original language. Follow these specific "
    "instructions for formatting the answer:\n* Only output the transcription, with no newlines.\n"
    "* When transcribing numbers, write the digits, i.e. write 1.7 and not one point seven, and "
    "write 3 instead of three."
)


def cmd_transcribe(args: argparse.Namespace) -> int:
    llm = _load(args.model, args)
    prompt = llm.build_prompt([_user_message(TRANSCRIBE_PROMPT, [_media("audio", args.audio)])], enable_thinking=False)
    _stream_to_stdout(llm, prompt, _sampling(args), args)
    return 0


def _check_conversation_start(llm, messages: list[dict], args: argparse.Namespace) -> None:
    """Before the first message: a chat template that cannot render a conversation, or a --system
    prompt that leaves no room in the context, would fail every message of the session."""
    from .chat import ChatTemplateError

    trial = messages + [{"role": "user", "content": "hi"}]
    try:
        ids = llm.build_prompt(trial, enable_thinking=args.think).ids
    except ChatTemplateError as e:
        raise ValueError(f"the model's chat template cannot render a conversation: {_first_line(e)}") from None
    context = llm.config.max_position_embeddings
    if len(ids) >= context:
        raise ValueError(f"--system: the system prompt leaves no room in the context ({len(ids)} tokens with "
                         f"a one-word message, the context {context})")


def _fitted_prompt(llm, messages: list[dict], args: argparse.Namespace, params: SamplingParams):
    """The conversation's prompt. When it leaves no room for an answer (max_tokens, or a quarter of
    the context if less), its oldest exchanges leave the history, the system prompt stays, as in
    Ollama's and llama.cpp's chats; a last message too long alone fails as before."""
    from .generate import ContextOverflow

    keep = 1 if messages[0]["role"] == "system" else 0
    context = llm.config.max_position_embeddings
    trimmed, dropped = list(messages), 0
    while True:
        prompt = llm.build_prompt(trimmed, enable_thinking=args.think)
        room = context - len(prompt.ids)
        if room >= min(params.max_tokens, context // 4) or len(trimmed) - keep <= 1:
            break
        del trimmed[keep:keep + 2]  # the oldest question and its answer
        dropped += 2
    if room <= 0:  # too long even alone: the caller drops it, and the history stays as it was
        raise ContextOverflow(f"prompt of {len(prompt.ids)} tokens does not fit the context of {context} tokens")
    if dropped:
        messages[:] = trimmed
        print(f"gemmarun: note: the {dropped} oldest messages left the history to fit the context", file=sys.stderr)
    return prompt


MODEL_HELP = "model folder, .gguf or ollama:NAME[:TAG] (default: the embedded Gemma 3 270M)"


def _ollama_name(model: str | None) -> str | None:
    """`gemma4:e2b` for `ollama:gemma4:e2b` (the id `ollama list` shows it by), else None."""
    from .loading.ollama import PREFIX, display_name, is_ollama_name

    return display_name(model[len(PREFIX):]) if is_ollama_name(model) else None


def _exists(path: str, file: bool = False) -> bool:
    """Whether `path` exists (is a file); False for a string no file can be named (a long word)."""
    from pathlib import Path

    try:
        return Path(path).is_file() if file else Path(path).exists()
    except (OSError, ValueError):
        return False


CHAT_COMMANDS = ('/image, /audio or /video FILE goes with your next message, /reset starts over, /exit (or /bye, '
                 'Ctrl-D) quits, /help lists these; Ctrl-C stops an answer; """ opens and closes a message of several lines')
MEDIA_COMMANDS = {"/image": "image", "/audio": "audio", "/video": "video"}


def _check_utf8(text: str, what: str) -> None:
    """Python reads bytes that are not UTF-8 from stdin and argv as lone surrogates (U+DC80-DCFF);
    say so in the user's terms, not the tokenizer's (a surrogate at an index of the chat prompt)."""
    bad = re.search("[\udc80-\udcff]", text)
    if bad:
        raise ValueError(f"{what} is not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02X} "
                         f"at character {bad.start()})")


def _read_line(prompt: str | None) -> str:
    """A line of stdin with its newline ("" at its end). `prompt` (interactive use) is shown on
    stderr, or by input() with line editing and history where stdin and stdout are terminals."""
    if prompt is None:
        return sys.stdin.readline()
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            import readline  # noqa: F401  (loaded, it gives input() arrow keys and a history)
        except ImportError:
            pass
        try:
            return input(prompt) + "\n"
        except EOFError:
            return ""
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline()


def _read_message(first: str, more: str | None = None) -> str:
    """One chat message: the line, or, when it starts with three double quotes, every line up to
    one that ends with them (as in Ollama's chat), the quotes left out; `more` prompts for them."""
    if not first.lstrip().startswith('"""'):
        return first.strip()
    lines = [first.lstrip()[3:]]
    while not lines[-1].rstrip().endswith('"""'):
        line = _read_line(more)
        if not line:  # end of input before the closing quotes: what was written is the message
            return "".join(lines).strip()
        lines.append(line)
    return "".join(lines).rstrip()[:-3].strip()


BASE_MODEL_NOTE = ("gemmarun: note: the embedded Gemma 3 270M is a base (pretrained) model without a chat "
                   "template: it continues text well but answers questions poorly; give an instruction-tuned "
                   "model for {what}")


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args.model, args)
    if args.model is None:
        print(BASE_MODEL_NOTE.format(what="a chat (gemmarun chat MODEL)"), file=sys.stderr)
    draft = _draft(llm, args)  # loaded once for the whole conversation
    params = _sampling(args)
    _grammar(args)  # a bad schema, regex or stop id fails here, not at every message
    llm.stop_ids(params)
    _note_thinking(llm, args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    _check_conversation_start(llm, messages, args)
    if sys.stdin is None:  # started with stdin closed: nothing to read, as at end of input
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Type a message; {CHAT_COMMANDS}.", file=sys.stderr)
    failed = False  # a message the session could not answer (it goes on; the exit status says so)
    attached: list[dict] = []  # media parts for the next message (/image, /audio, /video)
    while True:
        line = _read_line(">>> " if interactive else None)
        text = _read_message(line, "... " if interactive else None)
        quoted = line.lstrip().startswith('"""')  # a block of lines is a message, whatever it starts with
        command = text.split()[0] if not quoted and re.match(r"/[A-Za-z?]+(\s|$)", text) else None  # not "/etc/hosts"
        if not line or command in ("/exit", "/bye"):
            if attached:
                print(f"gemmarun: note: {len(attached)} attached file(s) not sent: no message followed",
                      file=sys.stderr)
            return 1 if failed else 0
        if not text:
            continue
        if command == "/reset":
            messages = messages[:1] if args.system else []
            attached = []
            continue
        if command in MEDIA_COMMANDS:
            part = _media_part(llm, MEDIA_COMMANDS[command], text[len(command):])
            if part is not None:
                attached.append(part)
            failed = failed or part is None  # (the next message goes without it)
            continue
        if command is not None:
            if command not in ("/help", "/?"):
                print(f"gemmarun: unknown command {command}", file=sys.stderr)
            print(CHAT_COMMANDS, file=sys.stderr)
            continue
        try:
            _check_utf8(text, "the message")
        except ValueError as e:
            failed = True
            print(f"gemmarun: error: {e} (message dropped)", file=sys.stderr)
            continue
        messages.append(_user_message(text, attached))
        attached = []  # sent with this message (or dropped with it)
        try:
            prompt = _fitted_prompt(llm, messages, args, params)
            reply = _stream_to_stdout(llm, prompt, params, args, thinking=args.think, draft=draft)
        except ValueError as e:  # e.g. the conversation no longer fits the context: this message only
            messages.pop()
            failed = True
            print(f"gemmarun: error: {_first_line(e)} (message dropped; /reset starts over)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session (as Ollama's)
            messages.pop()
            print("\ngemmarun: answer stopped (message dropped)", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})


def _media_part(llm, kind: str, argument: str) -> dict | None:
    """A chat message part for `/image FILE`, `/audio FILE` or `/video FILE`, or None after saying
    on stderr why the model or the file cannot give one. The file is decoded and preprocessed now,
    once: the history keeps what the model reads, whatever becomes of the file, and a file the model
    cannot take is said at once, by its name. A dragged-in path may come quoted, or with its spaces
    escaped by a backslash (macOS, shell completion)."""
    path = _dropped_path(argument.strip())
    try:
        if not path:
            raise ValueError(f"/{kind} takes a file: /{kind} FILE")
        media = llm.prepare_media(kind, path)
    except ValueError as e:
        print(f"gemmarun: error: {_first_line(e)}", file=sys.stderr)
        return None
    print(f"gemmarun: {path} goes with your next message", file=sys.stderr)
    return _media(kind, media)


def _dropped_path(path: str) -> str:
    """A path as a terminal pastes a dragged-in file: quoted, or with backslash-escaped spaces and
    other characters (used only where the text as given names no file)."""
    import os
    import shlex

    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        return path[1:-1]
    if "\\" in path and not os.path.exists(os.path.expanduser(path)):
        try:
            words = shlex.split(path)
        except ValueError:
            return path
        if len(words) == 1 and os.path.exists(os.path.expanduser(words[0])):
            return words[0]
    return path


def _svg_file(path: str) -> tuple[str, str]:
    """(text, encoding) of an SVG file; a one-line error naming the file otherwise."""
    from .svg import decode_svg_file

    data = _file_bytes(path, path, "an SVG file")
    try:
        return decode_svg_file(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def cmd_svg_check(args: argparse.Namespace) -> int:
    from .svg import check_svg

    problems = check_svg(_svg_file(args.file)[0])
    for p in problems:
        print(f"{args.file}:{p.line}:{p.column}: {p.kind}: {p.message}")
    if not problems:
        print(f"{args.file}: valid SVG")
    return 1 if problems else 0


def _repair_and_render(text: str, out: str, png: str | None, label: str, encoding: str = "utf-8") -> int:
    """Exit status 0 for a clean SVG; 1 when problems are left (written) or it still does not
    parse (not written: `-o` may name the input)."""
    from xml.etree import ElementTree as ET

    from .outputs import write_replacing
    from .svg import render_png, repair_svg

    fixed = repair_svg(text)
    for change in fixed.changes:
        print(f"{label}: fixed: {change}")
    for p in fixed.problems_left:
        print(f"{label}:{p.line}:{p.column}: left: {p.kind}: {p.message}")
    try:
        ET.fromstring(fixed.svg)
    except ET.ParseError as e:
        print(f"{label}: the repaired SVG still does not parse as XML ({e}); {out} not written", file=sys.stderr)
        return 1
    write_replacing(out, fixed.svg.encode(encoding, errors="xmlcharrefreplace"))
    print(f"wrote {out}")
    if png:
        render_png(fixed.svg, png)
        print(f"rendered {png}")
    return 1 if fixed.problems_left else 0


def cmd_svg_repair(args: argparse.Namespace) -> int:
    text, encoding = _svg_file(args.file)
    return _repair_and_render(text, args.output, args.png, args.file, encoding)


def cmd_svg_draw(args: argparse.Namespace) -> int:
    from .svg import extract_svg

    llm = _load(args.model, args)
    if args.model is None:
        print(BASE_MODEL_NOTE.format(what="drawings (gemmarun svg draw MODEL ...)"), file=sys.stderr)
    ask = f"Write an SVG image of {args.subject}. Answer with the SVG code only."
    prompt = llm.build_prompt([_user_message(ask, [])])
    answer = _stream_to_stdout(llm, prompt, _sampling(args), args)
    svg = extract_svg(answer)
    if svg is None:
        raise ValueError("the model's answer holds no <svg> element")
    return _repair_and_render(svg, args.output, args.png, "answer")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_model import describe

    llm = _load(args.model, args)
    context = args.context or min(llm.config.max_position_embeddings, 8192)
    for line in describe(llm, context, show_tensors=not args.no_tensors):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .server import ServerOptions, check_listen, serve
    except ImportError as e:
        raise RuntimeError(f"gemmarun serve needs the server extra: pip install 'gemmarun[server]' ({e})") from None
    check_listen(args.host, args.port)  # a port in use, a bad address: before the model loads
    llm = _load(args.model, args)
    positions = llm.config.max_position_embeddings
    if args.context is not None and args.context > positions:
        print(f"gemmarun: note: --context {args.context} is past the model's {positions} positions: "
              f"serving {positions}", file=sys.stderr)
    if llm.has_chat_template:  # said once here rather than only in each chat request's error
        from .inspect_model import template_warnings

        for warning in template_warnings(llm.info):
            print(f"gemmarun: warning: {warning}", file=sys.stderr)
    options = ServerOptions(
        model_name=args.model_name or _ollama_name(args.model),
        api_key=args.api_key or os.environ.get("GEMMARUN_API_KEY") or None,
        allow_local_files=args.allow_local_files, max_body_bytes=args.max_body_mb * 1024 * 1024,
        max_batch=args.max_batch, max_queue=args.max_queue, context=args.context, prompt_caches=args.prompt_caches,
        default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
        max_image_pixels=round(args.max_image_mp * 1_000_000), max_audio_seconds=args.max_audio_seconds,
        body_timeout=args.body_timeout, header_timeout=args.header_timeout, max_connections=args.max_connections,
        log_prompts=args.log_prompts, loop_guard=args.loop_guard, allow_origins=tuple(args.allow_origin or ()),
    )
    serve(llm, args.host, args.port, options, log_level=args.log_level, drafter=_draft(llm, args))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .loading.convert import convert

    out = convert(args.source, args.output, args.type, progress=not args.quiet,
                  note=lambda text: print(f"gemmarun: note: {text}", file=sys.stderr))
    if not args.quiet:
        print(f"gemmarun: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})", file=sys.stderr)
    return 0


RANDOM_WEIGHTS_QUANT = "q4_0"


def _bench_command(args: argparse.Namespace, threads: int) -> str:
    """The command line that reproduces this run, with the thread count made explicit."""
    parts = ["gemmarun", "bench"]
    if args.model:
        parts.append(args.model)
    if args.random_weights:
        parts += ["--random-weights", args.random_weights, "--quant", args.quant]
    if args.twin:
        parts.append("--twin")
    if args.compare:
        parts.append("--compare")
    if args.rounds:
        parts += ["--rounds", str(args.rounds)]
    parts += ["--threads", str(threads)]
    if args.prompt_tokens != 512:
        parts += ["--prompt-tokens", str(args.prompt_tokens)]
    if args.decode_tokens != 128:
        parts += ["--decode-tokens", str(args.decode_tokens)]
    if args.dtype != "auto":
        parts += ["--dtype", args.dtype]
    if args.device:
        parts += ["--device", args.device]
    if args.write:
        parts += ["--write", args.write]
    return shlex.join(parts)  # runs again as written, a path with a space included


def _check_bench_fits(args: argparse.Namespace, cfg) -> None:
    from .bench import BenchError

    if args.prompt_tokens + args.decode_tokens > cfg.max_position_embeddings:
        raise BenchError(f"{args.prompt_tokens} + {args.decode_tokens} tokens do not fit the model's "
                         f"context of {cfg.max_position_embeddings}")


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import bench, machine
    from .config import ConfigError
    from .loading import resolve_device

    if args.compare and args.device not in (None, "cpu"):
        raise bench.BenchError("--compare runs every runtime on the CPU; drop --device or pass --device cpu")
    device = resolve_device("cpu" if args.compare else args.device)  # a CUDA machine included
    threads = args.threads if args.threads is not None else machine.physical_cores()
    if args.random_weights:
        from .loading.random_weights import resolve_config

        try:  # the workload must fit before gigabytes of random weights are written
            _check_bench_fits(args, resolve_config(args.random_weights)[0])
        except ConfigError as e:
            raise bench.BenchError(f"--random-weights {args.random_weights}: {e}") from None
        args.quant = args.quant or RANDOM_WEIGHTS_QUANT  # (given only with --random-weights)
        path = bench.random_weights_model(args.random_weights, args.quant, twin=args.twin)
        label = f"random-weights {args.random_weights}{' dense twin' if args.twin else ''} {args.quant}"
    elif args.model:
        from .loading.ollama import PREFIX, resolve

        path, label = (resolve(args.model).model if args.model.startswith(PREFIX) else Path(args.model)), args.model
    else:
        from .loading.default import default_model_path

        path, label = default_model_path(), "embedded gemma-3-270m Q4_K_M"
    facts = bench.describe_model(path)
    cfg = facts.config
    _check_bench_fits(args, cfg)
    prompt_ids = bench.random_prompt_ids(cfg.vocab_size, args.prompt_tokens)
    sanity = bench.sanity_ids(facts, prompt_ids)
    workload = bench.Workload(str(path), prompt_ids, args.decode_tokens, threads, sanity,
                              dtype=args.dtype, device=str(device))
    print(f"threads: {threads}" + (" (physical cores)" if args.threads is None else ""), file=sys.stderr)
    runtimes = bench.compare_runtimes() if args.compare else [bench.gemmarun_runtime()]
    rounds = args.rounds if args.rounds is not None else (3 if args.compare else 1)
    runs = bench.run_rounds(workload, runtimes, rounds, progress=lambda line: print(line, file=sys.stderr))
    bandwidth = decode_bytes = None
    if device.type == "cpu":
        bandwidth = bench.measure_read_bandwidth(threads)
        decode_bytes = bench.decode_read_bytes(facts.weights, cfg.top_k_experts, cfg.num_experts)
    setup = f"{label} ({cfg.family}, dtype {args.dtype}, device {device.type})"
    if args.compare:
        setup += " vs llama.cpp and transformers"
    if (args.prompt_tokens, args.decode_tokens) != (512, 128) or threads != machine.physical_cores():
        # another workload is another setup: a quick run must not replace the full figures
        setup += f", {args.prompt_tokens}/{args.decode_tokens} tokens, {threads} threads"
    report = bench.Report(setup, _bench_command(args, threads), threads, rounds, workload, runs,
                          bandwidth, decode_bytes, facts.tokenizer)
    section = bench.format_report(report)
    print(section)
    ours = runs[0]
    if not ours.results:
        raise bench.BenchError(f"gemmarun's run {ours.status}")
    if args.write:
        bench.record(Path(args.write), setup, section)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other gemmarun error (argparse prints the whole usage
    first); subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gemmarun", description="Run Gemma 4 and Gemma 3 models locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="one prompt, streamed to the terminal",
                       usage="gemmarun run [MODEL] PROMPT [options]")
    p.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help=f"{MODEL_HELP}, then the prompt, quoted "
                        "(- reads it from stdin)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.add_argument("--think", action="store_true", help="enable Gemma 4 thinking (the reasoning on stderr)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--audio", action="append", default=[],
                   help="audio file: wav, flac, ogg/opus, mp3, m4a/mp4 or webm (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (32 frames sampled; repeatable)")
    p.add_argument("--image-tokens", type=int, default=None, choices=[70, 140, 280, 560, 1120],
                   help="Gemma 4's soft-token budget per image (default: the model's, 280; "
                        "Gemma 3 gives every image its fixed 256)")
    _add_sampling_options(p)
    _add_draft_option(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("transcribe", help="speech to text (thinking off)")
    p.add_argument("model",
                   help="a Gemma 4 model with an audio tower (a folder, a .gguf with --mmproj, or ollama:NAME)")
    p.add_argument("audio", help="audio file: wav, flac, ogg/opus, mp3, m4a/mp4 or webm; longer than 30 s "
                                 "is split into clips")
    _add_sampling_options(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_transcribe, max_tokens=4096)  # minutes of speech: 256 would cut them

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description=f"Interactive multi-turn chat. In the chat: {CHAT_COMMANDS}.")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--think", action="store_true", help="enable Gemma 4 thinking (the reasoning on stderr)")
    _add_sampling_options(p)
    _add_draft_option(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="layer plan, parameters, KV cache, tensors, warnings")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--context", type=_at_least_one, default=None, help="context length for the KV-cache size")
    p.add_argument("--no-tensors", action="store_true", help="omit the tensor table")
    _add_model_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="prefill/decode speed, time to first token, peak RSS")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--prompt-tokens", type=_at_least_one, default=512, help="prompt length (default 512)")
    p.add_argument("--decode-tokens", type=_at_least_one, default=128, help="tokens decoded (default 128)")
    p.add_argument("--write", metavar="FILE", default=None, help="record into this markdown file")
    p.add_argument("--compare", action="store_true",
                   help="run the same workload through llama.cpp and transformers too (pip install gemmarun[bench])")
    p.add_argument("--rounds", type=_at_least_one, default=None,
                   help="interleaved rounds over the runtimes; medians are reported (default: 3 with --compare, else 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every runtime (default: physical cores)")
    p.add_argument("--random-weights", metavar="CONFIG", default=None,
                   help="bench a random-weights GGUF of this config (a name like e2b, or a config.json), cached")
    from .loading.random_weights import TYPES as RANDOM_TYPES

    p.add_argument("--quant", default=None, choices=list(RANDOM_TYPES),
                   help=f"quantization of the --random-weights file (default: {RANDOM_WEIGHTS_QUANT})")
    p.add_argument("--twin", action="store_true",
                   help="with --random-weights MOE: its dense twin with the same active parameters instead")
    _add_model_options(p, threads=False, mmproj=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("svg", help="check, repair, or draw SVG with a model")
    svg_sub = p.add_subparsers(dest="svg_command", required=True, metavar="{check,repair,draw}")
    q = svg_sub.add_parser("check", help="list every problem with line:column; exit 1 if any")
    q.add_argument("file", help="the SVG file")
    q.set_defaults(func=cmd_svg_check)
    q = svg_sub.add_parser("repair", help="fix what can be fixed deterministically and report each change")
    q.add_argument("file", help="the SVG file")
    q.add_argument("-o", "--output", required=True, help="where the repaired SVG goes")
    q.add_argument("--png", default=None, help="also render the result to this PNG")
    q.set_defaults(func=cmd_svg_repair)
    q = svg_sub.add_parser("draw", help="prompt a model for an SVG, then extract, check, repair, render")
    q.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    q.add_argument("subject", help='e.g. "a pelican riding a bicycle"')
    q.add_argument("-o", "--output", required=True, help="where the SVG goes")
    q.add_argument("--png", default=None, help="also render it to this PNG")
    _add_sampling_options(q)
    _add_model_options(q, mmproj=False)
    q.set_defaults(func=cmd_svg_draw, max_tokens=1024)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, with a chat page at /",
                       description="OpenAI-compatible HTTP server, with a chat page at /. A request that leaves "
                       "sampling out samples as the Gemma model cards advise (temperature 1.0, top_p 0.95, "
                       "top_k 64); send temperature 0 for greedy answers.")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_port, default=8080, help="TCP port (default 8080)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GEMMARUN_API_KEY, else none)")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN", type=_origin,
                   help="let web pages of ORIGIN (e.g. http://localhost:3000; '*' for any) call the API from a "
                        "browser, with CORS headers (repeatable; other origins get 403)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="let image_url parts name files on this machine (file:// URLs and paths)")
    p.add_argument("--model-name", default=None,
                   help="model id to report (default: the file or folder name; NAME:TAG for ollama:NAME[:TAG])")
    p.add_argument("--max-batch", type=_at_least_one, default=8,
                   help="requests decoded together (continuous batching; default 8)")
    p.add_argument("--max-queue", type=_at_least_zero, default=64,
                   help="requests waiting for a batch slot; more get 429 (default 64)")
    p.add_argument("--prompt-caches", type=_at_least_zero, default=4,
                   help="finished requests whose KV caches are kept, so a request that starts the same way "
                        "(a chat's next turn) prefills only the rest (default 4; 0: off)")
    p.add_argument("--context", type=_at_least_one, default=None, help="context length (default: the model's)")
    p.add_argument("--max-tokens", type=_at_least_one, default=4096,
                   help="reply length when a request sets none (default 4096)")
    p.add_argument("--max-body-mb", type=_at_least_one, default=32,
                   help="request body limit in MiB (413 past it; default 32)")
    p.add_argument("--max-tokens-limit", type=_at_least_one, default=None,
                   help="the most max_tokens a request may ask for (400 past it; default: the context)")
    p.add_argument("--max-image-mp", type=_positive_number, default=50,
                   help="megapixels per image, checked from its header before decoding (400 past it; default 50)")
    p.add_argument("--max-audio-seconds", type=_positive_number, default=600,
                   help="seconds of audio per request, all parts together (400 past it; default 600)")
    p.add_argument("--body-timeout", type=_positive_number, default=60,
                   help="seconds to receive a request body (408 past it; default 60)")
    p.add_argument("--header-timeout", type=_positive_number, default=30,
                   help="seconds a connection may go without sending a complete request head "
                        "(then closed; default 30)")
    p.add_argument("--max-connections", type=_at_least_one, default=512,
                   help="open connections, idle ones included (503 past it; default 512)")
    p.add_argument("--log-prompts", action="store_true", help="log prompt and reply text (never logged otherwise)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default info)")
    _add_loop_guard_option(p)
    _add_draft_option(p, "; the server drafts for a request while it decodes alone")
    _add_model_options(p)
    p.set_defaults(func=cmd_serve)

    from .loading.convert import TYPES as CONVERT_TYPES

    p = sub.add_parser("convert", help="write a HF folder as GGUF")
    p.add_argument("source", help="a Hugging Face model folder (config.json, safetensors, tokenizer)")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--type", choices=list(CONVERT_TYPES), default="f16", help="weight type (default f16)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_convert)
    return parser


_FLAGS = {"stop_token_ids": "--stop-token-id"}  # SamplingParams fields whose flag is not --field-name


def _check_options(args: argparse.Namespace) -> None:
    """ValueError for what the options alone show to be wrong, before any model loads."""
    from pathlib import Path

    from . import machine

    if getattr(args, "threads", None) is not None:
        machine.check_threads(args.threads)
    if hasattr(args, "temperature"):
        try:
            _sampling(args)
        except (TypeError, ValueError) as e:
            field = str(e).split(" ", 1)[0]
            raise ValueError(f"{_FLAGS.get(field, '--' + field.replace('_', '-'))} {str(e).split(' ', 1)[1]}") from None
    negative = [i for i in getattr(args, "stop_token_ids", []) if i < 0]
    if negative:
        raise ValueError(f"--stop-token-id {negative[0]} is negative: token ids start at 0")
    if getattr(args, "json_schema", None) is not None:  # read once: <(...) or /dev/stdin holds it for one read
        args.json_schema_text = _schema_text(args.json_schema)
    for flag, value in (("--system", getattr(args, "system", None)), ("--regex", getattr(args, "regex", None)),
                        *(("--stop", stop) for stop in getattr(args, "stop", None) or [])):
        if value:
            _check_utf8(value, flag)
    if args.func is cmd_run:
        words = args.words
        if len(words) > 2:
            raise ValueError(f"{len(words)} words where [MODEL] PROMPT go: quote a prompt of several words")
        if len(words) == 1 and _ollama_name(words[0]):
            raise ValueError(f"{words[0]} is a model: give a prompt too (gemmarun run {words[0]} PROMPT)")
        if len(words) == 1 and words[0].endswith(".gguf") and not _exists(words[0]):
            raise ValueError(f"{words[0]}: no such model file")  # (it had become the prompt)
        if len(words) == 1 and (_exists(f"{words[0]}/config.json", file=True) or
                                words[0].endswith(".gguf") and _exists(words[0], file=True)):
            # it had run the embedded model on the path's text
            raise ValueError(f"{words[0]} is a model: give a prompt too (gemmarun run {words[0]} PROMPT), "
                             f"or talk with it: gemmarun chat {words[0]}")
        from .loading.ollama import PREFIX as OLLAMA

        if len(words) == 2 and not _exists(words[0]) and not words[0].startswith(OLLAMA):
            if _exists(words[1]):
                raise ValueError(f"the model comes first: gemmarun run {words[1]} PROMPT")
            hint = "" if "/" in words[0] or words[0].endswith(".gguf") else " (quote a prompt of several words)"
            raise ValueError(f"{words[0]}: no such model file or folder{hint}")
    if args.func in (cmd_svg_repair, cmd_svg_draw):  # before a model writes 1024 tokens for them
        from .outputs import replaced_target

        for flag, path in (("-o", args.output), ("--png", args.png)):
            if path:
                try:
                    replaced_target(path)
                except ValueError as e:
                    raise ValueError(f"{flag} {e}") from None
    if args.func is cmd_bench:
        if args.model and args.random_weights:
            raise ValueError("give a MODEL or --random-weights CONFIG, not both")
        if args.twin and not args.random_weights:
            raise ValueError("--twin needs --random-weights MOE_CONFIG")
        if args.quant and not args.random_weights:
            raise ValueError("--quant is the type of a --random-weights file; a MODEL file has its own")
        if args.random_weights == "":
            raise ValueError("--random-weights needs a config: a name like e2b, or a config.json")
        if args.write:
            from .bench import read_record

            try:  # what it would write into, checked before the run
                read_record(Path(args.write))
            except ValueError as e:
                raise ValueError(f"--write {e}") from None


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """A usage error of the subcommand, in one line, as argparse's own (SystemExit(2))."""
    words = (getattr(args, "command", None), getattr(args, "svg_command", None))
    prog = " ".join(["gemmarun", *(w for w in words if w)])
    print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "words", None), list) and not any(a.startswith("-") for a in extra):
        args.words += extra  # options between the model and the prompt: `run MODEL --max-tokens 9 "hi"`
    elif extra:
        _usage_error(args, f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], int] = args.func
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are not UTF-8 read as U+DC80-DCFF, in
        sys.stdin.reconfigure(errors="surrogateescape")  # any locale: _check_utf8 names them
    try:
        _check_options(args)
    except ValueError as e:
        _usage_error(args, _first_line(e))
    try:
        if hasattr(args, "threads") and func is not cmd_bench:  # bench sets each runtime's own
            from . import machine

            machine.set_threads(args.threads)
        return func(args)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        # Every expected failure (bad file, bad config, bad input) is a ValueError subclass with
        # a one-line message; the rest are reported the same way rather than as a traceback.
        print(f"gemmarun: error: {_first_line(e)}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"gemmarun: error: out of memory{f' ({_first_line(e)})' if str(e) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
