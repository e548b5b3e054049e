"""Private: what the package writes to TensorBoard beyond scalars (custom-scalars layout, images, text).

Rank zero only, and only when a ``TensorBoardLogger`` is attached, from the ``lightning`` or the
``pytorch_lightning`` namespace.
"""

from __future__ import annotations

import sys
from typing import Any


def _tensorboard_logger_types() -> tuple[type, ...]:
    from lightning.pytorch.loggers import TensorBoardLogger

    types: list[type] = [TensorBoardLogger]
    # The standalone ``pytorch_lightning`` package has its own class; it is looked up only when the user imported
    # it, so the package never imports it itself.
    legacy = sys.modules.get("pytorch_lightning.loggers")
    if legacy is not None and hasattr(legacy, "TensorBoardLogger"):
        types.append(legacy.TensorBoardLogger)
    return tuple(types)


def tensorboard_experiment(trainer: Any) -> Any | None:
    """The ``SummaryWriter`` of the Trainer's first ``TensorBoardLogger``, or ``None`` when there is none."""
    types = _tensorboard_logger_types()
    for logger in trainer.loggers:
        if isinstance(logger, types):
            return getattr(logger, "experiment", None)
    return None


def write_layout(trainer: Any) -> bool:
    """Write the custom-scalars layout of every package callback of the Trainer (rank zero, TensorBoard only).

    A TensorBoard run holds one layout (the plugin reads the latest), so the layout is rebuilt from all callbacks
    that define ``tensorboard_charts(trainer) -> {category: {chart title: chart}}`` and written whole; no state is
    kept between fits. A chart is ``["Multiline", [tag regexes]]`` or ``["Margin", [value, lower, upper]]``, the
    format of ``SummaryWriter.add_custom_scalars``.

    Returns:
        ``False`` when the Trainer has no ``TensorBoardLogger`` (nothing written), else ``True``.
    """
    writer = tensorboard_experiment(trainer)
    if writer is None:
        return False
    if not trainer.is_global_zero:
        return True
    layout: dict[str, dict[str, list[Any]]] = {}
    for callback in trainer.callbacks:
        charts = getattr(callback, "tensorboard_charts", None)
        if callable(charts):
            for title, category in charts(trainer).items():
                layout.setdefault(title, {}).update({name: list(chart) for name, chart in category.items()})
    if layout:
        writer.add_custom_scalars(layout)
    return True
