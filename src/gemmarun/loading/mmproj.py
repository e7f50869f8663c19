"""llama.cpp's multimodal projector GGUF (mmproj, spec 10.2): Gemma 4's vision and audio towers
(projector types gemma4v, gemma4a), or Gemma 3's SigLIP tower (gemma3), in a file of their own,
loaded beside a GGUF text model as `llama-server --mmproj` takes them; and the same towers where
Ollama's converter writes them, inside the model's own GGUF (`open_ollama_towers`).

An mmproj carries the towers' weights and a few sizes (`clip.vision.*`, `clip.audio.*`); the rest of
each tower's config is read off its tensors' shapes, and what neither holds keeps the value every
released checkpoint uses, which llama.cpp fixes too (vision RoPE base 100, 3x3 pooling, audio
attention chunks, audio eps). `sanitize` undoes the converter's three layout changes, so the towers
are the same modules, with the same weights, as from a HF folder.

`open_mmproj` settles everything the header and the tensors' shapes can tell (sanitize runs on
meta tensors), before the text model's weights are read: a wrong file costs no model load.
`load_mmproj` then reads the towers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TextConfig, gguf_float, gguf_int
from ..model.audio import AudioConfig
from ..model.gemma3_vision import Gemma3Encoders, Gemma3MediaConfig, SiglipConfig
from ..model.multimodal import Encoders, MediaTokens, MultimodalConfig
from ..model.vision import VisionConfig
from ..processing.audio import NUM_MEL_BINS
from ..processing.prompt import GEMMA3_MEDIA_TOKEN_TEXT, MEDIA_TOKEN_TEXT
from ..tokenizer import Tokenizer
from .build import build_encoders, check_encoder_state
from .errors import LoadError
from .gguf import read_tensor
from .gguf_file import GGUFFile
from .names import (
    MMPROJ_ARCHITECTURE,
    OLLAMA_PACKED_CLAMPS,
    OLLAMA_TOWER_PREFIXES,
    mmproj_block,
    mmproj_siglip_to_gemmarun,
    mmproj_to_gemmarun,
    ollama_siglip_to_gemmarun,
    ollama_tower_to_gemmarun,
)

PROJECTORS = {"vision": "gemma4v", "audio": "gemma4a"}
GEMMA3_PROJECTOR = "gemma3"
# Gemma 3's image processor normalises with these; a file saying otherwise wants other pixels.
GEMMA3_MEAN_STD = [0.5, 0.5, 0.5]
# llama.cpp fixes the audio eps at 1e-6 (its converter wrote a wrong one into early files), as every
# Gemma 4 checkpoint has it; the vision eps is read from the file.
AUDIO_EPS = 1e-6


@dataclass
class MmprojFile:
    """An mmproj that passed `open_mmproj`: its towers' config; tensors not yet read."""

    file: GGUFFile
    config: MultimodalConfig | Gemma3MediaConfig
    names: dict[str, str]  # the file's tensor name -> the towers' (gemmarun) name
    sanitize: Callable[[str, torch.Tensor, str], torch.Tensor]  # (ours, tensor, file's name) -> HF layout


def open_mmproj(path: Path, text_cfg: TextConfig, tokenizer: Tokenizer) -> MmprojFile:
    """Every check that needs no tensor data: a Gemma 4 projector for a Gemma 4 text model, each
    tower's flag, tensors and block count in agreement, the config its metadata and shapes give,
    and the towers' exact names and shapes."""
    if path.is_dir():
        raise LoadError(f"{path}: a folder, not an mmproj GGUF file")
    f = GGUFFile(path)
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch != MMPROJ_ARCHITECTURE:
        raise LoadError(f"{path}: general.architecture is {arch!r}, not {MMPROJ_ARCHITECTURE!r}: not a multimodal "
                        "projector (mmproj) GGUF")
    if text_cfg.family == "gemma3" or _projector(meta, "vision") == GEMMA3_PROJECTOR:
        return _open_gemma3(path, f, text_cfg, tokenizer)
    unknown = [name for name in f.tensors if mmproj_to_gemmarun(name) is None]
    if unknown:
        raise LoadError(f"{path}: tensors that are not Gemma 4 vision or audio: {', '.join(unknown[:8])}")
    try:
        towers = [tower for tower in PROJECTORS if _has_tower(f, tower)]
        if not towers:
            raise ConfigError("the mmproj has neither a vision nor an audio encoder")
        shapes = {}  # gemmarun name -> the sanitized tensor's shape, as a meta tensor
        for name, info in f.tensors.items():
            ours = mmproj_to_gemmarun(name)
            shapes[ours] = sanitize(ours, torch.empty(info.shape, device="meta"), name)
        vision = _vision_config(meta, shapes) if "vision" in towers else None
        audio = _audio_config(meta, shapes) if "audio" in towers else None
    except (ConfigError, ValueError) as e:
        raise LoadError(f"{path}: {e}") from None
    for tower, key in (("vision", "embed_vision.embedding_projection.weight"),
                       ("audio", "embed_audio.embedding_projection.weight")):
        weight = shapes.get(key)
        if weight is not None:
            _check_width(path, tower, weight.shape[0], text_cfg)
    cfg = MultimodalConfig(vision=vision, audio=audio, tokens=_media_tokens(tokenizer, path))
    _check_towers(path, lambda: Encoders(cfg, text_cfg.hidden_size), shapes)
    return MmprojFile(f, cfg, {name: mmproj_to_gemmarun(name) for name in f.tensors}, sanitize)


