from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_beta._logging import is_logging_step
from lightning_beta.artifact import load_attribution
from lightning_beta.callbacks import _attribution_outputs
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback, _copies, check_strategy
from lightning_beta.figures import attribution_heatmap
from lightning_beta.functional.grad_norms import add_group_powers_
from lightning_beta.layer_groups import group_parameters
from tests.helpers import SpawnDDP, TinyModel, make_loader, read_scalars, trainer_kwargs


class GradRecorder(pl.Callback):
    """Independent recomputation: per-parameter ``torch.linalg.vector_norm`` in float64, then per group.

    Also records whether Lightning logs at each step (``is_logging_step``), which delimits the logging intervals.
    """

    def __init__(self, group_by: Any = "auto", norm_type: float = 2.0) -> None:
        self.group_by = group_by
        self.norm_type = norm_type
        self.steps: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.groups = group_parameters(pl_module, self.group_by)
        self.named = dict(pl_module.named_parameters())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = scaler.get_scale()
        norms: dict[str, float | None] = {}
        every: list[Tensor] = []
        for group, names in self.groups.items():
            parts = [
                torch.linalg.vector_norm(self.named[n].grad.double(), self.norm_type) / scale
                for n in names
                if self.named[n].grad is not None
            ]
            every += parts
            norms[group] = torch.linalg.vector_norm(torch.stack(parts), self.norm_type).item() if parts else None
        total = torch.linalg.vector_norm(torch.stack(every), self.norm_type).item()
        self.steps.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "norms": norms,
                "total": total,
                "logs": is_logging_step(trainer),
            }
        )

    def values(self, group: str | None, epoch: int | None = None) -> list[float]:
        out = []
        for s in self.steps:
            v = s["total"] if group is None else s["norms"][group]
            if v is not None and math.isfinite(v) and (epoch is None or s["epoch"] == epoch):
                out.append(v)
        return out

    def interval_means(self, group: str | None) -> list[float]:
        """The mean norm over each logging interval (the steps since the previous logging step), in order."""
        out, acc = [], []
        for s in self.steps:
            v = s["total"] if group is None else s["norms"][group]
            if v is not None:
                acc.append(v)
            if s["logs"]:
                if acc:
                    out.append(sum(acc) / len(acc))
                acc = []
        return out


def _check_artifact_against(art: Any, rec: GradRecorder) -> None:
    assert list(art.groups) == list(rec.groups)
    for name, params in rec.groups.items():
        assert art.groups[name] == sum(rec.named[n].numel() for n in params)
    for name in [*rec.groups, None]:
        vals = rec.values(name)
        tot = art.total if name is None else art.totals[name]
        assert tot.count == len(vals)
        if not vals:
            assert tot.mean is None and tot.rms is None and tot.max is None
            continue
        assert tot.mean == pytest.approx(sum(vals) / len(vals), rel=1e-5)
        assert tot.rms == pytest.approx(math.sqrt(sum(v * v for v in vals) / len(vals)), rel=1e-5)
        assert tot.max == pytest.approx(max(vals), rel=1e-5)
    epochs = sorted({s["epoch"] for s in rec.steps})
    assert art.history_epochs == epochs
    for row, total, epoch in zip(art.history, art.history_total, epochs):
        for value, name in zip(row, rec.groups):
            vals = rec.values(name, epoch)
            assert value == (pytest.approx(sum(vals) / len(vals), rel=1e-5) if vals else None)
        vals = rec.values(None, epoch)
        assert total == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def _check_logged(scalars: dict[str, list[tuple[int, float]]], rec: GradRecorder, groups: list[str]) -> None:
    """``grad_norm/*`` sit on the step axis of the model's own ``self.log("train_loss")``, with the interval means."""
    loss_steps = [s for s, _ in scalars["train_loss"]]
    for group in [*groups, None]:
        logged = scalars[f"grad_norm/{group or 'total'}"]
        assert [s for s, _ in logged] == loss_steps
        assert [v for _, v in logged] == pytest.approx(rec.interval_means(group), rel=1e-5)


