"""aqcore: the shared engine of activation compression with Average Quantization.

Pure functions over tensors plus one format dataclass; no framework knowledge.
"""
from .api import compress, decompress, pack_mask
from .format import CompressedTensor
from .levels import LEVELS, QUANTIZED_LEVELS, Level, aq_level, parse_level

__all__ = [
    "CompressedTensor", "LEVELS", "Level", "QUANTIZED_LEVELS", "aq_level", "compress",
    "decompress", "pack_mask", "parse_level",
]
