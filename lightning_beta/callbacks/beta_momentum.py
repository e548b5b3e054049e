"""BetaMomentumCallback: momentum from the live learning rate, by critical damping (docs/method.md, section 1)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from lightning_beta._checks import check_bool, check_state_version
from lightning_beta._logging import is_logging_step, log_step
from lightning_beta._optim import (
    MomentumSlot,
    effective_lr,
    fit_group_counts,
    group_key,
    momentum_slot,
    optimizer_index,
    read_momentum,
    refusal_reason,
    unwrap_optimizer,
    write_momentum,
)
from lightning_beta.functional.momentum import (
    check_curvature,
    check_momentum_bounds,
    check_rule,
    crossover_update,
    unclamped_critical_momentum,
)

#: Momentum written instead of exactly 0 to SGD and RMSprop groups. torch skips the momentum buffer of a group
#: whose momentum is 0 and later resumes from the stale buffer; with a tiny positive momentum the buffer keeps
#: tracking the gradient (``buf = 1e-6 * buf + g``), which is heavy-ball SGD at momentum ~0.
SGD_MOMENTUM_FLOOR = 1e-6

# Version 1 is the layout of the previous release; ``fit_groups`` was added as an optional key (a version-1 state
# without it resumes, and the keys are then decided from the groups present at fit start).
_STATE_VERSION = 1


class BetaMomentumCallback(pl.Callback):
    r"""Set the optimizer's momentum at every optimizer step from the live learning rate.

    The momentum of each param group is the critically damped value of the heavy-ball oscillator,
    ``mu = 1 - 2*sqrt(curvature*lr_eff)`` (``rule="paper"``) or ``(1 - sqrt(curvature*lr_eff))**2``
    (``rule="exact"``), clamped to ``[min_momentum, max_momentum]``, where ``lr_eff = lr*(1 - dampening)`` is the
    heavy-ball step size (SGD's ``dampening``; ``lr`` for every other optimizer). It is written in
    ``on_before_optimizer_step``, after the backward pass and before ``optimizer.step()`` reads it, so it fires once
    per optimizer step under gradient accumulation and always uses the lr that same step uses, whichever scheduler
    set it.

    Supported optimizers: SGD and RMSprop (``momentum``), Adam, AdamW, NAdam, RAdam and Adamax (``betas[0]``;
    ``betas[1]`` is never touched), their subclasses, wrappers exposing them as ``.optimizer`` or
    ``.base_optimizer`` (timm's Lookahead), and any class declared with :func:`lightning_beta.register_momentum`.
    Lion (its betas interpolate the update direction), LAMB, LARS and Adafactor are refused, with a message naming
    ``register_momentum``.

    Behaviour worth knowing:

    - A param group with ``lr == 0`` (a frozen group) keeps its momentum.
    - An SGD group built with ``momentum=0`` gets momentum switched on (one info message).
    - SGD with ``nesterov=True``: one warning; the critical-damping formula assumes heavy-ball momentum.
    - Momentum exactly 0 (``lr_eff >= 0.25`` with the paper rule) is written as ``1e-6`` to SGD and RMSprop groups:
      torch skips the momentum buffer of a group at momentum 0 and would resume later from a stale one.
    - The first time clamping bites (float lr), one warning names the lr.
    - No host sync on steps that do not log: a Tensor lr is turned into momentum on its device and written into
      Tensor betas/momentum with ``copy_``, and ``switch_at="crossover"`` is decided on the device. A Tensor lr with
      a *float* momentum slot needs a host copy each step (``.item()``): one warning at fit start when the lr lives
      on an accelerator; build the optimizer with Tensor betas/momentum (as capturable Adam does) to avoid it.
    - ``OneCycleLR`` and ``CyclicLR`` with ``cycle_momentum=True`` also write momentum: the callback refuses them.
    - Adam's bias correction: torch divides the first moment by ``1 - beta1_t**t`` with the *current* ``beta1_t``,
      while a first moment built with changing betas carries the weight ``1 - prod_s beta1_s``. With a scheduled
      ``beta1`` torch's update is therefore ``(1 - prod_s beta1_s) / (1 - beta1_t**t)`` times the one the betas
      actually used call for. The callback leaves torch's correction as it is: this is documented, not corrected
      (correcting it means rewriting the optimizer's first-moment state every step). Measured by
      ``benchmarks/adam_bias_correction.py``: a cosine decay from 1e-3 stays within 0.03%; a linear warmup from
      lr 0 to 1e-3 over 100 steps gives 5.5x on the first step with ``lr > 0``, 2.2x on the fifth, up to 12% less
      around step 20, and within 1% from the end of the warmup; a warmup from 1e-4 never exceeds 1 (up to 14%
      less). The over-large steps are taken at the smallest lrs of the warmup (docs/method.md, section 1).

    The step unit of ``switch_at`` is the *training batch that stepped*: the x-axis of ``self.log``, the unit of
    ``trainer.estimated_stepping_batches`` and of ``trainer.global_step`` under automatic optimization. Under manual
    optimization with several optimizers ``global_step`` advances once per optimizer step; the switch does not.

    Logged metrics (when ``log_momentum``), through ``pl_module.log_dict`` on the steps Lightning writes
    (``log_every_n_steps``, 0 = never; handed over once per batch, in ``on_train_batch_end``, as Tensors when the
    optimizer stores Tensors), so they share the step axis, ``callback_metrics`` and CSV rows of the user's own
    ``self.log``:

    - ``beta/momentum``: the momentum written for the step (one optimizer, one param group);
    - ``beta/momentum/<group name or pgN>``: with several param groups, named from the groups present at fit
      start; a group added mid-run (``BackboneFinetuning``) gets its own suffix and the others keep theirs;
    - ``beta/momentum/optK[/...]``: with several optimizers.

    Args:
        rule: ``"paper"`` or ``"exact"`` (see :func:`~lightning_beta.functional.critical_momentum`). Defaults to
            ``"paper"``.
        curvature: the stiffness ``lambda``; 1 is the method's zero-parameter choice. Defaults to ``1.0``.
        min_momentum: lower clamp, ``>= 0``. Defaults to ``0.0``.
        max_momentum: upper clamp, ``< 1``. Defaults to ``0.99``.
        switch_at: hybrid schedule: when to switch from the physics momentum to ``constant_momentum`` for the rest
            of training. ``None`` never switches; an ``int`` is the batch step of the switch (training batches that
            stepped, see above); a ``float`` in ``(0, 1)`` is a fraction of ``trainer.estimated_stepping_batches``;
            ``"crossover"`` switches at the first step where the physics momentum of every active group reaches
            ``constant_momentum`` from below (a warmup that starts above it does not trigger it). Defaults to
            ``None``.
        constant_momentum: the momentum held after the switch, in ``[0, 1)``. Defaults to ``0.9``.
        on_unsupported: ``"raise"`` a ``MisconfigurationException`` at fit start for an optimizer whose momentum
            cannot be written, or ``"warn"`` once and leave it alone. Defaults to ``"raise"``.
        log_momentum: log the value written, for the step it was written (see "Logged metrics"). Defaults to
            ``True``.

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
        # Messages pinned by docs/errors.md (they predate `_checks.check_number`/`check_choice`).
        if isinstance(constant_momentum, bool) or not isinstance(constant_momentum, (int, float)):
            raise TypeError(f"`constant_momentum` must be a float, got {type(constant_momentum).__name__}")
        if not (0.0 <= constant_momentum < 1.0):
            raise ValueError(f"`constant_momentum` must be in [0, 1), got {constant_momentum}")
        if on_unsupported not in ("raise", "warn"):
            raise ValueError(f'`on_unsupported` must be "raise" or "warn", got {on_unsupported!r}')
        check_bool("log_momentum", log_momentum)
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
        self._fit_groups: list[int] | None = None
        self._slots: dict[int, MomentumSlot | None] = {}
        # The crossover decided on the device (Tensor lr): armed, switched and the batch step of the switch, read on
        # the host only on logging steps and when checkpointing.
        self._device_crossover: tuple[Tensor, Tensor, Tensor] | None = None
        # What this batch's optimizer steps wrote, on a logging step: handed to Lightning once, at batch end.
        self._pending: dict[str, float | Tensor] = {}

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
            self._fit_groups = None
            self._device_crossover = None
            self._pending = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizers and schedulers, name the param groups, and resolve a fractional switch point."""
        self._slots = {}
        for idx, optimizer in enumerate(trainer.optimizers):
            inner = unwrap_optimizer(optimizer)
            self._slots[id(inner)] = slot = momentum_slot(inner)
            if slot is None:
                self._refuse(idx, inner)
                continue
            name = type(inner).__name__
            groups = inner.param_groups
            if slot == "momentum" and isinstance(inner, torch.optim.SGD) and _all_zero_momentum(groups):
                rank_zero_info(
                    f"BetaMomentumCallback: optimizer {idx} (SGD) was built with momentum 0; momentum is switched on"
                    " and torch creates the momentum buffer at the first step."
                )
            if any(group.get("nesterov", False) for group in groups):
                rank_zero_warn(
                    f"BetaMomentumCallback: optimizer {idx} ({name}) uses Nesterov momentum; the critical-damping"
                    " formula assumes heavy-ball momentum, so the value written is the heavy-ball one."
                )
            if any(_syncs_per_step(group, slot) for group in groups):
                rank_zero_warn(
                    f"BetaMomentumCallback: optimizer {idx} ({name}) has a Tensor lr on an accelerator but a float"
                    f" `{slot}`: writing the momentum costs a host sync per step. Build it with {slot} stored as"
                    " Tensors (e.g. `betas=(torch.tensor(0.9), torch.tensor(0.999))`) to avoid it."
                )
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, (OneCycleLR, CyclicLR)) and getattr(scheduler, "cycle_momentum", False):
                raise MisconfigurationException(
                    f"{type(scheduler).__name__} with `cycle_momentum=True` also writes momentum and would fight"
                    f" BetaMomentumCallback. Build it with `cycle_momentum=False`."
                )
        if self._fit_groups is None:  # not restored from a checkpoint
            self._fit_groups = fit_group_counts(trainer.optimizers)
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

    def _refuse(self, idx: int, inner: Any) -> None:
        name = type(inner).__name__
        reason = refusal_reason(inner)
        if reason is None:
            message = (
                f"BetaMomentumCallback cannot write the momentum of optimizer {idx} ({name}):"
                " supported are SGD, RMSprop, Adam, AdamW, NAdam, RAdam and Adamax."
            )
        else:
            message = (
                f"BetaMomentumCallback cannot write the momentum of optimizer {idx} ({name}): {reason}. If its"
                " update follows a heavy-ball buffer `buf = mu*buf + c*grad`, declare where `mu` lives with"
                f' `lightning_beta.register_momentum({name}, slot="betas")` (or `slot="momentum"`).'
            )
        if self.on_unsupported == "raise":
            raise MisconfigurationException(message + ' Pass `on_unsupported="warn"` to skip it.')
        rank_zero_warn(message + " It is left unchanged.")

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
        step = _batch_step(trainer)
        groups = inner.param_groups
        lrs = [effective_lr(group) for group in groups]
        on_device = any(isinstance(group["lr"], Tensor) for group in groups)
        if self.switch_at == "crossover" and self.switch_step is None:
            if on_device or self._device_crossover is not None:
                self._crossover_on_device(groups, lrs, step)
            else:
                self._crossover_on_host(groups, lrs, step)
        switched: bool | Tensor = self.switch_step is not None and step >= self.switch_step
        if self.switch_step is None and self._device_crossover is not None:
            switched = self._device_crossover[1]
        logging = self.log_momentum and is_logging_step(trainer)
        opt_idx, n_opts = optimizer_index(trainer.optimizers, inner)
        n_fit_groups = self._fit_groups[opt_idx] if self._fit_groups and opt_idx < len(self._fit_groups) else None
        for group_idx, (group, lr) in enumerate(zip(groups, lrs)):
            raw_lr = group["lr"]
            if isinstance(raw_lr, Tensor) or isinstance(switched, Tensor):
                if not self._write_on_device(group, slot, raw_lr, lr, switched):
                    continue
            else:
                if raw_lr == 0:  # a frozen group keeps its momentum
                    continue
                value = self.constant_momentum if switched else self._physics_momentum(lr, slot)
                write_momentum(group, slot, value)
            if logging:
                written = read_momentum(group, slot)
                key = group_key("beta/momentum", opt_idx, n_opts, group_idx, groups, n_fit_groups)
                self._pending[key] = written.detach().clone() if isinstance(written, Tensor) else float(written)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Hand the momentum written on a logging step to Lightning, once per batch.

        Logged here rather than from ``on_before_optimizer_step``: under manual optimization that hook runs inside
        ``training_step``, and on the first batch of an epoch Lightning resets the values of a hook when the logging
        hook changes, so alternating between the two would drop values logged earlier in the batch (the user's and
        ours).
        """
        if self._pending:
            self._resolve_device_crossover()
            log_step(pl_module, self._pending)
            self._pending = {}

    def _write_on_device(
        self,
        group: dict[str, Any],
        slot: MomentumSlot,
        raw_lr: float | Tensor,
        lr: float | Tensor,
        switched: bool | Tensor,
    ) -> bool:
        """Write the momentum of a group whose lr or switch flag is a Tensor; whether the group is active."""
        current = read_momentum(group, slot)
        device = (
            raw_lr.device if isinstance(raw_lr, Tensor) else current.device if isinstance(current, Tensor) else None
        )
        lr_t = torch.as_tensor(lr, device=device)
        value = torch.where(
            torch.as_tensor(switched, device=lr_t.device), self.constant_momentum, self._clamp(lr_t, slot)
        )
        if isinstance(current, Tensor):
            # A frozen group keeps its momentum, decided on the device.
            write_momentum(group, slot, torch.where(lr_t == 0, current.to(value.dtype), value.to(current.device)))
            return True
        # A float slot cannot hold a device value: the one host copy per step the fit-start warning announces.
        if isinstance(raw_lr, Tensor) and raw_lr.item() == 0:
            return False
        if not isinstance(raw_lr, Tensor) and raw_lr == 0:
            return False
        write_momentum(group, slot, value)
        return True

    def _floor(self, slot: MomentumSlot) -> float:
        return max(self.min_momentum, SGD_MOMENTUM_FLOOR) if slot == "momentum" else self.min_momentum

    def _clamp(self, lr: Tensor, slot: MomentumSlot) -> Tensor:
        raw = unclamped_critical_momentum(lr, self.curvature, self.rule)
        return torch.clamp(raw, min=self._floor(slot), max=self.max_momentum)

    def _physics_momentum(self, lr: float | Tensor, slot: MomentumSlot) -> float | Tensor:
        if isinstance(lr, Tensor):
            return self._clamp(lr, slot)
        raw = unclamped_critical_momentum(lr, self.curvature, self.rule)  # rejects a NaN, inf or negative lr
        if not self._clamp_warned and not (self.min_momentum <= raw <= self.max_momentum):
            self._clamp_warned = True
            bound = "min_momentum" if raw < self.min_momentum else "max_momentum"
            rank_zero_warn(
                f"BetaMomentumCallback: the critical momentum {raw:.4g} at lr={lr:.4g} is clamped to"
                f" `{bound}`={getattr(self, bound)} (warned once)."
            )
        # The clamp of `critical_momentum`, on the value already computed (its arguments were checked in __init__).
        return min(max(raw, self._floor(slot)), self.max_momentum)

    def _crossover_on_host(self, groups: list[dict[str, Any]], lrs: list[Any], step: int) -> None:
        values = [
            unclamped_critical_momentum(float(lr), self.curvature, self.rule)
            for group, lr in zip(groups, lrs)
            if group["lr"] != 0
        ]
        if not values:
            return
        reached = all(v >= self.constant_momentum for v in values)
        self._crossover_armed, switched = crossover_update(self._crossover_armed, False, reached)
        if switched:
            self.switch_step = step
            self._announce_switch(step)

    def _crossover_on_device(self, groups: list[dict[str, Any]], lrs: list[Any], step: int) -> None:
        device = next((g["lr"].device for g in groups if isinstance(g["lr"], Tensor)), None)
        if self._device_crossover is None:
            false = torch.zeros((), dtype=torch.bool, device=device)
            armed = torch.full((), self._crossover_armed, dtype=torch.bool, device=device)
            self._device_crossover = (armed, false, torch.full((), -1, dtype=torch.long, device=device))
        armed, switched, at = self._device_crossover
        lr_t = torch.stack([torch.as_tensor(lr, device=armed.device).reshape(()).float() for lr in lrs])
        frozen = torch.stack([torch.as_tensor(g["lr"], device=armed.device).reshape(()) == 0 for g in groups])
        physics = unclamped_critical_momentum(lr_t, self.curvature, self.rule)
        every = ((physics >= self.constant_momentum) | frozen).all()
        reached = every & (~frozen).any()
        # A step whose groups are all frozen neither arms nor fires: `every` is true and `reached` false.
        armed_next = armed | ~every
        _, switched_next = crossover_update(armed, switched, reached)
        at = torch.where(switched_next & ~switched, step, at)
        self._device_crossover = (armed_next, switched_next, at)

    def _resolve_device_crossover(self) -> None:
        """Read the device crossover on the host (logging steps and checkpoints only)."""
        if self._device_crossover is None:
            return
        armed, switched, at = self._device_crossover
        self._crossover_armed = bool(armed)
        if bool(switched):
            self.switch_step = int(at)
            self._device_crossover = None
            self._announce_switch(self.switch_step)

    def _announce_switch(self, step: int) -> None:
        rank_zero_info(
            f"BetaMomentumCallback: physics momentum reached {self.constant_momentum} at step {step};"
            " holding it constant from here on."
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bring a switch decided on the device to the host, so ``switch_step`` is readable after fit."""
        self._resolve_device_crossover()

    def state_dict(self) -> dict[str, Any]:
        """What cannot be derived on resume: the switch step, the crossover and warning flags, the group counts."""
        self._resolve_device_crossover()
        return {
            "version": _STATE_VERSION,
            "switch_step": self.switch_step,
            "crossover_armed": self._crossover_armed,
            "clamp_warned": self._clamp_warned,
            "fit_groups": None if self._fit_groups is None else list(self._fit_groups),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuse a state of another version.

        A state of the previous release (version 1 without ``fit_groups``) resumes; its log keys are then decided
        from the param groups present at fit start.

        Raises:
            ValueError: if the state's ``version`` is not this release's.
        """
        check_state_version("BetaMomentumCallback", state_dict, _STATE_VERSION)
        self.switch_step = state_dict["switch_step"]
        self._crossover_armed = bool(state_dict["crossover_armed"])
        self._clamp_warned = bool(state_dict["clamp_warned"])
        fit_groups = state_dict.get("fit_groups")
        self._fit_groups = None if fit_groups is None else [int(n) for n in fit_groups]
        self._device_crossover = None


def _batch_step(trainer: pl.Trainer) -> int:
    """Training batches that stepped so far: the x-axis of ``self.log`` and the unit of ``estimated_stepping_batches``.

    Lightning's ``LearningRateMonitor`` logs at this same counter; ``global_step`` equals it under automatic
    optimization but counts every optimizer's steps under manual optimization.
    """
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))


def _syncs_per_step(group: dict[str, Any], slot: MomentumSlot) -> bool:
    lr = group["lr"]
    return isinstance(lr, Tensor) and lr.device.type != "cpu" and not isinstance(read_momentum(group, slot), Tensor)


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
