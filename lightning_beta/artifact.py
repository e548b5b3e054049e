"""The layer-attribution artifact: its dataclass, the atomic JSON writer and the validating reader.

``LayerAttributionCallback`` writes ``attribution.json`` at fit end; :func:`load_attribution` reads it back without a
Trainer, for the diagnosis functions and for plots (:mod:`lightning_beta.figures`). Schema version 3 (one JSON
object)::

    schema_version  3
    kind            "lightning_beta.layer_attribution"
    complete        false when written from an exception, before training ended
    norm_type, group_by, global_step, reference_batches
    groups          [{"name", "n_params", "parameters": [dotted names]}], in group order
    history         {"epochs": [e, ...], "mean": [[per group] per epoch], "total": [per epoch]}
    intervals       {"steps": [s, ...], "mean": [[per group] per logging interval]}, of the first
                    epoch (the heatmap of a one-epoch run); new in version 2
    totals          {group: {"mean", "rms", "max", "count", "nonfinite"}}; "total": the same for the whole model
    reference       {group: {"mean": [per feature], "var": [per feature], "count", "feature_dim"}} (feature_dim 1
                    when absent); "reference_skipped": [groups]
    probe_path      the file name of the probe record (:mod:`lightning_beta.probe`) in the artifact's directory,
                    ``null`` when there is none; new in version 3

Norms of steps or epochs with no finite value are ``null``; the JSON never holds NaN or Infinity. Version 1 files
(no ``intervals``) and version 2 files (no ``probe_path``) are still read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_beta._text import markdown_table

SCHEMA_VERSION = 3
#: Schema versions :func:`load_attribution` reads.
READABLE_VERSIONS = (1, 2, 3)
KIND = "lightning_beta.layer_attribution"
_REQUIRED = ("schema_version", "kind", "complete", "groups", "history", "totals", "total")


@dataclass(frozen=True)
class GroupTotals:
    """Statistics of one group's gradient norm over all counted optimizer steps (``None`` when ``count`` is 0)."""

    mean: float | None
    rms: float | None
    max: float | None
    count: int
    nonfinite: int


@dataclass(frozen=True)
class ReferenceStats:
    """Per-feature mean and (population) variance of a group module's output on the reference batches.

    ``feature_dim`` is the dim of the output that indexes features: ``1`` for convolution-type ``(B, C, ...)``
    outputs, ``-1`` for ``(..., C)`` ones (Linear, attention, transformer blocks); the drift localizer reads the
    output along the same dim. Artifacts written before it existed recorded dim 1, its default.
    """

    mean: list[float]
    var: list[float]
    count: int
    feature_dim: int = 1


