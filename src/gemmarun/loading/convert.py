"""`gemmarun convert`: write a HF folder as a GGUF file in llama.cpp's conventions (spec 10).

Tensors are renamed through the one name table (`names.gemmarun_to_gguf`), streamed to disk one
at a time (never the whole model in RAM twice), 2-D and 3-D weights quantized with gguf-py's
reference quantizers, norms and scalars kept F32 as llama.cpp does.

The GGUF conventions themselves (config metadata, vocabulary keys, which type each tensor gets,
the p-RoPE divisors) are public here because `random_weights` writes the same files.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from ..config import LayerType, TextConfig, gemma3_gguf_attention_scale, gemma3_ollama_corrections, load_hf_config
from ..outputs import cannot_write, partial_path, replaced_target
from ..tokenizer import PRINTED_SPECIALS, Tokenizer
from .errors import LoadError
from .build import check_text_state
from .hf import check_folder_files, check_tied_head, read_chat_template
from .names import HF_TOWER_PREFIXES, gemmarun_to_gguf, map_hf_names, sanitize_gemma3
from .safetensors import read_folder

TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "mxfp4": GGMLQuantizationType.MXFP4,  # 4-bit E2M1 values with a power-of-two scale per 32
}
# general.file_type in llama.cpp's own numbering, which is not the tensor types' (8 is Q8_0 as a
# tensor type but Q5_0 as a file type: llama.cpp had described our q8_0 files as Q5_0).
FILE_TYPES = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE,
    GGMLQuantizationType.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,  # (random-weights files)
}


def write_config_metadata(w: GGUFWriter, cfg: TextConfig) -> None:
    """The `<arch>.*` keys `config.text_config_from_gguf` reads back into the same TextConfig."""
    a = cfg.family
    n = cfg.num_layers
    # GGUF carries a rope factor only as Gemma 3's linear scaling of its full layers
    if cfg.rope_sliding.factor != 1.0 or (a == "gemma4" and cfg.rope_full.factor != 1.0):
        layers = "sliding" if cfg.rope_sliding.factor != 1.0 else "full"
        raise LoadError(f"convert: a rope factor on {a}'s {layers} layers cannot be expressed in GGUF")
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
        implied = gemma3_gguf_attention_scale(n, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
        if abs(cfg.attention_scale - implied) > 1e-9:
            raise LoadError(f"convert: Gemma 3 query scale {cfg.attention_scale:.6g} cannot be expressed in GGUF "
                            f"(readers derive {implied:.6g} from its shape)")
        if cfg.attn_logit_softcap:
            w.add_float32(f"{a}.attn_logit_softcapping", cfg.attn_logit_softcap)
        scaled, uncapped = gemma3_ollama_corrections(n, cfg.sliding_window, cfg.max_position_embeddings)
        if uncapped and cfg.final_logit_softcap:
            raise LoadError(f"convert: a {n}-layer Gemma 3's final softcap cannot be expressed in GGUF "
                            "(readers drop it: the released 1B has none)")
        if cfg.rope_full.factor != 1.0:
            w.add_string(f"{a}.rope.scaling.type", "linear")
            w.add_float32(f"{a}.rope.scaling.factor", cfg.rope_full.factor)
        elif scaled:  # said, or readers would take the released factor
            w.add_string(f"{a}.rope.scaling.type", "none")
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


@dataclass(frozen=True)
class Vocab:
    """What a GGUF says about its tokenizer (`tokenizer.ggml.*`), in id order."""

    tokens: list[str]
    types: list[int]  # llama.cpp token types (gguf.TokenType)
    merges: list[str]  # "left right" BPE merges; Gemma 4 only (Gemma 3 derives them)
    bos_id: int
    eos_id: int
    pad_id: int | None = None
    unk_id: int | None = None
    eot_id: int | None = None  # a second end-of-generation id (read back into TextConfig.eos_ids)
    chat_template: str | None = None
    tool_template: str | None = None  # a "tool_use" template beside the default one


def write_vocab(w: GGUFWriter, family: str, vocab: Vocab) -> None:
    w.add_string("tokenizer.ggml.model", "gemma4" if family == "gemma4" else "llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores([-float(i) for i in range(len(vocab.tokens))])  # rank order, as SentencePiece scores would
    w.add_token_types(vocab.types)
    if family == "gemma4":
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.eot_id is not None:
        w.add_eot_token_id(vocab.eot_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    named = [{"name": name, "template": t} for name, t in (("default", vocab.chat_template),
                                                          ("tool_use", vocab.tool_template)) if t]
    if named:  # (gguf-py writes "default" as tokenizer.chat_template, others as tokenizer.chat_template.NAME)
        w.add_chat_template(named)


def _hf_vocab(folder: Path, cfg: TextConfig) -> Vocab:
    tok = Tokenizer.from_hf_folder(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    # Exactly one token per embedding row, as llama.cpp's converter writes them (llama.cpp refuses a
    # list of another length): Gemma 3 4B+ has 262208 rows for 262145 tokenizer ids, the ids no
    # piece holds becoming "[PAD<id>]", UNUSED; the 270M and 1B have 262144 rows, and the
    # tokenizer's <image_soft_token> (262144), which no row embeds, is left out.
    size = cfg.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for piece, i in vocab.items():
        if i < size:
            tokens[i] = piece
            is_byte = piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6
            types[i] = int(TokenType.BYTE if is_byte else TokenType.NORMAL)
    for content, t in added.items():
        if t["id"] >= size:
            continue
        tokens[t["id"]] = content
        if t.get("special"):
            user = cfg.family == "gemma4" and content in PRINTED_SPECIALS  # USER_DEFINED, other specials CONTROL
            types[t["id"]] = int(TokenType.USER_DEFINED if user else TokenType.CONTROL)
        else:
            types[t["id"]] = int(TokenType.USER_DEFINED)
    kept = set(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    merges = [m for m in merges if set(m.split(" ")) | {m.replace(" ", "")} <= kept]  # of kept tokens only
    # config.json's end ids (e.g. [1, 106]): GGUF holds an eos and one eot, and readers join them again
    extra_ends = [e for e in dict.fromkeys(cfg.eos_ids) if e != tok.eos_id]
    if len(extra_ends) > 1:
        raise LoadError(f"convert: end ids {list(cfg.eos_ids)} do not fit GGUF's eos ({tok.eos_id}) and one eot")
    templates = read_chat_template(folder)
    return Vocab(tokens, types, merges, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                 unk_id=tok.unk_id, eot_id=extra_ends[0] if extra_ends else None,
                 chat_template=templates[0], tool_template=templates[1])


def stays_f32(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """Norm weights, scales and other 1-D tensors (multipliers near 1) and the MoE router, whose
    small differences pick other experts: always F32, as llama.cpp's converter writes them."""
    return len(shape) < 2 or gguf_name.endswith(("norm.weight", ".scale", "layer_output_scale.weight",
                                                 "ffn_gate_inp.weight"))


