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
    "vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.", "model.vision_embedder.",
)
HF_RENAMES = {
    "embed_tokens_per_layer.weight": "ple.table",
    "per_layer_model_projection.weight": "ple.per_layer_model_projection.weight",
    "per_layer_projection_norm.weight": "ple.per_layer_projection_norm.weight",
}
_SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_NORM_WEIGHT = re.compile(r"(^|\.)[a-z_]*norm[a-z_0-9]*\.weight$")


def is_drafter_kv(name: str) -> bool:
    """A layer's own key/value projection or norm (gemmarun name): a drafter has none in use, every
    layer reading the target's keys and values."""
    return _SHARED_KV.match(name) is not None


def is_norm_weight(name: str) -> bool:
    """An RMSNorm's weight (gemmarun or HF name)."""
    return _NORM_WEIGHT.search(name) is not None


def map_hf_names(
    tensors: dict[str, torch.Tensor], cfg: TextConfig
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename HF checkpoint tensors to gemmarun names. Returns (state dict, {ignored name: reason})."""
    state: dict[str, torch.Tensor] = {}
    ignored: dict[str, str] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            ignored[name] = "the head is tied to embed_tokens (hf.check_tied_head)"
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
        if m and int(m.group(1)) < cfg.num_layers and not cfg.layers[int(m.group(1))].owns_kv:  # past: unexpected
            ignored[name] = "KV-shared layer: it reads its producer layer's keys and values"
            continue
        state[HF_RENAMES.get(short, short)] = tensor
    return state, ignored


# The drafter (`gemma4_assistant`): its text stack under `model.`, its own projections and centroid
# head at the top level. Every layer reads the target's keys and values.
ASSISTANT_PREFIX = "model."


def map_assistant_names(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename drafter checkpoint tensors to `model.assistant.Assistant` names. Returns (state
    dict, {ignored name: reason}); a name neither mapped nor ignored stays in the state under its
    own name, so the strict build reports it."""
    state: dict[str, torch.Tensor] = {}
    ignored: dict[str, str] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            ignored[name] = "the drafter's head is tied to model.embed_tokens"
        elif name.startswith(ASSISTANT_PREFIX) and is_drafter_kv(name[len(ASSISTANT_PREFIX):]):
            ignored[name] = "drafter layers read the target's keys and values"
        elif name.startswith(ASSISTANT_PREFIX):
            state[name[len(ASSISTANT_PREFIX):]] = tensor
        else:
            state[name] = tensor
    return state, ignored


# A SigLIP tower's pooling head: Gemma 3 reads the encoder's last hidden state, never the head.
SIGLIP_HEAD = "vision_tower.head."
# Gemma 3's released files nest the SigLIP tower one level deeper than transformers 5.23 writes it.
SIGLIP_LEGACY = "vision_tower.vision_model."


def map_hf_tower_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vision/audio tower tensors under gemmarun's `Encoders` / `UnifiedEncoders` /
    `Gemma3Encoders` names: the file's name minus `model.` (`vision_embedder.` is gemma4_unified's
    raw-patch embedder; Gemma 3's released files write `vision_tower.vision_model.` and
    `multi_modal_projector.` without it)."""
    towers = tuple(p.removeprefix("model.") for p in HF_TOWER_PREFIXES)
    state = {}
    for name, t in tensors.items():
        name = name.removeprefix("model.")
        state["vision_tower." + name[len(SIGLIP_LEGACY):] if name.startswith(SIGLIP_LEGACY) else name] = t
    return {name: t for name, t in state.items() if name.startswith(towers) and not name.startswith(SIGLIP_HEAD)}


def sanitize_gemma3(state: dict[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """Gemma 3's HF norms compute x * (1 + w); store 1 + w once so the shared RMSNorm multiplies
    directly (llama.cpp's converter does the same), and give each layer its unit layer scalar.
    1 + w stays float32, as the reference forms it (`1.0 + w.float()`): rounded back to a bfloat16
    checkpoint's dtype it moved the logits by ~2 %."""
    out = {}
    for name, t in state.items():
        out[name] = t.float() + 1.0 if is_norm_weight(name) and t.is_floating_point() else t
    for i in range(cfg.num_layers):
        out.setdefault(f"layers.{i}.layer_scalar", torch.ones(1))
    return out


# GGUF (llama.cpp) -> gemmarun. Per-block names: `blk.N.<key>.weight` -> `layers.N.<value>.weight`;
# entries whose GGUF name has no `.weight` suffix are listed with their full suffix.
GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "layer_output_scale.weight": "layer_scalar",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "per_layer_token_embd.weight": "ple.table",
    "per_layer_model_proj.weight": "ple.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "ple.per_layer_projection_norm.weight",
}
GGUF_IGNORED = {
    "rope_freqs.weight": "p-RoPE frequency divisors; derived from the config (spec 3.5)",
    "output.weight": "the head is tied to token_embd (load refuses one that differs)",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)$")
