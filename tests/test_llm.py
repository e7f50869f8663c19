"""The public Python API on a tiny model: ids, text, streaming, stops, errors."""

import numpy as np
import pytest
import torch

import gemmarun
from gemmarun.generate import ContextOverflow


@pytest.fixture(scope="module")
def llm(tiny_models):
    folder, _ = tiny_models("e2b")
    return gemmarun.load(folder, dtype="float32", device="cpu")


def test_logits_shape_and_dtype(llm):
    out = llm.logits([2, 20, 30, 40])
    assert out.shape == (4, 256) and out.dtype == np.float32


def test_generate_ids_uses_cache_and_is_deterministic(llm):
    prompt = [2, 50, 60, 70, 80]
    a = llm.generate_ids(prompt, max_new_tokens=12, ignore_eos=True)
    b = llm.generate_ids(prompt, max_new_tokens=12, ignore_eos=True)
    assert a == b and len(a) == 12
    # greedy from the cache equals argmax of full forwards
    seq = list(prompt)
    for tok in a[:4]:
        assert int(np.argmax(llm.logits(seq)[-1])) == tok
        seq.append(tok)


def test_seeded_sampling_reproduces(llm):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    assert llm.generate_ids([2, 9, 10], **kw) == llm.generate_ids([2, 9, 10], **kw)
    assert llm.generate_ids([2, 9, 10], **kw) != llm.generate_ids([2, 9, 10], **{**kw, "seed": 8})


def test_stream_pieces_join_to_generate(llm):
    pieces = list(llm.stream("hello world", max_tokens=16, ignore_eos=True))
    assert "".join(pieces) == llm.generate("hello world", max_tokens=16, ignore_eos=True)


def test_stop_token_ids_end_generation(llm):
    free = llm.generate_ids([2, 33, 44], max_new_tokens=10, ignore_eos=True)
    stop_at = free[3]
    cut = llm.generate_ids([2, 33, 44], max_new_tokens=10, ignore_eos=True, stop_token_ids=(stop_at,))
    assert cut == free[: free.index(stop_at)]


def test_stop_strings_cut_text(llm):
    full = llm.generate("hello", max_tokens=24, ignore_eos=True)
    assert len(full) > 4
    stop = full[2:4]
    cut = llm.generate("hello", max_tokens=24, ignore_eos=True, stop=(stop,))
    assert cut == full[: full.index(stop)]


def test_chat_messages_render_the_gemma4_turn_format(llm):
    text = llm.render_chat([{"role": "user", "content": "hi"}])
    assert text.startswith("<bos><|turn>user\nhi<turn|>\n<|turn>model\n")
    ids = llm.generate_ids(llm.encode_prompt([{"role": "user", "content": "hi"}]), max_new_tokens=4)
    assert llm.generate([{"role": "user", "content": "hi"}], max_tokens=4) == llm.tokenizer.decode(ids, skip_special=True)


def test_prompt_past_the_context_is_a_clear_error(llm):
    with pytest.raises(ContextOverflow, match="does not fit the context"):
        llm.generate_ids([5] * 300, max_new_tokens=1)


