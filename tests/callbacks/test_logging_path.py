"""The three callbacks together on Lightning's one logging path.

BetaMomentumCallback, DampingRegimeMonitor and LayerAttributionCallback log through ``LightningModule.log``, so
their step metrics are written exactly on the steps (and in the rows) of the user's own ``self.log``, their
metrics reach ``trainer.callback_metrics`` for ``EarlyStopping`` and ``ModelCheckpoint``, and they work the same
under the standalone ``pytorch_lightning`` package.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from tests.helpers import TinyModel, make_loader, read_scalars, trainer_kwargs

#: One per-step key of each callback.
STEP_KEYS = {"beta": "beta/momentum", "damping": "damping/zeta", "attribution": "grad_norm/total"}
N_STEPS = 60  # 6 epochs of 10 batches: log_every_n_steps=50 writes once


def three(tmp_path: Path) -> list[Any]:
    return [BetaMomentumCallback(), DampingRegimeMonitor(), LayerAttributionCallback(dirpath=tmp_path / "attr")]


def model() -> TinyModel:
    def sgd(m: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    return TinyModel(sgd, lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 5), "interval": "step"})


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with (Path(logger.log_dir) / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module", params=[0, 1, 3, 50])
def fitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit per ``log_every_n_steps`` with all three callbacks, a TensorBoardLogger and a CSVLogger."""
    every = request.param
    tmp_path = tmp_path_factory.mktemp(f"every{every}")
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            logger=[tb, csv_logger],
            callbacks=three(tmp_path),
            max_epochs=6,
            limit_train_batches=10,
            log_every_n_steps=every,
        )
    )
    trainer.fit(model(), make_loader(n=80))
    return {"every": every, "scalars": read_scalars(tb.log_dir), "rows": csv_rows(csv_logger)}


@pytest.mark.parametrize("callback", list(STEP_KEYS))
def test_tensorboard_steps_are_the_users(fitted: dict[str, Any], callback: str) -> None:
    scalars, every = fitted["scalars"], fitted["every"]
    user = [step for step, _ in scalars.get("train_loss", [])]
    assert len(user) == (N_STEPS // every if every else 0)
    assert [step for step, _ in scalars.get(STEP_KEYS[callback], [])] == user


@pytest.mark.parametrize("callback", list(STEP_KEYS))
def test_csv_rows_are_the_users(fitted: dict[str, Any], callback: str) -> None:
    rows, key = fitted["rows"], STEP_KEYS[callback]
    user = [int(r["step"]) for r in rows if r.get("train_loss")]
    assert len(user) == len(set(user)), "one CSV row per step"
    assert [int(r["step"]) for r in rows if r.get(key)] == user
    for row in rows:
        if row.get(key):
            assert row["train_loss"], f"{key} shares the row of the user's own self.log"


def test_csv_has_one_row_per_step_and_one_per_epoch(fitted: dict[str, Any]) -> None:
    rows = fitted["rows"]
    step_rows = [r for r in rows if any(r.get(key) for key in STEP_KEYS.values())]
    assert len(step_rows) == len({r["step"] for r in step_rows})
    epoch_rows = [r for r in rows if r.get("damping/epoch_zeta")]
    assert len(epoch_rows) == 6


def test_early_stopping_on_the_epoch_zeta(tmp_path: Path) -> None:
    # Constant lr, momentum set critical by BetaMomentumCallback: the epoch zeta stays 1, so EarlyStopping stops
    # after `patience` epochs.
    stopper = EarlyStopping(monitor="damping/epoch_zeta", mode="min", patience=1, min_delta=1e-3)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path), callbacks=[*three(tmp_path), stopper], max_epochs=10)
    )
    trainer.fit(TinyModel(lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)), make_loader())
    assert stopper.stopped_epoch == 1 and trainer.current_epoch == 2
    assert trainer.callback_metrics["damping/epoch_zeta"].item() == pytest.approx(1.0, rel=1e-6)


def test_model_checkpoint_on_the_total_gradient_norm(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="grad_norm/total", mode="min", save_top_k=1)
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            logger=CSVLogger(tmp_path),
            callbacks=[*three(tmp_path), checkpoint],
            max_epochs=3,
            enable_checkpointing=True,
        )
    )
    trainer.fit(model(), make_loader())
    assert checkpoint.best_model_path and Path(checkpoint.best_model_path).exists()
    assert torch.isfinite(torch.as_tensor(checkpoint.best_model_score))
    assert "grad_norm/total" in trainer.callback_metrics


# ------------------------------------------------------------------ the standalone pytorch_lightning package


def test_pytorch_lightning_namespace(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import TensorBoardLogger as PLTensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    class PLModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.head = nn.Linear(16, 2)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.head(self.body(x)), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    callbacks = three(tmp_path)
    logger = PLTensorBoardLogger(tmp_path, name="pl")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=callbacks, max_epochs=2))
    trainer.fit(PLModel(), make_loader())

    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for key in STEP_KEYS.values():
        assert key in tags["scalars"]
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    expected = {
        title for cb in callbacks if hasattr(cb, "tensorboard_charts") for title in cb.tensorboard_charts(trainer)
    }
    assert {"Damping", "Layer attribution"} <= expected
    assert {c.title for c in layout.category} == expected
    assert "damping/summary/text_summary" in tags["tensors"]
    assert "attribution/ranking/text_summary" in tags["tensors"]
    pytest.importorskip("matplotlib")
    assert "attribution/heatmap" in tags["images"]


def test_is_sharded_knows_pytorch_lightning_fsdp() -> None:
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.strategies import FSDPStrategy

    from lightning_beta._strategies import is_sharded

    assert is_sharded(FSDPStrategy())
