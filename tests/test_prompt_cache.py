"""Prompt caching: a kept cache goes on as a fresh prefill of the longer prompt would, reuses only
what it can (the sliding rings' spare slots, the same media), and is off with PromptCache(0)."""

import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import WINDOW

import gemmarun
from gemmarun.cache import make_cache
from gemmarun.generate import Caching, generate_step, prefill, prefill_rest
from gemmarun.model.multimodal import AUDIO, IMAGE
from gemmarun.prompt_cache import Held, MediaItem, PromptCache, shared_prefix
from gemmarun.sampling import SamplingParams

FAMILIES = ["e2b", "31b", "26b", "gemma3"]


@pytest.fixture
def models(tiny_text_models):
    return tiny_text_models


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(20, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(model, prompt, n, pool=None):
    caching = Caching(pool, Held(prompt)) if pool is not None else None
    return list(generate_step(model, prompt, SamplingParams(max_tokens=n, ignore_eos=True), caching=caching))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kept_cache_goes_on_as_a_fresh_prefill(models, family):
    model = models(family)
    pool = PromptCache(1)
    first = _ids(3 * WINDOW + 1, seed=1)
    reply = _generate(model, first, 2 * WINDOW + 3, pool)  # past the window: the rings wrapped
    assert len(pool) == 1
    # the next turn: the reply (its last token was never fed) and new text
    second = first + reply + _ids(WINDOW + 2, seed=2)
    max_len = len(second) + 8
    cache, held = pool.lease(model, Held(second), max_len)
    assert held == len(first) + len(reply) - 1 and len(pool) == 0
    logits = prefill_rest(model, cache, held, torch.tensor(second))
    fresh = prefill(model, torch.tensor(second), make_cache(model.config, max_len))
    assert torch.allclose(logits, fresh, rtol=1e-4, atol=1e-4), (logits - fresh).abs().max()
    # and token by token, the continuation equals caching off
    pool = PromptCache(1)
    _generate(model, first, 2 * WINDOW + 3, pool)
    assert _generate(model, second, 2 * WINDOW, pool) == _generate(model, second, 2 * WINDOW)
    assert pool.reused == held


@pytest.mark.parametrize("family", ["e2b", "gemma3"])
def test_a_prompt_that_diverges_further_back_than_the_spare_slots_reuses_its_prompt_only(models, family):
    """Parting from a kept cache further back than its spare slots, inside the reply, reuses the
    prompt before the reply (the rings saved its window at the mark); it had been prefilled whole."""
    model = models(family)
    pool = PromptCache(1, spare=2)
    first = _ids(3 * WINDOW, seed=3)
    reply = _generate(model, first, 2 * WINDOW, pool)
    held_len = len(first) + len(reply) - 1
    for back, reused in ((1, None), (2, None), (4, len(first))):  # tokens of the kept cache not shared
        cut = held_len - back
        prompt = (first + reply)[:cut] + [7, 8, 9]
        expected = _generate(model, prompt, 6)
        assert _generate(model, prompt, 6, pool) == expected
        assert pool.reused == (reused or cut), back
        pool.clear()
        _generate(model, first, 2 * WINDOW, pool)


@pytest.mark.parametrize("family", ["e2b", "31b", "gemma3"])
def test_a_prompt_that_parts_just_before_the_reply_reuses_all_before_it(models, family):
    """Gemma 4's template ends a generation prompt with an empty thought channel that the history
    does not repeat: the next prompt parts from the kept cache a few tokens before the reply,
    which had long overwritten the ring. The rings save what they overwrite from the prompt's
    window (KVCache.mark), so all before the parting is reused."""
    model = models(family)
    pool = PromptCache(1, spare=3)
    first = _ids(5 * WINDOW, seed=50)  # the ring (4 + 3 slots) wrapped in the prompt and again in the reply
    reply = _generate(model, first, 4 * WINDOW, pool)
    for back in (3, 1):
        second = first[:-back] + reply + _ids(WINDOW, seed=51)
        assert _generate(model, second, 2 * WINDOW, pool) == _generate(model, second, 2 * WINDOW)
        assert pool.reused == len(first) - back
        pool.clear()
        _generate(model, first, 4 * WINDOW, pool)
    second = first[:-4] + reply  # further back than the spare slots: prefilled whole
    assert _generate(model, second, 2 * WINDOW, pool) == _generate(model, second, 2 * WINDOW)
    assert pool.reused == 0
    pool.clear()
    _generate(model, first, 4 * WINDOW, pool)
    second = first + reply[:3] + _ids(WINDOW, seed=52)  # parting inside the reply, past the spare slots
    assert _generate(model, second, 2 * WINDOW, pool) == _generate(model, second, 2 * WINDOW)
    assert pool.reused == len(first)


def test_a_mark_after_a_rewind_claims_only_what_the_ring_still_holds(models):
    """A cache cut back to a shared prefix keeps the ring's older positions only from where the
    longer content had left them: a mark set after prefilling a short rest must not promise the
    positions the ring no longer holds (a third prompt parting early read missing keys)."""
    model = models("e2b")
    pool = PromptCache(1)  # rings of 4 + 64 slots
    a = _ids(70, seed=70)
    reply = _generate(model, a, 6, pool)  # the ring wrapped: it holds positions 7.. only
    b = a[:50] + _ids(16, seed=71)
    assert _generate(model, b, 6, pool) == _generate(model, b, 6)
    assert pool.reused == 50
    c = a[:8] + _ids(10, seed=72)
    assert _generate(model, c, 6, pool) == _generate(model, c, 6)
    assert reply and pool.reused == 0


def test_a_kept_cache_grows_for_a_longer_generation(models):
    model = models("e2b")
    pool = PromptCache(1)
    first = _ids(3, seed=4)
    reply = _generate(model, first, 2, pool)  # a 5-position cache: rings capped below the window
    second = first + reply + _ids(3 * WINDOW, seed=5)
    assert _generate(model, second, 3 * WINDOW, pool) == _generate(model, second, 3 * WINDOW)
    assert pool.reused == len(first) + len(reply) - 1


def test_the_same_prompt_again_prefills_its_last_token_only(models):
    model = models("31b")
    pool = PromptCache(1)
    prompt = _ids(2 * WINDOW + 3, seed=6)
    once = _generate(model, prompt, 5, pool)
    assert _generate(model, prompt, 5, pool) == once
    assert pool.reused == len(prompt) - 1


def test_off_keeps_nothing(models):
    model = models("e2b")
    pool = PromptCache(0)
    prompt = _ids(9, seed=7)
    _generate(model, prompt, 4, pool)
    assert len(pool) == 0
    _generate(model, prompt, 4, pool)
    assert pool.reused == 0
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        PromptCache(-1)


def test_the_pool_keeps_the_most_recent_caches(models):
    model = models("e2b")
    pool = PromptCache(2)
    a, b, c = _ids(8, seed=10), _ids(8, seed=11), _ids(8, seed=12)
    for prompt in (a, b, c):
        _generate(model, prompt, 3, pool)
    assert len(pool) == 2
    _generate(model, a + [5], 2, pool)
    assert pool.reused == 0  # a's cache made room for c's, and this one's for b's
    _generate(model, c + [5], 2, pool)
    assert pool.reused == len(c)
    _generate(model, b + [5], 2, pool)
    assert pool.reused == 0


def test_conversations_that_share_only_their_start_each_keep_their_own_cache(models):
    model = models("e2b")
    pool = PromptCache(2)
    start = _ids(3, seed=30)
    chats = [start + _ids(50, seed=31), start + _ids(50, seed=32)]  # longer than CONTINUED
    replies = [_generate(model, chat, 4, pool) for chat in chats]
    assert pool.reused == len(start)  # the second found the first's start, and copied it
    for chat, reply in zip(chats, replies):
        follow = chat + reply + [9, 9]
        assert _generate(model, follow, 4, pool) == _generate(model, follow, 4)
        assert pool.reused == len(chat) + len(reply) - 1


def test_a_pool_serves_one_model(models, tiny_models):
    pool = PromptCache(1)
    prompt = _ids(9, seed=33)
    _generate(models("e2b"), prompt, 3, pool)
    other = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu").model  # same shapes
    with pytest.raises(ValueError, match="another model's caches"):
        _generate(other, prompt, 3, pool)


def test_generations_in_two_threads_each_get_their_own_cache(tiny_models):
    import threading

    llm = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    prompts = [_ids(10, seed=40 + i) for i in range(6)]
    llm.prompt_cache = PromptCache(0)
    expected = [llm.generate_ids(p + [7], max_new_tokens=3, ignore_eos=True) for p in prompts]
    llm.prompt_cache = PromptCache(2)
    errors, results = [], {}

    def work(k):
        try:
            for _ in range(4):
                for i, p in enumerate(prompts):
                    llm.generate_ids(p, max_new_tokens=3, ignore_eos=True)
                    results[(k, i)] = llm.generate_ids(p + [7], max_new_tokens=3, ignore_eos=True)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[(k, i)] == expected[i] for k in range(2) for i in range(len(prompts)))