def open_ollama_towers(path: Path, f: GGUFFile, text_cfg: TextConfig, tokenizer: Tokenizer) -> MmprojFile | None:
    """The towers an Ollama model file holds beside its text model, checked as `open_mmproj` checks
    an mmproj's; None when it holds none. Ollama's converter writes one file: for Gemma 4 the
    vision and audio towers, `gemma4.vision.*` / `gemma4.audio.*` keys where an mmproj has
    `clip.*`, no projector types or flags, and the mmproj's tensor layout under its names
    (`ollama_tower_to_gemmarun`); for Gemma 3 the SigLIP tower (`_open_ollama_gemma3`)."""
    tower_names = [name for name in f.tensors if name.startswith(OLLAMA_TOWER_PREFIXES)]
    if not tower_names:
        return None
    arch = text_cfg.family
    if arch == "gemma3":
        return _open_ollama_gemma3(path, f, text_cfg, tokenizer, tower_names)
    names = {name: ollama_tower_to_gemmarun(name) for name in tower_names if name != OLLAMA_PACKED_CLAMPS}
    unknown = [name for name, ours in names.items() if ours is None]
    if unknown:
        raise LoadError(f"{path}: tensors that are not Gemma 4 vision or audio: {', '.join(unknown[:8])}")
    vision_bounds = any(ours.startswith("vision_tower.") and ours.endswith(".input_max") for ours in names.values())
    if OLLAMA_PACKED_CLAMPS in f.tensors and not vision_bounds:
        raise LoadError(f"{path}: its vision clip bounds are only packed in {OLLAMA_PACKED_CLAMPS} (an older Ollama "
                        "file), which gemmarun does not read: convert the checkpoint again")
    meta = f.metadata
    try:
        towers = []
        for tower in PROJECTORS:
            tensors = [name for name, ours in names.items() if _tower_of(ours) == tower]
            key = f"{arch}.{tower}.block_count"
            if tensors or key in meta:
                _check_block_count(meta, key, tower, tensors)
                towers.append(tower)
        shapes = {ours: sanitize(ours, torch.empty(f.tensors[name].shape, device="meta"), name)
                  for name, ours in names.items()}
        vision = _vision_config(meta, shapes, arch) if "vision" in towers else None
        audio = _audio_config(meta, shapes, arch) if "audio" in towers else None
    except (ConfigError, ValueError) as e:
        raise LoadError(f"{path}: {e}") from None
    cfg = MultimodalConfig(vision=vision, audio=audio, tokens=_media_tokens(tokenizer, path))
    _check_towers(path, lambda: Encoders(cfg, text_cfg.hidden_size), shapes)
    return MmprojFile(f, cfg, names, sanitize)


def load_mmproj(mm: MmprojFile, text_cfg: TextConfig, *, dtype: torch.dtype,
                device: torch.device) -> Encoders | Gemma3Encoders:
    """The towers of an opened mmproj (or of an Ollama model file), in `dtype` (one copy per tensor)."""
    f = mm.file
    state = {}
    for name, ours in mm.names.items():
        info = f.tensors[name]
        try:
            state[ours] = mm.sanitize(ours, read_tensor(f, info, True), name).to(dtype)
        except LoadError:  # (read_tensor's errors name the file already)
            raise
        except ValueError as e:
            raise LoadError(f"{f.path}: {e}") from None
        # the file's pages read for a copy leave RSS (a tensor still viewing them reads them again
        # from the file when used): an f16 tower in float32 had held both, +930 MiB at E2B's size
        f.release(name)
    return build_encoders(mm.config, text_cfg, state, dtype=dtype, device=device)


