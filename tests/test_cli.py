"""The `gemmarun` command on tiny models: output, exit codes, one-line errors."""

import os
import subprocess
import sys

import pytest
import torch

from gemmarun.cli import main


def _run(args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "gemmarun", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_run_streams_text(tiny_models, capsys):
    folder, _ = tiny_models("e2b")
    assert main(["run", str(folder), "hello", "--max-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_run_takes_options_between_the_model_and_the_prompt(tiny_models, capsys):
    folder, _ = tiny_models("gemma3")
    assert main(["run", str(folder), "hello there", "--raw", "--max-tokens", "6"]) == 0
    expected = capsys.readouterr().out
    assert main(["run", str(folder), "--raw", "--max-tokens", "6", "hello there"]) == 0
    assert capsys.readouterr().out == expected
    assert main(["run", "--raw", str(folder), "--max-tokens", "6", "hello there"]) == 0
    assert capsys.readouterr().out == expected
    with pytest.raises(SystemExit):
        main(["run", str(folder), "hello", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_run_raw_and_seeded_sampling_is_reproducible(tiny_models, capsys):
    folder, _ = tiny_models("gemma3")
    args = ["run", str(folder), "hello", "--raw", "--max-tokens", "8", "--temperature", "0.8", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_inspect_reports_layers_params_and_cache(tiny_models, capsys):
    folder, _ = tiny_models("e2b")
    assert main(["inspect", str(folder), "--context", "1000"]) == 0
    out = capsys.readouterr().out
    assert "from 5" in out  # sliding consumers read layer 5's KV
    assert "parameters" in out and "ple_table" in out and "effective" in out
    assert "per token" in out and "at 1000 tokens" in out
    assert "memory-mapped" in out
    assert "model.layers.0.self_attn.q_proj.weight" in out
    assert "warning    --context 1000 is past the model's 256 positions" in out  # (had been silent)
    assert main(["inspect", str(folder), "--context", "256", "--no-tensors"]) == 0
    assert "past the model's" not in capsys.readouterr().out


def test_chat_reads_turns_from_stdin(tiny_models):
    folder, _ = tiny_models("e2b")
    code, out, err = _run(["chat", str(folder), "--max-tokens", "4"], stdin="hi\nthere\n/exit\n")
    assert code == 0, err
    assert len(out.splitlines()) >= 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "/nonexistent/model", "hi"], "no such model file or folder"),
        (["inspect", "/etc/hostname"], "not a model folder or a GGUF file"),
        (["run", "a", "b", "c"], "quote a prompt of several words"),
    ],
)
def test_errors_are_one_line_without_traceback(args, fragment):
    code, out, err = _run(args)
    assert code == (1 if args[0] == "inspect" else 2)  # 2: a usage error, found before any model loads
    assert fragment in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_run_with_a_model_and_no_prompt_says_so(tiny_models, tmp_path):
    """`gemmarun run MODEL` (Ollama's habit) had run the embedded 270M on the path's text."""
    folder, _ = tiny_models("e2b")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for model in (str(folder), str(gguf)):
        code, out, err = _run(["run", model])
        assert code == 2 and out == ""
        assert err.strip() == (f"gemmarun run: error: {model} is a model: give a prompt too (gemmarun run {model} "
                               f"PROMPT), or talk with it: gemmarun chat {model} (see gemmarun run --help)")
    code, _, err = _run(["run", str(tmp_path / "typo.gguf")])  # not a prompt for the embedded model either
    assert code == 2 and "typo.gguf: no such model file" in err


def test_prompt_past_context_is_a_one_line_error(tiny_models):
    folder, _ = tiny_models("e2b")
    code, _, err = _run(["run", str(folder), "hello " * 400, "--raw", "--device", "cpu"])
    assert code == 1 and "does not fit the context" in err and len(err.strip().splitlines()) == 1


def test_threads_default_to_physical_cores_and_can_be_set(tiny_models, capsys, monkeypatch):
    import torch

    from gemmarun.machine import physical_cores

    folder, _ = tiny_models("gemma3")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert main(["run", str(folder), "hi", "--max-tokens", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["run", str(folder), "hi", "--max-tokens", "2"]) == 0
        assert torch.get_num_threads() == physical_cores()
        with pytest.raises(SystemExit) as e:
            main(["run", str(folder), "hi", "--threads", "0"])
        assert e.value.code == 2 and "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_json_schema_file_that_is_not_text_is_named(tmp_path, capsys):
    """A probe found the decoder's bare message ('utf-8' codec can't decode byte 0xff ...)."""
    schema = tmp_path / "s.json"
    schema.write_bytes(b"\xff{}")
    with pytest.raises(SystemExit) as e:
        main(["run", str(tmp_path), "hi", "--json-schema", str(schema)])
    assert e.value.code == 2 and f"--json-schema {schema}: not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["serve", "--port", "70000"], "must be a TCP port"),
    (["serve", "--context", "0"], "must be at least 1"),
    (["serve", "--context", "abc"], "argument --context: must be an integer, got 'abc'"),  # (named the function)
    (["serve", "--port", "http"], "argument --port: must be an integer, got 'http'"),
    (["serve", "--max-image-mp", "lots"], "argument --max-image-mp: must be a number, got 'lots'"),
    (["serve", "--max-image-mp", "inf"], "positive finite number"),
    (["inspect", "x", "--context", "-5"], "must be at least 1"),
    (["run", "x", "hi", "--seed", "99999999999999999999999"], "--seed must fit in 64 bits"),
    (["run", "x", "hi", "--temperature", "-1"], "gemmarun run: error: --temperature must be >= 0 and finite"),
    (["run", "x", "hi", "--top-p", "-1"], "--top-p must be in [0, 1]"),
    (["chat", "x", "--max-tokens", "-5"], "gemmarun chat: error: --max-tokens must be >= 0"),
    (["run", "x", "hi", "--json-schema", "/nonexistent/s.json"], "--json-schema /nonexistent/s.json: no such file"),
    (["run", "x", "hi", "--json-schema", "/"], "--json-schema /: a folder, not a JSON schema file"),
    (["run", "x", "hi", "--json-schema", ""], "--json-schema needs a file name"),  # (it had been ignored)
    (["run", "x", "hi", "--stop-token-id", "-3"], "--stop-token-id -3 is negative"),
    (["run", "hi", "x"], "the model comes first"),
    (["chat", "x", "--image", "a.png"], "gemmarun chat: error: unrecognized arguments: --image a.png (see gemmarun chat --help)"),
    (["serve", "x", "--max-body-mb", "-5"], "argument --max-body-mb: must be at least 1, got -5"),
    (["serve", "x", "--max-queue", "-1"], "argument --max-queue: must be at least 0, got -1"),
    (["serve", "x", "--allow-origin", "localhost:3000"], "argument --allow-origin: 'localhost:3000' is not"),
    (["bench", "x", "--quant", "q8_0"], "--quant is the type of a --random-weights file"),
    (["bench", "x", "--threads", "100000"], "--threads 100000 is more than this machine can run"),
    (["bench", "x", "--write", "/nonexistent/b.md"], "--write /nonexistent/b.md: no folder /nonexistent"),
    (["run", "x", "hi", "--threads", "100000"], "--threads 100000 is more than this machine can run"),
    (["run", "x", "hi", "--image-tokens", "100"], "argument --image-tokens: invalid choice: 100"),
    (["run", "x", "hi", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["run", "x", "hi", "--device", "gpu"], "device 'gpu' is not a device (cpu, cuda, cuda:1 ...)"),
    (["convert", "x", "out.gguf", "--type", "q5_0"], "argument --type: invalid choice: 'q5_0'"),
    (["bench", "--random-weights", "e2b", "--quant", "q5_0"], "argument --quant: invalid choice: 'q5_0'"),
    (["run", "x", "hi", "--stop-token-id", "999999"], "stop_token_ids: token id 999999 is outside the vocabulary"),
])
def test_nonsense_flags_are_one_line_errors(tiny_models, capsys, monkeypatch, args, fragment):
    """(A port past 65535 and infinite megapixels had been tracebacks, --threads 100000 a crash
    (bench's workers too), --context 0 silently the default, --device gpu torch's list of
    backends.) What the options alone show is a usage error (2) found before any model loads."""
    from gemmarun import cli

    folder, _ = tiny_models("gemma3")
    capsys.readouterr()  # (building the tiny model may print progress)
    args = [str(folder) if a == "x" else a for a in args]
    loaded = []
    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda *a: loaded.append(a) or real_load(*a))
    try:
        code = main(args)
    except SystemExit as e:  # usage errors
        code = e.code
    needs_model = "999999" in args or "--device" in args  # the vocabulary's size; torch's devices
    assert bool(loaded) == needs_model and code == (1 if needs_model else 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and fragment in err  # argparse's usage block had come first


def test_chat_with_stdin_closed_ends_at_once(tiny_models, monkeypatch):
    folder, _ = tiny_models("gemma3")
    monkeypatch.setattr(sys, "stdin", None)
    assert main(["chat", str(folder)]) == 0


def test_chat_goes_on_after_a_message_past_the_context(tiny_models):
    """One message that does not fit (the tiny model's context is 256) is dropped with one line;
    the session answers the next, and the exit status says a message failed."""
    folder, _ = tiny_models("e2b")
    flags = ["chat", str(folder), "--max-tokens", "6", "--temperature", "0"]
    code, out, err = _run(flags, stdin="hi\n" + "hello " * 300 + "\nthere\n")
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "message dropped" in errors[0]
    assert "oldest messages" not in err
    # the history stays: "there" is answered after "hi" (a probe found the history emptied to
    # make room first, and the message then refused all the same)
    assert out == _run(flags, stdin="hi\nthere\n")[1]


def test_a_gemma3_folder_with_a_vision_tower_takes_images(tmp_path, capsys):
    """Gemma 3 4B-27B folders ship a SigLIP tower: `run --image` answers from the image (the
    answer changes with it), audio and video are refused naming why, inspect warns of nothing."""
    from PIL import Image
    from reference_models import build_gemma3_vision

    folder = tmp_path / "gemma3-mm"
    folder.mkdir()
    build_gemma3_vision(folder)
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{colour}.png")
    flags = ["--raw", "--max-tokens", "6", "--temperature", "0", "--ignore-eos"]
    answers = []
    for colour in ("red", "blue"):
        code, out, err = _run(["run", str(folder), "what is this?", "--image", str(tmp_path / f"{colour}.png")] + flags)
        assert code == 0, err
        assert "--raw is ignored: images, audio and video go in a chat turn" in err
        answers.append(out)
    assert answers[0] != answers[1]
    code, _, err = _run(["run", str(folder), "what is this?", "--audio", str(tmp_path / "red.png")])
    assert code == 1 and err.strip() == "gemmarun: error: this model has no audio tower: it cannot take audio"
    assert main(["inspect", str(folder), "--no-tensors"]) == 0
    out = capsys.readouterr().out
    assert "encoders   vision_tower 0.0 M, multi_modal_projector 0.0 M" in out and "warning    the vision" not in out


def test_chat_commands_interrupts_and_options(tiny_models, monkeypatch, capsys):
    """Ctrl-C stops an answer and keeps the session (it had ended it, conversation lost); /help
    and unknown /commands are not sent to the model (a path is); bad options fail at the start,
    not at every message."""
    import io

    from gemmarun import cli

    folder, _ = tiny_models("gemma3")
    capsys.readouterr()
    sent = []
    real = cli._stream_to_stdout

    def stream(llm, prompt, params, args, **kw):
        sent.append(llm.tokenizer.decode(prompt.ids))
        if len(sent) == 1:
            raise KeyboardInterrupt
        return real(llm, prompt, params, args, **kw)

    monkeypatch.setattr(cli, "_stream_to_stdout", stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n/help\n/frobnicate now\n/etc/hosts says what?\nsecond\n/bye\n"))
    assert main(["chat", str(folder), "--max-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "answer stopped (message dropped)" in err and "unknown command /frobnicate" in err
    assert err.count("/reset starts over") == 2  # /help and the unknown command
    assert len(sent) == 3 and "/etc/hosts says what?" in sent[1]
    assert "first" not in sent[2] and "/etc/hosts" in sent[2] and "second" in sent[2]  # the stopped turn is gone
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(folder), "--regex", "("]) == 1
    assert "invalid regex" in capsys.readouterr().err and len(sent) == 3  # refused before any message


def test_chat_keeps_what_was_attached_and_reads_blocks_as_messages(tmp_path, monkeypatch, capsys):
    """From a probe of the chat: an attached image is decoded when attached (the file had been read
    again at every turn: overwritten, it changed the history; deleted, every later message failed);
    a path with backslash-escaped spaces (as a terminal pastes a dragged-in file) attaches; a \"\"\"
    block starting with /word is a message, not a command (one holding /bye had ended the session)."""
    import io
    import shutil

    from PIL import Image
    from reference_models import build_gemma3_vision

    from gemmarun import cli

    folder = tmp_path / "g3"
    folder.mkdir()
    build_gemma3_vision(folder)
    spaced = tmp_path / "my pics"
    spaced.mkdir()
    Image.new("RGB", (40, 30), "red").save(spaced / "red image.png")
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "blue.png")
    shown = str(spaced / "red image.png").replace(" ", "\\ ")
    sent = []
    real = cli._stream_to_stdout

    def stream(llm, prompt, params, args, **kw):
        sent.append((prompt, llm.tokenizer.decode(prompt.ids)))
        if len(sent) == 1:  # the file changes after its first turn
            shutil.copy(tmp_path / "blue.png", spaced / "red image.png")
        return real(llm, prompt, params, args, **kw)

    monkeypatch.setattr(cli, "_stream_to_stdout", stream)
    stdin = f'/image {shown}\nwhat is it?\n"""/tmp is full\n/bye\n"""\nagain\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["chat", str(folder), "--max-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{spaced / 'red image.png'} goes with your next message" in err and "unknown command" not in err
    assert len(sent) == 3  # the block was the second message; the session went on to "again"
    assert "/tmp is full\n/bye" in sent[1][1] and "again" in sent[2][1]
    red = sent[0][0].media[0].inputs.pixels
    assert all(torch.equal(p.media[0].inputs.pixels, red) for p, _ in sent)  # red in every turn
    assert red[0].mean() > 0.9 and red[2].mean() < -0.9  # (normalised: red is +1, blue -1)


def test_chat_says_at_start_what_would_fail_every_message(tiny_models, tmp_path, monkeypatch, capsys):
    """A chat template that cannot render, or a --system prompt that fills the context, had let the
    session open and then dropped every message ("/reset starts over" could not help)."""
    import io
    import shutil

    folder, _ = tiny_models("gemma3")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "chat_template.jinja").write_text("{{ messages }")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(broken)]) == 1
    assert "the model's chat template cannot render a conversation" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(folder), "--system", "hello " * 400]) == 1
    assert "--system: the system prompt leaves no room in the context" in capsys.readouterr().err


