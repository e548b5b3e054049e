"""Distribution shift: which layer groups to fine-tune on shifted data, and Auto-RGN to compare with.

Lee et al., "Surgical fine-tuning improves adaptation to distribution shifts" (ICLR 2023), found that tuning the
early blocks is best for input-level shifts (corruptions) and tuning the last layer best for label-level shifts,
and proposed Auto-RGN: per tensor, the relative gradient norm ``||g|| / ||theta||`` on the new data sets the
tensor's learning rate (normalised so that the largest is the base rate) and every tensor is tuned.

:func:`recommend_groups` is ours. It shortlists a few groups from two cheap signals on the shifted data, the
activation drift each group adds against clean data (:func:`~lightning_beta.diagnosis.activation_drift`) and each
group's relative gradient norm, always keeping the head, then probes each candidate by a short fine-tuning on one
part of the shifted data and scores it on a held-out part; the smallest candidate within ``tolerance`` of the best
held-out accuracy wins. Its compute is stated in the result: one forward pass for the drift, one backward pass for
the gradients, and ``len(candidates) * probe_steps`` optimizer steps.

:func:`fine_tune` is the loop every arm shares (Adam at a constant rate over the chosen groups, frozen BatchNorm
held in eval mode, as :func:`~lightning_beta.diagnosis.surgical_correction` does), and :func:`auto_rgn` is that loop
with the per-tensor rates of :func:`rgn_multipliers` recomputed from every batch's gradient.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_beta._checks import check_int, check_number
from lightning_beta.artifact import ReferenceStats
from lightning_beta.diagnosis._batches import check_group_names, iter_batches, model_device, run_model
from lightning_beta.diagnosis._outputs import LossFn, element_predictions, mean_loss, valid_elements
from lightning_beta.diagnosis.drift import activation_drift, reference_statistics
from lightning_beta.functional.grad_norms import tensor_norms
from lightning_beta.layer_groups import GroupBy, group_parameters, group_sizes


@dataclass
class FineTuneResult:
    """A fine-tuned copy and what it cost.

    Attributes:
        model: the fine-tuned copy (the input model is not modified).
        groups: the layer groups trained (all of them for full fine-tuning and Auto-RGN).
        n_params_trained: scalar parameters the update could change.
        optimizer_steps: optimizer steps taken.
        wall_time_s: wall time of the loop.
        multipliers: mean per-tensor lr multiplier over the steps (Auto-RGN only; empty otherwise).
    """

    model: nn.Module
    groups: list[str]
    n_params_trained: int
    optimizer_steps: int
    wall_time_s: float
    multipliers: dict[str, float] = field(default_factory=dict)


@dataclass
class ShiftRecommendation:
    """Which groups to fine-tune for shifted data, the scores behind it and what it cost.

    Attributes:
        groups: the recommended groups (one group: the winning candidate).
        kind: ``"input"`` (the drift starts at the first group), ``"feature"`` (it starts at a later group),
            ``"label"`` (no group drifts beyond ``drift_threshold``) or ``"unknown"`` (no reference for the drift).
        candidates: the groups probed, in shortlist order.
        drift: drift each group adds on the shifted data (empty without a reference).
        gradient: each group's relative gradient norm ``||g|| / ||theta||`` on the shifted data.
        probe: held-out accuracy of each candidate after its probe.
        n_params: parameters per group.
        reason: one sentence saying why.
        optimizer_steps: optimizer steps the probes took.
        wall_time_s: wall time of the whole recommendation.
    """

    groups: list[str]
    kind: str
    candidates: list[str]
    drift: dict[str, float]
    gradient: dict[str, float]
    probe: dict[str, float]
    n_params: dict[str, int]
    reason: str
    optimizer_steps: int
    wall_time_s: float


def rgn_multipliers(grad_norms: Mapping[str, float], param_norms: Mapping[str, float]) -> dict[str, float]:
    """Auto-RGN's per-tensor lr multipliers: ``||g|| / ||theta||`` per tensor, divided by the largest.

    A tensor with zero norm gets the largest relative norm (it is not scaled down); all zero gradients give 0.

    Args:
        grad_norms: tensor name to its gradient norm.
        param_norms: tensor name to its parameter norm.

    Returns:
        Tensor name to its multiplier in ``[0, 1]``; the largest is 1 unless every gradient is zero.

    Example:
        >>> rgn_multipliers({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 2.0})
        {'a': 1.0, 'b': 0.25}
    """
    ratios = {name: g / param_norms[name] for name, g in grad_norms.items() if param_norms[name] > 0}
    top = max(ratios.values(), default=0.0)
    ratios.update({name: top for name in grad_norms if param_norms[name] <= 0})
    if top <= 0:
        return {name: 0.0 for name in grad_norms}
    return {name: ratios[name] / top for name in grad_norms}


def relative_gradient_norms(
    model: nn.Module,
    dataloader: Iterable[Any],
    group_by: GroupBy = "auto",
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """Each group's relative gradient norm ``||g|| / ||theta||`` of the mean loss over ``dataloader`` (eval mode).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> data = [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))]
        >>> sorted(relative_gradient_norms(net, data))
        ['0', '2']
    """
    groups = group_parameters(model, group_by)
    grads = _mean_gradients(model, dataloader, loss_fn)
    params = dict(model.named_parameters())
    out = {}
    for name, members in groups.items():
        g = sum(float(grads[p].double().square().sum()) for p in members) ** 0.5
        w = sum(float(params[p].detach().double().square().sum()) for p in members) ** 0.5
        out[name] = g / w if w > 0 else 0.0
    return out


def fine_tune(
    model: nn.Module,
    dataloader: Iterable[Any],
    groups: Sequence[str] | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    group_by: GroupBy = "auto",
    loss_fn: LossFn | None = None,
    auto_rgn: bool = False,
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on ``dataloader`` for ``steps`` Adam steps at a constant ``lr``.

    Only ``groups`` are trained (every group when ``None``); BatchNorm modules with no trained parameter stay in eval
    mode, so their running statistics do not move. The loader is cycled until ``steps`` steps are taken. With
    ``auto_rgn=True`` each tensor's lr is ``lr`` times its :func:`rgn_multipliers` value from the current batch's
    gradient, recomputed every step.

    Args:
        model: a classifier returning logits; not modified.
        dataloader: ``(inputs, targets)`` batches, or Hugging Face dicts with ``labels``.
        groups: the groups to train. Defaults to ``None`` (all).
        steps: optimizer steps, ``>= 1``. Defaults to ``100``.
        lr: the base learning rate, ``> 0``. Defaults to ``1e-3``.
        group_by: layer groups. Defaults to ``"auto"``.
        loss_fn: per-element loss. Defaults to cross-entropy.
        auto_rgn: per-tensor rates by relative gradient norm. Defaults to ``False``.

    Raises:
        ValueError: for an unknown or empty ``groups``, ``steps < 1`` or ``lr <= 0``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> result = fine_tune(net, data, ["2"], steps=3)
        >>> torch.equal(result.model[0].weight, net[0].weight), result.optimizer_steps, result.n_params_trained
        (True, 3, 18)
    """
    check_int("steps", steps, minimum=1)
    check_number("lr", lr, low=0.0, low_open=True)
    all_groups = group_parameters(model, group_by)
    chosen = list(all_groups) if groups is None else list(groups)
    if not chosen:
        raise ValueError("`groups` is empty: name at least one group to fine-tune")
    check_group_names(chosen, all_groups, argument="groups")
    net = copy.deepcopy(model)
    trainable = {p for g in chosen for p in all_groups[g]}
    named = [(n, p) for n, p in net.named_parameters() if n in trainable]
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.requires_grad_(n in trainable)
    optimizer = torch.optim.Adam([{"params": [p], "lr": lr, "name": n} for n, p in named])
    was_training = model.training
    _train_mode(net)
    device = model_device(net)
    sums = dict.fromkeys((n for n, _ in named), 0.0)
    begin = time.perf_counter()
    for step, (x, y) in enumerate(_cycle(dataloader, device)):
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        mean_loss(run_model(net, x), y, loss_fn).backward()
        if auto_rgn:
            with torch.no_grad():
                g = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in named]
                g_norms = tensor_norms(g, dtype=torch.float64).tolist()
                p_norms = tensor_norms([p.detach() for _, p in named], dtype=torch.float64).tolist()
            scale = rgn_multipliers(dict(zip(sums, g_norms)), dict(zip(sums, p_norms)))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale[group["name"]]
                sums[group["name"]] += scale[group["name"]]
        optimizer.step()
    wall = time.perf_counter() - begin
    for n, p in net.named_parameters():
        p.requires_grad_(flags[n])
    net.train(was_training)
    return FineTuneResult(
        model=net,
        groups=chosen,
        n_params_trained=sum(p.numel() for _, p in named),
        optimizer_steps=steps,
        wall_time_s=wall,
        multipliers={n: s / steps for n, s in sums.items()} if auto_rgn else {},
    )


