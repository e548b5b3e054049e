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


def shards_flat(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters into per-rank flat buffers (FSDP1, DeepSpeed), not per tensor.

    Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) each parameter stays a tensor of its own (a
    ``DTensor``) whose shards can be summed over ranks; under the others a layer's gradient cannot be read at all.

    Example:
        >>> from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
        >>> shards_flat(FSDPStrategy()), shards_flat(ModelParallelStrategy())
        (True, False)
    """
    per_tensor = any(cls.__name__ == "ModelParallelStrategy" for cls in type(strategy).__mro__)
    return is_sharded(strategy) and not per_tensor
