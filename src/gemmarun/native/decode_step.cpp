// One decode token through every layer of a dense decoder in one call: the loop of
// model/text.py (DecoderLayer.forward, Attention.forward and _attend_cached for one token on the
// CPU), with the same kernels in the same order, so its output is the same bits.
//
// Why: the kernels of a decode step take ~8 ms on the 270M; the Python around them (module calls,
// views, cache writes, ~40 dispatches a layer) took another 4-5 ms. Here the same work costs a
// C++ call per operation. model/fused_decode.py decides when a model qualifies (float32 compute,
// no KV-shared reader of a K=V layer, matrices it can multiply) and builds the plan; the Python
// path stays the reference.

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

// A weight matrix as decode multiplies it: gemmarun's repacked codes through group_gemv (as
// QuantLinear.matmul_t does for one row), or a float32 weight through at::linear (nn.Linear).
struct DecodeMatrix {
  torch::Tensor codes, scale, dense;
  c10::optional<torch::Tensor> bias;
  int64_t group = 0;
  double code_min = 0.0;
  bool nibbles = false, int8_activations = false;

  // x [1, 1, C] -> [1, 1, R]
  torch::Tensor operator()(const torch::Tensor& x) const {
    if (dense.defined()) return at::linear(x, dense);
    const int64_t C = x.size(-1);
    torch::Tensor y = group_gemv(x.view({1, C}), codes, scale, bias, group, code_min, nibbles, int8_activations);
    return y.view({1, 1, y.size(1)});
  }
};

// Matrices that read one input (q/k/v, gate/up): one call per matrix, each call's output split
// into its parts (a stacked matrix has several), as quant.linear.project does.
struct DecodeProjection {
  std::vector<DecodeMatrix> calls;
  std::vector<std::vector<int64_t>> parts;  // rows of each part, per call

  std::vector<torch::Tensor> operator()(const torch::Tensor& x) const {
    std::vector<torch::Tensor> out;
    for (size_t i = 0; i < calls.size(); ++i) {
      const torch::Tensor y = calls[i](x);
      int64_t offset = 0;
      for (int64_t rows : parts[i]) {
        out.push_back(parts[i].size() == 1 ? y : y.narrow(-1, offset, rows));
        offset += rows;
      }
    }
    return out;
  }
};

// One projection of every expert: GGUF block rows left in the mapped file ([experts * rows, bytes],
// quant/experts.py MappedExpertBlocks, through block_gemv), or one matrix per expert (repacked
// codes or float32).
struct DecodeExpertMatrix {
  torch::Tensor blocks;
  int64_t ggml_type = -1, rows = 0;
  bool int8_activations = false;
  std::vector<DecodeMatrix> matrices;

  // x [1, C] -> expert e's [1, rows]
  torch::Tensor operator()(int64_t e, const torch::Tensor& x) const {
    if (!matrices.empty()) return matrices.at(e)(x.view({1, 1, x.size(-1)})).view({1, -1});
    return block_gemv(x, blocks.narrow(0, e * rows, rows), ggml_type, int8_activations);
  }
};

// A MoE block's router and routed experts for one token (model/moe.py Router, Experts' one-token
// path): the same operations in the same order.
struct DecodeExperts {
  DecodeMatrix router_proj;
  torch::Tensor router_scale, per_expert_scale;  // [H], [E]
  double router_root_size = 1.0;
  int64_t top_k = 0;
  DecodeExpertMatrix gate_up, down;

  // residual, normed: [1, H] (the router reads the residual, the experts its normed copy)
  torch::Tensor operator()(const torch::Tensor& residual, const torch::Tensor& normed, double eps) const {
    const torch::Tensor z = rms_norm(residual, c10::nullopt, eps) * router_scale * router_root_size;
    const torch::Tensor probs = at::softmax(router_proj(z.view({1, 1, -1})).view({1, -1}), -1, torch::kFloat32);
    auto [top, index] = at::topk(probs, top_k, -1);
    torch::Tensor weights = top / top.sum(-1, true);
    weights = weights * per_expert_scale.index({index});
    std::vector<std::pair<int64_t, int64_t>> chosen;  // (expert, slot), added in expert order
    const int64_t* ip = index.data_ptr<int64_t>();
    for (int64_t k = 0; k < top_k; ++k) chosen.emplace_back(ip[k], k);
    std::sort(chosen.begin(), chosen.end());
    torch::Tensor out = at::zeros_like(normed);
    for (const auto& [e, slot] : chosen) {
      const std::vector<torch::Tensor> halves = gate_up(e, normed).chunk(2, -1);
      const torch::Tensor y = down(e, at::gelu(halves[0], "tanh") * halves[1]);
      out.add_(y * weights.select(0, 0).select(0, slot));
    }
    return out;
  }
};

