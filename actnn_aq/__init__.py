"""actnn_aq: ActNN-style layer replacement with Average Quantization.

    import actnn_aq
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    model = actnn_aq.QModule(model)

How it works and where it differs from ActNN and ActNN-AQ: docs/frameworks.md.
"""
from .settings import LEVELS, QuantizationConfig, config, set_optimization_level
from .dataloader import DataLoader
from .layers import (
    QAvgPool2d, QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QConv1d, QConv2d, QConv3d, QConvTranspose1d,
    QConvTranspose2d, QConvTranspose3d, QDropout, QGELU, QLayer, QLayerNorm, QLinear, QMaxPool2d, QReLU, QSiLU,
    QSyncBatchNorm,
)
from .qmodule import QModule
from .scheme import Controller

__all__ = [
    "Controller", "DataLoader", "LEVELS", "QAvgPool2d", "QBatchNorm1d", "QBatchNorm2d", "QBatchNorm3d",
    "QConv1d", "QConv2d", "QConv3d", "QConvTranspose1d", "QConvTranspose2d", "QConvTranspose3d", "QDropout",
    "QGELU", "QLayer", "QLayerNorm", "QLinear", "QMaxPool2d", "QModule", "QReLU", "QSiLU", "QSyncBatchNorm",
    "QuantizationConfig", "config", "set_optimization_level",
]