def auto_rgn(
    model: nn.Module,
    dataloader: Iterable[Any],
    steps: int = 100,
    lr: float = 1e-3,
    group_by: GroupBy = "auto",
    loss_fn: LossFn | None = None,
) -> FineTuneResult:
    """Auto-RGN (Lee et al., 2023): fine-tune every tensor, each at ``lr`` times its normalised relative grad norm.

    The same loop as :func:`fine_tune` with ``auto_rgn=True``; see there for the arguments.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> result = auto_rgn(net, data, steps=2)
        >>> max(result.multipliers.values()) <= 1.0, result.n_params_trained
        (True, 58)
    """
    return fine_tune(model, dataloader, None, steps, lr, group_by, loss_fn, auto_rgn=True)


def accuracy(model: nn.Module, dataloader: Iterable[Any]) -> float:
    """Share of correctly classified elements over ``dataloader``, in eval mode (the model's mode is restored).

    Example:
        >>> net = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2))
        >>> accuracy(net, [(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))])
        0.5
    """
    was_training = model.training
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in iter_batches(dataloader, model_device(model)):
            valid = valid_elements(y)
            right += int(((element_predictions(run_model(model, x), y) == y) & valid).sum())
            total += int(valid.sum())
    model.train(was_training)
    return right / max(total, 1)


