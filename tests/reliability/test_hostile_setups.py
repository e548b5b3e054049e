"""Odd but legal setups: the lr finder, SWA, BackboneFinetuning, unused and shared parameters, torch.compile, and
param groups added mid-run. No crash, and the behaviour each callback documents."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, StochasticWeightAveraging
from lightning.pytorch.tuner import Tuner
from torch import Tensor, nn

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback, critical_momentum
from lightning_beta.callbacks.beta_momentum import SGD_MOMENTUM_FLOOR
from lightning_beta.diagnosis import load_attribution
from tests.helpers import StepRecorder, TinyModel, make_loader, read_scalars, trainer_kwargs
from tests.reliability.helpers import fit, make_callbacks, of, scalars, sgd_cosine, tb_logger


def scalars_of(logger: Any) -> dict[str, list[tuple[int, float]]]:
    return read_scalars(logger.log_dir)


def assert_critical(recorder: Any) -> None:
    assert recorder.steps
    for step in recorder.steps:
        for group in step["groups"]:
            if group["lr"] > 0:
                want = critical_momentum(group["lr"], min_momentum=SGD_MOMENTUM_FLOOR)
                assert group["momentum"] == pytest.approx(want, abs=1e-9), step


def test_lr_finder_then_fit(tmp_path: Path) -> None:
    """lr_find sweeps the lr up to 1 with the callbacks attached, then the real fit runs at lr 1 (clamped).

    Lightning runs the sweep with its own callback only (it swaps ``trainer.callbacks``), so the sweep uses the
    optimizer's own momentum and the callbacks record nothing of it; the real fit afterwards must be exactly the
    fit without a sweep, its clamping warning included.
    """
    callbacks = make_callbacks("all")
    model = sgd_cosine(lr=1.0)()
    logger = tb_logger(tmp_path / "tuned")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "tuned", callbacks=callbacks, max_epochs=2, logger=logger))
    finder = Tuner(trainer).lr_find(
        model, make_loader(), min_lr=1e-4, max_lr=1.0, num_training=8, early_stop_threshold=None, update_attr=False
    )
    assert finder is not None and max(finder.results["lr"]) == pytest.approx(1.0)
    beta, monitor, attribution = callbacks
    assert beta.switch_step is None and not beta._clamp_warned  # the sweep left no state behind
    assert monitor.history == [] and attribution.artifact is None

    recorder = StepRecorder()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path / "tuned", callbacks=[*callbacks, recorder], max_epochs=2, logger=logger)
    )
    with pytest.warns(UserWarning, match="clamped to `min_momentum`"):
        trainer.fit(model, make_loader())
    assert recorder.momenta()[0] == SGD_MOMENTUM_FLOOR  # lr 1: clamped
    reference_cbs = make_callbacks("all")
    _, reference = fit(tmp_path / "plain", sgd_cosine(lr=1.0)(), reference_cbs, max_epochs=2)
    assert recorder.steps == reference.steps
    assert monitor.history == of(reference_cbs, DampingRegimeMonitor).history
    assert attribution.artifact.total.count == 8  # not the sweep's steps


def test_stochastic_weight_averaging_changes_lr(tmp_path: Path) -> None:
    """SWALR takes the lr from 0.05 to 0.2: the momentum follows it. (No StepRecorder: SWALR needs a bound
    ``optimizer.step``, so the logged lr and momentum are checked instead.)"""
    swa = StochasticWeightAveraging(swa_lrs=0.2, swa_epoch_start=1, annealing_epochs=1)
    callbacks = make_callbacks("all")
    torch.manual_seed(0)
    model = TinyModel(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    logger = tb_logger(tmp_path)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[swa, *callbacks], max_epochs=3, logger=logger)).fit(
        model, make_loader()
    )
    logged = scalars_of(logger)
    lrs, momenta, zetas = (dict(logged[f"damping/{key}"]) for key in ("lr", "momentum", "zeta"))
    assert sorted(lrs) == list(range(12)) and lrs[0] == pytest.approx(0.05) and lrs[11] == pytest.approx(0.2)
    for step, lr in lrs.items():
        assert momenta[step] == pytest.approx(critical_momentum(lr), abs=1e-6)
        assert dict(logged["beta/momentum"])[step] == pytest.approx(momenta[step], rel=1e-6)
        assert zetas[step] == pytest.approx((1 - momenta[step]) / (2 * math.sqrt(lr)), rel=1e-5)
    assert of(callbacks, LayerAttributionCallback).artifact.total.count == 12


class WithBackbone(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def test_backbone_finetuning_freezes_then_adds_a_group(tmp_path: Path) -> None:
    """Epoch 0: the backbone is frozen (no gradients); epoch 1: BackboneFinetuning adds it as a second param group."""
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    beta = BetaMomentumCallback()
    monitor = DampingRegimeMonitor(curvature="secant")
    attribution = LayerAttributionCallback(reference_batches=1)
    torch.manual_seed(0)
    trainer, recorder = fit(tmp_path, WithBackbone(), [finetune, beta, monitor, attribution], max_epochs=3)

    assert [len(s["groups"]) for s in recorder.steps] == [1] * 4 + [2] * 8
    assert recorder.steps[-1]["groups"][1]["lr"] == pytest.approx(0.005)  # initial_denom_lr=10
    assert_critical(recorder)  # the added group gets the momentum of its own lr
    art = attribution.artifact
    assert art.totals["backbone"].count == 8 and art.totals["head"].count == 12
    assert art.history[0][0] is None and art.history[1][0] is not None  # no gradient in epoch 0, then counted
    # the log keys are stable over the fit: the first group keeps "damping/zeta" and "beta/momentum" for all 12
    # steps (never renamed to "/pg0"), and the group the backbone joins as gets its own "/pg1" from step 4 on
    logged = scalars(trainer)
    assert [s for s, _ in logged["damping/zeta"]] == list(range(12))
    assert [s for s, _ in logged["damping/zeta/pg1"]] == list(range(4, 12))
    assert [s for s, _ in logged["beta/momentum"]] == list(range(12))
    assert [s for s, _ in logged["beta/momentum/pg1"]] == list(range(4, 12))
    assert not any(tag.endswith("/pg0") for tag in logged)
    assert {(r.epoch, r.group) for r in monitor.history} == {(0, "pg0"), (1, "pg0"), (1, "pg1"), (2, "pg0"), (2, "pg1")}


class AddsGroup(pl.Callback):
    """Adds the ``extra`` module's parameters as a new param group at the start of epoch 1."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            trainer.optimizers[0].add_param_group({"params": list(pl_module.extra.parameters()), "lr": 0.01})


