"""Figures of the attribution artifact, drawn with matplotlib (the optional extra ``plot``).

:func:`attribution_heatmap` draws the mean gradient norm of each layer group over the run: group names on the
vertical axis, epochs (or, for a run of one epoch, the logging intervals) on the horizontal one, and a colour scale
of ``log10`` of the norm. The figure is a plain ``matplotlib.figure.Figure`` (no pyplot state), which loggers take
as it is (``SummaryWriter.add_figure``, ``MlflowClient.log_figure``, ``wandb.Image``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from lightning_beta.artifact import AttributionArtifact


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (``pip install lightning-beta[plot]``)."""
    return importlib.util.find_spec("matplotlib") is not None


def heatmap_rows(artifact: AttributionArtifact) -> tuple[str, list[str], list[list[float | None]]]:
    """What the heatmap shows: ``(axis label, column labels, one row of mean norms per group)``.

    The per-epoch history when the run has two epochs or more, else the logging intervals (labelled by their last
    optimizer step), else the single epoch.

    Example:
        >>> from lightning_beta.artifact import GroupTotals
        >>> t = GroupTotals(1.0, 1.0, 1.0, 1, 0)
        >>> art = AttributionArtifact({"a": 1, "b": 2}, {}, [0], [[1.0, 2.0]], [2.2], {"a": t, "b": t}, t,
        ...     interval_steps=[4, 9], interval_history=[[1.0, 3.0], [1.0, None]])
        >>> heatmap_rows(art)
        ('optimizer step', ['4', '9'], [[1.0, 1.0], [3.0, None]])
    """
    if len(artifact.history) < 2 and len(artifact.interval_history) >= 2:
        label, columns, rows = "optimizer step", artifact.interval_steps, artifact.interval_history
    else:
        label, columns, rows = "epoch", artifact.history_epochs, artifact.history
    by_group = [[row[g] for row in rows] for g in range(len(artifact.groups))]
    return label, [str(c) for c in columns], by_group


def attribution_heatmap(artifact: AttributionArtifact, title: str | None = None) -> Any:
    """The heatmap of ``log10`` of each group's mean gradient norm, as a ``matplotlib.figure.Figure``.

    Missing values (no finite norm) are left blank. The colour bar is labelled with the norm type.

    Args:
        artifact: the attribution artifact.
        title: the figure title. Defaults to ``None`` (one naming the norm and the step count).

    Raises:
        ModuleNotFoundError: if matplotlib is not installed.

    Example:
        >>> from lightning_beta.artifact import GroupTotals
        >>> t = GroupTotals(1.0, 1.0, 1.0, 2, 0)
        >>> art = AttributionArtifact({"body": 10, "head": 2}, {}, [0, 1], [[1.0, 0.1], [0.5, None]], [1.0, 0.5],
        ...     {"body": t, "head": t}, t)
        >>> fig = attribution_heatmap(art)
        >>> [label.get_text() for label in fig.axes[0].get_yticklabels()]
        ['body', 'head']
        >>> fig.axes[0].get_xlabel(), fig.axes[1].get_ylabel()
        ('epoch', 'log10 mean gradient L2 norm')
    """
    from matplotlib.figure import Figure

    axis, columns, rows = heatmap_rows(artifact)
    values = [[math.log10(v) if v is not None and v > 0 and math.isfinite(v) else math.nan for v in r] for r in rows]
    names = list(artifact.groups)
    width = min(12.0, 3.0 + 0.5 * max(1, len(columns)))
    height = min(12.0, 1.5 + 0.35 * max(1, len(names)))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), names)
    step = max(1, math.ceil(len(columns) / 20))  # at most ~20 tick labels
    ax.set_xticks(range(0, len(columns), step), columns[::step])
    ax.set_xlabel(axis)
    ax.set_ylabel("layer group")
    fig.colorbar(image, ax=ax, label=f"log10 mean gradient L{artifact.norm_type:g} norm")  # L2, L1, Linf
    ax.set_title(title if title is not None else f"Gradient norm per layer group ({artifact.global_step} steps)")
    return fig
