"""Private: where LayerAttributionCallback's artifact and panels go, for each logger in use (rank zero only).

- The artifact file lands in the directory of the run of the Trainer's first logger, as ``ModelCheckpoint`` places
  its checkpoints: ``logger.log_dir`` where the logger has one (TensorBoard, CSV), else
  ``save_dir/name/version`` (MLflow: ``mlruns/<experiment id>/<run id>``; W&B: ``<save_dir>/<project>/<run id>``),
  ``default_root_dir`` without a logger. So two runs never write the same file.
- Loggers with an artifact store also get the file there, and the probe file it names: MLflow
  (``MlflowClient.log_artifact`` into the run) and W&B (``run.save``).
- The heatmap figure and the ranking table go through each logger's own API: TensorBoard (``add_figure``,
  ``add_text``), MLflow (``log_figure``, ``log_text``), W&B (``log_image``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_beta._tensorboard import tensorboard_experiment
from lightning_beta.artifact import AttributionArtifact
from lightning_beta.figures import attribution_heatmap, matplotlib_available


def _logger_types(name: str) -> tuple[type, ...]:
    """``lightning``'s logger class ``name`` and, when the user imported it, ``pytorch_lightning``'s."""
    import lightning.pytorch.loggers as loggers

    types = [getattr(loggers, name)]
    legacy = sys.modules.get("pytorch_lightning.loggers")
    if legacy is not None and hasattr(legacy, name):
        types.append(getattr(legacy, name))
    return tuple(types)


def _is(logger: Any, name: str) -> bool:
    """Whether ``logger`` is a ``lightning`` or ``pytorch_lightning`` logger of class ``name`` (or a subclass)."""
    return isinstance(logger, _logger_types(name))


def artifact_directory(trainer: Any) -> Path:
    """The directory of the run of the Trainer's first logger (see the module docstring); call it on every rank.

    The path is computed on every rank and rank zero's is broadcast, since non-zero ranks' loggers have no run.
    """
    path = Path(trainer.default_root_dir)
    if trainer.loggers:
        logger = trainer.loggers[0]
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, str) and log_dir:
            path = Path(log_dir)
        else:
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            path = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version
    return Path(trainer.strategy.broadcast(str(path)))


def publish_artifact(trainer: Any, path: Path, probe_path: str | None = None) -> None:
    """Hand the artifact file, and the probe file it names, to the loggers that keep artifacts (MLflow, W&B)."""
    for file in [path] + ([path.parent / probe_path] if probe_path else []):
        _publish(trainer, file)


def _publish(trainer: Any, path: Path) -> None:
    for logger in trainer.loggers:
        try:
            if _is(logger, "MLFlowLogger"):
                logger.experiment.log_artifact(logger.run_id, str(path))
            elif _is(logger, "WandbLogger"):
                logger.experiment.save(str(path), base_path=str(path.parent), policy="now")
        except Exception as err:  # a tracking server that is down must not fail the end of a fit
            rank_zero_warn(
                f"LayerAttributionCallback: could not hand {str(path)!r} to {type(logger).__name__} ({err}); the file"
                " is written."
            )


def log_panels(trainer: Any, artifact: AttributionArtifact) -> None:
    """Log the heatmap figure and the ranking table through each logger's API (rank zero)."""
    ranking = artifact.ranking_markdown()
    figure = None
    wants_figure = tensorboard_experiment(trainer) is not None or any(
        _is(logger, "MLFlowLogger") or _is(logger, "WandbLogger") for logger in trainer.loggers
    )
    if wants_figure and (artifact.history or artifact.interval_history):
        if matplotlib_available():
            figure = attribution_heatmap(artifact)
        else:
            rank_zero_info(
                "LayerAttributionCallback: matplotlib is not installed, so the heatmap is not logged"
                " (`pip install lightning-beta[plot]`)."
            )
    writer = tensorboard_experiment(trainer)
    if writer is not None:
        if figure is not None:
            writer.add_figure("attribution/heatmap", figure, trainer.global_step, close=False)
        writer.add_text("attribution/ranking", ranking, trainer.global_step)
        writer.flush()
    for logger in trainer.loggers:
        if _is(logger, "MLFlowLogger"):
            if figure is not None:
                logger.experiment.log_figure(logger.run_id, figure, "attribution_heatmap.png")
            logger.experiment.log_text(logger.run_id, ranking, "attribution_ranking.md")
        elif _is(logger, "WandbLogger") and figure is not None:
            logger.log_image("attribution/heatmap", [figure])
