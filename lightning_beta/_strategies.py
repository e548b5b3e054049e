"""Private: which Lightning strategies shard parameters (a rank then sees only a shard of each gradient)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

#: Strategies under which a rank holds a shard of each parameter and gradient.
SHARDED_STRATEGIES: tuple[type, ...] = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters, so that per-rank norms or differences would be of shards."""
    return isinstance(strategy, SHARDED_STRATEGIES)
