"""Faults during a fit: non-finite gradients, a diverging loss, an exception or Ctrl-C mid-epoch, a full or
read-only output directory. The callbacks must never crash the fit, corrupt their record or lose it."""

from __future__ import annotations

import errno
import json
import math
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback, critical_momentum
from lightning_beta.artifact import save_attribution
from lightning_beta.callbacks.beta_momentum import SGD_MOMENTUM_FLOOR
from lightning_beta.diagnosis import load_attribution
from tests.helpers import TinyModel
from tests.reliability.helpers import fit, make_callbacks, of, scalars, sgd_cosine

WRITE_FAILED = "LayerAttributionCallback: could not write the attribution artifact to"


def strict_json(path: Path) -> Any:
    """Parse a file as JSON, refusing NaN and Infinity (which are not JSON): never a truncated or invalid file."""

    def refuse(token: str) -> Any:
        raise ValueError(f"non-JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def assert_momentum_is_critical(recorder: Any) -> None:
    assert recorder.steps
    for step in recorder.steps:
        for group in step["groups"]:
            want = critical_momentum(group["lr"], min_momentum=SGD_MOMENTUM_FLOOR)
            assert group["momentum"] == pytest.approx(want, abs=1e-9)


class Poison(pl.Callback):
    """Writes NaN or inf into the gradient of a module on chosen optimizer steps."""

    def __init__(self, plan: dict[int, tuple[str, float]]) -> None:
        self.plan = plan

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step in self.plan:
            module, value = self.plan[trainer.global_step]
            pl_module.get_submodule(module).weight.grad.fill_(value)


class Cure(pl.Callback):
    """Zeroes non-finite gradients after the callbacks have seen them, so the weights stay finite."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)


def test_nan_and_inf_gradients_on_some_steps(tmp_path: Path) -> None:
    beta, monitor, attribution = make_callbacks("all")
    poison = Poison({1: ("head", math.nan), 2: ("body.0", math.inf)})
    trainer, recorder = fit(tmp_path, sgd_cosine()(), [poison, beta, monitor, attribution, Cure()], max_epochs=2)

    art = load_attribution(attribution.artifact_path)
    assert (art.totals["head"].nonfinite, art.totals["body"].nonfinite, art.total.nonfinite) == (1, 1, 2)
    assert (art.totals["head"].count, art.totals["body"].count, art.total.count) == (7, 7, 6)
    for totals in [*art.totals.values(), art.total]:
        assert all(math.isfinite(v) for v in (totals.mean, totals.rms, totals.max))  # type: ignore[arg-type]
    strict_json(attribution.artifact_path)
    logged = scalars(trainer)
    # Every optimizer step is a logging step here, so a step whose only norm of a group was non-finite logs NaN for
    # that group and the total (``GroupNormAccumulator.interval_means``: no host sync to leave the key out); every
    # other logged value, and every epoch mean, is finite.
    nonfinite = {
        (tag, s) for tag in logged if tag.startswith("grad_norm") for s, v in logged[tag] if not math.isfinite(v)
    }
    assert nonfinite == {("grad_norm/head", 1), ("grad_norm/total", 1), ("grad_norm/body", 2), ("grad_norm/total", 2)}
    assert all(math.isnan(v) for tag, s in nonfinite for step, v in logged[tag] if step == s)
    assert {tag: len(logged[tag]) for tag in logged if tag.startswith("grad_norm/")} == dict.fromkeys(
        ["grad_norm/body", "grad_norm/head", "grad_norm/total"], 8
    )
    assert [s for s, _ in logged["damping/zeta"]] == list(range(8))  # the monitor logged every step
    assert_momentum_is_critical(recorder)


class Diverging(TinyModel):
    """The loss is multiplied by 1e12 more at every step: gradients overflow float32, then the weights turn NaN."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx) * 1e12 ** min(self.global_step, 6)


def lr_ramp(opt: Any) -> dict[str, Any]:
    """lr 0.05 doubling every step, to 0.05 * 2**7 = 6.4: the critical momentum hits the floor from lr 0.25 on."""
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 2.0**step), "interval": "step"}


