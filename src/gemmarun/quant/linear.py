"""Linear layers and embedding tables whose weights stay quantized in memory.

Storage (repacked once at load from the GGUF bytes, never expanded to a float matrix):

* formats whose codes span at most 16 values (Q4_0, Q4_1, Q4_K, Q2_K, Q3_K): 4-bit nibbles,
  ``[rows, cols // 2]`` uint8, plus per-group ``scale`` (and ``bias``);
* 5/6/8-bit formats (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0): int8 codes ``[rows, cols]`` plus the same
  per-group ``scale`` / ``bias``; so are the 4-bit codebook formats (IQ4_NL, IQ4_XS, MXFP4), whose
  codes are the table's int8 values (twice their file's bytes, for the int8 kernels);
* F32 / F16 / BF16: the float tensor as stored in the file.

Scales are float16 where the format stores them so (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL: exact), float32
for the K-quants and IQ4_XS (a float16 super-scale times a 4-6 bit sub-scale) and MXFP4 (powers of
two from 2^-128, beyond float16).  That is 0.56-0.75
bytes/weight for the 4-bit formats, 1.06-1.25 for the others (4 for f32).

Which kernel runs (measured on this project's 2-core AVX2 CPU, 262144x640 Q8_0 head at batch 1):

* decode-sized batches (at most ``NATIVE_MAX_ROWS`` rows) on the CPU: the native kernel
  (``gemmarun.native``, ``group_gemv.cpp``) reads the codes and group scales as stored, with the
  activations rounded to int16 per group (int8 under bfloat16 compute, like llama.cpp's q8
  dot products): 10.7 ms, at the machine's read bandwidth, against 50 ms for tiles, 29 ms for
  a bfloat16 copy of the weights and 72 ms for float32 weights;
* larger batches (prefill), other devices, or no C++ compiler: row tiles, below.

Why the portable path dequantizes row tiles:

* ``aten._weight_int4pack_mm_for_cpu`` dequantizes ``w = (q - 8) * scale + zero`` (verified),
  so Q4_0/Q4_1/Q4_K map onto it, but its float32-activation path is not vectorized on AVX2:
  1.5-2.7 ms for 2048x640 at batch 1 and ~95 ms at batch 64, 10-40x slower than
  ``F.linear``.  Its fast bfloat16 path rounds the activations (~4e-3 relative error).
  ``_weight_int8pack_mm`` has per-channel scales only (GGML scales are per 16/32 group),
  and a per-group ``bmm`` with float codes was no faster than tiles.
* So row tiles of at most ``_TILE_ELEMENTS_CPU`` floats are dequantized into a reused
  per-thread buffer and fed to ``torch.mm``.  A tile takes a few vectorized passes:
  int->float copy (nibbles split four bytes at a time with int32 shifts and masks),
  in-place ``mul_`` by the group scale, and ``add_`` of the group bias.  These are the same
  float32 operations, in the same order, as gguf-py, so every tile is *bit-identical* to the
  reference weights.  The fast path differs from the exact float32 matmul only in GEMM
  summation order: relative error 0 to ~1e-8 in the tests.  Only standard ops are used, so
  it also runs on CUDA.  On the CPU with the native module, ``dequant.cpp`` makes the same
  tile, bit for bit, in one pass (``_decode``).

Speed in ms: the fastest of 3 runs x 40 interleaved rounds, 2 threads, random inputs.
The host is shared, so single runs vary by about 20%.  The baseline is ``F.linear`` with a
float32 weight that stays cache-hot, its best case:

    out x in     batch   f32    Q4_K   Q6_K   Q8_0   Q5_0   Q4_0
    640 x 2048   1       0.12   0.57   0.39   0.34   0.34
    640 x 2048   64      1.60   2.30   2.08   2.00   1.99
    2048 x 640   1       0.15   n/a    n/a    0.35   0.35   0.56
    2048 x 640   64      1.43   n/a    n/a    1.76   1.80   2.05

K-quants need ``in % 256 == 0`` (n/a), so Q4_0 stands in for 4-bit at 2048x640.  At
batch 1 the passes over the tile dominate (the GEMV itself is memory bound), and the 4-bit
formats pay for the nibble split and the bias pass.  At batch 64 the GEMM dominates.  For the
262144x640 Q8_0 tied LM head the tiles are *faster* than a float32 weight, because that
float32 weight is 671 MB and cannot stay in cache: ~50 ms vs ~63 ms at batch 1, ~105 ms
vs ~165 ms at batch 8.

``.to(device)`` moves the buffers.  ``.to(dtype)`` only changes ``compute_dtype``: the
scales are never rounded.

bfloat16 on CPU (``--dtype bfloat16``) without the native kernel: 4-bit formats with 32-wide
groups (Q4_0, Q4_1, Q4_K) run on torch's int4 kernel, with bfloat16 activations and scale/zero
pairs (``zero = bias + (8 + code_min) * scale``): the weights are read as 4-bit codes and never
dequantized, 17 ms instead of ~50 ms for a 262144x640 head here.  The other formats are
repacked once into a bfloat16 matrix (one rounding of the exact weights; 29 ms for that head).
That trades exactness (bfloat16 rounding, ~4e-3 relative) for speed, which is what asking for
bfloat16 means.  The packed copy is made on the first such matmul and the tile layout dropped
(an int4-packed ``QuantEmbedding`` keeps it for row lookups).  With the native kernel, nothing
is repacked: decode reads the codes, prefill dequantizes tiles to bfloat16.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from ..machine import cpu_multiplies_bf16
from ..native import native_group_gemv, native_ops
from .formats import as_blocks, get_format, type_name

__all__ = ["QuantEmbedding", "QuantLinear", "RowStack", "project", "stack_rows", "stacked"]

# Floats per dequantized tile (8 MiB of float32, reused across tiles): large enough that
# per-op dispatch overhead is amortized, small enough to stay in L3 between the dequant ops
# and the GEMM.  GPUs want far larger tiles, since kernel launches dominate there.
_TILE_ELEMENTS_CPU = 1 << 21
_TILE_ELEMENTS_GPU = 1 << 24
# Elements repacked per step at load time: bounds the temporaries of decoding, which glibc keeps
# between trims (4-bit E2B load peak: 1601 MiB at 4M elements a step, 1568 at 1M, same load time).
_LOAD_CHUNK_ELEMENTS = 1 << 20
_NIBBLE_MASK = 0x0F0F0F0F
# Formats whose block scale (and min) are float16 in the file: kept as float16, exactly, which
# is 1/16 byte less per weight to hold and to read each token (Q4_0: 0.5625 instead of 0.625).
_HALF_SCALE_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                               GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0, GGMLQuantizationType.IQ4_NL})
# Rows of activations up to which a CPU matmul goes to the native kernel (decode, speculative
# verification, batched decode); larger batches are compute-bound and go to tiles + GEMM.
NATIVE_MAX_ROWS = 16

_FLOAT_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


_scratch = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch buffer kept per thread and dtype and reused by every layer (CPU only).

    A fresh multi-MB ``torch.empty`` per call is served by new pages from the kernel, and
    faulting them in cost as much as the dequantization itself (measured: Q8_0 640x2048
    at batch 1 went from 0.87 ms to 0.35 ms).  On CUDA the caching allocator does this.
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    bufs: dict[torch.dtype, torch.Tensor] = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        # A normal tensor, even when first needed under inference_mode: an inference tensor could
        # not be written in place by a later call made outside it.
        with torch.inference_mode(False):
            buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


_OWN_MAPPING_BYTES = 1 << 20


def _weight_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor for weights that live as long as the model: on the CPU, a large one gets an
    anonymous mapping of its own instead of a place in malloc's heap. Repacking and stacking free
    their temporaries and the unstacked copies between the weights, and once trimmed those holes
    were not resident, but every later allocation placed in them faulted pages back in: a 512-token
    E2B prefill grew RSS by ~100 MiB more than it ever held at once."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < _OWN_MAPPING_BYTES or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.empty(shape, dtype=dtype, device=device)  # (Windows has no MAP_PRIVATE: the heap)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # not shared with a forked child
    return torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(shape)


class _QuantMatrix(torch.nn.Module):
    """A ``[rows, cols]`` matrix kept in repacked quantized form, dequantized by row tiles."""

    data: torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        ggml_type: GGMLQuantizationType | int,
        rows: int,
        cols: int,
        compute_dtype: torch.dtype,
        data: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        group_size: int,
        code_min: int,
        nibbles: bool,
    ) -> None:
        super().__init__()
        self.ggml_type = GGMLQuantizationType(int(ggml_type))
        self.rows, self.cols = rows, cols
        self.compute_dtype = compute_dtype
        # What prefill's tile GEMM multiplies in, where not `compute_dtype`: bfloat16 for a float32
        # model on a CPU asked for bfloat16 (loading.build.compute_dtypes)
        self.prefill_dtype: torch.dtype | None = None
        self.group_size = group_size
        self.code_min = code_min
        self.nibbles = nibbles
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        shifts = torch.tensor([0, 4], dtype=torch.int32, device=data.device).view(1, 2, 1)
        self.register_buffer("_shifts", shifts, persistent=False)
        self._int4: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed codes, scales_and_zeros)
        self._dense: torch.Tensor | None = None  # bfloat16 matrix (CPU bfloat16 compute)
        self._native = None  # the native kernel, False where it cannot run, None: not looked up
        self.stack: RowStack | None = None  # set by stack_rows: this matrix's rows live in a stacked one

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (its buffers keep the stored codes and scales)."""
        return self.compute_dtype

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_native"] = None  # a closure over this module's buffers: made again where it lands
        state["stack"] = None  # a copy multiplies on its own (its buffers are no longer views)
        return state

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to(device)`` moves the buffers; a dtype cast only sets ``compute_dtype``.

        Casting the float32 scales (or stored float weights) would silently lose exactness,
        so ``module.to(torch.bfloat16)`` means "compute in bfloat16" here.
        """
        for dtype in (torch.float16, torch.float32):
            cast = fn(torch.zeros((), dtype=dtype, device=self.data.device))
            if cast.dtype != dtype:
                self.compute_dtype = cast.dtype
            if cast.dtype != dtype or cast.device.type != "cpu":
                self.prefill_dtype = None  # (a CPU's bfloat16 prefill under float32 compute: cast or moved)
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        self._native = None
        self.stack = None  # the stacked matrix was not moved with this one
        return self

    @classmethod
    def from_raw(
        cls,
        raw: torch.Tensor,
        ggml_type: GGMLQuantizationType | int,
        rows: int,
        cols: int,
        compute_dtype: torch.dtype = torch.float32,
        tensor_name: str | None = None,
    ):
        """Repack raw GGUF bytes of a ``[rows, cols]`` tensor (ggml shape ``{cols, rows}``;
        for a linear, rows = out features). ``raw`` is uint8, flat or ``[rows, bytes_per_row]``."""
        fmt = get_format(ggml_type, tensor_name)
        if cols % fmt.block_size:
            who = f"tensor {tensor_name!r}" if tensor_name else "tensor"
            raise ValueError(
                f"{who}: row length {cols} is not a multiple of the "
                f"{type_name(ggml_type)} block size {fmt.block_size}"
            )
        blocks = as_blocks(raw, fmt, rows * cols, tensor_name)
        if fmt.is_float:
            data = blocks.view(_FLOAT_DTYPES[fmt.ggml_type]).view(rows, cols)
            return cls(fmt.ggml_type, rows, cols, compute_dtype, data, None, None, 1, 0, False)

        g = fmt.group_size
        nibbles = fmt.code_max - fmt.code_min < 16
        dev = raw.device
        data = _weight_buffer((rows, cols // 2 if nibbles else cols), torch.uint8 if nibbles else torch.int8, dev)
        scale_dtype = torch.float16 if fmt.ggml_type in _HALF_SCALE_TYPES else torch.float32
        scale = _weight_buffer((rows, cols // g), scale_dtype, dev)
        bias = None
        blocks = blocks.view(rows, -1, fmt.type_size)
        step = max(1, _LOAD_CHUNK_ELEMENTS // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            codes, sc, bi = fmt.decode_blocks(blocks[r0:r1].reshape(-1, fmt.type_size))
            codes = codes.reshape(r1 - r0, cols)
            if nibbles:
                # Nibble layout: byte j of a row holds codes j (low) and j + cols/2 (high), so
                # unpacking yields the two row halves as contiguous runs.
                c = (codes - fmt.code_min).to(torch.uint8)
                data[r0:r1] = c[:, : cols // 2] | (c[:, cols // 2 :] << 4)
            else:
                data[r0:r1] = codes
            scale[r0:r1] = sc.reshape(r1 - r0, cols // g)
            if bi is not None:
                if bias is None:
                    bias = _weight_buffer(tuple(scale.shape), scale.dtype, dev)
                bias[r0:r1] = bi.reshape(r1 - r0, cols // g)
        return cls(fmt.ggml_type, rows, cols, compute_dtype, data, scale, bias, g,
                   fmt.code_min if nibbles else 0, nibbles)

    # ---------------------------------------------------------------------------- kernels

    def _decode(
        self,
        data: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Exact float32 values of the rows in ``data`` (a row slice or gather), into ``out``.

        Same float32 operations, same order as gguf-py: ``float(code) * scale + bias``.
        """
        n = data.shape[0]
        if scale is not None and out.device.type == "cpu" and self.group_size in (16, 32):
            ops = native_ops()  # the same operations in one pass instead of five or six
            if ops is not None:
                return ops.dequantize_tile(data, scale, bias, self.group_size, self.code_min, self.nibbles, out)
        if self.nibbles:
            # Split nibbles four bytes at a time as int32 words: [n, 2, cols/8] words are the
            # low then high halves of each row, i.e. the codes in their natural order.
            words = _workspace(n * self.cols // 4, torch.int32, out.device).view(n, 2, -1)
            torch.bitwise_right_shift(data.view(torch.int32).unsqueeze(1), self._shifts, out=words)
            out.copy_(words.bitwise_and_(_NIBBLE_MASK).view(torch.uint8).view(n, self.cols))
            if self.code_min:
                out.add_(self.code_min)  # exact: small integers
        else:
            out.copy_(data)
        if scale is not None:
            groups = out.view(n, -1, self.group_size)
            groups.mul_(scale.unsqueeze(-1))
            if bias is not None:
                groups.add_(bias.unsqueeze(-1))
        return out

    def _rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        s = self.scale[r0:r1] if self.scale is not None else None
        b = self.bias[r0:r1] if self.bias is not None else None
        return self._decode(self.data[r0:r1], s, b, out)

    def dequantize(self) -> torch.Tensor:
        """The exact float32 matrix (bit-identical to ``gguf.quants.dequantize``)."""
        if self._dense is not None:
            return self._dense.float()  # the exact values are gone once repacked dense
        out = torch.empty(self.rows, self.cols, dtype=torch.float32, device=self.data.device)
        step = max(1, _LOAD_CHUNK_ELEMENTS // self.cols)
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            self._rows(r0, r1, out[r0:r1])
        return out

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact float32 rows ``ids`` (any shape) -> ``[*ids.shape, cols]``; only those rows
        (bfloat16-rounded ones once the matrix was repacked dense)."""
        flat = ids.reshape(-1).to(device=self.data.device, dtype=torch.long)
        if self._dense is not None:
            return self._dense.index_select(0, flat).float().view(*ids.shape, self.cols)
        out = torch.empty(flat.numel(), self.cols, dtype=torch.float32, device=self.data.device)
        s = self.scale.index_select(0, flat) if self.scale is not None else None
        b = self.bias.index_select(0, flat) if self.bias is not None else None
        self._decode(self.data.index_select(0, flat), s, b, out)
        return out.view(*ids.shape, self.cols)

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``[..., cols]``, computed in ``compute_dtype``.

        Row tiles of W are dequantized into one reused buffer, so the temporary memory is
        one tile whatever the matrix size; the result is returned in ``x``'s dtype.
        """
        lead = x.shape[:-1]
        cdt = self.compute_dtype
        if x.numel() <= NATIVE_MAX_ROWS * self.cols and x.device.type == "cpu":
            gemv = self._native_kernel()
            if gemv is not None:  # decode: the fewest dispatches, this runs ~100-250 times a token
                x2 = x.reshape(-1, self.cols)
                y = gemv(x2 if x2.dtype == torch.float32 else x2.float())
                return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*lead, self.rows)
        x2 = x.reshape(-1, self.cols).to(cdt)
        if self._int4 is not None or self._packs_for_cpu(x.device) == "int4":
            packed, scales_zeros = self._int4_pack()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_zeros)
            return y.to(x.dtype).view(*lead, self.rows)
        if self._dense is not None or self._packs_for_cpu(x.device) == "dense":
            return F.linear(x2, self._dense_weight()).to(x.dtype).view(*lead, self.rows)
        if self.scale is None and self.data.dtype == cdt and (
                cdt == torch.float32 or x.device.type != "cpu" or x2.shape[0] <= NATIVE_MAX_ROWS):
            return F.linear(x2, self.data).to(x.dtype).view(*lead, self.rows)
        # The tiles are float32. On a CPU without bfloat16 matrix instructions the GEMM stays
        # float32 whatever the compute dtype (emulated, a bfloat16 GEMM had the 4-bit E2B prefill
        # at 4 tok/s against 15), and only its result is rounded; with them (AVX-512 BF16, AMX),
        # a bfloat16 GEMM multiplies bfloat16 tiles: 2.2-2.6x the float32 one.
        wanted = self.prefill_dtype or cdt
        bf16_units = wanted == torch.bfloat16 and cpu_multiplies_bf16()
        gemm_dtype = wanted if x.device.type != "cpu" or bf16_units else torch.float32
        x2 = x2.to(gemm_dtype)
        y = torch.empty(x2.shape[0], self.rows, dtype=gemm_dtype, device=x.device)
        budget = _TILE_ELEMENTS_CPU if x.device.type == "cpu" else _TILE_ELEMENTS_GPU
        n_tiles = max(1, -(-self.rows * self.cols // budget))
        tile = -(-self.rows // n_tiles)  # equal tiles: no tiny remainder tile
        buf = _workspace(tile * self.cols, torch.float32, x.device).view(tile, self.cols)
        low = None
        if gemm_dtype != torch.float32:
            low = _workspace(tile * self.cols, gemm_dtype, x.device).view(tile, self.cols)
        for r0 in range(0, self.rows, tile):
            r1 = min(self.rows, r0 + tile)
            w = self._rows(r0, r1, buf[: r1 - r0])
            if low is not None:
                w = low[: r1 - r0].copy_(w)
            torch.mm(x2, w.t(), out=y[:, r0:r1])
        return y.to(x.dtype).view(*lead, self.rows)

    def _native_eligible(self, device: torch.device) -> bool:
        return (device.type == "cpu" and self.data.device.type == "cpu" and self.scale is not None
                and self.data.numel() > 0 and self.group_size in (16, 32))

    def _native_kernel(self):
        """``x (float32 [M, cols]) -> x @ W.T`` through the native kernel when it can multiply this
        matrix (CPU, codes kept), else None; made once, and again after a move, a dtype cast or
        a repack. The buffers are bound here: a module attribute lookup per call cost more than
        the multiply of a small matrix."""
        if self._native is None:
            args = self.native_args()
            gemv = native_group_gemv() if args is not None else None
            self._native = False
            if gemv is not None:
                self._native = lambda x: gemv(x, *args)
        return self._native or None

    def native_args(self) -> tuple | None:
        """What the native ``group_gemv`` takes after ``x`` to multiply this matrix (codes, scale,
        bias, group, code_min, nibbles, int8 activations), or None where it cannot (codes not
        kept, not on the CPU, other group sizes)."""
        if not self._native_eligible(torch.device("cpu")):
            return None
        return (self.data, self.scale, self.bias, self.group_size, float(self.code_min), self.nibbles,
                # int8 activations when computing below float32: no more rounding than asked for
                self.compute_dtype != torch.float32)

    def _packs_for_cpu(self, device: torch.device) -> str | None:
        """The layout a bfloat16 matmul on the CPU repacks this matrix into, once: "int4" for
        4-bit codes in 32-wide groups (torch's int4 kernel reads them as they are), "dense" for
        the rest (a bfloat16 matrix: 2 bytes a weight read by one GEMV beat dequantizing tiles of
        5/6/8-bit codes every token, 3-4x), None where tiles stay (float32, CUDA)."""
        if device.type != "cpu" or self.compute_dtype != torch.bfloat16 or self.data.device.type != "cpu":
            return None
        if self.scale is None and self.data.dtype == torch.bfloat16:
            return None  # already what F.linear wants
        if self._native_eligible(device) and native_group_gemv() is not None:
            return None  # the native kernel reads the codes as they are: keep them
        if (self.nibbles and self.group_size == 32
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
            return "int4"
        return "dense"

    def _dense_weight(self) -> torch.Tensor:
        """The matrix rounded once to bfloat16 (from the exact float32 values, chunk by chunk);
        the tile layout is dropped: lookups read these rows."""
        if self._dense is None:
            dense = torch.empty(self.rows, self.cols, dtype=torch.bfloat16)
            step = max(1, _LOAD_CHUNK_ELEMENTS // self.cols)
            buf = torch.empty(step, self.cols, dtype=torch.float32)
            for r0 in range(0, self.rows, step):
                r1 = min(self.rows, r0 + step)
                if self.scale is None:
                    dense[r0:r1] = self.data[r0:r1]
                else:
                    dense[r0:r1] = self._rows(r0, r1, buf[: r1 - r0])
            self._dense = dense
            self.data = self.data[:0]
            self.scale = self.bias = None
            self._native = None
        return self._dense

    def _int4_pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes in torch's CPU int4 layout (made row chunk by row chunk, so the int32 codes it
        takes never exist whole) and ``[groups, rows, 2]`` bfloat16 (scale, zero) pairs."""
        if self._int4 is None:
            step = max(1, _LOAD_CHUNK_ELEMENTS // self.cols)
            chunks = []
            for r0 in range(0, self.rows, step):
                nib = self.data[r0:r0 + step]
                codes = torch.cat((nib & 0x0F, nib >> 4), dim=1).to(torch.int32)  # our halves layout
                chunks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            scale = self.scale.float()
            bias = self.bias.float() if self.bias is not None else torch.zeros_like(scale)
            zero = bias + (8 + self.code_min) * scale
            scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
            self._int4 = (torch.cat(chunks), scales_zeros)
            if self.drops_tiles_when_packed:
                self.data = self.data[:0]
                self.scale = self.bias = None
                self._native = None
        return self._int4

    drops_tiles_when_packed = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized representation (codes + scales)."""
        held = (self.data, self.scale, self.bias, self._dense, *(self._int4 or ()))
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def extra_repr(self) -> str:
        return (f"{self.rows}x{self.cols}, type={self.ggml_type.name}, "
                f"compute_dtype={self.compute_dtype}, bytes={self.nbytes}")


class QuantLinear(_QuantMatrix):
    """Bias-free ``y = x @ W.T`` with ``W`` ``[out_features, in_features]`` kept quantized.

    ``reference = True`` switches ``forward`` to the exact path: the full float32 weight is
    dequantized (transiently) and multiplied in float32.
    """

    reference: bool = False
    drops_tiles_when_packed = True  # a linear only multiplies: the int4 layout is all it needs

    @property
    def out_features(self) -> int:
        return self.rows

    @property
    def in_features(self) -> int:
        return self.cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            w = self.dequantize()
            return F.linear(x.to(torch.float32), w).to(x.dtype)
        return self.matmul_t(x)


@dataclass(eq=False)
class RowStack:
    """Matrices that multiply the same input, stacked into one: their buffers are views of its
    buffers (no extra memory), and `project` multiplies all of them in one kernel call."""

    matrix: QuantLinear
    members: tuple[QuantLinear, ...]
    sizes: tuple[int, ...]


def stack_rows(linears: Sequence[torch.nn.Module]) -> RowStack | None:
    """Stack quantized linears that read one input (q/k/v, gate/up) where the native kernel
    multiplies them and their repacked layouts agree (codes, group, scale dtype, offsets: Q5_0
    and Q8_0 rows stack, Q4_K nibbles and Q8_0 codes do not). A decode step then makes one call
    and rounds the activations once instead of once per matrix. Returns None where they cannot."""
    if len(linears) < 2 or not all(type(m) is QuantLinear for m in linears) or native_group_gemv() is None:
        return None
    first = linears[0]

    def layout(m: QuantLinear) -> tuple:
        return (m.cols, m.data.dtype, m.data.device, m.nibbles, m.group_size, m.code_min, m.compute_dtype,
                m.prefill_dtype, None if m.scale is None else m.scale.dtype, m.bias is None)

    def repacked(m: QuantLinear) -> bool:  # codes dropped for a bfloat16 or int4 copy
        return m._dense is not None or m._int4 is not None

    if (not first._native_eligible(first.data.device) or any(repacked(m) for m in linears)
            or any(layout(m) != layout(first) for m in linears)):
        return None
    with torch.inference_mode(False):  # views that stay usable outside inference mode
        def cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            if parts[0] is None:
                return None
            shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
            return torch.cat(parts, out=_weight_buffer(shape, parts[0].dtype, parts[0].device))

        matrix = QuantLinear(first.ggml_type, sum(m.rows for m in linears), first.cols, first.compute_dtype,
                             cat([m.data for m in linears]), cat([m.scale for m in linears]),
                             cat([m.bias for m in linears]), first.group_size, first.code_min, first.nibbles)
        matrix.prefill_dtype = first.prefill_dtype
        stack = RowStack(matrix, tuple(linears), tuple(m.rows for m in linears))
        r0 = 0
        for m in linears:
            r1 = r0 + m.rows
            m.data = matrix.data[r0:r1]
            m.scale = matrix.scale[r0:r1]
            if m.bias is not None:
                m.bias = matrix.bias[r0:r1]
            m._native = None
            m.stack = stack
            r0 = r1
    return stack


def project(x: torch.Tensor, *linears: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """`x` through each of `linears`: one native matmul over their stacked rows for decode-sized
    `x` when `stack_rows` stacked exactly these (and they were not moved since), else one call
    each. Either way the outputs are the same bits: each row of the kernel's output is computed
    alone, and the parts are made contiguous (torch's GELU rounds strided inputs differently)."""
    stack = stacked(linears)
    if stack is not None and x.numel() <= NATIVE_MAX_ROWS * stack.matrix.cols:
        return tuple(part.contiguous() for part in stack.matrix(x).split(stack.sizes, dim=-1))
    return tuple(m(x) for m in linears)


def stacked(linears: Sequence[torch.nn.Module]) -> RowStack | None:
    """The stack holding exactly `linears`, in order, if `stack_rows` made one and none of them
    was moved since; else None."""
    stack = getattr(linears[0], "stack", None)
    if (stack is not None and len(stack.members) == len(linears)
            and all(a is b and b.stack is stack for a, b in zip(stack.members, linears))):
        return stack
    return None


class QuantEmbedding(_QuantMatrix):
    """A quantized ``[num_rows, dim]`` table: row lookups and the tied LM head ``x @ T.T``."""

    @property
    def num_rows(self) -> int:
        return self.rows

    @property
    def dim(self) -> int:
        return self.cols

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[*ids.shape, dim]`` in ``compute_dtype``, dequantizing only the gathered rows
        (exact in float32; rounded once, like a table stored in that dtype, otherwise)."""
        return self.gather(ids).to(self.compute_dtype)

    def matmul_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ table.T`` (logits of a tied LM head), tiled over rows, in ``x``'s dtype."""
        return self.matmul_t(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gather(ids)