def target_type(gguf_name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """`stays_f32` tensors stay F32 (as llama.cpp writes them). Rows that are not a
    whole number of blocks fall back to Q8_0 when a 256-element (K-quant) block is what does not
    fit and 32 does (as llama.cpp falls back to a 32-element type), else to F16."""
    if stays_f32(gguf_name, shape):
        return GGMLQuantizationType.F32
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block == 0:
        return qtype
    q8_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
    return GGMLQuantizationType.Q8_0 if block > q8_block and shape[-1] % q8_block == 0 else GGMLQuantizationType.F16


def rope_freqs(cfg: TextConfig) -> np.ndarray:
    """Gemma 4's `rope_freqs.weight`: llama.cpp's per-pair frequency divisors for full layers,
    1.0 where the pair rotates (p-RoPE) and 1e30 (no rotation) beyond."""
    n_rot = int(cfg.rope_full.rotated_fraction * cfg.global_head_dim // 2)
    return np.array([1.0] * n_rot + [1e30] * (cfg.global_head_dim // 2 - n_rot), dtype=np.float32)


def encoded_nbytes(shape: tuple[int, ...], t: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[t]
    return int(np.prod(shape)) // block * type_size


def _encode(name: str, t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    arr = t.float().numpy()
    if not np.isfinite(arr).all():  # a broken checkpoint: its logits would be NaN
        raise LoadError(f"convert: tensor {name} holds NaN or infinite values")
    if qtype == GGMLQuantizationType.F32:
        return arr.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return quantize(arr, qtype)


def convert(source: str | Path, output: str | Path, type_name: str = "f16", progress: bool = True,
            note: Callable[[str], None] | None = None) -> Path:
    """Write the folder's text model as a GGUF; `note` hears what is left out (the towers)."""
    folder, asked, output = Path(source), output, Path(output)
    if type_name not in TYPES:
        raise LoadError(f"convert: --type {type_name!r} is not supported ({', '.join(TYPES)})")
    if not folder.is_dir():
        raise LoadError(f"convert: {folder} is not a HF model folder")
    if output.is_dir():
        raise LoadError(f"convert: {output} is a folder; give the GGUF file's name")
    try:
        output = replaced_target(asked)  # a symlink's target; no FIFO or device replaced
    except ValueError as e:
        raise LoadError(f"convert: {e}") from None
    if output.exists() and any(output.samefile(f) for f in folder.iterdir()):
        # the writer truncates its output while the source's tensors are still mapped from it
        raise LoadError(f"convert: the output {output} is one of the source folder's files")
    check_folder_files(folder)
    cfg = load_hf_config(folder)
    tensors = read_folder(folder)
    check_tied_head(tensors)
    state, ignored = map_hf_names(tensors, cfg)
    towers = sum(name.startswith(HF_TOWER_PREFIXES) for name in ignored)
    if towers and note is not None:
        note(f"the vision/audio towers ({towers} tensors) are not written: a GGUF holds the text model; "
             "keep the HF folder for image and audio input (gemmarun writes no mmproj file)")
    if cfg.family == "gemma3":
        state = sanitize_gemma3(state, cfg)  # GGUF gemma3 norms hold 1 + w, as llama.cpp writes them
    check_text_state(cfg, state)  # what loading the folder refuses is not written either
    if cfg.family == "gemma3":
        state = {k: v for k, v in state.items() if not k.endswith("layer_scalar")}
    qtype = TYPES[type_name]

    items: list[tuple[str, np.ndarray, GGMLQuantizationType]] = []  # generated tensors
    if cfg.family == "gemma4":
        items.append(("rope_freqs.weight", rope_freqs(cfg), GGMLQuantizationType.F32))
    names = sorted(state)

    # Written beside the output and renamed over it once whole: a failed or interrupted conversion
    # leaves an existing file as it was, and no half-written GGUF behind.
    partial = partial_path(output)
    try:
        w = GGUFWriter(partial, cfg.family)
        w.add_name(folder.name)
        w.add_file_type(int(FILE_TYPES[qtype]))
        write_config_metadata(w, cfg)
        write_vocab(w, cfg.family, _hf_vocab(folder, cfg))
        # Tensor infos first (sizes follow from shapes), then data one tensor at a time, so memory
        # holds one encoded tensor at most.
        plan = [(name, arr, t) for name, arr, t in items]
        for name in names:
            gname = gemmarun_to_gguf(name)
            plan.append((gname, state[name], target_type(gname, tuple(state[name].shape), qtype)))
        for gname, tensor, t in plan:
            w.add_tensor_info(gname, list(tensor.shape), np.float32, encoded_nbytes(tuple(tensor.shape), t),
                              raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        start, show = time.time(), progress and sys.stderr.isatty()
        for i, (gname, tensor, t) in enumerate(plan):
            data = tensor if isinstance(tensor, np.ndarray) else _encode(gname, tensor, t)
            w.write_tensor_data(data)
            if show:
                done = (i + 1) / len(plan)
                print(f"\rconvert [{'#' * int(30 * done):<30}] {i + 1}/{len(plan)} tensors {time.time() - start:.0f}s",
                      end="", file=sys.stderr, flush=True)
        if show:
            print(file=sys.stderr)
        w.close()
        os.replace(partial, output)
    except struct.error as e:  # a value the format's fixed-size fields cannot hold
        raise LoadError(f"convert: a value does not fit its GGUF field ({e})") from None
    except OSError as e:  # (an unwritable folder, a full disk)
        raise LoadError(f"convert: {cannot_write(output, e)}") from None
    finally:
        partial.unlink(missing_ok=True)
    return output
