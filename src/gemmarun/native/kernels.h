// The entry points of gemmarun's native kernels, declared once: each .cpp that defines one includes
// this (so a definition that drifts from its declaration fails to compile), and so do its callers
// (module.cpp's bindings, decode_step.cpp).

#pragma once

#include <torch/extension.h>

// group_gemv.cpp: quantized matrix-vector products
torch::Tensor group_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                         int64_t group, double code_min, bool nibbles, bool int8_activations);
torch::Tensor block_gemv(torch::Tensor x, torch::Tensor blocks, int64_t ggml_type, bool int8_activations);
torch::Tensor block_gemm(torch::Tensor x, torch::Tensor blocks, int64_t ggml_type);

// dequant.cpp: prefill's exact float32 weight tiles
torch::Tensor dequantize_tile(torch::Tensor codes, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                              int64_t group, int64_t code_min, bool nibbles, torch::Tensor out);

// decode_ops.cpp: a decode step's small float32 operations
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> weight, double eps);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor attend_one(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor key_positions,
                         int64_t position, int64_t window, double scale, double softcap);
torch::Tensor attend_one_values_as_keys(torch::Tensor q, torch::Tensor values, torch::Tensor key_weight,
                                        torch::Tensor rot_cos, torch::Tensor rot_sin, torch::Tensor key_positions,
                                        int64_t position, int64_t window, double scale, double softcap);
int64_t argmax(torch::Tensor x);

// decode_step.cpp: a decode token through every layer, bound as classes
void bind_decode_step(pybind11::module& m);
