"""The package's Lightning callbacks, one per module."""

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor, EpochDamping
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback

__all__ = ["BetaMomentumCallback", "DampingRegimeMonitor", "EpochDamping", "LayerAttributionCallback"]
