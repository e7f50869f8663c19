"""Turn a renamed state dict into a ready TextModel: build on `meta`, swap in quantized modules
where the checkpoint is quantized, assign, and check strictly."""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import TextConfig
from ..model.text import TextModel
from .errors import LoadError
from .file_rows import rows_reader
from .names import gemmarun_to_gguf, is_norm_weight

PLE_TABLE = "ple.table"


@dataclass(frozen=True)
class QuantizedTensor:
    """Raw GGUF block bytes (uint8, one row of blocks per output row) and what they encode."""

    raw: torch.Tensor  # (rows, bytes per row), a view of the memory-mapped file
    ggml_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # logical PyTorch shape
    # Whether `raw` is a view of a memory-mapped file that outlives the model (then CPU MoE experts
    # may be read where they lie instead of copied).
    mapped: bool = False
    # Called once the bytes were repacked, to give their pages of the mapping back.
    release: Callable[[], None] | None = field(default=None, compare=False)

    def dequantize(self) -> torch.Tensor:
        from ..quant import dequantize

        return dequantize(self.raw, self.ggml_type, self.shape)


Tensorish = torch.Tensor | QuantizedTensor


def return_freed_heap() -> None:
    """Give the heap that repacking's temporaries freed back to the OS (glibc keeps it: measured
    160 MiB of a 4-bit E2B's 1.7 GiB RSS after load). A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _problems(expected: dict[str, torch.Tensor], state: dict[str, Tensorish]) -> list[str]:
    """Missing, unexpected and misshapen tensors, and integers where floats belong, listed together."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    integers = sorted(
        f"{k} ({str(state[k].dtype).removeprefix('torch.')})"  # (a cast had made garbage of them)
        for k in set(state) & set(expected)
        if isinstance(state[k], torch.Tensor) and expected[k].is_floating_point() and not state[k].is_floating_point()
    )
    problems = []
    for label, names in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong),
                         ("integer values where floats belong", integers)):
        if names:
            problems.append(f"{label}: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else ""))
    return problems


def _check(cfg: TextConfig, expected: dict[str, torch.Tensor], state: dict[str, Tensorish],
           ple_table: Tensorish | None) -> None:
    problems = _problems(expected, state)
    if cfg.ple_dim:
        want = (cfg.ple_vocab_size, cfg.num_layers * cfg.ple_dim)
        if ple_table is None:
            problems.append("missing tensors: the PLE table (embed_tokens_per_layer)")
        elif tuple(ple_table.shape) != want:
            problems.append(f"wrong shapes: PLE table {tuple(ple_table.shape)} (expected {want})")
    if problems:
        raise LoadError("; ".join(problems))


def check_text_state(cfg: TextConfig, state: dict[str, Tensorish]) -> None:
    """LoadError unless `state` (gemmarun names) has exactly the text model's tensors, PLE table
    included, in their shapes, floats where the model holds floats (what convert writes too)."""
    with torch.device("meta"):
        model = TextModel(cfg)
    state = dict(state)
    _check(cfg, model.state_dict(), state, state.pop(PLE_TABLE, None))


def check_encoder_state(encoders: torch.nn.Module, state: dict[str, Tensorish]) -> None:
    """LoadError unless `state` (real or meta tensors) has exactly the towers' names and shapes."""
    problems = _problems(encoders.state_dict(), state)
    if problems:
        raise LoadError("encoders: " + "; ".join(problems))


def encoders_class(mm_cfg) -> type[nn.Module]:
    """The towers' module for a media config: `Encoders` (Gemma 4), `UnifiedEncoders`
    (gemma4_unified), `Gemma3Encoders` (Gemma 3's SigLIP)."""
    from ..model.gemma3_vision import Gemma3Encoders, Gemma3MediaConfig
    from ..model.multimodal import Encoders
    from ..model.unified import UnifiedConfig, UnifiedEncoders

    return {UnifiedConfig: UnifiedEncoders, Gemma3MediaConfig: Gemma3Encoders}.get(type(mm_cfg), Encoders)


def build_encoders(mm_cfg, text_cfg: TextConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype,
                   device: torch.device):
    """The vision/audio towers (gemmarun names = HF names minus `model.`), checked strictly."""
    cls = encoders_class(mm_cfg)
    with torch.device("meta"):
        encoders = cls(mm_cfg, text_cfg.hidden_size)
    check_encoder_state(encoders, state)
    state = {k: (t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t) for k, t in state.items()}
    encoders.load_state_dict(state, strict=True, assign=True)
    return encoders.to(device).eval()


def _swap_quantized(model: TextModel, name: str, q: QuantizedTensor, dtype: torch.dtype,
                    device: torch.device) -> bool:
    """Replace the module owning `name` by its quantized counterpart. Returns whether the
    bytes stay in use where they are (CPU MoE experts read in place) rather than copied."""
    from ..quant import QuantEmbedding, QuantExperts, QuantLinear

    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(owner, nn.Linear) and leaf == "weight":
        out_f, in_f = q.shape
        model.set_submodule(owner_name, QuantLinear.from_raw(q.raw, q.ggml_type, out_f, in_f, dtype))
    elif name == "embed_tokens.weight":
        rows, dim = q.shape
        model.embed_tokens = QuantEmbedding.from_raw(q.raw, q.ggml_type, rows, dim, dtype)
    elif leaf in ("gate_up_proj", "down_proj") and owner_name.endswith("experts"):
        experts = QuantExperts.ensure(model, owner_name, dtype)
        return experts.set_weight(leaf, q, keep_mapped=device.type == "cpu" and q.mapped)
    else:
        raise LoadError(f"tensor {gemmarun_to_gguf(name)} is quantized ({q.ggml_type.name}) where gemmarun "
                        "needs floats (llama.cpp keeps norms and scales in F32)")
    return False


def compute_dtypes(dtype: torch.dtype, device: torch.device, state: dict[str, Tensorish]
                   ) -> tuple[torch.dtype, torch.dtype]:
    """(compute, prefill GEMMs) for compute `dtype`. bfloat16 on a CPU pays only in the matrix
    units, and only in prefill: a model whose matrices are quantized computes in float32 but for
    its prefill tiles (any product over NATIVE_MAX_ROWS rows), which multiply in bfloat16. Its
    decode is then float32's: the native step with int16-rounded activations (the 270M decoded
    55 tok/s all-bfloat16 against 89; with int8 ones in the native step the 4-bit E2B decoded
    ~10 % slower). Its few float matrices (llama.cpp keeps MoE routers and some small
    projections float) are float32 too. A model with float matrices of any size (a tenth of its
    matrix weights or more) computes all in `dtype`."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return dtype, dtype
    quantized = floats = 0  # matrix weights, the token table (lookups and the head) aside
    for name, t in state.items():
        if len(t.shape) >= 2 and name not in (PLE_TABLE, "embed_tokens.weight"):
            if isinstance(t, QuantizedTensor):
                quantized += math.prod(t.shape)
            else:
                floats += math.prod(t.shape)
    return (torch.float32, torch.bfloat16) if quantized and floats < quantized / 9 else (dtype, dtype)


def build_text_model(
    cfg: TextConfig,
    state: dict[str, Tensorish],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> TextModel:
    """Assign `state` (gemmarun names) to a fresh model without materialising random weights.

    Float tensors are cast to the compute dtype (`compute_dtypes`; a copy only when the dtype
    differs, otherwise they stay views of the memory-mapped file), except norm weights, which stay
    float32 as the norm computes. Quantized tensors replace their module with a quantized one that
    keeps the blocks. The PLE table is kept as stored, on the CPU.
    """
    check_text_state(cfg, state)
    with torch.device("meta"):
        model = TextModel(cfg)
    state = dict(state)
    ple_table = state.pop(PLE_TABLE, None)

    from ..quant import QuantExperts, QuantLinear

    quantized = {name: t for name, t in state.items() if isinstance(t, QuantizedTensor)}
    dtype, prefill_dtype = compute_dtypes(dtype, device, state)
    for i, (name, q) in enumerate(quantized.items()):
        in_place = _swap_quantized(model, name, q, dtype, torch.device(device))
        if q.release is not None and not in_place:
            q.release()
        if i % 32 == 31:
            return_freed_heap()
    swapped = {name.rpartition(".")[0] for name in quantized}
    if prefill_dtype != dtype:
        for module in model.modules():
            if type(module) is QuantLinear:
                module.prefill_dtype = prefill_dtype
    floats = {}
    for name, t in state.items():
        if name in quantized:
            continue
        if is_norm_weight(name):  # the norm computes in float32 (and Gemma 3's 1 + w is exact there)
            t = t.float()
        elif t.dtype != dtype:
            t = t.to(dtype)
        owner_name, _, leaf = name.rpartition(".")
        if owner_name in swapped and isinstance(model.get_submodule(owner_name), QuantExperts):
            model.get_submodule(owner_name).set_weight(leaf, t)  # a float projection beside a quantized one
            continue
        floats[name] = t
    missing, unexpected = model.load_state_dict(floats, strict=False, assign=True)
    # Quantized modules own their (differently named) buffers; everything else must be assigned.
    leftover = [k for k in missing if k.rpartition(".")[0] not in swapped
                and not any(k.startswith(owner + ".") for owner in swapped)]
    if leftover or unexpected:
        raise LoadError(f"could not assign tensors: {', '.join((leftover + unexpected)[:8])}")
    still_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if still_meta:
        raise LoadError(f"tensors left unloaded: {', '.join(still_meta[:8])}")
    model.to(device)
    if torch.device(device).type == "cpu":  # one kernel call for q/k/v and for gate/up where their layouts agree
        from ..quant import stack_rows

        for module in model.modules():
            if hasattr(module, "input_projections") and stack_rows(module.input_projections()) is not None:
                return_freed_heap()  # the unstacked buffers: else glibc keeps them and the peak RSS grows
    if ple_table is not None:
        if isinstance(ple_table, QuantizedTensor):
            model.ple.table, model.ple.table_type = ple_table.raw, ple_table.ggml_type
        else:
            model.ple.table = ple_table  # stays memory-mapped on the CPU
        model.ple.file_rows = rows_reader(model.ple.table)  # and its rows are read from the file
    return_freed_heap()
    return model.eval()
