"""The server keeps finished requests' caches: a chat's next turn prefills only what is new, says so
in usage.prompt_tokens_details.cached_tokens, and answers as a fresh prefill would."""

import pytest
from serverkit import running

from gemmarun.server import ServerOptions, create_app

KW = {"model": "tiny", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}


def _two_turns(client):
    first = [{"role": "user", "content": "hello there, how are you today"}]
    r1 = client.chat.completions.create(messages=first, **KW)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "and tomorrow"}]
    return second, r1, client.chat.completions.create(messages=second, **KW)


def test_a_chats_next_turn_reuses_the_kept_cache(server, tiny_llm):
    messages, r1, r2 = _two_turns(server.client())
    prompt = tiny_llm.build_prompt(messages).ids
    first = tiny_llm.build_prompt(messages[:1]).ids
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # Gemma 4's template writes the model turn's opening differently in the history than in the
    # generation prompt: the first turn's prompt is shared up to there
    assert len(first) // 2 < cached < r2.usage.prompt_tokens == len(prompt)
    assert prompt[:cached] == first[:cached]
    assert r2.choices[0].message.content == tiny_llm.generate(messages, max_tokens=8, ignore_eos=True)
    stream = server.client().chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **KW)
    usage = list(stream)[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt again


def test_prompt_caching_off(tiny_llm):
    with running(create_app(tiny_llm, ServerOptions(model_name="tiny", prompt_caches=0))) as r:
        messages, _, r2 = _two_turns(r.client())
    assert r2.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.choices[0].message.content == tiny_llm.generate(messages, max_tokens=8, ignore_eos=True)


def test_serve_takes_the_number_of_kept_caches(tiny_models, monkeypatch, capsys):
    from serverkit import capture_serve

    from gemmarun.cli import main

    configs = []
    capture_serve(monkeypatch, configs)
    folder, _ = tiny_models("e2b")
    base = ["serve", str(folder), "--device", "cpu", "--dtype", "float32", "--port", "0"]
    assert main(base) == 0 and main(base + ["--prompt-caches", "0"]) == 0
    assert [c.app.state.scheduler.engine.prompt_cache.capacity for c in configs] == [4, 0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(base + ["--prompt-caches", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("gemmarun serve: error: argument --prompt-caches: must be at least 0")
    assert len(err.splitlines()) == 1
