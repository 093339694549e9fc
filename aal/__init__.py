"""aal: auxiliary activation learning layers (ARA for convolutions, ASA for linears)."""
from .aal import Conv2d_ARA, Distribute_ARA, Linear_ASA, learning_indicator

__all__ = ["Conv2d_ARA", "Distribute_ARA", "Linear_ASA", "learning_indicator"]
