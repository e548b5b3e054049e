"""Private: plain-text output shared by the callbacks, the artifact, the diagnosis report and the CLI."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column, ``l`` or ``r``. Defaults to all left.

    Example:
        >>> print(markdown_table(["group", "n"], [["fc", 10]], align="lr"))
        | group | n |
        |---|---:|
        | fc | 10 |
    """
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"`align` must have one character per column ({len(header)}), got {align!r}")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``, so that strict JSON can hold it.

    Example:
        >>> json_safe({"a": [1.0, float("nan")], "b": (float("inf"), "x")})
        {'a': [1.0, None], 'b': [None, 'x']}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
