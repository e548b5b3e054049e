"""Private: read and write momentum on optimizer param groups, and name param groups in logs.

One place knows where each optimizer family keeps its momentum, so the callbacks agree on it:

- ``momentum`` (SGD, RMSprop): a float in ``param_group["momentum"]``;
- ``betas`` (Adam, AdamW, NAdam, RAdam, Adamax): ``param_group["betas"][0]``, the first-moment decay. ``betas[1]``
  is never touched.

Values stored as Tensors are updated in place with ``copy_`` so that captured/compiled optimizers keep their
references.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

MomentumSlot = Literal["momentum", "betas"]

#: Optimizer classes (and their subclasses) whose momentum the package can write.
MOMENTUM_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.SGD, torch.optim.RMSprop)
BETAS_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
)


def unwrap_optimizer(optimizer: Any) -> Any:
    """Follow ``.optimizer`` (and Lightning's ``._optimizer``) to the innermost torch optimizer."""
    seen = 0
    while not isinstance(optimizer, Optimizer) and seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer = inner
        seen += 1
    return optimizer


def momentum_slot(optimizer: Any) -> MomentumSlot | None:
    """Where a supported optimizer keeps its momentum, or ``None`` if the package cannot write it."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, BETAS_OPTIMIZERS):
        return "betas"
    if isinstance(inner, MOMENTUM_OPTIMIZERS):
        return "momentum"
    return None


def read_slot(group: dict[str, Any]) -> MomentumSlot | None:
    """Where a param group keeps its momentum, judged by its keys (for read-only use on any optimizer)."""
    if "betas" in group:
        return "betas"
    if "momentum" in group:
        return "momentum"
    return None


def read_momentum(group: dict[str, Any], slot: MomentumSlot) -> float | Tensor:
    """The momentum a param group holds now."""
    if slot == "betas":
        return group["betas"][0]
    return group["momentum"]


def write_momentum(group: dict[str, Any], slot: MomentumSlot, value: float | Tensor) -> None:
    """Write ``value`` as the group's momentum, in place when the group stores a Tensor."""
    current = read_momentum(group, slot)
    if isinstance(current, Tensor):
        with torch.no_grad():
            current.copy_(torch.as_tensor(value))
        return
    number = value.item() if isinstance(value, Tensor) else float(value)
    if slot == "betas":
        betas = group["betas"]
        group["betas"] = (number, *tuple(betas)[1:])
    else:
        group["momentum"] = number


def is_frozen_lr(lr: float | Tensor) -> bool:
    """Whether a param group's lr is exactly 0 (a frozen group, left alone by every callback).

    A CPU tensor lr is compared on the host; an lr tensor on an accelerator is never read (that would sync) and is
    treated as not frozen.
    """
    if isinstance(lr, Tensor):
        return lr.device.type == "cpu" and bool(lr == 0)
    return lr == 0


def effective_lr(group: dict[str, Any]) -> float | Tensor:
    """The step size of the heavy-ball reading of a param group: ``lr * (1 - dampening)``.

    SGD with ``dampening=d`` updates ``buf = mu*buf + (1 - d)*g``, which is heavy ball at ``lr*(1 - d)``; every other
    optimizer (and SGD without dampening) has ``dampening == 0``.

    Example:
        >>> effective_lr({"lr": 0.1, "dampening": 0.5})
        0.05
    """
    lr = group["lr"]
    dampening = group.get("dampening", 0) or 0
    if isinstance(dampening, Tensor) or dampening != 0:
        return lr * (1 - dampening)
    return lr


def as_float(value: float | Tensor) -> float:
    """A Python float of an lr or momentum (a host copy for a Tensor: logging steps only)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def optimizer_index(optimizers: list[Any], inner: Any) -> tuple[int, int]:
    """Index of ``inner`` among the Trainer's optimizers (compared unwrapped), and how many there are."""
    for idx, optimizer in enumerate(optimizers):
        if unwrap_optimizer(optimizer) is inner:
            return idx, len(optimizers)
    return 0, max(len(optimizers), 1)


def group_key(prefix: str, opt_idx: int, n_optimizers: int, group_idx: int, groups: list[dict[str, Any]]) -> str:
    """The log key of one param group, shared by every callback of the package.

    ``prefix`` alone for one optimizer with one group; ``prefix/<name or pgN>`` with several groups (``name`` is
    the param group's ``"name"`` entry when set); ``prefix/optK`` or ``prefix/optK/<name or pgN>`` with several
    optimizers.

    Example:
        >>> group_key("beta/momentum", 0, 1, 0, [{}])
        'beta/momentum'
        >>> group_key("beta/momentum", 0, 1, 1, [{}, {"name": "head"}])
        'beta/momentum/head'
        >>> group_key("beta/momentum", 1, 2, 0, [{}, {}])
        'beta/momentum/opt1/pg0'
    """
    parts = [prefix]
    if n_optimizers > 1:
        parts.append(f"opt{opt_idx}")
    if len(groups) > 1:
        name = groups[group_idx].get("name")
        parts.append(str(name) if name else f"pg{group_idx}")
    return "/".join(parts)
