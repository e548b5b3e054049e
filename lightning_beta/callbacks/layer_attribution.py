"""LayerAttributionCallback: per-layer gradient norms accumulated on the device, for diagnosis (PAPER.md section 3)."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_beta._loggers import add_layout_category, is_logging_step, log_scalars, tensorboard_experiment
from lightning_beta._optim import unwrap_optimizer
from lightning_beta._strategies import is_sharded
from lightning_beta.artifact import (
    AttributionArtifact,
    GroupTotals,
    ReferenceStats,
    save_attribution,
)
from lightning_beta.functional.grad_norms import ABSENT, add_group_powers_, check_norm_type, step_norms
from lightning_beta.layer_groups import GroupBy, check_group_by, group_modules, group_parameters, group_sizes

_STATE_VERSION = 1
#: Rows of the accumulator matrix ``(len(_ROWS), n_groups + 1)``; the last column is the whole model.
_ROWS = ("sum", "sumsq", "count", "nonfinite", "interval_sum", "interval_count", "epoch_sum", "epoch_count", "max")
_SUM, _SUMSQ, _COUNT, _NONFINITE, _ISUM, _ICOUNT, _ESUM, _ECOUNT, _MAX = range(len(_ROWS))


@dataclass
class _Plan:
    """For one optimizer: its parameters that belong to a group, their group index, and the index tensors."""

    params: list[nn.Parameter]
    group_of: list[int]
    amp_scaled: bool
    #: ``present`` (indices into ``params`` with a gradient) -> (group index tensor, row initialiser or ``None``).
    patterns: dict[tuple[int, ...], tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    #: The pattern of the common case, every parameter with a dense gradient (built with the plan).
    full: tuple[Tensor, Tensor | None] | None = None
    #: How many parameters the optimizer held when the plan was built; a change (``add_param_group`` mid-run, as
    #: ``BackboneFinetuning`` does) rebuilds the plan.
    n_optimizer_params: int = -1


class LayerAttributionCallback(pl.Callback):
    r"""Accumulate the gradient norm of each layer group on the device, log it, and save an attribution artifact.

    At fit start the LightningModule's parameters are split into layer groups with
    :func:`~lightning_beta.layer_groups.group_parameters` and their sizes recorded. Once per optimizer step (in
    ``on_before_optimizer_step``, so gradient accumulation counts once) the gradients' norms are computed with one
    ``torch._foreach_norm`` call over all gradients present, and their powers summed into groups with one
    ``index_add_`` straight into the next row of a preallocated device step buffer: four tensor ops in the common
    case, the group index cached per pattern of present gradients. The statistics (sum, sum of squares, max, count,
    non-finite count, interval and epoch sums) are reduced from the buffered rows in one batch on the device when the
    buffer is full, before a log, at epoch end, in ``state_dict`` and for the artifact; the sums are added in step
    order, so the values do not depend on when rows were reduced. Nothing is copied to the host except on logging
    steps and at epoch end. Parameters whose ``grad`` is ``None`` (frozen) contribute nothing; a group none of whose
    parameters has a gradient is not counted for that step. A non-finite group norm (a non-finite gradient, or a
    float32 sum that overflows) is counted apart and never enters the sums.

    Behaviour worth knowing:

    - Gradients are read **before clipping** (Lightning clips after this hook), so the norms are those of the raw
      gradients, also with ``gradient_clip_val``.
    - Under 16-bit AMP the gradients are unscaled before this hook, except for optimizers that unscale inside
      ``step()`` (``fused=True`` Adam/AdamW/SGD): their group norms are divided by the scaler's scale on the device.
      Steps the scaler skips for overflow show up as non-finite counts.
    - DDP: the gradients seen here are already averaged across ranks, so the norms need no collective; every rank
      accumulates the same values and rank zero logs and writes. Every rank runs the reference pass on its share of
      the reference batches and the sums are reduced across ranks, so the statistics are those of the global
      batches and a collective inside ``training_step`` is matched on every rank. Sharded strategies (FSDP, DeepSpeed,
      ModelParallel) raise ``MisconfigurationException`` at fit start rather than report shard norms.
    - At the end of training (``on_train_end``), rank zero writes ``attribution.json`` atomically (see
      :mod:`lightning_beta.artifact` for the schema); after an exception it writes what exists, marked
      ``complete=false``. Reference statistics: with the final weights, ``training_step`` is run under
      ``torch.no_grad()`` in eval mode (``self.log`` silenced) on the first ``reference_batches`` training batches,
      and a forward hook on each group's module records the per-channel mean and variance of its output (channel =
      dim 1, as BatchNorm; a 1-D output is one channel). Only groups whose parameters are exactly those of a
      submodule of the same name have a module (all ``"auto"`` and depth groups do; regex groups only when named
      after such a module); the others, and all groups under manual optimization, are listed as skipped.
    - With a ``TensorBoardLogger``: a custom-scalars category "Layer attribution" charting ``grad_norm/.*``, and at
      the end an image ``attribution/heatmap`` (log10 of the per-epoch mean norm, epochs down, groups across) and a
      text ``attribution/ranking`` table of groups by size-normalised norm (mean norm / sqrt(n_params)).

    Logged metrics:
        - ``grad_norm/<group>``: the mean of the group's gradient norm over the optimizer steps since the last log,
          every ``log_every_n_steps``.
        - ``grad_norm/total``: the same for the norm of all gradients together.

    Args:
        group_by: how to group parameters: ``"auto"`` (top-level children), an int module depth, or a dict
            ``{group: [regex, ...]}`` over parameter names. Defaults to ``"auto"``.
        norm_type: the norm order, ``> 0`` or ``inf``. Defaults to ``2.0``.
        log_every_n_steps: optimizer steps between logs; ``None`` uses the Trainer's ``log_every_n_steps``.
            Defaults to ``None``.
        reference_batches: training batches for the reference statistics; 0 skips them. Defaults to ``4``.
        dirpath: directory of the artifact; ``None`` uses ``trainer.log_dir`` (the logger's log dir, else
            ``default_root_dir``). Defaults to ``None``.
        filename: file name of the artifact. Defaults to ``"attribution.json"``.

    Raises:
        ValueError: for a bad ``group_by`` (see :func:`~lightning_beta.layer_groups.check_group_by`), a
            ``norm_type`` that is not positive, ``log_every_n_steps < 1``, ``reference_batches < 0``, or an empty
            ``filename`` or one with a directory part.
        TypeError: for arguments of the wrong type.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LayerAttributionCallback(group_by=2, reference_batches=0)], logger=False)
    """

    #: Optimizer steps held in the device step buffer before they are reduced into the accumulators.
    _buffer_rows = 64

    def __init__(
        self,
        group_by: GroupBy = "auto",
        norm_type: float = 2.0,
        log_every_n_steps: int | None = None,
        reference_batches: int = 4,
        dirpath: str | os.PathLike | None = None,
        filename: str = "attribution.json",
    ) -> None:
        check_group_by(group_by)
        check_norm_type(norm_type)
        _check_int("log_every_n_steps", log_every_n_steps, minimum=1, optional=True)
        _check_int("reference_batches", reference_batches, minimum=0)
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"`dirpath` must be None, a str or os.PathLike, got {type(dirpath).__name__}")
        if not isinstance(filename, str):
            raise TypeError(f"`filename` must be a str, got {type(filename).__name__}")
        if not filename or os.path.basename(filename) != filename:
            raise ValueError(f"`filename` must be a non-empty file name without a directory, got {filename!r}")
        self.group_by = group_by
        self.norm_type = float(norm_type)
        self.log_every_n_steps = log_every_n_steps
        self.reference_batches = reference_batches
        self.dirpath = dirpath
        self.filename = filename
        self._reset()

    def _reset(self) -> None:
        self.groups: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.history_epochs: list[int] = []
        self.history: list[list[float | None]] = []
        self.history_total: list[float | None] = []
        self.artifact: AttributionArtifact | None = None
        self._acc: Tensor | None = None
        self._buffer: Tensor | None = None
        self._power_rows: list[Tensor] = []
        self._scale_rows: list[Tensor] = []
        self._n_buffered = 0
        self._plans: dict[int, _Plan] = {}
        self._param_group: dict[int, int] = {}
        self._scaler: Any = None
        self._pending: dict[str, Any] | None = None
        self._finished = False
        self._directory = Path(".")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(group_by=repr(self.group_by), norm_type=self.norm_type, filename=self.filename)

    @property
    def artifact_path(self) -> Path | None:
        """Where the artifact was written, once it was."""
        return getattr(self, "_artifact_path", None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget a previous fit; a checkpoint restored after this hook brings its state back."""
        if stage == "fit":
            self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the strategy, resolve the groups and allocate the device buffers."""
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
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        n_groups = len(self.groups)
        self._acc = torch.zeros(len(_ROWS), n_groups + 1, device=device, dtype=dtype)
        # One row per optimizer step: each group's sum of powers (``ABSENT`` without gradients), then the AMP scale
        # to divide by. Views of each row are taken once, so writing a step's row issues no indexing op.
        self._buffer = torch.zeros(self._buffer_rows, n_groups + 1, device=device, dtype=torch.float32)
        self._buffer[:, n_groups] = 1.0
        self._power_rows = list(self._buffer[:, :n_groups].unbind(0))
        self._scale_rows = list(self._buffer[:, n_groups:].unbind(0))
        self._n_buffered = 0
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Resolved here, on every rank: ``trainer.log_dir`` broadcasts, so rank zero alone must not call it later.
        self._directory = Path(
            self.dirpath if self.dirpath is not None else trainer.log_dir or trainer.default_root_dir
        )
        # Plans and the index of the all-gradients case are built here, so the per-step hook copies nothing.
        for optimizer in trainer.optimizers:
            self._plan(optimizer)
        if self._pending is not None:
            self._apply_state(self._pending)
        add_layout_category(trainer, "Layer attribution", {"Gradient norm per group": ["Multiline", [r"grad_norm/.*"]]})

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Write this step's group sums of powers as one row of the step buffer; copy to the host only to log.

        Runs in ``on_before_optimizer_step`` so it fires once per optimizer step under gradient accumulation, after
        the AMP unscale and before gradient clipping.
        """
        if self._buffer is None:
            return
        plan = self._plan(optimizer)
        grads: list[Any] = [param.grad for param in plan.params]
        pattern = plan.full
        # The common case, every parameter with a dense gradient, is one pass in Python and a cached index.
        if any(grad is None or grad.is_sparse for grad in grads):
            present = tuple(i for i, grad in enumerate(grads) if grad is not None)
            grads = [grads[i].coalesce().values() if grads[i].is_sparse else grads[i] for i in present]
            pattern = self._pattern(plan, present)
        if grads:
            assert pattern is not None
            if self._n_buffered == len(self._power_rows):
                self._flush()
            row = self._power_rows[self._n_buffered]
            index, init = pattern
            if init is not None:  # some groups have no gradient: marked, the rest start from zero
                row.copy_(init)
            add_group_powers_(row, grads, index, self.norm_type)
            scale = getattr(self._scaler, "_scale", None) if plan.amp_scaled else None
            if scale is not None:
                # A fused optimizer unscales inside step(): the gradients are still multiplied by the scale here.
                # ``_scale`` is the scaler's device tensor; ``get_scale()`` would copy it to the host.
                self._scale_rows[self._n_buffered].copy_(scale)
            self._n_buffered += 1
        if trainer.loggers and is_logging_step(trainer, self.log_every_n_steps):
            self._log_interval(trainer)

    @torch.no_grad()
    def _flush(self) -> None:
        """Reduce the buffered rows into the accumulators, on the device, exactly as one step at a time would.

        Called when the buffer is full, before the accumulators are read (logging step, epoch end, artifact,
        ``state_dict``). The sums are added in step order (``cumsum`` on the CPU, row by row elsewhere), so the
        float64 totals have the same bits however the steps were batched, and a resumed fit matches a straight one.
        """
        n, acc, buffer = self._n_buffered, self._acc, self._buffer
        if n == 0 or acc is None or buffer is None:
            return
        values, valid, bad = step_norms(buffer[:n, :-1], buffer[:n, -1:], self.norm_type, acc.dtype)
        counts, nonfinite = valid.to(acc.dtype), bad.to(acc.dtype)
        rows = torch.stack([values, values * values, counts, nonfinite, values, counts, values, counts], 1)
        if acc.device.type == "cpu":  # cumsum on the CPU adds in order, in float64: the bits of step-by-step adds
            acc[:_MAX] = torch.cat([acc[None, :_MAX], rows]).cumsum(0)[-1]
        else:
            for step in rows.unbind(0):
                acc[:_MAX].add_(step)
        torch.maximum(acc[_MAX], values.amax(0), out=acc[_MAX])
        self._clear_buffer()

    def _clear_buffer(self) -> None:
        if self._buffer is not None and self._n_buffered:
            self._buffer[: self._n_buffered, :-1].zero_()
            self._buffer[: self._n_buffered, -1].fill_(1.0)
        self._n_buffered = 0

    def _log_interval(self, trainer: pl.Trainer) -> None:
        assert self._acc is not None
        self._flush()
        host = self._acc[_ISUM : _ICOUNT + 1].to("cpu", copy=True)  # the one host copy; copy=True: on CPU it is a view
        self._acc[_ISUM : _ICOUNT + 1].zero_()
        metrics: dict[str, float] = {}
        for col, name in enumerate([*self.groups, "total"]):
            count = host[1, col].item()
            if count > 0:
                metrics[f"grad_norm/{name}"] = host[0, col].item() / count
        log_scalars(trainer, metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Append the epoch's mean norms to the history (one host copy)."""
        if self._acc is None:
            return
        self._flush()
        host = self._acc[_ESUM : _ECOUNT + 1].to("cpu", copy=True)
        self._acc[_ESUM : _ECOUNT + 1].zero_()
        if not (host[1] > 0).any():
            return
        means = [_mean(host[0, c].item(), host[1, c].item()) for c in range(host.shape[1])]
        self.history_epochs.append(trainer.current_epoch)
        self.history.append(means[:-1])
        self.history_total.append(means[-1])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the reference statistics and write the artifact and TensorBoard panels (rank zero)."""
        self._finished = True
        if self._acc is None:
            return
        # Every rank runs the reference pass (its share of each batch; the sums are reduced across ranks): on rank
        # zero alone, a collective in ``training_step`` would wait forever for the other ranks.
        reference, skipped = self._reference_stats(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self.artifact = self._build_artifact(trainer, complete=True, reference=reference, skipped=skipped)
        self._write(trainer, self.artifact)
        writer = tensorboard_experiment(trainer)
        if writer is not None:
            if self.artifact.history:
                writer.add_image("attribution/heatmap", self.artifact.heatmap(), trainer.global_step, dataformats="HWC")
            writer.add_text("attribution/ranking", self.artifact.ranking_markdown(), trainer.global_step)
            writer.flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Write what exists, marked ``complete=false``, unless the complete artifact was already written."""
        if self._finished or not trainer.is_global_zero or self._acc is None:
            return
        self.artifact = self._build_artifact(trainer, complete=False, reference={}, skipped=list(self.groups))
        self._write(trainer, self.artifact)

    def _write(self, trainer: pl.Trainer, artifact: AttributionArtifact) -> None:
        # Runs at the end of a long fit, or while an exception unwinds: a full or read-only disk must not kill the
        # fit nor mask the original exception. The data stays in ``self.artifact`` and in the checkpoint.
        path = self._directory / self.filename
        self._artifact_path: Path | None = None
        try:
            self._artifact_path = save_attribution(artifact, path)
        except (OSError, ValueError) as err:
            rank_zero_warn(
                f"LayerAttributionCallback: could not write the attribution artifact to {str(path)!r} ({err}). The"
                " fit is not affected: the artifact is kept in memory as `callback.artifact` (write it with"
                " `lightning_beta.diagnosis.save_attribution`) and the accumulators are in the checkpoint."
            )

    def _build_artifact(
        self, trainer: pl.Trainer, complete: bool, reference: dict[str, ReferenceStats], skipped: list[str]
    ) -> AttributionArtifact:
        assert self._acc is not None
        self._flush()
        host = self._acc.cpu().tolist()
        stats = []
        for col in range(len(self.groups) + 1):
            count = host[_COUNT][col]
            stats.append(
                GroupTotals(
                    mean=_mean(host[_SUM][col], count),
                    rms=None if count == 0 else math.sqrt(host[_SUMSQ][col] / count),
                    max=None if count == 0 else host[_MAX][col],
                    count=int(count),
                    nonfinite=int(host[_NONFINITE][col]),
                )
            )
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
        )

    def _reference_stats(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[dict[str, ReferenceStats], list[str]]:
        if self.reference_batches == 0:
            return {}, list(self.groups)
        if not pl_module.automatic_optimization:
            rank_zero_warn("LayerAttributionCallback: no reference statistics under manual optimization.")
            return {}, list(self.groups)
        loaders = trainer.train_dataloader
        if loaders is None:
            rank_zero_warn("LayerAttributionCallback: no training dataloader left for the reference statistics.")
            return {}, list(self.groups)
        modules = group_modules(pl_module, self.groups)
        sums: dict[str, list[Any]] = {}

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                out = output[0] if isinstance(output, (tuple, list)) and output else output
                if isinstance(out, Tensor) and out.is_floating_point():
                    x = out.detach().double()
                    x = x.reshape(-1, 1) if x.dim() <= 1 else x.movedim(1, 0).reshape(x.shape[1], -1).T
                    prev = sums.setdefault(name, [0.0, 0.0, 0])
                    if isinstance(prev[0], Tensor) and prev[0].shape[0] != x.shape[1]:
                        return
                    prev[0] = prev[0] + x.sum(0)
                    prev[1] = prev[1] + (x * x).sum(0)
                    prev[2] += x.shape[0]

            return hook

        handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
        was_training = pl_module.training
        pl_module.eval()
        # ``self.log`` outside the loop would raise or pollute the results: silenced for the reference pass.
        pl_module.log = pl_module.log_dict = _noop  # type: ignore[method-assign]
        try:
            combined = CombinedLoader(loaders, mode="max_size_cycle")
            with torch.no_grad(), trainer.precision_plugin.train_step_context():
                for batch, batch_idx, _ in itertools.islice(iter(combined), self.reference_batches):
                    pl_module.training_step(trainer.strategy.batch_to_device(batch), batch_idx)
        finally:
            del pl_module.log, pl_module.log_dict
            for handle in handles:
                handle.remove()
            pl_module.train(was_training)
        sums = _sum_over_ranks(trainer, list(modules), sums, pl_module.device)
        reference = {}
        for name in self.groups:
            if name in sums and isinstance(sums[name][0], Tensor):
                total, total_sq, count = sums[name]
                mean = total / count
                var = (total_sq / count - mean * mean).clamp_min(0)
                if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                    continue  # a diverged model's outputs: not JSON, not a reference; listed as skipped
                reference[name] = ReferenceStats(mean.cpu().tolist(), var.cpu().tolist(), int(count))
        return reference, [name for name in self.groups if name not in reference]

    def _plan(self, optimizer: Any) -> _Plan:
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
            # An optimizer that unscales inside ``step()`` (fused) leaves scaled gradients for this hook; Lightning
            # and Fabric detect it by this attribute.
            scaled = self._scaler is not None and bool(getattr(inner, "_step_supports_amp_scaling", False))
            plan = _Plan([p for p, _ in pairs], [g for _, g in pairs], scaled, n_optimizer_params=n_params)
            plan.full = self._pattern(plan, tuple(range(len(plan.params))))
            self._plans[id(inner)] = plan
        return plan

    def _pattern(self, plan: _Plan, present: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
        """The group index of the parameters ``present`` and the row initialiser marking the groups they miss.

        Built once per pattern (host-to-device copies, no sync); ``None`` for the initialiser when every group is
        present, as a cleared row is already all zeros.
        """
        pattern = plan.patterns.get(present)
        if pattern is None:
            assert self._acc is not None
            device, n_groups = self._acc.device, self._acc.shape[1] - 1
            groups = [plan.group_of[i] for i in present]
            missing = sorted(set(range(n_groups)) - set(groups))
            init = None
            if missing:
                init = torch.zeros(n_groups, dtype=torch.float32)
                init[missing] = ABSENT
                init = init.to(device)
            pattern = (torch.tensor(groups, dtype=torch.long, device=device), init)
            plan.patterns[present] = pattern
        return pattern

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "version": _STATE_VERSION,
            "groups": list(self.groups),
            "acc": None if self._acc is None else self._acc.detach().cpu().clone(),
            "history_epochs": list(self.history_epochs),
            "history": [list(row) for row in self.history],
            "history_total": list(self.history_total),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"LayerAttributionCallback state has version {version!r}; this release reads version {_STATE_VERSION}"
            )
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
            self._acc.copy_(state["acc"].to(device=self._acc.device, dtype=self._acc.dtype))
            self._clear_buffer()  # steps buffered before the restore are replaced by the checkpoint's totals
        self.history_epochs = list(state["history_epochs"])
        self.history = [list(row) for row in state["history"]]
        self.history_total = list(state["history_total"])
        self._pending = None


def check_strategy(strategy: Strategy) -> None:
    """Raise for strategies that shard parameters, whose local gradients are shards.

    Raises:
        MisconfigurationException: for FSDP, DeepSpeed and ModelParallel strategies.

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> check_strategy(SingleDeviceStrategy("cpu"))
    """
    if is_sharded(strategy):
        raise MisconfigurationException(
            f"LayerAttributionCallback does not support the sharded strategy {type(strategy).__name__}: each rank"
            " holds only a shard of each gradient, so its norms would be wrong. Use DDP or a single device."
        )


def _sum_over_ranks(
    trainer: pl.Trainer, names: list[str], sums: dict[str, list[Any]], device: torch.device
) -> dict[str, list[Any]]:
    """Add up every rank's ``[sum, sum of squares, count]`` per group, so DDP's statistics cover the global batches.

    Every rank calls it with the same ``names``; two collectives: the channel count of each group (a rank whose hook
    never fired for a group has none), then all sums packed in one tensor. One process: ``sums`` unchanged.
    """
    if trainer.world_size <= 1 or not names:
        return sums

    def channels(entry: list[Any] | None) -> int:
        return entry[0].shape[0] if entry is not None and isinstance(entry[0], Tensor) else 0

    counts = torch.tensor([channels(sums.get(name)) for name in names], dtype=torch.long, device=device)
    widths = trainer.strategy.reduce(counts, reduce_op="max").tolist()
    parts = []
    for name, width in zip(names, widths):
        entry = sums.get(name)
        if entry is not None and channels(entry) == width > 0:
            total, total_sq, count = entry
            n = torch.tensor([float(count)], dtype=torch.float64, device=device)
            parts.append(torch.cat([total.to(device, torch.float64), total_sq.to(device, torch.float64), n]))
        else:
            parts.append(torch.zeros(2 * width + 1, dtype=torch.float64, device=device))
    packed = trainer.strategy.reduce(torch.cat(parts).to(torch.float64), reduce_op="sum")
    merged: dict[str, list[Any]] = {}
    for name, width, part in zip(names, widths, torch.split(packed, [2 * w + 1 for w in widths])):
        count = round(part[-1].item())
        if width > 0 and count > 0:
            merged[name] = [part[:width], part[width : 2 * width], count]
    return merged


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _mean(total: float, count: float) -> float | None:
    return None if count == 0 else total / count


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "None or an int" if optional else "an int"
        raise TypeError(f"`{name}` must be {kind}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
