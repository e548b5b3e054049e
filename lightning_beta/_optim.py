"""Private: read and write momentum on optimizer param groups; the optimizer registry; param-group log keys.

One place knows where each optimizer family keeps its momentum, so the callbacks agree on it:

- ``momentum`` (SGD, RMSprop): ``param_group["momentum"]``;
- ``betas`` (Adam, AdamW, NAdam, RAdam, Adamax): ``param_group["betas"][0]``, the first-moment decay. ``betas[1]``
  is never touched.

Other optimizers are added with :func:`register_momentum`, only where the heavy-ball reading holds (the update
follows a buffer ``buf = mu*buf + c*g``). Lion (its betas interpolate the update *direction*), LAMB, LARS and
Adafactor are refused by name with a message that names :func:`register_momentum`.

Values stored as Tensors are updated in place (``copy_``/``fill_``) so that captured/compiled optimizers keep their
references.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

MomentumSlot = Literal["momentum", "betas"]
SLOTS: tuple[str, ...] = ("momentum", "betas")

#: Optimizer classes (and their subclasses) whose momentum the package writes out of the box.
MOMENTUM_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.SGD, torch.optim.RMSprop)
BETAS_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
)

_REGISTRY: dict[type, MomentumSlot] = {
    **{cls: "momentum" for cls in MOMENTUM_OPTIMIZERS},
    **{cls: "betas" for cls in BETAS_OPTIMIZERS},
}

#: Optimizers whose ``betas``/``momentum`` are not the decay of a heavy-ball buffer, by class name (timm, torch,
#: lion-pytorch, apex and others name them so), with the reason given when they are refused.
NOT_HEAVY_BALL: dict[str, str] = {
    "Lion": "its betas interpolate the update direction (sign of a mix of buffer and gradient), not a heavy-ball"
    " buffer",
    "Lamb": "its update is rescaled per layer by a trust ratio",
    "LAMB": "its update is rescaled per layer by a trust ratio",
    "FusedLAMB": "its update is rescaled per layer by a trust ratio",
    "Lars": "its update is rescaled per layer by a trust ratio",
    "LARS": "its update is rescaled per layer by a trust ratio",
    "Adafactor": "its first moment is optional and its update is clipped and rescaled by the parameter scale",
}


def register_momentum(optimizer_cls: type, slot: MomentumSlot) -> None:
    """Declare where an optimizer class (and its subclasses) keeps the momentum the callbacks may write.

    Register only an optimizer whose update follows a heavy-ball buffer ``buf = mu*buf + c*g`` with ``mu`` in
    ``slot``: ``"momentum"`` for ``param_group["momentum"]`` (a float or a Tensor), ``"betas"`` for
    ``param_group["betas"][0]`` (``betas[1]`` is never touched). A registration overrides the built-in entries and
    the refusals (Lion, LAMB, LARS, Adafactor) for that class.

    Args:
        optimizer_cls: the optimizer class.
        slot: ``"momentum"`` or ``"betas"``.

    Raises:
        TypeError: if ``optimizer_cls`` is not a class.
        ValueError: if ``slot`` is neither ``"momentum"`` nor ``"betas"``.

    Example:
        >>> import torch
        >>> class MyHeavyBall(torch.optim.SGD):
        ...     pass
        >>> register_momentum(MyHeavyBall, slot="momentum")
        >>> momentum_slot(MyHeavyBall([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
        'momentum'
    """
    if not isinstance(optimizer_cls, type):
        raise TypeError(f"`optimizer_cls` must be an optimizer class, got {type(optimizer_cls).__name__}")
    if slot not in SLOTS:
        raise ValueError(f'`slot` must be "momentum" or "betas", got {slot!r}')
    _REGISTRY[optimizer_cls] = slot


def unwrap_optimizer(optimizer: Any) -> Any:
    """Follow ``.optimizer``, Lightning's ``._optimizer`` and ``.base_optimizer`` (timm's Lookahead, SAM) inward.

    ``._base_optimizer`` (newer timm Lookahead) is followed too.

    Example:
        >>> import torch
        >>> inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> class Lookahead:
        ...     def __init__(self, base_optimizer):
        ...         self.base_optimizer = base_optimizer
        >>> unwrap_optimizer(Lookahead(inner)) is inner
        True
    """
    seen = 0
    while seen < 8:
        if isinstance(optimizer, Optimizer) and _registered_slot(type(optimizer)) is not None:
            break  # a registered class is the one whose groups are written, even if it wraps another
        inner = None
        for name in ("optimizer", "_optimizer", "base_optimizer", "_base_optimizer"):
            candidate = getattr(optimizer, name, None)
            if candidate is not None and candidate is not optimizer:
                inner = candidate
                break
        if inner is None:
            break
        optimizer = inner
        seen += 1
    return optimizer


def _registered_slot(cls: type) -> MomentumSlot | None:
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    return None


def momentum_slot(optimizer: Any) -> MomentumSlot | None:
    """Where a registered optimizer keeps its momentum, or ``None`` if the package may not write it."""
    return _registered_slot(type(unwrap_optimizer(optimizer)))


def refusal_reason(optimizer: Any) -> str | None:
    """Why an unregistered optimizer's momentum is not written, when it has a ``betas``/``momentum`` entry.

    ``None`` for a registered optimizer and for one with neither entry (it has no momentum to write).
    """
    inner = unwrap_optimizer(optimizer)
    if momentum_slot(inner) is not None:
        return None
    for cls in type(inner).__mro__:
        if cls.__name__ in NOT_HEAVY_BALL:
            return NOT_HEAVY_BALL[cls.__name__]
    groups = getattr(inner, "param_groups", [])
    if any(read_slot(group) is not None for group in groups):
        return "the package does not know whether its momentum entry is heavy-ball momentum"
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
    """Write ``value`` as the group's momentum, in place when the group stores a Tensor.

    A Tensor value into a Tensor slot, or a float into either, costs no host sync. A Tensor value into a float slot
    is copied to the host (``.item()``): a sync per call on an accelerator; store the momentum or betas as Tensors
    to avoid it.
    """
    current = read_momentum(group, slot)
    if isinstance(current, Tensor):
        with torch.no_grad():
            if isinstance(value, Tensor):
                current.copy_(value)
            else:
                current.fill_(value)
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
    treated as not frozen. :func:`frozen_mask` is the comparison that reads nothing.
    """
    if isinstance(lr, Tensor):
        return lr.device.type == "cpu" and bool(lr == 0)
    return lr == 0


def frozen_mask(lr: float | Tensor) -> bool | Tensor:
    """``lr == 0`` without a host read: a bool for a float lr, a boolean Tensor on the lr's device for a Tensor.

    Example:
        >>> frozen_mask(0.0), frozen_mask(torch.tensor(0.1))
        (True, tensor(False))
    """
    if isinstance(lr, Tensor):
        return lr == 0
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


def fit_group_counts(optimizers: list[Any]) -> list[int]:
    """How many param groups each optimizer has now: record it at fit start and pass it to :func:`group_key`.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> fit_group_counts([opt])
        [1]
    """
    return [len(unwrap_optimizer(optimizer).param_groups) for optimizer in optimizers]


def group_key(
    prefix: str,
    opt_idx: int,
    n_optimizers: int,
    group_idx: int,
    groups: list[dict[str, Any]],
    n_fit_groups: int | None = None,
) -> str:
    """The log key of one param group, shared by every callback of the package.

    ``prefix`` alone for one optimizer with one group; ``prefix/<name or pgN>`` with several groups (``name`` is
    the param group's ``"name"`` entry when set); ``prefix/optK`` or ``prefix/optK/<name or pgN>`` with several
    optimizers.

    The keys stay the same for a whole fit when ``n_fit_groups`` (the optimizer's group count at fit start, see
    :func:`fit_group_counts`) is given: the groups present at fit start are named as if no group had been added, and
    a group added mid-run (``BackboneFinetuning``, ``optimizer.add_param_group``) always gets its own suffix. Without
    it the count is ``len(groups)``, the count now.

    Example:
        >>> group_key("beta/momentum", 0, 1, 0, [{}])
        'beta/momentum'
        >>> group_key("beta/momentum", 0, 1, 1, [{}, {"name": "head"}])
        'beta/momentum/head'
        >>> group_key("beta/momentum", 1, 2, 0, [{}, {}])
        'beta/momentum/opt1/pg0'
        >>> group_key("beta/momentum", 0, 1, 0, [{}, {}], n_fit_groups=1)
        'beta/momentum'
        >>> group_key("beta/momentum", 0, 1, 1, [{}, {}], n_fit_groups=1)
        'beta/momentum/pg1'
    """
    n_groups = len(groups) if n_fit_groups is None else n_fit_groups
    parts = [prefix]
    if n_optimizers > 1:
        parts.append(f"opt{opt_idx}")
    if n_groups > 1 or group_idx >= n_groups:
        name = groups[group_idx].get("name")
        parts.append(str(name) if name else f"pg{group_idx}")
    return "/".join(parts)
