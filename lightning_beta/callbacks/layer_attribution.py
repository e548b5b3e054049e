"""LayerAttributionCallback: per-layer gradient norms on the device, for diagnosis (docs/method.md, section 3)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
from torch import Tensor, nn

from lightning_beta._checks import check_int, check_state_version
from lightning_beta._gradients import grad_scaler, is_distributed_tensor, local_tensor, pending_scale
from lightning_beta._logging import is_logging_step, log_epoch, log_step
from lightning_beta._optim import unwrap_optimizer
from lightning_beta._strategies import is_sharded, shards_flat
from lightning_beta._tensorboard import write_layout
from lightning_beta.artifact import AttributionArtifact, GroupTotals, ReferenceStats, save_attribution
from lightning_beta.callbacks._attribution_outputs import artifact_directory, log_panels, publish_artifact
from lightning_beta.callbacks._attribution_probe import attach_probe, record_fit_probe
from lightning_beta.functional.grad_norms import ABSENT, add_group_powers_, check_norm_type
from lightning_beta.functional.norm_accumulator import GroupNormAccumulator
from lightning_beta.layer_groups import GroupBy, check_group_by, group_modules, group_parameters, group_sizes
from lightning_beta.probe import ProbeRecord, probe_file_name
from lightning_beta.reference import record_reference

_STATE_VERSION = 1
#: Logging intervals of the first epoch kept for the heatmap of a one-epoch run.
_MAX_INTERVALS = 256


@dataclass(frozen=True)
class _Pattern:
    """For one set of parameters with a gradient: the device tensors of a step's row, and the groups (host)."""

    index: Tensor
    #: The row initialiser marking the groups without a gradient as ``ABSENT``; ``None`` when there is none.
    init: Tensor | None
    groups: frozenset[int]
    #: The per-parameter weights of :attr:`_Plan.weight` for these parameters.
    weight: Tensor | None


@dataclass
class _Plan:
    """For one optimizer: its parameters that belong to a group, their group index, and the index tensors."""

    params: list[nn.Parameter]
    group_of: list[int]
    #: Per-parameter ``1 / copies`` of its gradient's elements over the ranks (sharded strategies), else ``None``.
    weight: Tensor | None = None
    #: ``present`` (indices into ``params`` with a gradient) -> its :class:`_Pattern`.
    patterns: dict[tuple[int, ...], _Pattern] = field(default_factory=dict)
    #: The pattern of the common case, every parameter with a dense gradient (built with the plan).
    full: _Pattern | None = None
    #: How many parameters the optimizer held when the plan was built; a change (``add_param_group`` mid-run, as
    #: ``BackboneFinetuning`` does) rebuilds the plan.
    n_optimizer_params: int = -1


