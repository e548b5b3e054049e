from __future__ import annotations

import contextlib
import csv
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_beta._logging import is_logging_step
from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor, EpochDamping
from lightning_beta.functional.damping import classify_regime
from tests.helpers import StepRecorder, TinyModel, make_loader, read_scalars, trainer_kwargs

TOL = 0.1


def cosine(t_max: int = 8) -> Any:
    return lambda opt: {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_max), "interval": "step"}


def sgd(lr: float = 0.01, momentum: float = 0.9) -> Any:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)


def fit(
    tmp_path: Path,
    callbacks: list[Any],
    model: LightningModule | None = None,
    logger: Any = True,
    loader: Any = None,
    **kwargs: Any,
) -> Trainer:
    if logger is True:
        logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=callbacks, **kwargs))
    trainer.fit(model or TinyModel(sgd(), cosine()), loader or make_loader())
    return trainer


def lr_by_step(recorder: StepRecorder, group: int = 0) -> dict[int, float]:
    return {s["global_step"]: s["groups"][group]["lr"] for s in recorder.steps}


def read_layout(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0])


def read_text(log_dir: str, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tolerance": 1.0}, ValueError, r"`tolerance` must be in \[0, 1\), got 1.0"),
        ({"tolerance": "0.1"}, TypeError, "`tolerance` must be a float, got str"),
        ({"rule": "exactly"}, ValueError, r"`rule` must be one of \('paper', 'exact'\), got 'exactly'"),
        ({"curvature": "hessian"}, ValueError, "`curvature` must be a positive float or \"secant\", got 'hessian'"),
        ({"curvature": -1.0}, ValueError, "`curvature` must be a finite number > 0, got -1.0"),
        ({"curvature": True}, TypeError, "`curvature` must be a positive float, got bool"),
        ({"logging_interval": "batch"}, ValueError, '`logging_interval` must be "step" or "epoch", got \'batch\''),
        ({"layout": 1}, TypeError, "`layout` must be a bool, got int"),
        ({"log": "yes"}, TypeError, "`log` must be a bool, got str"),
        ({"group_by": 0}, ValueError, "`group_by` as a module depth must be >= 1, got 0"),
        ({"curvature_decay": 1.5}, ValueError, r"`curvature_decay` must be in \[0, 1\), got 1.5"),
    ],
)
def test_init_validation(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DampingRegimeMonitor(**kwargs)


def test_no_logger_raises_unless_history_only(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="DampingRegimeMonitor has nowhere to log"):
        fit(tmp_path, [DampingRegimeMonitor()], logger=False)
    monitor = DampingRegimeMonitor(log=False)
    fit(tmp_path, [monitor], logger=False)
    assert [r.n_steps for r in monitor.history] == [4]


# ------------------------------------------------------------------ constant momentum under cosine lr


def test_constant_momentum_cosine(tmp_path: Path) -> None:
    monitor, recorder = DampingRegimeMonitor(tolerance=TOL), StepRecorder()
    # Cosine from 0.008 over 8 steps: zeta 0.56 (under) at first, 1.006 (critical) at step 5, 2.9 (over) at the end.
    trainer = fit(tmp_path, [monitor, recorder], model=TinyModel(sgd(lr=0.008), cosine()), max_epochs=2)
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    scalars = read_scalars(log_dir)
    lrs = lr_by_step(recorder)
    assert sorted(lrs) == list(range(8))

    zetas = dict(scalars["damping/zeta"])
    assert sorted(zetas) == list(range(8))
    for step, zeta in zetas.items():
        assert zeta == pytest.approx((1 - 0.9) / (2 * math.sqrt(lrs[step])), rel=1e-5)
        assert dict(scalars["damping/lr"])[step] == pytest.approx(lrs[step], rel=1e-5)
        assert dict(scalars["damping/momentum"])[step] == pytest.approx(0.9)
        assert dict(scalars["damping/regime"])[step] == classify_regime(zeta, TOL).code
    codes = {v for _, v in scalars["damping/regime"]}
    assert codes == {-1.0, 0.0, 1.0}, "the cosine run should visit all three regimes"
    assert [v for _, v in scalars["damping/band_low"]] == pytest.approx([0.9] * 8)
    assert [v for _, v in scalars["damping/band_high"]] == pytest.approx([1.1] * 8)

    # The epoch summary, recomputed from the lr every step used.
    assert [r.epoch for r in monitor.history] == [0, 1]
    for record, steps in zip(monitor.history, (range(0, 4), range(4, 8))):
        expected = [0.1 / (2 * math.sqrt(lrs[s])) for s in steps]
        median = statistics.median(expected)
        assert record.median_zeta == pytest.approx(median, rel=1e-9)
        assert record.regime == classify_regime(median, TOL).value
        assert record.n_steps == 4 and record.group == "pg0"
        for name in ("underdamped", "critical", "overdamped"):
            fraction = sum(classify_regime(z, TOL).value == name for z in expected) / 4
            assert record.fractions[name] == pytest.approx(fraction)
            assert dict(scalars[f"damping/epoch_fraction/{name}"])[steps[-1]] == pytest.approx(fraction)
        assert dict(scalars["damping/epoch_regime"])[steps[-1]] == classify_regime(median, TOL).code
        assert dict(scalars["damping/epoch_zeta"])[steps[-1]] == pytest.approx(median, rel=1e-5)

    # Layout: present, and every chart names tags that exist.
    layout = read_layout(log_dir)
    (category,) = [c for c in layout.category if c.title == "Damping"]
    titles = [chart.title for chart in category.chart]
    assert "lr and momentum" in titles and "zeta pg0 in the critical band" in titles
    tags = set(scalars)
    for chart in category.chart:
        if chart.HasField("margin"):
            for series in chart.margin.series:
                assert {series.value, series.lower, series.upper} <= tags
        else:
            for regex in chart.multiline.tag:
                assert any(re.search(regex, tag) for tag in tags), regex

    summary = read_text(log_dir, "damping/summary/text_summary")
    assert "| 0 | pg0 |" in summary and "| 1 | pg0 |" in summary
    assert summary == monitor.summary()


@pytest.mark.parametrize(
    ("kwargs", "momentum", "expected"),
    [({"rule": "exact"}, 0.81, 1.0), ({"curvature": 4.0}, 0.9, 0.1 / (2 * math.sqrt(4.0 * 0.01)))],
)
def test_rule_and_fixed_curvature(tmp_path: Path, kwargs: dict[str, Any], momentum: float, expected: float) -> None:
    monitor = DampingRegimeMonitor(log=False, **kwargs)
    fit(tmp_path, [monitor], model=TinyModel(sgd(lr=0.01, momentum=momentum)), logger=False)
    assert monitor.history[0].median_zeta == pytest.approx(expected, rel=1e-9)


def user_steps(log_dir: str) -> list[int]:
    """The steps at which the user's own ``self.log("train_loss")`` was written."""
    return [s for s, _ in read_scalars(log_dir)["train_loss"]]


@pytest.mark.parametrize("every", [1, 3])
def test_logs_on_lightnings_steps_but_summarises_all_steps(tmp_path: Path, every: int) -> None:
    monitor = DampingRegimeMonitor()
    trainer = fit(tmp_path, [monitor], limit_train_batches=8, log_every_n_steps=every)
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    scalars = read_scalars(log_dir)
    assert [s for s, _ in scalars["damping/zeta"]] == user_steps(log_dir)
    assert len(scalars["damping/zeta"]) == 8 // every
    assert monitor.history[0].n_steps == 8


def test_log_every_n_steps_zero_logs_no_step_metric(tmp_path: Path) -> None:
    monitor = DampingRegimeMonitor()
    trainer = fit(tmp_path, [monitor], log_every_n_steps=0)
    scalars = read_scalars(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert "damping/zeta" not in scalars and "train_loss" not in scalars
    assert scalars["damping/epoch_zeta"][0][1] == pytest.approx(monitor.history[0].median_zeta, rel=1e-6)


def test_epoch_metrics_reach_callback_metrics_and_early_stopping(tmp_path: Path) -> None:
    monitor = DampingRegimeMonitor()
    # Constant lr and momentum: the epoch zeta never improves, so EarlyStopping stops after `patience` epochs.
    stopper = EarlyStopping(monitor="damping/epoch_zeta", mode="min", patience=1, min_delta=1e-3)
    trainer = fit(tmp_path, [monitor, stopper], model=TinyModel(sgd(lr=0.01)), max_epochs=10)
    assert trainer.callback_metrics["damping/epoch_zeta"].item() == pytest.approx(0.5, rel=1e-6)
    assert trainer.current_epoch == 2 and stopper.stopped_epoch == 1
    assert [r.epoch for r in monitor.history] == [0, 1]


def test_one_csv_row_per_step(tmp_path: Path) -> None:
    trainer = fit(tmp_path, [DampingRegimeMonitor()], logger=CSVLogger(tmp_path), max_epochs=2)
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))  # type: ignore[union-attr]
    steps = [int(r["step"]) for r in rows if r["damping/zeta"]]
    assert steps == sorted(set(steps)) and len(steps) == 8
    for row in rows:
        if row["damping/zeta"]:
            assert row["train_loss"], "the monitor's step metrics share the row of the user's own self.log"
    assert sum(bool(r["damping/epoch_zeta"]) for r in rows) == 2


