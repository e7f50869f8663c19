// The one Python module of gemmarun's native CPU kernels: the entry points of group_gemv.cpp
// (quantized matmuls), dequant.cpp (prefill's weight tiles), decode_ops.cpp (a decode step's
// small float32 operations) and decode_step.cpp (a decode token through every layer).

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_gemv", &group_gemv, "x @ W.T for group-quantized W, read as stored");
  m.def("block_gemv", &block_gemv, "x @ W.T for W given as GGUF Q4_0/Q8_0/Q5_0/IQ4_NL/MXFP4/Q4_K/Q6_K/IQ4_XS block rows");
  m.def("block_gemm", &block_gemm, "x @ W.T for W given as GGUF Q4_0/Q8_0/Q5_0/IQ4_NL/MXFP4 block rows, float32 activations as they are");
  m.def("dequantize_tile", &dequantize_tile, "exact float32 rows of group-quantized codes, in place");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, float32");
  m.def("rope", &rope, "rotate-half RoPE of [B, T, H, D] with per-position cos/sin");
  m.def("attend_one", &attend_one, "one decode query's attention over a cache");
  m.def("attend_one_values_as_keys", &attend_one_values_as_keys,
        "attend_one for a K=V layer: keys made from the stored values row by row");
  m.def("argmax", &argmax, "torch.argmax of a float32 vector, vectorized");
  bind_decode_step(m);
}
