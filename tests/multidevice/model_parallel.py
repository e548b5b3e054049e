"""Two-rank fits under a sharded strategy in spawned workers, what the ranks saw, and the assertions on it.

The harness behind ``tests/multidevice/test_model_parallel.py`` (CPU: ``ModelParallelStrategy``, FSDP2 over gloo),
``tests/multidevice/test_sharded_gpu.py`` (FSDP1 and DeepSpeed on GPUs) and ``benchmarks/sharded.py``:

- :class:`SpawnModelParallel`: ``ModelParallelStrategy`` over two CPU ranks, all data parallel. Lightning launches
  it by re-running the script (``sys.argv``) in subprocesses, which under pytest would re-run the test session;
  :class:`Spawned` starts the ranks with ``torch.multiprocessing`` instead (as ``ddp_spawn``). The workers send no
  weights back (the launcher would ``torch.load`` the ranks' ``DTensor`` shards in the test process, which fails),
  and they destroy the process group at teardown (see ``tests.helpers.SpawnDDP``).
- :class:`ShardedModel`: ``TinyModel`` with ``fully_shard`` per layer and at the root in ``configure_model`` when
  the strategy gives a device mesh; the optimizer is built in ``configure_optimizers``, after sharding. Rank ``r``
  of ``w`` reads samples ``r, r + w, ...`` in batches of ``GLOBAL_BATCH // w``, so one process with the same
  model reads the same global batches.
- :class:`Record`: on every rank, the lr and momentum each ``optimizer.step`` used, and the full gradient's norm of
  each layer group, gathered from the shards (``DTensor.full_tensor()``) in ``on_before_optimizer_step``; written
  with the callbacks' state to ``records/rank<r>.json`` (a spawned worker's callbacks do not come back).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from torch import Tensor

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from lightning_beta.functional.damping import damping_ratio
from tests.helpers import StepRecorder, TinyModel, sgd_momentum, step_cosine, strided_loader, trainer_kwargs

WORLD = 2
STEPS_PER_EPOCH = 3
#: Fails a collective that one rank never joins within a minute, instead of gloo's default 30 minutes.
TIMEOUT = timedelta(seconds=60)
#: The layer groups of :class:`ShardedModel` under ``group_by="auto"`` (its top-level children).
GROUPS = ("body", "head")


# ------------------------------------------------------------------ spawning the ranks


class SpawnLauncher(_MultiProcessingLauncher):
    """``torch.multiprocessing`` ``spawn`` launcher whose rank zero sends no weights back to the test process.

    The base launcher saves ``lightning_module.state_dict()`` on rank zero and loads it in the launching process;
    under FSDP2 that state holds ``DTensor`` shards, which ``torch.load`` there refuses. The tests read what the ranks
    wrote instead; ``trainer.state`` and ``callback_metrics`` still come back.
    """

    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> _WorkerOutput | None:
        if self._strategy.local_rank != 0:
            return None
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", None) if checkpoint is not None else None
        return _WorkerOutput(best, None, trainer.state, results, self.get_extra_results(trainer))


class Spawned:
    """Mixin for a Lightning strategy: start the ranks with :class:`SpawnLauncher`, end the process group at teardown.

    Put it first in the bases (``class SpawnFSDP(Spawned, FSDPStrategy)``). Lightning leaves the process group to an
    ``atexit`` hook that spawned ranks never run; destroying it in ``teardown`` joins its threads first.
    """

    _launcher: _Launcher | None

    def _configure_launcher(self) -> None:
        self._launcher = SpawnLauncher(self, start_method="spawn")  # type: ignore[arg-type]

    def teardown(self) -> None:
        super().teardown()  # type: ignore[misc]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Both ranks reach this point before either tears its gloo threads down: a rank that destroyed the group
            # while the other still ran its last collective aborted now and then on a loaded machine.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class SpawnModelParallel(Spawned, ModelParallelStrategy):
    """``ModelParallelStrategy`` with every rank data parallel (the default would make them tensor parallel)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", TIMEOUT)
        super().__init__(data_parallel_size=WORLD, tensor_parallel_size=1, **kwargs)


# ------------------------------------------------------------------ the model