def test_bad_ids_and_params(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.logits([2, 999])
    with pytest.raises(ValueError, match="top_p"):
        llm.generate_ids([2, 5], top_p=-0.5)


def test_wrong_argument_types_are_named(llm):
    """Each had failed somewhere inside (an AttributeError, torch's messages, 'int' object is not
    iterable), or been silently truncated (float ids)."""
    cases = [
        (lambda: llm.generate("hi", grammar="{}"), "grammar must be a gemmarun.Grammar"),
        (lambda: llm.generate("hi", max_tokens=2.5), "max_tokens must be an integer, not 2.5"),
        (lambda: llm.generate("hi", top_k=2.5), "top_k must be an integer"),
        (lambda: llm.generate("hi", seed=1.5), "seed must be an integer"),
        (lambda: llm.generate("hi", temperature="hot"), "temperature must be a number, not 'hot'"),
        (lambda: llm.generate("hi", stop_token_ids=[1.0]), "stop_token_ids must be a list of integers"),
        # found by an API probe: each failed deep inside, or was read as something else
        (lambda: llm.generate("hi", stop_token_ids=5), "stop_token_ids must be a list of integers, not 5"),
        (lambda: llm.generate("hi", stop=[5]), "stop must be a string or a list of strings"),
        (lambda: llm.generate("hi", stop={"l": 1}), "stop must be a string or a list of strings"),
        (lambda: llm.logits(None), "token ids must be a sequence of integers, not NoneType"),
        (lambda: llm.generate(123), "a prompt is a string or a list of chat messages, not int"),
        (lambda: llm.logits("hello"), "token ids must be a sequence of integers, not str"),
        (lambda: llm.logits([2.0, 3.5]), r"token ids must be integers, not float \(2.0\)"),
        (lambda: llm.generate_ids([2, True]), "token ids must be integers, not bool"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(ValueError, match="stop_token_ids: token id 256 is outside the vocabulary of 256"):
        llm.generate("hi", stop_token_ids=[256])
    with pytest.raises(ValueError, match="token id -1 is negative"):
        llm.tokenizer.decode([5, -1])
    # an empty chat or a message without content had generated from a bare generation prompt
    with pytest.raises(ValueError, match="the chat has no messages"):
        llm.generate([])
    with pytest.raises(ValueError, match=r"message 0 \(user\) has no content"):
        llm.generate([{"role": "user"}])
    with pytest.raises(ValueError, match=r"one sequence \(1-D\), not a tensor of shape \[1, 2\]"):
        llm.logits(torch.tensor([[2, 20]]))
    for given in (3, 16):  # (16, the default, had passed as "not given")
        with pytest.raises(TypeError, match="give max_new_tokens or max_tokens, not both"):
            llm.generate_ids([2, 5], max_new_tokens=given, max_tokens=3)
    with pytest.raises(ValueError, match=r"not a tensor of shape \[\]"):
        llm.logits(torch.tensor(5))
    assert llm.logits(np.array([2, 20])).shape == (2, 256)  # numpy integers are ids
    assert llm.generate_ids([2, 5], max_new_tokens=np.int64(2), ignore_eos=True) == llm.generate_ids(
        [2, 5], max_new_tokens=2, ignore_eos=True)
    # numpy's ints work everywhere (a seed had reached torch's generator as np.int64: TypeError),
    # None is "none" as OpenAI clients send it, max_tokens is the other methods' name for it
    sampled = dict(temperature=1.0, ignore_eos=True)
    assert llm.generate_ids([2, 5], max_tokens=3, seed=np.int64(4), stop=None, stop_token_ids=None, **sampled) == \
        llm.generate_ids([2, 5], max_new_tokens=3, seed=4, **sampled)
    assert llm.generate("hi", max_tokens=4, stop={"zz", "yy"}) == llm.generate("hi", max_tokens=4, stop=("yy", "zz"))
    # transformers' name works in every method (generate and stream had refused it with
    # "SamplingParams.__init__() got an unexpected keyword argument"); unknown names are listed
    assert llm.generate("hi", max_new_tokens=4, ignore_eos=True) == llm.generate("hi", max_tokens=4, ignore_eos=True)
    with pytest.raises(TypeError, match="give max_new_tokens or max_tokens, not both"):
        llm.generate("hi", max_new_tokens=4, max_tokens=4)
    for call in (lambda: llm.generate("hi", top_n=3), lambda: llm.generate_ids([2, 5], top_n=3)):
        with pytest.raises(TypeError, match=r"unknown sampling option 'top_n' \(the options: max_tokens, temp"):
            call()


def test_the_repetition_penalty_counts_the_prompts_tokens(llm):
    """'seen' is prompt and reply (as in transformers): a prompt whose greedy next token is one of
    its own ids gets another token under a strong penalty from the first step on."""
    import torch

    from gemmarun.sampling import SamplingParams, apply_penalties

    def greedy_after(prompt, seen):
        last = torch.from_numpy(llm.logits(prompt)[-1])
        none = torch.tensor([], dtype=torch.long)
        return int(torch.argmax(apply_penalties(last, torch.tensor(seen), none, SamplingParams(repetition_penalty=1e3))))

    prompts = ([2, *torch.randint(5, 250, (6,), generator=torch.Generator().manual_seed(s)).tolist()] for s in range(200))
    prompt = next(p for p in prompts if int(np.argmax(llm.logits(p)[-1])) in p)  # its own id comes next
    expected = greedy_after(prompt, prompt)
    assert expected != int(np.argmax(llm.logits(prompt)[-1]))
    assert llm.generate_ids(prompt, max_new_tokens=1, ignore_eos=True, repetition_penalty=1e3) == [expected]


def test_the_lower_level_streams_take_what_stream_takes_or_say_what_they_want(llm, tmp_path, monkeypatch):
    """From an API probe: stream_reply/stream_prompt failed on a gemmarun.Grammar ("'Grammar' object
    has no attribute 'mask'"), on messages ("'list' object has no attribute 'ids'") and on a dict
    of options; loop_guard=False failed on "'bool' object has no attribute 'policy'";
    generate_ids(stop=...) ignored its stop strings; load("~/model") and hub ids said only
    "no such file or folder"."""
    from gemmarun import Grammar, SamplingParams

    messages = [{"role": "user", "content": "Pick a word"}]
    grammar = Grammar.regex("[a-z]{4}")
    params = SamplingParams(max_tokens=10)
    constrained = llm.generate(messages, grammar=grammar, max_tokens=10)
    assert len(constrained) == 4 and constrained.isalpha()
    prompt = llm.build_prompt(messages)
    assert "".join(llm.stream_prompt(prompt, params, grammar=grammar)) == constrained
    assert "".join(d.content for d in llm.stream_reply(prompt, params, grammar=grammar)) == constrained
    for bad, problem in (((messages, params), "prompt must be a Prompt: LLM.build_prompt"),
                         ((prompt, {"max_tokens": 3}), "params must be a gemmarun.SamplingParams"),
                         ((prompt, params, "[a-z]"), "grammar must be a gemmarun.Grammar")):
        with pytest.raises(TypeError, match=problem):
            next(iter(llm.stream_reply(*bad)))
    plain = llm.generate("hi", max_tokens=4, ignore_eos=True)
    assert llm.generate("hi", max_tokens=4, ignore_eos=True, loop_guard=False) == plain
    assert llm.generate("hi", max_tokens=4, ignore_eos=True, loop_guard=True) == plain
    with pytest.raises(ValueError, match="loop_guard='sometimes' is not 'recover', 'stop' or 'off'"):
        llm.generate("hi", loop_guard="sometimes")
    with pytest.raises(ValueError, match="generate_ids matches no stop strings"):
        llm.generate_ids([2, 5], stop=[","])
    from gemmarun.processing.image import check_budget  # (the message had named encode_image's max_soft_tokens)

    with pytest.raises(ValueError, match=r"an image's soft-token budget must be one of \(70, 140, 280, 560, 1120\)"):
        check_budget(99)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").symlink_to(llm.info.path)
    assert gemmarun.load("~/m").info.path == tmp_path / "m"
    with pytest.raises(gemmarun.LoadError, match=r"downloads nothing: fetch it first, e\.g\. `hf download "
                                                r"google/gemma-4-E2B-it --local-dir DIR`"):
        gemmarun.load("google/gemma-4-E2B-it")
