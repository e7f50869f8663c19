"""Measure peak RSS while loading and running a model whose PLE table is large.

Builds (once) a safetensors checkpoint with E2B's real PLE table shape — 262144 x (35 x 256) in
bfloat16, 4.7 GB — around a deliberately small decoder (hidden 64), then in a fresh process loads
it with gemmarun, runs a 64-token prompt through the model and generates 16 tokens, and reports
peak RSS. If the table were read into RAM, peak RSS would exceed its 4.7 GB.

    python scripts/ple_memory.py /tmp/ple-model      # writes the model if missing, then measures
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

S, F = "sliding_attention", "full_attention"


def write_model(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    L, P, V, H = 35, 256, 262144, 64
    config = dict(
        model_type="gemma4_text", vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
        layer_types=([S] * 4 + [F]) * 7, sliding_window=512, hidden_size_per_layer_input=P,
        vocab_size_per_layer_input=V, num_kv_shared_layers=20, use_double_wide_mlp=True,
        final_logit_softcapping=30.0, max_position_embeddings=131072,
    )
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    t = {
        "model.embed_tokens.weight": rnd(V, H),
        "model.embed_tokens_per_layer.weight": rnd(V, L * P),
        "model.per_layer_model_projection.weight": rnd(L * P, H),
        "model.per_layer_projection_norm.weight": torch.ones(P, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
    }
    for i, lt in enumerate(config["layer_types"]):
        d = 64 if lt == F else 32
        width = 256 if i >= L - 20 else 128
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rnd(2 * d, H)
        t[p + "self_attn.q_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        t[p + "self_attn.o_proj.weight"] = rnd(H, 2 * d)
        if i < L - 20:
            t[p + "self_attn.k_proj.weight"] = rnd(d, H)
            t[p + "self_attn.v_proj.weight"] = rnd(d, H)
            t[p + "self_attn.k_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        for name in ("gate_proj", "up_proj"):
            t[p + f"mlp.{name}.weight"] = rnd(width, H)
        t[p + "mlp.down_proj.weight"] = rnd(H, width)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            t[p + f"{name}.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[p + "per_layer_input_gate.weight"] = rnd(P, H)
        t[p + "per_layer_projection.weight"] = rnd(H, P)
        t[p + "layer_scalar"] = torch.ones(1, dtype=torch.bfloat16)
    save_file(t, folder / "model.safetensors")


def write_tokenizer(folder: Path, vocab_size: int = 262144) -> None:
    """A word-level stand-in vocabulary: the measurement needs ids, not text."""
    names = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {name: i for i, name in enumerate(names)} | {f"<t{i}>": i for i in range(len(names), vocab_size)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                              "pad_token": "<pad>", "unk_token": "<unk>"}))


def measure(folder: Path, dtype: str) -> dict:
    import torch

    import gemmarun
    from gemmarun.bench import peak_rss_mib

    t0 = time.perf_counter()
    llm = gemmarun.load(folder, dtype=dtype, device="cpu")
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_mib()
    ids = torch.randint(5, 262144, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    t1 = time.perf_counter()
    out = llm.generate_ids(ids, max_new_tokens=16, ignore_eos=True)
    gen_s = time.perf_counter() - t1
    return dict(
        dtype=dtype, load_s=round(load_s, 2), generate_s=round(gen_s, 2), tokens=len(out),
        peak_rss_after_load_mib=round(rss_after_load), peak_rss_mib=round(peak_rss_mib()),
        ple_table_mib=round(llm.model.ple.table_nbytes() / 2**20),
        file_mib=round((folder / "model.safetensors").stat().st_size / 2**20),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path("/tmp/ple-model"),
                        help="where the 4.7 GB checkpoint is (written there if missing; default %(default)s)")
    parser.add_argument("--child", metavar="DTYPE", help=argparse.SUPPRESS)  # the measuring process
    args = parser.parse_args()
    folder = args.folder
    if args.child:
        print(json.dumps(measure(folder, args.child)))
        return
    if not (folder / "model.safetensors").exists():
        write_model(folder)
    if not (folder / "tokenizer_config.json").exists():
        write_tokenizer(folder)
    for dtype in ("bfloat16", "float32"):
        out = subprocess.run([sys.executable, __file__, str(folder), "--child", dtype], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr)


if __name__ == "__main__":
    main()
