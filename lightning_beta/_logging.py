"""Private: the one logging path of the package's callbacks, which is Lightning's own.

Every metric goes through ``LightningModule.log_dict``, so ``log_every_n_steps`` (0 included), the step axis,
``trainer.callback_metrics`` (``EarlyStopping``, ``ModelCheckpoint``), the progress bar, the loggers and one CSV row
per step behave exactly as for the user's own ``self.log``. Tensors are handed over as they are: Lightning copies
them to the host when it writes.

``self.log`` costs tens of microseconds per key, too much for every optimizer step, so per-step metrics are handed
over only on the steps Lightning will write, as Lightning decides them (:func:`is_logging_step`), and the values
in between are accumulated on the device by the callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def is_logging_step(trainer: Any) -> bool:
    """Whether Lightning writes step metrics at the end of the current batch.

    This is the Trainer's own predicate (``log_every_n_steps``, 0 meaning never, counted in batches that stepped,
    as the x-axis of ``self.log``), plus ``fast_dev_run``, for which Lightning writes every step. Valid from
    ``on_train_batch_start`` to ``on_train_batch_end`` of a training batch, and so in ``on_before_optimizer_step``
    and in an optimizer step hook.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> is_logging_step(Trainer(log_every_n_steps=0, logger=False))
        False
    """
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return False
    return bool(connector.should_update_logs) or bool(getattr(trainer, "fast_dev_run", False))


def log_step(pl_module: Any, metrics: Mapping[str, Tensor | float], prog_bar: bool = False) -> None:
    """Hand per-step metrics to Lightning (``on_step=True``), from a hook or step hook of a training batch."""
    if metrics:
        pl_module.log_dict(dict(metrics), on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=1)


def log_epoch(pl_module: Any, metrics: Mapping[str, Tensor | float], prog_bar: bool = False) -> None:
    """Hand per-epoch metrics to Lightning (``on_epoch=True``), from ``on_train_epoch_end``.

    Lightning calls non-monitoring callbacks' ``on_train_epoch_end`` before ``EarlyStopping`` and
    ``ModelCheckpoint``, so these metrics are in ``callback_metrics`` when those check. With several processes the
    values are already equal on every rank (DDP averages gradients, sharded sums are reduced, the lr is shared), so
    ``sync_dist=True`` changes no value: it is what Lightning asks of epoch metrics in a distributed run, at one
    all-reduce per key and epoch, and it keeps ranks from ever disagreeing on a monitored value.
    """
    if metrics:
        distributed = pl_module.trainer.world_size > 1
        pl_module.log_dict(
            dict(metrics), on_step=False, on_epoch=True, prog_bar=prog_bar, batch_size=1, sync_dist=distributed
        )