class FrozenMidModel(TinyModel):
    """Body, a frozen middle layer and a head; the optimizer has two param groups."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer_fn=self._two_groups)
        self.kind = optimizer
        self.mid = nn.Linear(16, 16)
        self.mid.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.mid(self.body(x))))

    @staticmethod
    def _two_groups(m: Any) -> Any:
        groups = [
            {"params": list(m.body.parameters()), "lr": 0.05},
            {"params": list(m.head.parameters()), "lr": 0.01},
        ]
        if m.kind == "adam":
            return torch.optim.Adam(groups, lr=1e-2)
        return torch.optim.SGD(groups, momentum=0.9)


def test_logged_and_saved_norms_match_recomputation_sgd(tmp_path: Any) -> None:
    cb, rec = LayerAttributionCallback(), GradRecorder()
    logger = TensorBoardLogger(tmp_path, name="tb")
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=3, callbacks=[cb, rec])
    trainer = pl.Trainer(**kwargs)
    trainer.fit(TinyModel(), make_loader())
    assert cb.artifact_path == tmp_path / "tb" / "version_0" / "attribution.json"
    art = load_attribution(cb.artifact_path)
    assert art.complete and art.global_step == 8 and art.history_epochs == [0, 1]
    _check_artifact_against(art, rec)
    scalars = read_scalars(logger.log_dir)
    assert [s["step"] for s in rec.steps if s["logs"]] == [2, 5]  # Lightning's schedule: every 3rd step
    _check_logged(scalars, rec, ["body", "head"])
    # epoch means, once per epoch, under their own keys
    for group in ["body", "head", None]:
        epoch_means = [v for _, v in scalars[f"grad_norm_epoch/{group or 'total'}"]]
        expected = [sum(rec.values(group, e)) / len(rec.values(group, e)) for e in (0, 1)]
        assert epoch_means == pytest.approx(expected, rel=1e-5)
    # reference statistics for both module groups, one feature per output unit
    assert set(art.reference) == {"body", "head"} and len(art.reference["head"].mean) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "attribution/heatmap" in acc.Tags()["images"]
    assert any("attribution/ranking" in tag for tag in acc.Tags()["tensors"])


def test_log_every_n_steps_argument_is_deprecated() -> None:
    with pytest.deprecated_call(match=r"log_every_n_steps=...\) is deprecated and ignored"):
        LayerAttributionCallback(log_every_n_steps=3)


def test_trainer_log_every_n_steps_zero_logs_epoch_means_only(tmp_path: Any) -> None:
    cb, rec = LayerAttributionCallback(reference_batches=0), GradRecorder()
    logger = TensorBoardLogger(tmp_path, name="tb")
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=0, callbacks=[cb, rec])
    trainer = pl.Trainer(**kwargs)
    trainer.fit(TinyModel(), make_loader())
    scalars = read_scalars(logger.log_dir)
    assert not [tag for tag in scalars if tag.startswith("grad_norm/")]
    assert "grad_norm/total" not in trainer.callback_metrics
    mean = sum(rec.values(None)) / len(rec.values(None))
    assert trainer.callback_metrics["grad_norm_epoch/total"].item() == pytest.approx(mean, rel=1e-5)


def test_model_checkpoint_monitors_grad_norms(tmp_path: Any) -> None:
    cb, rec = LayerAttributionCallback(reference_batches=0), GradRecorder()
    last = ModelCheckpoint(dirpath=tmp_path / "last", monitor="grad_norm/total", mode="min", save_top_k=1)
    epoch = ModelCheckpoint(dirpath=tmp_path / "epoch", monitor="grad_norm_epoch/total", mode="min", save_top_k=1)
    kwargs = trainer_kwargs(
        tmp_path, max_epochs=3, log_every_n_steps=2, enable_checkpointing=True, callbacks=[cb, rec, last, epoch]
    )
    pl.Trainer(**kwargs).fit(TinyModel(), make_loader())
    # "grad_norm/total" at epoch end is the mean of the epoch's last logging interval (steps 2-3 of 4)
    last_intervals = [rec.interval_means(None)[2 * e + 1] for e in range(3)]
    assert last.best_model_score.item() == pytest.approx(min(last_intervals), rel=1e-5)
    epoch_means = [sum(rec.values(None, e)) / 4 for e in range(3)]
    assert epoch.best_model_score.item() == pytest.approx(min(epoch_means), rel=1e-5)
    assert len(list((tmp_path / "last").iterdir())) == len(list((tmp_path / "epoch").iterdir())) == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulation_two_param_groups_frozen_module(tmp_path: Any, optimizer: str) -> None:
    cb, rec = LayerAttributionCallback(reference_batches=2), GradRecorder()
    logger = TensorBoardLogger(tmp_path, name="tb")
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=2, logger=logger, callbacks=[cb, rec])
    trainer = pl.Trainer(**kwargs)
    trainer.fit(FrozenMidModel(optimizer), make_loader())
    art = load_attribution(cb.artifact_path)
    assert list(art.groups) == ["body", "head", "mid"]
    assert len(rec.steps) == 4 == art.total.count  # once per optimizer step, not per micro-batch
    assert art.totals["mid"].count == 0 and art.totals["mid"].mean is None and art.groups["mid"] == 16 * 16 + 16
    assert all(row[2] is None for row in art.history)
    _check_artifact_against(art, rec)
    scalars = read_scalars(logger.log_dir)
    _check_logged(scalars, rec, ["body", "head"])
    assert "grad_norm/mid" not in scalars and "grad_norm_epoch/mid" not in scalars  # never a gradient: never logged
    assert "mid" in art.reference  # the frozen module still has reference statistics


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_other_norm_types(tmp_path: Any, norm_type: float) -> None:
    cb, rec = LayerAttributionCallback(norm_type=norm_type, reference_batches=0), GradRecorder(norm_type=norm_type)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, rec])).fit(TinyModel(), make_loader())
    art = load_attribution(cb.artifact_path)
    assert art.norm_type == norm_type and art.reference == {} and art.reference_skipped == ["body", "head"]
    _check_artifact_against(art, rec)


class _Poison(pl.Callback):
    """Puts an inf into the head's weight gradient at step 1, before the attribution callback reads it."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == 1:
            pl_module.head.weight.grad[0, 0] = float("inf")


