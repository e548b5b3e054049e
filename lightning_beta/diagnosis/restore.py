"""Treat, ``policy="restore"``: fit a flagged group back to the function the probe recorded for it.

Ours, not the paper's. The other policies retrain a flagged group on the task loss, so they relearn what the
group did from the labels, through every group after it. When the healthy model left a probe record (its
groups' sketched outputs on a fixed set of inputs, :func:`~lightning_beta.probe.record_probe`), the lost function
is known on those inputs, and the group can be fitted back to it directly:

1. run the model being treated on the probe inputs and capture what the flagged group's module receives (the
   groups before it are the healthy ones: that is what the localizer said);
2. minimise the relative squared sketch error ``||S(theta) - S_ref||^2 / ||S_ref||^2`` over the group's own
   parameters only, where ``S(theta)`` is the group's output on the captured inputs times the record's fixed
   projection, with L-BFGS (strong-Wolfe line search, full batch: the probe set is a few hundred samples);
3. several flagged groups are restored one after the other in forward order, each on inputs captured after the
   previous ones were restored.

Everything runs in eval mode (BatchNorm uses its running statistics, which are buffers and are not changed), on a
copy of the model; no label and no training batch is read. The report is the relative error
``||S - S_ref||_F / ||S_ref||_F`` of each group before and after (``probe_error``): a group whose error stays high
was not brought back to its recorded function, and :func:`~lightning_beta.diagnosis.diagnose` then continues with
the search policy from the restored weights.

What it needs: a sketch at least as wide as the information it must pin down. A sketch of ``k`` numbers per
sample on ``N`` probes gives ``N * k`` equations; with fewer than the group's parameters, or a sketch narrower than
a dense layer's output, the fit is underdetermined and matches the probe without restoring the function. The
measured effect of ``sketch_dim`` is in ``benchmarks/RESULTS.md``, section "Repair".

Cost: ``max_iter`` L-BFGS iterations, each one forward and backward of the group alone on the probe set plus line
search evaluations; memory: the group's captured inputs, its projection (output width times ``sketch_dim``
floats) and ``history_size`` copies of its parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_beta._checks import check_int, check_number
from lightning_beta._probe_inputs import storable, to_device
from lightning_beta.diagnosis._batches import check_group_names
from lightning_beta.diagnosis.probe import match_record
from lightning_beta.diagnosis.treat import SurgeryResult, surgical_correction
from lightning_beta.layer_groups import group_sizes
from lightning_beta.probe import ProbeRecord, check_forward, model_device, projection, run_probe
from lightning_beta.reference import Forward, default_forward, output_tensor

__all__ = ["restore_from_probe", "restore_or_retrain"]

#: Relative sketch error above which a group counts as not restored.
RESTORED_ERROR = 0.5

Call = tuple[tuple[Any, ...], dict[str, Any]]
Output = Callable[[], Tensor]

#: L-BFGS iterations between two checks of the tolerance.
_CHUNK = 5


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the group's output is seen."""


def _group_output(
    model: nn.Module, name: str, module: nn.Module, record: ProbeRecord, forward: Forward | None
) -> tuple[Output, Tensor | None]:
    """The group's output on the probe inputs as a function, and the input of a plain Linear group.

    The function's result carries the graph to the group's own parameters; the Linear input is for
    :func:`_solve_linear` (``None`` for any other group).

    When what the module receives can be kept (tensors and plain values) it is captured once and the module alone
    is rerun on it; otherwise (a key-value cache object, which a rerun would extend) every call runs the model on
    the probe inputs up to the group and stops there.
    """
    device = model_device(model)
    capture = run_probe(model, record.inputs, {name: module}, lambda _, out: out[:0], True, forward)
    if name not in capture.arguments:
        raise ValueError(f"group {name!r}: {capture.reasons.get(name, 'its module did not run on the probe inputs')}")
    if storable(capture.arguments[name]):
        args, kwargs = to_device(capture.arguments[name], device)
        return (lambda: _floating(module(*args, **kwargs))), _linear_input(module, args, kwargs)
    inputs = to_device(record.inputs, device)

    def through_model() -> Tensor:
        seen: list[Tensor] = []

        def hook(_: nn.Module, __: Any, output: Any) -> None:
            seen.append(_floating(output))
            raise _Stop

        handle = module.register_forward_hook(hook)
        try:
            (forward or default_forward)(model, inputs)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0]

    return through_model, None


