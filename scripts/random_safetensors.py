"""A released Gemma 4 config's text decoder with random bfloat16 weights, as a Hugging Face folder.

    python scripts/random_safetensors.py e2b /tmp/e2b-bf16-random
    gemmarun bench /tmp/e2b-bf16-random --compare --dtype bfloat16 --prompt-tokens 128 --decode-tokens 32

`gemmarun bench --random-weights` writes GGUF files, which transformers cannot load for Gemma 4;
this folder (config.json, safetensors shards, tokenizer.json) is what transformers reads, so both
runtimes are measured on the same weights, each from the mapped files. Tensors are written one at
a time (the model is never whole in memory); the tokenizer is the synthetic vocabulary of the
random-weights GGUF of the same config. Needs transformers (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 2 << 30


def main(name: str, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from gemmarun.bench import random_weights_model
    from gemmarun.config import ConfigError
    from gemmarun.loading.gguf_file import GGUFFile
    from gemmarun.loading.random_weights import released_config
    from gemmarun.tokenizer import Tokenizer

    try:
        _, raw = released_config(name)
    except ConfigError as e:
        sys.exit(str(e))
    text = {k: v for k, v in raw["text_config"].items() if not k.startswith("_")}
    text.update(architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(text, indent=1))
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16).state_dict()
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}

    def flush() -> None:
        if shard:
            file = f"model-{len(set(index.values())):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard.clear()

    for key, meta in shapes.items():
        if key == "lm_head.weight":
            continue  # tied to the embedding
        if key.endswith("norm.weight") or key.endswith("layer_scalar"):
            t = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(meta.shape, dtype=torch.bfloat16)
            rows = max(1, (1 << 24) // max(1, t[0].numel() if t.dim() > 1 else t.numel()))
            for r in range(0, t.shape[0], rows):  # in row chunks: no float32 copy of a big table
                t[r:r + rows] = torch.randn(t[r:r + rows].shape, generator=g).mul_(0.02).to(torch.bfloat16)
        shard[key] = t
        if sum(v.numel() * 2 for v in shard.values()) > SHARD_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    gguf = GGUFFile(random_weights_model(name, "q4_0"))
    Tokenizer.from_gguf_metadata(gguf.metadata).backend.save(str(out / "tokenizer.json"))
    print(f"{out}: {len(index)} tensors in {len(set(index.values()))} shards")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a released config (e2b, e4b, 31b, 26b-a4b)")
    parser.add_argument("out", type=Path, help="the folder to write")
    args = parser.parse_args()
    main(args.name, args.out)
