"""Probe localizer: which layer group's *function* changed, seen through a fixed probe set and replayed inputs.

Ours, not the paper's. :func:`~lightning_beta.diagnosis.drift.activation_drift` compares per-feature means and
variances, so a fault that keeps each channel's marginal distribution (a permutation of a layer's output channels
with their statistics matched, a sign flip balanced by the bias, a kernel mirrored) is invisible at the group that
holds it, and the drift it causes downstream is credited to a later group. The probe compares the outputs
themselves, sample by sample:

- :func:`record_probe` (in :mod:`lightning_beta.probe`, re-exported here), on the healthy model, or
  ``LayerAttributionCallback`` at the end of a fit (``probe_samples``): a small fixed set of probe inputs, one
  forward pass in eval mode, each group's output *sketched* by a fixed seeded Gaussian projection, and optionally
  (``replay=True``) the inputs each group's module received.
- :func:`probe_localize`, on the model to examine: the same probe inputs through the model, run the same way
  (``forward``); per group the relative change of its sketched output ``||S_now - S_ref||_F / ||S_ref||_F``
  (``output`` column), and, where inputs were recorded, the group's module run on its *recorded reference input*
  and compared with its recorded reference output the same way (``own`` column).

The rule (what makes the first-named group the faulty one):

- ``own`` isolates each group's function exactly: a group whose parameters and buffers are unchanged reproduces
  its reference output bit for bit on its reference input (on CPU; up to the device's non-determinism on
  accelerators, hence ``tolerance``), however much its upstream groups changed. The score is ``own``.
- Without recorded inputs (``replay=False``), a group's output change is its own only while everything upstream is
  unchanged. The groups run in forward order; a group scores its ``output`` change up to and including the first
  group whose change exceeds ``tolerance``; groups after it are downstream of a change and score 0 (their output
  change is still in the ``output`` column). This names the first changed group exactly for one fault in a chain
  of groups; it cannot score a second fault downstream of the first.

Group names: a record made on a module that holds the examined one (``LayerAttributionCallback`` records on the
LightningModule, whose groups are ``model.conv1`` ... when it holds ``self.model``) names its groups with that
module's path in front. When the examined model (``lit.model``) has none of the recorded names, the one leading
prefix whose removal turns every recorded name into one of the model's groups is stripped, and the scores' message
says so.

Cost: localizing is one forward pass plus, with replay, one run of each group on its stored inputs (together about
one more forward pass: 47 ms against 30 ms for one forward of the digits ResNet on 256 probes, one CPU thread). The
projection matrix ``R`` is ``D x sketch_dim`` floats while it is in use.

Assumptions: outputs and inputs are batch-first (dim 0 indexes the probe samples) and have the same per-sample
shape at recording and at localization; the model's forward in eval mode is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_beta._checks import check_bool, check_number
from lightning_beta.diagnosis.scores import LayerScores
from lightning_beta.layer_groups import common_prefixes, group_sizes
from lightning_beta.probe import (
    PROBE_VERSION,
    ProbeRecord,
    check_forward,
    model_device,
    projection,
    record_probe,
    resolve_groups,
    run_probe,
    sketch_output,
    to_device,
    weight_norms,
)
from lightning_beta.reference import Forward, evaluating, output_tensor

__all__ = ["PROBE_VERSION", "ProbeRecord", "probe_localize", "record_probe"]


def _relative_change(now: Tensor, ref: Tensor) -> float:
    ref = ref.to(now.device)
    scale = float(torch.linalg.vector_norm(ref.double()))
    diff = float(torch.linalg.vector_norm((now - ref).double()))
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def probe_localize(
    model: nn.Module, record: ProbeRecord, tolerance: float = 1e-4, replay: bool = True, forward: Forward | None = None
) -> LayerScores:
    """Score each group by how much its own function changed on the probe set (see the module docstring's rule).

    Args:
        model: the model to examine, with the groups the record was made on (or those groups under a leading
            prefix, see the module docstring).
        record: from :func:`record_probe` on the healthy model, :meth:`ProbeRecord.load`, or
            :func:`lightning_beta.probe.load_probe` of an artifact of ``LayerAttributionCallback``.
        tolerance: a relative change at most this large counts as unchanged: rounding differences between devices
            or kernels (a float64 replay of a float32 record gives at most 4e-7 on the digits models; TF32 matmuls
            round at about 1e-3 and need a larger tolerance). Defaults to ``1e-4``.
        replay: run each group on its recorded input where the record has it. ``False`` uses the first-change
            rule for every group. Defaults to ``True``.
        forward: ``forward(model, inputs)``, which runs ``model`` on the record's inputs as the recording did.
            Defaults to ``None`` (:func:`~lightning_beta.reference.default_forward`: a tensor as ``model(x)``, a dict
            as keyword arguments).

    Returns:
        Scores with ``method="probe"`` and the detail columns ``output`` (relative change of the group's output on
        the probe inputs) and ``own`` (relative change of its output on its recorded input; absent without
        replay). A group scores 0 where it cannot be scored; :attr:`LayerScores.message` says which and why, and
        whether the group names were matched by stripping a prefix.

    Raises:
        TypeError: if ``model`` is not a module, ``record`` is not a :class:`ProbeRecord` or ``forward`` is not
            callable.
        ValueError: if ``tolerance`` is negative, or the model does not fit the record (its groups, even with a
            leading prefix stripped, are not the record's; another output shape; another projection).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> record = record_probe(net, torch.randn(64, 4))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(net[0].weight.flip(0))  # the first layer's units in reverse order
        >>> scores = probe_localize(net, record)
        >>> scores.ranking[0], scores.scores["2"], scores.scores["4"]
        ('0', 0.0, 0.0)
    """
    if not isinstance(record, ProbeRecord):
        raise TypeError(f"`record` must be a ProbeRecord (from record_probe), got {type(record).__name__}")
    check_number("tolerance", tolerance, low=0.0)
    check_bool("replay", replay)
    check_forward(forward)
    params, modules, names, note = match_record(model, record)
    device = model_device(model)
    projections: dict[str, Tensor] = {}
    for name in record.order:  # the projection is the recorded name's, whatever the model calls the group
        proj = projection(record.seed, name, math.prod(record.shapes[name]), record.sketch_dim, device)
        if proj.flatten()[:4].cpu().tolist() != record.fingerprints[name]:
            raise ValueError(
                f"`record`'s projection of group {name!r} cannot be regenerated by this torch release: record the"
                " probe again"
            )
        projections[name] = proj

    def sketch(name: str, output: Tensor) -> Tensor:
        if list(output.shape[1:]) != record.shapes[name]:
            raise ValueError(
                f"`model` does not fit the record: group {names[name]!r} outputs shape {tuple(output.shape)}, the"
                f" record has ({record.n_samples}, {', '.join(map(str, record.shapes[name]))})"
            )
        return sketch_output(output, projections[name])

    recorded = {name: modules[names[name]] for name in record.order}
    capture = run_probe(model, record.inputs, recorded, sketch, False, forward)
    output = {names[name]: _relative_change(now, record.sketches[name]) for name, now in capture.sketches.items()}
    own: dict[str, float] = {}
    if replay and record.replay_inputs:
        with evaluating(model):
            for name in record.order:
                if name not in record.replay_inputs:
                    continue
                args, kwargs = to_device(record.replay_inputs[name], device)
                out = output_tensor(recorded[name](*args, **kwargs))
                if out is not None and out.dim() > 0 and out.shape[0] == record.n_samples:
                    own[names[name]] = _relative_change(sketch(name, out), record.sketches[name])
    order = [names[name] for name in record.order]
    scores, message = _rule(order, params, output, own, tolerance)
    details = {"output": output, **({"own": own} if own else {})}
    moved, note_weights = _weights_moved(model, params, record, names)
    if moved:
        details["weights"] = moved
    return LayerScores(
        scores=scores,
        method="probe",
        n_params=group_sizes(model, params),
        details=details,
        n_samples=record.n_samples,
        message="; ".join(m for m in (note, message, note_weights) if m) or None,
    )


def _weights_moved(
    model: nn.Module, params: Mapping[str, list[str]], record: ProbeRecord, names: Mapping[str, str]
) -> tuple[dict[str, float], str | None]:
    """Each group's relative change of weight norm since the recording, and a note when most groups changed.

    A fault sits in one group or a few; when the weights of most groups differ, the record is of another run (or the
    model was trained on after it), and a first changed group says little.
    """
    if not record.weight_norms:
        return {}, None
    prefix = {group: name for name, group in names.items()}
    now = weight_norms(model, params)
    moved = {}
    for group, value in now.items():
        recorded = record.weight_norms.get(prefix.get(group, group))
        if recorded is not None:
            moved[group] = abs(value - recorded) / recorded if recorded > 0 else (0.0 if value == 0 else math.inf)
    changed = [group for group, value in moved.items() if value > 1e-6]
    if len(changed) < 2 or 2 * len(changed) <= len(moved):
        return moved, None
    return moved, (
        f"the weights of {len(changed)} of {len(moved)} groups differ from those the probe was recorded with: the"
        " record is of another run, or the model was trained on after it (a fault changes one group or a few);"
        " check that this is the artifact of this model"
    )


def match_record(
    model: nn.Module, record: ProbeRecord
) -> tuple[dict[str, list[str]], dict[str, nn.Module], dict[str, str], str | None]:
    """The model's groups and modules, each recorded name's group in the model, and a note if a prefix was stripped."""
    _, params, modules = resolve_groups(model, record.group_by)
    if all(name in modules for name in record.order):
        return params, modules, {name: name for name in record.order}, None
    found = []
    for prefix, group_by in _prefixes(record):
        _, stripped_params, stripped_modules = resolve_groups(model, group_by)
        names = {name: name[len(prefix) :] for name in record.order}
        if all(name in stripped_modules for name in names.values()):
            found.append((prefix, stripped_params, stripped_modules, names))
    if len(found) == 1:
        prefix, params, modules, names = found[0]
        note = (
            f"the record's group names carry the prefix {prefix!r} (recorded on a module holding this model, such as"
            f" a LightningModule's attribute): matched to this model's groups by stripping it"
        )
        return params, modules, names, note
    missing = [name for name in record.order if name not in modules]
    why = f"several leading prefixes fit ({[p for p, *_ in found]})" if found else "nor with a leading prefix stripped"
    raise ValueError(
        f"`model` has no group module {missing} of the record; its groups are {list(modules)}, the record's are"
        f" {list(record.order)} ({why}): record the probe on this model"
    )


def _prefixes(record: ProbeRecord) -> list[tuple[str, Any]]:
    """Leading dotted prefixes common to every recorded name, each with the ``group_by`` that names what remains.

    ``"auto"`` names a wrapped model's groups as the wrapper's minus the path to it (it descends into wrappers); an
    int depth loses one level per component stripped; a dict of regexes names its groups itself (no prefix).
    """
    if isinstance(record.group_by, Mapping) or not record.order:
        return []
    found = []
    for depth, prefix in enumerate(common_prefixes(record.order), start=1):
        group_by = record.group_by
        if isinstance(group_by, int):
            if group_by - depth < 1:
                break
            group_by = group_by - depth
        found.append((prefix, group_by))
    return found


def _rule(
    order: list[str],
    params: Mapping[str, list[str]],
    output: Mapping[str, float],
    own: Mapping[str, float],
    tolerance: float,
) -> tuple[dict[str, float], str | None]:
    """Scores by the module docstring's rule: ``own`` where replayed, else the output change up to the first change."""
    scores = dict.fromkeys(params, 0.0)
    downstream: list[str] = []
    unscored = [name for name in params if name not in order]
    changed_before = False
    for name in order:
        value = own.get(name)
        if value is None:
            value = output.get(name)
            if value is None:
                unscored.append(name)
            elif changed_before:
                downstream.append(name)
                value = None
        if value is not None:
            scores[name] = value if math.isfinite(value) else 1e300
        if output.get(name, 0.0) > tolerance:
            changed_before = True
    for name, value in scores.items():
        if value <= tolerance:
            scores[name] = 0.0
    notes = []
    if downstream:
        notes.append(f"group(s) {downstream} run after a changed group and were not replayed: not scored")
    if unscored:
        notes.append(f"group(s) {unscored} are not in the record or gave no readable output: not scored")
    changed = max((v for v in output.values() if math.isfinite(v)), default=0.0)
    if all(value == 0 for value in scores.values()) and changed > tolerance and unscored:
        # Every scored group reproduces its own function, yet outputs moved: only an unscored group can be the cause.
        for name in unscored:
            scores[name] = changed
        notes.append(
            f"no scored group changed its own function, but outputs changed (up to {changed:.3g}): the cause is in"
            f" a group that could not be scored, {unscored}, which are scored with that change"
        )
    elif all(value == 0 for value in scores.values()):
        notes.append(f"no group's function changed by more than the tolerance {tolerance:g} on the probe set")
    return scores, "; ".join(notes) or None
