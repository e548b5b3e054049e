"""Secant curvature of the loss per layer group, measured from consecutive optimizer steps (docs/method.md, section 2).

The paper takes the stiffness ``lambda = 1``. The measured variant estimates it per layer group ``l`` from two
consecutive steps, ``lambda_hat_l = ||g_t - g_{t-1}||_l / ||theta_t - theta_{t-1}||_l`` (the secant of the
gradient along the last step), smoothed by an exponential moving average. Everything here is pure torch: the
norms come from ``torch._foreach_norm`` and one ``index_add_`` per call, the results stay on the device and no
value is read on the host. :func:`secant_layers` wires the estimators to a model's layer groups and its
optimizers' param groups, and :func:`layer_zeta` gives the damping ratio of each layer at its measured curvature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_beta._gradients import local_tensor
from lightning_beta._optim import effective_lr, read_momentum, read_slot
from lightning_beta.functional.damping import damping_ratio
from lightning_beta.functional.grad_norms import add_group_powers_


def check_decay(decay: float, name: str = "decay") -> None:
    """Raise unless the EMA ``decay`` is a real number in ``[0, 1)``; messages name the argument ``name``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(decay).__name__}")
    if not (0.0 <= decay < 1.0):
        raise ValueError(f"`{name}` must be in [0, 1), got {decay}")


