"""Per-group gradient norms from one fused norm call (docs/method.md, section 3). Pure torch, no Lightning import.

Every grouped norm of the package goes through :func:`tensor_norms`, the one ``torch._foreach_norm`` call:
:func:`group_norms` (the norms of one step's groups), :func:`add_group_powers_` (the per-step half of a grouped norm
that is summed over steps, or over ranks for sharded gradients) and :func:`grouped_norms` (with per-tensor
non-finite masking).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: The entry of :func:`add_group_powers_`'s buffer of a group without tensors (sums of powers are >= 0).
ABSENT = -1.0
#: Norm types whose root and combination give the same bits on a batch of rows as on each row alone (``pow`` with
#: another exponent may round differently by position in a vectorised kernel): :func:`step_norms` loops over rows.
_BATCHABLE = (1.0, 2.0, math.inf)


def check_norm_type(norm_type: float) -> None:
    """Validate a norm order: a positive float, or ``inf``.

    Raises:
        TypeError: if ``norm_type`` is not a real number.
        ValueError: if ``norm_type`` is not positive (or is NaN).

    Example:
        >>> check_norm_type(0.0)
        Traceback (most recent call last):
        ...
        ValueError: `norm_type` must be > 0 or inf, got 0.0
    """
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"`norm_type` must be a float, got {type(norm_type).__name__}")
    if math.isnan(norm_type) or norm_type <= 0:
        raise ValueError(f"`norm_type` must be > 0 or inf, got {norm_type}")


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0, dtype: torch.dtype | None = None) -> Tensor:
    """The ``norm_type``-norm of each tensor as one 1-D tensor, from one ``torch._foreach_norm`` call.

    Nothing is copied to the host, so it is safe in a per-step hook.

    Args:
        tensors: the tensors (gradients), all on one device; must not be empty.
        norm_type: the norm order, ``> 0`` or ``inf``. Defaults to ``2.0``.
        dtype: dtype of the result; ``None`` keeps the norms' own (promoted) dtype. Defaults to ``None``.

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0], dtype=torch.float16)], dtype=torch.float32)
        tensor([5., 1.])
    """
    norms = list(torch._foreach_norm(list(tensors), norm_type))
    if dtype is not None and any(n.dtype != dtype for n in norms):
        norms = [n.to(dtype) for n in norms]
    return torch.stack(norms)


def group_norms(tensors: Sequence[Tensor], index: Tensor, n_groups: int, norm_type: float = 2.0) -> Tensor:
    """The float32 ``norm_type``-norm of each group of tensors (0 for a group no tensor maps to), without a host sync.

    A group's norm is the norm of the concatenation of its tensors. Non-finite values propagate (see
    :func:`grouped_norms` for a masked variant).

    Args:
        tensors: the tensors (gradients), on ``index``'s device; may be empty.
        index: int64 tensor of ``len(tensors)`` group indices in ``[0, n_groups)``.
        n_groups: number of groups.
        norm_type: the norm order, ``> 0`` or ``inf``. Defaults to ``2.0``.

    Example:
        >>> group_norms([torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0])], torch.tensor([0, 0, 1]), 3)
        tensor([5., 1., 0.])
    """
    out = torch.zeros(n_groups, dtype=torch.float32, device=index.device)
    if len(tensors) == 0:
        return out
    return root_group_powers(add_group_powers_(out, tensors, index, norm_type), norm_type)


def grouped_norms(
    tensors: Sequence[Tensor], index: Tensor, n_groups: int, norm_type: float = 2.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``norm_type``-norm of each group of tensors, with one ``_foreach_norm`` call and one segment reduction.

    A group's norm is the norm of the concatenation of its tensors: for finite ``p`` it is
    ``(sum_i ||t_i||_p ** p) ** (1/p)`` (for ``p=2`` the square root of the sum of squares), for ``inf`` the
    largest per-tensor norm. Nothing is copied to the host, so it is safe in a per-step hook.

    Args:
        tensors: the tensors (gradients), all on one device; may be empty.
        index: int64 tensor on the same device, ``index[i]`` is the group of ``tensors[i]``.
        n_groups: number of groups; groups no tensor maps to get norm 0 and ``present`` False.
        norm_type: the norm order, ``> 0`` or ``inf``. Defaults to ``2.0``.

    Returns:
        ``(norms, present, nonfinite)``, each of shape ``(n_groups,)``: the float32 norms (0 where a group is
        absent or non-finite, so they can be summed safely), whether a group had any tensor, and whether any of
        its tensors had a non-finite norm or the group's norm overflowed float32.

    Example:
        >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([1.0]), torch.tensor([float("inf")])]
        >>> norms, present, bad = grouped_norms(grads, torch.tensor([0, 1, 2]), 4)
        >>> norms.tolist(), present.tolist(), bad.tolist()
        ([5.0, 1.0, 0.0, 0.0], [True, True, True, False], [False, False, True, False])
    """
    if len(tensors) == 0:
        zeros = torch.zeros(n_groups)
        return zeros, zeros.bool(), zeros.bool()
    device = tensors[0].device
    per_tensor = tensor_norms(tensors, norm_type, torch.float32)
    finite = torch.isfinite(per_tensor)
    safe = torch.where(finite, per_tensor, torch.zeros_like(per_tensor))
    counts = torch.zeros(n_groups, device=device).index_add_(0, index, torch.ones_like(safe))
    bad = torch.zeros(n_groups, device=device).index_add_(0, index, (~finite).float())
    if math.isinf(norm_type):
        norms = torch.zeros(n_groups, device=device).scatter_reduce_(0, index, safe, "amax", include_self=True)
    else:
        powered = safe * safe if norm_type == 2.0 else safe.pow(norm_type)
        sums = torch.zeros(n_groups, device=device).index_add_(0, index, powered)
        norms = sums.sqrt() if norm_type == 2.0 else sums.pow(1.0 / norm_type)
    # A group of finite tensors can still overflow when their powers are summed (L2 beyond ~1.8e19 in float32).
    nonfinite = (bad > 0) | ~torch.isfinite(norms)
    norms = torch.where(nonfinite, torch.zeros_like(norms), norms)
    return norms, counts > 0, nonfinite


