"""LoopGuard on a corpus of legitimate outputs (no alarm allowed) and of real degenerate loops
(must fire soon after the loop starts). tests/loopguard_corpus/degenerate/*.txt hold
`prefix%%LOOP%%unit`: the model writes the prefix, then the unit forever."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gemmarun.loopguard import LoopEvent, LoopGuard, LoopGuardConfig

CORPUS = Path(__file__).parent / "loopguard_corpus"
LEGIT = sorted((CORPUS / "legit").iterdir())
DEGENERATE = sorted((CORPUS / "degenerate").iterdir())
MODES = ["chunks", "chars"]
_TOKEN = re.compile(r" ?\w{1,6}| ?[^\w\s]{1,3}|\n|[^\S\n]+")  # word pieces with their leading space


def tokenize(text: str, mode: str) -> list[str]:
    """Deterministic stand-in for a subword tokenizer ("chunks"), or one token per character."""
    pieces = _TOKEN.findall(text) if mode == "chunks" else list(text)
    assert "".join(pieces) == text
    return pieces


class Vocab(dict):
    def id(self, piece: str) -> int:
        return self.setdefault(piece, len(self))


def run(guard: LoopGuard, pieces: list[str], vocab: Vocab) -> tuple[int, LoopEvent] | None:
    for i, piece in enumerate(pieces):
        event = guard.push(vocab.id(piece), piece)
        if event is not None:
            return i, event
    return None


def loop_case(path: Path, mode: str) -> tuple[list[str], list[str]]:
    prefix, unit = path.read_text(encoding="utf-8").split("%%LOOP%%")
    return tokenize(prefix, mode), tokenize(unit, mode)


def bound(path: Path, period: int, config: LoopGuardConfig) -> int:
    """Tokens of loop output (from its first token) the guard may let through."""
    if path.name.startswith("lowinfo_"):  # punctuation/whitespace/number loops get more rope
        return max(config.span_repeats * period, config.lowinfo_min_tokens) + 64
    return 3 * period + 64


def test_corpus_sizes():
    assert len(LEGIT) >= 40 and len(DEGENERATE) >= 15


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", LEGIT, ids=lambda p: p.name)
def test_no_false_positive_on_legitimate_output(path, mode):
    pieces = tokenize(path.read_text(encoding="utf-8"), mode)
    fired = run(LoopGuard(), pieces, Vocab())
    assert fired is None, f"fired at token {fired[0]}: {fired[1]}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", DEGENERATE, ids=lambda p: p.name)
def test_degenerate_loop_fires_soon(path, mode):
    config = LoopGuardConfig()
    prefix, unit = loop_case(path, mode)
    period = len(unit)  # (past max_period tokens: a "block", caught as its lines repeat)
    limit = bound(path, period, config)
    pieces = prefix + unit * (limit // period + 3)
    fired = run(LoopGuard(config), pieces, Vocab())
    assert fired is not None, "loop not detected"
    index, event = fired
    latency = index + 1 - len(prefix)
    assert 0 < latency <= limit, (latency, event)
    assert period % event.period == 0, event  # the true period or a divisor of the unit
    assert len(prefix) - period <= event.start <= len(prefix) + period, event
    kept = pieces[event.start:event.start + event.period]
    assert "".join(kept) and "".join(kept) in "".join(unit * 3)  # one copy of the loop is kept


def test_kinds_and_samples():
    def first_event(name: str) -> LoopEvent:
        prefix, unit = loop_case(CORPUS / "degenerate" / name, "chunks")
        return run(LoopGuard(), prefix + unit * 200, Vocab())[1]

    dashes = first_event("dashes_forever.txt")
    assert (dashes.kind, dashes.sample, dashes.period) == ("line", "---", 2)
    assert first_event("json_aaaa.txt").kind == "token"
    assert first_event("im_sorry.txt").kind == "ngram"
    paragraph = first_event("paragraph_repeated.txt")
    assert paragraph.kind == "span" and "The quarterly" in paragraph.sample
    assert first_event("cycle_60_tokens.txt").period == 60


def test_recover_rolls_back_to_one_copy_and_bans_the_restart():
    """A scripted 'model' loops on "---\\n" until the ban makes it write something else."""
    vocab = Vocab()
    guard = LoopGuard(LoopGuardConfig(policy="recover"))
    generated: list[str] = []
    intro = tokenize("Outline:\n\n", "chunks")

    def model_next(position: int) -> str:
        if position < len(intro):
            return intro[position]
        if vocab.id("---") in guard.banned_at(position):
            return " Done."
        return "---" if generated[-1] == "\n" else "\n"

    events = []
    while len(generated) < 200 and (not generated or generated[-1] != " Done."):
        piece = model_next(len(generated))
        generated.append(piece)
        event = guard.push(vocab.id(piece), piece)
        if event is not None:
            assert guard.can_recover()
            events.append(event)
            keep = guard.rollback(event)
            assert keep == event.start + event.period
            del generated[keep:]
            assert len(guard) == keep
    assert len(events) == 1 and guard.recoveries == 1
    assert "".join(generated) == "Outline:\n\n---\n Done."
    assert guard.banned_at(len(intro) + 2) == {vocab.id("---")}


def test_bans_accumulate_and_are_forgotten_past_a_rollback():
    guard = LoopGuard()
    for _ in range(40):
        guard.push(1, "x")
    event = LoopEvent(start=10, period=1, repeats=30, kind="token", sample="x")
    assert guard.rollback(event) == 11 and guard.banned_at(11) == {1}
    for _ in range(10):
        guard.push(2, "y")
    guard.rollback(LoopEvent(start=10, period=1, repeats=10, kind="token", sample="y"))
    assert guard.banned_at(11) == {1, 2}
    guard.truncate(5)
    assert guard.banned_at(11) == set() and len(guard) == 5
    assert guard.recoveries == 2 and not LoopGuard(LoopGuardConfig(policy="stop")).can_recover()


def test_rollback_state_matches_a_fresh_guard():
    vocab = Vocab()
    prefix, unit = loop_case(CORPUS / "degenerate" / "im_sorry.txt", "chunks")
    guard = LoopGuard()
    _, event = run(guard, prefix + unit * 50, vocab)
    keep = guard.rollback(event)
    tail = tokenize(" Let me explain why instead: the request needs a licence.", "chunks")
    for piece in tail:
        assert guard.push(vocab.id(piece), piece) is None
    fresh = LoopGuard()
    for piece in (prefix + unit * 50)[:keep] + tail:
        fresh.push(vocab.id(piece), piece)
    assert fresh._active == guard._active and fresh._ids == guard._ids


def test_separator_runs_need_more_repeats_and_ids_only_mode():
    guard = LoopGuard()
    assert all(guard.push(5, "=") is None for _ in range(511))  # a long "=====" rule is fine
    assert guard.push(5, "=") is not None  # but not forever
    no_text = LoopGuard()
    assert [no_text.push(5) for _ in range(16)][-1] is not None  # without text: a plain token
    marked = LoopGuard(LoopGuardConfig(lowinfo_ids=frozenset({5})))
    assert all(marked.push(5) is None for _ in range(300))


def test_policy_off_and_config_validation():
    guard = LoopGuard(LoopGuardConfig(policy="off"))
    assert all(guard.push(1, "a") is None for _ in range(1000))
    with pytest.raises(ValueError):
        LoopGuardConfig(policy="warn")
    with pytest.raises(ValueError):
        LoopGuardConfig(line_repeats=1)
    with pytest.raises(ValueError):
        LoopGuardConfig(ngram_max_period=600)


def test_speed_report(capsys):
    """Prints µs/token on ordinary text and while looping (no timing assertion: machines differ)."""
    vocab = Vocab()
    streams = {mode: [tokenize(p.read_text(encoding="utf-8"), mode) for p in LEGIT] for mode in MODES}
    streams["looping"] = [pre + unit * (600 // len(unit) + 1)
                          for pre, unit in (loop_case(p, "chunks") for p in DEGENERATE)]
    report = []
    for name, texts in streams.items():
        encoded = [[(vocab.id(piece), piece) for piece in text] for text in texts]
        total = sum(map(len, encoded))
        began = time.perf_counter()
        for stream in encoded:
            guard = LoopGuard(LoopGuardConfig(policy="stop"))  # keeps pushing after an event
            for token_id, piece in stream:
                guard.push(token_id, piece)
        report.append(f"{name}: {(time.perf_counter() - began) / total * 1e6:.2f} µs/token ({total} tokens)")
    with capsys.disabled():
        print("\nLoopGuard " + "; ".join(report))


def test_a_rollback_behind_what_was_sent_keeps_the_guard_in_step():
    """A loop whose first copy had already been sent is cut where the sent tokens end. The guard
    had first cut its history to one copy and could not get the rest back: it then ran 15 tokens
    short of the output, and a later loop was cut at the wrong place, deleting tokens that never
    repeated."""
    from gemmarun.control import OutputControl, Verdict

    def model(generated, bans):  # a prefix, a period-20 loop until banned, 40 distinct tokens, then 500s
        n = len(generated)
        if n < 10:
            return 100 + n
        if any(t >= 300 for t in generated):
            last = generated[-1]
            return last + 1 if 300 <= last < 339 else (777 if 500 in bans else 500)
        token = 200 + (n - 10) % 20
        return 300 if token in bans else token

    control = OutputControl(guard=LoopGuard(LoopGuardConfig(policy="recover")),
                            piece=lambda t: " " + "".join(chr(97 + int(d)) for d in str(t)))
    out = []
    for _ in range(400):
        verdict = control.push(model(control.generated, control.guard.banned_at(len(control.generated))))
        if verdict is Verdict.LOOP_STOP or len(control.generated) >= 300:
            break
        assert len(control.guard) == len(control.generated)
        if verdict is None:
            out += control.release()
    out += control.flush()
    assert [t for t in out if 300 <= t < 340] == list(range(300, 340))


class _OnlyAllows:
    """A grammar stand-in that allows only `ids` next."""

    def __init__(self, *ids: int):
        self.ids = list(ids)

    def mask(self, logits):
        import torch

        out = torch.full_like(logits, float("-inf"))
        out[self.ids] = logits[self.ids]
        return out


def test_a_ban_never_removes_the_only_token_the_grammar_allows():
    """Recovering inside a fixed-size array, the guard banned the "," that the grammar required
    (every logit -inf: a GrammarError when greedy, NaN probabilities when sampled). The grammar
    wins there; where it leaves a choice the ban still applies."""
    import torch

    from gemmarun.control import OutputControl

    guard = LoopGuard()
    guard._bans[0] = {5}  # what a rollback to position 0 leaves
    logits = torch.randn(10)
    forced = OutputControl(grammar=_OnlyAllows(5), guard=guard).mask(logits)
    assert torch.isfinite(forced).nonzero().flatten().tolist() == [5]
    choice = OutputControl(grammar=_OnlyAllows(5, 7), guard=guard).mask(logits)
    assert torch.isfinite(choice).nonzero().flatten().tolist() == [7]
    free = OutputControl(guard=guard).mask(logits)
    assert not torch.isfinite(free[5]) and torch.isfinite(free).sum() == 9


class _Scripted:
    """A grammar stand-in that allows only the script's next token (a fixed-size structure)."""

    kind, active, eos_ids, finished = "regex", True, (), False

    def __init__(self, script: list[int], choices: int = 1):
        self.script, self.choices, self.at = script, choices, 0

    def mask(self, logits):
        import torch

        out = torch.full_like(logits, float("-inf"))
        allowed = [self.script[self.at]] + [90 + k for k in range(self.choices - 1)]
        out[allowed] = logits[allowed]
        return out

    def advance(self, token: int) -> None:
        self.at += 1

    def rollback(self, n: int) -> None:
        self.at -= n


