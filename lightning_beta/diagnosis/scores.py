"""LayerScores: one score per layer group from a localizer, with its ranking and a printable table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_beta._text import json_safe, markdown_table


@dataclass(frozen=True)
class LayerScores:
    """Per-group scores of one localizer (higher means "more likely where the errors come from").

    Attributes:
        scores: group name to score, in the model's group order. Non-negative and finite.
        method: the localizer, e.g. ``"gradient"``, ``"drift"`` or ``"kinetic"``.
        n_params: group name to its number of scalar parameters.
        details: further per-group columns by name (``{"correct": {...}, "ratio": {...}}``), shown in the table.
        n_samples: elements the scores were computed on, one per target entry: samples for ``(N, C)`` logits,
            pixels or tokens for dense outputs (0 where not applicable).
        n_misclassified: misclassified elements among them, for the gradient score; ``None`` otherwise.
        message: why the scores are degenerate (e.g. no misclassified sample), or what the reader should know of
            how they were obtained (a reference matched after stripping a wrapper's prefix); ``None`` when nothing.

    Example:
        >>> s = LayerScores({"conv": 0.5, "fc": 2.0}, method="gradient", n_params={"conv": 10, "fc": 4})
        >>> s.ranking
        ['fc', 'conv']
        >>> print(s)
        | rank | group | n_params | gradient |
        |---:|---|---:|---:|
        | 1 | fc | 4 | 2 |
        | 2 | conv | 10 | 0.5 |
    """

    scores: dict[str, float]
    method: str
    n_params: dict[str, int] = field(default_factory=dict)
    details: dict[str, dict[str, float]] = field(default_factory=dict)
    n_samples: int = 0
    n_misclassified: int | None = None
    message: str | None = None

    @property
    def ranking(self) -> list[str]:
        """Group names, highest score first; ties keep the model's group order."""
        order = {name: i for i, name in enumerate(self.scores)}
        return sorted(self.scores, key=lambda name: (-self.scores[name], order[name]))

    @property
    def degenerate(self) -> bool:
        """Whether every score is 0 (nothing to localize), in which case :attr:`message` says why."""
        return all(value == 0 for value in self.scores.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite detail values become ``None``)."""
        return {
            "method": self.method,
            "scores": dict(self.scores),
            "ranking": self.ranking,
            "n_params": dict(self.n_params),
            "details": json_safe(self.details),
            "n_samples": self.n_samples,
            "n_misclassified": self.n_misclassified,
            "message": self.message,
        }

    def to_markdown(self) -> str:
        """The ranking as a markdown table: rank, group, size, score and every detail column."""
        columns = list(self.details)
        header = ["rank", "group", "n_params", self.method, *columns]
        rows = [
            [rank, name, self.n_params.get(name, ""), _fmt(self.scores[name])]
            + [_fmt(self.details[c].get(name)) for c in columns]
            for rank, name in enumerate(self.ranking, start=1)
        ]
        table = markdown_table(header, rows, align="rlr" + "r" * (1 + len(columns)))
        return f"{table}\n\n{self.message}" if self.message else table

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
