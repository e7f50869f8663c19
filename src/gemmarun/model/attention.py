"""One attention module for sliding and full layers, driven by its LayerSpec (spec 3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerSpec, TextConfig
from ..masks import visible
from ..native import native_ops
from ..quant.linear import project
from .layers import RMSNorm, RotaryTable, apply_rope, rms_norm, softcap

# Keys/values a layer attended over in this forward, by layer index, for KV-shared consumers.
# A K=V layer's entry is a ValuesAsKeys, which unpacks the same way.
SharedKV = dict[int, "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | ValuesAsKeys"]


class ValuesAsKeys:
    """What a K=V layer (spec 3.4) hands to the readers of its keys and values: unpacks to (keys,
    values, key positions) like any SharedKV entry, the keys made on first use. The layer's own
    one-query decode attends without them; a KV-shared layer or a drafter reading them gets them."""

    def __init__(self, attention: "Attention", values: torch.Tensor, key_pos: torch.Tensor, rotary: RotaryTable):
        self.values, self.key_pos = values, key_pos
        self._attention, self._rotary = attention, rotary
        self._keys: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor:
        if self._keys is None:
            self._keys = self._attention.keys_from_values(self.values, self.key_pos, self._rotary)
        return self._keys

    def __iter__(self):
        return iter((self.keys, self.values, self.key_pos))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.num_heads = cfg.num_heads
        self.scale = cfg.attention_scale
        self.logit_softcap = cfg.attn_logit_softcap
        self.has_v_norm = cfg.has_v_norm
        self.eps = cfg.rms_norm_eps
        d, kv = spec.head_dim, spec.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        if spec.owns_kv:
            self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
            if not spec.k_eq_v:
                self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)

    def input_projections(self) -> tuple[nn.Module, ...]:
        """q, then k and v where this layer makes its own (K=V layers have no v_proj); they read
        the same input and are stacked into one matmul where they can be."""
        if not self.spec.owns_kv:
            return (self.q_proj,)
        return (self.q_proj, self.k_proj) if self.spec.k_eq_v else (self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        h: torch.Tensor,  # (B, T, H), already input-normed
        positions: torch.Tensor,  # (T,)
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin for `positions`, (T, D)
        rotary: RotaryTable,  # to rebuild keys of K=V layers at cached positions
        cache,  # KVCache | None, or one KVCache per row for batched decode (T = 1)
        shared,  # SharedKV, or one per row
        blocks: torch.Tensor | None = None,  # vision block per absolute position (prefill only)
    ) -> torch.Tensor:
        B, T, _ = h.shape
        spec = self.spec
        cos, sin = rope  # (T, D); for batched decode (B, D), one position per row
        rows = isinstance(cache, list)
        if rows:
            cos, sin = cos[:, None, None], sin[:, None, None]  # (B, 1, 1, D)
        q, *kv = project(h, *self.input_projections())
        q = self.q_norm(q.view(B, T, self.num_heads, spec.head_dim))
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nH, T, D)
        k = v = None
        if spec.owns_kv:
            k_raw = kv[0].view(B, T, spec.num_kv_heads, spec.head_dim)
            v_raw = k_raw if spec.k_eq_v else kv[1].view(B, T, spec.num_kv_heads, spec.head_dim)
            k = apply_rope(self.k_norm(k_raw).transpose(1, 2), cos, sin)  # (B, kv, T, D)
            v = (rms_norm(v_raw, None, self.eps) if self.has_v_norm else v_raw).transpose(1, 2)
        if rows:  # projections ran batched; each row attends over its own cache
            out = torch.cat([
                self._attend_cached(q[b : b + 1], None if k is None else k[b : b + 1],
                                    None if v is None else v[b : b + 1], positions[b : b + 1],
                                    rotary, cache[b], shared[b], None)
                for b in range(B)
            ])
        else:
            out = self._attend_cached(q, k, v, positions, rotary, cache, shared, blocks)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend_cached(self, q, k, v, positions, rotary, cache, shared: SharedKV, blocks):
        """Store this layer's new keys/values (or read the producer's) and attend."""
        spec = self.spec
        one_query = q.shape[0] == 1 and q.shape[2] == 1 and blocks is None and q.device.type == "cpu"
        if spec.owns_kv:
            if cache is None:
                keys, values, key_pos = k, v, positions
            else:
                keys, values, key_pos = cache.write(spec.index, k, v, positions)
            if keys is None:  # K=V storage keeps values only: K = RoPE(V * w_k), made where needed
                entry = ValuesAsKeys(self, values, key_pos, rotary)
                shared[spec.index] = entry
                if one_query:
                    out = self._attend_one_values_as_keys(q, values, key_pos, rotary, int(positions[0]))
                    if out is not None:
                        return out
                keys = entry.keys
            else:
                shared[spec.index] = (keys, values, key_pos)
        else:
            keys, values, key_pos = shared[spec.kv_source]
        if one_query:
            return self._attend_one(q, keys, values, key_pos, int(positions[0]))
        mask = visible(positions, key_pos, spec.window, blocks if spec.image_blocks else None)  # (T, S)
        return self._attend(q, keys, values, mask)

    def keys_from_values(self, values, key_pos, rotary: RotaryTable) -> torch.Tensor:
        """A K=V layer's keys at `key_pos`: RoPE(values * w_k) (its values are the weightless-normed
        key projection, so the key norm's weight is all that is left to apply)."""
        k_cos, k_sin = rotary(key_pos, values.dtype)
        return apply_rope((values.float() * self.k_norm.weight.float()).type_as(values), k_cos, k_sin)

    def _attend_one_values_as_keys(self, q, values, key_pos, rotary: RotaryTable, position: int):
        """One decode query of a K=V layer on the CPU without a [kv, S, D] key tensor: the native
        kernel makes each visible key row from its value row (60 ms a layer at 16k keys spent
        on making them as tensors, cos/sin included, on the 26B-A4B's full layers). None where
        it cannot run (no native module, value rows not contiguous)."""
        ops = native_ops()
        if ops is None or values.stride(-1) != 1:
            return None
        _, n_heads, _, d = q.shape
        cos, sin = rotary.rotating(position + 1)
        wide = [t if t.dtype == torch.float32 else t.float() for t in (q[0, :, 0], values[0], self.k_norm.weight)]
        out = ops.attend_one_values_as_keys(wide[0], wide[1], wide[2], cos, sin, key_pos, position,
                                            self.spec.window or 0, self.scale, self.logit_softcap or 0.0)
        return out.view(1, n_heads, 1, d).to(q.dtype)

    def _attend(self, q, k, v, mask):
        if self.logit_softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        # Soft-capped logits (Gemma 3 configs that set attn_logit_softcapping) need the eager path.
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = softcap((q @ k.transpose(-1, -2)) * self.scale, self.logit_softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ v

    def _attend_one(self, q, k, v, key_pos, position: int):
        """One decode query on the CPU. torch's CPU flash kernel is built for long queries and
        cost ~0.4 ms a layer here; the native kernel reads the mask from the positions and does
        the rest in one call; without it, the query heads sharing a KV head go as one small
        matmul."""
        _, n_heads, _, d = q.shape
        window = self.spec.window
        if k.stride(-1) == v.stride(-1) == 1:
            ops = native_ops()
            if ops is not None:
                # Other dtypes are widened to float32 first. Their torch matmuls here had a new shape
                # every token, and oneDNN (bfloat16) keeps a ~1 MiB primitive per shape: +2 MiB a token.
                wide = [t if t.dtype == torch.float32 else t.float() for t in (q[0, :, 0], k[0], v[0])]
                out = ops.attend_one(*wide, key_pos, position, window or 0, self.scale, self.logit_softcap or 0.0)
                return out.view(1, n_heads, 1, d).to(q.dtype)
        mask = visible(key_pos.new_tensor([position]), key_pos, window)  # (1, S)
        kv = k.shape[1]
        qg = q.view(kv, n_heads // kv, d)  # (kv, groups, D)
        scores = torch.matmul(qg, k[0].transpose(-1, -2)).float() * self.scale  # (kv, groups, S)
        if self.logit_softcap is not None:
            scores = softcap(scores, self.logit_softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v[0]).view(1, n_heads, 1, d)