@pytest.mark.parametrize("forced", [True, False])
def test_a_repetition_the_grammar_demands_is_not_cut_again(forced):
    """A fixed-size JSON array of zeros looks like a loop. Where the rollback finds the grammar
    allowing only the banned token, the repetition is the structure's: it had been cut three
    times over, then stopped (finish "length", JSON that does not parse). Where the grammar
    leaves a choice, the loop is still cut."""
    import torch

    from gemmarun.control import OutputControl, Verdict

    script = [1, 2, 3, 4] * 50
    control = OutputControl(grammar=_Scripted(script, choices=1 if forced else 2), guard=LoopGuard())
    verdicts = []
    while len(control.generated) < len(script) and Verdict.LOOP_STOP not in verdicts:
        logits = control.mask(torch.zeros(100))
        finite = torch.isfinite(logits).nonzero().flatten().tolist()
        token = script[len(control.generated)] if script[len(control.generated)] in finite else finite[0]
        verdicts.append(control.push(token))
    if forced:
        assert verdicts.count(Verdict.ROLLBACK) == 1 and Verdict.LOOP_STOP not in verdicts
        assert control.generated == script
    else:
        assert verdicts.count(Verdict.ROLLBACK) >= 1 and control.generated != script


def _fires(text: str, mode: str = "chars") -> tuple[int, LoopEvent] | None:
    return run(LoopGuard(), tokenize(text, mode), Vocab())