def group_sq_sums(tensors: Sequence[Tensor], index: Tensor, n_groups: int) -> Tensor:
    """Sum of squared entries of each group of a flat list of tensors, without a host sync.

    Sums of shards add up to the sum of the whole tensor, so under a sharded strategy the ranks' sums are reduced
    (summed) before the square root. The powers come from the package's one grouped-norm routine,
    :func:`~lightning_beta.functional.grad_norms.add_group_powers_`.

    Args:
        tensors: the tensors, e.g. the gradients of every parameter.
        index: int64 tensor of ``len(tensors)`` group indices in ``[0, n_groups)``, on the tensors' device.
        n_groups: number of groups.

    Returns:
        A float32 tensor of shape ``(n_groups,)`` (0 for a group with no tensor).

    Example:
        >>> group_sq_sums([torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0])], torch.tensor([0, 0, 1]), 2)
        tensor([25.,  1.])
    """
    out = torch.zeros(n_groups, dtype=torch.float32, device=index.device)
    if len(tensors) == 0:
        return out
    return add_group_powers_(out, tensors, index, 2.0)


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
    """Per-layer-group secant curvature of a set of parameters, read at one point of each optimizer step.

    Call :meth:`observe` once per optimizer step, when the gradients are final and before the optimizer updates
    the parameters (Lightning's ``on_before_optimizer_step``: after the AMP unscale and before clipping). It reads
    the gradient ``g_t`` and the parameters ``theta_t`` together, measures ``||g_t - g_{t-1}||`` and
    ``||theta_t - theta_{t-1}||`` against the copies kept from the previous call, folds their ratio into the
    average and keeps ``g_t`` and ``theta_t``. Reading both at one point makes the gradient and the step of a pair
    belong to the same two iterates, whatever happens between (clipping, an optimizer that unscales inside its
    ``step()``). Memory: two copies of the tracked parameters (in their dtype) plus a few scalars per group; per
    call, two in-place subtractions, two copies and two ``_foreach_norm`` calls. Nothing is read on the host:
    :attr:`curvature` is a device tensor.

    With mini-batches, ``g_t`` and ``g_{t-1}`` come from different batches, so the secant also measures gradient
    noise divided by the step length: exact on a deterministic quadratic, biased upwards under SGD noise, the more
    so as the lr (and so the step) shrinks. Read it as a trend, not as the Hessian's spectrum.

    A group's estimate needs two consecutive readings with every gradient present; a step where a tracked
    parameter has no gradient restarts that group's pairing. A step skipped by a GradScaler (non-finite
    gradients, parameters unchanged) gives an undefined ratio on both of its pairs, which leaves the average
    unchanged.

    Sharded parameters (FSDP2 ``DTensor``): each rank reads its own shard, and the squared sums of the shards add
    up over ranks to those of the whole tensors. Given ``reduce`` (a sum over ranks), the per-step squared sums
    wait on the device and :meth:`flush` reduces them all in one collective and folds them into the average in
    step order; every rank must call :meth:`observe` and :meth:`flush` at the same steps. Without ``reduce`` each
    reading is folded at once.

    Args:
        groups: group name to its parameters. Every parameter belongs to one group.
        decay: EMA weight of the past estimate, in ``[0, 1)``; 0 keeps the last secant. Defaults to ``0.9``.
        reduce: sums a tensor over the ranks that hold the shards (e.g. ``strategy.reduce(t, reduce_op="sum")``),
            for sharded parameters. Defaults to ``None`` (whole tensors: no reduction).

    Raises:
        ValueError: if ``groups`` is empty, a group has no parameter, or ``decay`` is outside ``[0, 1)``.
        TypeError: if ``decay`` is not a real number.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> est = SecantCurvature({"w": [w]}, decay=0.0)
        >>> for _ in range(3):  # gradient descent on 0.5 * 4 * ||w||^2: the curvature is 4
        ...     w.grad = 4.0 * w.detach()
        ...     est.observe()
        ...     with torch.no_grad():
        ...         w -= 0.1 * w.grad
        >>> est.curvature
        tensor([4.])
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[Tensor]],
        decay: float = 0.9,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
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
        self._reduce = reduce
        locals_ = [local_tensor(p.detach()) for p in self.params]
        device = locals_[0].device
        self._index = torch.tensor(members, dtype=torch.long, device=device)
        self._members = members
        n = len(self.names)
        self._grads = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in locals_]
        self._thetas = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in locals_]
        # Sharded: squared sums (change, step) per reading, waiting for one reduction at `flush`.
        self._waiting = torch.empty((8, 2, n), dtype=torch.float32, device=device)
        self._n_waiting = 0
        self.curvature = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        self.count = torch.zeros(n, dtype=torch.float32, device=device)
        # Host-side: whether the buffers hold the previous reading of each group. Python state only.
        self._paired: list[bool] = [False] * n
        # Device index and mask tensors per pattern of complete groups, built once (no host-to-device copy per step).
        self._patterns: dict[tuple[bool, ...], tuple[list[int], Tensor, Tensor]] = {}

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the two parameter-sized buffers (previous gradient and previous parameters)."""
        return sum(b.numel() * b.element_size() for b in (*self._grads, *self._thetas))

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

    @torch.no_grad()
    def observe(self, scale: Tensor | None = None) -> None:
        """Read this step's gradients and parameters: measure the secant against the last reading, keep this one.

        Args:
            scale: a loss scale still multiplied into the gradients (a fused optimizer under fp16 AMP), as a
                device tensor; the gradients are divided by it on the device. Defaults to ``None`` (unscaled).
        """
        complete = self._complete_groups()
        measure = [c and p for c, p in zip(complete, self._paired)]
        n = len(self.names)
        squares: Tensor | None = None
        if any(measure):
            idx, index, mask = self._pattern(measure)
            grads_prev = [self._grads[i] for i in idx]
            thetas_prev = [self._thetas[i] for i in idx]
            if scale is not None:
                torch._foreach_mul_(grads_prev, scale)  # back to the units of this step's scaled gradients
            torch._foreach_sub_(grads_prev, self._local_grads(idx))  # (scale *) (g_{t-1} - g_t)
            change = group_sq_sums(grads_prev, index, n)
            if scale is not None:
                change = change / scale.square()
            torch._foreach_sub_(thetas_prev, self._local_params(idx))  # theta_{t-1} - theta_t
            squares = torch.where(mask, torch.stack([change, group_sq_sums(thetas_prev, index, n)]), float("nan"))
        if self._reduce is None:
            if squares is not None:
                self._fold(squares)
        else:
            # A row for every reading, measured or not, so that every rank reduces the same shape.
            self._wait(squares if squares is not None else torch.full((2, n), float("nan"), device=self._index.device))
        idx = self._pattern(complete)[0]
        if idx:
            grads_now = [self._grads[i] for i in idx]
            torch._foreach_copy_(grads_now, self._local_grads(idx))
            if scale is not None:
                torch._foreach_div_(grads_now, scale)
            torch._foreach_copy_([self._thetas[i] for i in idx], self._local_params(idx))
        self._paired = complete

    def _local_grads(self, idx: list[int]) -> list[Tensor]:
        return [local_tensor(self.params[i].grad.detach()) for i in idx]  # type: ignore[union-attr]

    def _local_params(self, idx: list[int]) -> list[Tensor]:
        return [local_tensor(self.params[i].detach()) for i in idx]

    def _fold(self, squares: Tensor) -> None:
        """Fold one reading's squared sums ``(2, n_groups)`` (NaN where not measured) into the average."""
        lam = secant_curvature(squares[0].sqrt(), squares[1].sqrt())
        ema_update_(self.curvature, lam, self.decay, self.count)

    def _wait(self, squares: Tensor) -> None:
        if self._n_waiting == self._waiting.shape[0]:
            grown = torch.empty(
                (2 * self._n_waiting, *self._waiting.shape[1:]), dtype=torch.float32, device=self._waiting.device
            )
            grown[: self._n_waiting].copy_(self._waiting)
            self._waiting = grown
        self._waiting[self._n_waiting].copy_(squares)
        self._n_waiting += 1

    @torch.no_grad()
    def flush(self) -> None:
        """Reduce the waiting squared sums over the ranks (one collective) and fold them in, in step order.

        A no-op without ``reduce`` or with nothing waiting. Under sharding, every rank calls it at the same step.
        """
        if self._reduce is None or self._n_waiting == 0:
            return
        summed = self._reduce(self._waiting[: self._n_waiting].clone())
        for row in summed:
            self._fold(row)
        self._n_waiting = 0

    def state_dict(self) -> dict[str, object]:
        """The estimate (CPU tensors); the buffers are not saved, so the pairing restarts after a resume."""
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


