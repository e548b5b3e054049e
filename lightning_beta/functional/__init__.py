"""Pure torch math of the method: momentum rules, damping ratio and regimes. No Lightning import."""

from lightning_beta.functional.curvature import SecantCurvature, secant_curvature
from lightning_beta.functional.damping import DampingRegime, classify_regime, damping_ratio
from lightning_beta.functional.momentum import RULES, critical_momentum

__all__ = [
    "RULES",
    "DampingRegime",
    "SecantCurvature",
    "classify_regime",
    "critical_momentum",
    "damping_ratio",
    "secant_curvature",
]
