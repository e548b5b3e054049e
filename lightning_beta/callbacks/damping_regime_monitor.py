"""DampingRegimeMonitor: damping ratio and regime of every optimizer step, per step and per epoch (PAPER.md 2)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_beta._loggers import add_layout_category, is_logging_step, log_scalars, tensorboard_experiment
from lightning_beta._optim import (
    as_float,
    group_key,
    is_frozen_lr,
    optimizer_index,
    read_momentum,
    read_slot,
    unwrap_optimizer,
)
from lightning_beta._strategies import is_sharded
from lightning_beta.functional.curvature import SecantCurvature, check_decay
from lightning_beta.functional.damping import DampingRegime, check_tolerance, classify_regime, damping_ratio
from lightning_beta.functional.momentum import check_curvature, check_rule
from lightning_beta.layer_groups import GroupBy, check_group_by, group_parameters

_STATE_VERSION = 1
_REGIMES = tuple(regime.value for regime in DampingRegime)


@dataclass
class EpochDamping:
    """The damping summary of one param group over one epoch's optimizer steps.

    Attributes:
        epoch: the epoch index (``trainer.current_epoch``).
        group: the param group, named as in the log keys (``"pgN"`` or the group's ``"name"``, ``optK/`` in front
            with several optimizers).
        median_zeta: median damping ratio over the epoch's optimizer steps.
        regime: class of the median, ``"underdamped"``, ``"critical"`` or ``"overdamped"``.
        fractions: fraction of the epoch's steps in each regime.
        n_steps: number of optimizer steps summarised.
    """

    epoch: int
    group: str
    median_zeta: float
    regime: str
    fractions: dict[str, float] = field(default_factory=dict)
    n_steps: int = 0


class DampingRegimeMonitor(pl.Callback):
    r"""Log the damping ratio ``zeta`` of every optimizer step and the damping regime of every epoch.

    For each param group, ``zeta = (1 - mu) / (2*sqrt(curvature*lr))`` (``rule="paper"``) or
    ``(1 - sqrt(mu)) / sqrt(curvature*lr)`` (``rule="exact"``) from the lr and momentum (SGD/RMSprop ``momentum``,
    Adam-family ``betas[0]``) that the optimizer step actually used, whoever set them: a constant, a scheduler
    with cyclic momentum, :class:`~lightning_beta.callbacks.beta_momentum.BetaMomentumCallback` or the user. The
    values are read in a torch optimizer step *post* hook, right after the update and before any scheduler steps,
    so the order of the callbacks does not matter. The monitor never changes training.

    A step is ``underdamped`` if ``zeta < 1 - tolerance``, ``critical`` within the band, ``overdamped`` above it;
    an epoch's regime is the class of the median ``zeta`` over all of its optimizer steps (not only the logged
    ones). Groups with ``lr == 0`` are skipped. Groups without momentum (Adagrad, SGD or RMSprop at momentum 0)
    are reported once as unsupported and not logged. Steps that ``torch.cuda.amp.GradScaler`` skips are not
    counted (the optimizer never ran).

    ``curvature="secant"`` (beyond the paper) measures the stiffness of each layer group (see
    :func:`~lightning_beta.layer_groups.group_parameters`) on the device from consecutive steps,
    ``lambda_hat = ||g_t - g_{t-1}|| / ||theta_t - theta_{t-1}||`` smoothed by an EMA
    (:class:`~lightning_beta.functional.curvature.SecantCurvature`), and logs it with a measured ``zeta`` per
    layer. The per-group metrics and the epoch regimes then keep ``curvature = 1`` (the paper's reading). Cost:
    one extra copy of the trainable parameters (the size of one gradient copy, in their dtype) and, per step, two
    in-place subtractions, two copies and two ``_foreach_norm`` calls; values are copied to the host only on
    logging steps. A layer's curvature uses the lr and momentum of the param group holding its first parameter.
    With mini-batches, ``g_t`` and ``g_{t-1}`` come from different batches, so the secant also measures gradient
    noise divided by the step length: it is exact on a deterministic quadratic but biased upwards under SGD noise,
    the more so as the lr (and so the step) shrinks. Read it as a trend, not as the Hessian's spectrum.

    Logged metrics (``<g>`` is empty for one param group, else ``/<group name or pgN>``, with ``/optK`` in front
    with several optimizers, as for ``beta/momentum``):

    - ``damping/zeta<g>``: damping ratio of the step (every ``log_every_n_steps``, ``logging_interval="step"``).
    - ``damping/regime<g>``: ``-1`` underdamped, ``0`` critical, ``+1`` overdamped.
    - ``damping/lr<g>``, ``damping/momentum<g>``: the lr and momentum the step used.
    - ``damping/band_low``, ``damping/band_high``: ``1 - tolerance`` and ``1 + tolerance``, for the band chart.
    - ``damping/epoch_zeta<g>``: median ``zeta`` of the epoch (at the epoch's last optimizer step).
    - ``damping/epoch_regime<g>``: class of that median, coded as above.
    - ``damping/epoch_fraction/underdamped<g>``, ``damping/epoch_fraction/critical<g>``,
      ``damping/epoch_fraction/overdamped<g>``: fraction of the epoch's steps in each regime.
    - With ``curvature="secant"``, per layer group ``<layer>``: ``damping/curvature/<layer>`` (the smoothed
      ``lambda_hat``) and ``damping/layer_zeta/<layer>`` (``zeta`` at that curvature), once the layer has two
      complete steps. (``layer_zeta``, not ``zeta/<layer>``, so that layer names never collide with group keys.)
    - TensorBoard text ``damping/summary`` at fit end: a table epoch | group | median zeta | regime | fractions.

    With a ``TensorBoardLogger`` a custom-scalars category "Damping" is added (rank zero): zeta with the critical
    band (a margin chart per param group), zeta of all groups with the band lines, lr and momentum, regimes and
    epoch fractions, and, in secant mode, per-layer zeta and curvature.

    Args:
        tolerance: half-width of the critical band around ``zeta = 1``, in ``[0, 1)``. Defaults to ``0.1``.
        rule: ``"paper"`` or ``"exact"``, the damping ratio formula. Defaults to ``"paper"``.
        curvature: the stiffness ``lambda`` (a positive float), or ``"secant"`` to also measure it per layer.
            Defaults to ``1.0``.
        logging_interval: ``"step"`` logs the per-step metrics every ``trainer.log_every_n_steps`` and the epoch
            metrics; ``"epoch"`` logs only the epoch metrics (and, in secant mode, the per-layer ones at each
            epoch end). Defaults to ``"step"``.
        layout: write the TensorBoard custom-scalars category. Defaults to ``True``.
        log: send metrics to the Trainer's loggers; ``False`` keeps :attr:`history` only. Defaults to ``True``.
        group_by: layer grouping for ``curvature="secant"``, as in
            :func:`~lightning_beta.layer_groups.group_parameters`. Defaults to ``"auto"``.
        curvature_decay: EMA weight of the past secant estimate, in ``[0, 1)``. Defaults to ``0.9``.

    Raises:
        ValueError: for a ``tolerance`` outside ``[0, 1)``, an unknown ``rule`` or ``logging_interval``, a
            ``curvature`` that is neither a finite positive number nor ``"secant"``, a bad ``group_by`` or a
            ``curvature_decay`` outside ``[0, 1)``.
        TypeError: for arguments of the wrong type.
        MisconfigurationException: at fit start, when ``log=True`` and the Trainer has no logger, or with
            ``curvature="secant"`` under a strategy that shards parameters (FSDP, DeepSpeed, ModelParallel).

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
        for name, flag in (("layout", layout), ("log", log)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}")
        check_group_by(group_by)
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
        # Epoch accumulators: group suffix -> zeta of every optimizer step of the epoch (floats, or device tensors
        # when the optimizer stores lr/momentum as tensors; those are copied to the host at epoch end only).
        self._epoch: int | None = None
        self._zetas: dict[str, list[float | Tensor]] = {}
        self._labels: dict[str, str] = {}
        self._last_step = 0
        self._pending: dict[int, int] = {}
        self._reported: set[str] = set()
        self._handles: list[Any] = []
        self._hooked: set[int] = set()
        self._secant: dict[int, tuple[SecantCurvature, list[int]]] = {}
        self._secant_state: dict[str, Any] | None = None

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
            MisconfigurationException: with ``curvature="secant"`` under a strategy that shards parameters.
        """
        if self.secant and is_sharded(trainer.strategy):
            # Each rank holds a shard of each parameter and gradient: the secant would measure the shard.
            raise MisconfigurationException(
                "DampingRegimeMonitor(curvature='secant') does not support the sharded strategy"
                f" {type(trainer.strategy).__name__}: each rank holds only a shard of each parameter, so the measured"
                " curvature would be wrong. Use a fixed `curvature` (the default) or DDP."
            )
        for optimizer in trainer.optimizers:
            self._hook(trainer, unwrap_optimizer(optimizer))
        if self.secant:
            self._build_secant(trainer, pl_module)
        if self.log_enabled and self.layout:
            if not add_layout_category(trainer, "Damping", self._charts(trainer)):
                rank_zero_info(
                    "DampingRegimeMonitor: the custom-scalars layout is TensorBoard-only and no TensorBoardLogger is"
                    " attached; the scalars are still logged."
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close an epoch restored from a checkpoint saved after its last step but before its end."""
        if self._epoch is not None and self._epoch != trainer.current_epoch:
            self._finish_epoch(trainer)
        self._epoch = trainer.current_epoch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Mark the optimizer step about to run, and take the secant's gradient reading.

        Runs once per optimizer step (also under gradient accumulation), after the backward pass. The lr and
        momentum are *not* read here: a callback listed after this one may still write them. They are read in
        the optimizer's step post hook.
        """
        inner = unwrap_optimizer(optimizer)
        self._hook(trainer, inner)  # an optimizer created after fit start (e.g. by a tuner)
        self._pending[id(inner)] = trainer.global_step
        if id(inner) in self._secant:
            self._secant[id(inner)][0].before_step()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Summarise the epoch: median zeta, its regime, the fraction of steps in each regime."""
        self._finish_epoch(trainer)
        if self.secant and self.log_enabled and self.logging_interval == "epoch":
            self._log_layers(trainer, self._last_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the text summary (TensorBoard, rank zero) and release the optimizer hooks."""
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
        if id(inner) in self._secant:
            self._secant[id(inner)][0].after_step()
        if self._epoch is None:
            self._epoch = trainer.current_epoch
        self._last_step = step
        opt_idx, n_opts = optimizer_index(trainer.optimizers, inner)
        groups = inner.param_groups
        logging = self.log_enabled and self.logging_interval == "step" and is_logging_step(trainer)
        metrics: dict[str, float] = {}
        for group_idx, group in enumerate(groups):
            lr = group["lr"]
            if is_frozen_lr(lr):
                continue
            suffix = _suffix(opt_idx, n_opts, group_idx, groups)
            momentum = self._momentum(group, suffix, opt_idx, group_idx, inner)
            if momentum is None:
                continue
            zeta = damping_ratio(momentum, lr, self._value_curvature, self.rule)
            self._zetas.setdefault(suffix, []).append(zeta)
            self._labels[suffix] = _label(suffix, groups, group_idx)
            if logging:
                value = as_float(zeta)
                metrics[f"damping/zeta{suffix}"] = value
                metrics[f"damping/lr{suffix}"] = as_float(lr)
                metrics[f"damping/momentum{suffix}"] = as_float(momentum)
                if not math.isnan(value):
                    metrics[f"damping/regime{suffix}"] = float(classify_regime(value, self.tolerance).code)
        if metrics:
            metrics["damping/band_low"] = 1.0 - self.tolerance
            metrics["damping/band_high"] = 1.0 + self.tolerance
            log_scalars(trainer, metrics, step=step)
        if logging and self.secant:
            self._log_layers(trainer, step, inner)

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
        return momentum

    # ---------------------------------------------------------------- secant curvature

    def _build_secant(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = group_parameters(pl_module, self.group_by)
        named = dict(pl_module.named_parameters())
        taken: set[str] = set()
        self._secant = {}
        for optimizer in trainer.optimizers:
            inner = unwrap_optimizer(optimizer)
            owner: dict[int, int] = {}
            for group_idx, group in enumerate(inner.param_groups):
                for param in group["params"]:
                    owner[id(param)] = group_idx
            chosen: dict[str, list[Tensor]] = {}
            group_of: list[int] = []
            for layer, names in layers.items():
                params: list[Tensor] = [named[n] for n in names if named[n].requires_grad and id(named[n]) in owner]
                if params and layer not in taken:
                    taken.add(layer)
                    chosen[layer] = params
                    group_of.append(owner[id(params[0])])
            if chosen:
                self._secant[id(inner)] = (SecantCurvature(chosen, self.curvature_decay), group_of)
        if self._secant_state is not None:
            for estimator, _ in self._secant.values():
                estimator.load_state_dict(self._secant_state)
            self._secant_state = None
        if not self._secant:
            rank_zero_warn("DampingRegimeMonitor: `curvature='secant'` found no trainable parameter to measure.")

    def layer_curvature(self) -> dict[str, float]:
        """The current secant curvature of each layer group (NaN until measured); empty unless ``"secant"``.

        Copies the estimates to the host: call it between steps, not from a per-step hook.
        """
        out: dict[str, float] = {}
        for estimator, _ in self._secant.values():
            out.update(zip(estimator.names, estimator.curvature.tolist()))
        return out

    def _log_layers(self, trainer: pl.Trainer, step: int, inner: Any | None = None) -> None:
        metrics: dict[str, float] = {}
        for key, (estimator, group_of) in self._secant.items():
            if inner is not None and key != id(inner):
                continue
            groups = _find_groups(trainer, key)
            if groups is None:
                continue
            lams = estimator.curvature.tolist()  # the host copy of a logging step
            for layer, lam, group_idx in zip(estimator.names, lams, group_of):
                if math.isnan(lam):
                    continue
                metrics[f"damping/curvature/{layer}"] = lam
                group = groups[group_idx]
                slot = read_slot(group)
                lr = as_float(group["lr"])
                if slot is None or lr == 0 or lam <= 0:
                    continue
                momentum = as_float(read_momentum(group, slot))
                metrics[f"damping/layer_zeta/{layer}"] = damping_ratio(momentum, lr * lam, 1.0, self.rule)
        log_scalars(trainer, metrics, step=step)

    # ---------------------------------------------------------------- per epoch

    def _finish_epoch(self, trainer: pl.Trainer) -> None:
        epoch = self._epoch if self._epoch is not None else trainer.current_epoch
        metrics: dict[str, float] = {}
        for suffix, values in self._zetas.items():
            zetas = [z for z in _to_floats(values) if not math.isnan(z)]
            if not zetas:
                continue
            median = statistics.median(zetas)
            regime = classify_regime(median, self.tolerance)
            counts = dict.fromkeys(_REGIMES, 0)
            for z in zetas:
                counts[classify_regime(z, self.tolerance).value] += 1
            fractions = {name: counts[name] / len(zetas) for name in _REGIMES}
            record = EpochDamping(epoch, self._labels.get(suffix, suffix), median, regime.value, fractions, len(zetas))
            self.history.append(record)
            metrics[f"damping/epoch_zeta{suffix}"] = median
            metrics[f"damping/epoch_regime{suffix}"] = float(regime.code)
            for name, fraction in fractions.items():
                metrics[f"damping/epoch_fraction/{name}{suffix}"] = fraction
        if self.log_enabled:
            log_scalars(trainer, metrics, step=self._last_step)
        self._zetas = {}
        self._epoch = None

    def summary(self) -> str:
        """The :attr:`history` as a markdown table (the TensorBoard text written at fit end)."""
        lines = [
            "| epoch | group | median zeta | regime | underdamped | critical | overdamped | steps |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.history:
            f = r.fractions
            lines.append(
                f"| {r.epoch} | {r.group} | {r.median_zeta:.4g} | {r.regime} | {f.get('underdamped', 0):.0%}"
                f" | {f.get('critical', 0):.0%} | {f.get('overdamped', 0):.0%} | {r.n_steps} |"
            )
        return "\n".join(lines)

    # ---------------------------------------------------------------- layout

    def _charts(self, trainer: pl.Trainer) -> dict[str, list[Any]]:
        band = [r"^damping/band_(low|high)$"]
        charts: dict[str, list[Any]] = {}
        n_opts = len(trainer.optimizers)
        for opt_idx, optimizer in enumerate(trainer.optimizers):
            groups = unwrap_optimizer(optimizer).param_groups
            for group_idx, group in enumerate(groups):
                if is_frozen_lr(group["lr"]) or read_slot(group) is None:
                    continue
                momentum = read_momentum(group, read_slot(group))  # type: ignore[arg-type]
                if not isinstance(momentum, Tensor) and momentum == 0:
                    continue
                suffix = _suffix(opt_idx, n_opts, group_idx, groups)
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
        return charts

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        secant = None
        if self._secant:
            states = [estimator.state_dict() for estimator, _ in self._secant.values()]
            secant = {
                "names": [n for s in states for n in s["names"]],  # type: ignore[attr-defined]
                "curvature": torch.cat([s["curvature"] for s in states]),  # type: ignore[misc]
                "count": torch.cat([s["count"] for s in states]),  # type: ignore[misc]
            }
        return {
            "version": _STATE_VERSION,
            "history": [asdict(r) for r in self.history],
            "epoch": self._epoch,
            "zetas": {suffix: _to_floats(values) for suffix, values in self._zetas.items()},
            "labels": dict(self._labels),
            "last_step": self._last_step,
            "reported": sorted(self._reported),
            "secant": secant,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"DampingRegimeMonitor state has version {version!r}; this release reads version {_STATE_VERSION}"
            )
        self.history = [EpochDamping(**r) for r in state_dict["history"]]
        self._epoch = state_dict["epoch"]
        self._zetas = {suffix: list(values) for suffix, values in state_dict["zetas"].items()}
        self._labels = dict(state_dict["labels"])
        self._last_step = int(state_dict["last_step"])
        self._reported = set(state_dict["reported"])
        self._secant_state = state_dict["secant"]


def _suffix(opt_idx: int, n_opts: int, group_idx: int, groups: list[dict[str, Any]]) -> str:
    return group_key("", opt_idx, n_opts, group_idx, groups)


def _label(suffix: str, groups: list[dict[str, Any]], group_idx: int) -> str:
    if suffix:
        return suffix.lstrip("/")
    return str(groups[group_idx].get("name") or f"pg{group_idx}")


def _to_floats(values: list[float | Tensor]) -> list[float]:
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]  # type: ignore[arg-type]
    # One host copy for the whole epoch.
    host = iter(torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors]).cpu().tolist())
    return [next(host) if isinstance(v, Tensor) else float(v) for v in values]


def _find_groups(trainer: pl.Trainer, key: int) -> list[dict[str, Any]] | None:
    for optimizer in trainer.optimizers:
        inner = unwrap_optimizer(optimizer)
        if id(inner) == key:
            return inner.param_groups
    return None
