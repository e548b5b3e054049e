"""CPU DDP (``ddp_spawn``, gloo, two ranks) against one process over the same global batches, for each callback.

Both runs see the same data: rank ``r`` of ``w`` reads samples ``r, r + w, ...`` in order with batches of ``8 // w``
(``use_distributed_sampler=False``), so the two ranks' batches make up the single process's batch of 8, and the
mean loss makes DDP's averaged gradients the single-process gradients. The momentum, lr and damping history are
recorded on every rank and written to ``records/rank<r>.json`` (a ``ddp_spawn`` worker's callbacks do not come back
to the test process); the callbacks' own outputs are read from what rank zero wrote.

Each ``ddp_spawn`` fit costs several seconds of process start-up, so the runs are tiny (6 optimizer steps) and few.
Sharded strategies are tested in ``tests/multidevice/test_model_parallel.py`` (CPU) and ``test_sharded_gpu.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from lightning_beta.diagnosis import load_attribution
from tests.helpers import (
    SpawnDDP,
    StepRecorder,
    TinyModel,
    read_scalars,
    sgd_momentum,
    step_cosine,
    strided_loader,
    trainer_kwargs,
)

STEPS_PER_EPOCH = 3
#: Fails a collective that one rank never joins within a minute, instead of gloo's default 30 minutes.
TIMEOUT = timedelta(seconds=60)


class _StridedModel(TinyModel):
    """Rank r of w reads samples r, r + w, ... in order, in batches of GLOBAL_BATCH // w."""

    def __init__(self) -> None:
        super().__init__(sgd_momentum, step_cosine)

    def train_dataloader(self) -> Any:
        return strided_loader(self.trainer)


class _CollectiveStepModel(_StridedModel):
    """A ``training_step`` that runs a collective: every rank must call it equally often, or the ranks hang."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss_sum", self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="sum"))
        return loss


class _Dump(StepRecorder):
    """Records what each optimizer step used and writes it, with the callbacks' state, to ``rank<r>.json``."""

    def __init__(self, out: Path, callbacks: list[pl.Callback]) -> None:
        super().__init__()
        self.out = out
        self.callbacks = callbacks

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        payload: dict[str, Any] = {"world_size": trainer.world_size, "steps": self.steps}
        for cb in self.callbacks:
            if isinstance(cb, BetaMomentumCallback):
                payload["switch_step"] = cb.switch_step
            if isinstance(cb, DampingRegimeMonitor):
                payload["history"] = [asdict(r) for r in cb.history]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


def _callbacks(which: str) -> list[pl.Callback]:
    # The crossover switch (lr <= 0.01 under the cosine) happens at step 5, after the resume point of the resume test.
    made: dict[str, pl.Callback] = {
        "beta": BetaMomentumCallback(switch_at="crossover", constant_momentum=0.8),
        "damping": DampingRegimeMonitor(),
        "attribution": LayerAttributionCallback(reference_batches=2),
    }
    return list(made.values()) if which == "all" else [made[which]]


def _fit(
    root: Path,
    which: str,
    ddp: bool,
    model_cls: type[pl.LightningModule] = _StridedModel,
    ckpt_path: str | None = None,
    extra: list[pl.Callback] | None = None,
    **kwargs: Any,
) -> Path:
    """Fit on one process or two DDP ranks; return the TensorBoard log dir."""
    callbacks = _callbacks(which)
    logger = TensorBoardLogger(root, name="tb")
    overrides: dict[str, Any] = {
        "max_epochs": 2,
        "limit_train_batches": STEPS_PER_EPOCH,
        "use_distributed_sampler": False,
    }
    if ddp:
        overrides.update(strategy=SpawnDDP(timeout=TIMEOUT), devices=2)
    overrides.update(kwargs)
    every = [*callbacks, _Dump(root / "records", callbacks), *(extra or [])]
    trainer = pl.Trainer(**trainer_kwargs(root, logger=logger, callbacks=every, **overrides))
    torch.manual_seed(0)
    trainer.fit(model_cls(), ckpt_path=ckpt_path)  # built after the seed: the same initial weights in every run
    # Not ``logger.log_dir``: after ``ddp_spawn`` the test process's logger picks the next free version anew.
    (log_dir,) = (root / "tb").iterdir()
    return log_dir


def _records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((root / "records").glob("rank*.json"))]


def _tags(scalars: dict[str, list[tuple[int, float]]], *prefixes: str) -> dict[str, list[tuple[int, float]]]:
    return {tag: values for tag, values in scalars.items() if tag.startswith(prefixes)}


def _assert_artifacts_close(got: Any, want: Any) -> None:
    assert got.groups == want.groups and got.history_epochs == want.history_epochs
    assert got.global_step == want.global_step
    for name in [*want.groups, None]:
        g, w = (got.total, want.total) if name is None else (got.totals[name], want.totals[name])
        assert (g.count, g.nonfinite) == (w.count, w.nonfinite)
        for field in ("mean", "rms", "max"):
            assert getattr(g, field) == pytest.approx(getattr(w, field), rel=1e-5), (name, field)
    for g_row, w_row in zip(got.history, want.history):
        assert g_row == pytest.approx(w_row, rel=1e-5)
    assert got.history_total == pytest.approx(want.history_total, rel=1e-5)
    assert set(got.reference) == set(want.reference) == {"body", "head"}
    for name, stats in want.reference.items():
        assert got.reference[name].count == stats.count
        assert got.reference[name].mean == pytest.approx(stats.mean, rel=1e-5, abs=1e-7)
        assert got.reference[name].var == pytest.approx(stats.var, rel=1e-5, abs=1e-7)


