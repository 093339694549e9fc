"""aqcore: the shared engine of activation compression with Average Quantization.

Pure functions over tensors plus one format dataclass; no framework knowledge.
"""
from .api import compress, decompress, pack_mask
from .errors import ERROR_LEVELS, level_errors
from .format import CompressedTensor
from .levels import LEVELS, QUANTIZED_LEVELS, Level, aq_level, parse_level
from .solver import allocate_bits, lower_bound, published_errors

__all__ = [
    "CompressedTensor", "ERROR_LEVELS", "LEVELS", "Level", "QUANTIZED_LEVELS", "allocate_bits",
    "aq_level", "compress", "decompress", "level_errors", "lower_bound", "pack_mask",
    "parse_level", "published_errors",
]