def sanitize(name: str, t: torch.Tensor, gguf_name: str) -> torch.Tensor:
    """A tensor as the HF checkpoint holds it, from llama.cpp's converter's layout (ValueError,
    naming the file's tensor, where the layout is not that). Works on meta tensors (shapes only)."""

    def need(ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"{gguf_name} has shape {list(t.shape)}, expected {expected}")

    if name == "vision_tower.patch_embedder.input_proj.weight":
        # written as a conv kernel [H, 3, p, p]; the patches are flattened (row, column, channel)
        need(t.dim() == 4 and t.shape[1] == 3 and t.shape[2] == t.shape[3], "[hidden, 3, patch, patch]")
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1).contiguous()
    if name.endswith("self_attn.per_dim_scale"):
        # written after softplus (spec 10.2); the tower applies softplus itself: invert it exactly
        # enough (in float64, |error| ~1 ulp after the tower's float32 softplus)
        need(t.dim() == 1, "[head_dim]")
        y = t.double()
        if not y.is_meta and not bool(((y > 0) & torch.isfinite(y)).all()):
            raise ValueError(f"{gguf_name} holds values that are not positive and finite (a softplus output is)")
        return y + torch.log(-torch.expm1(-y))
    if name.endswith("depthwise_conv1d.weight"):
        need(t.dim() == 2, "[channels, kernel]")
        return t.unsqueeze(1)  # [C, K] -> [C, 1, K]
    if name.endswith(("input_min", "input_max", "output_min", "output_max")):
        need(t.numel() == 1, "[1]")
        return t.reshape(())  # one-element tensors in the file, scalars in the tower
    return t


def _has_tower(f: GGUFFile, tower: str) -> bool:
    """Whether the file holds this tower, of the kind gemmarun runs, its flag, tensors and block
    count agreeing (ConfigError where they do not)."""
    meta = f.metadata
    flag = meta.get(f"clip.has_{tower}_encoder", False)
    tensors = [name for name in f.tensors if _tower_of(mmproj_to_gemmarun(name)) == tower]
    if flag is not True:
        if tensors:
            raise ConfigError(f"clip.has_{tower}_encoder is {flag!r} but the file holds {tower} tensors")
        return False
    kind = _projector(meta, tower)
    if kind != PROJECTORS[tower]:
        raise ConfigError(f"its {tower} projector is {kind!r}; gemmarun runs Gemma 4's ({PROJECTORS[tower]!r})")
    _check_block_count(meta, f"{MMPROJ_ARCHITECTURE}.{tower}.block_count", tower, tensors)
    return True


def _check_block_count(meta: dict[str, Any], key: str, tower: str, tensors: list[str]) -> None:
    blocks = {block for block in map(mmproj_block, tensors) if block is not None}
    count = _int(meta, key)
    if len(blocks) != count or (blocks and max(blocks) != count - 1):  # (distinct: so exactly 0..count-1)
        raise ConfigError(f"{key}={count} but the file holds {len(blocks)} {tower} blocks"
                          + (f" (up to {max(blocks)})" if blocks else ""))


def _projector(meta: dict[str, Any], tower: str) -> Any:
    """A tower's projector type: its own key (a file with two towers) or the file's."""
    return meta.get(f"clip.{tower}.projector_type", meta.get("clip.projector_type"))


def _tower_of(ours: str) -> str:
    """The tower a gemmarun name belongs to (`vision_tower`/`embed_vision`: vision)."""
    return "audio" if "audio" in ours.split(".")[0] else "vision"


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise ConfigError(f"GGUF metadata key {key!r} is missing")
    return gguf_int(value, key)