def test_dampening_and_nesterov_golden(tmp_path: Path) -> None:
    def damped(m: LightningModule) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.04, momentum=0.9, dampening=0.5)

    monitor = DampingRegimeMonitor(log=False)
    fit(tmp_path, [monitor], model=TinyModel(damped), logger=False)
    # Heavy ball at lr*(1 - dampening) = 0.02: zeta = (1 - 0.9) / (2*sqrt(0.02)) = 0.35355...
    assert monitor.history[0].median_zeta == pytest.approx(0.1 / (2 * math.sqrt(0.02)), rel=1e-9)
    assert monitor.history[0].median_zeta == pytest.approx(0.353553390593, rel=1e-9)

    def nesterov(m: LightningModule) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    monitor = DampingRegimeMonitor(log=False)
    with pytest.warns(UserWarning, match="uses `nesterov=True`; its damping ratio assumes heavy-ball") as record:
        fit(tmp_path, [monitor], model=TinyModel(nesterov), logger=False)
    assert sum("nesterov" in str(w.message) for w in record) == 1
    assert monitor.history[0].median_zeta == pytest.approx(0.5, rel=1e-9)


def test_logging_interval_epoch(tmp_path: Path) -> None:
    monitor = DampingRegimeMonitor(logging_interval="epoch")
    trainer = fit(tmp_path, [monitor])
    scalars = read_scalars(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert "damping/zeta" not in scalars and "damping/lr" not in scalars
    (record,) = monitor.history
    assert scalars["damping/epoch_regime"] == [(3, classify_regime(record.median_zeta, TOL).code)]
    assert scalars["damping/epoch_zeta"] == [(3, pytest.approx(record.median_zeta, rel=1e-5))]


# ------------------------------------------------------------------ who sets momentum, and callback order


@pytest.mark.parametrize("monitor_first", [True, False])
def test_with_beta_callback_in_any_order(tmp_path: Path, monitor_first: bool) -> None:
    monitor, recorder = DampingRegimeMonitor(), StepRecorder()
    beta = BetaMomentumCallback()
    callbacks = [monitor, beta, recorder] if monitor_first else [beta, monitor, recorder]
    trainer = fit(tmp_path, callbacks, model=TinyModel(sgd(lr=0.05), cosine()))
    scalars = read_scalars(trainer.logger.log_dir)  # type: ignore[union-attr]
    used = {s["global_step"]: s["groups"][0]["momentum"] for s in recorder.steps}
    for step, momentum in scalars["damping/momentum"]:
        assert momentum == pytest.approx(used[step], rel=1e-5)
        assert momentum != pytest.approx(0.9)
    assert [z for _, z in scalars["damping/zeta"]] == pytest.approx([1.0] * 4, rel=1e-5)
    assert monitor.history[0].regime == "critical" and monitor.history[0].fractions["critical"] == 1.0


def test_tensor_lr_adam(tmp_path: Path) -> None:
    def adam(m: LightningModule) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01), betas=(0.8, 0.999), foreach=False)

    monitor = DampingRegimeMonitor()
    trainer = fit(tmp_path, [monitor], model=TinyModel(adam))
    scalars = read_scalars(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert [z for _, z in scalars["damping/zeta"]] == pytest.approx([1.0] * 4, rel=1e-5)
    assert monitor.history[0].median_zeta == pytest.approx(1.0, rel=1e-5)


def test_gradient_accumulation(tmp_path: Path) -> None:
    monitor, recorder = DampingRegimeMonitor(), StepRecorder()
    trainer = fit(tmp_path, [monitor, recorder], limit_train_batches=8, accumulate_grad_batches=2)
    scalars = read_scalars(trainer.logger.log_dir)  # type: ignore[union-attr]
    lrs = lr_by_step(recorder)
    assert [s for s, _ in scalars["damping/zeta"]] == [0, 1, 2, 3]
    for step, zeta in scalars["damping/zeta"]:
        assert zeta == pytest.approx(0.05 / math.sqrt(lrs[step]), rel=1e-5)
    assert monitor.history[0].n_steps == 4


def test_two_groups_one_frozen(tmp_path: Path) -> None:
    def groups(m: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [
                {"params": m.body.parameters(), "lr": 0.02, "name": "body"},
                {"params": m.head.parameters(), "lr": 0.0, "name": "head"},
            ],
            momentum=0.9,
        )

    monitor, recorder = DampingRegimeMonitor(), StepRecorder()
    trainer = fit(tmp_path, [monitor, recorder], model=TinyModel(groups))
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    scalars = read_scalars(log_dir)
    assert not [tag for tag in scalars if tag.endswith("/head")]
    for _, zeta in scalars["damping/zeta/body"]:
        assert zeta == pytest.approx(0.05 / math.sqrt(0.02), rel=1e-5)
    assert [r.group for r in monitor.history] == ["body"]
    margins = [c.margin.series[0].value for c in read_layout(log_dir).category[0].chart if c.HasField("margin")]
    assert margins == ["damping/zeta/body"]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.Adagrad(m.parameters(), lr=0.01),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
    ],
    ids=["adagrad", "sgd-no-momentum"],
)
def test_groups_without_momentum_reported_once(tmp_path: Path, make_opt: Any) -> None:
    monitor = DampingRegimeMonitor()
    with pytest.warns(UserWarning, match="has no momentum, so its damping ratio is undefined") as record:
        trainer = fit(tmp_path, [monitor], model=TinyModel(make_opt))
    assert sum("has no momentum" in str(w.message) for w in record) == 1
    scalars = read_scalars(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert not [tag for tag in scalars if tag.startswith("damping/")]
    assert monitor.history == []


def test_other_logger_skips_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        trainer = fit(tmp_path, [DampingRegimeMonitor()], logger=CSVLogger(tmp_path))
    assert sum("custom-scalars layout is TensorBoard-only" in r.getMessage() for r in caplog.records) == 1
    header = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]  # type: ignore[union-attr]
    assert "damping/zeta" in header and "damping/epoch_regime" in header