def test_reused_counts_the_prompt_not_a_loop_rollback(tiny_models, monkeypatch):
    import gemmarun.generate as generate
    from reference_models import LOOPING_SEED, seeded_prompt

    llm = gemmarun.load(tiny_models("gemma3")[0], dtype="float32", device="cpu")
    prompt = seeded_prompt(LOOPING_SEED)
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    rollbacks = []
    settle = generate.settle

    def counting(*args):
        outcome = settle(*args)
        rollbacks.append(outcome == generate.ROLLBACK)
        return outcome

    monkeypatch.setattr(generate, "settle", counting)

    def run(pool):
        caching = Caching(pool, Held(prompt)) if pool is not None else None
        return list(generate_step(llm.model, prompt, params, control=llm.output_control(None, "recover"),
                                  caching=caching))

    plain = run(None)
    assert any(rollbacks), "the tiny gemma3 no longer loops from this prompt"
    pool = PromptCache(1)
    assert run(pool) == plain
    assert pool.reused == 0


def test_a_generation_closed_early_keeps_what_its_cache_holds(models):
    model = models("e2b")
    pool = PromptCache(1)
    prompt = _ids(10, seed=13)
    steps = generate_step(model, prompt, SamplingParams(max_tokens=20, ignore_eos=True),
                          caching=Caching(pool, Held(prompt)))
    taken = [next(steps) for _ in range(4)]
    steps.close()
    assert len(pool) == 1
    follow = prompt + taken + [9]
    assert _generate(model, follow, 4, pool) == _generate(model, follow, 4)
    assert pool.reused == len(prompt) + len(taken) - 1