struct DecodeLayer {
  torch::Tensor input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm;
  DecodeProjection qkv;  // q, then k and v where the layer owns its keys and values (K=V: k only)
  torch::Tensor q_norm, k_norm;
  DecodeMatrix o_proj;
  DecodeProjection gate_up;
  DecodeMatrix down_proj;
  bool moe = false;  // the dense MLP above runs beside routed experts (26B-A4B)
  DecodeExperts experts;
  torch::Tensor post_feedforward_layernorm_1, pre_feedforward_layernorm_2, post_feedforward_layernorm_2;
  bool has_ple = false;
  DecodeMatrix per_layer_input_gate, per_layer_projection;
  torch::Tensor post_per_layer_input_norm;
  torch::Tensor layer_scalar;  // undefined: 1
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t window = 0;     // 0: full attention
  int64_t kv_source = -1;  // -1: owns its keys and values, else the layer it reads them from
  int64_t rope_type = 0;   // index into the per-type cos/sin
  bool v_norm = false;
  bool k_eq_v = false;  // stores values only; keys are RoPE(values * k_norm), made by the attention
};

struct DecodePlan {
  std::vector<DecodeLayer> layers;
  double eps = 1e-6, attention_scale = 1.0, attn_softcap = 0.0;

  // x [1, 1, H]: the embedded token at `position`. ple [1, 1, L, P] or undefined. cos/sin [1, D]
  // per layer type; rot_cos/rot_sin per layer type: the rotating pairs' table of positions 0..
  // (RotaryTable.rotating) where a K=V layer has that type, else empty. keys/values
  // [1, kv, slots, D] and key_positions [slots] per layer (empty for KV-shared ones, keys empty on
  // K=V layers); the new token goes to slot[i] and attention reads the first length[i] slots
  // (the cache's bookkeeping, advanced by the caller). Returns x after the last layer.
  torch::Tensor step(torch::Tensor x, c10::optional<torch::Tensor> ple, const std::vector<torch::Tensor>& cos,
                     const std::vector<torch::Tensor>& sin, const std::vector<torch::Tensor>& rot_cos,
                     const std::vector<torch::Tensor>& rot_sin, int64_t position, const std::vector<torch::Tensor>& keys,
                     const std::vector<torch::Tensor>& values, const std::vector<torch::Tensor>& key_positions,
                     const std::vector<int64_t>& slots, const std::vector<int64_t>& lengths) const {
    const size_t L = layers.size();
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1 && x.scalar_type() == torch::kFloat32,
                "decode step: x must be float32 [1, 1, hidden]");
    TORCH_CHECK(keys.size() == L && values.size() == L && key_positions.size() == L && slots.size() == L &&
                lengths.size() == L, "decode step: one cache entry per layer");
    std::vector<torch::Tensor> seen_keys(L), seen_values(L), seen_positions(L);
    for (size_t i = 0; i < L; ++i) {
      const DecodeLayer& layer = layers[i];
      const int64_t nH = layer.num_heads, kv = layer.num_kv_heads, D = layer.head_dim;
      const torch::Tensor& c = cos.at(layer.rope_type);
      const torch::Tensor& s = sin.at(layer.rope_type);

      // Attention (Attention.forward for B = T = 1).
      const std::vector<torch::Tensor> qkv = layer.qkv(rms_norm(x, layer.input_layernorm, eps));
      torch::Tensor q = rope(rms_norm(qkv[0].view({1, 1, nH, D}), layer.q_norm, eps).transpose(1, 2), c, s);
      torch::Tensor k_seen, v_seen, pos_seen;
      if (layer.kv_source < 0) {
        torch::Tensor k_raw = qkv.at(1).view({1, 1, kv, D});
        torch::Tensor v_raw = layer.k_eq_v ? k_raw : qkv.at(2).view({1, 1, kv, D});
        torch::Tensor v = (layer.v_norm ? rms_norm(v_raw, c10::nullopt, eps) : v_raw).transpose(1, 2);
        const int64_t slot = slots[i], n = lengths[i];
        if (!layer.k_eq_v) {
          torch::Tensor k = rope(rms_norm(k_raw, layer.k_norm, eps).transpose(1, 2), c, s);  // [1, kv, 1, D]
          keys[i].narrow(2, slot, 1).copy_(k);
          k_seen = keys[i].narrow(2, 0, n);
        }
        values[i].narrow(2, slot, 1).copy_(v);
        key_positions[i].narrow(0, slot, 1).fill_(position);
        v_seen = values[i].narrow(2, 0, n);
        pos_seen = key_positions[i].narrow(0, 0, n);
      } else {
        TORCH_CHECK(layer.kv_source < static_cast<int64_t>(i) && seen_keys[layer.kv_source].defined(),
                    "decode step: layer ", i, " reads keys of layer ", layer.kv_source, " which has none");
        k_seen = seen_keys[layer.kv_source];
        v_seen = seen_values[layer.kv_source];
        pos_seen = seen_positions[layer.kv_source];
      }
      seen_keys[i] = k_seen;
      seen_values[i] = v_seen;
      seen_positions[i] = pos_seen;
      const torch::Tensor q_one = q.select(0, 0).select(1, 0);
      torch::Tensor attended =
          layer.k_eq_v ? attend_one_values_as_keys(q_one, v_seen.select(0, 0), layer.k_norm, rot_cos.at(layer.rope_type),
                                                   rot_sin.at(layer.rope_type), pos_seen, position, layer.window,
                                                   attention_scale, attn_softcap)
                       : attend_one(q_one, k_seen.select(0, 0), v_seen.select(0, 0), pos_seen, position, layer.window,
                                    attention_scale, attn_softcap);
      torch::Tensor h = layer.o_proj(attended.view({1, 1, nH * D}));
      x = x + rms_norm(h, layer.post_attention_layernorm, eps);

      // Dense MLP: down(gelu(gate) * up).
      const std::vector<torch::Tensor> gate_up = layer.gate_up(rms_norm(x, layer.pre_feedforward_layernorm, eps));
      h = layer.down_proj(at::gelu(gate_up[0], "tanh") * gate_up.at(1));
      if (layer.moe) {  // DecoderLayer.forward's MoE branch
        const torch::Tensor flat = x.view({1, x.size(-1)});
        const torch::Tensor routed = layer.experts(flat, rms_norm(flat, layer.pre_feedforward_layernorm_2, eps), eps);
        h = rms_norm(h, layer.post_feedforward_layernorm_1, eps) +
            rms_norm(routed.view(x.sizes()), layer.post_feedforward_layernorm_2, eps);
      }
      x = x + rms_norm(h, layer.post_feedforward_layernorm, eps);

      // Per-layer embedding injection, layer scalar.
      if (layer.has_ple) {
        TORCH_CHECK(ple.has_value(), "decode step: layer ", i, " needs per-layer inputs");
        const torch::Tensor g = at::gelu(layer.per_layer_input_gate(x), "tanh") * ple->select(2, i);
        x = x + rms_norm(layer.per_layer_projection(g), layer.post_per_layer_input_norm, eps);
      }
      if (layer.layer_scalar.defined()) x = x * layer.layer_scalar;
    }
    return x;
  }
};

