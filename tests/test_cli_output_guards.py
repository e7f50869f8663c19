"""CLI: loop guard, constrained output and the svg commands."""

import json

import pytest

from reference_models import CLEAN_SEED, LOOPING_SEED, seeded_prompt

from gemmarun.cli import main


def test_svg_check_repair_and_render(tmp_path, capsys):
    bad = tmp_path / "bad.svg"
    bad.write_text('Here you go:\n<svg width="20" height="20"><line x1="0" x1="1" y1="0" x2="5" y2="5" stroke="red"/>'
                   '<g><rect width="4" height="4"/></svg>\nHope it helps!')
    assert main(["svg", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "duplicate-attribute" in out and "bad.svg:2:" in out
    fixed, png = tmp_path / "fixed.svg", tmp_path / "fixed.png"
    assert main(["svg", "repair", str(bad), "-o", str(fixed), "--png", str(png)]) == 0
    assert "fixed:" in capsys.readouterr().out
    assert main(["svg", "check", str(fixed)]) == 0
    assert png.stat().st_size > 0
    # what no repair settles and keeps the file from parsing is an exit status of 1
    hopeless = tmp_path / "ns.svg"
    hopeless.write_text('<svg xmlns="http://www.w3.org/2000/svg" xmlns:a="http://www.w3.org/1999/xlink" '
                        'xmlns:b="http://www.w3.org/1999/xlink" viewBox="0 0 9 9"><use a:href="#r" b:href="#r"/>'
                        '<rect id="r" width="1" height="1"/></svg>')
    assert main(["svg", "repair", str(hopeless), "-o", str(tmp_path / "out.svg")]) == 1
    assert "still does not parse" in capsys.readouterr().err
    assert not (tmp_path / "out.svg").exists()  # not written: -o may name the input
    # an output nowhere to be written had been a bare "[Errno 2] No such file or directory", found
    # after the repair (--png after the SVG was written; svg draw after generating): now before
    nowhere = tmp_path / "nowhere"
    for args in (["repair", str(bad), "-o", str(nowhere / "out.svg")],
                 ["repair", str(bad), "-o", str(tmp_path / "o.svg"), "--png", str(nowhere / "x.png")],
                 ["draw", "a cat", "-o", str(nowhere / "o.svg")]):
        with pytest.raises(SystemExit) as e:
            main(["svg", *args])
        assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(
            f": no folder {nowhere} to write it in (see gemmarun svg {args[0]} --help)")
    assert not (tmp_path / "o.svg").exists()


CLEAN = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 9 9"><title>caf\u00e9</title>'
         '<rect width="1" height="1"/></svg>')


def test_svg_files_are_read_and_written_in_their_own_encoding(tmp_path, capsys):
    """Read as UTF-8 with replacement, a valid UTF-16 SVG repaired onto itself had become an
    empty file, Latin-1 accents U+FFFD, and a BOM 'stray text'."""
    cases = {
        "utf16.svg": CLEAN.encode("utf-16"),
        "utf32.svg": CLEAN.encode("utf-32"),  # its mark starts with UTF-16's: it had been read as UTF-16
        "latin1.svg": ('<?xml version="1.0" encoding="ISO-8859-1"?>' + CLEAN).encode("latin-1"),
        "bom.svg": CLEAN.encode("utf-8-sig"),
        "plain.svg": CLEAN.encode(),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert main(["svg", "check", str(path)]) == 0, name
        assert main(["svg", "repair", str(path), "-o", str(path)]) == 0, name
        assert path.read_bytes() == data, name  # clean input comes back byte for byte
    capsys.readouterr()
    bad = tmp_path / "bad.svg"
    bad.write_bytes(CLEAN.encode("latin-1"))  # Latin-1 without a declaration: not UTF-8
    assert main(["svg", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not utf-8 text: byte" in err and len(err.strip().splitlines()) == 1


def test_an_endless_file_is_refused_not_read_forever(tmp_path, capsys, monkeypatch):
    """`svg check /dev/zero` (or a schema from a pipe that never ends) had read forever."""
    import gemmarun.cli as cli

    monkeypatch.setattr(cli, "TEXT_FILE_LIMIT", 2**20)  # (the default reads 64 MiB of zeros first)
    assert main(["svg", "check", "/dev/zero"]) == 1
    assert capsys.readouterr().err.strip() == "gemmarun: error: /dev/zero: over 1 MiB, not an SVG file"
    with pytest.raises(SystemExit) as e:
        main(["run", "hi", "--json-schema", "/dev/zero"])
    assert e.value.code == 2 and "/dev/zero: over 1 MiB, not a JSON schema file" in capsys.readouterr().err


def test_svg_repair_fails_when_the_result_is_no_clean_svg(tmp_path, capsys):
    page = tmp_path / "page.svg"
    page.write_text('<html><body>no drawing</body></html>')
    assert main(["svg", "repair", str(page), "-o", str(tmp_path / "out.svg")]) == 1  # it had said 0
    assert ": left: " in capsys.readouterr().out


def test_run_with_json_schema(tiny_models, tmp_path, capsys):
    folder, _ = tiny_models("e2b")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                  "required": ["ok"], "additionalProperties": False}))
    assert main(["run", str(folder), "hi", "--raw", "--json-schema", str(schema), "--max-tokens", "40",
                 "--temperature", "1", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out) in ({"ok": True}, {"ok": False})


def test_an_empty_regex_is_the_empty_answer_and_a_cut_answer_is_said(tiny_models, tmp_path, capsys):
    """`--regex ""` had been ignored (free text); a stop string that cut a constrained answer
    ended without a word, its broken JSON as if whole."""
    folder, _ = tiny_models("e2b")
    assert main(["run", str(folder), "hi", "--raw", "--regex", "", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out == "\n"
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}))
    assert main(["run", str(folder), "hi", "--raw", "--json-schema", str(schema), "--stop", ", ",
                 "--max-tokens", "40", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith('{"a": ') and "a stop string or stop token cut the answer before its grammar" in err


def test_loop_guard_on_a_model_that_truly_loops(tiny_models):
    """The tiny Gemma 3 model collapses into a loop under greedy decoding from the LOOPING_SEED
    prompt; from the CLEAN_SEED prompt it does not."""
    import gemmarun
    from gemmarun.llm import Prompt
    from gemmarun.loopguard import LoopGuard, LoopGuardConfig
    from gemmarun.sampling import SamplingParams

    folder, _ = tiny_models("gemma3")
    llm = gemmarun.load(folder, device="cpu")
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    looping, clean = seeded_prompt(LOOPING_SEED), seeded_prompt(CLEAN_SEED)
    free = llm.generate_ids(looping, max_new_tokens=150, ignore_eos=True)
    assert max(free.count(t) for t in set(free)) > 30  # a real loop without the guard

    stopped = llm.stream_prompt(Prompt(looping), params, loop_guard=LoopGuardConfig(policy="stop"))
    stopped_text = "".join(stopped)
    assert stopped.finish_reason == "loop"
    assert len(llm.tokenizer.encode(stopped_text, add_bos=False)) < 100  # stopped within a bounded number of tokens
    # LLM.stream (and so generate) says so too: it had been a plain generator, without a reason
    text_stream = llm.stream("hello", max_tokens=3, ignore_eos=True, loop_guard="stop")
    assert "".join(text_stream) and text_stream.finish_reason == "length"
    early = llm.stream("hello", max_tokens=50, ignore_eos=True)
    next(early)
    early.close()  # (as the generator it had been)
    assert list(early) == []

    recovered = llm.stream_prompt(Prompt(looping), params, loop_guard=LoopGuardConfig(policy="recover"))
    text = "".join(recovered)
    assert recovered.finish_reason == "length" and len(text) > len(stopped_text)  # it went on, unlike stop
    assert recovered.loop_recoveries >= 1 and stopped.loop_recoveries == 0
    ids = llm.tokenizer.encode(text, add_bos=False)
    guard = LoopGuard(LoopGuardConfig(policy="stop"))
    assert all(guard.push(t, llm.tokenizer.decode([t])) is None for t in ids), "recovered output still loops"

    # a prompt that does not loop is untouched by the guard
    plain = "".join(llm.stream_prompt(Prompt(clean), params))
    guarded = llm.stream_prompt(Prompt(clean), params, loop_guard=LoopGuardConfig(policy="recover"))
    assert "".join(guarded) == plain and guarded.finish_reason == "length"


def test_svg_files_that_cannot_be_read_are_named(tmp_path, capsys):
    """(Missing files and folders were bare errnos, a binary file's error named no file.)"""
    binary = tmp_path / "photo.svg"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xec\xff")
    cases = [(tmp_path / "none.svg", "none.svg: no such file"), (tmp_path, "a folder, not an SVG file"),
             (binary, "photo.svg: not utf-8 text: byte 0")]
    for path, message in cases:
        for command in (["svg", "check", str(path)], ["svg", "repair", str(path), "-o", str(tmp_path / "o.svg")]):
            assert main(command) == 1
            err = capsys.readouterr().err.strip()
            assert err.startswith("gemmarun: error: ") and message in err and len(err.splitlines()) == 1


def test_the_cli_says_when_the_loop_guard_resampled(tiny_models, monkeypatch, capsys):
    """A recovered loop had left no word: the text just jumped where the guard cut it. A model
    that writes one word whatever the guard bans: three recoveries, then the stop."""
    from gemmarun import sampling

    folder, _ = tiny_models("e2b")
    monkeypatch.setattr(sampling.Sampler, "__call__", lambda self, logits, seen, generated: 250)
    assert main(["run", str(folder), "hi", "--raw", "--temperature", "1", "--max-tokens", "200"]) == 0
    err = capsys.readouterr().err
    assert "the loop guard cut 3 repetitions and resampled past it" in err
    assert "stopped: the output started repeating itself (loop guard)" in err