# -- media ----------------------------------------------------------------------------------------


def _media_prompt(items, positions_of):
    """Held for ids with `positions_of[kind]` placeholder positions (ids 1 there, 0 elsewhere)."""
    n = 40
    ids = [0] * n
    soft = {}
    for kind, where in positions_of.items():
        for p in where:
            ids[p] = 1
        soft[kind] = np.asarray(where)
    return Held(ids, tuple(items), soft)


def test_a_cut_never_splits_a_run_of_image_soft_tokens():
    a, b, c = (MediaItem(IMAGE, 3, d) for d in (b"a", b"b", b"c"))
    where = {IMAGE: [5, 6, 7, 8, 9, 10]}  # two images back to back: one bidirectional block
    kept = _media_prompt([a, b], where)
    assert shared_prefix(kept, _media_prompt([a, c], where), 39) == 5
    assert shared_prefix(kept, _media_prompt([a, b], where), 8) == 5  # a limit inside the run


def test_soft_tokens_are_shared_only_where_their_media_item_is_the_same():
    cat, dog, tone = MediaItem(IMAGE, 3, b"cat"), MediaItem(IMAGE, 3, b"dog"), MediaItem(AUDIO, 2, b"tone")
    where = {IMAGE: [5, 6, 7, 20, 21, 22], AUDIO: [30, 31]}
    kept = _media_prompt([cat, dog, tone], where)
    assert shared_prefix(kept, _media_prompt([cat, dog, tone], where), 39) == 39
    assert shared_prefix(kept, _media_prompt([cat, cat, tone], where), 39) == 20  # the second image changed
    assert shared_prefix(kept, _media_prompt([dog, dog, tone], where), 39) == 5
    assert shared_prefix(kept, _media_prompt([cat, dog, MediaItem(AUDIO, 2, b"x")], where), 39) == 30
    # text before any media is shared whatever the media
    assert shared_prefix(Held([0] * 40), _media_prompt([cat, dog, tone], where), 39) == 5
    assert shared_prefix(kept, Held([0] * 5 + [2] * 35), 39) == 5