class _Cure(pl.Callback):
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == 1:
            pl_module.head.weight.grad.zero_()


def test_nonfinite_norms_counted_apart(tmp_path: Any) -> None:
    cb, rec = LayerAttributionCallback(reference_batches=0), GradRecorder()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[_Poison(), cb, rec, _Cure()]))
    trainer.fit(TinyModel(), make_loader())
    art = load_attribution(cb.artifact_path)
    assert art.totals["head"].nonfinite == 1 and art.total.nonfinite == 1 and art.totals["body"].nonfinite == 0
    assert art.totals["head"].count == 3 and art.totals["body"].count == 4 and art.total.count == 3
    assert math.isfinite(art.totals["head"].mean)
    _check_artifact_against(art, rec)  # the recorder drops the non-finite values, like the callback


def _guard_host_copies(monkeypatch: pytest.MonkeyPatch, state: dict[str, Any]) -> None:
    """Make every host copy of a tensor raise while ``state["armed"]`` is true."""

    def guard(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if state["armed"]:
                raise AssertionError(f"Tensor.{name} called in a non-logging step")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ["item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"]:
        monkeypatch.setattr(torch.Tensor, name, guard(name))


def test_no_host_sync_on_non_logging_steps(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"armed": False, "guarded_steps": 0}
    _guard_host_copies(monkeypatch, state)

    class Arm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            if not is_logging_step(trainer):
                state["armed"] = True
                state["guarded_steps"] += 1

    class Disarm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            state["armed"] = False

    cb = LayerAttributionCallback(reference_batches=1)
    logger = TensorBoardLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=6, logger=logger, log_every_n_steps=4)
    # the frozen module makes the first step build a new index, which must not sync either
    pl.Trainer(**kwargs, callbacks=[Arm(), cb, Disarm()]).fit(FrozenMidModel("adam"), make_loader())
    assert state["guarded_steps"] == 12 - 3  # steps 3, 7, 11 log
    assert [s for s, _ in read_scalars(logger.log_dir)["grad_norm/body"]] == [3, 7, 11]