@dataclass(frozen=True)
class AttributionArtifact:
    """What ``LayerAttributionCallback`` saved: per-group gradient norms, their history and reference statistics.

    Build it with :func:`load_attribution`; :meth:`to_dict` gives the JSON object back. ``probe_path`` is the
    probe record's file name beside the artifact (``None`` without one); ``path`` is the file the artifact was read
    from or written to (not part of the JSON), against which :meth:`load_probe` resolves ``probe_path``.
    """

    groups: dict[str, int]
    parameters: dict[str, list[str]]
    history_epochs: list[int]
    history: list[list[float | None]]
    history_total: list[float | None]
    totals: dict[str, GroupTotals]
    total: GroupTotals
    complete: bool = True
    norm_type: float = 2.0
    group_by: Any = "auto"
    global_step: int = 0
    reference_batches: int = 0
    reference: dict[str, ReferenceStats] = field(default_factory=dict)
    reference_skipped: list[str] = field(default_factory=list)
    interval_steps: list[int] = field(default_factory=list)
    interval_history: list[list[float | None]] = field(default_factory=list)
    probe_path: str | None = None
    schema_version: int = SCHEMA_VERSION
    path: Path | None = field(default=None, compare=False, repr=False)

    def size_normalised(self) -> dict[str, float | None]:
        """Mean norm over ``sqrt(n_params)`` per group: an RMS-like score that does not favour big groups."""
        scores: dict[str, float | None] = {}
        for name, n in self.groups.items():
            mean = self.totals[name].mean
            scores[name] = None if mean is None or n == 0 else mean / math.sqrt(n)
        return scores

    def ranking(self) -> list[tuple[str, float]]:
        """Groups with a score, highest size-normalised norm first."""
        scores = [(name, s) for name, s in self.size_normalised().items() if s is not None]
        return sorted(scores, key=lambda item: item[1], reverse=True)

    def ranking_markdown(self) -> str:
        """The ranking as a markdown table (TensorBoard's text plugin renders it)."""
        rows = [
            [rank, name, self.groups[name], f"{self.totals[name].mean:.4g}", f"{score:.4g}"]
            for rank, (name, score) in enumerate(self.ranking(), start=1)
        ]
        return markdown_table(["rank", "group", "n_params", "mean norm", "mean / sqrt(n)"], rows, align="rlrrr")

    def load_probe(self) -> Any:
        """The probe record beside the artifact (:func:`lightning_beta.probe.load_probe`, which raises without one)."""
        from lightning_beta.probe import load_probe

        return load_probe(self)

    def history_tensor(self) -> Tensor:
        """The history as a float64 ``(epochs, groups)`` tensor, NaN where an epoch had no finite norm."""
        rows = [[math.nan if v is None else v for v in row] for row in self.history]
        return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(self.groups))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the artifact."""
        return {
            "schema_version": self.schema_version,
            "kind": KIND,
            "complete": self.complete,
            "norm_type": _json_float(self.norm_type),
            "group_by": self.group_by,
            "global_step": self.global_step,
            "reference_batches": self.reference_batches,
            "groups": [
                {"name": n, "n_params": c, "parameters": self.parameters.get(n, [])} for n, c in self.groups.items()
            ],
            "history": {"epochs": self.history_epochs, "mean": self.history, "total": self.history_total},
            "intervals": {"steps": self.interval_steps, "mean": self.interval_history},
            "totals": {name: vars(t) for name, t in self.totals.items()},
            "total": vars(self.total),
            "reference": {name: vars(r) for name, r in self.reference.items()},
            "reference_skipped": self.reference_skipped,
            "probe_path": self.probe_path,
        }


def save_attribution(artifact: AttributionArtifact, path: str | os.PathLike) -> Path:
    """Write the artifact as JSON atomically: a temporary file in the same directory, then ``os.replace``.

    A reader never sees a half-written file, and a crash leaves the previous artifact in place.

    Args:
        artifact: what to write.
        path: the target file; its directory is created.

    Returns:
        The path written.

    Raises:
        ValueError: if the artifact holds NaN or infinite numbers (they are not JSON).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(artifact.to_dict(), indent=1, allow_nan=False)
    # ``os.open`` with mode 0o666 (not ``mkstemp``, which makes 0o600 files) so the umask decides, as for any file.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return target


