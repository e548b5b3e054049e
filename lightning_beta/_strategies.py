"""Private: which Lightning strategies shard parameters (a rank then holds only a shard of each gradient)."""

from __future__ import annotations

import sys
from typing import Any

_SHARDED_NAMES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def sharded_strategy_types() -> tuple[type, ...]:
    """The sharding strategy classes of ``lightning`` and, when the user imported it, of ``pytorch_lightning``."""
    import lightning.pytorch.strategies as strategies

    modules = [strategies]
    legacy = sys.modules.get("pytorch_lightning.strategies")
    if legacy is not None:
        modules.append(legacy)
    return tuple(getattr(m, name) for m in modules for name in _SHARDED_NAMES if hasattr(m, name))


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters, so that per-rank gradients are shards.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
        >>> is_sharded(DDPStrategy()), is_sharded(ModelParallelStrategy())
        (False, True)
    """
    return isinstance(strategy, sharded_strategy_types())
