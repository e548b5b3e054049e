"""Private: argument checks shared by every public constructor and function (no Lightning import).

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, with a message that names the
argument, what was expected and what was received. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")


def check_int(name: str, value: Any, minimum: int | None = None, optional: bool = False) -> None:
    """Raise unless ``value`` is an int ``>= minimum`` (or ``None`` when ``optional``).

    Example:
        >>> check_int("epochs", 0, minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: `epochs` must be >= 1, got 0
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "None or an int" if optional else "an int"
        raise TypeError(f"`{name}` must be {kind}, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise unless ``value`` is a finite real number in the interval given by ``low``/``high`` (closed by default).

    Example:
        >>> check_number("tolerance", 1.0, 0.0, 1.0, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `tolerance` must be in [0.0, 1.0), got 1.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"`{name}` must be in {interval}, got {value}")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Example:
        >>> check_choice("rule", "x", ("paper", "exact"))
        Traceback (most recent call last):
        ...
        ValueError: `rule` must be one of 'paper', 'exact', got 'x'
    """
    if value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {expected}, got {value!r}")


def check_state_version(owner: str, state: dict[str, Any], version: int) -> None:
    """Refuse a checkpointed state written by another release.

    Raises:
        ValueError: if ``state["version"]`` is not ``version``; the message names both.
    """
    found = state.get("version")
    if found != version:
        raise ValueError(
            f"{owner} state has version {found!r}; this release reads version {version}. Resume with the release"
            " that wrote the checkpoint, or start the fit without it (`ckpt_path=None`)."
        )