def test_buffer_shorter_than_log_interval_no_host_sync(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 3-row step buffer fills (and is reduced on the device) several times per 7-step logging interval.
    armed = {"armed": False}
    _guard_host_copies(monkeypatch, armed)

    class Arm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            armed["armed"] = not is_logging_step(trainer)

    class Disarm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            armed["armed"] = False

    cb, rec = LayerAttributionCallback(reference_batches=0), GradRecorder()
    cb._buffer_rows = 3
    logger = TensorBoardLogger(tmp_path, name="tb")
    kwargs = trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=8, logger=logger, log_every_n_steps=7)
    pl.Trainer(**kwargs, callbacks=[Arm(), cb, Disarm(), rec]).fit(TinyModel(), make_loader())
    assert cb._acc is not None and len(rec.steps) == 24
    art = load_attribution(cb.artifact_path)
    assert art.total.count == 24
    _check_artifact_against(art, rec)
    scalars = read_scalars(logger.log_dir)
    assert [s for s, _ in scalars["grad_norm/total"]] == [6, 13, 20]
    _check_logged(scalars, rec, ["body", "head"])


def test_resume_writes_same_artifact(tmp_path: Any) -> None:
    def model() -> TinyModel:
        torch.manual_seed(0)
        return TinyModel(optimizer_fn=lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))

    straight = LayerAttributionCallback(dirpath=tmp_path / "straight")
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[straight])).fit(model(), make_loader())

    first = LayerAttributionCallback(dirpath=tmp_path / "first")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[first]))
    trainer.fit(model(), make_loader())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = LayerAttributionCallback(dirpath=tmp_path / "resumed")
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[resumed])).fit(
        model(), make_loader(), ckpt_path=ckpt
    )

    a = load_attribution(straight.artifact_path).to_dict()
    b = load_attribution(resumed.artifact_path).to_dict()
    assert a["history"]["epochs"] == b["history"]["epochs"] == [0, 1, 2]
    assert a["total"]["count"] == b["total"]["count"] == 12
    assert a["intervals"]["steps"] == b["intervals"]["steps"] == [0, 1, 2, 3]  # the first epoch's intervals
    assert _approx_equal(a, b)


def test_resume_from_a_state_of_the_previous_release(tmp_path: Any) -> None:
    # The previous release's state (version 1) had no interval history: it resumes, with none.
    cb = LayerAttributionCallback(reference_batches=0, dirpath=tmp_path / "first")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb]))
    trainer.fit(TinyModel(), make_loader())
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("LayerAttributionCallback")]
    state = checkpoint["callbacks"][key]
    assert state["version"] == 1 and state["interval_steps"] == [0, 1, 2, 3]
    old = {k: v for k, v in state.items() if k not in ("interval_steps", "interval_history")}
    checkpoint["callbacks"][key] = old
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed = LayerAttributionCallback(reference_batches=0, dirpath=tmp_path / "resumed")
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, callbacks=[resumed])
    pl.Trainer(**kwargs).fit(TinyModel(), make_loader(), ckpt_path=tmp_path / "old.ckpt")
    art = load_attribution(resumed.artifact_path)
    assert art.total.count == 8 and art.history_epochs == [0, 1] and art.interval_steps == []


def _approx_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


def test_state_dict_round_trip_and_group_mismatch(tmp_path: Any) -> None:
    cb = LayerAttributionCallback(reference_batches=0)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(TinyModel(), make_loader())
    state = cb.state_dict()
    assert state["acc"].device.type == "cpu" and state["groups"] == ["body", "head"]
    other = LayerAttributionCallback(reference_batches=0)
    other.load_state_dict(state)
    assert other.state_dict()["history"] == []  # pending until the fit resolves the groups
    with pytest.raises(ValueError, match="state has version 7; this release reads version 1"):
        other.load_state_dict({**state, "version": 7})
    # a checkpoint of another model (same `group_by`, so the same state key) cannot be resumed
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb]))
    trainer.fit(TinyModel(), make_loader())
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    model = FrozenMidModel()
    model.strict_loading = False
    resumed = LayerAttributionCallback(reference_batches=0)
    with pytest.raises(MisconfigurationException, match=r"checkpoint has layer groups \['body', 'head'\]"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[resumed])).fit(
            model, make_loader(), ckpt_path=tmp_path / "tiny.ckpt"
        )


