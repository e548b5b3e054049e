"""DampingRegimeMonitor: damping ratio and regime of every optimizer step and epoch (docs/method.md, section 2)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_beta._checks import check_bool, check_state_version
from lightning_beta._gradients import grad_scaler, is_distributed_tensor, pending_scale
from lightning_beta._logging import is_logging_step, log_epoch, log_step
from lightning_beta._optim import (
    effective_lr,
    fit_group_counts,
    group_key,
    is_frozen_lr,
    optimizer_index,
    read_momentum,
    read_slot,
    unwrap_optimizer,
)
from lightning_beta._strategies import shards_flat
from lightning_beta._tensorboard import tensorboard_experiment, write_layout
from lightning_beta.functional.curvature import SecantCurvature, check_decay, layer_metrics, merged_state, secant_layers
from lightning_beta.functional.damping import check_tolerance, classify_regime, damping_ratio
from lightning_beta.functional.epoch_damping import EpochDamping, EpochZetas
from lightning_beta.functional.epoch_damping import summary_table as _summary_table
from lightning_beta.functional.momentum import check_curvature, check_rule
from lightning_beta.layer_groups import GroupBy, check_group_by, group_parameters

__all__ = ["DampingRegimeMonitor", "EpochDamping"]

_STATE_VERSION = 1


class DampingRegimeMonitor(pl.Callback):
    r"""Log the damping ratio ``zeta`` of every optimizer step and the damping regime of every epoch.

    For each param group, ``zeta = (1 - mu) / (2*sqrt(curvature*lr))`` (``rule="paper"``) or
    ``(1 - sqrt(mu)) / sqrt(curvature*lr)`` (``rule="exact"``) from the lr and momentum (SGD/RMSprop ``momentum``,
    Adam-family ``betas[0]``) that the optimizer step actually used, whoever set them: a constant, a scheduler
    with cyclic momentum, :class:`~lightning_beta.callbacks.beta_momentum.BetaMomentumCallback` or the user. The
    values are read in a torch optimizer step *post* hook, right after the update and before any scheduler steps,
    so the order of the callbacks does not matter. The monitor never changes training. SGD with ``dampening=d``
    is heavy ball at step size ``lr*(1 - d)``, which is the lr ``zeta`` uses; with ``nesterov=True`` the ratio
    still reads the heavy-ball oscillator (one warning).

    A step is ``underdamped`` if ``zeta < 1 - tolerance``, ``critical`` within the band, ``overdamped`` above it;
    an epoch's regime is the class of the median ``zeta`` over all of its optimizer steps (not only the logged
    ones). Groups with ``lr == 0`` are skipped. Groups without momentum (Adagrad, SGD or RMSprop at momentum 0)
    are reported once as unsupported and not logged. Steps that a ``GradScaler`` skips are not counted (the
    optimizer never ran), except for fused optimizers, whose ``step()`` runs and skips the update itself.

    Everything is logged through ``LightningModule.log``: per-step metrics on the steps Lightning writes
    (``log_every_n_steps``, 0 meaning never), epoch metrics from ``on_train_epoch_end``, so they reach
    ``trainer.callback_metrics`` (``EarlyStopping(monitor="damping/epoch_zeta")``) and share the rows and the
    x-axis of the user's own ``self.log``. Between logging steps nothing is copied to the host: ratios computed
    from tensor lrs or momenta are kept in a device buffer copied once at epoch end.

    ``curvature="secant"`` (beyond the method's ``lambda = 1``) also measures the stiffness of each layer group
    (:func:`~lightning_beta.layer_groups.group_parameters`) from consecutive steps, ``||g_t - g_{t-1}|| /
    ||theta_t - theta_{t-1}||`` smoothed by an EMA, on the device
    (:class:`~lightning_beta.functional.curvature.SecantCurvature`: costs, noise bias, skipped steps), and logs
    it with a measured ``zeta`` per layer, at the lr and momentum of the param group holding the layer's first
    parameter; the per-group metrics keep ``curvature = 1``. Gradients and parameters are read together in
    ``on_before_optimizer_step``: raw (before clipping) and unscaled (a fused optimizer's pending fp16 loss scale
    divided out on the device). Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) each rank measures
    its shards and the squared sums are summed over ranks in one collective per logging step and at epoch end;
    FSDP1 and DeepSpeed, which flatten the parameters, are refused.

    Logged metrics (``<g>`` is empty for one param group, else ``/<group name or pgN>``, with ``/optK`` in front
    with several optimizers, as for ``beta/momentum``):

    - ``damping/zeta<g>``: damping ratio of the step (``logging_interval="step"``, on Lightning's logging steps).
    - ``damping/regime<g>``: ``-1`` underdamped, ``0`` critical, ``+1`` overdamped.
    - ``damping/lr<g>``, ``damping/momentum<g>``: the lr and momentum the step used.
    - ``damping/band_low``, ``damping/band_high``: ``1 - tolerance`` and ``1 + tolerance``, for the band chart.
    - ``damping/epoch_zeta<g>``: median ``zeta`` of the epoch (epoch-level, from ``on_train_epoch_end``).
    - ``damping/epoch_regime<g>``: class of that median, coded as above.
    - ``damping/epoch_fraction/underdamped<g>``, ``damping/epoch_fraction/critical<g>``,
      ``damping/epoch_fraction/overdamped<g>``: fraction of the epoch's steps in each regime.
    - With ``curvature="secant"``, per layer group ``<layer>``: ``damping/curvature/<layer>`` (the smoothed
      ``lambda_hat``) and ``damping/layer_zeta/<layer>`` (``zeta`` at that curvature), once the layer has two
      complete steps; per step, or at each epoch end with ``logging_interval="epoch"``. (``layer_zeta``, not
      ``zeta/<layer>``, so that layer names never collide with group keys.)
    - TensorBoard text ``damping/summary`` at fit end: a table epoch | group | median zeta | regime | fractions.

    With a ``TensorBoardLogger`` (``lightning`` or ``pytorch_lightning``) a custom-scalars category "Damping" is
    part of the run's layout (rank zero): zeta with the critical band (a margin chart per param group), zeta of
    all groups with the band lines, lr and momentum, regimes and epoch fractions, and, in secant mode, per-layer
    zeta and curvature.

    Args:
        tolerance: half-width of the critical band around ``zeta = 1``, in ``[0, 1)``. Defaults to ``0.1``.
        rule: ``"paper"`` or ``"exact"``, the damping ratio formula. Defaults to ``"paper"``.
        curvature: the stiffness ``lambda`` (a positive float), or ``"secant"`` to also measure it per layer.
            Defaults to ``1.0``.
        logging_interval: ``"step"`` logs the per-step metrics on Lightning's logging steps and the epoch
            metrics; ``"epoch"`` logs only the epoch metrics (and, in secant mode, the per-layer ones at each
            epoch end). Defaults to ``"step"``.
        layout: write the TensorBoard custom-scalars category. Defaults to ``True``.
        log: send metrics to Lightning; ``False`` keeps :attr:`history` only. Defaults to ``True``.
        group_by: layer grouping for ``curvature="secant"``, as in
            :func:`~lightning_beta.layer_groups.group_parameters`. Defaults to ``"auto"``.
        curvature_decay: EMA weight of the past secant estimate, in ``[0, 1)``. Defaults to ``0.9``.

    Raises:
        ValueError: for a ``tolerance`` outside ``[0, 1)``, an unknown ``rule`` or ``logging_interval``, a
            ``curvature`` that is neither a finite positive number nor ``"secant"``, a bad ``group_by`` or a
            ``curvature_decay`` outside ``[0, 1)``.
        TypeError: for arguments of the wrong type.
        MisconfigurationException: at fit start, when ``log=True`` and the Trainer has no logger, or with
            ``curvature="secant"`` under a strategy that flattens parameters into shards (FSDP1, DeepSpeed).

    Attributes:
        history: one :class:`EpochDamping` per finished epoch and param group, in order.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = DampingRegimeMonitor(tolerance=0.2, log=False)
        >>> trainer = Trainer(callbacks=[monitor], logger=False)
        >>> monitor.history
        []
    """

    def __init__(
        self,
        tolerance: float = 0.1,
        rule: Literal["paper", "exact"] = "paper",
        curvature: float | Literal["secant"] = 1.0,
        logging_interval: Literal["step", "epoch"] = "step",
        layout: bool = True,
        log: bool = True,
        group_by: GroupBy = "auto",
        curvature_decay: float = 0.9,
    ) -> None:
        check_tolerance(tolerance)
        check_rule(rule)
        if isinstance(curvature, str):
            if curvature != "secant":
                raise ValueError(f'`curvature` must be a positive float or "secant", got {curvature!r}')
        else:
            check_curvature(curvature)
        if logging_interval not in ("step", "epoch"):
            raise ValueError(f'`logging_interval` must be "step" or "epoch", got {logging_interval!r}')
        check_bool("layout", layout)
        check_bool("log", log)
        # A depth given as digits on the command line (LightningCLI) becomes the int it means.
        group_by = check_group_by(group_by)
        check_decay(curvature_decay, "curvature_decay")
        self.tolerance = float(tolerance)
        self.rule = rule
        self.secant = curvature == "secant"
        self.curvature: float | str = curvature if isinstance(curvature, str) else float(curvature)
        self.logging_interval = logging_interval
        self.layout = layout
        # Not `self.log`: Lightning overwrites `callback.log` with the LightningModule's `log` at fit start.
        self.log_enabled = log
        self.group_by = group_by
        self.curvature_decay = float(curvature_decay)
        self.history: list[EpochDamping] = []
        self._reset()

    def _reset(self) -> None:
        self.history = []
        # Epoch accumulators: group suffix -> zeta of every optimizer step of the epoch.
        self._epoch: int | None = None
        self._zetas = EpochZetas()
        self._last_step = 0
        self._pending: dict[int, int] = {}
        self._reported: set[str] = set()
        self._handles: list[Any] = []
        self._hooked: set[int] = set()
        self._secant: dict[int, tuple[SecantCurvature, list[int]]] = {}
        self._secant_state: dict[str, Any] | None = None
        # Param group counts at fit start, so that a group added mid-run does not rename the others' keys.
        self._fit_groups: list[int] = []
        # The step metrics of the current batch's optimizer steps, handed to Lightning in `on_train_batch_end`.
        self._step_metrics: dict[str, float | Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tolerance=self.tolerance, rule=self.rule, curvature=self.curvature)

    @property
    def _value_curvature(self) -> float:
        return 1.0 if isinstance(self.curvature, str) else self.curvature

    # ---------------------------------------------------------------- fit lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check there is somewhere to log, and forget a previous fit (a checkpoint restored next brings it back).

        Raises:
            MisconfigurationException: if ``log=True`` and the Trainer has no logger.
        """
        if stage != "fit":
            return
        if self.log_enabled and not trainer.loggers:
            raise MisconfigurationException(
                "DampingRegimeMonitor has nowhere to log: the Trainer has no logger (`logger=False`). Pass a logger,"
                " or `DampingRegimeMonitor(log=False)` to keep only `history`."
            )
        self._remove_hooks()
        self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the optimizers' steps, build the secant estimators and write the TensorBoard layout.

        Raises:
            MisconfigurationException: with ``curvature="secant"`` under FSDP1 or DeepSpeed.
        """
        if self.secant and shards_flat(trainer.strategy):
            # FSDP1 and DeepSpeed flatten the parameters into per-rank buffers: no layer can be measured.
            raise MisconfigurationException(
                "DampingRegimeMonitor(curvature='secant') does not support the sharded strategy"
                f" {type(trainer.strategy).__name__}: each rank holds only a shard of each parameter, so the measured"
                " curvature would be wrong. Use a fixed `curvature` (the default), DDP, or FSDP2"
                " (`ModelParallelStrategy` with `fully_shard`)."
            )
        self._fit_groups = fit_group_counts(trainer.optimizers)
        for optimizer in trainer.optimizers:
            self._hook(trainer, unwrap_optimizer(optimizer))
        if self.secant:
            self._build_secant(trainer, pl_module)
        if self.log_enabled and self.layout and not write_layout(trainer):
            rank_zero_info(
                "DampingRegimeMonitor: the custom-scalars layout is TensorBoard-only and no TensorBoardLogger is"
                " attached; the scalars are still logged."
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close an epoch restored from a checkpoint saved after its last step but before its end."""
        if self._epoch is not None and self._epoch != trainer.current_epoch:
            # Its metrics were due at the end of an epoch that is over: they go to `history` only.
            self._finish_epoch(trainer, pl_module, log=False)
        self._epoch = trainer.current_epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Forget step metrics left by a batch that raised."""
        self._step_metrics = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Hand the batch's step metrics to Lightning, once, in the row of the user's own ``self.log`` values.

        Not from the step hook: in an epoch's first batch Lightning drops what a hook logged when logging comes back
        to it from another hook (several manual optimizer steps in ``training_step``).
        """
        if self._step_metrics:
            log_step(pl_module, self._step_metrics)
            self._step_metrics = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Mark the optimizer step about to run, and take the secant's one reading of gradients and parameters.

        Runs once per optimizer step (also under gradient accumulation), after the backward pass and the AMP
        unscale and before gradient clipping, so the secant sees the raw gradients. The lr and momentum are
        *not* read here: a callback listed after this one may still write them. They are read in the
        optimizer's step post hook.
        """
        inner = unwrap_optimizer(optimizer)
        self._hook(trainer, inner)  # an optimizer created after fit start (e.g. by a tuner)
        self._pending[id(inner)] = trainer.global_step
        if id(inner) in self._secant:
            # A fused optimizer under fp16 AMP unscales inside `step()`: divide its pending scale out on the device.
            self._secant[id(inner)][0].observe(pending_scale(grad_scaler(trainer), inner))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Summarise the epoch: median zeta, its regime, the fraction of steps in each regime."""
        self._flush()
        self._finish_epoch(trainer, pl_module, log=self.log_enabled)
        if self.secant and self.log_enabled and self.logging_interval == "epoch":
            log_epoch(pl_module, self._layer_metrics(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the text summary (TensorBoard, rank zero) and release the optimizer hooks."""
        self._flush()
        self._remove_hooks()
        if not (self.log_enabled and self.history and trainer.is_global_zero):
            return
        writer = tensorboard_experiment(trainer)
        if writer is not None:
            writer.add_text("damping/summary", self.summary(), global_step=trainer.global_step)
            writer.flush()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Release the optimizer hooks after a failed fit too."""
        self._remove_hooks()

    # ---------------------------------------------------------------- per step

    def _hook(self, trainer: pl.Trainer, inner: Any) -> None:
        if id(inner) in self._hooked or not isinstance(inner, torch.optim.Optimizer):
            return

        # A post hook runs right after the update, before any lr scheduler steps and after every
        # `on_before_optimizer_step` hook (Lightning calls those inside `optimizer.step(closure)`), so the param
        # groups hold exactly the lr and momentum this step used.
        def post_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            self._after_step(trainer, optimizer)

        self._handles.append(inner.register_step_post_hook(post_hook))
        self._hooked.add(id(inner))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = set()
        self._pending = {}

    def _after_step(self, trainer: pl.Trainer, inner: Any) -> None:
        step = self._pending.pop(id(inner), None)
        if step is None:  # a step outside the fit loop (not announced by `on_before_optimizer_step`)
            return
        if self._epoch is None:
            self._epoch = trainer.current_epoch
        self._last_step = step
        opt_idx, n_opts = optimizer_index(trainer.optimizers, inner)
        groups = inner.param_groups
        logging = self.log_enabled and self.logging_interval == "step" and is_logging_step(trainer)
        metrics: dict[str, float | Tensor] = {}
        for group_idx, group in enumerate(groups):
            lr = group["lr"]
            # A tensor lr is compared with 0 on logging steps only (a host read); in between, a frozen group's
            # ratio is inf, which the epoch summary leaves out.
            if (logging or not isinstance(lr, Tensor)) and is_frozen_lr(lr):
                continue
            suffix = self._suffix(opt_idx, n_opts, group_idx, groups)
            momentum = self._momentum(group, suffix, opt_idx, group_idx, inner)
            if momentum is None:
                continue
            zeta = damping_ratio(momentum, effective_lr(group), self._value_curvature, self.rule)
            self._zetas.append(suffix, _label(suffix, groups, group_idx), zeta)
            if logging:
                # Copies of tensor lr and momentum: a scheduler may write them in place before the batch ends.
                metrics[f"damping/zeta{suffix}"] = zeta
                metrics[f"damping/lr{suffix}"] = lr.detach().clone() if isinstance(lr, Tensor) else lr
                metrics[f"damping/momentum{suffix}"] = (
                    momentum.detach().clone() if isinstance(momentum, Tensor) else momentum
                )
                if isinstance(zeta, Tensor):
                    metrics[f"damping/regime{suffix}"] = classify_regime(zeta, self.tolerance)
                elif not math.isnan(zeta):
                    metrics[f"damping/regime{suffix}"] = float(classify_regime(zeta, self.tolerance).code)
        if not logging:
            return
        if metrics:
            metrics["damping/band_low"] = 1.0 - self.tolerance
            metrics["damping/band_high"] = 1.0 + self.tolerance
        if self.secant:
            metrics.update(self._layer_metrics(trainer, inner))  # flushes: a collective under FSDP2, on every rank
        self._step_metrics.update(metrics)

    def _suffix(self, opt_idx: int, n_opts: int, group_idx: int, groups: list[dict[str, Any]]) -> str:
        n_fit = self._fit_groups[opt_idx] if opt_idx < len(self._fit_groups) else None
        return group_key("", opt_idx, n_opts, group_idx, groups, n_fit)

    def _momentum(
        self, group: dict[str, Any], suffix: str, opt_idx: int, group_idx: int, inner: Any
    ) -> float | Tensor | None:
        slot = read_slot(group)
        momentum = read_momentum(group, slot) if slot is not None else None
        if momentum is None or (not isinstance(momentum, Tensor) and momentum == 0):
            if suffix not in self._reported:
                self._reported.add(suffix)
                rank_zero_warn(
                    f"DampingRegimeMonitor: param group {group_idx} of optimizer {opt_idx} ({type(inner).__name__})"
                    " has no momentum, so its damping ratio is undefined; it is not logged (warned once)."
                )
            return None
        if group.get("nesterov") and f"nesterov{suffix}" not in self._reported:
            self._reported.add(f"nesterov{suffix}")
            rank_zero_warn(
                f"DampingRegimeMonitor: param group {group_idx} of optimizer {opt_idx} uses `nesterov=True`; its"
                " damping ratio assumes heavy-ball momentum, so read it as an approximation (warned once)."
            )
        return momentum

    # ---------------------------------------------------------------- secant curvature

    def _build_secant(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inners = [unwrap_optimizer(optimizer) for optimizer in trainer.optimizers]
        named = dict(pl_module.named_parameters())
        reduce = None
        if any(is_distributed_tensor(p) for p in named.values()):
            # FSDP2: each rank reads its shards; their squared sums are summed over ranks once per logging step.
            strategy = trainer.strategy

            def reduce(tensor: Tensor) -> Tensor:
                return strategy.reduce(tensor, reduce_op="sum")

        by_index = secant_layers(
            group_parameters(pl_module, self.group_by),
            named,
            [inner.param_groups for inner in inners],
            self.curvature_decay,
            reduce,
        )
        self._secant = {id(inners[idx]): entry for idx, entry in by_index.items()}
        if self._secant_state is not None:
            for estimator, _ in self._secant.values():
                estimator.load_state_dict(self._secant_state)
            self._secant_state = None
        if not self._secant:
            rank_zero_warn("DampingRegimeMonitor: `curvature='secant'` found no trainable parameter to measure.")

    def _flush(self) -> None:
        # Every rank reaches the same hooks at the same step, so under FSDP2 the collectives match.
        for estimator, _ in self._secant.values():
            estimator.flush()

    def layer_curvature(self) -> dict[str, float]:
        """The secant curvature of each layer group (NaN until measured); empty unless ``"secant"``.

        Copies the estimates to the host: call it between steps, not from a per-step hook. Under FSDP2 it is the
        estimate as of the last logging step, epoch end or fit end (the ranks' sums are reduced then).
        """
        out: dict[str, float] = {}
        for estimator, _ in self._secant.values():
            out.update(zip(estimator.names, estimator.curvature.tolist()))
        return out

    def _layer_metrics(self, trainer: pl.Trainer, inner: Any | None = None) -> dict[str, float]:
        """The per-layer keys of one optimizer (``inner``) or all: one host copy of the estimates (logging steps)."""
        metrics: dict[str, float] = {}
        for optimizer in trainer.optimizers:
            candidate = unwrap_optimizer(optimizer)
            if (inner is not None and candidate is not inner) or id(candidate) not in self._secant:
                continue
            estimator, group_of = self._secant[id(candidate)]
            estimator.flush()
            metrics.update(layer_metrics(estimator, group_of, candidate.param_groups, self.rule))
        return metrics

    # ---------------------------------------------------------------- per epoch

    def _finish_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        epoch = self._epoch if self._epoch is not None else trainer.current_epoch
        records, metrics = self._zetas.finish(epoch, self.tolerance)
        self.history.extend(records)
        if log:
            log_epoch(pl_module, metrics)
        self._epoch = None

    def summary(self) -> str:
        """The :attr:`history` as a markdown table (the TensorBoard text written at fit end)."""
        return _summary_table(self.history)

    # ---------------------------------------------------------------- layout

    def tensorboard_charts(self, trainer: pl.Trainer) -> dict[str, dict[str, list[Any]]]:
        """The "Damping" custom-scalars category (see :func:`lightning_beta._tensorboard.write_layout`)."""
        band = [r"^damping/band_(low|high)$"]
        charts: dict[str, list[Any]] = {}
        n_opts = len(trainer.optimizers)
        for opt_idx, optimizer in enumerate(trainer.optimizers):
            groups = unwrap_optimizer(optimizer).param_groups
            for group_idx, group in enumerate(groups):
                slot = read_slot(group)
                if is_frozen_lr(group["lr"]) or slot is None:
                    continue
                momentum = read_momentum(group, slot)
                if not isinstance(momentum, Tensor) and momentum == 0:
                    continue
                suffix = self._suffix(opt_idx, n_opts, group_idx, groups)
                title = f"zeta {_label(suffix, groups, group_idx)} in the critical band"
                charts[title] = ["Margin", [f"damping/zeta{suffix}", "damping/band_low", "damping/band_high"]]
        charts["zeta, all groups, with the band"] = ["Multiline", [r"^damping/zeta(/|$)", *band]]
        charts["lr and momentum"] = ["Multiline", [r"^damping/lr(/|$)", r"^damping/momentum(/|$)"]]
        charts["regime per step and per epoch (-1 under, 0 critical, +1 over)"] = [
            "Multiline",
            [r"^damping/regime(/|$)", r"^damping/epoch_regime(/|$)"],
        ]
        charts["fraction of the epoch's steps per regime"] = ["Multiline", [r"^damping/epoch_fraction/"]]
        if self.secant:
            charts["measured zeta per layer, with the band"] = ["Multiline", [r"^damping/layer_zeta/", *band]]
            charts["secant curvature per layer"] = ["Multiline", [r"^damping/curvature/"]]
        return {"Damping": charts}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        self._flush()  # Lightning dumps the callbacks' state on every rank: the FSDP2 collective matches
        return {
            "version": _STATE_VERSION,
            "history": [asdict(r) for r in self.history],
            "epoch": self._epoch,
            **self._zetas.state_dict(),
            "last_step": self._last_step,
            "reported": sorted(self._reported),
            "secant": merged_state([estimator for estimator, _ in self._secant.values()]),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version("DampingRegimeMonitor", state_dict, _STATE_VERSION)
        self.history = [EpochDamping(**r) for r in state_dict["history"]]
        self._epoch = state_dict["epoch"]
        self._zetas.load_state_dict(state_dict)
        self._last_step = int(state_dict["last_step"])
        self._reported = set(state_dict["reported"])
        self._secant_state = state_dict["secant"]


def _label(suffix: str, groups: list[dict[str, Any]], group_idx: int) -> str:
    if suffix:
        return suffix.lstrip("/")
    return str(groups[group_idx].get("name") or f"pg{group_idx}")
