from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_beta._loggers import is_logging_step
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback, check_strategy
from lightning_beta.diagnosis import load_attribution
from lightning_beta.layer_groups import group_parameters
from tests.helpers import SpawnDDP, TinyModel, make_loader, read_scalars, trainer_kwargs


class GradRecorder(pl.Callback):
    """Independent recomputation: per-parameter ``torch.linalg.vector_norm`` in float64, then per group."""

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
        self.steps.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "norms": norms, "total": total})

    def values(self, group: str | None, epoch: int | None = None) -> list[float]:
        out = []
        for s in self.steps:
            v = s["total"] if group is None else s["norms"][group]
            if v is not None and math.isfinite(v) and (epoch is None or s["epoch"] == epoch):
                out.append(v)
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


def _expected_logged(rec: GradRecorder, group: str | None, every: int) -> list[tuple[int, float]]:
    out, acc = [], []
    for s in rec.steps:
        v = s["total"] if group is None else s["norms"][group]
        if v is not None:
            acc.append(v)
        step = s["step"]
        if step == 0 or (step + 1) % every == 0:
            if acc:
                out.append((step, sum(acc) / len(acc)))
            acc = []
    return out


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
    cb, rec = LayerAttributionCallback(log_every_n_steps=3), GradRecorder()
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[cb, rec]))
    trainer.fit(TinyModel(), make_loader())
    assert cb.artifact_path == tmp_path / "tb" / "version_0" / "attribution.json"
    art = load_attribution(cb.artifact_path)
    assert art.complete and art.global_step == 8 and art.history_epochs == [0, 1]
    _check_artifact_against(art, rec)
    scalars = read_scalars(logger.log_dir)
    for group in ["body", "head", None]:
        logged = scalars[f"grad_norm/{group or 'total'}"]
        expected = _expected_logged(rec, group, every=3)
        assert [s for s, _ in logged] == [s for s, _ in expected] == [0, 2, 5]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-5)
    # reference statistics for both module groups, one channel per output feature
    assert set(art.reference) == {"body", "head"} and len(art.reference["head"].mean) == 2
    assert art.reference["body"].count == 4 * 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "attribution/heatmap" in acc.Tags()["images"]
    assert any("attribution/ranking" in tag for tag in acc.Tags()["tensors"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulation_two_param_groups_frozen_module(tmp_path: Any, optimizer: str) -> None:
    cb, rec = LayerAttributionCallback(reference_batches=2), GradRecorder()
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=2, callbacks=[cb, rec])
    trainer = pl.Trainer(**kwargs)
    trainer.fit(FrozenMidModel(optimizer), make_loader())
    art = load_attribution(cb.artifact_path)
    assert list(art.groups) == ["body", "head", "mid"]
    assert len(rec.steps) == 4 == art.total.count  # once per optimizer step, not per micro-batch
    assert art.totals["mid"].count == 0 and art.totals["mid"].mean is None and art.groups["mid"] == 16 * 16 + 16
    assert all(row[2] is None for row in art.history)
    _check_artifact_against(art, rec)
    assert art.reference["mid"].count == 2 * 8  # the frozen module still has reference statistics
    assert cb.artifact_path == tmp_path / "attribution.json"  # no logger: default_root_dir


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
            if not is_logging_step(trainer, 4):
                state["armed"] = True
                state["guarded_steps"] += 1

    class Disarm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            state["armed"] = False

    cb = LayerAttributionCallback(log_every_n_steps=4, reference_batches=1)
    logger = TensorBoardLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=6, logger=logger)
    # the frozen module makes the first step build a new index, which must not sync either
    pl.Trainer(**kwargs, callbacks=[Arm(), cb, Disarm()]).fit(FrozenMidModel("adam"), make_loader())
    assert state["guarded_steps"] == 12 - 4  # steps 0, 3, 7, 11 log
    assert [s for s, _ in read_scalars(logger.log_dir)["grad_norm/body"]] == [0, 3, 7, 11]


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
    assert _approx_equal(a, b)


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
    with pytest.raises(ValueError, match="state has version 7"):
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


def test_sharded_strategies_raise() -> None:
    for strategy in [FSDPStrategy(), ModelParallelStrategy()]:
        with pytest.raises(MisconfigurationException, match=f"sharded strategy {type(strategy).__name__}"):
            check_strategy(strategy)


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
        ({"log_every_n_steps": 0}, ValueError, "`log_every_n_steps` must be >= 1, got 0"),
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
    ddp = LayerAttributionCallback(reference_batches=1)  # directory from trainer.log_dir, a collective
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_on_non_logging_steps(tmp_path: Any) -> None:
    class Arm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            if not is_logging_step(trainer, 4):
                torch.cuda.set_sync_debug_mode("error")

    class Disarm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            torch.cuda.set_sync_debug_mode("default")

    cb, rec = LayerAttributionCallback(log_every_n_steps=4), GradRecorder()
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, accelerator="gpu", logger=TensorBoardLogger(tmp_path))
    try:
        pl.Trainer(**kwargs, callbacks=[Arm(), cb, Disarm(), rec]).fit(FrozenMidModel("adam"), make_loader())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cb.artifact_path is not None
    _check_artifact_against(load_attribution(cb.artifact_path), rec)


def test_buffer_shorter_than_log_interval_no_host_sync(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 3-row step buffer fills (and is reduced on the device) several times per 7-step logging interval.
    armed = {"armed": False}
    _guard_host_copies(monkeypatch, armed)

    class Arm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            armed["armed"] = not is_logging_step(trainer, 7)

    class Disarm(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            armed["armed"] = False

    cb, rec = LayerAttributionCallback(log_every_n_steps=7, reference_batches=0), GradRecorder()
    cb._buffer_rows = 3
    logger = TensorBoardLogger(tmp_path, name="tb")
    flushes = []
    flush = cb._flush
    monkeypatch.setattr(cb, "_flush", lambda: (flushes.append(cb._n_buffered), flush())[1])
    kwargs = trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=8, logger=logger)
    pl.Trainer(**kwargs, callbacks=[Arm(), cb, Disarm(), rec]).fit(TinyModel(), make_loader())
    assert max(flushes) == 3 and len(rec.steps) == 24  # full buffers reduced mid-interval
    art = load_attribution(cb.artifact_path)
    assert art.total.count == 24
    _check_artifact_against(art, rec)
    scalars = read_scalars(logger.log_dir)
    for group in ["body", "head", None]:
        logged = scalars[f"grad_norm/{group or 'total'}"]
        expected = _expected_logged(rec, group, every=7)
        assert [s for s, _ in logged] == [s for s, _ in expected] == [0, 6, 13, 20]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_resume_mid_buffer_is_exact(tmp_path: Any) -> None:
    # Every batch is the same, so a mid-epoch resume (Lightning restarts the DataLoader) sees the same gradients.
    # The checkpoint at step 6 is written while step 5's row is buffered (last reduced at the log of step 4).
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x.repeat(4, 1), (x[:, 0] > 0).long().repeat(4))

    def run(name: str, ckpt_path: Any = None, **kwargs: Any) -> tuple[LayerAttributionCallback, dict[str, Any]]:
        cb = LayerAttributionCallback(log_every_n_steps=5, reference_batches=0, dirpath=tmp_path / name)
        cb._buffer_rows = 4
        logger = TensorBoardLogger(tmp_path / name, name="tb")
        callbacks = [cb, *kwargs.pop("callbacks", [])]
        kwargs = trainer_kwargs(tmp_path / name, max_epochs=3, logger=logger, callbacks=callbacks, **kwargs)
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
