"""No host sync on steps that do not log: one guard, applied to every callback of the package.

:class:`HostSyncGuard` makes ``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy``, ``float(t)``, ``int(t)`` and
``bool(t)`` raise while the package's callbacks run their per-step work on a batch Lightning does not log
(``lightning_beta._logging.is_logging_step``): their ``on_before_optimizer_step`` hooks, the optimizer's step
post-hooks, and their ``on_train_batch_end`` hooks. The optimizer's own ``step`` body and Lightning's machinery run
unguarded: they are not the package's to change. On logging steps the guard stays off: copying the values to the
host once per logging interval is the design.

The guard is two callbacks, one placed before and one after the callbacks under test, since Lightning runs
callbacks in list order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback
from lightning_beta._logging import is_logging_step
from lightning_beta._optim import unwrap_optimizer
from tests.helpers import TinyModel, make_loader, trainer_kwargs

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class HostSync(RuntimeError):
    """A host read of a tensor where none is allowed."""


class _State:
    def __init__(self) -> None:
        self.armed = False
        self.where = ""
        self.guarded_windows = 0
        self.logging_steps = 0


@contextlib.contextmanager
def host_reads_raise(state: _State) -> Iterator[None]:
    """Patch the host-read methods of ``torch.Tensor`` to raise while ``state.armed``."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guarded(name: str) -> Any:
        original = originals[name]

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if state.armed:
                state.armed = False  # so that Lightning's teardown after the error reads freely
                raise HostSync(f"Tensor.{name} called in {state.where} on a step that does not log")
            return original(self, *args, **kwargs)

        return method

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, guarded(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class ArmGuard(pl.Callback):
    """First in the list: arms the guard on non-logging batches; its step post-hook re-arms after the update."""

    def __init__(self, state: _State) -> None:
        self.state = state
        self._hooked: set[int] = set()

    def _arm(self, trainer: pl.Trainer, where: str) -> None:
        if is_logging_step(trainer):
            self.state.logging_steps += where == "on_before_optimizer_step"
            return
        self.state.armed, self.state.where = True, where
        self.state.guarded_windows += 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Registered before the callbacks under test register theirs (they come later in the list), so this
        # post-hook runs first and theirs run guarded.
        for optimizer in trainer.optimizers:
            inner = unwrap_optimizer(optimizer)
            if id(inner) not in self._hooked:
                self._hooked.add(id(inner))
                inner.register_step_post_hook(lambda *_: self._arm(trainer, "an optimizer step post-hook"))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._arm(trainer, "on_before_optimizer_step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._arm(trainer, "on_train_batch_end")


class DisarmGuard(pl.Callback):
    """Last in the list: disarms before the optimizer's own step body and before Lightning's batch-end work."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.state.armed = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.state.armed = False  # a post-hook armed it after the last update of the previous batch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.state.armed = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.armed = False


def float_sgd(module: pl.LightningModule) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.04, momentum=0.9)


def tensor_adam(module: pl.LightningModule) -> torch.optim.Optimizer:
    # Tensor lr and betas, as capturable Adam uses them.
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    return torch.optim.Adam(module.parameters(), lr=torch.tensor(0.01), betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    # The physics momentum dips below 0.9 in the warmup and rises through it in the decay: a crossover happens.
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.025, total_iters=2)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return {"scheduler": torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cos], [2]), "interval": "step"}


def fit_guarded(tmp_path: Any, callbacks: list[pl.Callback], optimizer_fn: Any) -> _State:
    state = _State()
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[ArmGuard(state), *callbacks, DisarmGuard(state)],
            logger=CSVLogger(tmp_path),
            log_every_n_steps=3,
            limit_train_batches=12,
        )
    )
    with host_reads_raise(state):
        trainer.fit(TinyModel(optimizer_fn, warmup_cosine), make_loader(n=96))
    return state


def test_the_guard_catches_a_host_read(tmp_path):
    class Reads(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            optimizer.param_groups[0]["params"][0].grad.norm().item()

    with pytest.raises(HostSync, match=r"Tensor.item called in on_before_optimizer_step"):
        fit_guarded(tmp_path, [Reads()], float_sgd)


def test_the_guard_stays_off_on_logging_steps(tmp_path):
    class ReadsWhenLogging(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            if is_logging_step(trainer):
                optimizer.param_groups[0]["params"][0].grad.norm().item()

    state = fit_guarded(tmp_path, [ReadsWhenLogging()], float_sgd)
    assert state.logging_steps == 4  # batches 2, 5, 8, 11
    assert state.guarded_windows >= 3 * 8  # 8 non-logging batches, 3 guarded windows each


CALLBACKS = {
    "beta": lambda: [BetaMomentumCallback()],
    "beta_crossover": lambda: [BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)],
    "monitor": lambda: [DampingRegimeMonitor()],
    "attribution": lambda: [LayerAttributionCallback()],
    "all_three": lambda: [BetaMomentumCallback(), DampingRegimeMonitor(), LayerAttributionCallback()],
    "all_three_crossover": lambda: [
        BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9),
        DampingRegimeMonitor(),
        LayerAttributionCallback(),
    ],
}


@pytest.mark.parametrize("optimizer", ["float_lr", "tensor_lr"])
@pytest.mark.parametrize("case", sorted(CALLBACKS))
def test_no_host_sync_on_steps_that_do_not_log(tmp_path, case, optimizer):
    optimizer_fn = float_sgd if optimizer == "float_lr" else tensor_adam
    callbacks = CALLBACKS[case]()
    state = fit_guarded(tmp_path, callbacks, optimizer_fn)
    assert state.guarded_windows >= 3 * 8 and state.logging_steps == 4
    for callback in callbacks:
        if isinstance(callback, BetaMomentumCallback) and callback.switch_at == "crossover":
            assert callback.switch_step is not None  # the switch really was decided during the guarded fit


def cuda_capturable_adam(module: pl.LightningModule) -> torch.optim.Optimizer:
    device = module.device
    betas = (torch.tensor(0.9, device=device), torch.tensor(0.999, device=device))
    return torch.optim.Adam(module.parameters(), lr=torch.tensor(0.01, device=device), betas=betas, capturable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["beta_crossover", "all_three_crossover"])
def test_no_host_sync_on_cuda_with_capturable_adam(tmp_path, case):
    state = _State()
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[ArmGuard(state), *CALLBACKS[case](), DisarmGuard(state)],
            logger=CSVLogger(tmp_path),
            log_every_n_steps=3,
            limit_train_batches=12,
            accelerator="gpu",
        )
    )
    with host_reads_raise(state):
        trainer.fit(TinyModel(cuda_capturable_adam, warmup_cosine), make_loader(n=96))
    assert state.guarded_windows >= 3 * 8 and state.logging_steps == 4
