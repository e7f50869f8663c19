"""Tiny seeded random Gemma 4 / Gemma 3 models built with transformers 5.23 (test-only).

Each family exercises its distinguishing features at toy size. Weights are made
non-degenerate (random norm weights, layer scalars, router scales) so a wrong norm, RoPE or
scale fails; q/k norm weights are scaled down so the reference's own float32 noise stays far
below the 1e-4 tolerance; embeddings stay small so greedy continuations vary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_tokenizer import MEDIA_IDS, write_tiny_tokenizer

WINDOW = 4
S, F = "sliding_attention", "full_attention"

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    head_dim=16,
    sliding_window=WINDOW,
    max_position_embeddings=256,
    final_logit_softcapping=0.5,  # small enough to bite: the logits are ~0.1-0.3
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    # PLE, KV sharing (last 4 layers), 4:1 pattern, double-wide MLP in shared layers.
    "e2b": dict(
        num_hidden_layers=10, layer_types=[S, S, S, S, F] * 2, num_key_value_heads=1,
        global_head_dim=32, hidden_size_per_layer_input=8, vocab_size_per_layer_input=256,
        num_kv_shared_layers=4, use_double_wide_mlp=True,
    ),
    # PLE, KV sharing, 5:1 pattern.
    "e4b": dict(
        num_hidden_layers=12, layer_types=[S, S, S, S, S, F] * 2, num_key_value_heads=2,
        global_head_dim=32, hidden_size_per_layer_input=8, vocab_size_per_layer_input=256,
        num_kv_shared_layers=5,
    ),
    # K=V on full layers, global head dim larger than local, global KV-head count.
    "31b": dict(
        num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=2,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_bidirectional_attention="vision",
    ),
    # MoE (4 experts, top 2) with the dense shared MLP, K=V.
    "26b": dict(
        num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=2,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=24, intermediate_size=48,
        use_bidirectional_attention="vision",
    ),
}
# The 26B with 8 experts, top 4: enough routed experts that the order they are summed in shows.
FAMILIES["26b-top4"] = dict(FAMILIES["26b"], num_experts=8, top_k_experts=4)

GEMMA3 = dict(
    # the released 5:1 pattern, which llama.cpp assumes for every Gemma 3 (the llama.cpp bench test)
    COMMON, num_hidden_layers=6, num_key_value_heads=2, layer_types=[S, S, S, S, S, F],
    query_pre_attn_scalar=16, rope_theta=1e6, rope_local_base_freq=1e4,
    rope_scaling={"rope_type": "linear", "factor": 8.0},  # as Gemma 3 4B-27B, on the full layers only
)


def _randomize(model: torch.nn.Module, gemma3: bool) -> None:
    g = torch.Generator().manual_seed(1234)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or "embed_scale" in name:
                continue
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # attention scale is 1.0 in Gemma 4: keep q.k small.
                uniform(p, -0.3, 0.3) if gemma3 else uniform(p, 0.1, 0.4)
            elif "norm" in name and name.endswith("weight"):
                uniform(p, -0.5, 0.5) if gemma3 else uniform(p, 0.5, 1.5)
            elif name.endswith("layer_scalar"):
                uniform(p, 0.5, 1.5)
            elif name.endswith("router.scale"):
                uniform(p, 0.5, 1.5)
            elif name.endswith("per_expert_scale"):
                uniform(p, 0.5, 1.5)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            elif name.endswith("embed_tokens_per_layer.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif p.is_floating_point() and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def config_dict(family: str) -> dict:
    if family == "gemma3":
        return dict(GEMMA3, model_type="gemma3_text")
    return {**COMMON, **FAMILIES[family], "model_type": "gemma4_text"}


def build_reference(family: str, folder: Path | None = None, seed: int = 0, **overrides):
    """Build the transformers model for `family` (float32, eval), its config keys changed by
    `overrides`; save it to `folder` if given."""
    torch.manual_seed(seed)
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(**{**GEMMA3, **overrides})
        model = Gemma3ForCausalLM(cfg)
    else:
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig

        cfg = Gemma4TextConfig(**{**COMMON, **FAMILIES[family], **overrides})
        model = Gemma4ForCausalLM(cfg)
    model = model.float().eval()
    _randomize(model, family == "gemma3")
    if folder is not None:
        model.save_pretrained(folder)
        # Real checkpoints spell the full-layer overrides with the released keys.
        path = Path(folder) / "config.json"
        saved = json.loads(path.read_text())
        for key in ("global_head_dim", "num_global_key_value_heads"):
            if key in FAMILIES.get(family, {}):
                saved[key] = FAMILIES[family][key]
        saved.pop("per_layer_config", None)
        path.write_text(json.dumps(saved, indent=2))
    return model


# Greedy decoding of the tiny Gemma 3 model from this seed's prompt falls into a loop (one token
# 80 times in 150; found by search), from CLEAN_SEED's it does not: the loop guard's tests use both.
LOOPING_SEED, CLEAN_SEED = 11, 1


def seeded_prompt(seed: int) -> list[int]:
    """BOS and six random ids of the tiny vocabulary."""
    return [2] + torch.randint(20, 250, (6,), generator=torch.Generator().manual_seed(seed)).tolist()


# Each tower's eps differs from the text's (1e-6): the projections into the text space take their
# tower's, and the audio tower's feed-forward and layer norms the reference's default whatever.
TOWER_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 256, "rms_norm_eps": 0.5}
TOWER_AUDIO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "subsampling_conv_channels": [128, 8], "conv_kernel_size": 5, "output_proj_dims": 48, "use_clipped_linears": True, "rms_norm_eps": 5e-2}
IMAGE_BUDGET = 70


def _randomize_towers(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(k in name for k in ("vision_tower", "audio_tower", "embed_vision", "embed_audio")):
                continue
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.1)
            elif "norm" in name and p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("per_dim_scale"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "position_embedding_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        for name, b in model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("input_min", "output_min"):
                b.fill_(-float(1.0 + torch.rand((), generator=g)))
            elif leaf in ("input_max", "output_max"):
                b.fill_(float(1.0 + torch.rand((), generator=g)))
            elif leaf == "std_bias":
                b.copy_(torch.randn(b.shape, generator=g))
            elif leaf == "std_scale":
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def build_multimodal(family: str, folder: Path, tower_eps: float | None = None):
    """A tiny Gemma4ForConditionalGeneration (E2B-like: clipped vision + audio; 31B-like: standardised
    vision) saved to `folder` with its tokenizer. `tower_eps` replaces both towers' eps (an mmproj
    GGUF cannot carry them)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    text = {**COMMON, **FAMILIES[family], "max_position_embeddings": 1024}
    e_like = family == "e2b"
    vision = {**TOWER_VISION, "use_clipped_linears": e_like, "standardize": not e_like}
    audio = dict(TOWER_AUDIO)
    if tower_eps is not None:
        vision["rms_norm_eps"] = audio["rms_norm_eps"] = tower_eps
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio if e_like else None,
                       vision_soft_tokens_per_image=IMAGE_BUDGET, **MEDIA_IDS)
    model = Gemma4ForConditionalGeneration(cfg).float().eval()
    _randomize(model.model.language_model, gemma3=False)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.mul_(1.0)
    _randomize_towers(model)
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    for key in ("global_head_dim", "num_global_key_value_heads"):
        if key in FAMILIES[family]:
            saved["text_config"][key] = FAMILIES[family][key]
    saved["text_config"].pop("per_layer_config", None)
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    write_tiny_tokenizer(folder, "gemma4")
    return model


