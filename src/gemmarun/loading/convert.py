"""`gemmarun convert`: write a HF folder as a GGUF file in llama.cpp's conventions (spec 10).

Tensors are renamed through the one name table (`names.gemmarun_to_gguf`), streamed to disk one
at a time (never the whole model in RAM twice), 2-D and 3-D weights quantized with gguf-py's
reference quantizers, norms and scalars kept F32 as llama.cpp does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from ..config import LayerType, TextConfig, load_hf_config
from ..tokenizer import Tokenizer
from .errors import LoadError
from .hf import read_chat_template
from .names import gemmarun_to_gguf, map_hf_names, sanitize_gemma3
from .safetensors import read_folder

TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER, _BYTE = 1, 2, 3, 4, 6
# Printed specials in Gemma 4 GGUFs (spec 10.1); other added specials are CONTROL.
_GEMMA4_USER_DEFINED = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                        "<tool_response|>", '<|"|>'}


def _metadata(w: GGUFWriter, cfg: TextConfig) -> None:
    a = cfg.family
    n = cfg.num_layers
    w.add_uint32(f"{a}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{a}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{a}.block_count", n)
    w.add_uint32(f"{a}.attention.head_count", cfg.num_heads)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32(f"{a}.attention.sliding_window", cfg.sliding_window)
    w.add_float32(f"{a}.rope.freq_base", cfg.rope_full.theta)
    w.add_float32(f"{a}.rope.freq_base_swa", cfg.rope_sliding.theta)
    if cfg.final_logit_softcap:
        w.add_float32(f"{a}.final_logit_softcapping", cfg.final_logit_softcap)
    if a == "gemma3":
        if abs(cfg.attention_scale - cfg.head_dim**-0.5) > 1e-9:
            raise LoadError("convert: Gemma 3 query_pre_attn_scalar != head_dim cannot be expressed in GGUF")
        if cfg.attn_logit_softcap:
            w.add_float32(f"{a}.attn_logit_softcapping", cfg.attn_logit_softcap)
        if cfg.rope_full.factor != 1.0:
            w.add_string(f"{a}.rope.scaling.type", "linear")
            w.add_float32(f"{a}.rope.scaling.factor", cfg.rope_full.factor)
        w.add_uint32(f"{a}.feed_forward_length", cfg.intermediate_size)
        w.add_uint32(f"{a}.attention.head_count_kv", cfg.num_kv_heads)
        w.add_uint32(f"{a}.attention.key_length", cfg.head_dim)
        w.add_uint32(f"{a}.attention.value_length", cfg.head_dim)
        w.add_array(f"{a}.attention.sliding_window_pattern", [t is LayerType.SLIDING for t in cfg.layer_types])
        return
    ffn = [s.mlp_dim for s in cfg.layers]
    w.add_array(f"{a}.feed_forward_length", ffn) if len(set(ffn)) > 1 else w.add_uint32(f"{a}.feed_forward_length", ffn[0])
    kv = [s.num_kv_heads for s in cfg.layers]
    w.add_array(f"{a}.attention.head_count_kv", kv) if len(set(kv)) > 1 else w.add_uint32(f"{a}.attention.head_count_kv", kv[0])
    w.add_uint32(f"{a}.attention.key_length", cfg.global_head_dim)
    w.add_uint32(f"{a}.attention.value_length", cfg.global_head_dim)
    w.add_uint32(f"{a}.attention.key_length_swa", cfg.head_dim)
    w.add_uint32(f"{a}.attention.value_length_swa", cfg.head_dim)
    w.add_array(f"{a}.attention.sliding_window_pattern", [t is LayerType.SLIDING for t in cfg.layer_types])
    w.add_uint32(f"{a}.attention.shared_kv_layers", cfg.num_kv_shared_layers)
    w.add_uint32(f"{a}.embedding_length_per_layer_input", cfg.ple_dim)
    w.add_uint32(f"{a}.rope.dimension_count", cfg.global_head_dim)
    w.add_uint32(f"{a}.rope.dimension_count_swa", cfg.head_dim)
    if cfg.num_experts:
        w.add_uint32(f"{a}.expert_count", cfg.num_experts)
        w.add_uint32(f"{a}.expert_used_count", cfg.top_k_experts)
        w.add_uint32(f"{a}.expert_feed_forward_length", cfg.expert_dim)


def _tokenizer_metadata(w: GGUFWriter, folder: Path, cfg: TextConfig) -> None:
    tok = Tokenizer.from_hf_folder(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    size = max(max(vocab.values()), max((t["id"] for t in added.values()), default=0)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for piece, i in vocab.items():
        tokens[i] = piece
    types = [_NORMAL] * size
    for piece, i in vocab.items():
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            types[i] = _BYTE
    for content, t in added.items():
        tokens[t["id"]] = content
        if t.get("special"):
            user = cfg.family == "gemma4" and content in _GEMMA4_USER_DEFINED
            types[t["id"]] = _USER if user else _CONTROL
        else:
            types[t["id"]] = _USER
    w.add_string("tokenizer.ggml.model", "gemma4" if cfg.family == "gemma4" else "llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(size)])  # rank order, as SentencePiece scores would
    w.add_token_types(types)
    if cfg.family == "gemma4":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    if tok.unk_id is not None:
        w.add_unk_token_id(tok.unk_id)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    template = read_chat_template(folder)
    if template:
        w.add_chat_template(template)


def _target_type(gguf_name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Norms, scalars and 1-D tensors stay F32 (as llama.cpp writes them); rows that are not a
    whole number of blocks fall back to F16."""
    if len(shape) < 2 or gguf_name.endswith(("norm.weight", ".scale", "layer_output_scale.weight")):
        return GGMLQuantizationType.F32
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return GGMLQuantizationType.F16
    return qtype


