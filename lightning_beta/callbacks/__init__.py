"""The package's Lightning callbacks, one per module."""

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback

__all__ = ["BetaMomentumCallback"]