// module_local: each build of the module (one per source hash) keeps its own types.
void bind_decode_step(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<DecodeMatrix>(m, "DecodeMatrix", py::module_local())
      .def(py::init<>())
      .def_readwrite("codes", &DecodeMatrix::codes)
      .def_readwrite("scale", &DecodeMatrix::scale)
      .def_readwrite("bias", &DecodeMatrix::bias)
      .def_readwrite("dense", &DecodeMatrix::dense)
      .def_readwrite("group", &DecodeMatrix::group)
      .def_readwrite("code_min", &DecodeMatrix::code_min)
      .def_readwrite("nibbles", &DecodeMatrix::nibbles)
      .def_readwrite("int8_activations", &DecodeMatrix::int8_activations);
  py::class_<DecodeProjection>(m, "DecodeProjection", py::module_local())
      .def(py::init<>())
      .def_readwrite("calls", &DecodeProjection::calls)
      .def_readwrite("parts", &DecodeProjection::parts);
  py::class_<DecodeExpertMatrix>(m, "DecodeExpertMatrix", py::module_local())
      .def(py::init<>())
      .def_readwrite("blocks", &DecodeExpertMatrix::blocks)
      .def_readwrite("ggml_type", &DecodeExpertMatrix::ggml_type)
      .def_readwrite("rows", &DecodeExpertMatrix::rows)
      .def_readwrite("int8_activations", &DecodeExpertMatrix::int8_activations)
      .def_readwrite("matrices", &DecodeExpertMatrix::matrices);
  py::class_<DecodeExperts>(m, "DecodeExperts", py::module_local())
      .def(py::init<>())
      .def_readwrite("router_proj", &DecodeExperts::router_proj)
      .def_readwrite("router_scale", &DecodeExperts::router_scale)
      .def_readwrite("per_expert_scale", &DecodeExperts::per_expert_scale)
      .def_readwrite("router_root_size", &DecodeExperts::router_root_size)
      .def_readwrite("top_k", &DecodeExperts::top_k)
      .def_readwrite("gate_up", &DecodeExperts::gate_up)
      .def_readwrite("down", &DecodeExperts::down);
  py::class_<DecodeLayer>(m, "DecodeLayer", py::module_local())
      .def(py::init<>())
      .def_readwrite("input_layernorm", &DecodeLayer::input_layernorm)
      .def_readwrite("post_attention_layernorm", &DecodeLayer::post_attention_layernorm)
      .def_readwrite("pre_feedforward_layernorm", &DecodeLayer::pre_feedforward_layernorm)
      .def_readwrite("post_feedforward_layernorm", &DecodeLayer::post_feedforward_layernorm)
      .def_readwrite("qkv", &DecodeLayer::qkv)
      .def_readwrite("q_norm", &DecodeLayer::q_norm)
      .def_readwrite("k_norm", &DecodeLayer::k_norm)
      .def_readwrite("o_proj", &DecodeLayer::o_proj)
      .def_readwrite("gate_up", &DecodeLayer::gate_up)
      .def_readwrite("down_proj", &DecodeLayer::down_proj)
      .def_readwrite("moe", &DecodeLayer::moe)
      .def_readwrite("experts", &DecodeLayer::experts)
      .def_readwrite("post_feedforward_layernorm_1", &DecodeLayer::post_feedforward_layernorm_1)
      .def_readwrite("pre_feedforward_layernorm_2", &DecodeLayer::pre_feedforward_layernorm_2)
      .def_readwrite("post_feedforward_layernorm_2", &DecodeLayer::post_feedforward_layernorm_2)
      .def_readwrite("has_ple", &DecodeLayer::has_ple)
      .def_readwrite("per_layer_input_gate", &DecodeLayer::per_layer_input_gate)
      .def_readwrite("per_layer_projection", &DecodeLayer::per_layer_projection)
      .def_readwrite("post_per_layer_input_norm", &DecodeLayer::post_per_layer_input_norm)
      .def_readwrite("layer_scalar", &DecodeLayer::layer_scalar)
      .def_readwrite("num_heads", &DecodeLayer::num_heads)
      .def_readwrite("num_kv_heads", &DecodeLayer::num_kv_heads)
      .def_readwrite("head_dim", &DecodeLayer::head_dim)
      .def_readwrite("window", &DecodeLayer::window)
      .def_readwrite("kv_source", &DecodeLayer::kv_source)
      .def_readwrite("rope_type", &DecodeLayer::rope_type)
      .def_readwrite("v_norm", &DecodeLayer::v_norm)
      .def_readwrite("k_eq_v", &DecodeLayer::k_eq_v);
  py::class_<DecodePlan>(m, "DecodePlan", py::module_local())
      .def(py::init<>())
      .def_readwrite("layers", &DecodePlan::layers)
      .def_readwrite("eps", &DecodePlan::eps)
      .def_readwrite("attention_scale", &DecodePlan::attention_scale)
      .def_readwrite("attn_softcap", &DecodePlan::attn_softcap)
      // Without the GIL: a step is milliseconds of C++ that touches no Python object, and the
      // server's other threads (HTTP, streaming) should run meanwhile.
      .def("step", &DecodePlan::step, "one token through every layer (see decode_step.cpp)",
           py::call_guard<py::gil_scoped_release>());
}
