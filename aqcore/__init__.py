"""aqcore: the shared engine of activation compression with Average Quantization.

Pure functions over tensors plus one format dataclass; no framework knowledge.
"""
from .allocate import allocate_rows
from .api import compress, compress_allocated, decompress, level_errors, pack_mask, sample_rows
from .errors import ERROR_LEVELS
from .format import CompressedTensor
from .levels import LEVELS, QUANTIZED_LEVELS, ZERO_LEVELS, Level, aq_level, parse_level, zero_safe
from .solver import allocate_bits, lower_bound, published_errors

__all__ = [
    "CompressedTensor", "ERROR_LEVELS", "LEVELS", "Level", "QUANTIZED_LEVELS", "allocate_bits",
    "allocate_rows", "aq_level", "compress", "compress_allocated", "decompress", "level_errors",
    "lower_bound", "pack_mask", "parse_level", "published_errors", "sample_rows", "ZERO_LEVELS",
    "zero_safe",
]
