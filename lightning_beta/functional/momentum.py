"""Momentum from critical damping of the heavy-ball oscillator (docs/method.md, section 1).

Heavy-ball SGD, ``v <- mu*v + g; theta <- theta - lr*v``, discretises ``x'' + gamma x' + lambda x = 0`` with time
step ``sqrt(lr)``. Critical damping of that oscillator gives the momentum computed here.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

Rule = Literal["paper", "exact"]
RULES: tuple[str, ...] = ("paper", "exact")


def check_rule(rule: str) -> None:
    """Raise ``ValueError`` unless ``rule`` is one of :data:`RULES`."""
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {RULES}, got {rule!r}")


def check_curvature(curvature: float) -> None:
    """Raise unless ``curvature`` is a finite positive real number."""
    if isinstance(curvature, bool) or not isinstance(curvature, (int, float)):
        raise TypeError(f"`curvature` must be a positive float, got {type(curvature).__name__}")
    if not math.isfinite(curvature) or curvature <= 0:
        raise ValueError(f"`curvature` must be a finite number > 0, got {curvature}")


def check_momentum_bounds(min_momentum: float, max_momentum: float) -> None:
    """Raise unless ``0 <= min_momentum <= max_momentum < 1``."""
    for name, value in (("min_momentum", min_momentum), ("max_momentum", max_momentum)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value}")
    if min_momentum < 0:
        raise ValueError(f"`min_momentum` must be >= 0, got {min_momentum}")
    if max_momentum >= 1:
        raise ValueError(f"`max_momentum` must be < 1 (momentum 1 never forgets), got {max_momentum}")
    if min_momentum > max_momentum:
        raise ValueError(f"`min_momentum` ({min_momentum}) must be <= `max_momentum` ({max_momentum})")


def check_lr(lr: float) -> None:
    """Raise ``ValueError`` unless the float lr is finite and non-negative, ``TypeError`` unless it is a number."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"learning rate `lr` must be a float or a Tensor, got {type(lr).__name__}")
    if math.isnan(lr) or math.isinf(lr) or lr < 0:
        raise ValueError(f"learning rate `lr` must be a finite number >= 0, got {lr}")


@overload
def unclamped_critical_momentum(lr: float, curvature: float = ..., rule: str = ...) -> float: ...
@overload
def unclamped_critical_momentum(lr: Tensor, curvature: float = ..., rule: str = ...) -> Tensor: ...
def unclamped_critical_momentum(lr: float | Tensor, curvature: float = 1.0, rule: str = "paper") -> float | Tensor:
    """The critically damped momentum before clamping.

    ``rule="paper"`` gives ``1 - 2*sqrt(curvature*lr)``, negative for ``curvature*lr > 0.25``. ``rule="exact"``
    gives ``(1 - sqrt(curvature*lr))**2`` for ``curvature*lr <= 1`` and 0 beyond: past that point the repeated
    root of the discrete heavy-ball recursion is negative (a sign-flipping iterate, not damping), so the
    non-oscillating choice is no momentum. Both are non-increasing in ``lr``.

    Args:
        lr: learning rate, a float or a Tensor.
        curvature: the stiffness ``lambda``. Defaults to ``1.0`` (the paper's choice).
        rule: ``"paper"`` or ``"exact"``. Defaults to ``"paper"``.

    Example:
        >>> round(unclamped_critical_momentum(0.36), 6)
        -0.2
    """
    check_rule(rule)
    if isinstance(lr, Tensor):
        root = torch.sqrt(lr * curvature)
        if rule == "paper":
            return 1.0 - 2.0 * root
        return torch.clamp(1.0 - root, min=0.0) ** 2
    check_lr(lr)
    root_f = math.sqrt(lr * curvature)
    if rule == "paper":
        return 1.0 - 2.0 * root_f
    return max(1.0 - root_f, 0.0) ** 2


