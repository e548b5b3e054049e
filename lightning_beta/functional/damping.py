"""Damping ratio of momentum SGD and its regimes (docs/method.md, sections 1 and 2)."""

from __future__ import annotations

import math
from enum import Enum
from typing import overload

import torch
from torch import Tensor

from lightning_beta.functional.momentum import check_curvature, check_lr, check_rule


class DampingRegime(str, Enum):
    """The three regimes of a damped oscillator, with the integer codes used in logs.

    Example:
        >>> DampingRegime.UNDERDAMPED.code
        -1
        >>> DampingRegime.from_code(1)
        <DampingRegime.OVERDAMPED: 'overdamped'>
    """

    UNDERDAMPED = "underdamped"
    CRITICAL = "critical"
    OVERDAMPED = "overdamped"

    @property
    def code(self) -> int:
        """``-1`` underdamped, ``0`` critical, ``+1`` overdamped."""
        return {"underdamped": -1, "critical": 0, "overdamped": 1}[self.value]

    @classmethod
    def from_code(cls, code: int) -> DampingRegime:
        """The regime of a code ``-1``, ``0`` or ``+1``."""
        for regime in cls:
            if regime.code == code:
                return regime
        raise ValueError(f"`code` must be -1, 0 or 1, got {code!r}")


def check_tolerance(tolerance: float) -> None:
    """Raise unless ``0 <= tolerance < 1``."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"`tolerance` must be a float, got {type(tolerance).__name__}")
    if not (0 <= tolerance < 1):
        raise ValueError(f"`tolerance` must be in [0, 1), got {tolerance}")


@overload
def damping_ratio(momentum: float, lr: float, curvature: float = ..., rule: str = ...) -> float: ...
@overload
def damping_ratio(momentum: Tensor | float, lr: Tensor, curvature: float = ..., rule: str = ...) -> Tensor: ...
@overload
def damping_ratio(momentum: Tensor, lr: Tensor | float, curvature: float = ..., rule: str = ...) -> Tensor: ...
def damping_ratio(
    momentum: float | Tensor, lr: float | Tensor, curvature: float = 1.0, rule: str = "paper"
) -> float | Tensor:
    """Damping ratio ``zeta`` of heavy-ball SGD at a given momentum and learning rate.

    ``rule="paper"``: ``zeta = (1 - momentum) / (2*sqrt(curvature*lr))``. ``rule="exact"``:
    ``zeta = (1 - sqrt(momentum)) / sqrt(curvature*lr)``, the ratio whose value 1 is the exact discrete critical
    point. Each rule gives exactly 1 at the :func:`~lightning_beta.functional.critical_momentum` of the same rule
    (where unclamped). ``zeta < 1`` oscillates (underdamped), ``zeta > 1`` creeps (overdamped). ``lr == 0`` gives
    ``inf``: a frozen group has no dynamics to damp.

    Args:
        momentum: momentum (SGD ``momentum`` or Adam ``betas[0]``) in ``[0, 1]``, float or Tensor.
        lr: learning rate, float or Tensor. If either argument is a Tensor the result is a Tensor, computed
            without a host sync and without validation.
        curvature: the stiffness ``lambda``. Defaults to ``1.0``.
        rule: ``"paper"`` or ``"exact"``. Defaults to ``"paper"``.

    Raises:
        ValueError: for a float ``momentum`` outside ``[0, 1]`` or NaN, a float ``lr`` that is negative, NaN or
            infinite, a bad ``curvature`` or an unknown ``rule``.

    Example:
        >>> round(damping_ratio(0.9, 0.01), 6)
        0.5
        >>> round(damping_ratio(0.81, 0.01, rule="exact"), 6)
        1.0
        >>> damping_ratio(0.9, 0.0)
        inf
    """
    check_rule(rule)
    check_curvature(curvature)
    if isinstance(momentum, Tensor) or isinstance(lr, Tensor):
        mu = torch.as_tensor(momentum)
        rate = torch.as_tensor(lr)
        root = torch.sqrt(rate * curvature)
        if rule == "paper":
            return (1.0 - mu) / (2.0 * root)
        return (1.0 - torch.sqrt(mu)) / root
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"`momentum` must be a float or a Tensor, got {type(momentum).__name__}")
    if math.isnan(momentum) or not (0.0 <= momentum <= 1.0):
        raise ValueError(f"`momentum` must be in [0, 1], got {momentum}")
    check_lr(lr)
    numerator = (1.0 - momentum) if rule == "paper" else (1.0 - math.sqrt(momentum))
    denominator = (2.0 if rule == "paper" else 1.0) * math.sqrt(curvature * lr)
    if denominator == 0.0:
        return math.inf if numerator > 0 else math.nan
    return numerator / denominator


@overload
def classify_regime(zeta: float, tolerance: float = ...) -> DampingRegime: ...
@overload
def classify_regime(zeta: Tensor, tolerance: float = ...) -> Tensor: ...
def classify_regime(zeta: float | Tensor, tolerance: float = 0.1) -> DampingRegime | Tensor:
    """Classify a damping ratio: underdamped below ``1 - tolerance``, overdamped above ``1 + tolerance``.

    Args:
        zeta: damping ratio, float or Tensor.
        tolerance: half-width of the critical band around 1. Defaults to ``0.1``.

    Returns:
        For a float, a :class:`DampingRegime`. For a Tensor, a Tensor of the same shape and floating dtype holding
        the codes ``-1.0`` (underdamped), ``0.0`` (critical) or ``1.0`` (overdamped); NaN stays NaN, so an
        undefined ratio is never reported as critical.

    Raises:
        ValueError: if ``tolerance`` is outside ``[0, 1)`` or a float ``zeta`` is NaN.

    Example:
        >>> classify_regime(0.5)
        <DampingRegime.UNDERDAMPED: 'underdamped'>
        >>> classify_regime(1.05)
        <DampingRegime.CRITICAL: 'critical'>
        >>> classify_regime(torch.tensor([0.5, 1.0, 2.0, float("nan")]))
        tensor([-1.,  0.,  1., nan])
    """
    check_tolerance(tolerance)
    low, high = 1.0 - tolerance, 1.0 + tolerance
    if isinstance(zeta, Tensor):
        z = zeta if zeta.is_floating_point() else zeta.float()
        codes = (z > high).to(z.dtype) - (z < low).to(z.dtype)
        return torch.where(torch.isnan(z), z, codes)
    if math.isnan(zeta):
        raise ValueError("`zeta` is NaN: the damping ratio is undefined (momentum 1 with lr 0?)")
    if zeta < low:
        return DampingRegime.UNDERDAMPED
    if zeta > high:
        return DampingRegime.OVERDAMPED
    return DampingRegime.CRITICAL