@pytest.mark.parametrize("mode", MODES)
def test_a_run_of_one_digit_is_cut_before_hundreds_pass(mode):
    """(A probe's find: "title: '1000000..." from the real 270M let 448 zeros through, 512 being
    the bar of a low-information unit; digits are single tokens in Gemma's vocabularies.)"""
    prefix = tokenize("title: '1", mode)
    index, event = _fires("title: '1" + "0" * 2000, mode)
    assert event.period == 1 and index - len(prefix) < LoopGuardConfig().digit_run_tokens


def test_lines_that_count_up_are_left_alone():
    """Answer sheets, forms, table rows, code and logs count from line to line: a rule for lines
    alike but for a counting number ("52. I am sorry.") fired on them all (two reviews' finds), and
    "recover" then dropped an item without a word. Such a loop runs to max_tokens instead."""
    for row in ("{n}. I am sorry.\n", "{n}. A  B  C  D\n", "{n}) True / False\n", "| Week {n} |  |  |\n",
                "    regs[{n}] = 0;\n", "[ OK ] test case {n} passed\n", "Day {n}: rest\n"):
        assert _fires("".join(row.format(n=n) for n in range(1, 60))) is None, row


def test_a_block_longer_than_max_period_is_caught():
    """A paragraph of several lines, one copy past max_period tokens, written again and again."""
    block = "".join(f"Point {w}: the report covers the regional sales and their trends in detail.\n"
                    for w in ("one", "two", "three", "four", "five", "six", "seven", "eight"))
    assert len(block) > LoopGuardConfig().max_period
    index, event = _fires("Summary\n\n" + block * 10)
    assert event.kind == "block" and event.period == len(block) and event.start == len("Summary\n\n")
    assert index < len("Summary\n\n") + 3 * len(block) + 64


def test_blank_table_rows_get_more_rope_but_not_forever():
    row = "|      |         |         |           |\n"  # (chunks: ~9 tokens, as a real tokenizer cuts it)
    assert _fires("| a | b | c | d |\n" + row * 45, "chunks") is None  # 16 rows had been a loop
    assert _fires("| a | b | c | d |\n" + row * 80, "chunks") is not None  # (the token rules' 512)


def test_a_number_past_4300_digits_is_no_crash():
    """(A review's find: int() of a 5000-digit number raised ValueError inside the guard, failing
    the generation: 2000! has 5736 digits.)"""
    import random

    digits = "".join(random.Random(0).choice("0123456789") for _ in range(5000))
    guard = LoopGuard()
    for n in (1, 2, 3):
        for piece in tokenize(f"{n}. {digits[:-1]}{n} is it\n", "chunks"):
            guard.push(hash(piece) % 100_000, piece)