def test_run_says_where_it_stopped_and_what_it_ignored(tiny_models, capsys):
    folder, _ = tiny_models("gemma3")
    capsys.readouterr()
    assert main(["run", str(folder), "hi", "--raw", "--max-tokens", "3", "--ignore-eos", "--think"]) == 0
    err = capsys.readouterr().err
    assert "stopped at 3 tokens (--max-tokens)" in err  # a cut answer had exited silently
    assert main(["run", str(folder), "hi", "--raw", "--max-tokens", "5000", "--ignore-eos"]) == 0
    assert "stopped at the context's end (256 tokens, the prompt 3)" in capsys.readouterr().err  # had said 5000
    assert "--think is ignored: Gemma 3 has no thinking mode" in err
    with pytest.raises(SystemExit):
        main(["run", str(folder), "hi", "--json-schema", "s.json", "--regex", "a"])  # the regex was ignored
    assert "not allowed with argument" in capsys.readouterr().err
    from gemmarun.cli import build_parser

    args = build_parser().parse_args(["svg", "draw", "a cat", "-o", "cat.svg"])  # the embedded model, as elsewhere
    assert (args.model, args.subject) == (None, "a cat")
    assert build_parser().parse_args(["transcribe", "m", "a.wav"]).max_tokens == 4096


