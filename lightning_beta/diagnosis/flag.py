"""Diagnose: which groups to flag from a localizer's scores, and how two rankings agree.

The method is in docs/method.md, section 4. The paper flags 3 of 7 groups without a stated rule; ours flags the
groups whose score is at least ``ratio`` times the median group score, or the ``top_k`` highest. The
cross-optimizer check compares the flagged sets (Jaccard) and the full rankings (Spearman's rank correlation, by
``torchmetrics``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torchmetrics.functional import spearman_corrcoef

from lightning_beta._checks import check_int, check_number
from lightning_beta.diagnosis.scores import LayerScores

Scores = LayerScores | Mapping[str, float]


def _as_dict(scores: Scores) -> dict[str, float]:
    if isinstance(scores, LayerScores):
        return dict(scores.scores)
    if isinstance(scores, Mapping):
        return {str(k): float(v) for k, v in scores.items()}
    raise TypeError(f"`scores` must be LayerScores or a dict of group -> score, got {type(scores).__name__}")


def flag_layers(scores: Scores, ratio: float = 2.0, top_k: int | None = None) -> list[str]:
    """The groups to treat: score ``>= ratio * median`` of all group scores, or the ``top_k`` highest.

    Groups with score 0 are never flagged (an all-zero result, e.g. no misclassified sample, flags nothing).

    Args:
        scores: a localizer's result or a dict group -> score.
        ratio: multiple of the median a score must reach, ``> 0``. Defaults to ``2.0``.
        top_k: when given, flag the ``top_k`` highest-scoring groups instead (ties keep group order).
            Defaults to ``None``.

    Returns:
        Flagged group names, highest score first.

    Raises:
        ValueError: for empty scores, a non-finite or negative score, ``ratio <= 0`` or ``top_k < 1``.
        TypeError: if ``top_k`` is not an int.

    Example:
        >>> flag_layers({"a": 1.0, "b": 2.0, "c": 5.0, "d": 0.5})  # median 1.5, threshold 3
        ['c']
        >>> flag_layers({"a": 1.0, "b": 2.0, "c": 5.0, "d": 0.5}, top_k=2)
        ['c', 'b']
    """
    values = _as_dict(scores)
    if not values:
        raise ValueError("`scores` is empty: no group to flag")
    bad = {k: v for k, v in values.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"`scores` must be finite and >= 0, got {bad}")
    check_number("ratio", ratio, low=0.0, low_open=True)
    check_int("top_k", top_k, minimum=1, optional=True)
    order = {name: i for i, name in enumerate(values)}
    ranked = sorted(values, key=lambda name: (-values[name], order[name]))
    if top_k is not None:
        return [name for name in ranked[:top_k] if values[name] > 0]
    threshold = ratio * statistics.median(values.values())
    return [name for name in ranked if values[name] > 0 and values[name] >= threshold]


def jaccard(a: set[str] | list[str], b: set[str] | list[str]) -> float:
    """``|a & b| / |a | b|``; 1.0 for two empty sets.

    Example:
        >>> jaccard({"x", "y"}, {"y", "z"})
        0.3333333333333333
    """
    sa, sb = set(a), set(b)
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman's rank correlation of two score dicts over their common groups (ties get average ranks).

    The Pearson correlation of the ranks, by :func:`torchmetrics.functional.spearman_corrcoef` (which adds
    ``1e-6`` to the denominator, so a result is within about ``1e-5`` of the exact value); ``nan`` when fewer
    than two groups are shared or one side is constant.

    Example:
        >>> round(spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 30, "c": 20}), 4)
        0.5
    """
    common = [k for k in a if k in b]
    va, vb = [float(a[k]) for k in common], [float(b[k]) for k in common]
    if len(common) < 2 or len(set(va)) < 2 or len(set(vb)) < 2:
        return math.nan
    rho = spearman_corrcoef(torch.tensor(va, dtype=torch.float64), torch.tensor(vb, dtype=torch.float64))
    return float(rho)


@dataclass(frozen=True)
class Overlap:
    """Agreement of two localizations: flagged sets and rankings."""

    flagged_a: list[str]
    flagged_b: list[str]
    jaccard: float
    spearman: float


def optimizer_overlap(scores_a: Scores, scores_b: Scores, ratio: float = 2.0, top_k: int | None = None) -> Overlap:
    """Compare two localizations, e.g. of an SGD-trained and an Adam-trained model (the paper reports 100%).

    Args:
        scores_a: the first scores.
        scores_b: the second scores, over the same groups.
        ratio: flagging rule of :func:`flag_layers`. Defaults to ``2.0``.
        top_k: flagging rule of :func:`flag_layers`. Defaults to ``None``.

    Returns:
        Both flagged sets, their Jaccard index and the Spearman correlation of the scores.

    Raises:
        ValueError: if the two name different groups.

    Example:
        >>> o = optimizer_overlap({"a": 1.0, "b": 2.0, "c": 9.0}, {"a": 2.0, "b": 1.0, "c": 9.0})
        >>> o.flagged_a, o.flagged_b, o.jaccard, round(o.spearman, 4)
        (['c'], ['c'], 1.0, 0.5)
    """
    a, b = _as_dict(scores_a), _as_dict(scores_b)
    if set(a) != set(b):
        raise ValueError(f"`scores_a` and `scores_b` must name the same groups, got {sorted(a)} and {sorted(b)}")
    fa, fb = flag_layers(a, ratio, top_k), flag_layers(b, ratio, top_k)
    return Overlap(fa, fb, jaccard(fa, fb), spearman(a, b))