def recommend_groups(
    model: nn.Module,
    shifted_dataloader: Iterable[Any],
    reference: Iterable[Any] | Mapping[str, ReferenceStats] | None = None,
    holdout_dataloader: Iterable[Any] | None = None,
    max_candidates: int = 6,
    probe_steps: int = 30,
    lr: float = 1e-2,
    tolerance: float = 0.02,
    drift_threshold: float = 0.25,
    group_by: GroupBy = "auto",
    loss_fn: LossFn | None = None,
) -> ShiftRecommendation:
    """Recommend the layer group to fine-tune for shifted data, from drift, gradients and a short probe.

    1. Drift: :func:`~lightning_beta.diagnosis.activation_drift` of the shifted data against ``reference`` (clean
       data or its :func:`~lightning_beta.diagnosis.reference_statistics`); ``None`` uses BatchNorm running
       statistics where the model has them, else no drift. The group adding the most drift (at least
       ``drift_threshold``) is a candidate, and so is the first later group, not the head, of more than a quarter of
       its size (the one reading the drifted features); where the drift starts gives ``kind``.
    2. Gradients: :func:`relative_gradient_norms` on the shifted data; the groups with the largest fill the
       shortlist up to ``max_candidates``. The head (the last group) is always the first candidate: a changed label
       relation moves no activation.
    3. Probe: each candidate alone is fine-tuned for ``probe_steps`` steps (:func:`fine_tune`) on the shifted data
       and scored on ``holdout_dataloader`` (by default the last third of the shifted batches, the probe training on
       the rest), at a rate ``lr`` above the one of the final fine-tuning so that a short probe shows where a longer
       run gets. The smallest candidate within ``tolerance`` of the best held-out accuracy is recommended.

    Args:
        model: the classifier trained on clean data; not modified.
        shifted_dataloader: the shifted data: ``(inputs, targets)`` batches, or Hugging Face dicts with ``labels``.
        reference: clean batches or reference statistics. Defaults to ``None``.
        holdout_dataloader: shifted batches to score the probes on. Defaults to ``None``.
        max_candidates: groups probed, ``>= 1``. Defaults to ``6``: every group of the digits models (on the
            design families of ``benchmarks/shift.py``, 4 came within 2 points of the oracle in 12 of 16 runs, 6 in
            13).
        probe_steps: optimizer steps per probe, ``>= 1``. Defaults to ``30``.
        lr: the probes' Adam learning rate. Defaults to ``1e-2``.
        tolerance: accuracy a smaller group may give up against the best probe. Defaults to ``0.02``.
        drift_threshold: added drift below which a group is said not to drift. Defaults to ``0.25``.
        group_by: layer groups. Defaults to ``"auto"``.
        loss_fn: per-element loss. Defaults to cross-entropy.

    Raises:
        ValueError: for ``max_candidates < 1``, ``probe_steps < 1``, ``tolerance < 0``, or fewer than two shifted
            batches when no ``holdout_dataloader`` is given.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
        >>> rec = recommend_groups(net, data, probe_steps=2)
        >>> rec.candidates, rec.optimizer_steps
        (['2', '0'], 4)
    """
    check_int("max_candidates", max_candidates, minimum=1)
    check_int("probe_steps", probe_steps, minimum=1)
    check_number("tolerance", tolerance, low=0.0)
    begin = time.perf_counter()
    groups = group_parameters(model, group_by)
    names = list(groups)
    sizes = group_sizes(model, groups)
    train_batches: Iterable[Any] = shifted_dataloader
    if holdout_dataloader is None:
        batches = list(shifted_dataloader)
        if len(batches) < 2:
            raise ValueError(
                "`shifted_dataloader` must yield at least two batches when no `holdout_dataloader` is given,"
                f" got {len(batches)}"
            )
        cut = len(batches) - max(1, len(batches) // 3)
        train_batches, holdout_dataloader = batches[:cut], batches[cut:]
    drift = _drift(model, train_batches, reference, group_by)
    gradient = relative_gradient_norms(model, train_batches, group_by, loss_fn)
    kind = _kind(drift, names, drift_threshold)
    shortlist = [names[-1]]
    if drift and max(drift.values()) >= drift_threshold:
        # The group adding the most drift, and the first later group (not the head) that is more than a quarter
        # of its size: the one that reads the drifted features, skipping a small BatchNorm group in between.
        top = max(drift, key=lambda g: drift[g])
        shortlist.append(top)
        later = [g for g in names[names.index(top) + 1 : -1] if sizes[g] > sizes[top] // 4]
        shortlist.extend(later[:1])
    for g in sorted(names, key=lambda g: -gradient[g]):
        shortlist.append(g)
    candidates = list(dict.fromkeys(shortlist))[:max_candidates]
    probe = {}
    for g in candidates:
        tuned = fine_tune(model, train_batches, [g], probe_steps, lr, group_by, loss_fn).model
        probe[g] = accuracy(tuned, holdout_dataloader)
    best = max(probe.values())
    eligible = [g for g in candidates if probe[g] >= best - tolerance]
    choice = min(eligible, key=lambda g: (sizes[g], -probe[g]))
    reason = (
        f"shift looks {kind}-level; probed {candidates} for {probe_steps} steps each:"
        f" {choice!r} reached {probe[choice]:.3f} held-out accuracy (best {best:.3f}) with {sizes[choice]} parameters,"
        f" the fewest within {tolerance:.3f} of the best"
    )
    return ShiftRecommendation(
        groups=[choice],
        kind=kind,
        candidates=candidates,
        drift=drift,
        gradient=gradient,
        probe=probe,
        n_params=sizes,
        reason=reason,
        optimizer_steps=probe_steps * len(candidates),
        wall_time_s=time.perf_counter() - begin,
    )


def _drift(
    model: nn.Module,
    dataloader: Iterable[Any],
    reference: Iterable[Any] | Mapping[str, ReferenceStats] | None,
    group_by: GroupBy,
) -> dict[str, float]:
    """Added drift per group, or ``{}`` where no reference can be had (no clean data and no BatchNorm)."""
    if reference is not None and not isinstance(reference, Mapping):
        reference = reference_statistics(model, reference, group_by)
    if reference is None and not any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules()):
        return {}
    return dict(activation_drift(model, dataloader, reference, group_by).scores)


def _kind(drift: Mapping[str, float], names: Sequence[str], threshold: float) -> str:
    if not drift:
        return "unknown"
    if max(drift.values()) < threshold:
        return "label"
    first = next(g for g in names if drift.get(g, 0.0) >= threshold)
    return "input" if first == names[0] else "feature"


def _mean_gradients(model: nn.Module, dataloader: Iterable[Any], loss_fn: LossFn | None) -> dict[str, Tensor]:
    """Gradient of the mean loss over the batches (each batch weighted equally), in eval mode, ``.grad`` restored."""
    params = dict(model.named_parameters())
    saved = {n: p.grad for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for x, y in iter_batches(dataloader, model_device(model)):
            model.zero_grad(set_to_none=True)
            mean_loss(run_model(model, x), y, loss_fn).backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad
            count += 1
    finally:
        for n, p in params.items():
            p.grad = saved[n]
            p.requires_grad_(flags[n])
        model.train(was_training)
    return {n: s / max(count, 1) for n, s in sums.items()}


def _train_mode(net: nn.Module) -> None:
    """Train mode, except BatchNorm modules with no trainable parameter (their running statistics stay put)."""
    net.train()
    for m in net.modules():
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _cycle(dataloader: Iterable[Any], device: torch.device) -> Iterator[tuple[Any, Tensor]]:
    while True:
        yield from iter_batches(dataloader, device)


__all__ = [
    "FineTuneResult",
    "ShiftRecommendation",
    "accuracy",
    "auto_rgn",
    "fine_tune",
    "recommend_groups",
    "relative_gradient_norms",
    "rgn_multipliers",
]