def test_input_that_is_not_utf8_is_named_as_such(tiny_models):
    """Bytes that are not UTF-8 on stdin had been reported as a lone surrogate at an index of the
    rendered chat prompt; in chat the message is dropped and the session goes on."""
    folder, _ = tiny_models("e2b")
    proc = subprocess.run([sys.executable, "-m", "gemmarun", "run", str(folder), "-"], input=b"caf\xe9 au lait",
                          capture_output=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.decode().strip() == \
        "gemmarun: error: stdin is not valid UTF-8 (byte 0xE9 at character 3)"
    # (a UTF-8 locale's strict stdin too, where the read itself had raised and ended the chat)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    proc = subprocess.run([sys.executable, "-m", "gemmarun", "chat", str(folder), "--max-tokens", "2"],
                          input=b"caf\xe9\nthere\n", capture_output=True, timeout=300, env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "the message is not valid UTF-8 (byte 0xE9 at character 3) (message dropped)" in err
    assert proc.stdout.decode().count("\n") == 1  # "there" answered
    # an option given so had failed every message with the tokenizer's words (a review's find)
    proc = subprocess.run([sys.executable, "-m", "gemmarun", "chat", str(folder), b"--system", b"caf\xe9"],
                          input=b"hi\n", capture_output=True, timeout=300)
    assert proc.returncode == 2 and "--system is not valid UTF-8 (byte 0xE9 at character 3)" in proc.stderr.decode()


def test_chat_drops_the_oldest_exchanges_when_the_context_fills(tiny_models):
    """Once the history filled the tiny model's 256 positions, every later message had been
    refused until /reset cleared everything."""
    folder, _ = tiny_models("gemma3")
    turns = "".join(f"message {i} " + "word " * 30 + "\n" for i in range(8))
    code, out, err = _run(["chat", str(folder), "--system", "Be brief.", "--max-tokens", "8"], stdin=turns)
    assert code == 0 and "error" not in err, err
    assert "oldest messages left the history to fit the context" in err
    assert out.count("\n") >= 8  # every message answered (each answer ends its line)


def test_chat_takes_a_message_of_several_lines_between_triple_quotes(tiny_models, monkeypatch, capsys):
    """A pasted paragraph had become one message per line."""
    import io

    from gemmarun import cli

    folder, _ = tiny_models("gemma3")
    sent = []
    monkeypatch.setattr(cli, "_stream_to_stdout", lambda llm, prompt, params, args, **kw:
                        sent.append(llm.tokenizer.decode(prompt.ids)) or "ok")
    monkeypatch.setattr(sys, "stdin", io.StringIO('"""first line\n\nsecond line\nthird"""\none more\n"""unclosed\ntail'))
    assert main(["chat", str(folder)]) == 0
    assert len(sent) == 3
    assert "first line\n\nsecond line\nthird<end_of_turn>" in sent[0]
    assert sent[1].endswith("one more<end_of_turn>\n<start_of_turn>model\n")
    assert "unclosed\ntail<end_of_turn>" in sent[2]


def test_chat_on_a_terminal_reads_with_line_editing(tiny_models, monkeypatch, capsys):
    """On a terminal the chat reads through input() (readline: arrow keys and a history; the Up
    arrow had reached the model as ESC [ A), continuation lines prompted with '... '."""
    import builtins

    from gemmarun import cli

    folder, _ = tiny_models("gemma3")
    typed = iter(['"""one', 'two"""', "/bye"])
    prompts, sent = [], []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return next(typed)

    class Tty:
        def isatty(self):
            return True

        def readline(self):
            raise AssertionError("a terminal is read through input()")

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(cli, "_stream_to_stdout", lambda llm, prompt, params, args, **kw:
                        sent.append(llm.tokenizer.decode(prompt.ids)) or "ok")
    assert main(["chat", str(folder)]) == 0
    assert prompts == [">>> ", "... ", ">>> "] and len(sent) == 1 and "one\ntwo<end_of_turn>" in sent[0]


def test_running_out_of_memory_is_one_line(tiny_models, monkeypatch, capsys):
    """A MemoryError (a huge allocation refused) ends the command with one line, not a traceback."""
    from gemmarun import cli

    folder, _ = tiny_models("gemma3")

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cli, "_stream_to_stdout", exhausted)
    capsys.readouterr()
    assert main(["run", str(folder), "hi"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "gemmarun: error: out of memory"



def test_run_reads_the_prompt_from_stdin_given_a_dash(tiny_models, monkeypatch, capsys):
    import io

    folder, _ = tiny_models("gemma3")
    capsys.readouterr()
    assert main(["run", str(folder), "hello there", "--raw", "--max-tokens", "4"]) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there"))
    assert main(["run", str(folder), "-", "--raw", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_asked_for_without_cuda_names_the_device(tiny_models, capsys):
    folder, _ = tiny_models("gemma3")
    capsys.readouterr()
    assert main(["run", str(folder), "hi", "--device", "cuda:1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemmarun: error: device 'cuda:1' was asked for but CUDA is not available (torch ")


def test_chat_with_the_embedded_base_model_says_it_is_one(tiny_models, monkeypatch, capsys):
    """The embedded 270M is pretrained only: a chat with it answers poorly, and now says why."""
    import io

    import gemmarun
    from gemmarun import cli

    tiny = gemmarun.load(tiny_models("gemma3")[0], device="cpu")
    monkeypatch.setattr(cli, "_load", lambda model, args: tiny)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    capsys.readouterr()
    assert main(["chat", "--max-tokens", "2"]) == 0
    assert "the embedded Gemma 3 270M is a base (pretrained) model" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "some-model", "--max-tokens", "2"]) == 0
    assert "base (pretrained)" not in capsys.readouterr().err


def test_inspect_kv_cache_is_what_a_generation_allocates(tiny_models, monkeypatch):
    """inspect had left out the 64 ring slots the prompt cache adds to each sliding layer (the
    real 270M at 700 tokens: 21.0 MiB allocated, 19.1 MB said); Gemma 3 has no layer scalar."""
    import gemmarun
    from gemmarun import cache as cache_module
    from gemmarun import generate, prompt_cache
    from gemmarun.inspect_model import _human, describe, parameter_counts

    llm = gemmarun.load(tiny_models("gemma3")[0])
    made = []

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    real = cache_module.make_cache
    monkeypatch.setattr(generate, "make_cache", spy)
    monkeypatch.setattr(prompt_cache, "make_cache", spy)
    context = 200
    llm.generate_ids([2] + [20] * (context - 5), max_new_tokens=4, ignore_eos=True)
    line = next(line for line in describe(llm, context, show_tensors=False) if line.startswith("kv cache"))
    assert line.endswith(f"{_human(made[-1].nbytes())} at {context} tokens")
    assert made[-1].nbytes() == cache_module.kv_cache_bytes(llm.config, context, 4, spare=64)
    from safetensors.torch import load_file

    stored = load_file(tiny_models("gemma3")[0] / "model.safetensors")  # the checkpoint's own tensors
    assert parameter_counts(llm.config)["total"] == sum(t.numel() for t in stored.values())