def test_resume_mid_buffer_is_exact(tmp_path: Any) -> None:
    # Every batch is the same, so a mid-epoch resume (Lightning restarts the DataLoader) sees the same gradients.
    # The checkpoint at step 6 is written while step 5's row is buffered (last reduced at the log of step 4).
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x.repeat(4, 1), (x[:, 0] > 0).long().repeat(4))

    def run(name: str, ckpt_path: Any = None, **kwargs: Any) -> tuple[LayerAttributionCallback, dict[str, Any]]:
        cb = LayerAttributionCallback(reference_batches=0, dirpath=tmp_path / name)
        cb._buffer_rows = 4
        logger = TensorBoardLogger(tmp_path / name, name="tb")
        callbacks = [cb, *kwargs.pop("callbacks", [])]
        kwargs = trainer_kwargs(
            tmp_path / name, max_epochs=3, logger=logger, log_every_n_steps=5, callbacks=callbacks, **kwargs
        )
        torch.manual_seed(0)
        pl.Trainer(**kwargs).fit(TinyModel(), DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return cb, read_scalars(logger.log_dir)

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    plain, plain_scalars = run("plain")
    straight, straight_scalars = run("straight", callbacks=[ckpt], enable_checkpointing=True)
    resumed, resumed_scalars = run("resumed", ckpt_path=tmp_path / "ckpt" / "epoch=1-step=6.ckpt")
    a, b, c = (load_attribution(cb.artifact_path).to_dict() for cb in (plain, straight, resumed))
    assert a["total"]["count"] == 12 and a["history"]["epochs"] == [0, 1, 2]
    assert a == b == c  # bit for bit, wherever the rows were reduced
    assert plain_scalars == straight_scalars
    for tag, points in resumed_scalars.items():
        if tag.startswith("grad_norm/"):
            assert points == [(s, v) for s, v in straight_scalars[tag] if s >= 6]


class _Crash(TinyModel):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.global_step == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_exception_writes_incomplete_artifact(tmp_path: Any) -> None:
    cb = LayerAttributionCallback()
    with pytest.raises(RuntimeError, match="boom"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(_Crash(), make_loader())
    art = load_attribution(tmp_path / "attribution.json")
    assert not art.complete and art.total.count == 3 and art.reference == {}


def test_unwritable_directory_warns_and_keeps_the_artifact(tmp_path: Any) -> None:
    (tmp_path / "file").write_text("not a directory")
    cb = LayerAttributionCallback(reference_batches=0, dirpath=tmp_path / "file")
    with pytest.warns(UserWarning, match=r"write it with `lightning_beta\.artifact\.save_attribution`"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(TinyModel(), make_loader())
    assert cb.artifact is not None and cb.artifact.total.count == 4 and cb.artifact_path is None


def test_fast_dev_run_writes_nothing(tmp_path: Any) -> None:
    cb = LayerAttributionCallback(reference_batches=1)
    kwargs = trainer_kwargs(tmp_path, fast_dev_run=2, logger=TensorBoardLogger(tmp_path))
    pl.Trainer(**kwargs, callbacks=[cb]).fit(TinyModel(), make_loader())
    assert cb.artifact is not None and cb.artifact.total.count == 2  # kept in memory
    assert cb.artifact_path is None and list(tmp_path.iterdir()) == []


def test_csv_logger_run_directory(tmp_path: Any) -> None:
    paths = []
    for _ in range(2):
        cb = LayerAttributionCallback(reference_batches=0)
        logger = CSVLogger(tmp_path, name="csv")
        pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[cb])).fit(TinyModel(), make_loader())
        assert cb.artifact_path == Path(logger.log_dir) / "attribution.json"
        paths.append(cb.artifact_path)
    assert paths[0] != paths[1] and all(p.exists() for p in paths)  # each run keeps its own


class _Client:
    """Records what an ``MlflowClient`` was asked to store."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.calls.append(("log_artifact", run_id, Path(local_path).read_bytes()))

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self.calls.append(("log_figure", run_id, artifact_file, figure))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.calls.append(("log_text", run_id, artifact_file, text))

    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("log_batch",))


class _MLflow(MLFlowLogger):
    """``MLFlowLogger``'s public attributes over a recording client (mlflow is not a test dependency): a file store
    under ``save_dir``, experiment ``name`` = its id, ``version`` = the run id."""

    def __init__(self, save_dir: Path, run_id: str) -> None:
        Logger.__init__(self)
        self._save_dir, self._run_id, self.client = str(save_dir), run_id, _Client()
        self._log_model, self._checkpoint_callback, self._prefix = False, None, ""

    @property
    def experiment(self) -> Any:
        return self.client

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return "0"

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def name(self) -> str:
        return self.experiment_id

    @property
    def version(self) -> str:
        return self._run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.client.calls.append(("log_metrics", dict(metrics), step))

    def log_hyperparams(self, params: Any) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass


def test_mlflow_artifact_in_its_own_run(tmp_path: Any) -> None:
    runs = {}
    for run_id in ["run-a", "run-b"]:
        cb, logger = LayerAttributionCallback(reference_batches=0), _MLflow(tmp_path / "mlruns", run_id)
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[cb])).fit(
            TinyModel(), make_loader()
        )
        # the run's own directory, as ModelCheckpoint places checkpoints: never mlruns/attribution.json
        assert cb.artifact_path == tmp_path / "mlruns" / "0" / run_id / "attribution.json"
        runs[run_id] = logger.client.calls
    for run_id, calls in runs.items():
        stored = [c for c in calls if c[0] == "log_artifact"]
        # the artifact, then the probe file it names
        assert [c[1] for c in stored] == [run_id, run_id] and b'"lightning_beta.layer_attribution"' in stored[0][2]
        assert torch.load(io.BytesIO(stored[1][2]), weights_only=True)["order"] == ["body", "head"]
        (figure,) = [c for c in calls if c[0] == "log_figure"]
        assert figure[1:3] == (run_id, "attribution_heatmap.png")
        assert [t.get_text() for t in figure[3].axes[0].get_yticklabels()] == ["body", "head"]
        assert any(c[0] == "log_text" and c[1] == run_id and "| rank |" in c[3] for c in calls)
        logged = [key for c in calls if c[0] == "log_metrics" for key in c[1]]
        assert "grad_norm/total" in logged and "grad_norm_epoch/total" in logged  # through Lightning
    assert (tmp_path / "mlruns" / "0" / "run-a" / "attribution.json").exists()


class _Run:
    def __init__(self) -> None:
        self.saved: list[tuple[str, str]] = []

    def save(self, glob_str: str, base_path: str | None = None, policy: str = "live") -> None:
        self.saved.append((glob_str, Path(glob_str).read_bytes()))


class _Wandb(WandbLogger):
    """``WandbLogger``'s public attributes over a recording run (wandb is not a test dependency)."""

    def __init__(self, save_dir: Path, run_id: str) -> None:
        Logger.__init__(self)
        self._dir, self._id, self.run, self.images = str(save_dir), run_id, _Run(), []  # type: ignore[var-annotated]
        self._log_model, self._checkpoint_callback, self._prefix = False, None, ""

    @property
    def experiment(self) -> Any:
        return self.run

    @property
    def save_dir(self) -> str:
        return self._dir

    @property
    def name(self) -> str:
        return "project"

    @property
    def version(self) -> str:
        return self._id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any) -> None:
        pass

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self.images.append((key, images))

    def finalize(self, status: str) -> None:
        pass


