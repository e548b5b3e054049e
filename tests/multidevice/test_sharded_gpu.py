"""The callbacks under FSDP1 (``FSDPStrategy``) and DeepSpeed ZeRO on two GPUs: the CPU ModelParallel assertions.

Lightning refuses ``FSDPStrategy`` on CPU and DeepSpeed needs CUDA, so these run only on a machine with two GPUs
(and ``deepspeed`` installed for the DeepSpeed cases). They use the harness and the assertions of
``tests/multidevice/test_model_parallel.py`` (``tests/multidevice/model_parallel.py``), with one difference: FSDP1
and DeepSpeed gradients are plain tensors holding a rank's shard (or nothing), which the ranks cannot gather into
the full gradients through ``DTensor.full_tensor()``. The reference norms are those of one process on one GPU
reading the same global batches, whose gradients are the full gradients of the sharded run (mean loss over the
global batch); float sums in another order on the GPU leave a relative 1e-4.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn

from lightning_beta.artifact import load_attribution
from tests.helpers import read_scalars
from tests.multidevice.model_parallel import (
    STEPS_PER_EPOCH,
    TIMEOUT,
    Spawned,
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
GPU_REL = 1e-4

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


def _fit_gpu(root: Path, which: str, strategy: Strategy | None, **kwargs: Any) -> Path:
    return fit(root, make_callbacks(which), strategy, accelerator="gpu", devices=2 if strategy else 1, **kwargs)


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
def test_attribution_norms_are_those_of_the_full_gradients(tmp_path: Path, name: str) -> None:
    strategy = _strategy(name)
    log_dir = _fit_gpu(tmp_path / "sharded", "attribution", strategy)
    _fit_gpu(tmp_path / "single", "attribution", None)
    ranks, (single,) = records(tmp_path / "sharded"), records(tmp_path / "single")
    assert_ranks(ranks, type(strategy).__name__, sharded=False)
    assert_grad_norms(single["norms"], read_scalars(log_dir), rel=GPU_REL)
    assert_artifact_norms(load_attribution(log_dir / "attribution.json"), single["norms"], rel=GPU_REL)
    assert_rank_zero_wrote_alone(tmp_path / "sharded", attribution=True)


@pytest.mark.parametrize("name", STRATEGIES)
def test_all_three_together(tmp_path: Path, name: str) -> None:
    strategy = _strategy(name)
    log_dir = _fit_gpu(tmp_path / "sharded", "all", strategy)
    _fit_gpu(tmp_path / "single", "all", None)
    ranks, (single,) = records(tmp_path / "sharded"), records(tmp_path / "single")
    assert_ranks(ranks, type(strategy).__name__, sharded=False)
    scalars = read_scalars(log_dir)
    assert_momentum_rule(ranks, STEPS)
    assert_zeta(ranks, scalars)
    assert ranks[0]["steps"] == single["steps"] and ranks[0]["history"] == single["history"]
    assert_grad_norms(single["norms"], scalars, rel=GPU_REL)
    assert_artifact_norms(load_attribution(log_dir / "attribution.json"), single["norms"], rel=GPU_REL)
    assert_rank_zero_wrote_alone(tmp_path / "sharded", attribution=True)