# ------------------------------------------------------------------ state


def test_state_dict_round_trip_and_version() -> None:
    monitor = DampingRegimeMonitor()
    monitor.history = [EpochDamping(0, "pg0", 0.5, "underdamped", {"underdamped": 1.0}, 3)]
    monitor._zetas.append("", "pg0", 0.5)
    monitor._zetas.append("", "pg0", torch.tensor(0.7))
    monitor._epoch, monitor._last_step = 1, 5
    state = monitor.state_dict()
    assert state["zetas"] == {"": [0.5, pytest.approx(0.7)]}
    other = DampingRegimeMonitor()
    other.load_state_dict(state)
    assert other.history == monitor.history and other._epoch == 1 and other._last_step == 5
    assert other._zetas.values[""].to_list() == [0.5, pytest.approx(0.7)]
    with pytest.raises(ValueError, match="DampingRegimeMonitor state has version 0; this release reads version 1"):
        other.load_state_dict({**state, "version": 0})


def test_previous_release_state_resumes() -> None:
    """A version-1 state as the previous release wrote it (zetas as floats, secant estimate as CPU tensors)."""
    state = {
        "version": 1,
        "history": [
            {
                "epoch": 0,
                "group": "pg0",
                "median_zeta": 0.5,
                "regime": "underdamped",
                "fractions": {"underdamped": 1.0, "critical": 0.0, "overdamped": 0.0},
                "n_steps": 4,
            }
        ],
        "epoch": 1,
        "zetas": {"": [0.6, 0.7]},
        "labels": {"": "pg0"},
        "last_step": 5,
        "reported": [],
        "secant": {"names": ["a", "b"], "curvature": torch.tensor([2.0, 6.0]), "count": torch.tensor([3.0, 3.0])},
    }
    monitor = DampingRegimeMonitor(curvature="secant")
    monitor.load_state_dict(state)
    assert monitor.history[0].median_zeta == 0.5 and monitor._zetas.values[""].to_list() == [0.6, 0.7]
    assert monitor._secant_state is state["secant"]


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = DampingRegimeMonitor()
    fit(tmp_path / "full", [full], max_epochs=2)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    first = DampingRegimeMonitor()
    fit(tmp_path / "a", [first, checkpoint], max_epochs=2, max_steps=6, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")

    resumed = DampingRegimeMonitor()
    trainer = Trainer(
        **trainer_kwargs(tmp_path / "b", logger=TensorBoardLogger(tmp_path / "b"), callbacks=[resumed], max_epochs=2)
    )
    trainer.fit(TinyModel(sgd(), cosine()), make_loader(), ckpt_path=str(ckpt))
    assert [(r.epoch, r.n_steps) for r in resumed.history] == [(0, 4), (1, 4)]
    for got, want in zip(resumed.history, full.history):
        assert got.median_zeta == pytest.approx(want.median_zeta, rel=1e-9)
        assert got.fractions == want.fractions and got.regime == want.regime


# ------------------------------------------------------------------ secant curvature


class Scaled(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))