@overload
def critical_momentum(
    lr: float, curvature: float = ..., rule: str = ..., min_momentum: float = ..., max_momentum: float = ...
) -> float: ...
@overload
def critical_momentum(
    lr: Tensor, curvature: float = ..., rule: str = ..., min_momentum: float = ..., max_momentum: float = ...
) -> Tensor: ...
def critical_momentum(
    lr: float | Tensor,
    curvature: float = 1.0,
    rule: str = "paper",
    min_momentum: float = 0.0,
    max_momentum: float = 0.99,
) -> float | Tensor:
    """Momentum that puts the heavy-ball oscillator at critical damping, clamped.

    Args:
        lr: learning rate. A float returns a float; a Tensor returns a Tensor of the same shape, device and
            dtype, computed without a host sync (no validation: a NaN lr gives a NaN momentum).
        curvature: the stiffness ``lambda`` of the oscillator. Defaults to ``1.0``, the paper's
            "zero-parameter" choice.
        rule: ``"paper"`` for ``1 - 2*sqrt(curvature*lr)`` (continuous-time critical damping) or ``"exact"``
            for ``(1 - sqrt(curvature*lr))**2`` (repeated root of the discrete recursion). Defaults to
            ``"paper"``.
        min_momentum: lower clamp. Defaults to ``0.0``.
        max_momentum: upper clamp, below 1. Defaults to ``0.99``.

    Raises:
        ValueError: if a float ``lr`` is negative, NaN or infinite, if ``curvature`` is not a finite positive
            number, if ``rule`` is unknown, or unless ``0 <= min_momentum <= max_momentum < 1``.
        TypeError: if ``curvature`` or a bound is not a real number.

    Example:
        >>> round(critical_momentum(0.01), 6)
        0.8
        >>> round(critical_momentum(0.01, rule="exact"), 6)
        0.81
        >>> critical_momentum(1.0)
        0.0
        >>> critical_momentum(torch.tensor([0.0025, 0.25]))
        tensor([0.9000, 0.0000])
    """
    check_curvature(curvature)
    check_momentum_bounds(min_momentum, max_momentum)
    raw = unclamped_critical_momentum(lr, curvature, rule)
    if isinstance(raw, Tensor):
        return torch.clamp(raw, min=min_momentum, max=max_momentum)
    return min(max(raw, min_momentum), max_momentum)


@overload
def crossover_update(armed: bool, switched: bool, reached: bool) -> tuple[bool, bool]: ...
@overload
def crossover_update(armed: Tensor, switched: Tensor, reached: Tensor) -> tuple[Tensor, Tensor]: ...
def crossover_update(
    armed: bool | Tensor, switched: bool | Tensor, reached: bool | Tensor
) -> tuple[bool | Tensor, bool | Tensor]:
    """One step of the crossover switch of the hybrid schedule: ``(armed, switched)`` after this step.

    The switch arms on a step where the physics momentum is below the constant (``reached`` false) and fires on the
    first later step where it has reached it, so a warmup that *starts* above the constant does not fire it. Booleans
    give booleans; boolean Tensors give Tensors on the same device, with no host read (a compiled or CUDA-graph
    friendly update).

    Args:
        armed: whether a step below the constant has been seen.
        switched: whether the switch has fired.
        reached: whether the physics momentum of every active param group reaches the constant at this step.

    Example:
        >>> crossover_update(False, False, True)  # starts above: not armed, not switched
        (False, False)
        >>> crossover_update(True, False, True)
        (True, True)
        >>> crossover_update(torch.tensor(True), torch.tensor(False), torch.tensor(True))
        (tensor(True), tensor(True))
    """
    if isinstance(armed, Tensor) or isinstance(switched, Tensor) or isinstance(reached, Tensor):
        armed_t, switched_t, reached_t = (torch.as_tensor(v) for v in (armed, switched, reached))
        return armed_t | ~reached_t, switched_t | (armed_t & reached_t)
    return armed or not reached, switched or (armed and reached)