def test_wandb_artifact_and_image_in_its_run(tmp_path: Any) -> None:
    cb, logger = LayerAttributionCallback(reference_batches=0), _Wandb(tmp_path / "wandb", "abc123")
    pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[cb])).fit(TinyModel(), make_loader())
    assert cb.artifact_path == tmp_path / "wandb" / "project" / "abc123" / "attribution.json"
    (path, text), (probe, _) = logger.run.saved
    assert path == str(cb.artifact_path) and b'"schema_version": 3' in text
    assert probe == str(cb.artifact_path.parent / "attribution.probe.pt")
    ((key, (figure,)),) = logger.images
    assert key == "attribution/heatmap" and figure.axes[0].get_xlabel() == "optimizer step"


def test_heatmap_figure_labels(tmp_path: Any) -> None:
    cb = LayerAttributionCallback(reference_batches=0)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[cb])).fit(FrozenMidModel(), make_loader())
    assert cb.artifact is not None
    figure = attribution_heatmap(cb.artifact)
    ax, bar = figure.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["body", "head", "mid"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "layer group")
    assert bar.get_ylabel() == "log10 mean gradient L2 norm"
    data = ax.images[0].get_array()
    assert data.shape == (3, 3) and data.mask[2].all()  # the frozen group: no value, drawn blank
    assert data[0, 1] == pytest.approx(math.log10(cb.artifact.history[1][0]))


