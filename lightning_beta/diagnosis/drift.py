"""Activation drift: how far each group's output statistics moved from a reference, and how much of it the group adds.

Ours, not the paper's. A fault planted in one group changes the statistics of that group's output and of
everything downstream; the gradient score of the misclassified samples does not single it out (see
``benchmarks/RESULTS.md``). Scoring each group by the drift it *adds*, drift at its output minus drift at its
input, puts the group that introduces a fault first.

The statistics are those of :mod:`lightning_beta.reference`, the module ``LayerAttributionCallback`` records its
reference with: the same inputs (``forward``), the same feature dim (stored in each
:class:`~lightning_beta.artifact.ReferenceStats`), the same sums (:class:`~lightning_beta.reference.FeatureMoments`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_beta.artifact import AttributionArtifact, ReferenceStats
from lightning_beta.diagnosis._batches import model_device, to_device
from lightning_beta.diagnosis.scores import LayerScores
from lightning_beta.layer_groups import GroupBy, group_modules, group_parameters, group_sizes, match_group_names
from lightning_beta.reference import (
    FeatureDim,
    Forward,
    OutputRecorder,
    default_forward,
    evaluating,
    output_tensor,
    resolve_dims,
)

Reference = AttributionArtifact | Mapping[str, ReferenceStats]


def channel_drift(mean_now: Tensor, var_now: Tensor, mean_ref: Tensor, var_ref: Tensor, eps: float = 1e-3) -> float:
    r"""Drift of per-feature (per-channel) statistics from a reference, averaged over features.

    Per feature ``c``, with ``v = var + eps * mean_c(var_ref)`` (a floor relative to the layer's typical variance,
    so near-dead channels do not dominate):

    .. math::
        d_c = \frac{|\mu^{now}_c - \mu^{ref}_c|}{\sqrt{v^{ref}_c}}
            + \frac{1}{2}\left|\log\frac{v^{now}_c}{v^{ref}_c}\right|

    and the drift is ``mean_c d_c``. Why this form: (1) both terms are unchanged when now and reference pass
    through the same per-channel affine map ``a x + b`` (an eval-mode BatchNorm, a channel scale), so a group that
    only rescales what it receives adds no drift, which is what makes "drift added = output drift minus input
    drift" meaningful; (2) it grows linearly in the mean shift (in reference standard deviations) and in the log
    variance ratio, like the square root of the symmetric KL divergence between the two Gaussians for small
    drifts, but without the KL's quadratic blow-up that would let one amplified downstream layer dominate.

    Args:
        mean_now: per-channel mean now, shape ``(C,)``.
        var_now: per-channel variance now.
        mean_ref: per-channel reference mean.
        var_ref: per-channel reference variance.
        eps: relative variance floor. Defaults to ``1e-3``.

    Returns:
        The mean drift over channels, ``>= 0``.

    Example:
        >>> ref_m, ref_v = torch.zeros(2), torch.ones(2)
        >>> channel_drift(ref_m, ref_v, ref_m, ref_v)
        0.0
        >>> round(channel_drift(torch.tensor([1.0, 1.0]), ref_v, ref_m, ref_v, eps=0.0), 6)  # one std shift
        1.0
        >>> round(channel_drift(ref_m, torch.full((2,), 7.389056), ref_m, ref_v, eps=0.0), 4)  # var times e^2
        1.0
    """
    mean_now, var_now, mean_ref, var_ref = (t.double() for t in (mean_now, var_now, mean_ref, var_ref))
    floor = eps * var_ref.clamp_min(0).mean() + 1e-12
    v_ref = var_ref.clamp_min(0) + floor
    v_now = var_now.clamp_min(0) + floor
    per_channel = (mean_now - mean_ref).abs() / v_ref.sqrt() + 0.5 * (v_now / v_ref).log().abs()
    return float(per_channel.mean())


def reference_statistics(
    model: nn.Module,
    dataloader: Iterable[Any],
    group_by: GroupBy = "auto",
    feature_dim: FeatureDim = None,
    forward: Forward | None = None,
) -> dict[str, ReferenceStats]:
    """Per-feature mean and variance of each group's output, in eval mode: a reference for :func:`activation_drift`.

    The same statistics, measured the same way, as ``LayerAttributionCallback`` stores in its artifact
    (:func:`lightning_beta.reference.record_reference`), for a model trained without it: ``forward(model, batch)``
    on every batch in eval mode under ``torch.no_grad()``, a :class:`~lightning_beta.reference.FeatureMoments` per
    group module, the feature along :func:`~lightning_beta.reference.default_feature_dim` (dim 1 for convolution
    outputs, the last dim for Linear and transformer outputs) unless ``feature_dim`` says otherwise. The model is left
    as it was (training flags, buffers).

    Args:
        model: the healthy model.
        dataloader: yields batches; ``forward`` picks the inputs (by default the first element of an
            ``(inputs, targets)`` tuple, or a Hugging Face dict batch as keyword arguments).
        group_by: layer groups. Defaults to ``"auto"``.
        feature_dim: the dim of a feature, one int or per group; ``None`` picks it per module. Defaults to ``None``.
        forward: ``forward(model, batch)``. Defaults to ``None``
            (:func:`~lightning_beta.reference.default_forward`).

    Returns:
        Group name to its output statistics, for groups that own a module whose output could be read; the others
        are named, with the reason, in one warning.

    Raises:
        ValueError: if the dataloader yields no batch.
    """
    groups = group_parameters(model, group_by)
    modules = group_modules(model, groups)
    recorder = _pass(model, dataloader, modules, resolve_dims(modules, feature_dim), forward)
    out = {}
    reasons = dict(recorder.reasons)
    for name, metric in recorder.metrics.items():
        if name in reasons:
            continue
        if metric.num_features == 0:
            reasons[name] = "its module did not run in the forward pass"
            continue
        out[name] = metric.to_reference()
    if reasons:
        rank_zero_warn(f"reference_statistics: no statistics for group(s) {_listing(reasons)}")
    return out


def _listing(reasons: Mapping[str, str]) -> str:
    return "; ".join(f"{name!r}: {why}" for name, why in reasons.items())


def _pass(
    model: nn.Module,
    dataloader: Iterable[Any],
    modules: Mapping[str, nn.Module],
    dims: Mapping[str, int],
    forward: Forward | None,
    inputs: bool = False,
    tracked: Mapping[str, nn.Module] | None = None,
    producer: dict[str, str | None] | None = None,
    order: list[str] | None = None,
) -> OutputRecorder:
    """One eval pass over the dataloader recording ``dims``' modules; optionally who feeds whom among ``tracked``.

    ``producer`` receives, for each tracked module, the tracked module whose output it receives on the first batch
    (by tensor identity), else the one that ran just before it; ``order`` their first-batch execution order.
    """
    run = forward or default_forward
    device = model_device(model)
    recorder = OutputRecorder(modules, dims, device, inputs=inputs)
    live: dict[int, tuple[str, Tensor]] = {}  # first batch only: output tensor id -> producing module
    state: dict[str, Any] = {"first": True, "last": None}

    def pre_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if state["first"] and producer is not None and name not in producer:
                x = output_tensor(args)
                found = live.get(id(x)) if x is not None else None
                producer[name] = found[0] if found is not None and found[1] is x else state["last"]

        return hook

    def post_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if state["first"]:
                if order is not None and name not in order:
                    order.append(name)
                state["last"] = name
                out = output_tensor(output)
                if out is not None:
                    live[id(out)] = (name, out)

        return hook

    handles = []
    for name, module in (tracked or {}).items():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
    empty = True
    try:
        with evaluating(model), recorder:
            for batch in dataloader:
                empty = False
                run(model, to_device(batch, device))
                state["first"], state["last"] = False, None
                live.clear()
    finally:
        for handle in handles:
            handle.remove()
    if empty:
        raise ValueError("`dataloader` yielded no samples: diagnosis needs at least one (inputs, targets) batch")
    return recorder


def activation_drift(
    model: nn.Module,
    dataloader: Iterable[Any],
    reference: Reference | None = None,
    group_by: GroupBy = "auto",
    eps: float = 1e-3,
    forward: Forward | None = None,
) -> LayerScores:
    """Score each group by the activation drift it adds: drift at its output minus drift at its input.

    Drift is :func:`channel_drift` of per-feature statistics now (eval mode, over the whole dataloader, along the
    feature dim the reference recorded) against a reference, and a group's score is ``max(0, drift_out -
    drift_in)``, so the group that introduces a fault ranks above the groups downstream of it that only carry it
    along. Two kinds of reference:

    - ``reference`` given (an :class:`AttributionArtifact` or its ``reference`` dict, or
      :func:`reference_statistics` of the healthy model): statistics of each group's *output*. The input drift
      of a group is the output drift of the group whose output it receives (by tensor identity), else of the group
      that ran just before it (through a parameter-free op such as a ReLU), else 0.
    - ``reference=None`` and the model has BatchNorm: each BatchNorm's running statistics are the reference of
      its *input*. A BatchNorm's input drift is credited to the group owning the module that produced that input
      (the convolution before it); a group's output drift is the largest drift among the BatchNorms it feeds,
      and its input drift the largest among those fed by the group credited just before it. Groups that feed no
      BatchNorm (e.g. a BatchNorm group itself or the classifier head) cannot be observed and score 0; the
      ``message`` lists them.

    A reference recorded on a module that wraps the model (``LayerAttributionCallback`` on a LightningModule
    holding ``self.model`` records ``model.bert.encoder.layer.0`` where ``lit.model`` has
    ``bert.encoder.layer.0``) is matched after stripping that one prefix, and ``message`` says so
    (:func:`~lightning_beta.layer_groups.match_group_names`).

    Args:
        model: the model to examine.
        dataloader: yields batches; ``forward`` picks the inputs (by default the first element of an
            ``(inputs, targets)`` tuple, or a Hugging Face dict batch as keyword arguments). The sequence length may
            differ from the reference's: statistics are per feature.
        reference: output statistics per group, or ``None`` to use BatchNorm running statistics. Defaults to
            ``None``.
        group_by: layer groups. Defaults to ``"auto"``.
        eps: relative variance floor of :func:`channel_drift`. Defaults to ``1e-3``.
        forward: ``forward(model, batch)``, the same as the reference was recorded with. Defaults to ``None``
            (:func:`~lightning_beta.reference.default_forward`).

    Returns:
        Scores with ``method="drift"`` and the detail columns ``output`` and ``input`` (the two drifts).

    Raises:
        ValueError: if the dataloader is empty; if ``reference`` is ``None`` and the model has no BatchNorm running
            statistics; if the reference comes from a different model (a group the model does not have, as named
            or after stripping one common prefix: the message lists both sets of names; other parameter counts; or
            another number of features).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(64, 4), torch.zeros(64, dtype=torch.long)), batch_size=16)
        >>> ref = reference_statistics(net, data)
        >>> with torch.no_grad():
        ...     _ = net[2].weight.mul_(-3.0)  # plant a fault in group "2"
        >>> activation_drift(net, data, ref).ranking[0]
        '2'
    """
    groups = group_parameters(model, group_by)
    sizes = group_sizes(model, groups)
    reasons: dict[str, str] = {}
    prefix = ""
    if reference is None:
        out_drift, in_drift, unobserved = _batchnorm_drift(model, dataloader, groups, eps, forward)
    else:
        ref, prefix = _check_reference(reference, groups, sizes)
        out_drift, in_drift, unobserved, reasons = _reference_drift(model, dataloader, groups, ref, eps, forward)
    scores = {name: max(0.0, out_drift.get(name, 0.0) - in_drift.get(name, 0.0)) for name in groups}
    notes = []
    if prefix:
        notes.append(
            f"the reference's group names carry the prefix {prefix!r} (recorded on a module wrapping this model, such"
            " as a LightningModule's `self.model`): matched to this model's groups without it"
        )
    if unobserved:
        note = f"group(s) {unobserved} have no reference statistics and score 0"
        if reasons:
            note += f" ({_listing(reasons)})"
        notes.append(note)
    message = "; ".join(notes) or None
    return LayerScores(
        scores=scores,
        method="drift",
        n_params=sizes,
        details={"output": out_drift, "input": in_drift},
        n_samples=0,
        message=message,
    )


def _check_reference(
    reference: Reference, groups: Mapping[str, list[str]], sizes: Mapping[str, int]
) -> tuple[dict[str, ReferenceStats], str]:
    """The reference statistics under the model's group names, and the prefix stripped to get them (or ``""``).

    Names recorded on a module wrapping the model (a LightningModule's ``self.model``) carry its prefix, stripped
    by :func:`~lightning_beta.layer_groups.match_group_names`; an artifact's ``groups`` (all the groups it was
    recorded with, not only those with statistics) decide the prefix and must match the model's sizes.
    """
    if isinstance(reference, AttributionArtifact):
        stats: Mapping[str, ReferenceStats] = reference.reference
        recorded = dict(reference.groups)
    elif isinstance(reference, Mapping):
        stats, recorded = reference, {}
    else:
        raise TypeError(
            "`reference` must be an AttributionArtifact, a dict of ReferenceStats or None,"
            f" got {type(reference).__name__}"
        )
    mapping, prefix = match_group_names([*recorded, *(name for name in stats if name not in recorded)], groups)
    if recorded and {mapping[name]: n for name, n in recorded.items()} != dict(sizes):
        raise ValueError(
            "`reference` was recorded on a different model: its groups (name: n_params) are"
            f" {recorded}, the model's are {dict(sizes)}"
        )
    if not stats:
        skipped = getattr(reference, "reference_skipped", None)
        why = (
            f"the reference pass could not read group(s) {skipped} at the end of the fit (the fit warned why; a"
            " LightningModule without a `forward` of its own needs `LayerAttributionCallback(reference_forward=...)`)"
            if skipped and getattr(reference, "reference_batches", 0) != 0
            else "was the artifact written with `reference_batches=0`?"
        )
        raise ValueError(f"`reference` holds no statistics: {why}")
    return {mapping[name]: value for name, value in stats.items()}, prefix


def _reference_drift(
    model: nn.Module,
    dataloader: Iterable[Any],
    groups: Mapping[str, list[str]],
    ref: Mapping[str, ReferenceStats],
    eps: float,
    forward: Forward | None,
) -> tuple[dict[str, float], dict[str, float], list[str], dict[str, str]]:
    modules = group_modules(model, dict(groups))
    dims = {name: ref[name].feature_dim for name in modules if name in ref}
    producer: dict[str, str | None] = {}
    recorder = _pass(model, dataloader, modules, dims, forward, tracked=modules, producer=producer)
    out_drift: dict[str, float] = {}
    for name, metric in recorder.metrics.items():
        if name in recorder.reasons or metric.num_features == 0:
            continue
        mean, var = metric.moments()
        r = ref[name]
        if len(r.mean) != mean.shape[0] or len(r.var) != mean.shape[0]:
            raise ValueError(
                f"`reference` was recorded on a different model: group {name!r} has {len(r.mean)} feature(s) (dim"
                f" {r.feature_dim}) in the reference but {mean.shape[0]} in the model's output"
            )
        ref_mean, ref_var = (torch.tensor(v, dtype=torch.float64) for v in (r.mean, r.var))  # the JSON's doubles
        out_drift[name] = channel_drift(mean, var, ref_mean, ref_var, eps)
    in_drift = {}
    for name in out_drift:
        source = producer.get(name)
        in_drift[name] = out_drift.get(source, 0.0) if source is not None else 0.0
    unobserved = [name for name in groups if name not in out_drift]
    reasons = {name: why for name, why in recorder.reasons.items() if name in unobserved}
    return out_drift, in_drift, unobserved, reasons


def _owner(module_name: str, groups: Mapping[str, list[str]]) -> str | None:
    prefix = f"{module_name}." if module_name else ""
    for group, params in groups.items():
        if any(p.startswith(prefix) and "." not in p[len(prefix) :] for p in params):
            return group
    # A parameter-free module (affine=False BatchNorm): the group whose name is the longest prefix of its path.
    best = None
    for group in groups:
        if (module_name == group or module_name.startswith(f"{group}.")) and (best is None or len(group) > len(best)):
            best = group
    return best


def _batchnorm_drift(
    model: nn.Module, dataloader: Iterable[Any], groups: Mapping[str, list[str]], eps: float, forward: Forward | None
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    bns = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }
    if not bns:
        raise ValueError(
            "`reference` is None and the model has no BatchNorm running statistics to compare with: pass an"
            " AttributionArtifact or the dict of `reference_statistics(healthy_model, dataloader)`"
        )
    # Every module with its own parameters may produce a BatchNorm's input; the BatchNorms are the probes.
    producers = {name: m for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    modules = {**producers, **bns}
    # Input statistics of the BatchNorms are what the running statistics describe (channel = dim 1, as BatchNorm).
    producer: dict[str, str | None] = {}
    order: list[str] = []
    dims = dict.fromkeys(bns, 1)
    recorder = _pass(
        model, dataloader, bns, dims, forward, inputs=True, tracked=modules, producer=producer, order=order
    )
    credited: list[tuple[str, float]] = []  # (group, drift) per BatchNorm, in execution order
    for name in order:
        metric = recorder.metrics.get(name)
        if metric is None or name in recorder.reasons or metric.num_features == 0:
            continue
        mean, var = metric.moments()
        bn = bns[name]
        assert bn.running_mean is not None and bn.running_var is not None
        drift = channel_drift(mean, var, bn.running_mean, bn.running_var, eps)
        source = producer.get(name)
        group = _owner(source, groups) if source is not None and source not in bns else None
        group = group or _owner(name, groups)
        if group is not None:
            credited.append((group, drift))
    out_drift: dict[str, float] = {}
    in_drift: dict[str, float] = {}
    previous: str | None = None
    for group, drift in credited:
        if group not in out_drift:
            in_drift[group] = out_drift.get(previous, 0.0) if previous is not None else 0.0
        out_drift[group] = max(out_drift.get(group, 0.0), drift)
        previous = group
    unobserved = [name for name in groups if name not in out_drift]
    return out_drift, in_drift, unobserved