class Quadratic(LightningModule):
    """Loss 0.5*lam_a*||a||^2 + 0.5*lam_b*||b||^2 plus a small batch-dependent linear term."""

    curvatures = {"a": 2.0, "b": 6.0}

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Scaled(8), Scaled(8)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        noise = 1e-3 * x.mean(0)
        loss = 0.0
        for name, lam in self.curvatures.items():
            w = getattr(self, name).weight
            loss = loss + 0.5 * lam * w.square().sum() + (noise * w).sum()
        return loss  # type: ignore[return-value]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def test_secant_curvature_on_quadratic(tmp_path: Path) -> None:
    monitor = DampingRegimeMonitor(curvature="secant", curvature_decay=0.5)
    trainer = fit(tmp_path, [monitor], model=Quadratic(), limit_train_batches=8)
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    scalars = read_scalars(log_dir)
    for name, lam in Quadratic.curvatures.items():
        curve = scalars[f"damping/curvature/{name}"]
        assert [s for s, _ in curve] == list(range(1, 8)), "measured from the second step on"
        assert curve[-1][1] == pytest.approx(lam, rel=0.1)
        zeta = scalars[f"damping/layer_zeta/{name}"][-1][1]
        assert zeta == pytest.approx(0.1 / (2 * math.sqrt(0.02 * curve[-1][1])), rel=1e-5)
    assert monitor.layer_curvature() == pytest.approx({"a": 2.0, "b": 6.0}, rel=0.1)
    # The per-group zeta keeps the paper's curvature 1.
    assert scalars["damping/zeta"][0][1] == pytest.approx(0.05 / math.sqrt(0.02), rel=1e-5)
    charts = {c.title: c for c in read_layout(log_dir).category[0].chart}
    assert "^damping/layer_zeta/" in charts["measured zeta per layer, with the band"].multiline.tag


