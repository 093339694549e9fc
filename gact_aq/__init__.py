"""gact_aq: architecture-agnostic activation-compressed training with Average Quantization.

    import gact_aq
    gact_aq.set_optimization_level("L2.2", bit=1.25, aq_bit=0.5)
    from gact_aq.controller import Controller
"""
from .settings import (OPTIMIZATION_LEVELS, QuantizationConfig, config, set_adapt_interval,
                       set_optimization_level)

__all__ = ["OPTIMIZATION_LEVELS", "QuantizationConfig", "config", "set_adapt_interval",
           "set_optimization_level"]
