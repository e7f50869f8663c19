"""Load a Hugging Face model folder (config.json, safetensors, tokenizer.json, chat template)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, config_from_file, load_hf_config, read_json_object
from ..llm import LLM, ModelInfo
from ..model.gemma3_vision import gemma3_media_config_from_hf
from ..model.multimodal import multimodal_config_from_hf
from ..model.unified import unified_config_from_hf
from ..tokenizer import Tokenizer
from .build import build_encoders, build_text_model
from .errors import LoadError
from .names import HF_TEXT_PREFIXES, map_hf_names, map_hf_tower_names, sanitize_gemma3
from .safetensors import read_folder

_TYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def read_chat_template(folder: Path) -> tuple[str | None, str | None]:
    """The checkpoint's templates (default, tool_use), in transformers' order: chat_template.jinja,
    else the field of chat_template.json (the processor's file, which Gemma 3's multimodal repos
    ship), else tokenizer_config.json's. A list of named templates gives its "default" and its
    "tool_use" (which transformers renders prompts with tools with)."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():  # transformers 5 writes named ones beside it: additional_chat_templates/NAME.jinja
        tool_use = folder / "additional_chat_templates" / "tool_use.jinja"
        return _read_text(jinja), _read_text(tool_use) if tool_use.is_file() else None
    for config in (folder / "chat_template.json", folder / "tokenizer_config.json"):
        if not config.exists():
            continue
        template = read_json_object(config, LoadError).get("chat_template")
        if isinstance(template, list):  # named templates
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), str)}
            if not all(isinstance(t, str) for t in named.values()):
                raise LoadError(f"{config}: a named chat template is not a string")
            if named.get("default") is not None or named.get("tool_use") is not None:
                return named.get("default"), named.get("tool_use")
            template = None
        if template is not None and not isinstance(template, str):
            raise LoadError(f"{config}: chat_template must be a string or a list of named templates")
        if template is not None:
            return template, None
    return None, None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(f"{path}: not UTF-8 text ({e})") from None


# What a model folder is read from (the weights aside: every *.safetensors).
FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                "model.safetensors.index.json")


def check_regular(file: Path) -> None:
    """A FIFO or a device where a file is read would block its reader forever, or never end."""
    if file.exists() and not file.is_file() and not file.is_dir():
        raise LoadError(f"{file}: not a regular file")


def check_folder_files(folder: Path) -> None:
    for file in [folder / name for name in FOLDER_FILES] + sorted(folder.glob("*.safetensors")):
        check_regular(file)


def check_tied_head(tensors: dict[str, torch.Tensor]) -> None:
    """Gemma ties its head to the token table; a checkpoint may still store `lm_head.weight`,
    which transformers then uses where it differs. Refused unless it is the table itself."""
    head = tensors.get("lm_head.weight")
    if head is None:
        return
    table = next((tensors[p + "embed_tokens.weight"] for p in HF_TEXT_PREFIXES if p + "embed_tokens.weight" in tensors),
                 None)
    rows = 4096  # compared a block of rows at a time: no float copy of a whole table
    same = table is not None and head.shape == table.shape and all(
        torch.equal(head[i : i + rows].float(), table[i : i + rows].float()) for i in range(0, head.shape[0], rows))
    if not same:
        raise LoadError("lm_head.weight differs from the token table (embed_tokens.weight): an untied head "
                        "is not supported (Gemma ties its head)")


def media_config_from_hf(raw: dict):
    """The towers' config of any multimodal config.json (gemma4, gemma4_unified, gemma3); None for
    a text-only model."""
    return multimodal_config_from_hf(raw) or unified_config_from_hf(raw) or gemma3_media_config_from_hf(raw)


def load_hf_folder(folder: Path, dtype: torch.dtype, device: torch.device) -> LLM:
    check_folder_files(folder)
    cfg = load_hf_config(folder)
    mm_cfg = config_from_file(folder / "config.json", media_config_from_hf)  # before any weight is read
    if mm_cfg is not None:
        try:
            mm_cfg.tokens.check(cfg.vocab_size)
        except ConfigError as e:  # (as config_from_file names the file)
            raise ConfigError(f"{folder / 'config.json'}: {e}") from None
    # The tokenizer before the weights: building it briefly takes more memory than it keeps.
    if not (folder / "tokenizer.json").exists():
        raise LoadError(f"{folder}: no tokenizer.json")
    tokenizer = Tokenizer.from_hf_folder(folder)
    tensors = read_folder(folder)
    check_tied_head(tensors)
    state, _ignored = map_hf_names(tensors, cfg)
    if cfg.family == "gemma3":
        state = sanitize_gemma3(state, cfg)
    model = build_text_model(cfg, state, dtype=dtype, device=device)
    encoders = None
    if mm_cfg is not None:
        encoders = build_encoders(mm_cfg, cfg, map_hf_tower_names(tensors), dtype=dtype, device=device)
    table = [
        (name, _TYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape), t.numel() * t.element_size())
        for name, t in sorted(tensors.items())
    ]
    template, tool_template = read_chat_template(folder)
    info = ModelInfo(path=folder, format="safetensors", chat_template=template, tensors=table,
                     tool_template=tool_template)
    return LLM(model, tokenizer, info, encoders)
