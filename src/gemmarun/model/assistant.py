"""The Gemma 4 multi-token-prediction drafter (`gemma4_assistant`, spec 7).

A small Gemma 4 text stack that owns no KV cache: every layer attends over the keys and values
its target already computed (the target's last KV-owning sliding and full layer). One draft step
reads the target-scaled embedding of the newest token and a hidden state of the target's width
(the target's own post-norm state for the first step, the drafter's `post_projection` output
after that), and returns logits for the token after it. The query position stays at the newest
token's position for the whole burst; masks are bidirectional over the context the target wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import AssistantConfig, ConfigError, LayerType, TextConfig
from .attention import SharedKV
from .layers import RMSNorm
from .text import DecoderLayer, TokenEmbedding, rotary_tables


class DraftPairingError(ConfigError):
    """A drafter that cannot read this target's keys and values; the message names the mismatch."""


def target_producers(target: TextConfig) -> dict[LayerType, int]:
    """Per layer type, the last target layer that owns its keys and values. For KV-sharing
    targets (E2B, E4B) these are the producers their shared layers read (spec 3.6); for targets
    without sharing (31B, 26B-A4B) simply the last layer of each type (spec 7: presumed)."""
    return {spec.layer_type: spec.index for spec in target.layers if spec.owns_kv}


def check_pairing(cfg: AssistantConfig, target: TextConfig) -> dict[LayerType, int]:
    """The target's producer layers, after checking that the drafter can read them."""
    if target.family != "gemma4":
        raise DraftPairingError(f"a gemma4_assistant drafter needs a Gemma 4 target, not {target.family}")
    if cfg.backbone_hidden_size != target.hidden_size:
        raise DraftPairingError(
            f"drafter backbone_hidden_size={cfg.backbone_hidden_size} but the target's hidden size is {target.hidden_size}")
    if cfg.text.vocab_size != target.vocab_size:
        raise DraftPairingError(f"drafter vocab_size={cfg.text.vocab_size} but the target's is {target.vocab_size}")
    producers = target_producers(target)
    for spec in cfg.layers:
        source = producers.get(spec.layer_type)
        if source is None:
            raise DraftPairingError(f"drafter layer {spec.index} is {spec.layer_type.value} but the target has no such layer")
        theirs = target.layers[source]
        if spec.head_dim != theirs.head_dim or cfg.text.num_heads % theirs.num_kv_heads:
            raise DraftPairingError(
                f"drafter layer {spec.index} ({spec.layer_type.value}): head_dim {spec.head_dim} with "
                f"{cfg.text.num_heads} heads cannot read target layer {source} "
                f"(head_dim {theirs.head_dim}, {theirs.num_kv_heads} KV heads)")
    return producers


@dataclass
class DraftContext:
    """What stays fixed over one draft burst."""

    kv: SharedKV  # the target producers' (keys, values, key positions), under the drafter's slots
    newest: torch.Tensor  # (1,) position of the newest key the target wrote: masks are anchored there
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # cos/sin per layer type at the query position


class CentroidHead(nn.Module):
    """The "ordered embeddings" head: score the centroids, keep the best `top_k` clusters of
    `vocab / num_centroids` tokens each, compute those logits exactly and give every other token
    the smallest of them minus one (as the reference does)."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.top_k = cfg.centroid_top_k
        self.num_centroids = cfg.num_centroids
        self.centroids = nn.Linear(cfg.text.hidden_size, cfg.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(cfg.text.vocab_size, dtype=torch.long))

    def forward(self, x: torch.Tensor, table: TokenEmbedding) -> torch.Tensor:
        """x (N, h) -> logits (N, V)."""
        clusters = torch.topk(self.centroids(x), self.top_k, dim=-1).indices  # (N, top_k)
        members = self.token_ordering.view(self.num_centroids, -1)[clusters].flatten(1)  # (N, top_k * per)
        rows = table.lookup(members)  # (N, top_k * per, h)
        chosen = (rows @ x[:, :, None]).squeeze(-1)  # (N, top_k * per)
        out = (chosen.min() - 1.0).expand(x.shape[0], self.token_ordering.numel()).contiguous()
        return out.scatter_(1, members, chosen)


class Assistant(nn.Module):
    """The drafter. Module names are the HF checkpoint's minus `model.` (`lm_head` is tied to
    `embed_tokens`, which is only ever used as the head: inputs come from the target's table)."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.config = cfg
        text = cfg.text
        self.embed_tokens = TokenEmbedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(text, spec) for spec in cfg.layers)
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.rotary = rotary_tables(cfg.layers)
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, cfg.backbone_hidden_size, bias=False)
        self.masked_embedding = CentroidHead(cfg) if cfg.use_ordered_embeddings else None

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def context(self, target_kv: SharedKV, producers: dict[LayerType, int], query_position: int) -> DraftContext:
        """Bind one burst: the target's K/V (from its latest forward, `Exposed.kv`) and the
        position every drafted token's query takes (the newest token's, not yet in the target's
        cache); keys at or past it (rejected drafts still in a buffer) are never visible."""
        kv = {}
        for layer_type, source in producers.items():
            keys, values, key_pos = target_kv[source]
            kv[self.config.external_kv_slot(layer_type)] = (keys.to(self.dtype), values.to(self.dtype), key_pos)
        position = torch.tensor([query_position], device=self.device)
        rope = {name: table(position, self.dtype) for name, table in self.rotary.items()}
        return DraftContext(kv=kv, newest=position - 1, rope=rope)

    def forward(self, token_embed: torch.Tensor, hidden: torch.Tensor, ctx: DraftContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step. token_embed, hidden: (B, 1, H_target). Returns (logits (B, 1, V),
        the next step's hidden input (B, 1, H_target))."""
        x = self.pre_projection(torch.cat((token_embed, hidden), dim=-1).to(self.dtype))
        for layer in self.layers:
            lt = layer.spec.layer_type.value
            x = layer(x, None, ctx.newest, ctx.rope[lt], self.rotary[lt], None, ctx.kv)
        x = self.norm(x)
        if self.masked_embedding is not None:
            logits = self.masked_embedding(x.flatten(0, 1), self.embed_tokens).view(*x.shape[:2], -1)
        else:
            logits = self.embed_tokens.matmul_transposed(x)
        # no softcap, whatever the text config says: the reference's drafter never applies one
        # (the released drafters' configs say null)
        return logits, self.post_projection(x)
