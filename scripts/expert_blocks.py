"""Time the native kernels that read MoE experts' GGUF blocks in place, per format.

The 26B-A4B's experts stay in the memory-mapped GGUF; a decode token multiplies 8 of 128 experts'
gate/up (1408 x 2816) and down (2816 x 704) projections per layer. This times one expert at a
time, cycling through 160 of them (more than a 300 MiB L3 holds) so the blocks come from memory, as
in a decode step, for the
formats llama.cpp files use for them (Q4_K gate/up and Q5_0 down in Q4_K_M files; Q4_0; Q8_0;
MXFP4 in MXFP4_MOE files; IQ4_NL; Q6_K and IQ4_XS in those files).
Prefill routes a few dozen tokens to each expert: 32 rows are timed with `block_gemv` (int16
activations) and, for the 32-weight blocks, `block_gemm` (blocks dequantized in registers, what
prefill uses above 16 rows). Random block bytes (the timing does not depend on the values), 2
threads.

    python scripts/expert_blocks.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemmarun.native import native_block_gemm, native_block_gemv
from gemmarun.quant.experts import FLOAT_BLOCK_TYPES

# ggml type: (name, weights per block, bytes per block, byte offsets of float16 scales in a block)
_SCALES = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "IQ4_NL": (0,), "MXFP4": (), "Q4_K": (0, 2), "Q6_K": (208,),
           "IQ4_XS": (0,)}
FORMATS = {int(GGMLQuantizationType[name]): (name, *GGML_QUANT_SIZES[GGMLQuantizationType[name]], scales)
           for name, scales in _SCALES.items()}
IN_REGISTERS = {int(t) for t in FLOAT_BLOCK_TYPES}  # block_gemm's formats
MXFP4_EXPONENT = 122  # its scale byte: 2^-6, weights of everyday size
SHAPES = {"gate/up 1408x2816": (1408, 2816), "down 2816x704": (2816, 704)}
EXPERTS = 160


def random_blocks(ggml_type: int, rows: int, cols: int) -> torch.Tensor:
    _, per_block, nbytes, scales = FORMATS[ggml_type]
    blocks = np.random.default_rng(0).integers(0, 256, (rows * (cols // per_block), nbytes), dtype=np.uint8)
    for offset in scales:  # finite scales
        blocks[:, offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if ggml_type == GGMLQuantizationType.MXFP4:
        blocks[:, 0] = MXFP4_EXPONENT
    return torch.from_numpy(blocks.reshape(rows, -1))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no options: --help
    torch.set_num_threads(2)
    gemv, gemm = native_block_gemv(), native_block_gemm()
    if gemv is None or gemm is None:
        raise SystemExit("the native kernels are unavailable (no C++ compiler?)")
    for label, (rows, cols) in SHAPES.items():
        for ggml_type, (name, per_block, _, _) in FORMATS.items():
            if cols % per_block:
                continue
            blocks = random_blocks(ggml_type, rows * EXPERTS, cols)
            runs = [("block_gemv", m, lambda x, b: gemv(x, b, ggml_type, False)) for m in (1, 4, 32)]
            if ggml_type in IN_REGISTERS:
                runs.append(("block_gemm", 32, lambda x, b: gemm(x, b, ggml_type)))
            for kernel, m, run in runs:
                x = torch.randn(m, cols)
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    for e in range(EXPERTS):
                        run(x, blocks[e * rows : (e + 1) * rows])
                    best = min(best, (time.perf_counter() - t) / EXPERTS)
                nbytes = blocks[:rows].numel()
                print(f"{label:18} {name:5} {kernel} {m:2} row{'s' if m > 1 else ' '}: {best * 1e6:7.1f} us "
                      f"({nbytes / best / 1e9:5.1f} GB/s)")


if __name__ == "__main__":
    main()