def add_group_powers_(
    out: Tensor, tensors: Sequence[Tensor], index: Tensor, norm_type: float = 2.0, weight: Tensor | None = None
) -> Tensor:
    """Reduce each tensor's norm into ``out[index[i]]`` in place: the per-step half of a grouped norm.

    With one ``_foreach_norm`` call and one segment reduction, ``out[g]`` gets the sum of the ``norm_type``-th powers
    of its tensors' norms (for ``inf``: the largest norm, with ``out[g]`` taking part in the max);
    :func:`root_group_powers` turns these into the group norms. Unlike :func:`grouped_norms` nothing is masked: a
    non-finite tensor norm, or a sum that overflows ``out``'s dtype, makes the group's entry inf or NaN. Entries no
    tensor maps to are left as they are, so a negative fill value marks groups without tensors. The norms are cast
    to ``out``'s dtype (float32 in :class:`~lightning_beta.callbacks.LayerAttributionCallback`) before the powers.

    Args:
        out: the buffer, on the tensors' device: zeros where a group's tensors are reduced.
        tensors: the tensors (gradients); must not be empty.
        index: int64 tensor on the same device, ``index[i]`` is the entry of ``out`` for ``tensors[i]``.
        norm_type: the norm order, ``> 0`` or ``inf``. Defaults to ``2.0``.
        weight: a factor per tensor multiplied into its power (ignored for ``inf``): ``1 / copies`` for a shard held
            by several ranks, so that a sum over ranks counts each element once. Defaults to ``None`` (all 1).

    Returns:
        ``out``.

    Example:
        >>> out = torch.tensor([0.0, 0.0, -1.0])
        >>> add_group_powers_(out, [torch.tensor([3.0, 4.0]), torch.tensor([2.0])], torch.tensor([0, 0]))
        tensor([29.,  0., -1.])
    """
    per_tensor = tensor_norms(tensors, norm_type)
    if per_tensor.dtype != out.dtype:
        per_tensor = per_tensor.to(out.dtype)
    if math.isinf(norm_type):
        return out.scatter_reduce_(0, index, per_tensor, "amax", include_self=True)
    powered = per_tensor * per_tensor if norm_type == 2.0 else per_tensor.pow(norm_type)
    if weight is not None:
        powered = powered * weight
    return out.index_add_(0, index, powered)


