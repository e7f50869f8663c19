"""The Gemma 4 / Gemma 3 text decoder, top to bottom as in spec section 3.

One token's path: scaled embedding (3.1) -> per-layer embeddings (3.2) -> layers (3.9: attention,
dense MLP or dense+MoE, PLE injection, layer scalar) -> final norm -> tied head -> logit soft-cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..cache import KVCache
from ..config import LayerSpec, TextConfig
from .attention import Attention, SharedKV
from .layers import MLP, RMSNorm, RotaryTable, gelu_tanh, softcap
from .moe import Experts, Router


_EMPTY = torch.empty(0)


class TokenEmbedding(nn.Module):
    """The main token table, also the tied output head. A quantized table offers the same
    two methods (`lookup`, `matmul_transposed`)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def matmul_transposed(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class PerLayerEmbedding(nn.Module):
    """PLE (spec 3.2). The packed [V, L*P] token table is a plain attribute, not a parameter:
    it stays memory-mapped on the CPU (never copied to RAM or GPU); only gathered rows move, read
    from the file with pread where the loader knows it (loading/file_rows.py).
    A GGUF table may be quantized: then `table` holds the raw block bytes of each row and
    `table_type` their ggml type, and only the gathered rows are dequantized."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_layers, self.dim = cfg.num_layers, cfg.ple_dim
        self.input_scale = cfg.hidden_size**-0.5
        self.table = None  # set by the loader: (V, L*P) floats or (V, row bytes)
        self.table_type = None  # ggml type of a quantized table, else None
        self.per_layer_model_projection = nn.Linear(cfg.hidden_size, cfg.num_layers * cfg.ple_dim, bias=False)
        self.per_layer_projection_norm = RMSNorm(cfg.ple_dim, cfg.rms_norm_eps)

    @property
    def table(self) -> torch.Tensor | None:
        return self._table

    @table.setter
    def table(self, table: torch.Tensor | None) -> None:
        self._table = table
        self.file_rows = None  # where the loader knows the table's file: its rows, read with pread

    def table_nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def token_part(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        if self.file_rows is not None:  # only these rows' bytes, never mapped into the process
            rows = self.file_rows.read(flat).view(self.table.dtype).view(flat.numel(), -1)
        else:
            rows = self.table[flat]  # reads only these rows of the mapped file
        if self.table_type is not None:
            from ..quant import dequantize

            rows = dequantize(rows, self.table_type, (rows.shape[0], self.num_layers * self.dim))
        rows = rows.to(device=ids.device, dtype=dtype)  # a fresh copy of the rows either way
        rows.mul_(torch.tensor(math.sqrt(self.dim), dtype=dtype))
        return rows.view(*ids.shape, self.num_layers, self.dim)

    def forward(self, ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ids (B, T) with placeholders already mapped to 0; x0 the scaled (merged) embeddings.
        Returns (B, T, L, P). The [T, L*P] intermediates are updated in place (same bits): a
        512-token prefill of E2B holds 17.5 MiB per copy."""
        context = self.per_layer_model_projection(x0).mul_(self.input_scale)
        context = self.per_layer_projection_norm(context.view(*x0.shape[:-1], self.num_layers, self.dim))
        return context.add_(self.token_part(ids, x0.dtype)).mul_(2.0**-0.5)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        H = cfg.hidden_size
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(H, spec.mlp_dim)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        if spec.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, cfg.rms_norm_eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, cfg.rms_norm_eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, cfg.rms_norm_eps)
        self.has_ple = cfg.ple_dim > 0
        if self.has_ple:
            self.per_layer_input_gate = nn.Linear(H, cfg.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(cfg.ple_dim, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, cfg.rms_norm_eps)
        # Gemma 4 learns this scalar; Gemma 3 has none (stays 1).
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        self._unit_scalar: bool | None = None  # whether it is 1 (looked up at the first forward)

    def forward(self, x, ple, positions, rope, rotary, cache, shared: SharedKV, blocks=None):
        h = self.self_attn(self.input_layernorm(x), positions, rope, rotary, cache, shared, blocks)
        x = x + self.post_attention_layernorm(h)

        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.spec.moe:
            dense = self.post_feedforward_layernorm_1(h)
            flat = x.reshape(-1, x.shape[-1])
            weights, index = self.router(flat)  # the router reads the residual, not the normed input
            moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index)
            h = dense + self.post_feedforward_layernorm_2(moe.view(x.shape))
        x = x + self.post_feedforward_layernorm(h)

        if self.has_ple:
            g = gelu_tanh(self.per_layer_input_gate(x)) * ple
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        if self._unit_scalar is None:  # Gemma 3 has none (ones): skip a multiply per layer and token
            self._unit_scalar = bool((self.layer_scalar == 1).all())
        return x if self._unit_scalar else x * self.layer_scalar


def rotary_tables(specs: tuple[LayerSpec, ...]) -> nn.ModuleDict:
    """One RoPE table per layer type, keyed by the type's value."""
    tables = nn.ModuleDict()
    with torch.device("cpu"):  # computed, not loaded: real values even when built on `meta`
        for spec in specs:
            if spec.layer_type.value not in tables:
                tables[spec.layer_type.value] = RotaryTable(spec.rope.inv_freq(spec.head_dim))
    return tables


@dataclass
class Exposed:
    """What a forward hands out on request to a speculative drafter (spec 7): no copies, only
    references to tensors the forward made anyway."""

    hidden: torch.Tensor | None = None  # (B, T, H) post-final-norm states of the positions given logits
    kv: SharedKV | None = None  # per KV-owning layer: keys, values, key positions it attended over


