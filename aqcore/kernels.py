"""CUDA kernels for compress_rows / decompress_rows (same signatures as reference.py)."""
from __future__ import annotations


def available() -> bool:
    """Whether the CUDA extension is built and loadable here."""
    return False
