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
from .linear import QuantEmbedding, QuantLinear, RowStack, project, stack_rows, stacked

__all__ = [
    "FORMATS",
    "SUPPORTED_TYPE_NAMES",
    "BlockFormat",
    "Decoded",
    "QuantEmbedding",
    "QuantExperts",
    "QuantLinear",
    "RowStack",
    "UnsupportedQuantType",
    "dequantize",
    "get_format",
    "project",
    "stack_rows",
    "stacked",
    "type_name",
]