def test_heatmap_of_a_one_epoch_run_shows_logging_intervals(tmp_path: Any) -> None:
    cb = LayerAttributionCallback(reference_batches=0)
    kwargs = trainer_kwargs(tmp_path, limit_train_batches=8, log_every_n_steps=2, callbacks=[cb])
    pl.Trainer(**kwargs).fit(TinyModel(), make_loader())
    assert cb.artifact is not None and cb.artifact.interval_steps == [1, 3, 5, 7]
    ax = attribution_heatmap(cb.artifact).axes[0]
    assert ax.get_xlabel() == "optimizer step"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "5", "7"]


def test_without_matplotlib_the_image_is_skipped(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_attribution_outputs, "matplotlib_available", lambda: False)
    logger = TensorBoardLogger(tmp_path)
    cb = LayerAttributionCallback(reference_batches=0)
    with caplog.at_level(logging.INFO):
        pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[cb])).fit(TinyModel(), make_loader())
    assert sum("matplotlib is not installed" in r.getMessage() for r in caplog.records) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert acc.Tags()["images"] == [] and any("attribution/ranking" in t for t in acc.Tags()["tensors"])


def test_sharded_strategies() -> None:
    # FSDP1 and DeepSpeed keep gradients in their own flat or partitioned buffers: refused.
    for strategy in [FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)]:  # needs no deepspeed
        with pytest.raises(MisconfigurationException, match=f"sharded strategy {type(strategy).__name__}"):
            check_strategy(strategy)
    check_strategy(ModelParallelStrategy())  # FSDP2: supported


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_amp_norms_are_unscaled(tmp_path: Any, fused: bool) -> None:
    cb, rec = LayerAttributionCallback(reference_batches=1), GradRecorder()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model = TinyModel(optimizer_fn=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=fused))
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    pl.Trainer(**trainer_kwargs(tmp_path, plugins=[plugin], callbacks=[cb, rec])).fit(model, make_loader())
    art = load_attribution(cb.artifact_path)
    _check_artifact_against(art, rec)
    assert art.total.max < 10.0  # the scale (1024) is divided out


def test_regex_groups_reference_only_for_modules(tmp_path: Any) -> None:
    group_by = {"first": [r"body\.0\.weight"], "head": [r"head\."]}
    cb, rec = LayerAttributionCallback(group_by=group_by, reference_batches=1), GradRecorder(group_by)
    with pytest.warns(UserWarning, match="grouped as 'other'"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, rec])).fit(TinyModel(), make_loader())
    art = load_attribution(cb.artifact_path)
    assert list(art.groups) == ["first", "head", "other"] and art.groups["other"] == 16
    assert set(art.reference) == {"head"} and art.reference_skipped == ["first", "other"]
    assert art.group_by == {"first": [r"body\.0\.weight"], "head": [r"head\."]}
    _check_artifact_against(art, rec)


class _TotalModel(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.total = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.total(super().forward(x))


def test_group_named_total_raises(tmp_path: Any) -> None:
    with pytest.raises(MisconfigurationException, match="named 'total'"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[LayerAttributionCallback()])).fit(_TotalModel(), make_loader())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"group_by": "layers"}, ValueError, "`group_by` must be"),
        ({"group_by": 0}, ValueError, "module depth must be >= 1, got 0"),
        ({"group_by": 1.5}, TypeError, "got float"),
        ({"norm_type": 0}, ValueError, "`norm_type` must be > 0 or inf, got 0"),
        ({"norm_type": "fro"}, TypeError, "`norm_type` must be a float, got str"),
        ({"log_every_n_steps": 0}, ValueError, "`log_every_n_steps` must be >= 1, got 0"),  # deprecated, still checked
        ({"log_every_n_steps": 2.0}, TypeError, "`log_every_n_steps` must be None or an int, got float"),
        ({"reference_batches": -1}, ValueError, "`reference_batches` must be >= 0, got -1"),
        ({"reference_batches": True}, TypeError, "`reference_batches` must be an int, got bool"),
        ({"dirpath": 3}, TypeError, "`dirpath` must be None, a str or os.PathLike, got int"),
        ({"filename": ""}, ValueError, "`filename` must be a non-empty file name"),
        ({"filename": "a/b.json"}, ValueError, "without a directory, got 'a/b.json'"),
        ({"filename": None}, TypeError, "`filename` must be a str, got NoneType"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LayerAttributionCallback(**kwargs)


def _sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.05)


