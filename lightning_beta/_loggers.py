"""Private: send scalars to the Trainer's loggers from callback hooks, and find the TensorBoard writer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger


def is_logging_step(trainer: pl.Trainer, every_n_steps: int | None = None) -> bool:
    """Whether the optimizer step about to run (index ``trainer.global_step``) is one to log.

    Steps are logged when ``(global_step + 1)`` is a multiple of ``every_n_steps`` (default: the Trainer's
    ``log_every_n_steps``), matching when ``self.log`` writes, and always on the first step so short runs show a
    point.
    """
    every = getattr(trainer, "log_every_n_steps", 50) if every_n_steps is None else every_n_steps
    step = trainer.global_step
    return step == 0 or (step + 1) % max(every, 1) == 0


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger of the Trainer (loggers write on rank zero only)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def tensorboard_experiment(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the first ``TensorBoardLogger``, or ``None`` when there is none."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


# Each TensorBoard run holds one custom-scalars layout (the plugin reads the latest), so categories from several
# callbacks are merged here, per log directory, and the whole layout is written again when one is added.
_LAYOUTS: dict[str, dict[str, dict[str, list[Any]]]] = {}


def add_layout_category(trainer: pl.Trainer, title: str, charts: Mapping[str, list[Any]]) -> bool:
    """Add a custom-scalars category to the run's layout (rank zero, TensorBoard only).

    Args:
        trainer: the Trainer whose first ``TensorBoardLogger`` receives the layout.
        title: category title, e.g. ``"Damping"``.
        charts: chart title to ``["Multiline", [tag regexes]]`` or ``["Margin", [value, lower, upper]]``, the
            format of ``SummaryWriter.add_custom_scalars``.

    Returns:
        ``False`` when the Trainer has no ``TensorBoardLogger`` (nothing written), else ``True``.
    """
    writer = tensorboard_experiment(trainer)
    if writer is None:
        return False
    if not trainer.is_global_zero:
        return True
    layout = _LAYOUTS.setdefault(str(writer.get_logdir()), {})
    layout[title] = {name: list(chart) for name, chart in charts.items()}
    writer.add_custom_scalars(layout)
    return True