def test_media_items_digest_their_content(tmp_path):
    from gemmarun.processing.prompt import prepare

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    a, a_again, b = (MediaItem.of(prepare("image", tmp_path / f, 70)) for f in ("a.png", "a.png", "b.png"))
    assert a == a_again and a != b and a.kind == IMAGE and a.soft_tokens == b.soft_tokens


def test_merged_embeddings_without_their_media_are_not_cached(mm_llm, tmp_path):
    """`token_stream(ids, embeds=...)` without `held` cannot tell two images apart (their
    placeholders are pads in `ids`): such a generation leases no kept cache and keeps none."""
    from gemmarun.llm import Prompt
    from gemmarun.processing.prompt import prepare

    rng = np.random.default_rng(3)
    prompts = []
    for name in ("p", "q"):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        item = prepare("image", tmp_path / f"{name}.png", 70)
        tok = mm_llm.media_tokens
        prompts.append(Prompt([2, 40, tok.boi] + [tok.image] * item.inputs.num_soft_tokens + [tok.eoi, 50, 51], (item,)))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        outputs = {}
        for capacity in (0, 1):
            mm_llm.prompt_cache = PromptCache(capacity)
            for prompt in prompts:
                ids, embeds, blocks = mm_llm._inputs(prompt)
                outputs[capacity, prompt.media[0]] = list(mm_llm.token_stream(ids.tolist(), params, embeds=embeds,
                                                                              vision_blocks=blocks))
            assert len(mm_llm.prompt_cache) == 0
        assert all(outputs[1, p.media[0]] == outputs[0, p.media[0]] for p in prompts)
    finally:
        mm_llm.prompt_cache = PromptCache(1)


@pytest.fixture(scope="module")
def mm_llm(tmp_path_factory):
    from reference_models import build_multimodal

    folder = tmp_path_factory.mktemp("prompt-cache-mm")
    build_multimodal("e2b", folder)
    return gemmarun.load(folder, dtype="float32", device="cpu")


