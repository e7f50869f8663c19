// Row tiles of exact float32 weights for prefill's GEMM, in one pass over the codes.
//
// The torch formula (quant/linear.py, _QuantMatrix._decode) takes five or six passes over a tile:
// split nibbles, widen to float, add code_min, multiply by the group scale, add the group bias.
// Here each row is widened into its place in the tile and scaled while it is still in L1. The float
// operations are the same ones in the same order, float(code + code_min) * scale (+ bias), each
// rounded on its own (the module is built with -ffp-contract=off: no fused multiply-add), so the
// tile is bit-identical to the torch formula's and to gguf-py's dequantization.

#include "kernels.h"
#include <ATen/Parallel.h>

#include <cstdint>

namespace {

template <int GROUP>
void dequantize_row(const uint8_t* __restrict codes, const float* __restrict sc, const float* __restrict bi,
                    bool nibbles, int32_t code_min, int64_t cols, float* __restrict out) {
  if (nibbles) {  // halves layout: byte j holds code j (low nibble) and code j + cols/2 (high)
    const int64_t half = cols / 2;
    for (int64_t j = 0; j < half; ++j) {
      out[j] = float(int32_t(codes[j] & 0x0F) + code_min);
      out[half + j] = float(int32_t(codes[j] >> 4) + code_min);
    }
  } else {
    const int8_t* c = reinterpret_cast<const int8_t*>(codes);
    for (int64_t j = 0; j < cols; ++j) out[j] = float(c[j]);
  }
  const int64_t groups = cols / GROUP;
  for (int64_t g = 0; g < groups; ++g) {
    float* o = out + g * GROUP;
    const float s = sc[g];
    for (int k = 0; k < GROUP; ++k) o[k] = o[k] * s;
    if (bi != nullptr) {
      const float b = bi[g];
      for (int k = 0; k < GROUP; ++k) o[k] = o[k] + b;
    }
  }
}

template <int GROUP>
void dequantize_rows(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& bias,
                     bool nibbles, int32_t code_min, torch::Tensor& out) {
  const int64_t rows = out.size(0), cols = out.size(1), groups = cols / GROUP;
  const uint8_t* c = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const int64_t stride = codes.stride(0);
  const float* sc = scale.data_ptr<float>();
  const float* bi = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      dequantize_row<GROUP>(c + r * stride, sc + r * groups, bi ? bi + r * groups : nullptr, nibbles, code_min,
                            cols, o + r * cols);
  });
}

}  // namespace

// codes: [R, C] int8 or [R, C/2] uint8 nibbles (rows contiguous); scale, bias: [R, C/group] (float16
// scales are widened first: exact); out: [R, C] float32, written in place and returned.
torch::Tensor dequantize_tile(torch::Tensor codes, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                              int64_t group, int64_t code_min, bool nibbles, torch::Tensor out) {
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == torch::kFloat32 && out.is_contiguous(), "out: contiguous float32 [R, C]");
  const int64_t R = out.size(0), C = out.size(1);
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == R && codes.size(1) == (nibbles ? C / 2 : C) && codes.stride(1) == 1,
              "codes do not match out");
  TORCH_CHECK(C % group == 0 && (!nibbles || C % 2 == 0), "row length ", C, " does not split into groups of ", group);
  const torch::Tensor sc = scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(sc.dim() == 2 && sc.size(0) == R && sc.size(1) == C / group, "scale does not match the codes");
  torch::Tensor bi;
  if (bias.has_value()) {
    bi = bias.value().to(torch::kFloat32).contiguous();
    TORCH_CHECK(bi.sizes() == sc.sizes(), "bias: the scale's shape");
  }
  switch (group) {
    case 16: dequantize_rows<16>(codes, sc, bi, nibbles, static_cast<int32_t>(code_min), out); break;
    case 32: dequantize_rows<32>(codes, sc, bi, nibbles, static_cast<int32_t>(code_min), out); break;
    default: TORCH_CHECK(false, "group size ", group, " is not 16 or 32");
  }
  return out;
}
