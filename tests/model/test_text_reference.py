"""The text decoder against transformers 5.23 on tiny random models of every family."""

import numpy as np
import pytest
import torch

import gemmarun
from gemmarun.cache import make_cache
from gemmarun.generate import prefill
from reference_models import WINDOW

FAMILIES = ["e2b", "e4b", "31b", "26b", "gemma3"]
SEQ = 4 * WINDOW  # well past 3x the sliding window


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(12, 256, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def loaded(tiny_models):
    cache = {}

    def get(family):
        if family not in cache:
            folder, ref = tiny_models(family)
            cache[family] = (gemmarun.load(folder, dtype="float32", device="cpu"), ref)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(loaded, family):
    llm, ref = loaded(family)
    ids = _prompt(SEQ)
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-4, f"max rel err {rel:.2e}; first values ours {ours[0, :4]} ref {theirs[0, :4]}"


def test_gemma3_scales_queries_by_query_pre_attn_scalar(tmp_path):
    """Not by head_dim: the tiny Gemma 3 sets both to 16 (GGUF can express no other), so its
    reference comparison could not tell them apart."""
    from reference_models import build_reference
    from tiny_tokenizer import write_tiny_tokenizer

    ref = build_reference("gemma3", tmp_path, query_pre_attn_scalar=24)
    write_tiny_tokenizer(tmp_path, "gemma3")
    llm = gemmarun.load(tmp_path, dtype="float32", device="cpu")
    assert llm.config.attention_scale == 24**-0.5 != llm.config.head_dim**-0.5
    ids = _prompt(SEQ)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llm.logits(ids) - theirs).max() / np.abs(theirs).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_reference(loaded, family):
    llm, ref = loaded(family)
    prompt = _prompt(SEQ, seed=1)
    n_new = 3 * WINDOW + 8
    ours = llm.generate_ids(prompt, max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    assert len(set(ours)) > 3, "degenerate continuation tests the cache poorly"


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_uncached(loaded, family):
    llm, _ = loaded(family)
    model = llm.model
    ids = _prompt(3 * WINDOW + 6, seed=2)
    full = llm.logits(ids)
    cache = make_cache(llm.config, len(ids))
    with torch.inference_mode():
        first = prefill(model, torch.tensor(ids[:3]), cache)
        np.testing.assert_allclose(first.numpy(), full[2], rtol=0, atol=1e-5)
        for pos in range(3, len(ids)):
            step = model(torch.tensor([[ids[pos]]]), torch.tensor([pos]), cache, last_only=True)[0, -1]
            np.testing.assert_allclose(step.numpy(), full[pos], rtol=0, atol=1e-5, err_msg=f"position {pos}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 3, WINDOW, 7])
def test_chunked_prefill_equals_one_shot(loaded, family, chunk):
    llm, _ = loaded(family)
    ids = torch.tensor(_prompt(3 * WINDOW + 5, seed=3))
    one = prefill(llm.model, ids, make_cache(llm.config, len(ids) + 4), chunk_size=len(ids))
    cache = make_cache(llm.config, len(ids) + 4)
    chunked = prefill(llm.model, ids, cache, chunk_size=chunk)
    np.testing.assert_allclose(chunked.numpy(), one.numpy(), rtol=0, atol=1e-5)
    # and the cache it leaves decodes the next token identically
    nxt = int(torch.argmax(one))
    ref_cache = make_cache(llm.config, len(ids) + 4)
    prefill(llm.model, ids, ref_cache, chunk_size=len(ids))
    with torch.inference_mode():
        a = llm.model(torch.tensor([[nxt]]), torch.tensor([len(ids)]), cache, last_only=True)
        b = llm.model(torch.tensor([[nxt]]), torch.tensor([len(ids)]), ref_cache, last_only=True)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,shared", [("e2b", 4), ("e4b", 5), ("31b", 0), ("gemma3", 0)])
def test_last_only_prefill_runs_the_kv_shared_tail_for_the_last_position(loaded, family, shared):
    """The tail layers write no cache, so a prefill wanting one position's logits needs them for
    that position only (the reference does the same); the logits stay those of a full forward."""
    llm, _ = loaded(family)
    model = llm.model
    n_layers = llm.config.num_layers
    assert model.shared_tail_start == n_layers - shared
    ids = _prompt(SEQ, seed=4)
    rows: dict[int, list[int]] = {}
    hooks = [layer.mlp.register_forward_hook(lambda mod, args, out, i=i: rows.setdefault(i, []).append(args[0].shape[1]))
             for i, layer in enumerate(model.layers)]
    try:
        last = prefill(model, torch.tensor(ids), make_cache(llm.config, len(ids)), chunk_size=len(ids))
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == {i: [SEQ if i < n_layers - shared else 1] for i in range(n_layers)}
    np.testing.assert_allclose(last.numpy(), llm.logits(ids)[-1], rtol=0, atol=1e-5)
