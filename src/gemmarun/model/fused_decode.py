"""A decode token through every layer in one native call (native/decode_step.cpp).

The modules of text.py and attention.py stay the reference; this file only reads them into a
plan: each layer's norm weights, its matrices as the native kernels multiply them (stacked q/k/v
and gate/up as `project` multiplies them) and its attention's shape. The native step then runs
the same kernels in the same order, so a token's logits are the same bits either way
(tests/model/test_fused_decode.py), without the ~40 Python-level dispatches a layer costs.

A model qualifies when it computes in float32 on the CPU, no KV-shared layer reads a K=V layer's
cache (no released config has both), and it has only matrices the native kernels or `at::linear`
multiply (MoE experts left in the mapped GGUF, repacked or float, included). Anything else keeps
the module path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..native import native_ops
from ..quant import QuantExperts, QuantLinear, stacked
from ..quant.experts import FloatLinear
from .moe import Experts

__all__ = ["build_decode_plan"]


def _dense_matrix(ops, weight: torch.Tensor):
    """A float32 CPU weight through `at::linear`, or None."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    m = ops.DecodeMatrix()
    m.dense = weight
    return m


def _matrix(ops, linear: nn.Module):
    """`linear` as the native step multiplies it, or None where it cannot."""
    if isinstance(linear, QuantLinear):
        args = None if linear.reference else linear.native_args()
        if args is None:
            return None
        m = ops.DecodeMatrix()
        m.codes, m.scale, m.bias, m.group, m.code_min, m.nibbles, m.int8_activations = args
        return m
    if type(linear) in (nn.Linear, FloatLinear) and getattr(linear, "bias", None) is None:
        return _dense_matrix(ops, linear.weight)
    return None


def _projection(ops, linears: tuple[nn.Module, ...]):
    """Matrices reading one input, called as `quant.linear.project` calls them for one token."""
    p = ops.DecodeProjection()
    stack = stacked(linears)
    groups = [(stack.matrix, list(stack.sizes))] if stack is not None else [(m, [m.out_features]) for m in linears]
    calls = [_matrix(ops, m) for m, _ in groups]
    if any(c is None for c in calls):
        return None
    p.calls, p.parts = calls, [sizes for _, sizes in groups]
    return p


def _expert_matrix(ops, experts: Experts, leaf: str):
    """One projection of every expert as the native step multiplies it, or None."""
    m = ops.DecodeExpertMatrix()
    if isinstance(experts, QuantExperts):
        mapped = experts.mapped.get(leaf)
        if mapped is not None:
            m.blocks, m.ggml_type, m.rows = mapped.raw, int(mapped.ggml_type), mapped.out_f
            m.int8_activations = experts.compute_dtype != torch.float32
            return m
        matrices = [_matrix(ops, e) for e in experts.repacked(leaf)]
    elif type(experts) is Experts:
        matrices = [_dense_matrix(ops, w) for w in getattr(experts, leaf).unbind(0)]
    else:
        return None
    if not matrices or any(x is None for x in matrices):
        return None
    m.matrices = matrices
    return m


def _experts(ops, layer: nn.Module, eps: float):
    """A MoE layer's router and routed experts as the native step runs them, or None."""
    router = layer.router
    e = ops.DecodeExperts()
    fields = {"router_proj": _matrix(ops, router.proj), "gate_up": _expert_matrix(ops, layer.experts, "gate_up_proj"),
              "down": _expert_matrix(ops, layer.experts, "down_proj")}
    scales = (router.scale, router.per_expert_scale)
    if (router.eps != eps or any(v is None for v in fields.values())
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in scales)):
        return None
    for name, value in fields.items():
        setattr(e, name, value)
    e.router_scale, e.per_expert_scale = scales
    e.router_root_size, e.top_k = router.root_size, router.top_k
    return e


def _norm_weight(norm: nn.Module, eps: float) -> torch.Tensor | None:
    w = norm.weight
    ok = norm.eps == eps and w is not None and w.dtype == torch.float32 and w.device.type == "cpu"
    return w if ok else None


def build_decode_plan(model: nn.Module):
    """The native plan of `model`'s layers (a TextModel), or None where it does not qualify or the
    native kernels are unavailable."""
    ops = native_ops()
    cfg = model.config
    if ops is None or model.dtype != torch.float32 or model.device.type != "cpu":
        return None
    eps = model.norm.eps
    types = list(model.rotary.keys())
    layers = []
    for layer in model.layers:
        spec, attn = layer.spec, layer.self_attn
        if attn.eps != eps or (not spec.owns_kv and cfg.layers[spec.kv_source].k_eq_v):
            return None
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        fields = {name: _norm_weight(getattr(layer, name), eps) for name in norms}
        fields["q_norm"] = _norm_weight(attn.q_norm, eps)
        if spec.owns_kv:
            fields["k_norm"] = _norm_weight(attn.k_norm, eps)
        fields["qkv"] = _projection(ops, attn.input_projections())
        fields["gate_up"] = _projection(ops, layer.mlp.input_projections())
        fields["o_proj"] = _matrix(ops, attn.o_proj)
        fields["down_proj"] = _matrix(ops, layer.mlp.down_proj)
        if spec.moe:
            fields["experts"] = _experts(ops, layer, eps)
            for name in ("post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"):
                fields[name] = _norm_weight(getattr(layer, name), eps)
        if layer.has_ple:
            fields["per_layer_input_gate"] = _matrix(ops, layer.per_layer_input_gate)
            fields["per_layer_projection"] = _matrix(ops, layer.per_layer_projection)
            fields["post_per_layer_input_norm"] = _norm_weight(layer.post_per_layer_input_norm, eps)
        scalar = layer.layer_scalar
        if scalar.dtype != torch.float32 or scalar.device.type != "cpu":
            return None
        if not bool((scalar == 1).all()):
            fields["layer_scalar"] = scalar
        if any(value is None for value in fields.values()):
            return None
        d = ops.DecodeLayer()
        for name, value in fields.items():
            setattr(d, name, value)
        d.has_ple = layer.has_ple
        d.moe = spec.moe
        d.num_heads, d.num_kv_heads, d.head_dim = attn.num_heads, spec.num_kv_heads, spec.head_dim
        d.window = spec.window or 0
        d.kv_source = -1 if spec.owns_kv else spec.kv_source
        d.rope_type = types.index(spec.layer_type.value)
        d.v_norm = attn.has_v_norm
        d.k_eq_v = spec.owns_kv and spec.k_eq_v
        layers.append(d)
    plan = ops.DecodePlan()
    plan.layers = layers
    plan.eps = eps
    plan.attention_scale = cfg.attention_scale
    plan.attn_softcap = cfg.attn_logit_softcap or 0.0
    return plan
