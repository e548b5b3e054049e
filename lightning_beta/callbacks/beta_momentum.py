"""BetaMomentumCallback: momentum from the live learning rate, by critical damping (PAPER.md section 1)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from lightning_beta._loggers import is_logging_step, log_scalars
from lightning_beta._optim import (
    MomentumSlot,
    as_float,
    group_key,
    is_frozen_lr,
    momentum_slot,
    optimizer_index,
    read_momentum,
    unwrap_optimizer,
    write_momentum,
)
from lightning_beta.functional.momentum import (
    check_curvature,
    check_momentum_bounds,
    check_rule,
    critical_momentum,
    unclamped_critical_momentum,
)

#: Momentum written instead of exactly 0 to SGD and RMSprop groups. torch skips the momentum buffer of a group
#: whose momentum is 0 and later resumes from the stale buffer; with a tiny positive momentum the buffer keeps
#: tracking the gradient (``buf = 1e-6 * buf + g``), which is heavy-ball SGD at momentum ~0.
SGD_MOMENTUM_FLOOR = 1e-6

_STATE_VERSION = 1


class BetaMomentumCallback(pl.Callback):
    r"""Set the optimizer's momentum at every optimizer step from the live learning rate.

    The momentum of each param group is the critically damped value of the heavy-ball oscillator,
    ``mu = 1 - 2*sqrt(curvature*lr)`` (``rule="paper"``) or ``(1 - sqrt(curvature*lr))**2`` (``rule="exact"``),
    clamped to ``[min_momentum, max_momentum]``. It is written in ``on_before_optimizer_step``, after the
    backward pass and before ``optimizer.step()`` reads it, so it fires once per optimizer step under gradient
    accumulation and always uses the lr that same step uses, whichever scheduler set it.

    Supported optimizers: SGD and RMSprop (``momentum``), Adam, AdamW, NAdam, RAdam and Adamax (``betas[0]``;
    ``betas[1]`` is never touched), and wrappers exposing them as ``.optimizer``. Values stored as Tensors are
    written in place.

    Behaviour worth knowing:

    - A param group with ``lr == 0`` (a frozen group) keeps its momentum.
    - An SGD group built with ``momentum=0`` gets momentum switched on (one info message).
    - Momentum exactly 0 (``lr >= 0.25`` with the paper rule) is written as ``1e-6`` to SGD and RMSprop groups:
      torch skips the momentum buffer of a group at momentum 0 and would resume later from a stale one.
    - The first time clamping bites, one warning names the lr.
    - Adam's bias correction ``1 - beta1**t`` uses the current ``beta1``; with a scheduled ``beta1`` it is an
      approximation that fades after the first few hundred steps.
    - ``OneCycleLR`` and ``CyclicLR`` with ``cycle_momentum=True`` also write momentum: the callback refuses them.

    Args:
        rule: ``"paper"`` or ``"exact"`` (see :func:`~lightning_beta.functional.critical_momentum`). Defaults to
            ``"paper"``.
        curvature: the stiffness ``lambda``; 1 is the paper's zero-parameter choice. Defaults to ``1.0``.
        min_momentum: lower clamp, ``>= 0``. Defaults to ``0.0``.
        max_momentum: upper clamp, ``< 1``. Defaults to ``0.99``.
        switch_at: hybrid schedule: when to switch from the physics momentum to ``constant_momentum`` for the rest
            of training. ``None`` never switches; an ``int`` is the optimizer step (``trainer.global_step``) of the
            switch; a ``float`` in ``(0, 1)`` is a fraction of ``trainer.estimated_stepping_batches``;
            ``"crossover"`` switches at the first step where the physics momentum of every active group reaches
            ``constant_momentum`` from below (a warmup that starts above it does not trigger it). Defaults to
            ``None``.
        constant_momentum: the momentum held after the switch, in ``[0, 1)``. Defaults to ``0.9``.
        on_unsupported: ``"raise"`` a ``MisconfigurationException`` at fit start for an optimizer whose momentum
            cannot be written, or ``"warn"`` once and leave it alone. Defaults to ``"raise"``.
        log_momentum: log the value written, for the step it was written, as ``beta/momentum`` (one group) or
            ``beta/momentum/<group name or pgN>`` (several; ``optK/`` is inserted with several optimizers),
            through the Trainer's loggers every ``log_every_n_steps``. Defaults to ``True``.

    Raises:
        ValueError: for an unknown ``rule`` or ``on_unsupported``, a curvature that is not finite and positive,
            bounds outside ``0 <= min_momentum <= max_momentum < 1``, a negative int ``switch_at``, a float
            ``switch_at`` outside ``(0, 1)``, an unknown string ``switch_at``, or ``constant_momentum`` outside
            ``[0, 1)``.
        TypeError: for arguments of the wrong type.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[BetaMomentumCallback(switch_at="crossover")], logger=False)
    """

    def __init__(
        self,
        rule: Literal["paper", "exact"] = "paper",
        curvature: float = 1.0,
        min_momentum: float = 0.0,
        max_momentum: float = 0.99,
        switch_at: int | float | str | None = None,
        constant_momentum: float = 0.9,
        on_unsupported: Literal["raise", "warn"] = "raise",
        log_momentum: bool = True,
    ) -> None:
        check_rule(rule)
        check_curvature(curvature)
        check_momentum_bounds(min_momentum, max_momentum)
        _check_switch_at(switch_at)
        if isinstance(constant_momentum, bool) or not isinstance(constant_momentum, (int, float)):
            raise TypeError(f"`constant_momentum` must be a float, got {type(constant_momentum).__name__}")
        if not (0.0 <= constant_momentum < 1.0):
            raise ValueError(f"`constant_momentum` must be in [0, 1), got {constant_momentum}")
        if on_unsupported not in ("raise", "warn"):
            raise ValueError(f'`on_unsupported` must be "raise" or "warn", got {on_unsupported!r}')
        if not isinstance(log_momentum, bool):
            raise TypeError(f"`log_momentum` must be a bool, got {type(log_momentum).__name__}")
        self.rule = rule
        self.curvature = float(curvature)
        self.min_momentum = float(min_momentum)
        self.max_momentum = float(max_momentum)
        self.switch_at = switch_at
        self.constant_momentum = float(constant_momentum)
        self.on_unsupported = on_unsupported
        self.log_momentum = log_momentum
        # Derived once per fit, or restored from a checkpoint.
        self.switch_step: int | None = None
        self._crossover_armed = False
        self._clamp_warned = False
        self._slots: dict[int, MomentumSlot | None] = {}

    @property
    def state_key(self) -> str:
        """Checkpoint key, unique per rule and curvature."""
        return self._generate_state_key(rule=self.rule, curvature=self.curvature)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget what a previous fit derived; a checkpoint restored after this hook brings it back."""
        if stage == "fit":
            self.switch_step = None
            self._crossover_armed = False
            self._clamp_warned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizers and schedulers, and resolve a fractional switch point."""
        self._slots = {}
        for idx, optimizer in enumerate(trainer.optimizers):
            inner = unwrap_optimizer(optimizer)
            slot = momentum_slot(inner)
            if slot is None:
                message = (
                    f"BetaMomentumCallback cannot write the momentum of optimizer {idx} ({type(inner).__name__}):"
                    " supported are SGD, RMSprop, Adam, AdamW, NAdam, RAdam and Adamax."
                )
                if self.on_unsupported == "raise":
                    raise MisconfigurationException(message + ' Pass `on_unsupported="warn"` to skip it.')
                rank_zero_warn(message + " It is left unchanged.")
            elif slot == "momentum" and isinstance(inner, torch.optim.SGD) and _all_zero_momentum(inner.param_groups):
                rank_zero_info(
                    f"BetaMomentumCallback: optimizer {idx} (SGD) was built with momentum 0; momentum is switched on"
                    " and torch creates the momentum buffer at the first step."
                )
            self._slots[id(inner)] = slot
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, (OneCycleLR, CyclicLR)) and getattr(scheduler, "cycle_momentum", False):
                raise MisconfigurationException(
                    f"{type(scheduler).__name__} with `cycle_momentum=True` also writes momentum and would fight"
                    f" BetaMomentumCallback. Build it with `cycle_momentum=False`."
                )
        if isinstance(self.switch_at, float) and self.switch_step is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise MisconfigurationException(
                    f"`switch_at={self.switch_at}` is a fraction of the run, but the run's length is unknown"
                    " (`trainer.estimated_stepping_batches` is infinite). Pass an int step or set `max_steps`."
                )
            self.switch_step = round(self.switch_at * total)
        elif isinstance(self.switch_at, int) and not isinstance(self.switch_at, bool):
            self.switch_step = self.switch_at

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Write the momentum this optimizer step will use.

        Runs in ``on_before_optimizer_step`` so it fires once per optimizer step under gradient accumulation, after
        the lr of the step is final (schedulers step after ``optimizer.step()``).
        """
        inner = unwrap_optimizer(optimizer)
        if id(inner) not in self._slots:
            # An optimizer created after fit start (e.g. by a tuner): classify it now.
            self._slots[id(inner)] = momentum_slot(inner)
        slot = self._slots[id(inner)]
        if slot is None:
            return
        step = trainer.global_step
        groups = inner.param_groups
        if self.switch_at == "crossover" and self.switch_step is None:
            self._update_crossover(groups, step)
        switched = self.switch_step is not None and step >= self.switch_step
        logging = self.log_momentum and is_logging_step(trainer)
        metrics: dict[str, float] = {}
        opt_idx, n_opts = optimizer_index(trainer.optimizers, inner)
        for group_idx, group in enumerate(groups):
            lr = group["lr"]
            if is_frozen_lr(lr):
                continue
            value: float | Tensor
            if switched:
                value = self.constant_momentum
            else:
                value = self._physics_momentum(lr, slot)
            write_momentum(group, slot, value)
            if logging:
                written = read_momentum(group, slot)
                number = written.item() if isinstance(written, Tensor) else float(written)
                metrics[group_key("beta/momentum", opt_idx, n_opts, group_idx, groups)] = number
        if metrics:
            log_scalars(trainer, metrics, step=step)

    def _physics_momentum(self, lr: float | Tensor, slot: MomentumSlot) -> float | Tensor:
        floor = max(self.min_momentum, SGD_MOMENTUM_FLOOR) if slot == "momentum" else self.min_momentum
        if isinstance(lr, Tensor):
            return critical_momentum(lr, self.curvature, self.rule, floor, self.max_momentum)
        raw = unclamped_critical_momentum(lr, self.curvature, self.rule)  # rejects a NaN, inf or negative lr
        if not self._clamp_warned and not (self.min_momentum <= raw <= self.max_momentum):
            self._clamp_warned = True
            bound = "min_momentum" if raw < self.min_momentum else "max_momentum"
            rank_zero_warn(
                f"BetaMomentumCallback: the critical momentum {raw:.4g} at lr={lr:.4g} is clamped to"
                f" `{bound}`={getattr(self, bound)} (warned once)."
            )
        # The clamp of `critical_momentum`, on the value already computed (its arguments were checked in __init__).
        return min(max(raw, floor), self.max_momentum)

    def _update_crossover(self, groups: list[dict[str, Any]], step: int) -> None:
        values = [
            unclamped_critical_momentum(as_float(group["lr"]), self.curvature, self.rule)
            for group in groups
            if not is_frozen_lr(group["lr"])
        ]
        if not values:
            return
        if all(v >= self.constant_momentum for v in values):
            if self._crossover_armed:
                self.switch_step = step
                rank_zero_info(
                    f"BetaMomentumCallback: physics momentum reached {self.constant_momentum} at step {step};"
                    " holding it constant from here on."
                )
        else:
            self._crossover_armed = True

    def state_dict(self) -> dict[str, Any]:
        """What cannot be derived on resume: the switch step and the crossover and warning flags."""
        return {
            "version": _STATE_VERSION,
            "switch_step": self.switch_step,
            "crossover_armed": self._crossover_armed,
            "clamp_warned": self._clamp_warned,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuse a state of another version.

        Raises:
            ValueError: if the state's ``version`` is not this release's.
        """
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"BetaMomentumCallback state has version {version!r}; this release reads version {_STATE_VERSION}"
            )
        self.switch_step = state_dict["switch_step"]
        self._crossover_armed = bool(state_dict["crossover_armed"])
        self._clamp_warned = bool(state_dict["clamp_warned"])


def _check_switch_at(switch_at: Any) -> None:
    if switch_at is None:
        return
    if isinstance(switch_at, bool):
        raise TypeError("`switch_at` must be None, an int step, a float in (0, 1) or 'crossover', got bool")
    if isinstance(switch_at, int):
        if switch_at < 0:
            raise ValueError(f"`switch_at` as an optimizer step must be >= 0, got {switch_at}")
        return
    if isinstance(switch_at, float):
        if not (0.0 < switch_at < 1.0):
            raise ValueError(f"`switch_at` as a fraction of training must be in (0, 1), got {switch_at}")
        return
    if isinstance(switch_at, str):
        if switch_at != "crossover":
            raise ValueError(f'`switch_at` as a string must be "crossover", got {switch_at!r}')
        return
    raise TypeError(
        f"`switch_at` must be None, an int step, a float in (0, 1) or 'crossover', got {type(switch_at).__name__}"
    )


def _all_zero_momentum(groups: list[dict[str, Any]]) -> bool:
    return all(not isinstance(g.get("momentum"), Tensor) and g.get("momentum", 0) == 0 for g in groups)