class ShardedModel(TinyModel):
    """``TinyModel`` sharded with FSDP2 when the strategy has a device mesh; strided global batches."""

    def __init__(self) -> None:
        super().__init__(sgd_momentum, step_cosine)

    def configure_model(self) -> None:
        # Lightning calls this after the process group exists and before ``configure_optimizers``: the optimizer
        # then holds the sharded parameters. Other strategies (one device, FSDP1, DeepSpeed) leave the mesh unset.
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in (self.body, self.head):
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])

    def train_dataloader(self) -> Any:
        return strided_loader(self.trainer)


# ------------------------------------------------------------------ what the ranks saw


def full_gradient(param: Tensor) -> Tensor | None:
    """The whole gradient of ``param``: gathered from the shards for a ``DTensor`` (a collective), else ``grad``."""
    grad = param.grad
    if grad is None:
        return None
    full = getattr(grad, "full_tensor", None)
    return full() if callable(full) else grad


class Record(StepRecorder):
    """Records on every rank what each step used and the full gradients' group norms; writes ``rank<r>.json``."""

    def __init__(self, out: Path, callbacks: list[pl.Callback]) -> None:
        super().__init__()
        self.out = out
        self.callbacks = callbacks
        self.norms: list[dict[str, Any]] = []
        self.sharded = False
        self._in_batch = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._in_batch = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._in_batch = False

    def _record(self, optimizer: torch.optim.Optimizer, idx: int, trainer: pl.Trainer) -> None:
        # Loading a sharded checkpoint, torch calls ``optimizer.step()`` once with zero gradients and lr 0 to create
        # the optimizer state (``torch.distributed.checkpoint.state_dict._init_optim_state``): not a training step.
        if self._in_batch:
            super()._record(optimizer, idx, trainer)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Every rank gathers every gradient in the same order, so the collectives match across ranks.
        powers = dict.fromkeys(GROUPS, 0.0)
        for name, param in pl_module.named_parameters():
            full = full_gradient(param)
            if full is None:
                continue
            grad: Any = param.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            self.sharded |= local.numel() < full.numel()
            group = name.split(".")[0]  # the top-level child: the layer group of ``group_by="auto"``
            powers[group] = powers.get(group, 0.0) + full.double().pow(2).sum().item()
        norms = {group: math.sqrt(value) for group, value in powers.items()}
        norms["total"] = math.sqrt(sum(powers.values()))
        self.norms.append({"global_step": trainer.global_step, "norms": norms})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        payload: dict[str, Any] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "sharded": self.sharded,
            "steps": self.steps,
            "norms": self.norms,
        }
        for cb in self.callbacks:
            if isinstance(cb, BetaMomentumCallback):
                payload["switch_step"] = cb.switch_step
            if isinstance(cb, DampingRegimeMonitor):
                payload["history"] = [asdict(r) for r in cb.history]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


def make_callbacks(which: str, **attribution: Any) -> list[pl.Callback]:
    """``"beta"``, ``"damping"``, ``"attribution"`` or ``"all"`` (the three together) of the package's callbacks."""
    made: dict[str, pl.Callback] = {
        "beta": BetaMomentumCallback(),
        "damping": DampingRegimeMonitor(),
        "attribution": LayerAttributionCallback(**{"reference_batches": 2, **attribution}),
    }
    return list(made.values()) if which == "all" else [made[which]]


def fit(
    root: Path,
    callbacks: list[pl.Callback],
    strategy: Strategy | str | None = None,
    model_cls: type[pl.LightningModule] = ShardedModel,
    ckpt_path: str | None = None,
    extra: list[pl.Callback] | None = None,
    **overrides: Any,
) -> Path:
    """Fit ``model_cls`` with ``callbacks`` under ``strategy`` on two ranks (one process if ``None``); the log dir.

    Two epochs of ``STEPS_PER_EPOCH`` steps, a TensorBoard logger under ``root / "tb"``, a :class:`Record` writing
    to ``root / "records"``. ``overrides`` go to the Trainer (``accelerator="gpu"``, ``max_epochs=1``, ...).
    """
    kwargs: dict[str, Any] = {
        "max_epochs": 2,
        "limit_train_batches": STEPS_PER_EPOCH,
        "use_distributed_sampler": False,
    }
    if strategy is not None:
        kwargs.update(strategy=strategy, devices=WORLD)
    kwargs.update(overrides)
    every = [*callbacks, Record(root / "records", callbacks), *(extra or [])]
    logger = TensorBoardLogger(root, name="tb")
    trainer = pl.Trainer(**trainer_kwargs(root, logger=logger, callbacks=every, **kwargs))
    torch.manual_seed(0)
    trainer.fit(model_cls(), ckpt_path=ckpt_path)  # built after the seed: the same initial weights in every run
    # Not ``logger.log_dir``: after a spawned fit the test process's logger picks the next free version anew.
    (log_dir,) = (root / "tb").iterdir()
    return log_dir


