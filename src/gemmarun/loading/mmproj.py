"""llama.cpp's multimodal projector GGUF (mmproj, spec 10.2): Gemma 4's vision and audio towers in
a file of their own, loaded beside a GGUF text model as `llama-server --mmproj` takes them.

An mmproj carries the towers' weights and a few sizes (`clip.vision.*`, `clip.audio.*`); the rest of
each tower's config is read off its tensors' shapes, and what neither holds keeps the value every
released checkpoint uses, which llama.cpp fixes too (vision RoPE base 100, 3x3 pooling, audio
attention chunks). `sanitize` undoes the converter's three layout changes, so the towers are the
same modules, with the same weights, as from a HF folder.

`open_mmproj` checks everything the header can tell before the text model's weights are read (a
wrong file costs no model load); `load_mmproj` then reads the towers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TextConfig, gguf_float, gguf_int
from ..model.audio import NUM_MEL_BINS, AudioConfig
from ..model.multimodal import Encoders, MediaTokens, MultimodalConfig
from ..model.vision import VisionConfig
from ..tokenizer import Tokenizer
from .build import build_encoders
from .errors import LoadError
from .gguf import read_tensor
from .gguf_file import GGUFFile
from .names import mmproj_to_gemmarun

VISION_PROJECTOR, AUDIO_PROJECTOR = "gemma4v", "gemma4a"
TOWERS = {"vision": ("v", VISION_PROJECTOR), "audio": ("a", AUDIO_PROJECTOR)}  # block prefix, projector
# The placeholder and delimiter strings of spec 6.1, looked up in the text model's vocabulary.
MEDIA_TOKEN_STRINGS = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>", "boi": "<|image>",
                       "eoi": "<image|>", "boa": "<|audio>", "eoa": "<audio|>"}
_BLOCK = re.compile(r"([va])\.blk\.(\d+)\.")


@dataclass
class MmprojFile:
    """An mmproj whose header passed `open_mmproj`: the towers it holds, tensors not yet read."""

    file: GGUFFile
    towers: tuple[str, ...]  # "vision", "audio"


def open_mmproj(path: Path, text_cfg: TextConfig) -> MmprojFile:
    """The header's checks: a Gemma 4 projector for a Gemma 4 text model, every tensor one gemmarun
    knows, each tower's flag, tensors and block count in agreement."""
    if path.is_dir():
        raise LoadError(f"{path}: a folder, not an mmproj GGUF file")
    f = GGUFFile(path)
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch != "clip":
        raise LoadError(f"{path}: general.architecture is {arch!r}, not 'clip': not a multimodal projector (mmproj) GGUF")
    if text_cfg.family != "gemma4":
        raise LoadError(f"{path}: an mmproj adds towers to a Gemma 4 text model; this one is {text_cfg.family} "
                        "(Gemma 3 runs as text only in gemmarun)")
    unknown = [name for name in f.tensors if mmproj_to_gemmarun(name) is None]
    if unknown:
        raise LoadError(f"{path}: tensors that are not Gemma 4 vision or audio: {', '.join(unknown[:8])}")
    towers = []
    for tower, (prefix, projector) in TOWERS.items():
        flagged = meta.get(f"clip.has_{tower}_encoder", False)
        if flagged is not True:
            if any(_tower_of(name) == tower for name in f.tensors):
                raise LoadError(f"{path}: clip.has_{tower}_encoder is {flagged!r} but the file holds {tower} tensors")
            continue
        kind = meta.get(f"clip.{tower}.projector_type", meta.get("clip.projector_type"))
        if kind != projector:
            raise LoadError(f"{path}: its {tower} projector is {kind!r}; gemmarun runs Gemma 4's ({projector!r})")
        blocks = {int(m.group(2)) for m in map(_BLOCK.match, f.tensors) if m and m.group(1) == prefix}
        try:
            count = gguf_int(meta.get(f"clip.{tower}.block_count"), f"clip.{tower}.block_count")
        except ConfigError as e:
            raise LoadError(f"{path}: {e}") from None
        if len(blocks) != count or (blocks and max(blocks) != count - 1):  # (distinct: so exactly 0..count-1)
            raise LoadError(f"{path}: clip.{tower}.block_count={count} but the file holds "
                            f"{len(blocks)} {tower} blocks" + (f" (up to {max(blocks)})" if blocks else ""))
        towers.append(tower)
    if not towers:
        raise LoadError(f"{path}: the mmproj has neither a vision nor an audio encoder")
    return MmprojFile(f, tuple(towers))


