"""Random weights in a real checkpoint's shapes, written straight to a GGUF file.

Real Gemma 4 weights cannot be downloaded here, yet speed and memory depend only on shapes and
types, so benchmarks run on files this module writes: architecture `gemma4` (or `gemma3`), the
text model only, every tensor the loader expects (shapes from `TextModel` itself, the same
source the loader checks against), GGUF names from `names.py`, metadata, type choice and the
p-RoPE divisors from `convert.py`, and a synthetic vocabulary so `gemmarun.load()` works.

Quantized tensors are generated as blocks directly: uniformly random codes plus per-block
scales with random signs, sized so the dequantized weights have mean 0 and std `WEIGHT_STD`.
Nothing is ever held as a float copy of a big tensor: each tensor is produced `chunk_bytes` of
encoded data at a time and appended to the file, so the 26B-A4B shape (~14 GB at q4_0) is
written with a few tens of MB of memory. Norms and scales are F32 values near 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFWriter,
    TokenType,
)

from ..config import ConfigError, TextConfig, load_hf_config, text_config_from_file, text_config_from_hf
from ..outputs import partial_path
from ..quant.formats import MXFP4, MXFP4_VALUES, Q4_0, Q4_K, Q8_0, BlockFormat
from ..tokenizer import SPACE
from .convert import TYPES as CONVERT_TYPES
from .convert import (
    FILE_TYPES,
    Vocab,
    encoded_nbytes,
    rope_freqs,
    stays_f32,
    target_type,
    write_config_metadata,
    write_vocab,
)
from .errors import LoadError
from .names import gemmarun_to_gguf

TYPES = {**CONVERT_TYPES, "q4_k": GGMLQuantizationType.Q4_K}
WEIGHT_STD = 0.02  # of every weight matrix, embeddings included (the model scales embeddings by sqrt(hidden))
NORM_STD = 0.02  # spread of norm weights and scales around 1
CHUNK_BYTES = 8 << 20  # encoded bytes generated per step
DISK_MARGIN = 64 << 20  # left free beside the file: a full disk breaks everything else too
# The leads' table of the released checkpoints' configs, beside the repository.
CONFIGS_JSON = Path(__file__).resolve().parents[4] / "shared" / "spec" / "gemma4-configs.json"
SHORT_NAMES = ("e2b", "e4b", "31b", "26b-a4b")
_BLOCK_FORMATS: dict[GGMLQuantizationType, type[BlockFormat]] = {
    f.ggml_type: f for f in (Q4_0, Q8_0, Q4_K, MXFP4)
}
_KQ_SUBSCALES = (32, 63)  # Q4_K's 6-bit sub-block scales are drawn from this range


# ----------------------------------------------------------------------------------- configs


def resolve_config(config: TextConfig | str | Path) -> tuple[TextConfig, str]:
    """(config, display name) from a TextConfig, a released checkpoint's name (`e2b`, `e4b`, `31b`,
    `26b-a4b` or the full `google/gemma-4-E2B-it`), a HF config.json, or a folder holding one."""
    if isinstance(config, TextConfig):
        return config, f"{config.family}-custom"
    text = str(config)
    path = Path(text)
    if path.is_dir():
        return load_hf_config(path), path.name
    if path.is_file():
        return text_config_from_file(path), path.parent.name or path.stem
    key, raw = released_config(text)
    return text_config_from_hf(raw), key.removeprefix("google/")


def released_config(name: str) -> tuple[str, dict]:
    """(full name, raw HF config) of a released checkpoint named as `resolve_config` takes it."""
    known = _released_configs()
    wanted = name.lower()
    for key, raw in known.items():
        short = key.lower().removeprefix("google/").removeprefix("gemma-4-").removesuffix("-it")
        if wanted in (key.lower(), key.lower().removeprefix("google/"), short):
            return key, raw
    raise ConfigError(
        f"unknown config {name!r}: give {', '.join(SHORT_NAMES)}, a full name such as "
        f"{next(iter(known), 'google/gemma-4-E2B-it')}, or a path to a HF config.json"
    )


def _released_configs() -> dict[str, dict]:
    if not CONFIGS_JSON.is_file():
        raise ConfigError(f"{CONFIGS_JSON} is missing, so checkpoint names cannot be resolved; "
                          "pass a path to a HF config.json instead")
    table = json.loads(CONFIGS_JSON.read_text())
    return {key: {k: v for k, v in raw.items() if not k.startswith("_")}
            for key, raw in table.items() if not key.startswith("_")}


def active_twin(cfg: TextConfig) -> TextConfig:
    """The dense "active-parameter twin" of an MoE config: the same layers and attention, the
    MoE block replaced by one dense MLP as wide as the shared expert plus `top_k` experts, so
    each token multiplies through as many FFN weights (the twin has no router)."""
    if not cfg.num_experts:
        raise ConfigError("active_twin: the config has no experts (it is already dense)")
    width = cfg.intermediate_size + cfg.top_k_experts * cfg.expert_dim
    return dataclasses.replace(cfg, intermediate_size=width, num_experts=0, top_k_experts=0, expert_dim=0)


@dataclass(frozen=True)
class ParameterCount:
    total: int  # the text model's parameters, PLE table included
    active: int  # multiplied through for each token: without the experts the router does not
    #              pick, nor the PLE table (a row lookup; Google's "effective" E2B/E4B sizes)


def count_parameters(cfg: TextConfig) -> ParameterCount:
    """Parameter counts from the model's own tensor list (`model_tensor_shapes`)."""
    from .build import PLE_TABLE

    total, routed, lookup = 0, 0, 0
    for name, shape in model_tensor_shapes(cfg).items():
        n = int(np.prod(shape))
        total += n
        if ".experts." in name:
            routed += n
        elif name == PLE_TABLE:
            lookup += n
    unpicked = routed - routed * cfg.top_k_experts // cfg.num_experts if cfg.num_experts else 0
    return ParameterCount(total, total - unpicked - lookup)


