"""The model's math: the text decoder and its parts."""

from .text import TextModel

__all__ = ["TextModel"]