class TextModel(nn.Module):
    """The decoder with its tied head. `forward` never creates a cache; the caller owns it.

    One token of decode on the CPU goes through all layers in one native call where the model
    qualifies (fused_decode.py: same kernels, same bits); `fused_decode = False` keeps the
    module path."""

    fused_decode: bool = True

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = TokenEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.ple = PerLayerEmbedding(cfg) if cfg.ple_dim else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec) for spec in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary_tables(cfg.layers)
        # The KV-shared tail (spec 3.6): from this layer on no layer writes the cache, so a prefill
        # that wants the last position's logits computes these layers for that position alone.
        self.shared_tail_start = next(
            (i for i in range(cfg.num_layers) if not any(s.owns_kv for s in cfg.layers[i:])), cfg.num_layers)
        self._decode_plan = None  # the native plan of the layers: None not built yet, False none
        self._values_as_keys_types = {s.layer_type.value for s in cfg.layers if s.owns_kv and s.k_eq_v}
        self.register_buffer("_placeholders", None, persistent=False)  # see read_placeholders_as_pad

    def read_placeholders_as_pad(self, ids: Sequence[int]) -> None:
        """A multimodal model reads its media placeholder ids as the pad token (table and PLE rows)
        wherever they occur: in a prompt `merge` writes soft tokens over them, and a placeholder
        that decoding generates is embedded as pad too, as the reference's every forward does."""
        self._placeholders = torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.device)

    def text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` as the token table and PLE read them: media placeholders as pad (see above)."""
        if self._placeholders is None:
            return ids
        return ids.masked_fill(torch.isin(ids, self._placeholders), self.config.pad_id)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._decode_plan = None  # it holds the tensors as they were before a move or a cast
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_decode_plan"] = None  # native objects are not copied; a copy builds its own
        return state

    def _fused_layers(self, x, ple, positions, rope, cache) -> torch.Tensor | None:
        """x after every layer through the native plan for one token, or None where it does not
        apply (then the module path runs)."""
        if self._decode_plan is None:
            from .fused_decode import build_decode_plan

            self._decode_plan = build_decode_plan(self) or False
        storage = cache.storage() if self._decode_plan else None
        if storage is None:
            return None
        position = int(positions[0])
        slots, lengths = cache.advance(position)
        cos = [rope[name][0] for name in self.rotary]
        sin = [rope[name][1] for name in self.rotary]
        # K=V layers make their keys from the rotating pairs' cos/sin of every cached position
        rotating = [table.rotating(position + 1) if name in self._values_as_keys_types else (_EMPTY, _EMPTY)
                    for name, table in self.rotary.items()]
        return self._decode_plan.step(x, ple, cos, sin, [c for c, _ in rotating], [s for _, s in rotating],
                                      position, *storage, slots, lengths)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the token table's (norm weights stay float32, as the norm computes)."""
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        """Where activations live (the PLE table, alone, stays on the CPU)."""
        return self.norm.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings; the scale is rounded to the table's dtype as the reference does."""
        x = self.embed_tokens.lookup(ids)
        return x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)

    def forward(
        self,
        ids: torch.Tensor,  # (B, T) token ids; soft-token positions hold 0 when `embeds` is given
        positions: torch.Tensor,  # (T,) absolute positions; (B,) for batched decode
        cache=None,  # KVCache | None; a list of B caches means batched decode (T = 1, row b at positions[b])
        *,
        embeds: torch.Tensor | None = None,  # (B, T, H) merged input embeddings (multimodal)
        last_only: bool = False,  # compute logits for the last position only
        vision_blocks: torch.Tensor | None = None,  # (N,) block id per absolute position, -1 = none
        expose: Exposed | None = None,  # filled with the final hidden states and the layers' K/V
    ) -> torch.Tensor:
        # The caches get the positions as host ints, read once here: no layer then waits on a GPU.
        if isinstance(cache, list):  # batched decode: row b writes positions[b]
            for row_cache, position in zip(cache, positions.tolist()):
                row_cache.begin([position])
        elif cache is not None:
            cache.begin(positions.tolist())
        ids = self.text_ids(ids)
        x = self.embed(ids) if embeds is None else embeds
        ple = self.ple(ids, x) if self.ple is not None else None
        rope = {name: table(positions, x.dtype) for name, table in self.rotary.items()}
        fused = None
        if (self.fused_decode and ids.shape == (1, 1) and isinstance(cache, KVCache) and vision_blocks is None
                and expose is None and x.dtype == torch.float32 and x.device.type == "cpu"):
            fused = self._fused_layers(x, ple, positions, rope, cache)
        if fused is not None:
            x = fused
        else:
            shared: SharedKV | list[SharedKV] = [{} for _ in cache] if isinstance(cache, list) else {}
            for i, layer in enumerate(self.layers):
                if last_only and i == self.shared_tail_start and x.shape[1] > 1:
                    # Nothing after this point reads the other positions: they write no keys or
                    # values. E2B's last 20 layers (its double-wide MLPs) go from T rows to one.
                    x, positions = x[:, -1:], positions[-1:]
                    rope = {name: (cos[-1:], sin[-1:]) for name, (cos, sin) in rope.items()}
                    ple = ple[:, -1:] if ple is not None else None
                lt = layer.spec.layer_type.value
                layer_ple = ple[:, :, i] if ple is not None else None
                x = layer(x, layer_ple, positions, rope[lt], self.rotary[lt], cache, shared, vision_blocks)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if expose is not None:
            expose.hidden, expose.kv = x, shared
        logits = self.embed_tokens.matmul_transposed(x)
        cap = self.config.final_logit_softcap
        return softcap(logits, cap) if cap else logits


