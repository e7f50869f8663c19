"""GGUFs laid out as Ollama's own converter writes Gemma 4 (`ollama create` from a HF folder): one
file holding the text model and its vision and audio towers, for tests that load what Ollama users
have in `~/.ollama/models/blobs`.

Ollama's converter is Go and is not installable here, so this follows its code as read in
ollama/ollama (convert/convert_gemma4.go, convert.go, tokenizer.go, reader_safetensors.go):
- names: each checkpoint name goes once through a `strings.NewReplacer` of the converter's pairs
  (at each position the first pair in list order that matches; no rescan), then `v.blk.*` names
  are renamed once more (ln1, ln2, attn_out, attn_post_norm, ffn_post_norm, out_scale);
- data: audio `per_dim_scale` stored after softplus (with `.weight`), the depthwise conv squeezed
  to [C, K], the patch embedding permuted to a [n, 3, p, p] kernel and forced to F16, 0-dim
  scalars as [1], `embedding_post_projection_norm` skipped, `rope_freqs` added;
- metadata: `gemma4.*`, `gemma4.vision.*`, `gemma4.audio.*` (no `clip.*`), and the tokenizer as
  `tokenizer.ggml.model = "llama"`, `pre = "gemma4"`, with tokenizer.json's merges, scores = ids,
  types 3 (special added), 4 (other added), 1 (the rest), padded to the config's vocabulary.
Matrices are F32 here (exact comparisons) unless `ollama_types`, which writes Ollama's F16.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter

# convert_gemma4.go's Replacements(), in order (the transformers 5.23 spellings).
REPLACEMENTS = [
    (".linear.weight", ".weight"), (".linear.bias", ".bias"),
    ("model.audio_tower.subsample_conv_projection.layer0.conv", "a.conv1d.0"),
    ("model.audio_tower.subsample_conv_projection.layer0.norm", "a.conv1d.0.norm"),
    ("model.audio_tower.subsample_conv_projection.layer1.conv", "a.conv1d.1"),
    ("model.audio_tower.subsample_conv_projection.layer1.norm", "a.conv1d.1.norm"),
    ("model.audio_tower.subsample_conv_projection.input_proj_linear", "a.pre_encode.out"),
    ("model.audio_tower.layers", "a.blk"),
    ("self_attn.relative_k_proj", "linear_pos"), ("self_attn.per_dim_scale", "per_dim_scale"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("norm_post_attn", "ln2"), ("norm_pre_attn", "ln1"), ("self_attn.post", "attn_out"),
    ("feed_forward1.pre_layer_norm", "ffn_norm"), ("feed_forward1.post_layer_norm", "ffn_post_norm"),
    ("feed_forward1.ffw_layer_1", "ffn_up"), ("feed_forward1.ffw_layer_2", "ffn_down"),
    ("feed_forward2.pre_layer_norm", "ffn_norm_1"), ("feed_forward2.post_layer_norm", "ffn_post_norm_1"),
    ("feed_forward2.ffw_layer_1", "ffn_up_1"), ("feed_forward2.ffw_layer_2", "ffn_down_1"),
    ("lconv1d.depthwise_conv1d", "conv_dw"), ("lconv1d.pre_layer_norm", "conv_norm"),
    ("lconv1d.conv_norm", "norm_conv"), ("lconv1d.linear_start", "conv_pw1"), ("lconv1d.linear_end", "conv_pw2"),
    ("norm_out", "layer_pre_norm"),
    ("model.embed_audio.embedding_projection", "mm.a.input_projection"),
    ("model.audio_tower.output_proj", "mm.a.fc"),
    ("model.vision_tower.encoder.layers", "v.blk"),
    ("model.vision_tower.patch_embedder.input_proj", "v.patch_embd"),
    ("model.vision_tower.patch_embedder.position_embedding_table", "v.position_embd.weight"),
    ("model.vision_tower.std_bias", "v.std_bias"), ("model.vision_tower.std_scale", "v.std_scale"),
    ("model.embed_vision.embedding_projection", "mm.input_projection"),
    ("model.language_model.embed_tokens_per_layer", "per_layer_token_embd"),
    ("model.language_model.embed_tokens", "token_embd"),
    ("model.language_model.per_layer_model_projection", "per_layer_model_proj"),
    ("model.language_model.per_layer_projection_norm", "per_layer_proj_norm"),
    ("model.language_model.norm", "output_norm"), ("model.language_model.layers", "blk"),
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_proj", "attn_k"), ("self_attn.k_norm", "attn_k_norm"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down"),
    ("mlp.up_proj", "ffn_up"), ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm_2", "pre_ffw_norm_2"), ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm_1", "post_ffw_norm_1"), ("post_feedforward_layernorm_2", "post_ffw_norm_2"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
    ("per_layer_input_gate", "inp_gate"), ("per_layer_projection", "proj"), ("post_per_layer_input_norm", "post_norm"),
    ("router.proj", "ffn_gate_inp"), ("router.scale", "ffn_gate_inp.scale"),
    ("router.per_expert_scale", "ffn_down_exps.scale"),
    ("experts.gate_up_proj", "ffn_gate_up_exps.weight"), ("experts.down_proj", "ffn_down_exps.weight"),
    ("layer_scalar", "layer_output_scale.weight"),
]
# Tensors() renames vision blocks once more, to the published mmproj names.
VISION_BLOCK_RENAMES = [(".attn_norm.", ".ln1."), (".ffn_norm.", ".ln2."), (".attn_output.", ".attn_out."),
                        (".post_attention_norm.", ".attn_post_norm."), (".post_ffw_norm.", ".ffn_post_norm."),
                        (".layer_output_scale.", ".out_scale.")]


def go_replace(name: str, pairs=REPLACEMENTS) -> str:
    """Go's strings.NewReplacer: left to right, the first pair in list order that matches at a
    position wins, the replaced text is not scanned again."""
    out, i = [], 0
    while i < len(name):
        for old, new in pairs:
            if name.startswith(old, i):
                out.append(new)
                i += len(old)
                break
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def ollama_name(hf_name: str) -> str:
    name = go_replace(hf_name)
    if name.startswith("v.blk."):
        for old, new in VISION_BLOCK_RENAMES:
            name = name.replace(old, new, 1)
    if name.startswith("a.blk.") and name.endswith("per_dim_scale"):
        name += ".weight"
    return name


def _tokenizer_metadata(w: GGUFWriter, folder: Path, vocab_size: int) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: (t, 1) for t, i in tok["model"]["vocab"].items()}
    for added in tok["added_tokens"]:
        by_id[added["id"]] = (added["content"], 3 if added["special"] else 4)
    ids = sorted(by_id)
    tokens, types = [by_id[i][0] for i in ids], [by_id[i][1] for i in ids]
    for i in range(len(tokens), vocab_size):  # padded to the config's vocabulary
        tokens.append(f"[PAD{i}]")
        types.append(4)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_string("tokenizer.ggml.pre", "gemma4")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(len(tokens))])
    w.add_array("tokenizer.ggml.token_type", types)
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    if merges:
        w.add_array("tokenizer.ggml.merges", merges)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    index = {t: i for i, t in enumerate(tokens)}
    for kind in ("bos", "eos", "unk", "pad"):
        key = {"unk": "unknown", "pad": "padding"}.get(kind, kind)
        content = config.get(f"{kind}_token")
        if content in index:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", index[content])
            if isinstance(config.get(f"add_{kind}_token"), bool):
                w.add_bool(f"tokenizer.ggml.add_{key}_token", config[f"add_{kind}_token"])


def _text_metadata(w: GGUFWriter, tc: dict) -> None:
    a = "gemma4"
    n = tc["num_hidden_layers"]
    w.add_uint32(f"{a}.block_count", n)
    w.add_uint32(f"{a}.embedding_length", tc["hidden_size"])
    shared = tc.get("num_kv_shared_layers", 0)
    if tc.get("use_double_wide_mlp") and shared > 0:
        w.add_array(f"{a}.feed_forward_length",
                    [tc["intermediate_size"] * (2 if i >= n - shared else 1) for i in range(n)])
    else:
        w.add_uint32(f"{a}.feed_forward_length", tc["intermediate_size"])
    w.add_uint32(f"{a}.context_length", tc["max_position_embeddings"])
    w.add_uint32(f"{a}.attention.head_count", tc["num_attention_heads"])
    global_kv = tc.get("num_global_key_value_heads")
    if global_kv is not None and global_kv != tc["num_key_value_heads"]:
        w.add_array(f"{a}.attention.head_count_kv", [tc["num_key_value_heads"] if t == "sliding_attention"
                                                     else global_kv for t in tc["layer_types"]])
    else:
        w.add_uint32(f"{a}.attention.head_count_kv", tc["num_key_value_heads"])
    w.add_uint32(f"{a}.attention.key_length", tc["global_head_dim"])
    w.add_uint32(f"{a}.attention.value_length", tc["global_head_dim"])
    w.add_uint32(f"{a}.attention.key_length_swa", tc["head_dim"])
    w.add_uint32(f"{a}.attention.value_length_swa", tc["head_dim"])
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", tc["rms_norm_eps"])
    w.add_uint32(f"{a}.attention.sliding_window", tc["sliding_window"])
    w.add_array(f"{a}.attention.sliding_window_pattern", [t == "sliding_attention" for t in tc["layer_types"]])
    w.add_uint32(f"{a}.attention.shared_kv_layers", shared)
    rope = tc["rope_parameters"]
    w.add_float32(f"{a}.rope.freq_base", rope["full_attention"]["rope_theta"])
    w.add_uint32(f"{a}.rope.dimension_count", tc["global_head_dim"])
    w.add_float32(f"{a}.rope.freq_base_swa", rope["sliding_attention"]["rope_theta"])
    w.add_uint32(f"{a}.rope.dimension_count_swa", tc["head_dim"])
    if (tc.get("final_logit_softcapping") or 0) > 0:
        w.add_float32(f"{a}.final_logit_softcapping", tc["final_logit_softcapping"])
    if tc.get("enable_moe_block"):
        w.add_uint32(f"{a}.expert_count", tc["num_experts"])
        w.add_uint32(f"{a}.expert_used_count", tc["top_k_experts"])
        w.add_uint32(f"{a}.expert_feed_forward_length", tc["moe_intermediate_size"])
    w.add_uint32(f"{a}.embedding_length_per_layer_input", tc.get("hidden_size_per_layer_input") or 0)


def _tower_metadata(w: GGUFWriter, vc: dict | None, ac: dict | None) -> None:
    if vc and vc.get("num_hidden_layers", 0) > 0:
        w.add_uint32("gemma4.vision.block_count", vc["num_hidden_layers"])
        w.add_uint32("gemma4.vision.embedding_length", vc["hidden_size"])
        w.add_uint32("gemma4.vision.attention.head_count", vc["num_attention_heads"])
        w.add_uint32("gemma4.vision.feed_forward_length", vc["intermediate_size"])
        w.add_uint32("gemma4.vision.patch_size", vc["patch_size"])
        w.add_uint32("gemma4.vision.num_channels", vc.get("num_channels", 3))
        w.add_uint32("gemma4.vision.projector.scale_factor", vc.get("pooling_kernel_size") or 3)
        w.add_float32("gemma4.vision.attention.layer_norm_epsilon", vc.get("layer_norm_eps") or 1e-6)
    if ac and ac.get("num_hidden_layers", 0) > 0:
        w.add_uint32("gemma4.audio.block_count", ac["num_hidden_layers"])
        w.add_uint32("gemma4.audio.embedding_length", ac["hidden_size"])
        w.add_uint32("gemma4.audio.feed_forward_length", ac["hidden_size"] * 4)
        w.add_uint32("gemma4.audio.attention.head_count", ac["num_attention_heads"])
        w.add_float32("gemma4.audio.attention.layer_norm_epsilon", ac.get("rms_norm_eps") or 1e-6)
        if ac.get("conv_kernel_size", 0) > 0:
            w.add_uint32("gemma4.audio.conv_kernel_size", ac["conv_kernel_size"])


def _data(name: str, t: torch.Tensor, ollama_types: bool) -> np.ndarray:
    """A tensor as the converter writes it (its repackers and dtype rules)."""
    a = t.float().numpy()
    if a.ndim == 0:
        a = a.reshape(1)
    if name.startswith("a.blk.") and name.endswith("per_dim_scale.weight"):
        a = np.log1p(np.exp(a.astype(np.float64))).astype(np.float32)  # softplus
    if name.startswith("a.blk.") and ".conv_dw." in name and a.ndim == 3:
        a = a.reshape(a.shape[0], a.shape[2])
    if name == "v.patch_embd.weight":
        n, k = a.shape
        p = int(round((k // 3) ** 0.5))
        return np.ascontiguousarray(a.reshape(n, p, p, 3).transpose(0, 3, 1, 2)).astype(np.float16)
    forced_f32 = (a.ndim == 1 or name.startswith(("a.conv1d.",)) or ".conv_dw." in name
                  or name == "v.position_embd.weight" or name.endswith((".ffn_gate_inp.weight", ".bias")))
    return a if forced_f32 or not ollama_types else a.astype(np.float16)


def write_ollama_gguf(folder: Path, out: Path, ollama_types: bool = False) -> Path:
    """Ollama's single-file GGUF of a Gemma 4 HF folder (text, vision and audio)."""
    from safetensors.torch import load_file

    raw = json.loads((folder / "config.json").read_text())
    tc, vc, ac = raw["text_config"], raw.get("vision_config"), raw.get("audio_config")
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    w = GGUFWriter(out, "gemma4")
    w.add_uint32("general.file_type", 1)
    w.add_uint32("general.quantization_version", 2)
    _tokenizer_metadata(w, folder, tc["vocab_size"])
    _text_metadata(w, tc)
    _tower_metadata(w, vc, ac)
    for hf_name in sorted(tensors):
        if "embedding_post_projection_norm" in hf_name:
            continue
        name = ollama_name(hf_name)
        w.add_tensor(name, _data(name, tensors[hf_name], ollama_types))
    n_rot = int(tc["global_head_dim"] * tc["rope_parameters"]["full_attention"].get("partial_rotary_factor", 0.25) / 2)
    freqs = np.array([1.0] * n_rot + [1e30] * (tc["global_head_dim"] // 2 - n_rot), np.float32)
    w.add_tensor("rope_freqs.weight", freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# convert_gemma3.go's Replacements() (the released checkpoints' layout), in order.
GEMMA3_REPLACEMENTS = [
    ("lm_head", "output"), ("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"),
    ("vision_tower.vision_model.embeddings", "v"), ("vision_tower.vision_model", "v"),
    ("vision_model.vision_model.embeddings", "v"), ("vision_model.vision_model", "v"),
    ("language_model.", ""), ("model.layers", "blk"), ("encoder.layers", "blk"),
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_proj", "attn_k"), ("self_attn.k_norm", "attn_k_norm"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"), ("self_attn.out_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
    ("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"), ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
    ("input_projection_weight", "input_projection.weight"), ("multi_modal_projector", "mm"),
]
# What the converter's Gemma3ForConditionalGeneration branch leaves out (its runtime's defaults
# stand in): no eps, RoPE bases or scaling, window pattern or softcap.
GEMMA3_UNWRITTEN = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa", "rope.scaling.type",
                    "rope.scaling.factor", "attention.sliding_window_pattern", "final_logit_softcapping")


def write_ollama_gemma3_gguf(folder: Path, out: Path) -> Path:
    """Ollama's single-file GGUF of a Gemma 3 HF folder with its SigLIP tower (released layout:
    `vision_tower.vision_model.*`): the text part as llama.cpp writes it (the same names and 1 + w
    norms; the converter reads the vocabulary as llama.cpp does), the keys above left out, the
    tower and projector under the converter's names with `gemma3.vision.*` keys, and the
    projector's norm stored 1 + w as every `_norm.weight` outside `v.`. Matrices F32."""
    from gguf import GGUFReader, GGUFValueType
    from safetensors.torch import load_file

    from gemmarun.loading.convert import convert
    from tiny_gguf import rewrite_gguf

    raw = json.loads((folder / "config.json").read_text())
    vc = raw["vision_config"]
    text = convert(folder, out.with_suffix(".text.gguf"), "f32", progress=False)
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    meta = {f"gemma3.{key}": None for key in GEMMA3_UNWRITTEN}
    meta.update({
        "gemma3.vision.block_count": (vc["num_hidden_layers"], u32),
        "gemma3.vision.embedding_length": (vc["hidden_size"], u32),
        "gemma3.vision.feed_forward_length": (vc["intermediate_size"], u32),
        "gemma3.vision.image_size": (vc["image_size"], u32),
        "gemma3.vision.patch_size": (vc["patch_size"], u32),
        "gemma3.vision.num_channels": (vc.get("num_channels", 3), u32),
        "gemma3.vision.attention.head_count": (vc["num_attention_heads"], u32),
        "gemma3.vision.attention.layer_norm_epsilon": (vc.get("layer_norm_eps") or 1e-6, f32),
        "gemma3.mm.tokens_per_image": (raw["mm_tokens_per_image"], u32),
    })
    towers = {}
    for hf_name, t in load_file(folder / "model.safetensors").items():
        if not hf_name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        name = go_replace(hf_name, GEMMA3_REPLACEMENTS)
        a = t.float().numpy()
        towers[name] = a + 1.0 if name.endswith("_norm.weight") and not name.startswith("v.") else a
    present = set(GGUFReader(text).fields)  # (a key dropped must be there)
    rewrite_gguf(text, out, meta={k: v for k, v in meta.items() if v is not None or k in present}, tensors=towers)
    text.unlink()
    return out
