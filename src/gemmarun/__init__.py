"""gemmarun: a complete, local, exact runtime for Gemma 4 (and Gemma 3)."""

from .config import ConfigError, LayerSpec, LayerType, TextConfig
from .constrain import Grammar
from .llm import LLM
from .loading import LoadError, load
from .prompt_cache import PromptCache
from .sampling import SamplingParams

__all__ = ["LLM", "ConfigError", "Grammar", "LayerSpec", "LayerType", "LoadError", "PromptCache", "SamplingParams",
           "TextConfig", "load"]
__version__ = "0.1.0"