def test_secant_resume_keeps_estimate(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(
        tmp_path / "a",
        [DampingRegimeMonitor(curvature="secant"), checkpoint],
        model=Quadratic(),
        enable_checkpointing=True,
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("DampingRegimeMonitor")]
    assert saved["secant"]["names"] == ["a", "b"]
    assert saved["secant"]["curvature"].tolist() == pytest.approx([2.0, 6.0], rel=0.1)

    resumed = DampingRegimeMonitor(curvature="secant")
    trainer = Trainer(
        **trainer_kwargs(tmp_path / "b", logger=TensorBoardLogger(tmp_path / "b"), callbacks=[resumed], max_epochs=2)
    )
    trainer.fit(Quadratic(), make_loader(), ckpt_path=str(last))
    scalars = read_scalars(trainer.logger.log_dir)  # type: ignore[union-attr]
    # The first step after the resume has no gradient pair yet: it logs the restored estimate.
    assert dict(scalars["damping/curvature/a"])[4] == pytest.approx(saved["secant"]["curvature"][0].item())
    assert scalars["damping/curvature/b"][-1][1] == pytest.approx(6.0, rel=0.1)
    assert [r.epoch for r in resumed.history] == [0, 1]


class ExactQuadratic(Quadratic):
    """The quadratic without the batch term: the secant is exact whatever the optimizer and the clipping do."""

    def __init__(self, optimizer: Any = None, blow_up_at: int | None = None) -> None:
        super().__init__()
        self.optimizer_fn = optimizer or (lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.9))
        self.blow_up_at = blow_up_at

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = sum(0.5 * lam * getattr(self, n).weight.square().sum() for n, lam in self.curvatures.items())
        if batch_idx == self.blow_up_at:
            loss = loss * float("inf")  # non-finite gradients: the GradScaler skips this step
        return loss  # type: ignore[return-value]

    def configure_optimizers(self) -> Any:
        return self.optimizer_fn(self.parameters())