def root_group_powers(powers: Tensor, norm_type: float = 2.0) -> Tensor:
    """The group norms from the output of :func:`add_group_powers_`: the ``1/norm_type``-th root (for ``inf`` as is).

    Example:
        >>> root_group_powers(torch.tensor([25.0, 0.0]))
        tensor([5., 0.])
    """
    if math.isinf(norm_type):
        return powers
    return powers.sqrt() if norm_type == 2.0 else powers.pow(1.0 / norm_type)


def combine_norms(norms: Tensor, norm_type: float = 2.0, dim: int | None = None) -> Tensor:
    """The norm of a concatenation from the norms of its parts: a 0-d tensor, or reduced along ``dim`` if given.

    Example:
        >>> combine_norms(torch.tensor([3.0, 4.0])).item()
        5.0
        >>> combine_norms(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), dim=-1)
        tensor([5., 1.])
    """
    if dim is None:
        if math.isinf(norm_type):
            return norms.amax()
        if norm_type == 2.0:
            return (norms * norms).sum().sqrt()
        return norms.pow(norm_type).sum().pow(1.0 / norm_type)
    if math.isinf(norm_type):
        return norms.amax(dim)
    if norm_type == 2.0:
        return (norms * norms).sum(dim).sqrt()
    return norms.pow(norm_type).sum(dim).pow(1.0 / norm_type)


def step_norms(
    powers: Tensor, scale: Tensor, norm_type: float = 2.0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """Group and total norms of a batch of steps, from one row of :func:`add_group_powers_` output per step.

    Each row gives the same values as :func:`grouped_norms` then :func:`combine_norms` on that step alone (same
    rounding): a group is absent if its entry is :data:`ABSENT`, non-finite if its norm is inf or NaN (a non-finite
    gradient, or a float32 sum that overflowed); the others are valid and divided by the step's ``scale``. The total
    is the norm of the valid group norms in ``dtype``; it is non-finite if a group is or if it overflows.

    Args:
        powers: ``(steps, n_groups)`` sums of powers (for ``inf``: maxima), ``ABSENT`` where a group had no tensor.
        scale: ``(steps, 1)`` divisor of each step's norms (the AMP scale; 1 elsewhere).
        norm_type: the norm order, ``> 0`` or ``inf``. Defaults to ``2.0``.
        dtype: dtype of the values and of the total's computation. Defaults to ``torch.float64``.

    Returns:
        ``(values, valid, nonfinite)``, each ``(steps, n_groups + 1)`` with the total in the last column: the norms
        (0 where not valid, so they can be summed), whether each is valid, and whether each is non-finite.

    Example:
        >>> powers = torch.tensor([[25.0, ABSENT], [float("inf"), 4.0]])
        >>> values, valid, bad = step_norms(powers, torch.ones(2, 1))
        >>> values.tolist()
        [[5.0, 0.0, 5.0], [0.0, 2.0, 0.0]]
        >>> valid.tolist(), bad.tolist()
        ([[True, False, True], [False, True, False]], [[False, False, False], [True, False, True]])
    """
    absent = powers < 0
    norms = _by_row(lambda x: root_group_powers(x, norm_type), powers, norm_type)
    bad = ~absent & ~torch.isfinite(norms)
    valid = ~absent & ~bad
    norms = (torch.where(valid, norms, 0.0) / scale).to(dtype)
    # The total in ``dtype``: float32 group norms above ~1e19 would overflow when squared again.
    total = _by_row(lambda x: combine_norms(x, norm_type, dim=-1), norms, norm_type)
    total_bad = bad.any(1) | ~torch.isfinite(total)
    valid = torch.cat([valid, ((~absent).any(1) & ~total_bad)[:, None]], 1)
    # ``where``, not ``* valid``: a norm that overflowed when divided by the scale (inf) times 0 would be NaN.
    values = torch.where(valid, torch.cat([norms, total[:, None]], 1), 0.0)
    return values, valid, torch.cat([bad, total_bad[:, None]], 1)


def _by_row(fn: Callable[[Tensor], Tensor], rows: Tensor, norm_type: float) -> Tensor:
    if norm_type in _BATCHABLE:
        return fn(rows)
    return torch.cat([fn(row) for row in rows.split(1)])
