"""Secant curvature of the loss per layer group, measured from consecutive optimizer steps (PAPER.md section 2).

The paper takes the stiffness ``lambda = 1``. The measured variant estimates it per layer group ``l`` from two
consecutive steps, ``lambda_hat_l = ||g_t - g_{t-1}||_l / ||theta_t - theta_{t-1}||_l`` (the secant of the
gradient along the last step), smoothed by an exponential moving average. Everything here is pure torch: the
norms come from ``torch._foreach_norm`` and one ``index_add_`` per call, the results stay on the device and no
value is read on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def check_decay(decay: float, name: str = "decay") -> None:
    """Raise unless the EMA ``decay`` is a real number in ``[0, 1)``; messages name the argument ``name``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(decay).__name__}")
    if not (0.0 <= decay < 1.0):
        raise ValueError(f"`{name}` must be in [0, 1), got {decay}")


def group_norms(tensors: Sequence[Tensor], index: Tensor, n_groups: int) -> Tensor:
    """L2 norm of each group of a flat list of tensors, without a host sync.

    Args:
        tensors: the tensors, e.g. the gradients of every parameter.
        index: int64 tensor of ``len(tensors)`` group indices in ``[0, n_groups)``, on the tensors' device.
        n_groups: number of groups.

    Returns:
        A float32 tensor of shape ``(n_groups,)``: ``sqrt(sum of squared entries)`` of each group's tensors (0 for
        a group with no tensor).

    Example:
        >>> group_norms([torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0])], torch.tensor([0, 0, 1]), 2)
        tensor([5., 1.])
    """
    device = index.device
    out = torch.zeros(n_groups, dtype=torch.float32, device=device)
    if len(tensors) == 0:
        return out
    norms = torch.stack([n.to(torch.float32) for n in torch._foreach_norm(list(tensors))])
    return out.index_add_(0, index, norms.square()).sqrt_()


def secant_curvature(grad_change: Tensor, step_size: Tensor, fallback: Tensor | None = None) -> Tensor:
    """The secant estimate ``lambda_hat = ||g_t - g_{t-1}|| / ||theta_t - theta_{t-1}||``, element-wise.

    Where the step is zero or the ratio is not finite (no movement, a frozen group, a NaN gradient) the result is
    ``fallback`` (the previous estimate), or NaN without one, so one bad step never poisons a moving average.

    Args:
        grad_change: norms ``||g_t - g_{t-1}||``, one per group.
        step_size: norms ``||theta_t - theta_{t-1}||``, one per group.
        fallback: value to keep where the ratio is undefined. Defaults to ``None`` (NaN there).

    Example:
        >>> secant_curvature(torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.0]))
        tensor([4., nan])
    """
    ratio = grad_change / step_size
    valid = torch.isfinite(ratio) & (step_size > 0)
    if fallback is None:
        fallback = torch.full_like(ratio, float("nan"))
    return torch.where(valid, ratio, fallback)


def ema_update_(average: Tensor, value: Tensor, decay: float, count: Tensor) -> Tensor:
    """Update an exponential moving average in place, starting from the first finite value of each element.

    ``average <- decay*average + (1 - decay)*value`` where ``value`` is finite and the element has been updated
    before; ``average <- value`` at an element's first finite value; unchanged where ``value`` is NaN or
    infinite. ``count`` (same shape, float) counts the finite values seen and is updated in place too.

    Args:
        average: the moving average, updated in place.
        value: the new values.
        decay: weight of the past, in ``[0, 1)``.
        count: number of finite values folded in so far, per element, updated in place.

    Returns:
        ``average``.

    Example:
        >>> avg, n = torch.zeros(2), torch.zeros(2)
        >>> _ = ema_update_(avg, torch.tensor([4.0, float("nan")]), 0.5, n)
        >>> ema_update_(avg, torch.tensor([2.0, 1.0]), 0.5, n)
        tensor([3., 1.])
    """
    check_decay(decay)
    finite = torch.isfinite(value)
    blended = torch.where(count > 0, decay * average + (1.0 - decay) * value, value)
    average.copy_(torch.where(finite, blended, average))
    count.add_(finite.to(count.dtype))
    return average


