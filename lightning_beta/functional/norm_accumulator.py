"""Running statistics of per-group gradient norms, accumulated on the device. Pure torch, no Lightning import.

One row per optimizer step goes into a preallocated device step buffer (each group's sum of powers from
:func:`~lightning_beta.functional.grad_norms.add_group_powers_`, then the AMP scale to divide by); the rows are
reduced into the statistics in one batch when the buffer is full or before they are read. Sharded gradients (each
rank holding a shard) are summed over ranks once per reduction, through the ``all_reduce`` callable given at
construction, not once per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_beta.functional.grad_norms import ABSENT, step_norms

#: Rows of the statistics matrix ``(len(ROWS), n_groups + 1)``; the last column is the whole model.
ROWS = ("sum", "sumsq", "count", "nonfinite", "interval_sum", "interval_count", "epoch_sum", "epoch_count", "max")
_SUM, _SUMSQ, _COUNT, _NONFINITE, _ISUM, _ICOUNT, _ESUM, _ECOUNT, _MAX = range(len(ROWS))

#: ``all_reduce(tensor, op) -> tensor`` over the ranks that hold shards of the gradients, ``op`` "sum" or "max".
AllReduce = Callable[[Tensor, str], Tensor]


class GroupNormAccumulator:
    """Sums, sums of squares, maxima and counts of group and total gradient norms, over a fit, an interval, an epoch.

    The statistics are float64 (float32 on MPS) on the device of the gradients. :meth:`next_row` hands out the
    buffer row of the next step; :meth:`flush` reduces the buffered rows in step order (``cumsum`` on the CPU, row
    by row elsewhere), so the sums have the same bits however the steps were batched and a resumed fit matches a
    straight one. Only :meth:`epoch_means`, :meth:`totals` and :meth:`state` copy to the host.

    Args:
        n_groups: number of layer groups.
        norm_type: the norm order, ``> 0`` or ``inf``.
        device: the device of the gradients.
        buffer_rows: optimizer steps held in the step buffer before it is reduced. Defaults to ``64``.
        all_reduce: sums (``"sum"``) or maxima (``"max"``) of a tensor over the ranks, for gradients that are
            shards; ``None`` when every rank holds whole gradients. Defaults to ``None``.

    Example:
        >>> acc = GroupNormAccumulator(2, 2.0, torch.device("cpu"))
        >>> powers, scale = acc.next_row()
        >>> _ = powers.copy_(torch.tensor([9.0, 16.0]))
        >>> acc.commit()
        >>> acc.interval_means()
        tensor([3., 4., 5.], dtype=torch.float64)
        >>> acc.totals()["mean"]
        [3.0, 4.0, 5.0]
    """

    def __init__(
        self,
        n_groups: int,
        norm_type: float,
        device: torch.device,
        buffer_rows: int = 64,
        all_reduce: AllReduce | None = None,
    ) -> None:
        self.n_groups = n_groups
        self.norm_type = norm_type
        self.all_reduce = all_reduce
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.stats = torch.zeros(len(ROWS), n_groups + 1, device=device, dtype=dtype)
        # One row per optimizer step: each group's sum of powers (``ABSENT`` without gradients), then the AMP scale.
        # Views of each row are taken once, so writing a step's row issues no indexing op.
        self.buffer = torch.zeros(buffer_rows, n_groups + 1, device=device, dtype=torch.float32)
        self.buffer[:, n_groups] = 1.0
        self._power_rows = list(self.buffer[:, :n_groups].unbind(0))
        self._scale_rows = list(self.buffer[:, n_groups:].unbind(0))
        self.n_buffered = 0

    def next_row(self) -> tuple[Tensor, Tensor]:
        """The views ``(powers, scale)`` of the next step's buffer row (zeros and 1), reducing a full buffer first.

        Write the step's sums of powers into ``powers`` (``ABSENT`` for groups without gradients) and, for a fused
        optimizer under AMP, its scale into ``scale``; then :meth:`commit`.
        """
        if self.n_buffered == len(self._power_rows):
            self.flush()
        return self._power_rows[self.n_buffered], self._scale_rows[self.n_buffered]

    def commit(self) -> None:
        """Count the row handed out by :meth:`next_row` as a step."""
        self.n_buffered += 1

    @torch.no_grad()
    def flush(self, reduce: bool = True) -> None:
        """Reduce the buffered rows into the statistics, on the device, exactly as one step at a time would.

        With ``all_reduce``, the rows are first summed (maxima for ``inf``) over the ranks in one collective, so
        every rank must call it at the same point. ``reduce=False`` drops the buffered rows instead (while an
        exception unwinds, when the other ranks may not reach the collective).
        """
        n, stats = self.n_buffered, self.stats
        if n == 0:
            return
        if not reduce and self.all_reduce is not None:
            self.clear()
            return
        powers = self.buffer[:n, :-1]
        if self.all_reduce is not None:
            powers = self._sum_over_ranks(powers)
        values, valid, bad = step_norms(powers, self.buffer[:n, -1:], self.norm_type, stats.dtype)
        counts, nonfinite = valid.to(stats.dtype), bad.to(stats.dtype)
        rows = torch.stack([values, values * values, counts, nonfinite, values, counts, values, counts], 1)
        if stats.device.type == "cpu":  # cumsum on the CPU adds in order, in float64: the bits of step-by-step adds
            stats[:_MAX] = torch.cat([stats[None, :_MAX], rows]).cumsum(0)[-1]
        else:
            for step in rows.unbind(0):
                stats[:_MAX].add_(step)
        torch.maximum(stats[_MAX], values.amax(0), out=stats[_MAX])
        self.clear()

    def _sum_over_ranks(self, powers: Tensor) -> Tensor:
        assert self.all_reduce is not None
        if math.isinf(self.norm_type):
            # Maxima: ``ABSENT`` (-1) loses to any rank's norm and stays where no rank had a gradient.
            return self.all_reduce(powers.clone(), "max")
        # Sums of powers add up over the shards; a group absent on one rank (an empty shard) must not subtract.
        present = (powers >= 0).to(powers.dtype)
        packed = self.all_reduce(torch.cat([powers.clamp_min(0), present], 1), "sum")
        summed, seen = packed.split(self.n_groups, 1)
        return torch.where(seen > 0, summed, ABSENT)

    def clear(self) -> None:
        """Forget the buffered rows."""
        if self.n_buffered:
            self.buffer[: self.n_buffered, :-1].zero_()
            self.buffer[: self.n_buffered, -1].fill_(1.0)
        self.n_buffered = 0

    @torch.no_grad()
    def interval_means(self) -> Tensor:
        """The mean norms since the last call, groups then total, as a device tensor (NaN without a finite norm).

        No host copy: the values are for Lightning's logging, which copies them when it writes.
        """
        self.flush()
        means = self.stats[_ISUM] / self.stats[_ICOUNT]
        self.stats[_ISUM : _ICOUNT + 1].zero_()
        return means

    @torch.no_grad()
    def epoch_means(self) -> tuple[Tensor, list[float | None]]:
        """The mean norms since the last call, as a device tensor and as host floats (``None`` without a norm).

        One host copy, for the end of an epoch.
        """
        self.flush()
        means = self.stats[_ESUM] / self.stats[_ECOUNT]
        host = self.stats[_ESUM : _ECOUNT + 1].to("cpu", copy=True).tolist()
        self.stats[_ESUM : _ECOUNT + 1].zero_()
        return means, [None if count == 0 else total / count for total, count in zip(*host)]

    def totals(self, reduce: bool = True) -> dict[str, list[float | None]]:
        """Fit-long statistics per column (groups, then total): ``mean``, ``rms``, ``max``, ``count``, ``nonfinite``.

        ``mean``, ``rms`` and ``max`` are ``None`` where ``count`` is 0. One host copy. ``reduce`` as for
        :meth:`flush`.
        """
        self.flush(reduce)
        host = self.stats.cpu().tolist()
        out: dict[str, list[float | None]] = {key: [] for key in ("mean", "rms", "max", "count", "nonfinite")}
        for col in range(self.n_groups + 1):
            count = host[_COUNT][col]
            out["mean"].append(None if count == 0 else host[_SUM][col] / count)
            out["rms"].append(None if count == 0 else math.sqrt(host[_SUMSQ][col] / count))
            out["max"].append(None if count == 0 else host[_MAX][col])
            out["count"].append(count)
            out["nonfinite"].append(host[_NONFINITE][col])
        return out

    def state(self) -> Tensor:
        """The statistics as a CPU tensor, the buffered rows reduced first (for a checkpoint)."""
        self.flush()
        return self.stats.detach().cpu().clone()

    def load(self, state: Tensor) -> None:
        """Restore :meth:`state`; steps buffered before are replaced by the restored totals."""
        if tuple(state.shape) != tuple(self.stats.shape):
            raise ValueError(f"accumulator state of shape {tuple(state.shape)}, expected {tuple(self.stats.shape)}")
        self.stats.copy_(state.to(device=self.stats.device, dtype=self.stats.dtype))
        self.clear()