def _assert_rank_zero_wrote_alone(root: Path, attribution: bool) -> None:
    events = sorted(root.rglob("events.out.tfevents*"))
    assert len(events) == 1, events
    assert [p.name for p in (root / "tb").iterdir()] == ["version_0"]
    assert len(list(root.rglob("attribution.json"))) == int(attribution)


# ------------------------------------------------------------------ DDP equals one process


@pytest.mark.ddp
@pytest.mark.parametrize("which", ["beta", "damping", "attribution", "all"])
def test_ddp_matches_single_process(tmp_path: Path, which: str) -> None:
    single_dir = _fit(tmp_path / "single", which, ddp=False)
    ddp_dir = _fit(tmp_path / "ddp", which, ddp=True)

    (single,) = _records(tmp_path / "single")
    rank0, rank1 = _records(tmp_path / "ddp")
    assert single["world_size"] == 1 and rank0["world_size"] == rank1["world_size"] == 2
    # lr and momentum of every optimizer step: identical on both ranks and to the single process (exact floats).
    assert len(single["steps"]) == 2 * STEPS_PER_EPOCH
    assert rank0["steps"] == rank1["steps"] == single["steps"]
    if which in ("beta", "all"):
        assert rank0["switch_step"] == rank1["switch_step"] == single["switch_step"] == 5
        assert [s["groups"][0]["momentum"] for s in single["steps"]][5] == 0.8
    if which in ("damping", "all"):
        assert len(single["history"]) == 2
        assert rank0["history"] == rank1["history"] == single["history"]

    single_scalars, ddp_scalars = read_scalars(single_dir), read_scalars(ddp_dir)
    exact = _tags(single_scalars, "beta/", "damping/")
    assert bool(exact) == (which != "attribution") and _tags(ddp_scalars, "beta/", "damping/") == exact
    norms = _tags(single_scalars, "grad_norm/")
    assert set(_tags(ddp_scalars, "grad_norm/")) == set(norms)
    for tag, values in norms.items():
        assert [s for s, _ in ddp_scalars[tag]] == [s for s, _ in values]
        assert [v for _, v in ddp_scalars[tag]] == pytest.approx([v for _, v in values], rel=1e-5), tag

    attribution = which in ("attribution", "all")
    if attribution:
        want = load_attribution(single_dir / "attribution.json")
        _assert_artifacts_close(load_attribution(ddp_dir / "attribution.json"), want)
    _assert_rank_zero_wrote_alone(tmp_path / "ddp", attribution)
    if which == "all":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(ddp_dir), size_guidance={"tensors": 0, "images": 0})
        acc.Reload()
        assert len(acc.Tensors("damping/summary/text_summary")) == 1
        assert len(acc.Tensors("attribution/ranking/text_summary")) == 1
        assert len(acc.Images("attribution/heatmap")) == 1
        assert acc.Tensors("custom_scalars__config__")


@pytest.mark.ddp
def test_ddp_resume_matches_straight_run(tmp_path: Path) -> None:
    # The straight run is one process: the test above shows it equals the DDP run step for step.
    straight_dir = _fit(tmp_path / "straight", "all", ddp=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_top_k=-1)
    _fit(tmp_path / "first", "all", ddp=True, max_epochs=1, enable_checkpointing=True, extra=[checkpoint])
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed_dir = _fit(tmp_path / "resumed", "all", ddp=True, ckpt_path=str(ckpt))

    (straight,) = _records(tmp_path / "straight")
    rank0, rank1 = _records(tmp_path / "resumed")
    assert rank0["steps"] == rank1["steps"] == straight["steps"][STEPS_PER_EPOCH:]
    assert rank0["switch_step"] == straight["switch_step"] == 5
    # The epoch-0 summary comes back from the checkpoint, epoch 1 is the resumed run's.
    assert rank0["history"] == rank1["history"] == straight["history"]
    _assert_artifacts_close(
        load_attribution(resumed_dir / "attribution.json"), load_attribution(straight_dir / "attribution.json")
    )
    straight_zeta = dict(read_scalars(straight_dir)["damping/zeta"])
    resumed_zeta = dict(read_scalars(resumed_dir)["damping/zeta"])
    assert sorted(resumed_zeta) == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    assert resumed_zeta == {step: straight_zeta[step] for step in resumed_zeta}
    _assert_rank_zero_wrote_alone(tmp_path / "resumed", attribution=True)


@pytest.mark.ddp
def test_ddp_reference_pass_runs_on_every_rank(tmp_path: Path) -> None:
    # The reference statistics run ``training_step`` after training. Run on rank zero alone, a collective inside it
    # (here ``strategy.reduce``) would wait for the other rank forever; every rank runs the pass and their sums are
    # reduced, so it completes and equals the single process's statistics.
    single_dir = _fit(tmp_path / "single", "attribution", ddp=False, model_cls=_CollectiveStepModel, max_epochs=1)
    ddp_dir = _fit(tmp_path / "ddp", "attribution", ddp=True, model_cls=_CollectiveStepModel, max_epochs=1)
    _assert_artifacts_close(
        load_attribution(ddp_dir / "attribution.json"), load_attribution(single_dir / "attribution.json")
    )