def secant_layers(
    layers: Mapping[str, Sequence[str]],
    named_parameters: Mapping[str, Tensor],
    param_groups: Sequence[Sequence[Mapping[str, Any]]],
    decay: float = 0.9,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[int, tuple[SecantCurvature, list[int]]]:
    """One :class:`SecantCurvature` per optimizer over the layer groups whose trainable parameters it holds.

    A layer group is measured by the first optimizer that holds one of its trainable parameters, and its
    curvature belongs to the param group holding its first such parameter.

    Args:
        layers: layer group name to parameter names (see :func:`~lightning_beta.layer_groups.group_parameters`).
        named_parameters: parameter name to parameter.
        param_groups: each optimizer's ``param_groups``.
        decay: EMA weight of the past estimate. Defaults to ``0.9``.
        reduce: the sum over ranks of sharded parameters (see :class:`SecantCurvature`). Defaults to ``None``.

    Returns:
        Optimizer index to ``(estimator, param group index of each of its layer groups)``; optimizers holding no
        layer group are left out.

    Example:
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        >>> groups = [[{"params": [a]}, {"params": [b]}]]
        >>> est, owner = secant_layers({"a": ["a"], "b": ["b"]}, {"a": a, "b": b}, groups)[0]
        >>> est.names, owner
        (['a', 'b'], [0, 1])
    """
    taken: set[str] = set()
    out: dict[int, tuple[SecantCurvature, list[int]]] = {}
    for opt_idx, groups in enumerate(param_groups):
        owner = {id(p): group_idx for group_idx, group in enumerate(groups) for p in group["params"]}
        chosen: dict[str, list[Tensor]] = {}
        group_of: list[int] = []
        for layer, names in layers.items():
            params = [
                named_parameters[n]
                for n in names
                if named_parameters[n].requires_grad and id(named_parameters[n]) in owner
            ]
            if params and layer not in taken:
                taken.add(layer)
                chosen[layer] = params
                group_of.append(owner[id(params[0])])
        if chosen:
            out[opt_idx] = (SecantCurvature(chosen, decay, reduce), group_of)
    return out


def layer_zeta(
    momentum: float | Tensor, lr: float | Tensor, curvature: float | Tensor, rule: str = "paper"
) -> float | Tensor:
    """The damping ratio of a layer at its measured curvature: ``zeta`` at step size ``lr * curvature``.

    Args:
        momentum: the param group's momentum.
        lr: the param group's heavy-ball step size (``lr * (1 - dampening)``).
        curvature: the layer's measured curvature, positive.
        rule: ``"paper"`` or ``"exact"``. Defaults to ``"paper"``.

    Example:
        >>> round(layer_zeta(0.9, 0.01, 4.0), 6)
        0.25
    """
    if isinstance(curvature, Tensor) and not isinstance(lr, Tensor):
        lr = torch.as_tensor(lr, dtype=curvature.dtype, device=curvature.device)
    return damping_ratio(momentum, lr * curvature, 1.0, rule)


def layer_metrics(
    estimator: SecantCurvature, group_of: Sequence[int], param_groups: Sequence[Mapping[str, Any]], rule: str = "paper"
) -> dict[str, float]:
    """The log keys of the measured layers: ``damping/curvature/<layer>`` and ``damping/layer_zeta/<layer>``.

    Copies the estimates to the host once (for logging steps). Layers not measured yet are left out; a layer's
    ``zeta`` uses the heavy-ball step size and the momentum of the param group ``group_of`` names.

    Args:
        estimator: the layers' estimator.
        group_of: the param group index of each of its layers.
        param_groups: the optimizer's ``param_groups``.
        rule: ``"paper"`` or ``"exact"``. Defaults to ``"paper"``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> est = SecantCurvature({"w": [w]})
        >>> est.curvature.fill_(4.0)
        tensor([4.])
        >>> metrics = layer_metrics(est, [0], [{"params": [w], "lr": 0.01, "momentum": 0.9}])
        >>> {key: round(value, 6) for key, value in metrics.items()}
        {'damping/curvature/w': 4.0, 'damping/layer_zeta/w': 0.25}
    """
    metrics: dict[str, float] = {}
    for layer, lam, group_idx in zip(estimator.names, estimator.curvature.tolist(), group_of):
        if math.isnan(lam):
            continue
        metrics[f"damping/curvature/{layer}"] = lam
        group = param_groups[group_idx]
        slot = read_slot(dict(group))
        lr = _host(effective_lr(dict(group)))
        if slot is None or lr == 0 or lam <= 0:
            continue
        momentum = _host(read_momentum(dict(group), slot))
        metrics[f"damping/layer_zeta/{layer}"] = float(layer_zeta(momentum, lr, lam, rule))
    return metrics


def _host(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def merged_state(estimators: Sequence[SecantCurvature]) -> dict[str, object] | None:
    """One state for several estimators over distinct layer groups (``None`` for none); each loads its own part.

    Example:
        >>> a, b = SecantCurvature({"a": [torch.ones(1)]}), SecantCurvature({"b": [torch.ones(1)]})
        >>> merged_state([a, b])["names"]
        ['a', 'b']
    """
    if not estimators:
        return None
    states = [estimator.state_dict() for estimator in estimators]
    return {
        "names": [n for s in states for n in s["names"]],  # type: ignore[attr-defined]
        "curvature": torch.cat([s["curvature"] for s in states]),  # type: ignore[misc]
        "count": torch.cat([s["count"] for s in states]),  # type: ignore[misc]
    }