def test_a_chat_about_an_image_reuses_its_cache_and_answers_as_without(mm_llm, tmp_path):
    rng = np.random.default_rng(1)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    kw = dict(max_tokens=6, ignore_eos=True, image_tokens=70)

    def chat(image, pool):
        """Two turns about `image`: the replies, and the positions each turn found cached."""
        mm_llm.prompt_cache = pool
        turn = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / image)},
                                             {"type": "text", "text": "what is it"}]}]
        reply = mm_llm.generate(turn, **kw)
        reused = pool.reused
        turn += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then"}]
        return reply, mm_llm.generate(turn, **kw), reused, pool.reused

    try:
        plain = chat("x.png", PromptCache(0))
        pool = PromptCache(1)
        cached = chat("x.png", pool)
        assert cached[:2] == plain[:2]
        assert cached[2] == 0 and cached[3] > 70  # the second turn: past the image's soft tokens
        # after a chat about another image of the same size, only the text before it is reused
        # (spare ring slots enough to cut the kept cache back that far)
        pool = PromptCache(1, spare=256)
        chat("y.png", pool)
        again = chat("x.png", pool)
        assert again[:2] == plain[:2]
        assert 0 < again[2] < 10 and again[3] > 70
    finally:
        mm_llm.prompt_cache = PromptCache(1)


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_speculative_decoding_from_a_kept_cache_equals_plain_greedy(models, family):
    from test_speculative import EXACT, random_drafter

    from gemmarun.speculative import speculative_generate_step

    model, drafter = models(family), random_drafter(family, seed=3)
    pool = PromptCache(1, spare=EXACT.num_draft + 1)  # rings of 9 slots: the replies wrap them
    params = SamplingParams(max_tokens=2 * WINDOW + 3, ignore_eos=True)
    first = _ids(2 * WINDOW + 1, seed=20)
    reply = list(speculative_generate_step(model, drafter, first, params, speculation=EXACT,
                                           caching=Caching(pool, Held(first))))
    assert reply == _generate(model, first, 2 * WINDOW + 3)
    second = first + reply + _ids(WINDOW, seed=21)
    out = list(speculative_generate_step(model, drafter, second, params, speculation=EXACT,
                                         caching=Caching(pool, Held(second))))
    assert pool.reused == len(first) + len(reply) - 1
    assert out == _generate(model, second, 2 * WINDOW + 3)
    # parting just before the reply, after rounds that wrote and rolled back drafts past the mark
    third = second[:-2] + _ids(WINDOW, seed=22)
    out = list(speculative_generate_step(model, drafter, third, params, speculation=EXACT,
                                         caching=Caching(pool, Held(third))))
    assert pool.reused == len(second) - 2
    assert out == _generate(model, third, 2 * WINDOW + 3)


def test_the_chat_benchmark_script_records_identical_replies_and_the_cached_share(tiny_models, load_script,
                                                                                 tmp_path, monkeypatch):
    import gemmarun.loading.random_weights as random_weights
    from reference_models import TOWER_VISION

    # --vision times a released checkpoint's tower: a tiny one stands in for it here
    monkeypatch.setattr(random_weights, "released_config", lambda name: (name, {"vision_config": TOWER_VISION}))

    script = load_script("prompt_cache")
    out = tmp_path / "bench.md"
    folder, _ = tiny_models("e2b")
    assert script.main(["--model", str(folder), "--items", "1", "--max-tokens", "4", "--rounds", "1",
                        "--vision", "tiny", "--write", str(out)]) == 0
    assert "the tiny vision tower does not run again" in out.read_text()
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert int(rows[0][2]) == 0 and all(0 < int(r[2]) < int(r[1]) for r in rows[1:])


def test_media_sent_again_is_not_encoded_again(mm_llm, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / "z.png")
    encoded = []
    real = mm_llm.encoders.images
    monkeypatch.setattr(mm_llm.encoders, "images", lambda *a: encoded.append(1) or real(*a))
    turn = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "z.png")},
                                         {"type": "text", "text": "what is it"}]}]
    kw = dict(max_tokens=4, ignore_eos=True, image_tokens=70)
    try:
        answers = {}
        for capacity in (0, 1):
            mm_llm.prompt_cache = PromptCache(capacity)
            encoded.clear()
            first = mm_llm.generate(turn, **kw)
            second = mm_llm.generate(turn + [{"role": "assistant", "content": first},
                                             {"role": "user", "content": "more"}], **kw)
            answers[capacity] = (first, second, len(encoded))
        assert answers[1][:2] == answers[0][:2]
        assert answers[0][2] == 2 and answers[1][2] == 1
        pool = PromptCache(1, media_bytes=0)  # too small to keep any: encoded each time
        mm_llm.prompt_cache = pool
        encoded.clear()
        mm_llm.generate(turn, **kw)
        mm_llm.generate(turn, **kw)
        assert len(encoded) == 2
    finally:
        mm_llm.prompt_cache = PromptCache(1)


