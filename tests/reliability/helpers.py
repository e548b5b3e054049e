"""Shared pieces of the reliability tests: the three callbacks, a fit with a step recorder, event-file reading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback
from tests.helpers import StepRecorder, TinyModel, make_loader, read_scalars, trainer_kwargs

#: Three epochs of four batches: the length of every resume test.
STEPS_PER_EPOCH = 4
EPOCHS = 3
N_STEPS = STEPS_PER_EPOCH * EPOCHS


def sgd_cosine(lr: float = 0.05, total: int = N_STEPS) -> Callable[[], TinyModel]:
    """A model factory: SGD at momentum 0.9 under a per-step cosine lr, so every step has its own momentum."""

    def build() -> TinyModel:
        torch.manual_seed(0)
        return TinyModel(
            lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
            lambda opt: {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total), "interval": "step"},
        )

    return build


def make_callbacks(which: str) -> list[pl.Callback]:
    """``"beta"``, ``"monitor"``, ``"attribution"`` or ``"all"`` (the three together)."""
    made: dict[str, Callable[[], pl.Callback]] = {
        "beta": lambda: BetaMomentumCallback(),
        "monitor": lambda: DampingRegimeMonitor(),
        "attribution": lambda: LayerAttributionCallback(reference_batches=2),
    }
    names = list(made) if which == "all" else [which]
    return [made[name]() for name in names]


def tb_logger(root: Path) -> TensorBoardLogger:
    return TensorBoardLogger(root, name="tb", version=0)


def fit(
    root: Path,
    model: pl.LightningModule,
    callbacks: list[pl.Callback],
    ckpt_path: Any = None,
    loader: Any = None,
    **overrides: Any,
) -> tuple[pl.Trainer, StepRecorder]:
    """One tiny CPU fit with a TensorBoard logger and a :class:`StepRecorder` listed last."""
    recorder = StepRecorder()
    overrides.setdefault("logger", tb_logger(root))
    trainer = pl.Trainer(**trainer_kwargs(root, callbacks=[*callbacks, recorder], **overrides))
    trainer.fit(model, loader if loader is not None else make_loader(), ckpt_path=ckpt_path)
    return trainer, recorder


def scalars(trainer: pl.Trainer) -> dict[str, list[tuple[int, float]]]:
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    return read_scalars(trainer.logger.log_dir)


def of(callbacks: list[pl.Callback], kind: type) -> Any:
    (found,) = [cb for cb in callbacks if isinstance(cb, kind)]
    return found