def _linear_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The ``(N, in_features)`` input of a plain ``nn.Linear`` group, whose fit has a closed form; else ``None``."""
    if type(module) is not nn.Linear or kwargs or len(args) != 1:
        return None
    x = args[0]
    return x if isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point() else None


def _solve_linear(module: nn.Linear, x: Tensor, output: Output, proj: Tensor, ref: Tensor) -> dict[str, Any]:
    """The least-squares fit of a Linear group: ``[W^T; b] = X^+ S_ref R^+`` with ``X = [x, 1]`` (float64).

    The minimum-norm minimiser of ``||X [W^T; b] R - S_ref||_F``; exact when ``X`` has full column rank and the
    sketch is at least as wide as the layer's output. Kept only if it lowers the sketch error.
    """
    with torch.no_grad():
        before = float(_sketch_error(output, proj, ref))
        saved = [module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()]
        design = x.double()
        if module.bias is not None:
            design = torch.cat([design, design.new_ones(design.shape[0], 1)], dim=1)
        theta = torch.linalg.pinv(design) @ ref.double() @ torch.linalg.pinv(proj.double())
        module.weight.copy_(theta[: x.shape[1]].T.to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_(theta[x.shape[1]].to(module.bias.dtype))
        after = float(_sketch_error(output, proj, ref))
        kept = math.isfinite(after) and after <= before
        if not kept:
            module.weight.copy_(saved[0])
            if module.bias is not None and saved[1] is not None:
                module.bias.copy_(saved[1])
            after = before
    return {
        "method": "least squares",
        "optimizer_steps": 0,
        "evaluations": 2,
        "probe_error": {"input": math.sqrt(before), "final": math.sqrt(after)},
        "kept": kept,
    }


def _floating(output: Any) -> Tensor:
    out = output_tensor(output)
    if out is None:
        raise ValueError("the group's module gave no floating-point output")
    return out


def _sketch_error(output: Output, proj: Tensor, ref: Tensor) -> Tensor:
    """``||S - S_ref||^2 / ||S_ref||^2`` of the group's output."""
    out = output()
    sketch = out.reshape(out.shape[0], -1).to(proj.dtype) @ proj
    return (sketch - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(torch.finfo(ref.dtype).tiny)


def _fit(
    params: Sequence[Tensor],
    output: Output,
    proj: Tensor,
    ref: Tensor,
    max_iter: int,
    history_size: int,
    tolerance: float,
) -> dict[str, Any]:
    """L-BFGS on ``params`` until ``max_iter`` iterations or a relative error below ``tolerance``.

    A fit that ends worse than it began (or non-finite) leaves them as they came.
    """
    with torch.no_grad():
        before = float(_sketch_error(output, proj, ref))
        saved = [p.detach().clone() for p in params]
    evaluations, last = 0, before
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=_CHUNK,
        history_size=history_size,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        nonlocal evaluations, last
        evaluations += 1
        optimizer.zero_grad()
        loss = _sketch_error(output, proj, ref)
        loss.backward()
        last = float(loss.detach())
        return loss

    iterations = 0
    while params and iterations < max_iter and math.sqrt(last) >= tolerance:
        # The optimizer's state (its history) carries over from one chunk of iterations to the next.
        optimizer.param_groups[0]["max_iter"] = min(_CHUNK, max_iter - iterations)
        optimizer.step(closure)
        done = int(optimizer.state[params[0]].get("n_iter", 0))
        if done == iterations or not math.isfinite(last):  # converged (no progress possible) or diverged
            break
        iterations = done
    for p in params:
        p.grad = None
    with torch.no_grad():
        after = float(_sketch_error(output, proj, ref))
        kept = math.isfinite(after) and after <= before
        if not kept:
            for p, value in zip(params, saved):
                p.copy_(value)
            after = before
    return {
        "method": "L-BFGS",
        "optimizer_steps": iterations,
        "evaluations": evaluations,
        "probe_error": {"input": math.sqrt(before), "final": math.sqrt(after)},
        "kept": kept,
    }


def restore_from_probe(
    model: nn.Module,
    layers: Sequence[str],
    record: ProbeRecord,
    max_iter: int = 40,
    history_size: int = 20,
    tolerance: float = 0.0,
    forward: Forward | None = None,
) -> SurgeryResult:
    """Fit each of ``layers`` of a copy of ``model`` back to its recorded probe output (see the module docstring).

    Args:
        model: the model to treat; not modified.
        layers: the groups to restore (names of ``record.group_by`` groups that the record holds).
        record: the probe record of the healthy model.
        max_iter: L-BFGS iterations per group, ``>= 1``. Defaults to ``40``.
        history_size: L-BFGS history, ``>= 1``. Defaults to ``20``.
        tolerance: a group's fit stops once its relative sketch error is below this, ``>= 0`` (checked every
            five iterations). Defaults to ``0.0``.
        forward: ``forward(model, inputs)`` runs the model on the probe inputs, as when the record was made.
            Defaults to ``None`` (:func:`~lightning_beta.reference.default_forward`).

    Returns:
        The result, with ``policy="restore"``; ``optimizer_steps`` counts L-BFGS iterations and ``stages`` holds one
        dict per group: ``stage``, ``groups``, ``method`` (``"least squares"`` for a plain Linear, else
        ``"L-BFGS"``), ``optimizer_steps``, ``evaluations``, ``wall_time_s``, ``n_params``, ``kept`` (whether
        the fit was kept: one ending worse than it began is undone) and ``probe_error`` ``{"input", "final"}``
        (relative sketch errors, not squared).

    Raises:
        ValueError: for a group the record does not hold or the model does not have as one module.

    Example:
        >>> from lightning_beta.probe import record_probe
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> record = record_probe(net, torch.randn(64, 4), sketch_dim=8)
        >>> broken = copy.deepcopy(net)
        >>> _ = broken[2].weight.data.mul_(3.0)
        >>> result = restore_from_probe(broken, ["2"], record)
        >>> result.stages[0]["probe_error"]["input"] > 1.0, result.stages[0]["probe_error"]["final"] < 1e-2
        (True, True)
    """
    check_int("max_iter", max_iter, minimum=1)
    check_int("history_size", history_size, minimum=1)
    check_number("tolerance", tolerance, 0.0)
    check_forward(forward)
    start = time.perf_counter()
    net = copy.deepcopy(model)
    # The model's groups, and each recorded name's group in it (a wrapper's prefix stripped, see probe_localize).
    groups, modules, names, _ = match_record(net, record)
    check_group_names(list(layers), groups)
    recorded = {group: name for name, group in names.items()}
    missing = [name for name in layers if name not in recorded]
    if missing:
        raise ValueError(
            f"`layers` names group(s) {missing} that the probe record does not hold; it holds {list(names.values())}"
        )
    flags = [(module, module.training) for module in net.modules()]
    named = dict(net.named_parameters())
    wanted = [(p, p.requires_grad) for p in net.parameters()]
    trainable = {id(p) for p, flag in wanted if flag}
    stages: list[dict[str, Any]] = []
    net.eval()
    try:
        for name in [names[r] for r in record.order if names[r] in layers]:
            stage_start = time.perf_counter()
            params = [named[p] for p in groups[name] if id(named[p]) in trainable]
            own = {id(p) for p in params}
            for p in net.parameters():  # only the group's own parameters carry a graph
                p.requires_grad_(id(p) in own)
            output, linear_input = _group_output(net, name, modules[name], record, forward)
            ref = record.sketches[recorded[name]].to(model_device(net))
            width = math.prod(record.shapes[recorded[name]])
            proj = projection(record.seed, recorded[name], width, record.sketch_dim, ref.device)
            module = modules[name]
            whole = len(params) == len(list(module.parameters()))  # no tensor of the group frozen by the user
            if isinstance(module, nn.Linear) and linear_input is not None and whole:
                stage = _solve_linear(module, linear_input, output, proj, ref)
            else:
                stage = _fit(params, output, proj, ref, max_iter, history_size, tolerance)
            stage.update(stage="restore", groups=[name], n_params=sum(p.numel() for p in params))
            stage["wall_time_s"] = time.perf_counter() - stage_start
            stages.append(stage)
    finally:
        for module, flag in flags:
            module.training = flag
        for p, flag in wanted:
            p.requires_grad_(flag)
    trained = sum(s["n_params"] for s in stages)
    total = sum(group_sizes(model, groups).values())
    return SurgeryResult(
        model=net,
        layers=list(layers),
        selection="layers",
        n_params_trained=trained,
        fraction_trained=trained / total if total else 0.0,
        optimizer_steps=sum(s["optimizer_steps"] for s in stages),
        wall_time_s=time.perf_counter() - start,
        epochs=0,
        momentum="none",
        groups_touched=[s["groups"][0] for s in stages],
        policy="restore",
        stages=stages,
    )


def restore_or_retrain(
    model: nn.Module,
    layers: Sequence[str],
    record: ProbeRecord,
    train_dataloaders: Any,
    forward: Forward | None = None,
    max_iter: int = 40,
    tolerance: float = 0.0,
    **retrain: Any,
) -> SurgeryResult:
    """Restore ``layers`` from the probe; retrain on the task loss those whose sketch error stays above 0.5.

    The retraining (:func:`~lightning_beta.diagnosis.surgical_correction` with ``retrain``'s arguments: its
    policy, epochs, lr, budget, Trainer arguments) starts from the restored weights. The result counts both: the
    steps and wall time added, the stages of both listed in order, ``policy`` ``"restore"`` or
    ``"restore+<policy>"``.

    Example:
        >>> from lightning_beta.probe import record_probe
        >>> _ = torch.manual_seed(1)
        >>> head = nn.Sequential(nn.Linear(5, 2))
        >>> record = record_probe(head, torch.randn(32, 5), sketch_dim=4)
        >>> flipped = copy.deepcopy(head)
        >>> _ = flipped[0].weight.data.neg_()
        >>> restore_or_retrain(flipped, ["0"], record, train_dataloaders=None).policy  # restored: nothing retrained
        'restore'
    """
    restored = restore_from_probe(model, layers, record, max_iter=max_iter, tolerance=tolerance, forward=forward)
    left = [s["groups"][0] for s in restored.stages if s["probe_error"]["final"] > RESTORED_ERROR]
    if not left:
        return restored
    retrained = surgical_correction(restored.model, left, train_dataloaders, **retrain)
    stages = [*restored.stages, {"stage": f"retrain ({retrained.policy})", "groups": left, **retrained.to_dict()}]
    return dataclasses.replace(
        retrained,
        layers=list(layers),
        n_params_trained=max(restored.n_params_trained, retrained.n_params_trained),
        fraction_trained=max(restored.fraction_trained, retrained.fraction_trained),
        optimizer_steps=restored.optimizer_steps + retrained.optimizer_steps,
        wall_time_s=restored.wall_time_s + retrained.wall_time_s,
        groups_touched=list(dict.fromkeys([*restored.groups_touched, *retrained.groups_touched])),
        policy=f"restore+{retrained.policy}",
        stages=stages,
    )
