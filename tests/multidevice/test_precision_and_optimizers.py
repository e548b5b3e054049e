"""bf16 mixed precision on CPU, and several optimizers with named param groups: the three callbacks together.

fp16 (``"16-mixed"``) needs a GPU in Lightning; its GradScaler path is tested on CPU in
``tests/callbacks/test_layer_attribution.py`` (``test_fp16_amp_norms_are_unscaled``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from lightning_beta.diagnosis import load_attribution
from lightning_beta.functional.momentum import critical_momentum
from tests.callbacks.test_layer_attribution import GradRecorder, _check_artifact_against
from tests.helpers import StepRecorder, TinyModel, make_loader, read_scalars, trainer_kwargs


def _cosine(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8), "interval": "step"}


def _sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)


def _adam(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=0.01)


# ------------------------------------------------------------------ bf16 mixed precision


def _fit_all_three(root: Path, precision: str, optimizer_fn: Any) -> tuple[Any, ...]:
    beta, monitor = BetaMomentumCallback(), DampingRegimeMonitor()
    attribution, grads, steps = LayerAttributionCallback(reference_batches=2), GradRecorder(), StepRecorder()
    logger = TensorBoardLogger(root, name="tb")
    callbacks = [beta, monitor, attribution, grads, steps]
    trainer = pl.Trainer(**trainer_kwargs(root, max_epochs=2, precision=precision, logger=logger, callbacks=callbacks))
    torch.manual_seed(0)
    trainer.fit(TinyModel(optimizer_fn, _cosine), make_loader())
    return trainer, monitor, attribution, grads, steps, Path(logger.log_dir)


@pytest.mark.parametrize("optimizer_fn", [_sgd, _adam], ids=["sgd", "adam"])
def test_bf16_mixed_on_cpu(tmp_path: Path, optimizer_fn: Any) -> None:
    trainer, monitor, attribution, grads, steps, log_dir = _fit_all_three(tmp_path / "bf16", "bf16-mixed", optimizer_fn)
    assert trainer.precision == "bf16-mixed"
    assert getattr(trainer.precision_plugin, "scaler", None) is None
    _, ref_monitor, _, _, ref_steps, ref_dir = _fit_all_three(tmp_path / "fp32", "32-true", optimizer_fn)
    # Momentum and zeta depend on the lr alone: identical to the fp32 run, and the critical value of each lr.
    assert steps.steps == ref_steps.steps and len(steps.steps) == 8
    floor = 1e-6 if optimizer_fn is _sgd else 0.0
    assert steps.momenta() == pytest.approx([critical_momentum(lr, min_momentum=floor) for lr in steps.lrs()])
    assert monitor.history == ref_monitor.history and len(monitor.history) == 2
    scalars, ref_scalars = read_scalars(log_dir), read_scalars(ref_dir)
    for prefix in ("beta/", "damping/"):
        tags = [t for t in ref_scalars if t.startswith(prefix)]
        assert tags and {t: scalars[t] for t in tags} == {t: ref_scalars[t] for t in tags}
    # Attribution: the norms of the (fp32) gradients that bf16 autocast produced, against a recomputation.
    assert attribution.artifact_path is not None
    art = load_attribution(attribution.artifact_path)
    _check_artifact_against(art, grads)
    assert set(art.reference) == {"body", "head"} and art.reference["head"].count == 2 * 8


# ------------------------------------------------------------------ several optimizers, named param groups


class ManualGAN(pl.LightningModule):
    """Manual optimization with two optimizers: a generator with two named param groups, a one-group discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.discriminator = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_g, opt_d = self.optimizers()
        loss_d = nn.functional.cross_entropy(self.discriminator(x), y)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = -nn.functional.cross_entropy(self.discriminator(self.generator(x)), y)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        for scheduler in self.lr_schedulers():  # type: ignore[union-attr]
            scheduler.step()

    def configure_optimizers(self) -> Any:
        opt_g = torch.optim.SGD(
            [
                {"params": self.generator[0].parameters(), "name": "g_in", "lr": 0.04},
                {"params": self.generator[2].parameters(), "name": "g_out", "lr": 0.01},
            ],
            momentum=0.9,
        )
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=0.01)
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4) for opt in (opt_g, opt_d)]
        return [opt_g, opt_d], schedulers


def test_two_optimizers_named_groups_key_naming(tmp_path: Path) -> None:
    monitor, attribution, steps = DampingRegimeMonitor(), LayerAttributionCallback(), StepRecorder()
    logger = TensorBoardLogger(tmp_path, name="tb")
    callbacks = [BetaMomentumCallback(), monitor, attribution, steps]
    # ManualGAN has no forward: the reference pass (run under manual optimization too) skips both groups, in one warning
    # that names the shared reason once
    skipped = (
        r"reference statistics: none for group\(s\) 'generator', 'discriminator': the reference forward pass raised"
        r" NotImplementedError: "
    )
    with pytest.warns(UserWarning, match=skipped):
        pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=callbacks)).fit(ManualGAN(), make_loader())
    scalars = read_scalars(logger.log_dir)
    groups = ["opt0/g_in", "opt0/g_out", "opt1"]
    # One suffix per (optimizer, param group), the same for both callbacks: optK/ with several optimizers, then the
    # group's name (pgN without one); a single-group optimizer has no group part.
    assert {t for t in scalars if t.startswith("beta/")} == {f"beta/momentum/{g}" for g in groups}
    for metric in ("zeta", "regime", "lr", "momentum", "epoch_zeta", "epoch_regime"):
        assert {t for t in scalars if t.startswith(f"damping/{metric}/")} == {f"damping/{metric}/{g}" for g in groups}
    assert sorted(r.group for r in monitor.history) == groups
    # The logged momentum is the one each step used; zeta is the damping ratio of that step's lr and momentum.
    for opt_idx, group_idx, name in [(0, 0, "opt0/g_in"), (0, 1, "opt0/g_out"), (1, 0, "opt1")]:
        used = steps.momenta(group_idx, opt_idx)
        assert len(used) == 4
        assert [v for _, v in scalars[f"beta/momentum/{name}"]] == pytest.approx(used, rel=1e-6)
        assert [v for _, v in scalars[f"damping/momentum/{name}"]] == pytest.approx(used, rel=1e-6)
    # Attribution is by layer group (top-level modules), not by optimizer: each group counts its optimizer's steps.
    assert {t for t in scalars if t.startswith("grad_norm/")} == {
        "grad_norm/generator",
        "grad_norm/discriminator",
        "grad_norm/total",
    }
    assert attribution.artifact_path is not None
    art = load_attribution(attribution.artifact_path)
    assert art.totals["generator"].count == art.totals["discriminator"].count == 4
    assert art.total.count == 8 and art.global_step == 8
    assert sorted(art.reference_skipped) == ["discriminator", "generator"] and not art.reference


def _named_groups(module: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": module.body.parameters(), "name": "body"}, {"params": module.head.parameters()}],
        lr=0.05,
        momentum=0.9,
    )


def test_one_optimizer_named_and_unnamed_groups(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    callbacks = [BetaMomentumCallback(), DampingRegimeMonitor()]
    pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=callbacks)).fit(
        TinyModel(_named_groups), make_loader()
    )
    scalars = read_scalars(logger.log_dir)
    assert {t for t in scalars if t.startswith("beta/")} == {"beta/momentum/body", "beta/momentum/pg1"}
    assert {t for t in scalars if t.startswith("damping/zeta")} == {"damping/zeta/body", "damping/zeta/pg1"}