def load_attribution(path: str | os.PathLike) -> AttributionArtifact:
    """Read an ``attribution.json`` written by ``LayerAttributionCallback``.

    Args:
        path: the file.

    Returns:
        The artifact.

    Raises:
        TypeError: if ``path`` is not a string or path.
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not JSON, not an attribution artifact, of an unknown schema version, or
            inconsistent (a history row or a total that does not match the groups).

    Example:
        >>> import tempfile, os
        >>> art = AttributionArtifact(
        ...     groups={"body": 10, "head": 4}, parameters={}, history_epochs=[0], history=[[0.5, 2.0]],
        ...     history_total=[2.06], totals={"body": GroupTotals(0.5, 0.5, 0.5, 1, 0),
        ...     "head": GroupTotals(2.0, 2.0, 2.0, 1, 0)}, total=GroupTotals(2.06, 2.06, 2.06, 1, 0))
        >>> path = save_attribution(art, os.path.join(tempfile.mkdtemp(), "attribution.json"))
        >>> load_attribution(path).ranking()[0][0]
        'head'
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(path)!r} is not an attribution artifact: not valid JSON ({err})") from err
    return dataclasses.replace(artifact_from_dict(data, source=os.fspath(path)), path=Path(path))


def artifact_from_dict(data: Any, source: str = "<dict>") -> AttributionArtifact:
    """Validate a parsed JSON object and build the artifact (see :func:`load_attribution` for the errors)."""
    where = f"{source!r} is not an attribution artifact"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    if data["kind"] != KIND:
        raise ValueError(f"{where}: `kind` is {data['kind']!r}, expected {KIND!r}")
    if data["schema_version"] not in READABLE_VERSIONS:
        raise ValueError(
            f"{source!r} has schema_version {data['schema_version']!r}; this release reads"
            f" {', '.join(str(v) for v in READABLE_VERSIONS[:-1])} and {READABLE_VERSIONS[-1]}"
        )
    probe_path = data.get("probe_path")  # absent before version 3
    if probe_path is not None and (
        not isinstance(probe_path, str) or not probe_path or os.path.basename(probe_path) != probe_path
    ):
        raise ValueError(f"{where}: `probe_path` must be null or a file name beside the artifact, got {probe_path!r}")
    try:
        groups = {str(g["name"]): int(g["n_params"]) for g in data["groups"]}
        parameters = {str(g["name"]): [str(p) for p in g.get("parameters", [])] for g in data["groups"]}
        history = data["history"]
        rows = [[_opt_float(v) for v in row] for row in history["mean"]]
        epochs = [int(e) for e in history["epochs"]]
        history_total = [_opt_float(v) for v in history["total"]]
        totals = {str(name): _totals(t) for name, t in data["totals"].items()}
        total = _totals(data["total"])
        intervals = data.get("intervals", {"steps": [], "mean": []})  # absent in version 1
        interval_steps = [int(s) for s in intervals["steps"]]
        interval_rows = [[_opt_float(v) for v in row] for row in intervals["mean"]]
        reference = {
            str(name): ReferenceStats(
                [float(v) for v in r["mean"]],
                [float(v) for v in r["var"]],
                int(r["count"]),
                int(r.get("feature_dim", 1)),
            )
            for name, r in data.get("reference", {}).items()
        }
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{where}: malformed field ({type(err).__name__}: {err})") from err
    if any(len(row) != len(groups) for row in rows) or not (len(rows) == len(epochs) == len(history_total)):
        raise ValueError(f"{where}: `history` must have one row of {len(groups)} values per epoch")
    if len(interval_rows) != len(interval_steps) or any(len(row) != len(groups) for row in interval_rows):
        raise ValueError(f"{where}: `intervals` must have one row of {len(groups)} values per step")
    if set(totals) != set(groups):
        raise ValueError(f"{where}: `totals` names {sorted(totals)} but `groups` names {sorted(groups)}")
    unknown = sorted(set(reference) - set(groups))
    if unknown:
        raise ValueError(f"{where}: `reference` names unknown group(s) {unknown}")
    return AttributionArtifact(
        groups=groups,
        parameters=parameters,
        history_epochs=epochs,
        history=rows,
        history_total=history_total,
        totals=totals,
        total=total,
        complete=bool(data["complete"]),
        norm_type=float(data.get("norm_type", 2.0)),
        group_by=data.get("group_by", "auto"),
        global_step=int(data.get("global_step", 0)),
        reference_batches=int(data.get("reference_batches", 0)),
        reference=reference,
        reference_skipped=[str(n) for n in data.get("reference_skipped", [])],
        interval_steps=interval_steps,
        interval_history=interval_rows,
        probe_path=probe_path,
    )


def _totals(t: Any) -> GroupTotals:
    return GroupTotals(
        _opt_float(t["mean"]), _opt_float(t["rms"]), _opt_float(t["max"]), int(t["count"]), int(t["nonfinite"])
    )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value