def _vision_config(meta: dict[str, Any], shapes: dict[str, torch.Tensor], arch: str = MMPROJ_ARCHITECTURE
                   ) -> VisionConfig:
    """From `<arch>.vision.*` keys (`clip` in an mmproj, `gemma4` in an Ollama file) and shapes."""
    key = f"{arch}.vision."
    layer = "vision_tower.encoder.layers.0.self_attn."
    head_dim = _shape(shapes, layer + "q_norm.weight")[0]
    if head_dim % 4:
        raise ConfigError(f"vision head_dim={head_dim} (v.blk.0.attn_q_norm) must be a multiple of 4 (2-D RoPE)")
    eps = gguf_float(meta.get(key + "attention.layer_norm_epsilon", 1e-6), key + "attention.layer_norm_epsilon")
    if eps <= 0:
        raise ConfigError(f"{key}attention.layer_norm_epsilon={eps} must be positive")
    heads = _int(meta, key + "attention.head_count")
    kv_rows = _shape(shapes, layer + "k_proj.linear.weight")[0]
    if kv_rows % head_dim or kv_rows < head_dim or heads % (kv_rows // head_dim):
        raise ConfigError(f"v.blk.0.attn_k's {kv_rows} rows are not key heads of {head_dim} that divide "
                          f"{key}attention.head_count={heads}")
    return VisionConfig(
        hidden_size=_int(meta, key + "embedding_length"),
        intermediate_size=_int(meta, key + "feed_forward_length"),
        num_layers=_int(meta, key + "block_count"),
        num_heads=heads,
        num_kv_heads=kv_rows // head_dim,
        head_dim=head_dim,
        rms_norm_eps=eps,
        rope_theta=100.0,
        patch_size=_int(meta, key + "patch_size"),
        pooling_kernel=_int(meta, key + "projector.scale_factor", 3),
        position_embedding_size=_shape(shapes, "vision_tower.patch_embedder.position_embedding_table")[1],
        use_clipped_linears=_clipped(shapes, "vision_tower."),
        standardize="vision_tower.std_bias" in shapes,
    )


def _audio_config(meta: dict[str, Any], shapes: dict[str, torch.Tensor], arch: str = MMPROJ_ARCHITECTURE
                  ) -> AudioConfig:
    """From `<arch>.audio.*` keys and shapes (an Ollama file writes no mel bins: 128, as its runtime)."""
    key = f"{arch}.audio."
    mel_bins = _int(meta, key + "num_mel_bins", NUM_MEL_BINS)
    if mel_bins != NUM_MEL_BINS:
        raise ConfigError(f"{key}num_mel_bins={mel_bins}; Gemma 4's audio features have {NUM_MEL_BINS}")
    hidden = _int(meta, key + "embedding_length")
    heads = _int(meta, key + "attention.head_count")
    head_dim = _shape(shapes, "audio_tower.layers.0.self_attn.per_dim_scale")[0]
    if heads * head_dim != hidden:
        raise ConfigError(f"{key}attention.head_count={heads} heads of {head_dim} (a.blk.0.per_dim_scale) "
                          f"do not make {key}embedding_length={hidden}")
    conv = "audio_tower.subsample_conv_projection."
    return AudioConfig(
        hidden_size=hidden,
        num_layers=_int(meta, key + "block_count"),
        num_heads=heads,
        subsampling_conv_channels=(_shape(shapes, conv + "layer0.conv.weight")[0],
                                   _shape(shapes, conv + "layer1.conv.weight")[0]),
        conv_kernel_size=_shape(shapes, "audio_tower.layers.0.lconv1d.depthwise_conv1d.weight")[-1],
        use_clipped_linears=_clipped(shapes, "audio_tower."),
        rms_norm_eps=AUDIO_EPS,
        output_proj_dims=_shape(shapes, "audio_tower.output_proj.weight")[0],
    )


def _shape(shapes: dict[str, torch.Tensor], name: str) -> torch.Size:
    """A tensor's (sanitized) shape; ConfigError naming the file's tensor when it has none."""
    if name not in shapes:
        from .names import gemmarun_to_mmproj

        raise ConfigError(f"no {gemmarun_to_mmproj(name)} tensor (a Gemma 4 mmproj has it)")
    return shapes[name].shape


def _clipped(shapes: dict[str, torch.Tensor], tower: str) -> bool:
    """Whether a tower's linears are clippable: any clip bound says so (then a missing one is named
    as missing, not every other one as unexpected)."""
    return any(name.startswith(tower) and name.endswith(".input_max") for name in shapes)


def _media_tokens(tokenizer: Tokenizer, path: Path) -> MediaTokens:
    ids = {}
    for field, text in MEDIA_TOKEN_TEXT.items():
        i = tokenizer.token_to_id(text)
        if i is None:
            raise LoadError(f"{path}: the text model's vocabulary has no {text} token, which media prompts need")
        ids[field] = i
    return MediaTokens(**ids)


# ---------------------------------------------------------------------------------------------
# Gemma 3 (projector type "gemma3"): one SigLIP tower, its config in the header


def _open_gemma3(path: Path, f: GGUFFile, text_cfg: TextConfig, tokenizer: Tokenizer) -> MmprojFile:
    """`open_mmproj` for Gemma 3: a gemma3 projector for a Gemma 3 text model, the SigLIP config
    its header gives, and the tower's exact names and shapes."""
    meta = f.metadata
    kind = _projector(meta, "vision")
    if text_cfg.family != "gemma3":
        raise LoadError(f"{path}: a Gemma 3 projector ({GEMMA3_PROJECTOR!r}) goes with a Gemma 3 text model; "
                        f"this one is {text_cfg.family}")
    if kind != GEMMA3_PROJECTOR:
        raise LoadError(f"{path}: its projector is {kind!r}; a Gemma 3 text model takes Gemma 3's "
                        f"({GEMMA3_PROJECTOR!r})")
    names = {name: mmproj_siglip_to_gemmarun(name) for name in f.tensors}
    unknown = [name for name, ours in names.items() if ours is None]
    if unknown:
        raise LoadError(f"{path}: tensors that are not Gemma 3 vision: {', '.join(unknown[:8])}")
    try:
        if meta.get("clip.has_vision_encoder") is not True:
            raise ConfigError(f"clip.has_vision_encoder is {meta.get('clip.has_vision_encoder')!r}, not true")
        cfg = _gemma3_config(meta, names.values(), tokenizer)
        names = _unswapped_ffn(names, f, cfg.vision)
        shapes = {ours: sanitize_siglip(ours, torch.empty(f.tensors[name].shape, device="meta"), name)
                  for name, ours in names.items()}
    except (ConfigError, ValueError) as e:
        raise LoadError(f"{path}: {e}") from None
    width = shapes.get("multi_modal_projector.mm_input_projection_weight")
    if width is not None and width.dim() == 2:
        _check_width(path, "image", width.shape[1], text_cfg)
    _check_towers(path, lambda: Gemma3Encoders(cfg, text_cfg.hidden_size), shapes)
    return MmprojFile(f, cfg, names, sanitize_siglip)


def _open_ollama_gemma3(path: Path, f: GGUFFile, text_cfg: TextConfig, tokenizer: Tokenizer,
                        tower_names: list[str]) -> MmprojFile:
    """`open_ollama_towers` for Gemma 3: the SigLIP tower and projector under the checkpoint's
    names (`ollama_siglip_to_gemmarun`), the config under `gemma3.vision.*`."""
    names = {name: ollama_siglip_to_gemmarun(name) for name in tower_names}
    unknown = [name for name, ours in names.items() if ours is None]
    if unknown:
        raise LoadError(f"{path}: tensors that are not Gemma 3 vision: {', '.join(unknown[:8])}")
    try:
        cfg = _gemma3_config(f.metadata, names.values(), tokenizer, arch="gemma3")
        shapes = {ours: sanitize_siglip(ours, torch.empty(f.tensors[name].shape, device="meta"), name)
                  for name, ours in names.items()}
    except (ConfigError, ValueError) as e:
        raise LoadError(f"{path}: {e}") from None
    _check_towers(path, lambda: Gemma3Encoders(cfg, text_cfg.hidden_size), shapes)
    return MmprojFile(f, cfg, names, sanitize_siglip)


def _check_width(path: Path, kind: str, width: int, text_cfg: TextConfig) -> None:
    if width != text_cfg.hidden_size:
        raise LoadError(f"{path}: its {kind} tokens are {width} wide, the text model's embeddings "
                        f"{text_cfg.hidden_size}: the two files are not from the same checkpoint")


def _check_towers(path: Path, build: Callable[[], torch.nn.Module], shapes: dict[str, torch.Tensor]) -> None:
    """LoadError naming the file unless `shapes` are exactly the names and shapes of the towers
    `build` makes (on the meta device: no memory)."""
    with torch.device("meta"):
        towers = build()
    try:
        check_encoder_state(towers, shapes)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None


def _gemma3_config(meta: dict[str, Any], ours: Iterable[str], tokenizer: Tokenizer,
                   arch: str = MMPROJ_ARCHITECTURE) -> Gemma3MediaConfig:
    """From `<arch>.vision.*` keys (`clip` in an mmproj, `gemma3` in an Ollama file), the tower's
    (gemmarun) tensor names `ours`, and the vocabulary's media tokens."""
    v = f"{arch}.vision."
    eps = gguf_float(meta.get(v + "attention.layer_norm_epsilon", 1e-6), v + "attention.layer_norm_epsilon")
    if eps <= 0:
        raise ConfigError(f"{v}attention.layer_norm_epsilon={eps} must be positive")
    vision = SiglipConfig(
        hidden_size=_int(meta, v + "embedding_length"),
        intermediate_size=_int(meta, v + "feed_forward_length"),
        num_layers=_int(meta, v + "block_count"),
        num_heads=_int(meta, v + "attention.head_count"),
        image_size=_int(meta, v + "image_size"),
        patch_size=_int(meta, v + "patch_size"),
        layer_norm_eps=eps,
    )
    if arch == MMPROJ_ARCHITECTURE:
        key = v + "projector.scale_factor"
        scale = _int(meta, key, 4)  # llama.cpp's default: 896 / 14 / 16
        setting = f"{key}={scale}"
    else:  # Ollama writes the tokens an image takes (a square grid), 256 if not
        key = f"{arch}.mm.tokens_per_image"
        tokens = _int(meta, key, 256)
        side = math.isqrt(tokens)
        if side * side != tokens or vision.patches_per_side % side:
            raise ConfigError(f"{key}={tokens} is not a square grid of soft tokens that divides the "
                              f"{vision.patches_per_side} patches a side")
        scale = vision.patches_per_side // side
        setting = f"{key}={tokens}"
    if vision.patches_per_side % scale:
        raise ConfigError(f"{setting} does not divide the {vision.patches_per_side} patches a side: not a whole "
                          "grid of soft tokens")
    for key in (v + "image_mean", v + "image_std"):
        value = meta.get(key, GEMMA3_MEAN_STD)
        numbers = isinstance(value, list) and all(type(x) in (int, float) for x in value)
        if not numbers or [float(x) for x in value] != GEMMA3_MEAN_STD:
            raise ConfigError(f"{key}={value!r}; Gemma 3's image processor uses {GEMMA3_MEAN_STD}")
    prefix = "vision_tower.encoder.layers."
    blocks = {int(name[len(prefix):].split(".")[0]) for name in ours if name.startswith(prefix)}
    if blocks != set(range(vision.num_layers)):
        raise ConfigError(f"{v}block_count={vision.num_layers} but the file holds {len(blocks)} vision blocks"
                          + (f" (up to {max(blocks)})" if blocks else ""))
    ids = {}
    for field, text in GEMMA3_MEDIA_TOKEN_TEXT.items():
        ids[field] = tokenizer.token_to_id(text)
        if ids[field] is None:
            raise ConfigError(f"the text model's vocabulary has no {text} token, which image prompts need")
    return Gemma3MediaConfig(vision=vision, tokens=MediaTokens(**ids, audio=-1, video=-1, boa=-1, eoa=-1),
                             image_soft_tokens=(vision.patches_per_side // scale) ** 2)


def _unswapped_ffn(names: dict[str, str], f: GGUFFile, vision: SiglipConfig) -> dict[str, str]:
    """Early llama.cpp conversions wrote each block's fc1 as ffn_down and fc2 as ffn_up (llama.cpp
    swaps them back when ffn_down's rows are the intermediate width): do the same."""
    down = f.tensors.get("v.blk.0.ffn_down.weight")
    if down is None or vision.hidden_size == vision.intermediate_size or down.shape[0] != vision.intermediate_size:
        return names
    swap = {".mlp.fc1.": ".mlp.fc2.", ".mlp.fc2.": ".mlp.fc1."}
    out = {}
    for name, ours in names.items():
        for a, b in swap.items():
            if a in ours:
                ours = ours.replace(a, b)
                break
        out[name] = ours
    return out


def sanitize_siglip(name: str, t: torch.Tensor, gguf_name: str) -> torch.Tensor:
    """A Gemma 3 mmproj tensor as the HF checkpoint holds it: llama.cpp's converter stores the
    projector norm's 1 + w (the tower's LayerNorms and the [Hv, H] projection are as in HF)."""
    if name == "multi_modal_projector.mm_soft_emb_norm.weight":
        if t.dim() != 1:
            raise ValueError(f"{gguf_name} has shape {list(t.shape)}, expected [vision width]")
        return t.float() - 1.0
    return t
