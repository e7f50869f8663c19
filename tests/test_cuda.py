"""The CUDA path: the same models on a GPU give the CPU's results, and the PLE table never goes
to GPU memory (only the rows a step gathers do). Skipped where torch sees no CUDA device; the
device-handling code these tests guard also runs on the CPU in every other test."""

import warnings

import numpy as np
import pytest
import torch
from reference_models import config_dict

import gemmarun
from gemmarun.cache import make_cache
from gemmarun.config import text_config_from_hf
from gemmarun.generate import prefill
from gemmarun.loading.random_weights import write_random_gguf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(12, 256, (n,), generator=g).tolist()


def _cuda_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(), *module.buffers()) if t.device.type == "cuda"]


@pytest.mark.parametrize("family", ["e2b", "26b", "gemma3"])
def test_float32_on_cuda_matches_the_cpu_and_the_reference(tiny_models, family):
    folder, ref = tiny_models(family)
    cpu = gemmarun.load(folder, dtype="float32", device="cpu")
    gpu = gemmarun.load(folder, dtype="float32", device="cuda")
    assert gpu.model.device.type == "cuda"
    ids = _prompt(16)
    ours, theirs = gpu.logits(ids), cpu.logits(ids)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    prompt = _prompt(16, seed=1)
    n_new = 20
    tokens = gpu.generate_ids(prompt, max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert tokens == expected


def test_ple_table_stays_in_host_memory_on_cuda(tiny_models):
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, dtype="float32", device="cuda")
    ple = llm.model.ple
    assert ple.table.device.type == "cpu"
    table_ptr = ple.table.data_ptr()
    assert all(t.data_ptr() != table_ptr for t in _cuda_tensors(llm.model))
    held = sum(t.numel() * t.element_size() for t in _cuda_tensors(llm.model))
    # a first generation allocates what any would (cuBLAS's workspace, up to 32 MiB, is counted)
    llm.generate_ids(_prompt(12), max_new_tokens=4, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert before >= held
    llm.generate_ids(_prompt(12), max_new_tokens=4, temperature=0.0, ignore_eos=True)
    assert ple.table.device.type == "cpu"
    # what a generation leaves on the GPU is its own, not a copy of the table
    assert torch.cuda.memory_allocated() - before < ple.table_nbytes()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_gguf_on_cuda_matches_the_cpu(tmp_path, qtype):
    cfg = text_config_from_hf(config_dict("e2b"))
    path = write_random_gguf(cfg, tmp_path / "m.gguf", qtype)
    cpu = gemmarun.load(path, dtype="float32", device="cpu", reference=True)  # exact float32 weights
    gpu = gemmarun.load(path, dtype="float32", device="cuda")  # float32 tiles: the same values
    ids = _prompt(20, seed=2)
    ours, theirs = gpu.logits(ids), cpu.logits(ids)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    assert gpu.model.ple.table.device.type == "cpu"
    prompt = _prompt(8, seed=3)
    assert (gpu.generate_ids(prompt, max_new_tokens=8, temperature=0.0, ignore_eos=True)
            == cpu.generate_ids(prompt, max_new_tokens=8, temperature=0.0, ignore_eos=True))


def test_bfloat16_default_on_cuda_runs(tiny_models):
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cuda")  # the GPU's default dtype
    assert llm.model.dtype == torch.bfloat16
    cpu = gemmarun.load(folder, dtype="float32", device="cpu")
    ids = _prompt(16, seed=4)
    ours, theirs = llm.logits(ids), cpu.logits(ids)
    assert np.isfinite(ours).all()
    # bfloat16 on the CPU is 0.09 off float32 on this tiny model: rounding, not a wrong formula
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 0.2


@pytest.mark.parametrize("family", ["gemma3", "31b"])
def test_a_decode_step_waits_on_the_gpu_at_most_once(tiny_models, family):
    """The positions come to the host once a forward (the caches place keys by them); no layer
    reads a device tensor after that, so the CPU keeps queueing kernels while the GPU runs."""
    folder, _ = tiny_models(family)
    llm = gemmarun.load(folder, dtype="float32", device="cuda")
    model = llm.model
    ids = _prompt(8, seed=5)
    cache = make_cache(llm.config, 16, dtype=model.dtype, device="cuda")
    with torch.inference_mode():
        prefill(model, torch.tensor(ids, device="cuda"), cache)  # the first forward's one-time lookups
        token = torch.tensor([[ids[0]]], device="cuda")
        position = torch.tensor([len(ids)], device="cuda")
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(token, position, cache, last_only=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs
