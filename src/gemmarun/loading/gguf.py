"""Load a GGUF file (architectures gemma4 and gemma3) with its weights quantized: llama.cpp's text
model (its towers in an mmproj beside it), or Ollama's, which holds its towers itself."""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..config import GEMMA3_VISION_ROPE_FACTOR, GGUF_ROPE_SCALING_KEYS, ConfigError, text_config_from_gguf
from ..llm import LLM, ModelInfo
from ..tokenizer import Tokenizer
from .build import QuantizedTensor, build_text_model
from .errors import LoadError
from .gguf_file import GGUFFile, TensorInfo
from .names import GGUF_IGNORED, MMPROJ_ARCHITECTURE, OLLAMA_PACKED_CLAMPS, gguf_to_gemmarun

_KV_TENSOR = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.")
FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def read_tensor(f: GGUFFile, info: TensorInfo, reference: bool) -> torch.Tensor | QuantizedTensor:
    """One tensor of the file: a vector read into memory, a float matrix as a view of the mapping,
    a quantized one kept quantized (with `reference`, dequantized exactly to float32)."""
    if info.ggml_type in FLOAT_TYPES and len(info.shape) <= 1:  # a vector: read, not mapped (file_rows.py)
        return torch.from_numpy(f.read(info.name)).view(FLOAT_TYPES[info.ggml_type]).view(info.shape)
    raw = torch.from_numpy(f.raw(info.name))
    if info.ggml_type in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[info.ggml_type]).view(info.shape)
    from ..quant import UnsupportedQuantType, get_format

    try:
        get_format(info.ggml_type, tensor_name=info.name)  # an unsupported type is a clear error
    except UnsupportedQuantType as e:
        raise LoadError(f"{f.path}: {e}") from None
    rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
    q = QuantizedTensor(raw.view(rows, -1), info.ggml_type, info.shape, mapped=True,
                        release=partial(f.release, info.name))
    return q.dequantize() if reference else q


def read_rope_freqs(f: GGUFFile) -> list[float] | None:
    """llama.cpp's p-RoPE divisors (`rope_freqs`), if the file has them."""
    if "rope_freqs.weight" not in f.tensors:
        return None
    return f.array("rope_freqs.weight").astype(np.float32).tolist()