def test_secant_reads_raw_gradients_before_clipping(tmp_path: Path) -> None:
    # Clipping to 0.01 shrinks the gradients by ~100x; g and theta read at one point, before clipping, still give
    # the curvature (reading g(t) after clipping and g(t+1) before gave ~1.5e4 for a curvature of 4).
    monitor = DampingRegimeMonitor(curvature="secant", curvature_decay=0.5, log=False)
    fit(tmp_path, [monitor], model=ExactQuadratic(), logger=False, limit_train_batches=8, gradient_clip_val=0.01)
    assert monitor.layer_curvature() == pytest.approx(Quadratic.curvatures, rel=0.05)


def test_secant_under_fp16_with_a_fused_optimizer(tmp_path: Path) -> None:
    # A fused optimizer unscales inside `step()` (Lightning skips `unscale_`): the hook sees gradients times 1024.
    # Batch 5 overflows: the scaler skips the step (theta unchanged, inf gradients) and halves the scale.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    model = ExactQuadratic(lambda params: torch.optim.Adam(params, lr=0.05, fused=True), blow_up_at=5)
    monitor = DampingRegimeMonitor(curvature="secant", curvature_decay=0.5, log=False)
    fit(tmp_path, [monitor], model=model, logger=False, limit_train_batches=8, plugins=[plugin])
    assert scaler.get_scale() == 512.0, "the overflow step was skipped"
    assert monitor.layer_curvature() == pytest.approx(Quadratic.curvatures, rel=0.05)


class Manual(TinyModel):
    """Manual optimization: the optimizer step (and so the monitor's post hook) runs inside ``training_step``."""

    def __init__(self) -> None:
        super().__init__(sgd(lr=0.01))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        self.log("train_loss", loss)
        return loss


