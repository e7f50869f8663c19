"""What `gemmarun inspect` reports: layer plan, parameter counts, KV-cache sizes, memory tiers,
the tensor table, and warnings about metadata that breaks runtimes."""

from __future__ import annotations

from collections.abc import Iterator

from .cache import kv_bytes_per_token, kv_cache_bytes
from .config import LayerType, TextConfig
from .llm import LLM, ModelInfo


def parameter_counts(cfg: TextConfig) -> dict[str, int]:
    """Counts computed from the config (spec 8.3): total, embedding, PLE table, effective."""
    H = cfg.hidden_size
    embed = cfg.vocab_size * H
    ple_table = cfg.ple_vocab_size * cfg.num_layers * cfg.ple_dim
    ple_other = (H * cfg.num_layers * cfg.ple_dim + cfg.ple_dim) if cfg.ple_dim else 0
    layers = 0
    for s in cfg.layers:
        q = cfg.num_heads * s.head_dim
        attn = H * q + q * H + s.head_dim  # q, o, q_norm
        if s.owns_kv:
            kv = s.num_kv_heads * s.head_dim
            attn += H * kv * (1 if s.k_eq_v else 2) + s.head_dim
        mlp = 3 * H * s.mlp_dim
        norms = 4 * H + (cfg.family == "gemma4")  # + Gemma 4's layer scalar
        moe = 0
        if s.moe:
            E, Im = cfg.num_experts, cfg.expert_dim
            moe = H * E + H + E + E * 3 * Im * H + 3 * H
        ple = (2 * H * cfg.ple_dim + H) if cfg.ple_dim else 0
        layers += attn + mlp + norms + moe + ple
    total = embed + ple_table + ple_other + layers + H
    counts = {"total": total, "embedding": embed, "ple_table": ple_table, "effective": total - ple_table}
    if cfg.num_experts:
        inactive = (cfg.num_experts - cfg.top_k_experts) * 3 * cfg.expert_dim * H * cfg.num_layers
        counts["active"] = counts["effective"] - inactive
    return counts


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
        n /= 1024
    return f"{n} {unit}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _ring_spare(llm: LLM) -> int:
    """Ring slots past the window a generation's cache gets: the prompt cache keeps room to roll
    a kept reply's tail back."""
    return llm.prompt_cache.spare if llm.prompt_cache.capacity else 0


def describe(llm: LLM, context: int, show_tensors: bool = True) -> Iterator[str]:
    cfg, info = llm.config, llm.info
    yield f"model      {info.path} ({info.format}, family {cfg.family})"
    yield (f"shape      {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
           f"vocab {cfg.vocab_size}, window {cfg.sliding_window}, context {cfg.max_position_embeddings}")
    yield ""
    yield "layer  type     head_dim  kv_heads  kv            mlp     moe"
    for s in cfg.layers:
        kv = ("own" + (", K=V" if s.k_eq_v else "")) if s.owns_kv else f"from {s.kv_source}"
        yield (f"{s.index:>5}  {s.layer_type.value:<7}  {s.head_dim:>8}  {s.num_kv_heads:>8}  {kv:<12}  "
               f"{s.mlp_dim:>6}  {'yes' if s.moe else '-'}")
    yield ""
    counts = parameter_counts(cfg)
    yield "parameters " + ", ".join(f"{k} {_count(v)}" for k, v in counts.items())
    if llm.encoders is not None:
        towers = [(name, sum(p.numel() for p in module.parameters())) for name, module in llm.encoders.named_children()]
        yield "encoders   " + ", ".join(f"{name} {_count(n)}" for name, n in towers)
    elt = 4 if llm.model.dtype.itemsize == 4 else llm.model.dtype.itemsize
    per_token = kv_bytes_per_token(cfg, elt)
    yield (f"kv cache   {_human(per_token)} per token beyond the window (dtype {str(llm.model.dtype).removeprefix('torch.')}); "
           f"{_human(kv_cache_bytes(cfg, context, elt, spare=_ring_spare(llm)))} at {context} tokens")
    owners = sum(1 for s in cfg.layers if s.owns_kv)
    full = sum(1 for s in cfg.layers if s.owns_kv and s.layer_type is LayerType.FULL)
    yield f"           {owners} layers store KV ({full} full, {owners - full} sliding rings); {cfg.num_layers - owners} shared"
    mapped, resident = memory_tiers(llm)
    yield f"memory     {_human(resident)} resident weights, {_human(mapped)} memory-mapped (read on demand)"
    past = [f"--context {context} is past the model's {cfg.max_position_embeddings} positions: it cannot run "
            "that long"] if context > cfg.max_position_embeddings else []
    for warning in past + warnings(llm):
        yield f"warning    {warning}"
    if show_tensors:
        yield ""
        yield f"{'tensor':<48} {'type':<6} {'shape':<20} bytes"
        for name, type_name, shape, nbytes in info.tensors:
            yield f"{name:<48} {type_name:<6} {str(list(shape)):<20} {_human(nbytes)}"


def memory_tiers(llm: LLM) -> tuple[int, int]:
    """(bytes left memory-mapped, bytes of weights resident): the PLE table stays mapped."""
    model = llm.model
    mapped = 0
    if model.ple is not None and model.ple.table is not None:
        mapped = model.ple.table_nbytes()
    resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return mapped, resident


SAMPLE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Thanks."}]


SAMPLE_TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                                  "parameters": {"type": "object", "properties": {}}}}]


def template_warnings(info: ModelInfo) -> list[str]:
    """The shipped templates rendered (in the sandbox, under its limits) on a plain conversation,
    the "tool_use" one with a tool: one that breaks the sandbox, runs away or fails there breaks
    every chat (with tools)."""
    from .chat import ChatTemplateError, render_template

    out = []
    for template, tools, which in ((info.chat_template, None, "every chat"),
                                   (info.tool_template, SAMPLE_TOOLS, "every chat with tools")):
        try:
            if template is not None:
                render_template(template, SAMPLE_CHAT, tools=tools)
        except ChatTemplateError as e:
            out.append(f"{str(e).rstrip('.')} (on a plain conversation, so {which} fails)")
    if info.chat_template is None and info.tool_template is not None:
        out.append('its chat templates are named but none is "default": only chats with tools render')
    return out


def warnings(llm: LLM) -> list[str]:
    """Metadata defects behind runaway generation and broken chat."""
    out = []
    cfg, tok = llm.config, llm.tokenizer
    if not cfg.eos_ids or any(not 0 <= e < cfg.vocab_size for e in cfg.eos_ids):
        out.append(f"EOS id(s) {cfg.eos_ids} missing or outside the vocabulary: generation may never stop")
    turn_end = "<end_of_turn>" if cfg.family == "gemma3" else "<turn|>"
    if tok.token_to_id(turn_end) is None:
        out.append(f"no end-of-turn token {turn_end}: chat replies may never stop")
    if not llm.has_chat_template:
        rules = "Gemma 3's turn format" if cfg.family == "gemma3" else "spec 9 rules"
        out.append(f"no chat template in the file: chat uses gemmarun's own renderer ({rules})")
    else:
        out.extend(template_warnings(llm.info))
    if tok.vocab_size != cfg.vocab_size:
        out.append(f"tokenizer has {tok.vocab_size} tokens but the embedding has {cfg.vocab_size} rows")
    if llm.info.format == "gguf":
        from .loading.gguf import scan_nonfinite

        out.extend(scan_nonfinite(llm.info.path))
    return out