class SecantCurvature:
    """Per-layer-group secant curvature of a set of parameters, with one gradient-sized buffer.

    Call :meth:`before_step` once the gradients of step ``t`` are final and before the optimizer updates the
    parameters, and :meth:`after_step` right after the update (the gradients are still there). The first call
    measures ``||g_t - g_{t-1}||`` in a buffer that held ``g_{t-1}`` and then stores ``theta_t`` in it; the second
    measures ``||theta_{t+1} - theta_t||`` and stores ``g_t``. So the memory cost is one copy of the tracked
    parameters (in their dtype) plus a few scalars per group, and the work per step is two in-place subtractions,
    two copies and two ``_foreach_norm`` calls. Nothing is read on the host: :attr:`curvature` is a device tensor.

    A group's estimate needs two complete steps; a step where a tracked parameter has no gradient, or an update
    skipped between the two calls (e.g. by a GradScaler), restarts that group's pairing, and undefined ratios
    leave the average unchanged.

    Args:
        groups: group name to its parameters. Every parameter belongs to one group.
        decay: EMA weight of the past estimate, in ``[0, 1)``; 0 keeps the last secant. Defaults to ``0.9``.

    Raises:
        ValueError: if ``groups`` is empty, a group has no parameter, or ``decay`` is outside ``[0, 1)``.
        TypeError: if ``decay`` is not a real number.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> est = SecantCurvature({"w": [w]}, decay=0.0)
        >>> for _ in range(3):  # gradient descent on 0.5 * 4 * ||w||^2: the curvature is 4
        ...     w.grad = 4.0 * w.detach()
        ...     est.before_step()
        ...     with torch.no_grad():
        ...         w -= 0.1 * w.grad
        ...     est.after_step()
        >>> est.curvature
        tensor([4.])
    """

    def __init__(self, groups: Mapping[str, Sequence[Tensor]], decay: float = 0.9) -> None:
        check_decay(decay)
        if not groups:
            raise ValueError("`groups` must name at least one parameter group")
        self.names = list(groups)
        self.params: list[Tensor] = []
        members: list[int] = []
        for idx, (name, params) in enumerate(groups.items()):
            if len(params) == 0:
                raise ValueError(f"group {name!r} has no parameter")
            self.params.extend(params)
            members.extend([idx] * len(params))
        self.decay = float(decay)
        device = self.params[0].device
        self._index = torch.tensor(members, dtype=torch.long, device=device)
        self._members = members
        n = len(self.names)
        self._buffer = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._step_size = torch.zeros(n, dtype=torch.float32, device=device)
        self.curvature = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        self.count = torch.zeros(n, dtype=torch.float32, device=device)
        # Host-side phase per group: what the buffer holds ("grad", "theta" or None). Python state only.
        self._phase: list[str | None] = [None] * n
        # Device index and mask tensors per pattern of complete groups, built once (no host-to-device copy per step).
        self._patterns: dict[tuple[bool, ...], tuple[list[int], Tensor, Tensor]] = {}

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the gradient-sized buffer."""
        return sum(b.numel() * b.element_size() for b in self._buffer)

    def _complete_groups(self) -> list[bool]:
        complete = [True] * len(self.names)
        for param, group in zip(self.params, self._members):
            if param.grad is None:
                complete[group] = False
        return complete

    def _pattern(self, ok: list[bool]) -> tuple[list[int], Tensor, Tensor]:
        key = tuple(ok)
        if key not in self._patterns:
            idx = [i for i, group in enumerate(self._members) if ok[group]]
            device = self._index.device
            self._patterns[key] = (idx, self._index[idx], torch.tensor(key, dtype=torch.bool, device=device))
        return self._patterns[key]

    def _select(self, ok: list[bool]) -> tuple[list[int], list[Tensor], list[Tensor], list[Tensor]]:
        idx = self._pattern(ok)[0]
        return (
            idx,
            [self._buffer[i] for i in idx],
            [self.params[i].detach() for i in idx],
            [self.params[i].grad.detach() for i in idx],  # type: ignore[union-attr]
        )

    @torch.no_grad()
    def before_step(self) -> None:
        """Measure ``||g_t - g_{t-1}||``, fold the secant into the average, and keep ``theta_t``."""
        complete = self._complete_groups()
        measure = [c and phase == "grad" for c, phase in zip(complete, self._phase)]
        if any(measure):
            _, buf, _, grads = self._select(measure)
            _, index, mask = self._pattern(measure)
            torch._foreach_sub_(buf, grads)  # buffer <- g_{t-1} - g_t
            change = group_norms(buf, index, len(self.names))
            nan = torch.full_like(change, float("nan"))
            lam = torch.where(mask, secant_curvature(change, self._step_size), nan)
            ema_update_(self.curvature, lam, self.decay, self.count)
        idx, buf, params, _ = self._select(complete)
        if idx:
            torch._foreach_copy_(buf, params)
        self._phase = ["theta" if c else None for c in complete]

    @torch.no_grad()
    def after_step(self) -> None:
        """Measure ``||theta_{t+1} - theta_t||`` and keep ``g_t`` for the next step."""
        complete = self._complete_groups()
        ready = [c and phase == "theta" for c, phase in zip(complete, self._phase)]
        if any(ready):
            _, buf, params, grads = self._select(ready)
            _, index, mask = self._pattern(ready)
            torch._foreach_sub_(buf, params)  # buffer <- theta_t - theta_{t+1}
            step = group_norms(buf, index, len(self.names))
            self._step_size.copy_(torch.where(mask, step, self._step_size))
            torch._foreach_copy_(buf, grads)
        self._phase = ["grad" if r else None for r in ready]

    def state_dict(self) -> dict[str, object]:
        """The estimate (CPU tensors); the buffer is not saved, so the pairing restarts after a resume."""
        return {"names": list(self.names), "curvature": self.curvature.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the estimate of the groups whose names match."""
        names = list(state["names"])  # type: ignore[call-overload]
        curvature = torch.as_tensor(state["curvature"], dtype=torch.float32)
        count = torch.as_tensor(state["count"], dtype=torch.float32)
        for i, name in enumerate(self.names):
            if name in names:
                j = names.index(name)
                self.curvature[i] = curvature[j]
                self.count[i] = count[j]