def test_manual_optimization_logs_on_the_users_steps(tmp_path: Path) -> None:
    monitor = DampingRegimeMonitor()
    trainer = fit(tmp_path, [monitor], model=Manual(), limit_train_batches=6, log_every_n_steps=2)
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    scalars = read_scalars(log_dir)
    assert [s for s, _ in scalars["damping/zeta"]] == user_steps(log_dir) and len(user_steps(log_dir)) == 3
    assert [z for _, z in scalars["damping/zeta"]] == pytest.approx([0.5] * 3, rel=1e-6)
    assert monitor.history[0].n_steps == 6


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def no_host_reads(calls: list[str]) -> Any:
    """Record every host read of a tensor (a device sync on an accelerator) made inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guarded(name: str) -> Any:
        def read(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, guarded(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def guard_non_logging_steps(monitor: DampingRegimeMonitor) -> dict[str, list[str]]:
    """Wrap the monitor's per-step hooks: host reads on steps Lightning does not log are recorded."""
    seen: dict[str, list[str]] = {"reads": [], "guarded_steps": []}
    for name in ("on_before_optimizer_step", "_after_step"):
        original = getattr(monitor, name)

        def wrapped(trainer: Trainer, *args: Any, _original: Any = original, _name: str = name) -> Any:
            if is_logging_step(trainer):
                return _original(trainer, *args)
            seen["guarded_steps"].append(_name)
            with no_host_reads(seen["reads"]):
                return _original(trainer, *args)

        setattr(monitor, name, wrapped)
    return seen


@pytest.mark.parametrize("lr", ["float", "tensor"])
@pytest.mark.parametrize("curvature", [1.0, "secant"])
def test_no_host_read_on_non_logging_steps(tmp_path: Path, lr: str, curvature: Any) -> None:
    def adam(m: LightningModule) -> torch.optim.Optimizer:
        rate = torch.tensor(0.01) if lr == "tensor" else 0.01
        return torch.optim.Adam(m.parameters(), lr=rate, betas=(0.8, 0.999), foreach=False)

    monitor = DampingRegimeMonitor(curvature=curvature)
    seen = guard_non_logging_steps(monitor)
    fit(tmp_path, [monitor], model=TinyModel(adam), limit_train_batches=8, log_every_n_steps=4)
    assert seen["guarded_steps"].count("_after_step") == 6, "steps 0-2 and 4-6 are not logged"
    assert seen["reads"] == []
    assert monitor.history[0].n_steps == 8 and monitor.history[0].median_zeta == pytest.approx(1.0, rel=1e-5)


class TwoOptimizers(TinyModel):
    """Manual optimization with two optimizers stepping inside one ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        for opt in self.optimizers():  # type: ignore[union-attr]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.body.parameters(), lr=0.01, momentum=0.9),
            torch.optim.SGD(self.head.parameters(), lr=0.04, momentum=0.9),
        ]


class LogsBeforeStep(Callback):
    """Another callback logging from ``on_before_optimizer_step``, as BetaMomentumCallback does."""

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        pl_module.log("other/value", 1.0, on_step=True, on_epoch=False)


def test_several_optimizers_in_manual_optimization_keep_the_first_batch(tmp_path: Path) -> None:
    # In an epoch's first batch Lightning drops values logged from a hook when logging comes back to it from
    # another hook; the monitor hands its step metrics over once, in `on_train_batch_end`.
    trainer = fit(tmp_path, [LogsBeforeStep(), DampingRegimeMonitor()], model=TwoOptimizers(), max_epochs=2)
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    scalars = read_scalars(log_dir)
    for suffix, zeta in (("/opt0", 0.5), ("/opt1", 0.25)):
        assert [s for s, _ in scalars[f"damping/zeta{suffix}"]] == list(range(8))
        assert [v for _, v in scalars[f"damping/zeta{suffix}"]] == pytest.approx([zeta] * 8, rel=1e-6)
