"""Tiny real models, data and a recorder of what ``optimizer.step`` actually used, for the callback tests."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_beta._optim import read_momentum, read_slot, unwrap_optimizer


def make_loader(n: int = 64, dim: int = 8, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    """A fixed random two-class classification set."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class TinyModel(pl.LightningModule):
    """An MLP classifier whose optimizer and scheduler are given as factories.

    ``optimizer_fn(module) -> optimizer or list of param-group dicts``; ``scheduler_fn(optimizer) -> lr scheduler
    config dict`` (or ``None``).
    """

    def __init__(
        self,
        optimizer_fn: Callable[[pl.LightningModule], Any] | None = None,
        scheduler_fn: Callable[[Any], dict[str, Any] | None] | None = None,
        dim: int = 8,
        hidden: int = 16,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2)
        self.optimizer_fn = optimizer_fn or (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
        self.scheduler_fn = scheduler_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_fn(self)
        if self.scheduler_fn is None:
            return optimizer
        scheduler = self.scheduler_fn(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class StepRecorder(pl.Callback):
    """Records, for every real ``optimizer.step`` call, the lr and momentum of each group that the step used.

    The record is taken inside the step, after the closure (forward, backward and every
    ``on_before_optimizer_step`` hook) has run and before the update reads the param groups.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for idx, optimizer in enumerate(trainer.optimizers):
            self._wrap(unwrap_optimizer(optimizer), idx, trainer)

    def _wrap(self, optimizer: torch.optim.Optimizer, idx: int, trainer: pl.Trainer) -> None:
        if getattr(optimizer, "_recorder_wrapped", False):
            return
        original = optimizer.step
        recorder = self

        # functools.wraps keeps the lr scheduler's marker on the wrapper, so torch sees no overridden ``step``.
        @functools.wraps(original)
        def step(closure: Callable[[], Any] | None = None) -> Any:
            def recorded_closure() -> Any:
                result = closure() if closure is not None else None
                recorder._record(optimizer, idx, trainer)
                return result

            if closure is None:
                recorder._record(optimizer, idx, trainer)
                return original()
            return original(recorded_closure)

        optimizer.step = step  # type: ignore[method-assign]
        optimizer._recorder_wrapped = True  # type: ignore[attr-defined]

    def _record(self, optimizer: torch.optim.Optimizer, idx: int, trainer: pl.Trainer) -> None:
        groups = []
        for group in optimizer.param_groups:
            slot = read_slot(group)
            momentum = scalar(read_momentum(group, slot)) if slot else None
            groups.append({"lr": scalar(group["lr"]), "momentum": momentum})
        self.steps.append({"optimizer": idx, "global_step": trainer.global_step, "groups": groups})

    def momenta(self, group: int = 0, optimizer: int = 0) -> list[float]:
        return [s["groups"][group]["momentum"] for s in self.steps if s["optimizer"] == optimizer]

    def lrs(self, group: int = 0, optimizer: int = 0) -> list[float]:
        return [s["groups"][group]["lr"] for s in self.steps if s["optimizer"] == optimizer]


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Defaults for a tiny, quiet, CPU fit."""
    kwargs: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
    }
    kwargs.update(overrides)
    return kwargs


def read_scalars(log_dir: Any) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files under ``log_dir``: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class SpawnDDP(DDPStrategy):
    """``ddp_spawn`` on CPU that destroys its process group when the fit ends, in every rank.

    Lightning leaves the gloo process group to an ``atexit`` hook, which spawned ranks never run (they leave
    through ``os._exit``); a rank that exits with the group alive occasionally aborts with "terminate called without
    an active exception" after the fit has finished. Destroying the group in ``teardown`` joins its threads first.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------ multi-process fits (DDP and ModelParallel tests)

#: Samples per optimizer step over all ranks.
GLOBAL_BATCH = 8


def sgd_momentum(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)


def step_cosine(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6), "interval": "step"}


def strided_loader(trainer: Any) -> DataLoader:
    """Rank r of w reads samples r, r + w, ... in order, in batches of ``GLOBAL_BATCH // w``: the same global batches
    as one process with batch ``GLOBAL_BATCH``."""
    dataset = make_loader(n=64).dataset
    world, rank = trainer.world_size, trainer.global_rank
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=sampler)