class WithExtra(TinyModel):
    def __init__(self) -> None:
        super().__init__(lambda m: torch.optim.SGD([*m.body.parameters(), *m.head.parameters()], lr=0.05, momentum=0.9))
        self.extra = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extra(self.body(x)))


def test_param_group_added_mid_run(tmp_path: Path) -> None:
    callbacks = make_callbacks("all")
    torch.manual_seed(0)
    _, recorder = fit(tmp_path, WithExtra(), [AddsGroup(), *callbacks], max_epochs=2)
    assert [len(s["groups"]) for s in recorder.steps] == [1] * 4 + [2] * 4
    assert recorder.steps[-1]["groups"][1]["momentum"] == pytest.approx(critical_momentum(0.01))
    assert_critical(recorder)
    art = of(callbacks, LayerAttributionCallback).artifact
    # ``extra`` has gradients from the start but belongs to the optimizer only from epoch 1: counted from there
    assert art.totals["extra"].count == 4 and art.totals["body"].count == 8
    extra = list(art.groups).index("extra")
    assert art.history[0][extra] is None and art.history[1][extra] is not None


class Unused(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(4, 4)  # never called: its gradients stay None


def test_unused_parameters(tmp_path: Path) -> None:
    beta, _, attribution = make_callbacks("all")
    monitor = DampingRegimeMonitor(curvature="secant")
    torch.manual_seed(0)
    _, recorder = fit(tmp_path, Unused(), [beta, monitor, attribution], max_epochs=2)
    art = load_attribution(attribution.artifact_path)
    spare = art.totals["spare"]
    assert (spare.count, spare.mean, spare.nonfinite) == (0, None, 0)
    assert [row[2] for row in art.history] == [None, None] and "spare" not in dict(art.ranking())
    assert art.totals["body"].count == 8 and art.total.count == 8
    assert math.isnan(monitor.layer_curvature()["spare"]) and monitor.layer_curvature()["head"] > 0
    assert_critical(recorder)


class Tied(pl.LightningModule):
    """``dec.weight`` is ``enc.weight`` (tied weights): one parameter, two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.relu(self.dec(torch.relu(self.enc(x))))), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class TiedNorms(pl.Callback):
    def __init__(self) -> None:
        self.enc: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [pl_module.enc.weight.grad.double(), pl_module.enc.bias.grad.double()]
        self.enc.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())


def test_parameter_shared_between_two_modules(tmp_path: Path) -> None:
    beta, monitor, attribution = make_callbacks("all")
    norms = TiedNorms()
    torch.manual_seed(0)
    model = Tied()
    _, recorder = fit(tmp_path, model, [beta, monitor, attribution, norms], max_epochs=1)
    art = attribution.artifact
    assert art.parameters["enc"] == ["enc.weight", "enc.bias"] and art.parameters["dec"] == ["dec.bias"]
    assert sum(art.groups.values()) == sum(p.numel() for p in model.parameters())  # the shared weight once
    assert art.totals["enc"].mean == pytest.approx(sum(norms.enc) / len(norms.enc), rel=1e-6)
    assert_critical(recorder)


class Compiled(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(self.body, backend="eager")  # type: ignore[assignment]


class NoLog(TinyModel):
    """``self.log`` inside a compiled ``training_step`` breaks dynamo in torch 2.13 (with no callback at all)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def _compiles_without_callbacks(tmp_path: Path, build: Any) -> None:
    """Skip, naming the reason, when torch.compile itself does not run a plain fit here in reasonable time."""
    start = time.monotonic()
    try:
        fit(tmp_path / "plain", build(), [], max_epochs=1, logger=False)
    except Exception as err:  # pragma: no cover - depends on the platform's torch.compile support
        pytest.skip(f"torch.compile(backend='eager') fails on this machine without any callback: {err!r:.200}")
    if time.monotonic() - start > 60:  # pragma: no cover
        pytest.skip("torch.compile(backend='eager') takes over a minute for a 4-step fit on this machine")


@pytest.mark.slow
def test_torch_compiled_submodule(tmp_path: Path) -> None:
    """A ``torch.compile``d child (the cheap ``eager`` backend): groups, norms and reference statistics work."""
    _compiles_without_callbacks(tmp_path, Compiled)
    callbacks = make_callbacks("all")
    _, recorder = fit(tmp_path, Compiled(), callbacks, max_epochs=1)
    art = of(callbacks, LayerAttributionCallback).artifact
    assert list(art.groups) == ["body", "head"]
    assert art.parameters["body"] == ["body._orig_mod.0.weight", "body._orig_mod.0.bias"]
    assert art.totals["body"].count == 4 and sorted(art.reference) == ["body", "head"]
    assert_critical(recorder)


@pytest.mark.slow
def test_torch_compiled_lightning_module(tmp_path: Path) -> None:
    """The whole LightningModule compiled: Lightning unwraps it, the callbacks see the original."""

    def build() -> Any:
        torch.manual_seed(0)
        return torch.compile(NoLog(), backend="eager")

    _compiles_without_callbacks(tmp_path, build)
    callbacks = make_callbacks("all")
    _, recorder = fit(tmp_path, build(), callbacks, max_epochs=1)
    art = of(callbacks, LayerAttributionCallback).artifact
    assert list(art.groups) == ["body", "head"] and art.total.count == 4 and sorted(art.reference) == ["body", "head"]
    assert_critical(recorder)
