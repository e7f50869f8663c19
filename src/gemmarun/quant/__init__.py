"""GGML quantized tensors: exact block decoding and matmuls on the quantized form."""

from .formats import (
    FORMATS,
    SUPPORTED_TYPE_NAMES,
    BlockFormat,
    Decoded,
    UnsupportedQuantType,
    dequantize,
    get_format,
    type_name,
)
from .experts import QuantExperts
from .linear import QuantEmbedding, QuantLinear

__all__ = [
    "FORMATS",
    "SUPPORTED_TYPE_NAMES",
    "BlockFormat",
    "Decoded",
    "QuantEmbedding",
    "QuantExperts",
    "QuantLinear",
    "UnsupportedQuantType",
    "dequantize",
    "get_format",
    "type_name",
]
