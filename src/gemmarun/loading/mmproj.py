"""llama.cpp's multimodal projector GGUF (mmproj, spec 10.2): Gemma 4's vision and audio towers in
a file of their own, loaded beside a GGUF text model as `llama-server --mmproj` takes them.

An mmproj carries the towers' weights and a few sizes (`clip.vision.*`, `clip.audio.*`); the rest of
each tower's config is read off its tensors' shapes, and what neither holds keeps the value every
released checkpoint uses, which llama.cpp fixes too (vision RoPE base 100, 3x3 pooling, audio
attention chunks). `sanitize` undoes the converter's three layout changes, so the towers are the
same modules, with the same weights, as from a HF folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TextConfig
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
# The placeholder and delimiter strings of spec 6.1, looked up in the text model's vocabulary.
MEDIA_TOKEN_STRINGS = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>", "boi": "<|image>",
                       "eoi": "<image|>", "boa": "<|audio>", "eoa": "<audio|>"}


def load_mmproj(path: Path, text_cfg: TextConfig, tokenizer: Tokenizer, *, dtype: torch.dtype,
                device: torch.device) -> Encoders:
    """The towers of an mmproj GGUF, checked against the text model they are to feed."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise LoadError(f"{path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise LoadError(f"{path}: not a GGUF file (magic {magic!r}); --mmproj takes llama.cpp's mmproj GGUF")
    f = GGUFFile(path)
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch != "clip":
        raise LoadError(f"{path}: general.architecture is {arch!r}, not 'clip': not a multimodal projector (mmproj) GGUF")
    if text_cfg.family != "gemma4":
        raise LoadError(f"{path}: an mmproj adds towers to a Gemma 4 text model; this one is {text_cfg.family} "
                        "(Gemma 3 runs as text only in gemmarun)")
    state = {}
    unknown = []
    for name, info in f.tensors.items():
        ours = mmproj_to_gemmarun(name)
        if ours is None:
            unknown.append(name)
            continue
        state[ours] = sanitize(ours, read_tensor(f, info, True).float())
    if unknown:
        raise LoadError(f"{path}: tensors that are not Gemma 4 vision or audio: {', '.join(unknown[:8])}")
    try:
        vision = _vision_config(meta, state) if _projector(meta, "vision") else None
        audio = _audio_config(meta, state) if _projector(meta, "audio") else None
    except KeyError as e:
        raise LoadError(f"{path}: no {e.args[0]} (a Gemma 4 mmproj has it)") from None
    except (ConfigError, TypeError, ValueError) as e:
        raise LoadError(f"{path}: {e}") from None
    if vision is None and audio is None:
        raise LoadError(f"{path}: the mmproj has neither a vision nor an audio encoder")
    for tower, key in (("vision", "embed_vision.embedding_projection.weight"),
                       ("audio", "embed_audio.embedding_projection.weight")):
        weight = state.get(key)
        if weight is not None and weight.shape[0] != text_cfg.hidden_size:
            raise LoadError(f"{path}: its {tower} tokens are {weight.shape[0]} wide, the text model's embeddings "
                            f"{text_cfg.hidden_size}: the two files are not from the same checkpoint")
    cfg = MultimodalConfig(vision=vision, audio=audio, tokens=_media_tokens(tokenizer, path))
    return build_encoders(cfg, text_cfg, state, dtype=dtype, device=device)


def sanitize(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor as the HF checkpoint holds it, from llama.cpp's converter's layout."""
    if name == "vision_tower.patch_embedder.input_proj.weight":
        # written as a conv kernel [H, 3, p, p]; the patches are flattened (row, column, channel)
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1).contiguous()
    if name.endswith("self_attn.per_dim_scale"):
        # written after softplus (spec 10.2); the tower applies softplus itself: invert it exactly
        # enough (in float64, |error| ~1 ulp after the tower's float32 softplus)
        y = t.double()
        return (y + torch.log(-torch.expm1(-y))).float()
    if name.endswith("depthwise_conv1d.weight"):
        return t.unsqueeze(1)  # [C, K] -> [C, 1, K]
    if name.endswith(("input_min", "input_max", "output_min", "output_max")):
        return t.reshape(())  # one-element tensors in the file, scalars in the tower
    return t


def _projector(meta: dict[str, Any], tower: str) -> bool:
    """Whether the file has this tower, of a kind gemmarun runs (else a one-line error)."""
    if not meta.get(f"clip.has_{tower}_encoder", False):
        return False
    kind = meta.get(f"clip.{tower}.projector_type", meta.get("clip.projector_type"))
    want = VISION_PROJECTOR if tower == "vision" else AUDIO_PROJECTOR
    if kind != want:
        raise ConfigError(f"its {tower} projector is {kind!r}; gemmarun runs Gemma 4's ({want!r})")
    return True


def _vision_config(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> VisionConfig:
    layer = "vision_tower.encoder.layers.0.self_attn."
    head_dim = state[layer + "q_norm.weight"].shape[0]
    heads = int(meta["clip.vision.attention.head_count"])
    if head_dim % 4:
        raise ConfigError(f"vision head_dim={head_dim} must be a multiple of 4 (2-D RoPE)")
    return VisionConfig(
        hidden_size=int(meta["clip.vision.embedding_length"]),
        intermediate_size=int(meta["clip.vision.feed_forward_length"]),
        num_layers=int(meta["clip.vision.block_count"]),
        num_heads=heads,
        num_kv_heads=state[layer + "k_proj.linear.weight"].shape[0] // head_dim,
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        rope_theta=100.0,
        patch_size=int(meta["clip.vision.patch_size"]),
        pooling_kernel=int(meta.get("clip.vision.projector.scale_factor", 3)),
        position_embedding_size=state["vision_tower.patch_embedder.position_embedding_table"].shape[1],
        use_clipped_linears=layer + "q_proj.input_max" in state,
        standardize="vision_tower.std_bias" in state,
    )


def _audio_config(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> AudioConfig:
    mel_bins = int(meta.get("clip.audio.num_mel_bins", NUM_MEL_BINS))
    if mel_bins != NUM_MEL_BINS:
        raise ConfigError(f"clip.audio.num_mel_bins={mel_bins}; Gemma 4's audio features have {NUM_MEL_BINS}")
    conv = "audio_tower.subsample_conv_projection."
    return AudioConfig(
        hidden_size=int(meta["clip.audio.embedding_length"]),
        num_layers=int(meta["clip.audio.block_count"]),
        num_heads=int(meta["clip.audio.attention.head_count"]),
        subsampling_conv_channels=(state[conv + "layer0.conv.weight"].shape[0],
                                   state[conv + "layer1.conv.weight"].shape[0]),
        conv_kernel_size=state["audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"].shape[-1],
        use_clipped_linears="audio_tower.layers.0.self_attn.q_proj.input_max" in state,
        # llama.cpp fixes the audio eps at 1e-6 too: its converter wrote a wrong one into early files
        rms_norm_eps=1e-6,
        output_proj_dims=state["audio_tower.output_proj.weight"].shape[0],
    )


def _media_tokens(tokenizer: Tokenizer, path: Path) -> MediaTokens:
    ids = {}
    for field, text in MEDIA_TOKEN_STRINGS.items():
        i = tokenizer.token_to_id(text)
        if i is None:
            raise LoadError(f"{path}: the text model's vocabulary has no {text} token, which media prompts need")
        ids[field] = i
    return MediaTokens(**ids)