def _nbytes(shape: tuple[int, ...], t: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[t]
    return int(np.prod(shape)) // block * type_size


def _encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    arr = t.float().numpy()
    if qtype == GGMLQuantizationType.F32:
        return arr.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return quantize(arr, qtype)


def convert(source: str | Path, output: str | Path, type_name: str = "f16", progress: bool = True) -> Path:
    folder, output = Path(source), Path(output)
    if type_name not in TYPES:
        raise LoadError(f"convert: --type {type_name!r} is not supported ({', '.join(TYPES)})")
    if not folder.is_dir():
        raise LoadError(f"convert: {folder} is not a HF model folder")
    cfg = load_hf_config(folder)
    state, _ignored = map_hf_names(read_folder(folder), cfg)
    if cfg.family == "gemma3":
        state = sanitize_gemma3(state, cfg)  # GGUF gemma3 norms hold 1 + w, as llama.cpp writes them
        state = {k: v for k, v in state.items() if not k.endswith("layer_scalar")}
    qtype = TYPES[type_name]

    items: list[tuple[str, np.ndarray, GGMLQuantizationType]] = []  # generated tensors
    if cfg.family == "gemma4":
        n_rot = int(cfg.rope_full.rotated_fraction * cfg.global_head_dim // 2)
        freqs = np.array([1.0] * n_rot + [1e30] * (cfg.global_head_dim // 2 - n_rot), dtype=np.float32)
        items.append(("rope_freqs.weight", freqs, GGMLQuantizationType.F32))
    names = sorted(state)

    w = GGUFWriter(output, cfg.family)
    w.add_name(folder.name)
    w.add_file_type(int(qtype))
    _metadata(w, cfg)
    _tokenizer_metadata(w, folder, cfg)
    # Tensor infos first (sizes follow from shapes), then data one tensor at a time, so memory
    # holds one encoded tensor at most.
    plan = [(name, arr, t) for name, arr, t in items]
    for name in names:
        gname = gemmarun_to_gguf(name)
        plan.append((gname, state[name], _target_type(gname, tuple(state[name].shape), qtype)))
    for gname, tensor, t in plan:
        w.add_tensor_info(gname, list(tensor.shape), np.float32, _nbytes(tuple(tensor.shape), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    start, show = time.time(), progress and sys.stderr.isatty()
    for i, (_gname, tensor, t) in enumerate(plan):
        data = tensor if isinstance(tensor, np.ndarray) else _encode(tensor, t)
        w.write_tensor_data(data)
        if show:
            done = (i + 1) / len(plan)
            print(f"\rconvert [{'#' * int(30 * done):<30}] {i + 1}/{len(plan)} tensors {time.time() - start:.0f}s",
                  end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    w.close()
    return output