def test_diverging_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Diverging(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), lr_ramp)
    beta, monitor, attribution = make_callbacks("all")
    with pytest.warns(UserWarning, match="clamped to `min_momentum`"):
        trainer, recorder = fit(tmp_path, model, [beta, monitor, attribution], max_epochs=2)

    assert not all(torch.isfinite(p).all() for p in model.parameters())  # it really diverged
    assert_momentum_is_critical(recorder)
    assert recorder.momenta()[-1] == SGD_MOMENTUM_FLOOR  # still clamping at lr 6.4
    logged = scalars(trainer)
    assert [s for s, _ in logged["damping/zeta"]] == list(range(8))
    assert [r.epoch for r in monitor.history] == [0, 1]
    art = load_attribution(attribution.artifact_path)  # written, complete, valid JSON
    strict_json(attribution.artifact_path)
    assert art.complete and art.total.count + art.total.nonfinite == 8 and art.total.nonfinite > 0
    assert art.reference == {} and sorted(art.reference_skipped) == ["body", "head"]  # NaN outputs are not stats


class CrashAt(TinyModel):
    def __init__(self, step: int, error: BaseException) -> None:
        super().__init__(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
        self.crash_step, self.error = step, error

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.global_step == self.crash_step:
            raise self.error
        return super().training_step(batch, batch_idx)


def _check_incomplete(directory: Path, count: int) -> None:
    data = strict_json(directory / "attribution.json")
    assert data["complete"] is False and data["total"]["count"] == count
    assert data["history"]["epochs"] == [0]  # epoch 0 finished before the crash, epoch 1 did not
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def test_exception_mid_epoch_saves_incomplete_artifact(tmp_path: Path) -> None:
    callbacks = make_callbacks("all")
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, CrashAt(5, RuntimeError("boom")), callbacks, max_epochs=2)
    _check_incomplete(tmp_path / "tb" / "version_0", count=5)
    assert [r.epoch for r in of(callbacks, DampingRegimeMonitor).history] == [0]


def test_keyboard_interrupt_mid_epoch_saves_incomplete_artifact(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning handles Ctrl-C: on_exception hooks, then ``sys.exit(1)``.
        with pytest.raises(SystemExit):
            fit(tmp_path, CrashAt(6, KeyboardInterrupt()), make_callbacks("all"), max_epochs=2)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from the first Ctrl-C on
    _check_incomplete(tmp_path / "tb" / "version_0", count=6)


def test_exception_with_unwritable_directory_keeps_the_original_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the directory should be")
    attribution = LayerAttributionCallback(dirpath=tmp_path / "blocker", reference_batches=0)
    with pytest.warns(UserWarning, match=WRITE_FAILED), pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, CrashAt(2, RuntimeError("boom")), [attribution])
    assert attribution.artifact is not None and not attribution.artifact.complete
    assert attribution.artifact.total.count == 2 and attribution.artifact_path is None


def _check_kept(trainer: pl.Trainer, attribution: LayerAttributionCallback, tmp_path: Path) -> None:
    """The fit ended normally; the artifact is in memory and the accumulators are in the checkpoint."""
    assert trainer.state.finished and attribution.artifact_path is None
    art = attribution.artifact
    assert art is not None and art.complete and art.total.count == 8 and art.reference
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    state = torch.load(tmp_path / "after.ckpt", weights_only=False)["callbacks"][attribution.state_key]
    assert state["acc"][2, -1].item() == 8  # the step count of the whole model
    saved = save_attribution(art, tmp_path / "elsewhere" / "attribution.json")
    assert load_attribution(saved) == art


def test_output_dir_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    attribution = LayerAttributionCallback(dirpath=tmp_path / "blocker" / "runs", reference_batches=1)
    with pytest.warns(UserWarning, match=WRITE_FAILED):
        trainer, _ = fit(tmp_path, sgd_cosine()(), [*make_callbacks("beta"), attribution], max_epochs=2)
    _check_kept(trainer, attribution, tmp_path)


def test_disk_full_keeps_previous_artifact_and_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "attribution.json").write_text('{"previous": true}')

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_beta.artifact.os.fsync", no_space)
    attribution = LayerAttributionCallback(dirpath=out, reference_batches=1)
    with pytest.warns(UserWarning, match=f"{WRITE_FAILED}.*No space left on device"):
        trainer, _ = fit(tmp_path, sgd_cosine()(), [attribution, BetaMomentumCallback()], max_epochs=2)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["attribution.json"]  # no temporary file left behind
    assert json.loads((out / "attribution.json").read_text()) == {"previous": True}  # never a truncated file
    _check_kept(trainer, attribution, tmp_path)
