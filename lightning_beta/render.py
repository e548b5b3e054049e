"""Render the package's JSON artifacts as terminal or markdown tables: the reader of ``lightning-beta report``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_beta._text import markdown_table
from lightning_beta.artifact import KIND as ATTRIBUTION_KIND
from lightning_beta.artifact import AttributionArtifact, artifact_from_dict
from lightning_beta.diagnosis.pipeline import KIND as DIAGNOSIS_KIND
from lightning_beta.diagnosis.pipeline import SCHEMA_VERSION as DIAGNOSIS_SCHEMA


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A table with right-aligned numbers, as plain text or markdown.

    Example:
        >>> print(format_table(["group", "score"], [["fc", 1.5], ["conv1", 0.25]]))
        group  score
        -----  -----
        fc       1.5
        conv1   0.25
    """
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [bool(rows) and isinstance(rows[0][i], (int, float)) for i in range(len(header))]
    if markdown:
        return markdown_table(header, cells, align="".join("r" if num else "l" for num in numeric))
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths]), *map(line, cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_attribution(artifact: AttributionArtifact, markdown: bool = False) -> str:
    """The attribution artifact: one row per group, ranked by size-normalised mean gradient norm."""
    scores = artifact.size_normalised()
    order = [name for name, _ in artifact.ranking()] + [n for n, s in scores.items() if s is None]
    rows = []
    for name in order:
        totals = artifact.totals[name]
        rows.append([name, artifact.groups[name], totals.mean, totals.max, scores[name], totals.nonfinite])
    header = ["group", "n_params", "mean norm", "max norm", "mean/sqrt(n)", "non-finite"]
    status = "complete" if artifact.complete else "INCOMPLETE (training stopped early)"
    title = f"Layer attribution: {len(artifact.groups)} groups, {artifact.total.count} optimizer steps, {status}"
    return f"{title}\n\n{format_table(header, rows, markdown)}"


def render_diagnosis(data: dict[str, Any], source: str = "<json>", markdown: bool = False) -> str:
    """A diagnosis report (``DiagnosisReport.to_json()``) as tables.

    The localizer's ranking, the flagged groups, and the treatment and verification of the surgery and of the
    full-retraining baseline when present.

    Raises:
        ValueError: if the report's schema version is not this release's or a section is malformed.
    """
    if data.get("schema_version") != DIAGNOSIS_SCHEMA:
        raise ValueError(
            f"{source}: diagnosis report schema_version {data.get('schema_version')!r}; this release reads"
            f" {DIAGNOSIS_SCHEMA}"
        )
    try:
        scores = data["scores"]
        method = scores["method"]
        ranking = [
            [rank, name, scores["n_params"].get(name), float(scores["scores"][name])]
            for rank, name in enumerate(scores["ranking"], start=1)
        ]
        parts = [
            f"Localize ({method}): {scores['n_samples']} samples",
            format_table(["rank", "group", "n_params", method], ranking, markdown),
            "",
            f"Flagged: {', '.join(data['flagged']) or 'nothing'}",
        ]
        if data.get("message") and not data.get("worse"):
            parts.append(str(data["message"]))
        rows = []
        for label, run, check in (
            ("surgery", data.get("surgery"), data.get("verification")),
            ("every group (baseline)", data.get("baseline"), data.get("baseline_verification")),
        ):
            if run and check:
                rows.append(
                    [
                        label,
                        float(run["fraction_trained"]),
                        int(run["optimizer_steps"]),
                        float(run["wall_time_s"]),
                        float(check["accuracy_before"]),
                        float(check["accuracy_after"]),
                        int(check["fixed"]),
                        int(check["broken"]),
                        int(check["net"]),
                    ]
                )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{source}: malformed diagnosis report ({type(err).__name__}: {err})") from None
    if rows:
        header = ["run", "params trained", "steps", "wall s", "acc before", "acc after", "fixed", "broken", "net"]
        parts += ["", format_table(header, rows, markdown)]
    if data.get("worse"):
        parts += ["", f"WORSE: {data.get('message') or 'the treated model makes more errors than its input'}"]
    return "\n".join(parts)


def render_report(data: Any, source: str = "<json>", markdown: bool = False) -> str:
    """Render a parsed artifact (``attribution.json`` or a diagnosis report) as a table.

    Raises:
        ValueError: if ``data`` is not one of the package's artifacts, or is malformed.
    """
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == ATTRIBUTION_KIND:
        return render_attribution(artifact_from_dict(data, source), markdown)
    if kind == DIAGNOSIS_KIND:
        return render_diagnosis(data, source, markdown)
    raise ValueError(f"{source}: not a lightning_beta artifact (its `kind` is {kind!r})")
