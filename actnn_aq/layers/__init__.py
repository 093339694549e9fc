"""Q-layers: torch.nn layers with the same constructor and forward, saving less for backward."""
from .activation import QDropout, QGELU, QReLU, QSiLU
from .base import QLayer
from .conv import QConv1d, QConv2d, QConv3d, QConvTranspose1d, QConvTranspose2d, QConvTranspose3d, QLinear
from .norm import QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QLayerNorm, QSyncBatchNorm
from .pool import QAvgPool2d, QMaxPool2d

__all__ = [
    "QAvgPool2d", "QBatchNorm1d", "QBatchNorm2d", "QBatchNorm3d", "QConv1d", "QConv2d", "QConv3d",
    "QConvTranspose1d", "QConvTranspose2d", "QConvTranspose3d", "QDropout", "QGELU", "QLayer", "QLayerNorm",
    "QLinear", "QMaxPool2d", "QReLU", "QSiLU", "QSyncBatchNorm",
]