def read_gguf_config(f: GGUFFile):
    shapes = {name: info.shape for name, info in f.tensors.items()}
    return text_config_from_gguf(f.metadata, shapes, read_rope_freqs(f))


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, reference: bool = False,
              mmproj: Path | None = None) -> LLM:
    f = GGUFFile(path)
    if f.metadata.get("general.architecture") == MMPROJ_ARCHITECTURE:
        raise LoadError(f"{path}: a multimodal projector (mmproj) GGUF, not a text model: load the text model's "
                        "GGUF and give this file as its mmproj (--mmproj)")
    try:
        cfg = read_gguf_config(f)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    # The tokenizer first: building it briefly takes 100-300 MiB more than it keeps, which must not
    # stack on top of the weights (it set a 4-bit E2B's load peak).
    try:
        tokenizer = Tokenizer.from_gguf_metadata(f.metadata)
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from None
    template, tool_template = (f.metadata.get(f"tokenizer.chat_template{name}") for name in ("", ".tool_use"))
    for key, value in (("", template), (".tool_use", tool_template)):
        if value is not None and not isinstance(value, str):
            raise LoadError(f"{path}: tokenizer.chat_template{key} is {type(value).__name__}, not a template string")
    f.drop_metadata("tokenizer.ggml.")
    check_head_is_tied(f)
    # The towers, checked before any weight is read: an mmproj beside the file, or Ollama's file
    # holding them itself.
    from .mmproj import open_mmproj, open_ollama_towers

    projector = open_ollama_towers(path, f, cfg, tokenizer)
    if projector is not None and mmproj is not None:
        raise LoadError(f"{path}: this file holds its own vision/audio towers (Ollama's layout) but a projector "
                        f"{mmproj} was given too (--mmproj, or a projector layer of its Ollama manifest)")
    if mmproj is not None:
        projector = open_mmproj(mmproj, cfg, tokenizer)
    if projector is not None and cfg.family == "gemma3":  # its image tokens see each other in every layer
        cfg = replace(cfg, bidirectional_vision=True)
        if projector.file is f and not any(f"gemma3.{key}" in f.metadata for key in GGUF_ROPE_SCALING_KEYS):
            # Ollama writes no RoPE scaling for Gemma 3 with vision; every such checkpoint has one
            # (the reader already gave the released sizes theirs, as Ollama does; this, any size)
            cfg = replace(cfg, rope_full=replace(cfg.rope_full, factor=GEMMA3_VISION_ROPE_FACTOR))
    towers = set(projector.names) | {OLLAMA_PACKED_CLAMPS} if projector is not None and projector.file is f else set()
    state: dict[str, torch.Tensor | QuantizedTensor] = {}
    unknown = []
    for name, info in f.tensors.items():
        if name in towers:
            continue
        ours = gguf_to_gemmarun(name)
        if ours is None:
            if name not in GGUF_IGNORED:
                unknown.append(name)
            continue
        m = _KV_TENSOR.match(ours)
        layer = int(m.group(1)) if m else cfg.num_layers
        if layer < cfg.num_layers and not cfg.layers[layer].owns_kv:
            continue  # KV-shared layer: reads its producer's keys and values (past the last layer: unexpected)
        state[ours] = read_tensor(f, info, reference)
    if unknown:
        raise LoadError(f"{path}: unknown tensors: {', '.join(unknown[:8])}")
    if cfg.family == "gemma3":
        for i in range(cfg.num_layers):  # gemma3 GGUF norms already hold 1 + w; no layer scalar
            state.setdefault(f"layers.{i}.layer_scalar", torch.ones(1))
    try:
        model = build_text_model(cfg, state, dtype=dtype, device=device)
    except LoadError as e:  # (naming the file's tensors: say which file)
        raise LoadError(f"{path}: {e}") from None
    encoders = None
    if projector is not None:
        from .mmproj import load_mmproj

        encoders = load_mmproj(projector, cfg, dtype=dtype, device=device)
    table = [(i.name, i.type_name, i.shape, i.nbytes) for i in f.tensors.values()]
    info = ModelInfo(path=path, format="gguf", chat_template=template, tensors=table, tool_template=tool_template)
    return LLM(model, tokenizer, info, encoders)


def check_head_is_tied(f: GGUFFile) -> None:
    """Gemma ties its output head to the token table. A file with its own `output.weight` (which
    llama.cpp would multiply by) is refused unless it holds the same bytes as the table."""
    head, table = f.tensors.get("output.weight"), f.tensors.get("token_embd.weight")
    if head is None:
        return
    same = (table is not None and (head.ggml_type, head.shape) == (table.ggml_type, table.shape)
            and np.array_equal(f.raw(head.name), f.raw(table.name)))
    f.release(head.name)
    if not same:
        raise LoadError(f"{f.path}: output.weight is a head untied from token_embd.weight; "
                        "Gemma ties them and gemmarun does not support an untied head")


def scan_nonfinite(path: Path, max_report: int = 5) -> list[str]:
    """Names of tensors holding NaN or inf in any block (dequantized a chunk at a time)."""
    from ..quant import dequantize

    f = GGUFFile(path)
    bad = []
    for info in f.tensors.values():
        raw = torch.from_numpy(f.raw(info.name))
        if info.ggml_type in FLOAT_TYPES:
            values = raw.view(FLOAT_TYPES[info.ggml_type])
            finite = bool(torch.isfinite(values).all())
        else:
            rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
            view = raw.view(rows, -1)
            finite = True
            for lo in range(0, rows, 4096):
                chunk = view[lo : lo + 4096]
                if not torch.isfinite(dequantize(chunk, info.ggml_type, (chunk.shape[0], info.shape[-1]))).all():
                    finite = False
                    break
        if not finite:
            bad.append(f"tensor {info.name} holds NaN or inf values")
            if len(bad) >= max_report:
                break
    return bad
