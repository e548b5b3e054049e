"""The callbacks under ``ModelParallelStrategy`` with FSDP2 sharding, two CPU ranks over gloo.

Each layer of the model and its root are ``fully_shard``-ed over the data-parallel mesh, so each rank holds half of
every parameter and gradient (``Record`` checks that a shard is smaller than the full tensor). What every rank used
at each ``optimizer.step`` and the full gradients (``DTensor.full_tensor()``, gathered in
``on_before_optimizer_step``) are written by each rank (``tests/multidevice/model_parallel.py``); the callbacks'
outputs are read from what rank zero wrote, and compared with an independent recomputation, or with one process
reading the same global batches.

Each spawned fit costs several seconds of process start-up, so the runs are tiny (6 optimizer steps) and few.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_beta.artifact import load_attribution
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback, check_strategy
from tests.helpers import StepRecorder, TinyModel, make_loader, read_scalars, sgd_momentum, trainer_kwargs
from tests.multidevice.model_parallel import (
    STEPS_PER_EPOCH,
    SpawnModelParallel,
    assert_artifact_norms,
    assert_grad_norms,
    assert_momentum_rule,
    assert_rank_zero_wrote_alone,
    assert_ranks,
    assert_zeta,
    fit,
    make_callbacks,
    records,
)

STEPS = 2 * STEPS_PER_EPOCH


def _prefixed(scalars: dict[str, list[tuple[int, float]]], prefix: str) -> dict[str, list[tuple[int, float]]]:
    return {tag: values for tag, values in scalars.items() if tag.startswith(prefix)}


@pytest.mark.ddp
def test_beta_momentum_writes_the_rule_on_every_rank(tmp_path: Path) -> None:
    log_dir = fit(tmp_path, make_callbacks("beta"), SpawnModelParallel())
    ranks = records(tmp_path)
    assert_ranks(ranks, "SpawnModelParallel")
    assert_momentum_rule(ranks, STEPS)
    # The logged momentum is the one written, at the step it was used (float32 in the event file).
    logged = read_scalars(log_dir)["beta/momentum"]
    assert [step for step, _ in logged] == [s["global_step"] for s in ranks[0]["steps"]]
    assert [v for _, v in logged] == pytest.approx([s["groups"][0]["momentum"] for s in ranks[0]["steps"]], rel=1e-6)
    assert_rank_zero_wrote_alone(tmp_path, attribution=False)


@pytest.mark.ddp
def test_damping_monitor_fixed_curvature_logs_the_recomputed_zeta(tmp_path: Path) -> None:
    log_dir = fit(tmp_path, make_callbacks("damping"), SpawnModelParallel())
    ranks = records(tmp_path)
    assert_ranks(ranks, "SpawnModelParallel")
    assert_zeta(ranks, read_scalars(log_dir))
    assert len(ranks[0]["history"]) == 2  # one summary per epoch, the same on both ranks
    assert_rank_zero_wrote_alone(tmp_path, attribution=False)


@pytest.mark.ddp
def test_attribution_norms_are_those_of_the_full_gradients(tmp_path: Path) -> None:
    # Each rank sees only its shard of each gradient; the logged norms must be those of the whole gradients.
    log_dir = fit(tmp_path, make_callbacks("attribution"), SpawnModelParallel())
    ranks = records(tmp_path)
    assert_ranks(ranks, "SpawnModelParallel")
    assert_grad_norms(ranks[0]["norms"], read_scalars(log_dir))
    assert_artifact_norms(load_attribution(log_dir / "attribution.json"), ranks[0]["norms"])
    assert_rank_zero_wrote_alone(tmp_path, attribution=True)


@pytest.mark.ddp
def test_all_three_together_match_one_process(tmp_path: Path) -> None:
    sharded_dir = fit(tmp_path / "sharded", make_callbacks("all"), SpawnModelParallel())
    single_dir = fit(tmp_path / "single", make_callbacks("all"))
    ranks, (single,) = records(tmp_path / "sharded"), records(tmp_path / "single")
    assert_ranks(ranks, "SpawnModelParallel")
    scalars = read_scalars(sharded_dir)
    assert_momentum_rule(ranks, STEPS)
    assert_zeta(ranks, scalars)
    assert_grad_norms(ranks[0]["norms"], scalars)
    artifact = load_attribution(sharded_dir / "attribution.json")
    assert_artifact_norms(artifact, ranks[0]["norms"])
    # One process over the same global batches: the same lr and momentum (exact), zeta and history (exact: they
    # depend on the lr alone), and the same gradients up to the order of float sums.
    assert ranks[0]["steps"] == single["steps"]
    assert ranks[0]["history"] == single["history"]
    single_scalars = read_scalars(single_dir)
    assert _prefixed(scalars, "damping/") == _prefixed(single_scalars, "damping/")
    for tag, values in _prefixed(single_scalars, "grad_norm/").items():
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in values], rel=1e-5), tag
    want = load_attribution(single_dir / "attribution.json")
    assert set(artifact.reference) == set(want.reference) == {"body", "head"}
    for name, stats in want.reference.items():
        assert artifact.reference[name].mean == pytest.approx(stats.mean, rel=1e-5, abs=1e-7)
        assert artifact.reference[name].var == pytest.approx(stats.var, rel=1e-5, abs=1e-7)
    assert_rank_zero_wrote_alone(tmp_path / "sharded", attribution=True)


@pytest.mark.ddp
def test_resume_from_a_sharded_checkpoint_matches_a_straight_run(tmp_path: Path) -> None:
    # The straight run is one process: the test above shows it equals the sharded run step for step.
    straight_dir = fit(tmp_path / "straight", make_callbacks("all"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_top_k=-1)
    first = make_callbacks("all")
    fit(tmp_path / "first", first, SpawnModelParallel(), max_epochs=1, enable_checkpointing=True, extra=[checkpoint])

    # Under ModelParallel a checkpoint is a directory: the shards (torch.distributed.checkpoint) and ``meta.pt``,
    # which rank zero writes with everything else, the callbacks' state included.
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file() and list(ckpt.glob("*.distcp"))
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    assert {cb.state_key for cb in first} <= set(meta["callbacks"])

    resumed_dir = fit(tmp_path / "resumed", make_callbacks("all"), SpawnModelParallel(), ckpt_path=str(ckpt))
    (straight,), ranks = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert_ranks(ranks, "SpawnModelParallel")
    assert ranks[0]["steps"] == ranks[1]["steps"] == straight["steps"][STEPS_PER_EPOCH:]
    # The epoch-0 summary comes back from the checkpoint, epoch 1 is the resumed run's.
    assert ranks[0]["history"] == ranks[1]["history"] == straight["history"]
    straight_zeta = dict(read_scalars(straight_dir)["damping/zeta"])
    resumed_zeta = dict(read_scalars(resumed_dir)["damping/zeta"])
    assert sorted(resumed_zeta) == list(range(STEPS_PER_EPOCH, STEPS))
    assert resumed_zeta == {step: straight_zeta[step] for step in resumed_zeta}
    # The attribution totals span both epochs: epoch 0 restored from the checkpoint, epoch 1 measured.
    resumed, want = (load_attribution(d / "attribution.json") for d in (resumed_dir, straight_dir))
    assert resumed.global_step == want.global_step == STEPS
    assert resumed.history_epochs == want.history_epochs
    for name in want.groups:
        assert resumed.totals[name].count == want.totals[name].count == STEPS
        assert resumed.totals[name].mean == pytest.approx(want.totals[name].mean, rel=1e-5)
        assert resumed.totals[name].max == pytest.approx(want.totals[name].max, rel=1e-5)
    for got_row, want_row in zip(resumed.history, want.history, strict=True):
        assert got_row == pytest.approx(want_row, rel=1e-5)
    assert_rank_zero_wrote_alone(tmp_path / "resumed", attribution=True)


@pytest.mark.ddp
def test_secant_curvature_matches_one_process(tmp_path: Path) -> None:
    # The secant curvature needs norms of parameter and gradient changes: under sharding, of the whole tensors.
    sharded_dir = fit(tmp_path / "sharded", [DampingRegimeMonitor(curvature="secant")], SpawnModelParallel())
    single_dir = fit(tmp_path / "single", [DampingRegimeMonitor(curvature="secant")])
    assert_ranks(records(tmp_path / "sharded"), "SpawnModelParallel")
    sharded, single = (_prefixed(read_scalars(d), "damping/") for d in (sharded_dir, single_dir))
    assert "damping/zeta" in single and set(sharded) == set(single)
    for tag, values in single.items():
        assert [s for s, _ in sharded[tag]] == [s for s, _ in values], tag
        assert [v for _, v in sharded[tag]] == pytest.approx([v for _, v in values], rel=1e-4), tag
    assert_rank_zero_wrote_alone(tmp_path / "sharded", attribution=False)


# ------------------------------------------------------------------ flat-sharded strategies: refused, one process


def test_fsdp_needs_a_gpu_in_this_lightning() -> None:
    # Lightning refuses FSDP (FSDP1) on CPU when the Trainer is built (and torch's FSDP1 needs an accelerator device),
    # so FSDP1 is tested only in tests/multidevice/test_sharded_gpu.py, on two GPUs.
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        Trainer(strategy="fsdp", accelerator="cpu", devices=2)


class FlatShardStandIn(SingleDeviceStrategy):
    """A single-device strategy taken for a flat-sharding one (``flat_sharded`` fixture), to reach fit start on CPU."""


@pytest.fixture
def flat_sharded(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_beta._strategies as strategies

    types = strategies.sharded_strategy_types()
    monkeypatch.setattr(strategies, "sharded_strategy_types", lambda: (*types, FlatShardStandIn))


def test_attribution_refuses_flat_sharded_strategies_at_fit_start(tmp_path: Path, flat_sharded: None) -> None:
    with pytest.raises(MisconfigurationException, match="sharded strategy FSDPStrategy"):
        check_strategy(FSDPStrategy())
    check_strategy(ModelParallelStrategy())  # FSDP2: supported, tested above
    recorder = StepRecorder()
    strategy = FlatShardStandIn(torch.device("cpu"))
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy=strategy, callbacks=[LayerAttributionCallback(), recorder]))
    with pytest.raises(MisconfigurationException, match="sharded strategy FlatShardStandIn: each rank holds only"):
        trainer.fit(TinyModel(sgd_momentum), make_loader())
    assert recorder.steps == []


def test_secant_curvature_refuses_flat_sharded_strategies_at_fit_start(tmp_path: Path, flat_sharded: None) -> None:
    recorder = StepRecorder()
    monitor = DampingRegimeMonitor(curvature="secant", log=False)
    strategy = FlatShardStandIn(torch.device("cpu"))
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy=strategy, callbacks=[monitor, recorder]))
    with pytest.raises(
        MisconfigurationException, match="DampingRegimeMonitor\\(curvature='secant'\\) does not support the sharded"
    ):
        trainer.fit(TinyModel(sgd_momentum), make_loader())
    assert recorder.steps == []
    # A fixed curvature reads only the param groups' lr and momentum: no shard involved, no refusal.
    fixed = DampingRegimeMonitor(log=False)
    strategy = FlatShardStandIn(torch.device("cpu"))
    Trainer(**trainer_kwargs(tmp_path, strategy=strategy, callbacks=[fixed])).fit(
        TinyModel(sgd_momentum), make_loader()
    )
    assert len(fixed.history) == 1