def reference_image_tokens(ref, image_path, budget: int = IMAGE_BUDGET):
    """transformers' projected soft tokens for one image file (its PIL processor's inputs)."""
    from gemmarun.processing.image import load_image, preprocess_image, stack_inputs

    pix, pos = stack_inputs([preprocess_image(load_image(image_path), budget)])
    with torch.no_grad():
        return ref.model.get_image_features(pix, pos).pooler_output[0].numpy()


# Gemma 3 with its SigLIP tower: 32 px images in 4 px patches (an 8 x 8 grid) pooled 2 x 2 into
# 16 soft tokens; the text's sliding window is 4, so an image's tokens reach past it only through
# the bidirectional blocks.
GEMMA3_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "image_size": 32, "patch_size": 4, "layer_norm_eps": 1e-5, "vision_use_head": False}
GEMMA3_SOFT = 16
GEMMA3_IDS = {"boi_token_index": 12, "image_token_index": 13, "eoi_token_index": 14}
# The tiny tokenizer's Gemma 4 media tokens (ids 12-14) renamed to Gemma 3's.
GEMMA3_RENAMES = {"<|image>": "<start_of_image>", "<|image|>": "<image_soft_token>", "<image|>": "<end_of_image>"}


def _randomize_siglip(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" not in name and "multi_modal_projector" not in name:
                continue
            if name.endswith("mm_soft_emb_norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)  # (Gemma's 1 + w)
            elif "layer_norm" in name or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") else
                        torch.randn(p.shape, generator=g) * 0.1)
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)


def build_gemma3_vision(folder: Path, released_layout: bool = False):
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower + projector) saved to `folder` with a
    tokenizer that spells Gemma 3's media tokens. transformers 5.23 writes the tower as
    `vision_tower.*`; `released_layout` rewrites it as the released checkpoints hold it (and
    llama.cpp's converter reads it), `vision_tower.vision_model.*`."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = {**GEMMA3, "max_position_embeddings": 1024}
    cfg = Gemma3Config(text_config=text, vision_config=GEMMA3_VISION, mm_tokens_per_image=GEMMA3_SOFT, **GEMMA3_IDS)
    ref = Gemma3ForConditionalGeneration(cfg).float().eval()
    _randomize(ref.model.language_model, gemma3=True)
    _randomize_siglip(ref)
    ref.save_pretrained(folder)
    if released_layout:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        save_file({name.replace("vision_tower.", "vision_tower.vision_model.", 1) if name.startswith("vision_tower.")
                   else name: t for name, t in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    write_tiny_tokenizer(folder, "gemma3")
    path = folder / "tokenizer.json"
    text_json = path.read_text()
    for old, new in GEMMA3_RENAMES.items():
        text_json = text_json.replace(json.dumps(old), json.dumps(new))
    path.write_text(text_json)
    return ref
