"""lightning_beta: Lightning callbacks from a physics reading of momentum SGD."""

from lightning_beta.__about__ import __version__
from lightning_beta.callbacks import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback
from lightning_beta.functional import DampingRegime, classify_regime, critical_momentum, damping_ratio

__all__ = [
    "BetaMomentumCallback",
    "DampingRegime",
    "DampingRegimeMonitor",
    "LayerAttributionCallback",
    "__version__",
    "classify_regime",
    "critical_momentum",
    "damping_ratio",
]
