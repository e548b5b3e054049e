"""The damping summary of an epoch: median ratio, its regime and the share of steps in each regime.

Pure functions over floats, plus :class:`StepValues`, the per-epoch accumulator that keeps the ratios of steps
whose lr or momentum are device tensors in a preallocated device buffer, so that collecting them costs no host
sync until the epoch ends (docs/method.md, section 2).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_beta._text import markdown_table
from lightning_beta.functional.damping import DampingRegime, classify_regime

#: The regime names, in the order of their codes (-1, 0, +1).
REGIMES: tuple[str, ...] = tuple(regime.value for regime in DampingRegime)


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


def summarize_epoch(epoch: int, group: str, zetas: Iterable[float], tolerance: float) -> EpochDamping | None:
    """Summarise the damping ratios of one param group's steps over an epoch.

    Non-finite ratios (an undefined ratio, or ``inf`` from a group whose lr was 0) are left out.

    Args:
        epoch: the epoch index.
        group: the param group's name.
        zetas: the damping ratio of every optimizer step of the epoch.
        tolerance: half-width of the critical band around 1.

    Returns:
        The summary, or ``None`` when no finite ratio is left.

    Example:
        >>> record = summarize_epoch(0, "pg0", [0.5, 1.0, 2.0, 3.0, float("nan")], tolerance=0.1)
        >>> record.median_zeta, record.regime, record.n_steps
        (1.5, 'overdamped', 4)
        >>> record.fractions
        {'underdamped': 0.25, 'critical': 0.25, 'overdamped': 0.5}
    """
    finite = [float(z) for z in zetas if math.isfinite(z)]
    if not finite:
        return None
    median = statistics.median(finite)
    counts = dict.fromkeys(REGIMES, 0)
    for zeta in finite:
        counts[classify_regime(zeta, tolerance).value] += 1
    fractions = {name: counts[name] / len(finite) for name in REGIMES}
    regime = classify_regime(median, tolerance).value
    return EpochDamping(epoch, group, median, regime, fractions, len(finite))


def epoch_metrics(record: EpochDamping, suffix: str) -> dict[str, float]:
    """The log keys of an epoch summary: ``damping/epoch_zeta``, ``damping/epoch_regime``, the fractions.

    Example:
        >>> record = EpochDamping(0, "pg0", 0.5, "underdamped", {"underdamped": 1.0, "critical": 0.0}, 2)
        >>> epoch_metrics(record, "")["damping/epoch_regime"]
        -1.0
    """
    metrics = {
        f"damping/epoch_zeta{suffix}": record.median_zeta,
        f"damping/epoch_regime{suffix}": float(DampingRegime(record.regime).code),
    }
    for name, fraction in record.fractions.items():
        metrics[f"damping/epoch_fraction/{name}{suffix}"] = fraction
    return metrics


def summary_table(history: Sequence[EpochDamping]) -> str:
    """The epoch summaries as a markdown table: epoch | group | median zeta | regime | fractions | steps.

    Example:
        >>> print(summary_table([EpochDamping(0, "pg0", 0.5, "underdamped", {"underdamped": 1.0}, 3)]))
        | epoch | group | median zeta | regime | underdamped | critical | overdamped | steps |
        |---:|---|---:|---|---:|---:|---:|---:|
        | 0 | pg0 | 0.5 | underdamped | 100% | 0% | 0% | 3 |
    """
    header = ["epoch", "group", "median zeta", "regime", *REGIMES, "steps"]
    rows = [
        [
            r.epoch,
            r.group,
            f"{r.median_zeta:.4g}",
            r.regime,
            *(f"{r.fractions.get(n, 0):.0%}" for n in REGIMES),
            r.n_steps,
        ]
        for r in history
    ]
    return markdown_table(header, rows, align="rlrlrrrr")


class StepValues:
    """The values of one series over an epoch, gathered without a host sync.

    Python floats go to a host list. 0-d tensors (a damping ratio computed from a tensor lr or momentum) are
    copied into a preallocated buffer on their device, which doubles when full; :meth:`to_list` copies it to the
    host once.

    Args:
        capacity: initial size of the device buffer. Defaults to ``64``.

    Example:
        >>> values = StepValues(capacity=1)
        >>> for v in (0.5, torch.tensor(0.25), torch.tensor(2.0)):
        ...     values.append(v)
        >>> len(values), values.to_list()
        (3, [0.5, 0.25, 2.0])
    """

    def __init__(self, capacity: int = 64) -> None:
        self._host: list[float] = []
        self._buffer: Tensor | None = None
        self._size = 0
        self._capacity = max(int(capacity), 1)

    def __len__(self) -> int:
        return len(self._host) + self._size

    @torch.no_grad()
    def append(self, value: float | Tensor) -> None:
        """Add one value; a tensor is copied on its device (no host sync)."""
        if not isinstance(value, Tensor):
            self._host.append(float(value))
            return
        if self._buffer is None:
            dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
            self._buffer = torch.empty(self._capacity, dtype=dtype, device=value.device)
        elif self._size == self._buffer.numel():
            grown = torch.empty(2 * self._size, dtype=self._buffer.dtype, device=self._buffer.device)
            grown[: self._size].copy_(self._buffer)
            self._buffer = grown
        self._buffer[self._size].copy_(value.detach().reshape(()))
        self._size += 1

    def to_list(self) -> list[float]:
        """Every value as a float, host values first (one host copy of the device buffer)."""
        if self._buffer is None or self._size == 0:
            return list(self._host)
        return self._host + [float(v) for v in self._buffer[: self._size].tolist()]


class EpochZetas:
    """The damping ratios of every param group over the current epoch, and their summary at its end.

    Example:
        >>> epoch = EpochZetas()
        >>> for zeta in (0.5, torch.tensor(0.7), 2.0):
        ...     epoch.append("", "pg0", zeta)
        >>> records, metrics = epoch.finish(0, tolerance=0.1)
        >>> records[0].median_zeta, metrics["damping/epoch_regime"]
        (0.699999988079071, -1.0)
        >>> len(epoch)
        0
    """

    def __init__(self) -> None:
        self.values: dict[str, StepValues] = {}
        self.labels: dict[str, str] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.values.values())

    def append(self, suffix: str, label: str, zeta: float | Tensor) -> None:
        """Add one step's ratio of the group logged under ``suffix`` and named ``label`` (no host sync)."""
        self.values.setdefault(suffix, StepValues()).append(zeta)
        self.labels.setdefault(suffix, label)

    def finish(self, epoch: int, tolerance: float) -> tuple[list[EpochDamping], dict[str, float]]:
        """Summarise the epoch (one host copy per group) and start the next: the records and their log keys."""
        records: list[EpochDamping] = []
        metrics: dict[str, float] = {}
        for suffix, values in self.values.items():
            record = summarize_epoch(epoch, self.labels.get(suffix, suffix), values.to_list(), tolerance)
            if record is not None:
                records.append(record)
                metrics.update(epoch_metrics(record, suffix))
        self.values = {}
        return records, metrics

    def state_dict(self) -> dict[str, object]:
        """``zetas`` (suffix to floats) and ``labels``, the layout of state version 1."""
        return {"zetas": {s: v.to_list() for s, v in self.values.items()}, "labels": dict(self.labels)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.values = {}
        for suffix, zetas in state["zetas"].items():  # type: ignore[attr-defined]
            buffer = self.values[suffix] = StepValues()
            for zeta in zetas:
                buffer.append(float(zeta))
        self.labels = dict(state["labels"])  # type: ignore[call-overload]
