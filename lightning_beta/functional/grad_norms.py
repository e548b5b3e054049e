"""Per-group gradient norms from one fused norm call (PAPER.md section 3). Pure torch, no Lightning import."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


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
    per_tensor = torch.stack(torch._foreach_norm(list(tensors), norm_type)).float()
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


def combine_norms(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of a concatenation from the norms of its parts (0-d tensor).

    Example:
        >>> combine_norms(torch.tensor([3.0, 4.0])).item()
        5.0
    """
    if math.isinf(norm_type):
        return norms.amax()
    if norm_type == 2.0:
        return (norms * norms).sum().sqrt()
    return norms.pow(norm_type).sum().pow(1.0 / norm_type)
