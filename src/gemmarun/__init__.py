"""gemmarun: a complete, local, exact runtime for Gemma 4 (and Gemma 3)."""

import os

# torch's oneDNN (bfloat16/float16 matmuls on the CPU) keeps every new shape's primitive in two
# caches of 1024 entries, ~1 MiB a shape; decode's attention makes new shapes every token, so a
# bfloat16 generation grew by ~2 MiB a token (E2B) and a long-running server by gigabytes.
# Bounded here unless the user set them; oneDNN reads them when it is first used.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "32")

from .config import ConfigError, LayerSpec, LayerType, TextConfig
from .llm import LLM
from .loading import LoadError, load
from .sampling import SamplingParams

__all__ = ["LLM", "ConfigError", "LayerSpec", "LayerType", "LoadError", "SamplingParams", "TextConfig", "load"]
__version__ = "0.1.0"