def test_the_batch_engine_reuses_a_prompt_that_parts_just_before_the_reply(tiny_models):
    from gemmarun.batching import BatchEngine
    from gemmarun.llm import Prompt

    llm = gemmarun.load(tiny_models("e2b")[0], dtype="float32", device="cpu")
    engine = BatchEngine(llm, prompt_caches=1)
    engine.prompt_cache = PromptCache(1, spare=3)

    def run(prompt, n):
        engine.add(Prompt(prompt), SamplingParams(max_tokens=n, ignore_eos=True))
        events = []
        while engine.busy:
            events += engine.step()
        return [e.token for e in events if e.token is not None], events[-1].cached_tokens

    first = _ids(5 * WINDOW, seed=60)
    reply, cached = run(first, 4 * WINDOW)
    assert cached == 0
    second = first[:-3] + reply + _ids(WINDOW, seed=61)
    out, cached = run(second, 2 * WINDOW)
    assert cached == len(first) - 3
    assert out == _generate(llm.model, second, 2 * WINDOW)


@pytest.mark.parametrize("family", ["e2b", "31b", "gemma3"])
def test_random_conversations_answer_as_without_caching(models, family):
    """Generations through one pool, each prompt the last one (and its reply) cut somewhere and
    continued: at the end of the reply, a few tokens before the end of the prompt (the mark),
    anywhere; small spares so the rings wrap and rewind both ways; some turns speculative."""
    import random

    from test_speculative import EXACT, random_drafter

    from gemmarun.speculative import speculative_generate_step

    model = models(family)
    drafter = random_drafter(family, seed=1) if family != "gemma3" else None
    rng = random.Random(family)
    reused = 0
    for trial in range(4):
        spare = rng.choice([5, 8, 64])
        pool = PromptCache(rng.choice([1, 3]), spare=spare)
        prompt = _ids(rng.randint(1, 40), seed=trial)
        for turn in range(5):
            n = rng.randint(1, 24)
            params = SamplingParams(max_tokens=n, ignore_eos=True)
            caching = Caching(pool, Held(prompt))
            if drafter is not None and turn % 2:
                out = list(speculative_generate_step(model, drafter, prompt, params, speculation=EXACT, caching=caching))
            else:
                out = list(generate_step(model, prompt, params, caching=caching))
            assert out == _generate(model, prompt, n), (trial, turn, spare, len(prompt), pool.reused)
            reused += pool.reused > 0
            full = prompt + out
            cut = rng.choice([len(full), len(prompt) - rng.randint(0, spare + 3), rng.randint(1, len(full))])
            prompt = full[: max(1, min(cut, len(full)))] + _ids(rng.randint(0, 12), seed=100 * trial + turn)
    assert reused >= 8


def test_the_engine_tells_images_apart_whatever_the_llms_own_cache(mm_llm, tmp_path):
    """The batch engine's pool compares media by content even where the LLM's own is off."""
    from gemmarun.batching import BatchEngine

    rng = np.random.default_rng(4)
    for name in ("u", "v"):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        mm_llm.prompt_cache = PromptCache(0)
        prompts = {image: mm_llm.build_prompt([{"role": "user", "content": [
            {"type": "image", "image": str(tmp_path / f"{image}.png")}, {"type": "text", "text": "what is it"}]}],
            image_tokens=70) for image in ("u", "v")}
        expected = {}
        for image, prompt in prompts.items():
            ids, embeds, blocks = mm_llm._inputs(prompt)
            expected[image] = list(mm_llm.token_stream(ids.tolist(), params, embeds=embeds, vision_blocks=blocks))
        assert expected["u"] != expected["v"]
        engine = BatchEngine(mm_llm, prompt_caches=2)
        for image, prompt in prompts.items():
            engine.add(prompt, params)
            tokens = []
            while engine.busy:
                tokens += [ev.token for ev in engine.step() if ev.token is not None]
            assert tokens == expected[image]
        assert len(engine.prompt_cache) == 2
    finally:
        mm_llm.prompt_cache = PromptCache(1)