# A drafter GGUF (`gemma4-assistant`): the text names above plus its two projections.
GGUF_ASSISTANT_NAMES = {
    "nextn.pre_projection.weight": "pre_projection.weight",
    "nextn.post_projection.weight": "post_projection.weight",
}


def gguf_to_gemmarun(name: str) -> str | None:
    """The gemmarun name of a GGUF tensor, or None if it is in GGUF_IGNORED or unknown."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in GGUF_BLOCK_NAMES:
        return f"layers.{m.group(1)}.{GGUF_BLOCK_NAMES[m.group(2)]}"
    return None


# llama.cpp's multimodal projector GGUF (mmproj, spec 10.2) -> gemmarun `Encoders` names. A block
# key (`v.blk.N.<key>`, `a.blk.N.<key>`) names a module: its `.weight` is the module's weight, or
# `linear.weight` for a clippable linear (MMPROJ_CLIPPABLE), whose clip bounds keep their suffixes
# (`.input_min`, `.input_max`, `.output_min`, `.output_max`).
MMPROJ_ARCHITECTURE = "clip"  # an mmproj's general.architecture
MMPROJ_VISION_BLOCK = {
    "ln1": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "ln2": "pre_feedforward_layernorm",
    "ffn_post_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MMPROJ_AUDIO_BLOCK = {
    "ffn_norm": "feed_forward1.pre_layer_norm",
    "ffn_up": "feed_forward1.ffw_layer_1",
    "ffn_down": "feed_forward1.ffw_layer_2",
    "ffn_post_norm": "feed_forward1.post_layer_norm",
    "attn_pre_norm": "norm_pre_attn",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.post",
    "attn_k_rel": "self_attn.relative_k_proj",
    "per_dim_scale": "self_attn.per_dim_scale",  # a parameter, not a module (stored after softplus: see mmproj.sanitize)
    "attn_post_norm": "norm_post_attn",
    "conv_norm": "lconv1d.pre_layer_norm",
    "conv_pw1": "lconv1d.linear_start",
    "conv_dw": "lconv1d.depthwise_conv1d",
    "norm_conv": "lconv1d.conv_norm",
    "conv_pw2": "lconv1d.linear_end",
    "ffn_norm_1": "feed_forward2.pre_layer_norm",
    "ffn_up_1": "feed_forward2.ffw_layer_1",
    "ffn_down_1": "feed_forward2.ffw_layer_2",
    "ffn_post_norm_1": "feed_forward2.post_layer_norm",
    "ln2": "norm_out",
}
MMPROJ_CLIPPABLE = frozenset({
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.post",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "feed_forward1.ffw_layer_1", "feed_forward1.ffw_layer_2",
    "feed_forward2.ffw_layer_1", "feed_forward2.ffw_layer_2", "lconv1d.linear_start", "lconv1d.linear_end",
})
MMPROJ_BLOCKS = {"v": ("vision_tower.encoder.layers", MMPROJ_VISION_BLOCK), "a": ("audio_tower.layers", MMPROJ_AUDIO_BLOCK)}
MMPROJ_GLOBAL_NAMES = {
    "v.patch_embd.weight": "vision_tower.patch_embedder.input_proj.weight",
    "v.position_embd.weight": "vision_tower.patch_embedder.position_embedding_table",
    "v.std_bias": "vision_tower.std_bias",
    "v.std_scale": "vision_tower.std_scale",
    "mm.input_projection.weight": "embed_vision.embedding_projection.weight",
    "a.conv1d.0.weight": "audio_tower.subsample_conv_projection.layer0.conv.weight",
    "a.conv1d.0.norm.weight": "audio_tower.subsample_conv_projection.layer0.norm.weight",
    "a.conv1d.1.weight": "audio_tower.subsample_conv_projection.layer1.conv.weight",
    "a.conv1d.1.norm.weight": "audio_tower.subsample_conv_projection.layer1.norm.weight",
    "a.input_projection.weight": "audio_tower.subsample_conv_projection.input_proj_linear.weight",
    "a.pre_encode.out.weight": "audio_tower.output_proj.weight",
    "a.pre_encode.out.bias": "audio_tower.output_proj.bias",
    "mm.a.input_projection.weight": "embed_audio.embedding_projection.weight",
}
_MMPROJ_SUFFIXES = ("weight", "input_min", "input_max", "output_min", "output_max")
_MMPROJ_BLOCK = re.compile(rf"([va])\.blk\.(\d+)\.([a-z_0-9]+)\.({'|'.join(_MMPROJ_SUFFIXES)})$")


def mmproj_to_gemmarun(name: str) -> str | None:
    """The gemmarun `Encoders` name of an mmproj GGUF tensor, or None if unknown."""
    if name in MMPROJ_GLOBAL_NAMES:
        return MMPROJ_GLOBAL_NAMES[name]
    m = _MMPROJ_BLOCK.match(name)
    if m is None:
        return None
    tower, index, key, suffix = m.groups()
    prefix, table = MMPROJ_BLOCKS[tower]
    module = table.get(key)
    if module is None:
        return None
    if module in MMPROJ_CLIPPABLE:
        return f"{prefix}.{index}.{module}.{'linear.weight' if suffix == 'weight' else suffix}"
    if suffix != "weight":
        return None  # clip bounds on a module that has none
    if key == "per_dim_scale":
        return f"{prefix}.{index}.{module}"
    return f"{prefix}.{index}.{module}.weight"


def mmproj_block(name: str) -> int | None:
    """The block index of a `v.blk.N.*` / `a.blk.N.*` mmproj tensor, else None."""
    m = _MMPROJ_BLOCK.match(name)
    return int(m.group(2)) if m else None


def gemmarun_to_mmproj(name: str) -> str:
    """The mmproj tensor name `mmproj_to_gemmarun` maps to `name` (for messages; `name` itself if
    none does)."""
    for gguf_name, ours in MMPROJ_GLOBAL_NAMES.items():
        if ours == name:
            return gguf_name
    for tower, (prefix, table) in MMPROJ_BLOCKS.items():
        m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
        for key in table if m else ():
            for suffix in _MMPROJ_SUFFIXES:
                candidate = f"{tower}.blk.{m.group(1)}.{key}.{suffix}"
                if mmproj_to_gemmarun(candidate) == name:
                    return candidate
    return name


# Ollama's Gemma 4 model file (its converter's single GGUF) holds the towers beside the text model,
# named as llama.cpp's mmproj names them but for six audio tensors (two of whose names mean other
# tensors there): Ollama's block key or global name -> the mmproj's.
OLLAMA_AUDIO_BLOCK = {"linear_pos": "attn_k_rel", "ln1": "attn_pre_norm", "ln2": "attn_post_norm",
                      "layer_pre_norm": "ln2"}
OLLAMA_AUDIO_GLOBAL = {"a.pre_encode.out.": "a.input_projection.", "mm.a.fc.": "a.pre_encode.out."}
OLLAMA_TOWER_PREFIXES = ("v.", "a.", "mm.")
# The vision clip bounds again, packed (layers x 7 linears x 4, then the projector's 4): older files
# hold only these, which gemmarun does not unpack; current ones hold the per-tensor bounds too.
OLLAMA_PACKED_CLAMPS = "v.clamp_data"


# Ollama's Gemma 3 model file holds the SigLIP tower and projector too, under the checkpoint's
# names (`vision_tower.vision_model.` -> `v.`, `encoder.layers` -> `blk`, `multi_modal_projector`
# -> `mm`, `self_attn.out_proj` -> `attn_output`, q/k/v -> `attn_q`...; the norm stored 1 + w).
OLLAMA_SIGLIP_GLOBAL_NAMES = {
    "v.patch_embedding.weight": "vision_tower.embeddings.patch_embedding.weight",
    "v.patch_embedding.bias": "vision_tower.embeddings.patch_embedding.bias",
    "v.position_embedding.weight": "vision_tower.embeddings.position_embedding.weight",
    "v.post_layernorm.weight": "vision_tower.post_layernorm.weight",
    "v.post_layernorm.bias": "vision_tower.post_layernorm.bias",
    "mm.mm_input_projection.weight": "multi_modal_projector.mm_input_projection_weight",  # [Hv, H], as HF's
    "mm.mm_soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight",  # stored 1 + w
}
OLLAMA_SIGLIP_BLOCK = {
    "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def ollama_siglip_to_gemmarun(name: str) -> str | None:
    """The gemmarun `Gemma3Encoders` name of a tower tensor of an Ollama Gemma 3 file, or None."""
    return _siglip_to_gemmarun(name, OLLAMA_SIGLIP_GLOBAL_NAMES, OLLAMA_SIGLIP_BLOCK)


def ollama_tower_to_gemmarun(name: str) -> str | None:
    """The gemmarun `Encoders` name of a tower tensor of an Ollama Gemma 4 file, or None if unknown."""
    m = _MMPROJ_BLOCK.match(name)
    if m and m.group(1) == "a" and m.group(3) in OLLAMA_AUDIO_BLOCK:
        name = f"a.blk.{m.group(2)}.{OLLAMA_AUDIO_BLOCK[m.group(3)]}.{m.group(4)}"
    else:
        for ollama, llama_cpp in OLLAMA_AUDIO_GLOBAL.items():
            if name.startswith(ollama):
                name = llama_cpp + name[len(ollama):]
                break
    return mmproj_to_gemmarun(name)


def gemmarun_to_gguf(name: str) -> str:
    """Inverse of `gguf_to_gemmarun` (used by `convert`)."""
    for gguf_name, ours in GGUF_GLOBAL_NAMES.items():
        if ours == name:
            return gguf_name
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    if m:
        for gguf_suffix, ours in GGUF_BLOCK_NAMES.items():
            if ours == m.group(2):
                return f"blk.{m.group(1)}.{gguf_suffix}"
    raise KeyError(name)


# Gemma 3's mmproj (projector type "gemma3"): the SigLIP tower and projector -> `Gemma3Encoders`
# names. Every module has a `.weight` and (but the projector's) a `.bias`.
MMPROJ_SIGLIP_GLOBAL_NAMES = {
    "v.patch_embd.weight": "vision_tower.embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "vision_tower.embeddings.patch_embedding.bias",
    "v.position_embd.weight": "vision_tower.embeddings.position_embedding.weight",
    "v.post_ln.weight": "vision_tower.post_layernorm.weight",
    "v.post_ln.bias": "vision_tower.post_layernorm.bias",
    "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",  # [Hv, H], as HF's
    "mm.soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight",  # stored 1 + w
}
MMPROJ_SIGLIP_BLOCK = {
    "ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
}
_SIGLIP_BLOCK = re.compile(r"v\.blk\.(\d+)\.([a-z_0-9.]+)\.(weight|bias)$")  # (Ollama's keys hold dots)


def mmproj_siglip_to_gemmarun(name: str) -> str | None:
    """The gemmarun `Gemma3Encoders` name of a Gemma 3 mmproj tensor, or None if unknown."""
    return _siglip_to_gemmarun(name, MMPROJ_SIGLIP_GLOBAL_NAMES, MMPROJ_SIGLIP_BLOCK)


def _siglip_to_gemmarun(name: str, global_names: dict[str, str], block: dict[str, str]) -> str | None:
    """A SigLIP tower tensor's gemmarun name from a file's global names and block keys."""
    if name in global_names:
        return global_names[name]
    m = _SIGLIP_BLOCK.match(name)
    module = block.get(m.group(2)) if m else None
    return f"vision_tower.encoder.layers.{m.group(1)}.{module}.{m.group(3)}" if module else None
