"""lightning_beta: Lightning callbacks from a physics reading of momentum SGD.

The math (:mod:`lightning_beta.functional`) is pure torch. The callbacks, which need Lightning, are imported on
first use, so ``import lightning_beta.functional`` loads no Lightning module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_beta.__about__ import __version__
from lightning_beta._optim import register_momentum
from lightning_beta.functional import DampingRegime, classify_regime, critical_momentum, damping_ratio

if TYPE_CHECKING:
    from lightning_beta.callbacks import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback

_LAZY = {
    "BetaMomentumCallback": "lightning_beta.callbacks",
    "DampingRegimeMonitor": "lightning_beta.callbacks",
    "LayerAttributionCallback": "lightning_beta.callbacks",
}

__all__ = [
    "BetaMomentumCallback",
    "DampingRegime",
    "DampingRegimeMonitor",
    "LayerAttributionCallback",
    "__version__",
    "classify_regime",
    "critical_momentum",
    "damping_ratio",
    "register_momentum",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the callbacks (and Lightning with them) load when first asked for.
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_beta' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