def _tower_of(name: str) -> str:
    """Which tower a (known) mmproj tensor belongs to: `a.*` and `mm.a.*` audio, the rest vision."""
    return "audio" if name.startswith(("a.", "mm.a.")) else "vision"


def load_mmproj(mm: MmprojFile, text_cfg: TextConfig, tokenizer: Tokenizer, *, dtype: torch.dtype,
                device: torch.device) -> Encoders:
    """The towers of an opened mmproj, in `dtype` (one copy per tensor), checked against the text
    model they are to feed."""
    f = mm.file
    state = {}
    try:
        for name, info in f.tensors.items():
            ours = mmproj_to_gemmarun(name)
            state[ours] = sanitize(ours, read_tensor(f, info, True), name).to(dtype)
            # the file's pages read for a copy leave RSS (a tensor still viewing them reads them
            # again from the file when used): an f16 tower in float32 had held both, +930 MiB at E2B's size
            f.release(name)
        vision = _vision_config(f.metadata, state) if "vision" in mm.towers else None
        audio = _audio_config(f.metadata, state) if "audio" in mm.towers else None
    except KeyError as e:
        raise LoadError(f"{f.path}: no {e.args[0]} (a Gemma 4 mmproj has it)") from None
    except (ConfigError, ValueError) as e:
        raise LoadError(f"{f.path}: {e}") from None
    for tower, key in (("vision", "embed_vision.embedding_projection.weight"),
                       ("audio", "embed_audio.embedding_projection.weight")):
        weight = state.get(key)
        if weight is not None and weight.shape[0] != text_cfg.hidden_size:
            raise LoadError(f"{f.path}: its {tower} tokens are {weight.shape[0]} wide, the text model's embeddings "
                            f"{text_cfg.hidden_size}: the two files are not from the same checkpoint")
    cfg = MultimodalConfig(vision=vision, audio=audio, tokens=_media_tokens(tokenizer, f.path))
    try:
        return build_encoders(cfg, text_cfg, state, dtype=dtype, device=device)
    except LoadError as e:
        raise LoadError(f"{f.path}: {e}") from None


def sanitize(name: str, t: torch.Tensor, gguf_name: str) -> torch.Tensor:
    """A tensor as the HF checkpoint holds it, from llama.cpp's converter's layout (ValueError,
    naming the file's tensor, where the layout is not that)."""

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
        if not bool(((y > 0) & torch.isfinite(y)).all()):
            raise ValueError(f"{gguf_name} holds values that are not positive and finite (a softplus output is)")
        return y + torch.log(-torch.expm1(-y))
    if name.endswith("depthwise_conv1d.weight"):
        need(t.dim() == 2, "[channels, kernel]")
        return t.unsqueeze(1)  # [C, K] -> [C, 1, K]
    if name.endswith(("input_min", "input_max", "output_min", "output_max")):
        need(t.numel() == 1, "[1]")
        return t.reshape(())  # one-element tensors in the file, scalars in the tower
    return t


