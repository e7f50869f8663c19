"""Tiny but complete GGUF files (Gemma 3 and Gemma 4, zero weights, a few KB), written with the
converter's own metadata writers: what the loader accepts, for tests that corrupt one detail
and for the fuzzers' seed corpus."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from gemmarun.config import LayerType, RopeConfig, TextConfig
from gemmarun.loading.convert import Vocab, encoded_nbytes, rope_freqs, write_config_metadata, write_vocab
from gemmarun.loading.names import gemmarun_to_gguf
from gemmarun.model.text import TextModel


def tiny_config(family: str, width: int) -> TextConfig:
    """Two layers (sliding, full) of `width` hidden units; a single full layer at width >= 32
    (where Q8_0 blocks fit), to keep that file small too."""
    gemma4 = family == "gemma4"
    layer_types = (LayerType.SLIDING, LayerType.FULL) if width < 32 else (LayerType.FULL,)
    return TextConfig(
        family=family, vocab_size=16, hidden_size=width, num_layers=len(layer_types), num_heads=2,
        num_kv_heads=1, head_dim=4, intermediate_size=width, layer_types=layer_types,
        sliding_window=4, rope_sliding=RopeConfig(1e4),
        rope_full=RopeConfig(1e6, rotated_fraction=0.5 if gemma4 else 1.0),
        attention_scale=1.0 if gemma4 else 4**-0.5, global_head_dim=8 if gemma4 else None,
        has_v_norm=gemma4, max_position_embeddings=64,
    )


def tiny_vocab(family: str) -> Vocab:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    specials += ["<|turn>", "<turn|>"] if family == "gemma4" else ["<start_of_turn>", "<end_of_turn>"]
    pieces = ["\u2581", "a", "b", "ab", "\u2581a", "<0x00>", "<0x41>", "<0xC3>", "<0xA9>", "  "]
    return Vocab(tokens=specials + pieces, types=[3] * len(specials) + [1] * len(pieces),
                 merges=["a b", "\u2581 a"], bos_id=2, eos_id=1, pad_id=0, unk_id=3, eot_id=5,
                 chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def _set(w: GGUFWriter, key: str, value: Any) -> None:
    """Write `value` under `key` with the GGUF type Python's type suggests; None removes it."""
    if value is None:
        w.kv_data[0].pop(key, None)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_uint32 if 0 <= value < 2**32 else w.add_uint64 if value >= 0 else w.add_int64)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def tiny_gguf(family: str, qtype: GGMLQuantizationType = GGMLQuantizationType.F16,
              metadata: dict[str, Any] | None = None, rename: dict[str, str] | None = None,
              extra: dict[str, tuple[tuple[int, ...], GGMLQuantizationType]] | None = None) -> bytes:
    """A loadable GGUF of a tiny `family` model: norms F32, matrices `qtype` where rows allow.
    `metadata` overrides keys (None drops one), `rename` renames tensors and `extra` adds zero
    tensors (shape, type), to break one detail of a good file."""
    cfg = tiny_config(family, 32 if qtype == GGMLQuantizationType.Q8_0 else 8)
    state = TextModel(cfg).state_dict()
    plan = []
    if family == "gemma4":
        plan.append(("rope_freqs.weight", rope_freqs(cfg), GGMLQuantizationType.F32))
    for name in sorted(state):
        if family == "gemma3" and name.endswith("layer_scalar"):
            continue  # gemma3 GGUFs carry none
        shape = tuple(state[name].shape)
        quantizable = len(shape) == 2 and shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0
        kind = qtype if quantizable else GGMLQuantizationType.F32
        plan.append((gemmarun_to_gguf(name), np.zeros(shape, np.float32), kind))
    plan = [((rename or {}).get(name, name), arr, kind) for name, arr, kind in plan]
    plan += [(name, np.zeros(shape, np.float32), kind) for name, (shape, kind) in (extra or {}).items()]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.gguf"
        w = GGUFWriter(path, family)
        write_config_metadata(w, cfg)
        write_vocab(w, family, tiny_vocab(family))
        for key, value in (metadata or {}).items():
            _set(w, key, value)
        for name, arr, kind in plan:
            w.add_tensor_info(name, list(arr.shape), np.float32, encoded_nbytes(arr.shape, kind), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, arr, kind in plan:
            raw = arr if kind == GGMLQuantizationType.F32 else np.zeros(encoded_nbytes(arr.shape, kind), np.uint8)
            w.write_tensor_data(raw)
        w.close()
        return path.read_bytes()


def resident_kib(path) -> int:
    """KiB of `path`'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def rewrite_gguf(src, dst, meta=None, drop=(), tensors=None):
    """A copy of a float GGUF with metadata set ({key: (value, GGUFValueType)} or None to drop it),
    tensors dropped, replaced or added ({name: array})."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    fields = {k: (f.contents(), f.types[0], f.types[-1]) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    for key, setting in (meta or {}).items():  # None drops the key
        fields.pop(key) if setting is None else fields.__setitem__(key, (*setting, None))
    w = GGUFWriter(str(dst), fields.pop("general.architecture")[0])
    for key, (value, vtype, sub) in fields.items():
        w.add_key_value(key, value, vtype, sub_type=sub if vtype == GGUFValueType.ARRAY else None)
    tensors = dict(tensors or {})
    for t in r.tensors:
        if t.name not in drop:
            data = np.array(t.data).reshape([int(n) for n in reversed(t.shape)])
            w.add_tensor(t.name, tensors.pop(t.name, data))
    for name, data in tensors.items():  # new ones
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
