"""The reply splitter on canned token streams: thinking, tool calls, stop strings and special
tokens, checked against `chat.parse_reply` on the same text."""

import pytest
from serverkit import write_printed_tokenizer

from gemmarun.chat import parse_reply
from gemmarun.reply import ReplyStream
from gemmarun.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("printed-tok")
    write_printed_tokenizer(folder)
    t = Tokenizer.from_hf_folder(folder)
    assert t.token_to_id("<|tool_call>") not in t.control_ids  # printed, as in real vocabularies
    return t


def run(tok, text, **kw):
    """Feeds the ids of `text` one by one; returns (content, reasoning, calls, deltas, done)."""
    stream = ReplyStream(tok, **kw)
    deltas = []
    for i in tok.encode(text, add_bos=False):
        deltas.append(stream.push(i))
        if stream.done:
            break
    done = stream.done
    deltas.append(stream.finish())
    content = "".join(d.content for d in deltas)
    reasoning = "".join(d.reasoning for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    return content, reasoning, calls, deltas, done


CASES = [
    "Hello world",
    "  \n Hi there  \n",
    "<|channel>thought\nLet me think.\n<channel|>The answer is 4.",
    "<|channel>thought\n<channel|>Plain answer after an empty thought.",
    "<|channel>thought\nfirst <channel|>middle <|channel>thought\nsecond<channel|> end",
    "<|channel>thought\nstill thinking when tokens ran out",
    "<|channel>no label here<channel|>ok",
    'Sure.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|><|tool_response>',
    '<|tool_call>call:a{x:[1,2.5,true,null],y:{z:<|"|>q, r<|"|>}}<tool_call|><|tool_call>call:b{}<tool_call|>',
    ("<|channel>thought\nI need the weather.<channel|>"
     '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>'),
    "héllo ßtraße",
    # parse_reply had kept the markers of these (the stream drops them): now the same text
    'Try <|tool_call>call:get_weather{city:<|"|>Par<tool_call|> again',
    'Before <|tool_call>call:f{a:<|"|>cut off by the end of the reply',
    "stray <channel|> and <tool_response|> and <|tool> markers",
    # JSON-quoted string values (as transformers' parser reads them) and numbers past float's range
    '<|tool_call>call:get_weather{city:"Paris",note:"a \\"quoted\\" word"}<tool_call|>',
    "<|tool_call>call:f{x:1e400,y:-1e999,z:2}<tool_call|>",
]


@pytest.mark.parametrize("text", CASES)
def test_matches_parse_reply(tok, text):
    content, reasoning, calls, deltas, _ = run(tok, text, tools=True)
    ref = parse_reply(text)
    assert content == ref.content
    assert (reasoning or None) == ref.reasoning
    assert calls == ref.tool_calls
    for d in deltas:  # no marker text ever reaches a client
        assert "<|" not in d.content + d.reasoning and "|>" not in d.content + d.reasoning


def test_tool_arguments_are_always_json(tok):
    """1e400 had come back as Infinity (not JSON); "Paris" in plain quotes had made the call text."""
    import json

    _, _, calls, _, _ = run(tok, '<|tool_call>call:f{x:1e400,y:-1e999,z:2,city:"Paris"}<tool_call|>', tools=True)
    assert [c.arguments for c in calls] == [{"x": "1e400", "y": "-1e999", "z": 2, "city": "Paris"}]
    json.loads(json.dumps(calls[0].arguments, allow_nan=False))
    big = "9" * 400  # an int past float's range is JSON (its check had raised OverflowError)
    assert run(tok, f"<|tool_call>call:f{{n:{big}}}<tool_call|>", tools=True)[2][0].arguments == {"n": int(big)}


def test_tool_call_ends_the_reply_and_parses_arguments(tok):
    content, _, calls, _, done = run(tok, 'Sure.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}'
                                          "<tool_call|><|tool_response>ignored after the marker", tools=True)
    assert done and content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})]


def test_malformed_call_stays_in_the_answer_without_markers(tok):
    content, _, calls, _, _ = run(tok, 'Try <|tool_call>call:oops{city:<|"|>Par<tool_call|> done', tools=True)
    assert calls == [] and content == 'Try call:oops{city:"Par done'


def test_without_tools_the_syntax_is_text(tok):
    content, _, calls, _, _ = run(tok, "<|tool_call>call:f{a:1}<tool_call|>")
    assert calls == [] and content == "call:f{a:1}"


def test_stop_strings_cut_the_answer_not_the_reasoning(tok):
    text = "<|channel>thought\nsay STOP now<channel|>Hello STOP world"
    content, reasoning, _, _, done = run(tok, text, stop=("STOP",))
    assert done and content == "Hello" and reasoning == "say STOP now"
    content, *_ = run(tok, "abcSTxSTOP", stop=("STOP", "zz"))
    assert content == "abcSTx"


def test_special_tokens_never_print(tok):
    ids = tok.encode("Hi", add_bos=False) + [tok.token_to_id(t) for t in ("<bos>", "<|image|>", "<start_of_turn>",
                                                                           "<|turn>", '<|"|>')]
    ids += tok.encode(" there", add_bos=False)
    stream = ReplyStream(tok)
    out = "".join(stream.push(i).content for i in ids) + stream.finish().content
    assert out == "Hi there"


def test_raw_mode_keeps_whitespace_and_drops_markers(tok):
    content, reasoning, *_ = run(tok, "  a <|channel>b<channel|> c \n", chat=False)
    assert content == "  a b c \n" and reasoning == ""


def test_byte_tokens_are_joined_into_characters(tok):
    text = "ß and é"
    ids = tok.encode(text, add_bos=False)
    assert any(tok.is_byte_token(i) for i in ids)
    stream = ReplyStream(tok)
    pieces = [stream.push(i).content for i in ids] + [stream.finish().content]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("chat", [True, False])
def test_a_special_token_inside_a_characters_bytes_does_not_cut_it(tok, chat):
    """Specials print nothing, and as in `decode(skip_special=True)` and the Python API's stream
    they do not end a byte run; the server had flushed it, turning 'ß' into two U+FFFD."""
    from gemmarun.tokenizer import IncrementalDecoder

    ids = tok.encode("ß!", add_bos=False)
    first_byte = next(k for k, i in enumerate(ids) if tok.is_byte_token(i))
    special = next(i for i in sorted(tok.control_ids) if tok.token_to_id("<|channel>") != i)
    ids.insert(first_byte + 1, special)
    stream = ReplyStream(tok, chat=chat)
    text = "".join([stream.push(i).content for i in ids] + [stream.finish().content])
    api = IncrementalDecoder(tok)
    assert text == "ß!" == tok.decode(ids, skip_special=True) == "".join(map(api.push, ids)) + api.flush()