def _vision_config(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> VisionConfig:
    layer = "vision_tower.encoder.layers.0.self_attn."
    head_dim = state[layer + "q_norm.weight"].shape[0]
    if head_dim % 4:
        raise ConfigError(f"vision head_dim={head_dim} (v.blk.0.attn_q_norm) must be a multiple of 4 (2-D RoPE)")
    eps = gguf_float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-6), "clip.vision.attention.layer_norm_epsilon")
    if eps <= 0:
        raise ConfigError(f"clip.vision.attention.layer_norm_epsilon={eps} must be positive")
    heads = gguf_int(meta.get("clip.vision.attention.head_count"), "clip.vision.attention.head_count")
    kv_rows = state[layer + "k_proj.linear.weight"].shape[0]
    if kv_rows % head_dim or heads % max(kv_rows // head_dim, 1) or kv_rows < head_dim:
        raise ConfigError(f"v.blk.0.attn_k's {kv_rows} rows are not key heads of {head_dim} that divide "
                          f"clip.vision.attention.head_count={heads}")
    return VisionConfig(
        hidden_size=gguf_int(meta.get("clip.vision.embedding_length"), "clip.vision.embedding_length"),
        intermediate_size=gguf_int(meta.get("clip.vision.feed_forward_length"), "clip.vision.feed_forward_length"),
        num_layers=gguf_int(meta.get("clip.vision.block_count"), "clip.vision.block_count"),
        num_heads=heads,
        num_kv_heads=kv_rows // head_dim,
        head_dim=head_dim,
        rms_norm_eps=eps,
        rope_theta=100.0,
        patch_size=gguf_int(meta.get("clip.vision.patch_size"), "clip.vision.patch_size"),
        pooling_kernel=gguf_int(meta.get("clip.vision.projector.scale_factor", 3), "clip.vision.projector.scale_factor"),
        position_embedding_size=state["vision_tower.patch_embedder.position_embedding_table"].shape[1],
        use_clipped_linears=_clipped(state, "vision_tower."),
        standardize="vision_tower.std_bias" in state,
    )


def _audio_config(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> AudioConfig:
    mel_bins = gguf_int(meta.get("clip.audio.num_mel_bins", NUM_MEL_BINS), "clip.audio.num_mel_bins")
    if mel_bins != NUM_MEL_BINS:
        raise ConfigError(f"clip.audio.num_mel_bins={mel_bins}; Gemma 4's audio features have {NUM_MEL_BINS}")
    hidden = gguf_int(meta.get("clip.audio.embedding_length"), "clip.audio.embedding_length")
    heads = gguf_int(meta.get("clip.audio.attention.head_count"), "clip.audio.attention.head_count")
    head_dim = state["audio_tower.layers.0.self_attn.per_dim_scale"].shape[0]
    if heads * head_dim != hidden:
        raise ConfigError(f"clip.audio.attention.head_count={heads} heads of {head_dim} (a.blk.0.per_dim_scale) "
                          f"do not make clip.audio.embedding_length={hidden}")
    conv = "audio_tower.subsample_conv_projection."
    return AudioConfig(
        hidden_size=hidden,
        num_layers=gguf_int(meta.get("clip.audio.block_count"), "clip.audio.block_count"),
        num_heads=heads,
        subsampling_conv_channels=(state[conv + "layer0.conv.weight"].shape[0],
                                   state[conv + "layer1.conv.weight"].shape[0]),
        conv_kernel_size=state["audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"].shape[-1],
        use_clipped_linears=_clipped(state, "audio_tower."),
        # llama.cpp fixes the audio eps at 1e-6 too: its converter wrote a wrong one into early files
        rms_norm_eps=1e-6,
        output_proj_dims=state["audio_tower.output_proj.weight"].shape[0],
    )


def _clipped(state: dict[str, torch.Tensor], tower: str) -> bool:
    """Whether a tower's linears are clippable: any clip bound says so (then a missing one is named
    as missing, not every other one as unexpected)."""
    return any(name.startswith(tower) and name.endswith(".input_max") for name in state)


def _media_tokens(tokenizer: Tokenizer, path: Path) -> MediaTokens:
    ids = {}
    for field, text in MEDIA_TOKEN_STRINGS.items():
        i = tokenizer.token_to_id(text)
        if i is None:
            raise LoadError(f"{path}: the text model's vocabulary has no {text} token, which media prompts need")
        ids[field] = i
    return MediaTokens(**ids)
