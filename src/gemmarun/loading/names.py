"""THE name tables: checkpoint tensor names -> gemmarun module names, and what is ignored and why.

gemmarun's module names are the HF checkpoint's (minus the prefix), with two exceptions: the PLE
table and its projection live under `ple.` (`ple.table` is the memory-mapped table itself).
"""

from __future__ import annotations

import re

import torch

from ..config import TextConfig

# Longest first: a CausalLM checkpoint uses "model.", a multimodal one "model.language_model.".
HF_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
HF_TOWER_PREFIXES = (
    "model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
    "vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
)
HF_RENAMES = {
    "embed_tokens_per_layer.weight": "ple.table",
    "per_layer_model_projection.weight": "ple.per_layer_model_projection.weight",
    "per_layer_projection_norm.weight": "ple.per_layer_projection_norm.weight",
}
_SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_NORM_WEIGHT = re.compile(r"(^|\.)[a-z_]*norm[a-z_0-9]*\.weight$")


def map_hf_names(
    tensors: dict[str, torch.Tensor], cfg: TextConfig
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename HF checkpoint tensors to gemmarun names. Returns (state dict, {ignored name: reason})."""
    state: dict[str, torch.Tensor] = {}
    ignored: dict[str, str] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            ignored[name] = "the head is tied to embed_tokens"
            continue
        if name.startswith(HF_TOWER_PREFIXES):
            ignored[name] = "vision/audio tower weight, not used by the text decoder"
            continue
        prefix = next((p for p in HF_TEXT_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            ignored[name] = "not a text-decoder tensor"
            continue
        short = name[len(prefix) :]
        m = _SHARED_KV.match(short)
        if m and not cfg.layers[int(m.group(1))].owns_kv:
            ignored[name] = "KV-shared layer: it reads its producer layer's keys and values"
            continue
        state[HF_RENAMES.get(short, short)] = tensor
    return state, ignored


def sanitize_gemma3(state: dict[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """Gemma 3's HF norms compute x * (1 + w); store 1 + w once so the shared RMSNorm multiplies
    directly (llama.cpp's converter does the same), and give each layer its unit layer scalar."""
    out = {}
    for name, t in state.items():
        out[name] = (t.float() + 1.0).to(t.dtype) if _NORM_WEIGHT.search(name) else t
    for i in range(cfg.num_layers):
        out.setdefault(f"layers.{i}.layer_scalar", torch.ones(1))
    return out