def model_tensor_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """gemmarun name -> shape of every tensor a checkpoint holds for `cfg` (the PLE table as
    `ple.table`), read off a `TextModel` built on the meta device."""
    from ..model.text import TextModel
    from .build import PLE_TABLE

    with torch.device("meta"):
        model = TextModel(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.ple_dim:
        shapes[PLE_TABLE] = (cfg.ple_vocab_size, cfg.num_layers * cfg.ple_dim)
    return shapes


# ------------------------------------------------------------------------------ tensor plan


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return encoded_nbytes(self.shape, self.ggml_type)


def plan_tensors(cfg: TextConfig, qtype: GGMLQuantizationType) -> list[PlannedTensor]:
    """Every tensor of the file, in writing order, with the type `convert` would give it."""
    plan = []
    if cfg.family == "gemma4":
        plan.append(PlannedTensor("rope_freqs.weight", (cfg.global_head_dim // 2,), GGMLQuantizationType.F32))
    for name, shape in model_tensor_shapes(cfg).items():
        if cfg.family == "gemma3" and name.endswith("layer_scalar"):
            continue  # Gemma 3 GGUFs have none; the loader supplies ones
        gguf_name = gemmarun_to_gguf(name)
        plan.append(PlannedTensor(gguf_name, shape, target_type(gguf_name, shape, qtype)))
    return plan


# ------------------------------------------------------------------------------ generators


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random bytes (raw 64-bit generator output: ~10x faster than `integers`)."""
    words = rng.bit_generator.random_raw(-(-n // 8))
    return words.view(np.uint8)[:n]


def _signed_scales(rng: np.random.Generator, n: int, magnitude: float) -> np.ndarray:
    """n block scales: random sign (so weights have no mean) times magnitude * U(0.5, 1.5),
    whose mean square is magnitude^2 * 13/12."""
    v = rng.uniform(-1.0, 1.0, n).astype(np.float32)
    return (np.sign(v) * (0.5 + np.abs(v)) * magnitude).astype(np.float32)


_SCALE_MEAN_SQUARE = 13 / 12


def _uniform_code_moments(lo: int, hi: int) -> tuple[float, float]:
    """(mean, variance) of an integer drawn uniformly from [lo, hi]."""
    return (lo + hi) / 2, ((hi - lo + 1) ** 2 - 1) / 12


def _pack_kquant_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 + 8 six-bit values per block -> the 12-byte field `formats._kquant_scale_min` unpacks."""
    out = np.empty((sc.shape[0], 3, 4), dtype=np.uint8)
    out[:, 0] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 1] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 2] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out.reshape(-1, 12)


def _blocks(fmt: type[BlockFormat], rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """n random blocks of `fmt` whose dequantized values have mean 0 and standard deviation std.

    Codes are uniform over the format's range (random bytes are exactly that for 4- and 8-bit
    codes); symmetric formats get the scale that gives std, Q4_K's min is set to centre its
    unsigned codes."""
    out = np.empty((n, fmt.type_size), dtype=np.uint8)
    mean, var = _uniform_code_moments(fmt.code_min, fmt.code_max)
    if fmt is Q4_K:
        # w = d*sc*q - dmin*mn with mn = sc and dmin = mean*d, i.e. d*sc*(q - mean).
        lo, hi = _KQ_SUBSCALES
        sc_mean, sc_var = _uniform_code_moments(lo, hi)
        d = _signed_scales(rng, n, std / np.sqrt(var * (sc_var + sc_mean**2) * _SCALE_MEAN_SQUARE))
        sc = (lo + _random_bytes(rng, n * 8) % (hi - lo + 1)).astype(np.uint8).reshape(n, 8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
        out[:, 2:4] = (d * mean).astype(np.float16).view(np.uint8).reshape(n, 2)
        out[:, 4:16] = _pack_kquant_scales(sc, sc)
        out[:, 16:] = _random_bytes(rng, n * 128).reshape(n, 128)
        return out
    if fmt in (Q4_0, Q8_0):  # f16 scale, then the codes
        d = _signed_scales(rng, n, std / np.sqrt((var + mean**2) * _SCALE_MEAN_SQUARE))
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
        out[:, 2:] = _random_bytes(rng, n * (fmt.type_size - 2)).reshape(n, -1)
        return out
    if fmt is MXFP4:  # exponent byte, then 32 nibbles indexing the E2M1 table (mean 0)
        # scales are powers of two 2^(e-128): e or e+1 per block, mixed so the mean square is std^2
        target = std**2 / float(np.mean(np.square(MXFP4_VALUES)))
        low = int(np.floor(np.log2(target) / 2))  # 4^low <= target < 4^(low+1)
        p_high = (target / 4.0**low - 1) / 3
        e = 128 + low + (rng.uniform(0.0, 1.0, n) < p_high)
        out[:, 0] = e.astype(np.uint8)
        out[:, 1:] = _random_bytes(rng, n * 16).reshape(n, 16)
        return out
    raise LoadError(f"random weights: no block generator for {fmt.ggml_type.name}")


def _floats(t: GGMLQuantizationType, values: np.ndarray) -> np.ndarray:
    """float32 values encoded as F32, F16 or BF16 bytes."""
    if t == GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if t == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    if t == GGMLQuantizationType.BF16:
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    raise LoadError(f"random weights: {t.name} is not a float type")


def tensor_chunks(cfg: TextConfig, tensor: PlannedTensor, rng: np.random.Generator,
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The tensor's encoded bytes, whole rows at a time, each chunk at most `chunk_bytes`
    (or one row when a row is larger)."""
    if tensor.name == "rope_freqs.weight":
        yield rope_freqs(cfg)
        return
    if stays_f32(tensor.name, tensor.shape):
        n = int(np.prod(tensor.shape))
        yield (1.0 + NORM_STD * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
        return
    cols = tensor.shape[-1]
    rows = int(np.prod(tensor.shape[:-1]))
    block, type_size = GGML_QUANT_SIZES[tensor.ggml_type]
    row_bytes = cols // block * type_size
    step = max(1, chunk_bytes // row_bytes)
    fmt = _BLOCK_FORMATS.get(tensor.ggml_type)
    for start in range(0, rows, step):
        n_rows = min(step, rows - start)
        if fmt is not None:
            yield _blocks(fmt, rng, n_rows * cols // block, WEIGHT_STD)
        else:
            yield _floats(tensor.ggml_type, WEIGHT_STD * rng.standard_normal(n_rows * cols, dtype=np.float32))


# ------------------------------------------------------------------------------- vocabulary


def synthetic_vocab(cfg: TextConfig) -> Vocab:
    """`cfg.vocab_size` tokens: the config's pad/eos/bos at their real ids (control tokens),
    `<unk>`, the space piece and one merge (a Gemma 4 GGUF must carry merges), the 256 byte
    tokens (so any text encodes), printable ASCII, then `<unusedN>` placeholders."""
    size = cfg.vocab_size
    specials = {cfg.pad_id: "<pad>", cfg.eos_ids[0]: "<eos>", cfg.bos_id: "<bos>"}
    for i in cfg.eos_ids[1:]:
        specials.setdefault(i, f"<eos_{i}>")
    bad = sorted(i for i in specials if not 0 <= i < size)
    if bad:
        raise ConfigError(f"special token ids {bad} do not fit vocab_size={size}")
    tokens: list[str | None] = [None] * size
    types = [int(TokenType.NORMAL)] * size
    for i, piece in specials.items():
        tokens[i], types[i] = piece, int(TokenType.CONTROL)
    free = (i for i in range(size) if tokens[i] is None)
    fillers = [("<unk>", TokenType.UNKNOWN), (SPACE, TokenType.NORMAL), (SPACE * 2, TokenType.NORMAL)]
    fillers += [(f"<0x{b:02X}>", TokenType.BYTE) for b in range(256)]
    fillers += [(chr(c), TokenType.NORMAL) for c in range(0x21, 0x7F)]
    unk_id = None
    for (piece, kind), i in zip(fillers, free):
        tokens[i], types[i] = piece, int(kind)
        unk_id = i if kind is TokenType.UNKNOWN else unk_id
    for i in free:
        tokens[i] = f"<unused{i}>"
    merges = [f"{SPACE} {SPACE}"] if SPACE * 2 in tokens else []
    return Vocab([str(t) for t in tokens], types, merges, bos_id=cfg.bos_id, eos_id=cfg.eos_ids[0],
                 pad_id=cfg.pad_id, unk_id=unk_id, eot_id=cfg.eos_ids[1] if len(cfg.eos_ids) > 1 else None)


# ----------------------------------------------------------------------------------- writer


def write_random_gguf(config: TextConfig | str | Path, out: str | Path, qtype: str = "q4_0", seed: int = 0,
                      *, twin: bool = False, chunk_bytes: int = CHUNK_BYTES, progress: bool = False) -> Path:
    """Write a loadable GGUF with `config`'s real tensor shapes and random weights of type `qtype`
    (f32, f16, bf16, q8_0, q4_0, q4_k). The same arguments give the same bytes.

    `config`: a TextConfig, a released checkpoint's name (`e2b`, `26b-a4b`, ...), or a HF
    config.json (or its folder). `twin`: write the MoE config's dense `active_twin` instead.
    Returns `out`, written via `.<out>.<pid>.partial` and renamed when done; `progress` reports on a
    terminal's stderr.
    """
    if qtype not in TYPES:
        raise LoadError(f"random weights: type {qtype!r} is not supported ({', '.join(TYPES)})")
    cfg, name = resolve_config(config)
    if twin:
        cfg, name = active_twin(cfg), f"{name} dense active twin"
    ggml_type = TYPES[qtype]
    out = Path(out)
    plan = plan_tensors(cfg, ggml_type)
    total = sum(t.nbytes for t in plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total + DISK_MARGIN > free:
        raise LoadError(f"random weights: {out} needs {total / 1e9:.2f} GB (and {DISK_MARGIN >> 20} MiB to spare) "
                        f"but only {free / 1e9:.2f} GB is free")

    # This process's own partial file: two writers of one file (two benches at once) each write
    # theirs whole, and the rename that lands last leaves the same bytes.
    partial = partial_path(out)
    align = GGUF_DEFAULT_ALIGNMENT
    start, done, show = time.time(), 0, progress and sys.stderr.isatty()
    # Header, metadata and tensor infos through gguf-py (sizes follow from shapes); the data is
    # then appended chunk by chunk, since GGUFWriter writes each tensor as one array.
    try:
        w = GGUFWriter(partial, cfg.family)
        w.add_name(f"{name} (random weights)")
        w.add_description(f"random {qtype} weights in the shapes of {name}, seed {seed}: for speed and memory "
                          "measurements only, not a trained model (gemmarun.loading.random_weights)")
        w.add_file_type(int(FILE_TYPES[ggml_type]))
        write_config_metadata(w, cfg)
        write_vocab(w, cfg.family, synthetic_vocab(cfg))
        for t in plan:
            w.add_tensor_info(t.name, list(t.shape), np.float32, t.nbytes, raw_dtype=t.ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        with open(partial, "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * (-f.tell() % align))
            for index, tensor in enumerate(plan):
                rng = np.random.default_rng([seed, index])
                written = 0
                for chunk in tensor_chunks(cfg, tensor, rng, chunk_bytes):
                    f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                    written += chunk.nbytes
                if written != tensor.nbytes:
                    raise AssertionError(f"{tensor.name}: wrote {written} bytes, planned {tensor.nbytes}")
                f.write(b"\0" * (-written % align))
                done += tensor.nbytes
                if show:
                    print(f"\rrandom weights {done / 1e9:6.2f}/{total / 1e9:.2f} GB {time.time() - start:4.0f}s",
                          end="", file=sys.stderr, flush=True)
        if show:
            print(file=sys.stderr)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


__all__ = [
    "TYPES",
    "ParameterCount",
    "PlannedTensor",
    "active_twin",
    "count_parameters",
    "model_tensor_shapes",
    "plan_tensors",
    "resolve_config",
    "synthetic_vocab",
    "write_random_gguf",
]