class LayerAttributionCallback(pl.Callback):
    r"""Accumulate the gradient norm of each layer group on the device, log it, and save an attribution artifact.

    At fit start the LightningModule's parameters are split into layer groups with
    :func:`~lightning_beta.layer_groups.group_parameters`. Once per optimizer step (in ``on_before_optimizer_step``,
    so gradient accumulation counts once) the gradients' norms are computed with one ``torch._foreach_norm`` call and
    their powers summed into groups straight into the next row of a device step buffer
    (:class:`~lightning_beta.functional.norm_accumulator.GroupNormAccumulator`), which is reduced into the
    statistics in batches. Nothing is copied to the host on the steps Lightning does not log; on those it does, the
    interval means are handed to ``self.log`` as device tensors. Parameters whose ``grad`` is ``None`` (frozen)
    contribute nothing; a group none of whose parameters has a gradient is not counted for that step. A non-finite
    group norm is counted apart and never enters the sums.

    Behaviour worth knowing:

    - Gradients are read where :mod:`lightning_beta._gradients` reads them: **before clipping**, unscaled under AMP
      (fused optimizers: divided by the scaler's pending scale on the device).
    - DDP: the gradients are already averaged across ranks, so the norms need no collective. ``ModelParallelStrategy``
      (FSDP2): each rank sums the powers of its own shards on the device and one all-reduce per reduction of the step
      buffer (sum; max for ``inf``) gives the norms of the full gradients. ``FSDPStrategy`` and ``DeepSpeedStrategy``
      raise ``MisconfigurationException`` at fit start (their gradients in this hook are flat buffers or absent).
    - Logging goes through Lightning: ``log_every_n_steps`` (0 included), the step axis and ``callback_metrics`` are
      the Trainer's, so ``ModelCheckpoint(monitor="grad_norm/total")`` sees the last interval's mean and
      ``monitor="grad_norm_epoch/total"`` the epoch's.
    - At the end of training rank zero writes ``attribution.json`` (see :mod:`lightning_beta.artifact`) in the run
      directory of the first logger (``logger.log_dir``; else ``save_dir/name/version``, as ``ModelCheckpoint``),
      and hands it to MLflow or W&B when those log. After an exception it writes what exists, marked
      ``complete=false``. Nothing is written under ``fast_dev_run``. Reference statistics
      (:func:`~lightning_beta.reference.record_reference`): with the final weights, a plain forward
      (``reference_forward``, by default ``pl_module(inputs)``) runs in eval mode under ``torch.no_grad()`` on the
      first ``reference_batches`` training batches, and a forward hook per group module records the per-feature
      mean and variance of its output (the last dim for Linear, attention and transformer outputs, dim 1 for conv
      and BatchNorm outputs). ``training_step`` is not run: the model is left exactly as training left it. A
      LightningModule without a ``forward`` needs ``reference_forward``; groups that cannot be read are named in
      the artifact's ``reference_skipped`` and, with the reason, in one warning.
    - Probe: each group's sketched output on the first ``probe_samples`` training samples, read and run as for the
      reference statistics (:mod:`lightning_beta.callbacks._attribution_probe`), saved beside the artifact and
      named by its ``probe_path``, which ``diagnose(..., reference=artifact)`` follows. A failure is one warning.
    - Panels: the heatmap of :func:`~lightning_beta.figures.attribution_heatmap` (needs matplotlib) and the ranking
      table, through TensorBoard (``attribution/heatmap``, ``attribution/ranking``), MLflow or W&B; a custom-scalars
      category "Layer attribution" charting ``grad_norm/.*`` on TensorBoard.

    Logged metrics:
        - ``grad_norm/<group>``: the mean of the group's gradient norm over the optimizer steps since the last log,
          on Lightning's logging steps (``on_step``).
        - ``grad_norm/total``: the same for the norm of all gradients together.
        - ``grad_norm_epoch/<group>``, ``grad_norm_epoch/total``: the means over the epoch (``on_epoch``).

    Args:
        group_by: how to group parameters: ``"auto"`` (top-level children), an int module depth, or a dict
            ``{group: [regex, ...]}`` over parameter names. Defaults to ``"auto"``.
        norm_type: the norm order, ``> 0`` or ``inf``. Defaults to ``2.0``.
        log_every_n_steps: deprecated and ignored: the Trainer's ``log_every_n_steps`` decides. Defaults to ``None``.
        reference_batches: training batches for the reference statistics; 0 skips them. Defaults to ``4``.
        reference_forward: ``reference_forward(pl_module, batch)`` runs the model on a batch without side effects,
            for the reference statistics. Defaults to ``None``
            (:func:`~lightning_beta.reference.default_forward`: the batch's inputs, a dict as keyword arguments).
        feature_dim: the dim of a feature in the groups' outputs, one int or ``{group: dim}``; ``None`` decides
            by module type (:func:`~lightning_beta.reference.default_feature_dim`). Defaults to ``None``.
        dirpath: directory of the artifact; ``None`` uses the run directory of the first logger (else
            ``default_root_dir``). Defaults to ``None``.
        filename: file name of the artifact. Defaults to ``"attribution.json"``.
        probe_samples: training samples of the probe; 0 records none. Defaults to ``256``.
        probe_sketch_dim: numbers per sample in each group's sketched output; the restore treatment needs it wide
            (docs/method.md, section 4). Defaults to ``256``.
        probe_replay: also keep each group's inputs for the replay rule of ``probe_localize``, which names the
            changed group exactly even when the whole model moved since the recording: ``True``, ``False``, or
            ``"auto"`` (kept while all groups' inputs on the probe set take at most 64 MiB, which a long-sequence
            transformer exceeds; else none, and the first-change rule). Defaults to ``"auto"``.

    Raises:
        ValueError: for a bad ``group_by`` (see :func:`~lightning_beta.layer_groups.check_group_by`), a
            ``norm_type`` that is not positive, ``log_every_n_steps < 1``, ``reference_batches < 0``,
            ``probe_samples < 0``, ``probe_sketch_dim < 1``, or an empty ``filename`` or one with a directory part.
        TypeError: for arguments of the wrong type.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LayerAttributionCallback(group_by=2, reference_batches=0)], logger=False)
    """

    #: Optimizer steps held in the device step buffer before they are reduced into the statistics.
    _buffer_rows = 64

    def __init__(
        self,
        group_by: GroupBy = "auto",
        norm_type: float = 2.0,
        log_every_n_steps: int | None = None,
        reference_batches: int = 4,
        reference_forward: Callable[[Any, Any], Any] | None = None,
        feature_dim: int | dict[str, int] | None = None,
        dirpath: str | os.PathLike | None = None,
        filename: str = "attribution.json",
        probe_samples: int = 256,
        probe_sketch_dim: int = 256,
        probe_replay: bool | str = "auto",
    ) -> None:
        # A depth given as digits on the command line (LightningCLI) becomes the int it means.
        group_by = check_group_by(group_by)
        check_norm_type(norm_type)
        check_int("log_every_n_steps", log_every_n_steps, minimum=1, optional=True)
        if log_every_n_steps is not None:
            rank_zero_deprecation(
                "LayerAttributionCallback(log_every_n_steps=...) is deprecated and ignored: the norms are logged on"
                " the Trainer's logging steps. Pass `Trainer(log_every_n_steps=...)` instead."
            )
        check_int("reference_batches", reference_batches, minimum=0)
        if reference_forward is not None and not callable(reference_forward):
            raise TypeError(f"`reference_forward` must be None or a callable, got {type(reference_forward).__name__}")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"`dirpath` must be None, a str or os.PathLike, got {type(dirpath).__name__}")
        if not isinstance(filename, str):
            raise TypeError(f"`filename` must be a str, got {type(filename).__name__}")
        if not filename or os.path.basename(filename) != filename:
            raise ValueError(f"`filename` must be a non-empty file name without a directory, got {filename!r}")
        check_int("probe_samples", probe_samples, minimum=0)
        check_int("probe_sketch_dim", probe_sketch_dim, minimum=1)
        if probe_replay != "auto" and not isinstance(probe_replay, bool):
            raise TypeError(f'`probe_replay` must be True, False or "auto", got {probe_replay!r}')
        self.group_by = group_by
        self.norm_type = float(norm_type)
        self.reference_batches = reference_batches
        self.reference_forward = reference_forward
        self.feature_dim = feature_dim
        self.dirpath = dirpath
        self.filename = filename
        self.probe_samples, self.probe_sketch_dim, self.probe_replay = probe_samples, probe_sketch_dim, probe_replay
        self._reset()

    def _reset(self) -> None:
        self.groups: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.history_epochs: list[int] = []
        self.history: list[list[float | None]] = []
        self.history_total: list[float | None] = []
        self.interval_steps: list[int] = []
        self.interval_history: list[list[float | None]] = []
        self.artifact: AttributionArtifact | None = None
        #: The probe recorded at the end of the fit (rank zero's on rank zero), ``None`` without one.
        self.probe: ProbeRecord | None = None
        self._acc: GroupNormAccumulator | None = None
        self._intervals: list[tuple[int, Tensor]] = []  # device means of this fit's first-epoch intervals
        self._interval_seen: set[int] = set()  # groups with a gradient since the last log (host-side, no sync)
        self._epoch_seen: set[int] = set()
        self._plans: dict[int, _Plan] = {}
        self._param_group: dict[int, int] = {}
        self._scaler: Any = None
        self._sharded = False
        self._pending: dict[str, Any] | None = None
        self._finished = False
        self._directory = Path(".")
        self._artifact_path: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(group_by=repr(self.group_by), norm_type=self.norm_type, filename=self.filename)

    @property
    def artifact_path(self) -> Path | None:
        """Where the artifact was written, once it was."""
        return self._artifact_path

    def tensorboard_charts(self, trainer: pl.Trainer) -> dict[str, dict[str, list[Any]]]:
        """This callback's custom-scalars charts (see :func:`lightning_beta._tensorboard.write_layout`)."""
        return {"Layer attribution": {"Gradient norm per group": ["Multiline", [r"grad_norm/.*"]]}}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget a previous fit; a checkpoint restored after this hook brings its state back."""
        if stage == "fit":
            self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the strategy, resolve the groups and the artifact directory, and allocate the device buffers."""
        check_strategy(trainer.strategy)
        self.groups = group_parameters(pl_module, self.group_by)
        if "total" in self.groups:
            raise MisconfigurationException(
                "LayerAttributionCallback: a layer group is named 'total', which clashes with the `grad_norm/total`"
                " key. Pass `group_by` as a dict to name the groups."
            )
        self.sizes = group_sizes(pl_module, self.groups)
        named = dict(pl_module.named_parameters())
        self._param_group = {id(named[n]): g for g, names in enumerate(self.groups.values()) for n in names}
        self._sharded = is_sharded(trainer.strategy) and trainer.world_size > 1
        reduce = _all_reduce if self._sharded else None
        self._acc = GroupNormAccumulator(len(self.groups), self.norm_type, pl_module.device, self._buffer_rows, reduce)
        self._scaler = grad_scaler(trainer)
        # Resolved on every rank (a broadcast), so rank zero alone never enters a collective later.
        self._directory = Path(self.dirpath) if self.dirpath is not None else artifact_directory(trainer)
        # Plans and the index of the all-gradients case are built here, so the per-step hook copies nothing.
        for optimizer in trainer.optimizers:
            self._plan(optimizer, trainer.world_size)
        if self._pending is not None:
            self._apply_state(self._pending)
        write_layout(trainer)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Write this step's group sums of powers as one row of the step buffer; log on Lightning's logging steps.

        Runs in ``on_before_optimizer_step`` so it fires once per optimizer step under gradient accumulation, after
        the AMP unscale and before gradient clipping.
        """
        acc = self._acc
        if acc is None:
            return
        plan = self._plan(optimizer, trainer.world_size)
        grads: list[Any] = [param.grad for param in plan.params]
        pattern = plan.full
        # The common case, every parameter with a dense gradient, is one pass in Python and a cached index.
        if any(grad is None or grad.is_sparse for grad in grads):
            present = tuple(i for i, grad in enumerate(grads) if grad is not None)
            grads = [grads[i].coalesce().values() if grads[i].is_sparse else grads[i] for i in present]
            pattern = self._pattern(plan, present)
        if grads:
            assert pattern is not None
            if self._sharded:
                grads = [local_tensor(grad) for grad in grads]
            powers, scale_row = acc.next_row()
            if pattern.init is not None:  # some groups have no gradient: marked, the rest start from zero
                powers.copy_(pattern.init)
            add_group_powers_(powers, grads, pattern.index, self.norm_type, pattern.weight)
            scale = pending_scale(self._scaler, unwrap_optimizer(optimizer))
            if scale is not None:
                scale_row.copy_(scale)
            acc.commit()
            self._interval_seen |= pattern.groups
            self._epoch_seen |= pattern.groups
        if is_logging_step(trainer):
            self._log_interval(trainer, pl_module)

    def _log_interval(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._acc is not None
        means = self._acc.interval_means()  # a device tensor: Lightning copies it when it writes
        if not self._interval_seen:
            return
        names = list(self.groups)
        metrics = {f"grad_norm/{names[g]}": means[g] for g in sorted(self._interval_seen)}
        metrics["grad_norm/total"] = means[-1]
        log_step(pl_module, metrics)
        if trainer.current_epoch == 0 and len(self._intervals) < _MAX_INTERVALS and not self.history:
            self._intervals.append((trainer.global_step, means))
        self._interval_seen = set()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Append the epoch's mean norms to the history (one host copy) and log them."""
        if self._acc is None:
            return
        means, host = self._acc.epoch_means()
        self._keep_intervals()
        if not self._epoch_seen:
            return
        names = list(self.groups)
        metrics = {f"grad_norm_epoch/{names[g]}": means[g] for g in sorted(self._epoch_seen)}
        log_epoch(pl_module, {**metrics, "grad_norm_epoch/total": means[-1]})
        self._epoch_seen = set()
        self.history_epochs.append(trainer.current_epoch)
        self.history.append(host[:-1])
        self.history_total.append(host[-1])

    def _keep_intervals(self) -> None:
        """Copy the first epoch's interval means to the host (at epoch end, for the state and the artifact)."""
        if self._intervals:
            rows = torch.stack([means[:-1] for _, means in self._intervals]).cpu().tolist()
            self.interval_steps.extend(step for step, _ in self._intervals)
            self.interval_history.extend([None if math.isnan(v) else v for v in row] for row in rows)
            self._intervals = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the reference statistics and write the artifact and the panels (rank zero)."""
        self._finished = True
        if self._acc is None:
            return
        # Every rank runs the reference pass (its share of each batch; the sums are reduced across ranks): on rank
        # zero alone, a collective in ``training_step`` would wait forever for the other ranks.
        modules = group_modules(pl_module, self.groups)
        # ``record_reference`` warns once with the reasons of the groups it skips.
        reference, _ = record_reference(
            trainer, pl_module, modules, self.reference_batches, self.reference_forward, self.feature_dim
        )
        skipped = [name for name in self.groups if name not in reference]
        artifact = self._build_artifact(trainer, complete=True, reference=reference, skipped=skipped)
        fast_dev_run, why = bool(getattr(trainer, "fast_dev_run", False)), None
        if self.probe_samples and not fast_dev_run:  # every rank, as the reference pass (same batches and forward)
            args = (self.probe_samples, self.probe_sketch_dim, self.probe_replay, self.reference_forward)
            self.probe, why = record_fit_probe(trainer, pl_module, self.group_by, *args)
        if not trainer.is_global_zero:
            return
        self.artifact = artifact
        if fast_dev_run:
            rank_zero_info("LayerAttributionCallback: `fast_dev_run` is set, so no artifact is written.")
            return
        staged = None  # the probe file, renamed into place once the artifact naming it is written
        if self.probe_samples:
            probe_path = self._directory / probe_file_name(self.filename)
            self.artifact, staged = attach_probe(artifact, self.probe, why, probe_path)
            artifact = self.artifact
        if self._write(trainer, artifact, staged) is not None:
            log_panels(trainer, artifact)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Write what exists, marked ``complete=false``, unless the complete artifact was already written."""
        if self._finished or not trainer.is_global_zero or self._acc is None or getattr(trainer, "fast_dev_run", False):
            return
        # No collective while unwinding: the other ranks may never reach it (sharded steps not yet summed are lost).
        self.artifact = self._build_artifact(
            trainer, complete=False, reference={}, skipped=list(self.groups), reduce=False
        )
        self._write(trainer, self.artifact)

    def _write(self, trainer: pl.Trainer, artifact: AttributionArtifact, staged: Path | None = None) -> Path | None:
        # Runs at the end of a long fit, or while an exception unwinds: a full or read-only disk must not kill the
        # fit nor mask the original exception. The data stays in ``self.artifact`` and in the checkpoint.
        path = self._directory / self.filename
        self._artifact_path = None
        try:
            self._artifact_path = save_attribution(artifact, path)
            self.artifact = dataclasses.replace(artifact, path=self._artifact_path)
            if staged is not None and artifact.probe_path is not None:
                os.replace(staged, path.parent / artifact.probe_path)
        except (OSError, ValueError) as err:
            rank_zero_warn(
                f"LayerAttributionCallback: could not write the attribution artifact to {str(path)!r} ({err}). The"
                " fit is not affected: the artifact is kept in memory as `callback.artifact` (write it with"
                " `lightning_beta.artifact.save_attribution`) and the accumulators are in the checkpoint."
            )
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
        if self._artifact_path is not None:
            publish_artifact(trainer, self._artifact_path, artifact.probe_path)
        return self._artifact_path

    def _build_artifact(
        self,
        trainer: pl.Trainer,
        complete: bool,
        reference: dict[str, ReferenceStats],
        skipped: list[str],
        reduce: bool = True,
    ) -> AttributionArtifact:
        assert self._acc is not None
        totals = self._acc.totals(reduce)
        self._keep_intervals()
        stats = [
            GroupTotals(
                totals["mean"][c],
                totals["rms"][c],
                totals["max"][c],
                int(totals["count"][c] or 0),
                int(totals["nonfinite"][c] or 0),
            )
            for c in range(len(self.groups) + 1)
        ]
        return AttributionArtifact(
            groups=dict(self.sizes),
            parameters={name: list(names) for name, names in self.groups.items()},
            history_epochs=list(self.history_epochs),
            history=[list(row) for row in self.history],
            history_total=list(self.history_total),
            totals=dict(zip(self.groups, stats[:-1])),
            total=stats[-1],
            complete=complete,
            norm_type=self.norm_type,
            group_by=self.group_by
            if not isinstance(self.group_by, dict)
            else {k: list(v) for k, v in self.group_by.items()},
            global_step=trainer.global_step,
            reference_batches=self.reference_batches,
            reference=reference,
            reference_skipped=skipped,
            interval_steps=list(self.interval_steps),
            interval_history=[list(row) for row in self.interval_history],
        )

    def _plan(self, optimizer: Any, world_size: int) -> _Plan:
        inner = unwrap_optimizer(optimizer)
        plan = self._plans.get(id(inner))
        n_params = sum(len(group["params"]) for group in inner.param_groups)  # host-side count, no device sync
        if plan is None or plan.n_optimizer_params != n_params:
            pairs = [
                (p, self._param_group[id(p)])
                for group in inner.param_groups
                for p in group["params"]
                if id(p) in self._param_group
            ]
            pairs.sort(key=lambda pair: pair[1])
            plan = _Plan([p for p, _ in pairs], [g for _, g in pairs], n_optimizer_params=n_params)
            if self._sharded:
                copies = [_copies(p, world_size) for p, _ in pairs]
                if any(c != 1 for c in copies):
                    plan.weight = torch.tensor([1.0 / c for c in copies], dtype=torch.float32)  # on the host
            plan.full = self._pattern(plan, tuple(range(len(plan.params))))
            self._plans[id(inner)] = plan
        return plan

    def _pattern(self, plan: _Plan, present: tuple[int, ...]) -> _Pattern:
        """The group index of the parameters ``present``, the row initialiser marking the groups they miss, the groups.

        Built once per pattern (host-to-device copies, no sync); ``None`` for the initialiser when every group is
        present, as a cleared row is already all zeros.
        """
        pattern = plan.patterns.get(present)
        if pattern is None:
            assert self._acc is not None
            device, n_groups = self._acc.stats.device, len(self.groups)
            groups = [plan.group_of[i] for i in present]
            missing = sorted(set(range(n_groups)) - set(groups))
            init = None
            if missing:
                init = torch.zeros(n_groups, dtype=torch.float32)
                init[missing] = ABSENT
                init = init.to(device)
            index = torch.tensor(groups, dtype=torch.long, device=device)
            weight = None if plan.weight is None else plan.weight[torch.tensor(present, dtype=torch.long)].to(device)
            pattern = _Pattern(index, init, frozenset(groups), weight)
            plan.patterns[present] = pattern
        return pattern

    def state_dict(self) -> dict[str, Any]:
        self._keep_intervals()
        return {
            "version": _STATE_VERSION,
            "groups": list(self.groups),
            "acc": None if self._acc is None else self._acc.state(),
            "history_epochs": list(self.history_epochs),
            "history": [list(row) for row in self.history],
            "history_total": list(self.history_total),
            # Added after the first release of state version 1, read with defaults: older checkpoints still resume.
            "interval_steps": list(self.interval_steps),
            "interval_history": [list(row) for row in self.interval_history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version("LayerAttributionCallback", state_dict, _STATE_VERSION)
        self._pending = dict(state_dict)
        if self._acc is not None:  # restored after on_fit_start (strategies that restore after setup)
            self._apply_state(self._pending)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self._acc is not None
        if list(state["groups"]) != list(self.groups):
            raise MisconfigurationException(
                f"LayerAttributionCallback: the checkpoint has layer groups {state['groups']}, the model now has"
                f" {list(self.groups)}; pass the same `group_by` as the run that wrote it."
            )
        if state["acc"] is not None:
            self._acc.load(state["acc"])
        self.history_epochs = list(state["history_epochs"])
        self.history = [list(row) for row in state["history"]]
        self.history_total = list(state["history_total"])
        self.interval_steps = list(state.get("interval_steps", []))
        self.interval_history = [list(row) for row in state.get("interval_history", [])]
        self._pending = None


def _all_reduce(tensor: Tensor, op: str) -> Tensor:
    """Sum or max of ``tensor`` over all ranks, in place: one collective (``strategy.reduce`` adds a barrier)."""
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


def _copies(param: Tensor, world_size: int) -> int:
    """On how many ranks each element of ``param``'s gradient is held: 1 for an FSDP2 shard over all ranks."""
    if not is_distributed_tensor(param):
        return world_size  # a plain tensor: every rank holds all of it
    mesh = param.device_mesh  # type: ignore[attr-defined]
    replicated = math.prod(mesh.size(d) for d, p in enumerate(param.placements) if p.is_replicate())  # type: ignore[attr-defined]
    return replicated * (world_size // mesh.size())


def check_strategy(strategy: Strategy) -> None:
    """Raise for the sharded strategies whose gradients this callback cannot read in ``on_before_optimizer_step``.

    ``ModelParallelStrategy`` (FSDP2) is supported: its gradients are ``DTensor`` shards whose sums of powers add up
    over the ranks to those of the full gradients. ``FSDPStrategy`` (FSDP1) holds each rank's gradient shard in a
    flat buffer (with ``use_orig_params=False`` the LightningModule's parameters are not the layer groups' tensors at
    all), and ``DeepSpeedStrategy`` (ZeRO) keeps the gradients in its own partitioned buffers, leaving ``grad`` unset:
    both are refused.

    Raises:
        MisconfigurationException: for FSDP (FSDP1) and DeepSpeed strategies.

    Example:
        >>> from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy
        >>> check_strategy(SingleDeviceStrategy("cpu")), check_strategy(ModelParallelStrategy())
        (None, None)
    """
    if shards_flat(strategy):
        raise MisconfigurationException(
            f"LayerAttributionCallback does not support the sharded strategy {type(strategy).__name__}: each rank"
            " holds only a shard of each gradient, so its norms would be wrong. Use DDP or a single device."
        )