class _ShardedDataModel(TinyModel):
    """Rank r reads samples r, r + 2, ... in order, so the two ranks' batches make up the single-process batch."""

    def train_dataloader(self) -> Any:
        loader = make_loader(batch_size=8)
        sampler = DistributedSampler(
            loader.dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(loader.dataset, batch_size=4, sampler=sampler)


@pytest.mark.ddp
def test_ddp_norms_equal_single_process_full_batch(tmp_path: Any) -> None:
    # Two ranks with half batches see the averaged gradient of the full batch: no collective is needed.
    single = LayerAttributionCallback(reference_batches=0, dirpath=tmp_path / "single")
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[single])).fit(TinyModel(_sgd), make_loader(batch_size=8))
    ddp = LayerAttributionCallback(reference_batches=1)  # directory from the logger's run, a broadcast
    kwargs = trainer_kwargs(tmp_path / "ddp", strategy=SpawnDDP(), devices=2, use_distributed_sampler=False)
    torch.manual_seed(0)
    pl.Trainer(**kwargs, callbacks=[ddp]).fit(_ShardedDataModel(_sgd))
    a = load_attribution(tmp_path / "single" / "attribution.json")
    b = load_attribution(tmp_path / "ddp" / "attribution.json")
    assert b.total.count == a.total.count == 4
    assert set(b.reference) == {"body", "head"}
    for name in [*a.groups, None]:
        ta, tb = (a.total, b.total) if name is None else (a.totals[name], b.totals[name])
        assert tb.mean == pytest.approx(ta.mean, rel=1e-5)
        assert tb.max == pytest.approx(ta.max, rel=1e-5)


@pytest.mark.ddp
def test_model_parallel_inf_norm_is_the_max_over_shards(tmp_path: Any) -> None:
    # FSDP2 over two CPU ranks: each rank's shard maxima are combined by one all-reduce (max) per reduction of the
    # step buffer; one process over the same global batches holds the whole gradients. (L2 under ModelParallel is
    # checked against the gathered full gradients in tests/multidevice/test_model_parallel.py.)
    from tests.multidevice.model_parallel import SpawnModelParallel, assert_rank_zero_wrote_alone, fit

    def callback() -> LayerAttributionCallback:
        cb = LayerAttributionCallback(norm_type=math.inf, reference_batches=0)
        cb._buffer_rows = 2  # reduced mid-epoch too: the collectives of every rank must match
        return cb

    sharded = load_attribution(fit(tmp_path / "sharded", [callback()], SpawnModelParallel()) / "attribution.json")
    single = load_attribution(fit(tmp_path / "single", [callback()]) / "attribution.json")
    assert sharded.total.count == single.total.count == 6
    for name in [*single.groups, None]:
        want, got = (single.total, sharded.total) if name is None else (single.totals[name], sharded.totals[name])
        assert (got.mean, got.max) == (pytest.approx(want.mean, rel=1e-5), pytest.approx(want.max, rel=1e-5))
    for got_row, want_row in zip(sharded.history, single.history, strict=True):
        assert got_row == pytest.approx(want_row, rel=1e-5)
    assert_rank_zero_wrote_alone(tmp_path / "sharded", attribution=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_on_non_logging_steps(tmp_path: Any) -> None:
    class Arm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            if not is_logging_step(trainer):
                torch.cuda.set_sync_debug_mode("error")

    class Disarm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            torch.cuda.set_sync_debug_mode("default")

    cb, rec = LayerAttributionCallback(), GradRecorder()
    kwargs = trainer_kwargs(
        tmp_path, max_epochs=2, accelerator="gpu", logger=TensorBoardLogger(tmp_path), log_every_n_steps=4
    )
    try:
        pl.Trainer(**kwargs, callbacks=[Arm(), cb, Disarm(), rec]).fit(FrozenMidModel("adam"), make_loader())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cb.artifact_path is not None
    _check_artifact_against(load_attribution(cb.artifact_path), rec)


def test_copies_weight_a_sum_over_ranks() -> None:
    # A plain tensor under a sharded strategy is held whole by every rank: its powers count 1/world each.
    assert _copies(torch.zeros(3), world_size=4) == 4
    out = torch.zeros(2)
    add_group_powers_(
        out, [torch.tensor([3.0, 4.0]), torch.tensor([2.0])], torch.tensor([0, 1]), 2.0, torch.tensor([0.5, 0.25])
    )
    assert out.tolist() == [12.5, 1.0]
