"""The callbacks under FSDP1 (``FSDPStrategy``) and DeepSpeed ZeRO on two GPUs: the CPU ModelParallel assertions.

Lightning refuses ``FSDPStrategy`` on CPU and DeepSpeed needs CUDA, so these run only on a machine with two GPUs
(and ``deepspeed`` installed for the DeepSpeed cases). They use the harness and the assertions of
``tests/multidevice/test_model_parallel.py`` (``tests/multidevice/model_parallel.py``):

- ``BetaMomentumCallback`` and ``DampingRegimeMonitor`` at a fixed curvature read and write only the param groups'
  lr and momentum, which every rank holds whole: the momentum rule on every rank, the recomputed zeta, and the
  values of one process on one GPU reading the same global batches.
- ``LayerAttributionCallback`` and ``DampingRegimeMonitor(curvature="secant")`` read gradients or parameters,
  which FSDP1 and DeepSpeed keep as per-rank pieces of flat buffers (``grad`` unset under ZeRO): both refuse these
  strategies at fit start, before any step.

FSDP1 and DeepSpeed gradients are not ``DTensor``, so ``assert_ranks(..., sharded=False)``: the records cannot tell
a shard from the full tensor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from tests.helpers import read_scalars
from tests.multidevice.model_parallel import (
    STEPS_PER_EPOCH,
    TIMEOUT,
    Spawned,
    assert_momentum_rule,
    assert_rank_zero_wrote_alone,
    assert_ranks,
    assert_zeta,
    fit,
    make_callbacks,
    records,
)

STEPS = 2 * STEPS_PER_EPOCH

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs to shard over"),
]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


class SpawnFSDP(Spawned, FSDPStrategy):
    """FSDP1 with each ``nn.Linear`` its own unit, started in spawned workers."""

    def __init__(self, use_orig_params: bool) -> None:
        super().__init__(auto_wrap_policy={nn.Linear}, use_orig_params=use_orig_params, timeout=TIMEOUT)


class SpawnDeepSpeed(Spawned, DeepSpeedStrategy):
    """DeepSpeed ZeRO at ``stage`` (2: gradients partitioned; 3: parameters too), started in spawned workers."""

    def __init__(self, stage: int) -> None:
        super().__init__(stage=stage, timeout=TIMEOUT)


def _strategy(name: str) -> Strategy:
    kind, _, arg = name.partition("-")
    if kind == "fsdp":
        return SpawnFSDP(use_orig_params=arg == "orig")
    return SpawnDeepSpeed(stage=int(arg))


STRATEGIES = [
    pytest.param("fsdp-orig", id="fsdp-use_orig_params"),
    pytest.param("fsdp-flat", id="fsdp-flat_params"),
    pytest.param("deepspeed-2", id="deepspeed-stage2", marks=needs_deepspeed),
    pytest.param("deepspeed-3", id="deepspeed-stage3", marks=needs_deepspeed),
]


def _fit_gpu(root: Path, which: str, strategy: Strategy) -> Path:
    return fit(root, make_callbacks(which), strategy, accelerator="gpu", devices=2)


@pytest.mark.parametrize("name", STRATEGIES)
def test_beta_momentum_writes_the_rule_on_every_rank(tmp_path: Path, name: str) -> None:
    strategy = _strategy(name)
    log_dir = _fit_gpu(tmp_path, "beta", strategy)
    ranks = records(tmp_path)
    assert_ranks(ranks, type(strategy).__name__, sharded=False)
    assert_momentum_rule(ranks, STEPS)
    logged = read_scalars(log_dir)["beta/momentum"]
    assert [v for _, v in logged] == pytest.approx([s["groups"][0]["momentum"] for s in ranks[0]["steps"]], rel=1e-6)
    assert_rank_zero_wrote_alone(tmp_path, attribution=False)


@pytest.mark.parametrize("name", STRATEGIES)
def test_damping_monitor_fixed_curvature_logs_the_recomputed_zeta(tmp_path: Path, name: str) -> None:
    strategy = _strategy(name)
    log_dir = _fit_gpu(tmp_path, "damping", strategy)
    ranks = records(tmp_path)
    assert_ranks(ranks, type(strategy).__name__, sharded=False)
    assert_zeta(ranks, read_scalars(log_dir))
    assert len(ranks[0]["history"]) == 2
    assert_rank_zero_wrote_alone(tmp_path, attribution=False)


@pytest.mark.parametrize("name", STRATEGIES)
def test_beta_and_damping_together_match_one_process(tmp_path: Path, name: str) -> None:
    strategy = _strategy(name)
    callbacks = [BetaMomentumCallback(), DampingRegimeMonitor()]
    log_dir = fit(tmp_path / "sharded", callbacks, strategy, accelerator="gpu", devices=2)
    single_dir = fit(tmp_path / "single", [BetaMomentumCallback(), DampingRegimeMonitor()], accelerator="gpu")
    ranks, (single,) = records(tmp_path / "sharded"), records(tmp_path / "single")
    assert_ranks(ranks, type(strategy).__name__, sharded=False)
    scalars = read_scalars(log_dir)
    assert_momentum_rule(ranks, STEPS)
    assert_zeta(ranks, scalars)
    # The lr, momentum and zeta depend on the schedule alone: exactly those of one process.
    assert ranks[0]["steps"] == single["steps"] and ranks[0]["history"] == single["history"]
    single_scalars = read_scalars(single_dir)
    for tag in ("beta/momentum", "damping/zeta"):
        assert scalars[tag] == single_scalars[tag]
    assert_rank_zero_wrote_alone(tmp_path / "sharded", attribution=False)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: LayerAttributionCallback(reference_batches=0),
            "LayerAttributionCallback does not support the sharded",
        ),
        (lambda: DampingRegimeMonitor(curvature="secant"), "DampingRegimeMonitor\\(curvature='secant'\\) does not"),
    ],
    ids=["attribution", "secant"],
)
def test_gradient_readers_refuse_flat_shards_before_any_step(
    tmp_path: Path, name: str, make: Callable[[], pl.Callback], message: str
) -> None:
    # FSDP1 and DeepSpeed hold each rank's shard in flat buffers (or DeepSpeed's own partitions, ``grad`` unset), not
    # per-parameter DTensors: the callbacks that read gradients or parameters refuse them at fit start, on every rank.
    strategy = _strategy(name)
    with pytest.raises(Exception, match=f"{message}.*sharded strategy {type(strategy).__name__}"):
        fit(tmp_path, [make()], strategy, accelerator="gpu", devices=2)
    assert not list(tmp_path.glob("records/rank*.json"))  # no rank reached the end of the fit
