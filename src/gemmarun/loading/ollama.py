"""Models in Ollama's local store, named as `ollama pull` names them: `ollama:gemma4:e2b`.

The store (`$OLLAMA_MODELS`, else `~/.ollama/models`, or the Linux service's
`/usr/share/ollama/.ollama/models`) keeps a manifest per name under
`manifests/<host>/<namespace>/<model>/<tag>` whose layers name content-addressed blobs under
`blobs/sha256-<hex>`: the GGUF (`application/vnd.ollama.image.model`) and, for models converted
by llama.cpp, a projector GGUF beside it (`...image.projector`, an mmproj). The template and
parameter, system and messages layers are Ollama's own (a Go template, its sampling defaults, a
default system prompt) and are not read: the GGUF's chat template or gemmarun's renderer formats
the chat. A model with an adapter layer (a LoRA) is refused rather than run as its base model.
Ollama's own Gemma 4 and Gemma 3 files hold their towers themselves (`mmproj.open_ollama_towers`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LoadError

PREFIX = "ollama:"
MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"  # a LoRA over the model: not applied, so refused
MAX_PART = 128  # Ollama's longest name part
DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(:[0-9]{1,5})?")  # a registry, maybe with its port
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class OllamaModel:
    """The files behind one name in the store."""

    name: str  # as given, without the prefix
    model: Path  # the GGUF blob
    projector: Path | None  # an mmproj blob, where the model has one


def is_ollama_name(path: str | Path | None) -> bool:
    """Whether `path` names a model of Ollama's store (`ollama:` and a name it could hold)."""
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return False
    try:
        manifest_parts(path[len(PREFIX):])
    except LoadError:
        return False
    return True


def store_roots() -> list[Path]:
    """Where Ollama keeps models: $OLLAMA_MODELS alone when set, else the user's and the service's."""
    env = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'").strip()  # as Ollama reads it
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def manifest_parts(name: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) of `model[:tag]`, `namespace/model[:tag]` or
    `host[:port]/namespace/model[:tag]` (a leading http:// or https:// dropped), with Ollama's
    defaults; LoadError for anything else."""
    bare = re.sub(r"^https?://", "", name)
    path, tag = bare, ""
    if bare.rfind(":") > bare.rfind("/"):  # the tag follows the last colon after the last slash
        path, tag = bare.rsplit(":", 1)
        if not tag:
            path = ""  # "gemma4:" names no tag
    parts = path.split("/")
    ok = 1 <= len(parts) <= 3 and all(_PART.fullmatch(p) and len(p) <= MAX_PART for p in parts[-2:])
    if len(parts) == 3:
        ok = ok and _HOST.fullmatch(parts[0]) is not None and len(parts[0]) <= MAX_PART
    if not ok or (tag and not (_PART.fullmatch(tag) and len(tag) <= MAX_PART)):
        raise LoadError(f"{PREFIX + name!r}: not an Ollama model name (model[:tag], e.g. {PREFIX}gemma4:e2b)")
    parts = [DEFAULT_HOST, DEFAULT_NAMESPACE][: 3 - len(parts)] + parts
    return parts[0], parts[1], parts[2], tag or DEFAULT_TAG


def display_name(name: str) -> str:
    """The name `ollama list` shows for `name`: its tag always, the default host and namespace not
    (`gemma4` -> `gemma4:latest`, `registry.ollama.ai/library/x:t` -> `x:t`)."""
    host, namespace, model, tag = manifest_parts(name)
    shown = [host, namespace, model] if host.lower() != DEFAULT_HOST else [namespace, model]
    if len(shown) == 2 and namespace.lower() == DEFAULT_NAMESPACE:
        shown = [model]
    return "/".join(shown) + f":{tag}"


def resolve(path: str) -> OllamaModel:
    """The blobs behind `ollama:NAME`: a LoadError naming what is missing where."""
    name = path[len(PREFIX):]
    parts = manifest_parts(name)
    roots = store_roots()
    manifest = next((m for m in (_find_manifest(root, parts) for root in roots) if m is not None), None)
    if manifest is None:
        where = " or ".join(str(r) for r in roots)
        raise LoadError(f"{path}: no such model in Ollama's store ({where}: no manifests/{'/'.join(parts)}); "
                        f"`ollama pull {name}` fetches it (set OLLAMA_MODELS if the store is elsewhere)")
    root = manifest.parents[4]
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        kinds = {layer["mediaType"]: layer["digest"] for layer in layers}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{manifest}: not an Ollama manifest ({type(e).__name__}: {e})") from None
    if MODEL_LAYER not in kinds:
        raise LoadError(f"{manifest}: the manifest names no model layer ({MODEL_LAYER})")

    def blob(digest: object) -> Path:
        m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
        if m is None:
            raise LoadError(f"{manifest}: layer digest {digest!r:.80} is not sha256:<64 hex digits>")
        file = root / "blobs" / f"sha256-{m.group(1)}"
        if not file.is_file():
            raise LoadError(f"{file}: the blob {path}'s manifest names is missing (an interrupted pull?)")
        return file

    if ADAPTER_LAYER in kinds:
        raise LoadError(f"{path}: the model has an adapter layer (a LoRA fine-tune, Ollama's ADAPTER), which gemmarun "
                        "does not apply: give it the merged model")
    projector = kinds.get(PROJECTOR_LAYER)
    return OllamaModel(name, blob(kinds[MODEL_LAYER]), blob(projector) if projector is not None else None)


def _find_manifest(root: Path, parts: tuple[str, str, str, str]) -> Path | None:
    """The manifest file under `root`, matching names case-insensitively as Ollama does."""
    here = root / "manifests"
    try:
        for part in parts:
            if not here.is_dir():
                return None
            exact = here / part
            if not exact.exists():  # names fold case, as Ollama matches them
                exact = next((p for p in here.iterdir() if p.name.lower() == part.lower()), exact)
            here = exact
        return here if here.is_file() else None
    except OSError as e:  # unreadable folders: say where
        raise LoadError(f"{here}: cannot read Ollama's store ({e.strerror or e})") from None