def records(root: Path) -> list[dict[str, Any]]:
    """What each rank wrote, in rank order."""
    return [json.loads(p.read_text()) for p in sorted((root / "records").glob("rank*.json"))]


# ------------------------------------------------------------------ the assertions, shared by CPU and GPU tests


def assert_ranks(ranks: list[dict[str, Any]], strategy: str, sharded: bool = True) -> None:
    """Two ranks ran under ``strategy`` and took the same steps; with ``sharded``, each held only a gradient shard.

    ``sharded`` is for FSDP2, whose ``DTensor`` gradients tell their shard from the full tensor; the ranks then also
    gathered the same full gradients.
    """
    assert [r["rank"] for r in ranks] == list(range(WORLD))
    assert all(r["world_size"] == WORLD and r["strategy"] == strategy for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"]
    if sharded:
        assert all(r["sharded"] for r in ranks), "no rank held a gradient shard: the model was not sharded"
        assert ranks[0]["norms"] == ranks[1]["norms"]


def assert_momentum_rule(ranks: list[dict[str, Any]], steps: int) -> None:
    """On every rank, the momentum each step used is ``1 - 2*sqrt(lr)`` of that step's lr (the paper rule)."""
    for rank in ranks:
        used = [(s["groups"][0]["lr"], s["groups"][0]["momentum"]) for s in rank["steps"]]
        assert len(used) == steps
        for lr, momentum in used:
            assert momentum == pytest.approx(1.0 - 2.0 * math.sqrt(lr), rel=1e-6, abs=1e-7), (rank["rank"], lr)
    # The cosine schedule moves the lr, so a constant momentum would not pass.
    assert len({s["groups"][0]["momentum"] for s in ranks[0]["steps"]}) > 1


def assert_zeta(ranks: list[dict[str, Any]], scalars: dict[str, list[tuple[int, float]]]) -> None:
    """``damping/zeta`` logged at each step equals the damping ratio of that step's lr and momentum."""
    used = [(s["groups"][0]["lr"], s["groups"][0]["momentum"]) for s in ranks[0]["steps"]]
    logged = [value for _, value in sorted(scalars["damping/zeta"])]
    want = [damping_ratio(momentum, lr) for lr, momentum in used]
    assert logged == pytest.approx(want, rel=1e-5)
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) >= 1


def assert_grad_norms(
    norms: list[dict[str, Any]], scalars: dict[str, list[tuple[int, float]]], rel: float = 1e-5
) -> None:
    """``grad_norm/<group>`` and ``grad_norm/total`` at each step equal ``norms``, those of the full gradients.

    ``norms`` is a :class:`Record`'s ``"norms"``: a rank's under FSDP2, or one process's over the same global batches.
    Needs ``log_every_n_steps=1`` (each logged value is one step's norm, not a mean over steps).
    """
    assert norms
    for name in [*GROUPS, "total"]:
        logged = [value for _, value in sorted(scalars[f"grad_norm/{name}"])]
        assert logged == pytest.approx([r["norms"][name] for r in norms], rel=rel), name


def assert_artifact_norms(artifact: Any, norms: list[dict[str, Any]], rel: float = 1e-5) -> None:
    """The artifact's per-group totals (count, mean, max) are those of the full gradients' ``norms``."""
    assert set(artifact.groups) == set(GROUPS)
    for name in GROUPS:
        values = [r["norms"][name] for r in norms]
        stats = artifact.totals[name]
        assert stats.count == len(values) and stats.nonfinite == 0
        assert stats.mean == pytest.approx(sum(values) / len(values), rel=rel)
        assert stats.max == pytest.approx(max(values), rel=rel)


def assert_rank_zero_wrote_alone(root: Path, attribution: bool) -> None:
    """One event file, one logger version, and ``attribution.json`` once (when the callback ran)."""
    events = sorted(root.rglob("events.out.tfevents*"))
    assert len(events) == 1, events
    assert [p.name for p in (root / "tb").iterdir()] == ["version_0"]
    assert len(list(root.rglob("attribution.json"))) == int(attribution)
