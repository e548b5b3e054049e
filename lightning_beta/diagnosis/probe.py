"""Probe localizer: which layer group's *function* changed, seen through a fixed probe set and replayed inputs.

Ours, not the paper's. :func:`~lightning_beta.diagnosis.drift.activation_drift` compares per-feature means and
variances, so a fault that keeps each channel's marginal distribution (a permutation of a layer's output channels
with their statistics matched, a sign flip balanced by the bias, a kernel mirrored) is invisible at the group that
holds it, and the drift it causes downstream is credited to a later group. The probe compares the outputs
themselves, sample by sample:

- :func:`record_probe`, on the healthy model: a small fixed set of probe inputs (64 to 256 samples), one forward
  pass in eval mode under ``torch.no_grad()``, and for each group (a) its output, *sketched*: the per-sample output
  flattened to ``D`` numbers times a fixed Gaussian projection ``R`` of shape ``(D, sketch_dim)`` (entries
  ``N(0, 1/sketch_dim)``, drawn from a generator seeded by ``seed`` and the group's name, regenerated rather
  than stored), so a group costs ``N x sketch_dim`` floats; (b) with ``replay=True``, the inputs the group's
  module received (its positional and keyword arguments), kept whole.
- :func:`probe_localize`, on the model to examine: the same probe inputs through the model; per group the relative
  change of its sketched output ``||S_now - S_ref||_F / ||S_ref||_F`` (``output`` column), and, where inputs were
  recorded, the group's module run on its *recorded reference input* and compared with its recorded reference
  output the same way (``own`` column).

The rule (what makes the first-named group the faulty one):

- ``own`` isolates each group's function exactly: a group whose parameters and buffers are unchanged reproduces
  its reference output bit for bit on its reference input (on CPU; up to the device's non-determinism on
  accelerators, hence ``tolerance``), however much its upstream groups changed. The score is ``own``.
- Without recorded inputs (``replay=False``), a group's output change is its own only while everything upstream is
  unchanged. The groups run in forward order; a group scores its ``output`` change up to and including the first
  group whose change exceeds ``tolerance``; groups after it are downstream of a change and score 0 (their output
  change is still in the ``output`` column). This names the first changed group exactly for one fault in a chain
  of groups; it cannot score a second fault downstream of the first.

Cost: recording is one forward pass over the probe set; localizing is one forward pass plus, with replay, one run
of each group on its stored inputs (together about one more forward pass: 47 ms against 30 ms for one forward of
the digits ResNet on 256 probes, one CPU thread). Memory and file size: ``N x sketch_dim`` floats per group, plus
with replay every group's full input on the probe set (``N`` times the sum of the groups' per-sample input sizes):
4.3 MB for the digits ResNet with 256 probes (0.46 MB without replay), but hundreds of MB for a transformer with
long sequences, where ``replay=False`` is the affordable choice. The projection matrix ``R`` is ``D x sketch_dim``
floats while it is in use.

Assumptions: outputs and inputs are batch-first (dim 0 indexes the probe samples) and have the same per-sample
shape at recording and at localization; the model's forward in eval mode is deterministic.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_beta._checks import check_bool, check_int, check_number
from lightning_beta.diagnosis._batches import model_device
from lightning_beta.diagnosis.scores import LayerScores
from lightning_beta.layer_groups import GroupBy, check_group_by, group_modules, group_parameters, group_sizes
from lightning_beta.reference import evaluating, output_tensor

__all__ = ["ProbeRecord", "probe_localize", "record_probe"]

#: Version of the saved record; :meth:`ProbeRecord.load` refuses others.
PROBE_VERSION = 1


@dataclass
class ProbeRecord:
    """What :func:`record_probe` recorded on the healthy model, and what :func:`probe_localize` compares against.

    Attributes:
        inputs: the probe inputs, a CPU tensor of ``N`` samples (batch-first).
        order: the recorded groups, in the order their modules first ran in the forward pass.
        sketches: group name to its sketched reference output, a ``(N, sketch_dim)`` float32 CPU tensor.
        shapes: group name to the per-sample shape of its output (the projection's ``D`` is their product).
        sketch_dim: numbers per sample in a sketch.
        seed: seed of the projections.
        group_by: the layer groups the record was made with (``"auto"``, an int or a dict of regex lists).
        replay_inputs: group name to ``(args, kwargs)``, the CPU copies of what its module received; empty when
            recorded with ``replay=False``.
        reasons: group name to why it was not recorded (or recorded without replay inputs).
        fingerprints: group name to the first entries of its projection, to check that the generator still draws
            the same matrix when the record is loaded by another torch release.
        version: :data:`PROBE_VERSION`.
    """

    inputs: Tensor
    order: list[str]
    sketches: dict[str, Tensor]
    shapes: dict[str, list[int]]
    sketch_dim: int
    seed: int
    group_by: Any = "auto"
    replay_inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, list[float]] = field(default_factory=dict)
    version: int = PROBE_VERSION

    @property
    def n_samples(self) -> int:
        """Number of probe inputs."""
        return int(self.inputs.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the record holds (inputs, sketches and replay inputs)."""
        tensors = [self.inputs, *self.sketches.values()]
        for args, kwargs in self.replay_inputs.values():
            tensors += [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the record with ``torch.save`` (CPU tensors and plain values), atomically.

        The file is written next to ``path`` under a temporary name and renamed over it, so a reader never sees a
        half-written record.

        Returns:
            The path written.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "version": self.version,
            "inputs": self.inputs,
            "order": list(self.order),
            "sketches": dict(self.sketches),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "sketch_dim": self.sketch_dim,
            "seed": self.seed,
            "group_by": _plain_group_by(self.group_by),
            "replay_inputs": {k: (tuple(a), dict(kw)) for k, (a, kw) in self.replay_inputs.items()},
            "reasons": dict(self.reasons),
            "fingerprints": dict(self.fingerprints),
        }
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(state, handle)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProbeRecord:
        """Read a record written by :meth:`save` (``torch.load(weights_only=True)``: no code is unpickled).

        Raises:
            ValueError: if the file holds no probe record or one of another version.
        """
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "sketches" not in state:
            raise ValueError(f"`path` {str(path)!r} holds no probe record")
        if state.get("version") != PROBE_VERSION:
            raise ValueError(
                f"`path` {str(path)!r} holds a probe record of version {state.get('version')!r}; this release reads"
                f" version {PROBE_VERSION}: record it again with record_probe"
            )
        return cls(
            inputs=state["inputs"],
            order=list(state["order"]),
            sketches=dict(state["sketches"]),
            shapes={k: list(v) for k, v in state["shapes"].items()},
            sketch_dim=int(state["sketch_dim"]),
            seed=int(state["seed"]),
            group_by=state["group_by"],
            replay_inputs={k: (tuple(a), dict(kw)) for k, (a, kw) in state["replay_inputs"].items()},
            reasons=dict(state["reasons"]),
            fingerprints=dict(state["fingerprints"]),
            version=int(state["version"]),
        )


def _plain_group_by(group_by: Any) -> Any:
    if isinstance(group_by, Mapping):
        return {str(k): list(v) for k, v in group_by.items()}
    return group_by


def _probe_inputs(inputs: Any, max_samples: int) -> Tensor:
    """A tensor of at most ``max_samples`` probe inputs from a tensor or from an iterable of batches."""
    if isinstance(inputs, Tensor):
        x = inputs
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, Mapping)):
        parts: list[Tensor] = []
        count = 0
        for batch in inputs:
            first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if not isinstance(first, Tensor):
                raise TypeError(
                    "`inputs` as an iterable must yield tensors or (inputs, targets) tuples/lists,"
                    f" got a batch of {type(first).__name__}"
                )
            parts.append(first)
            count += first.shape[0] if first.dim() else 1
            if count >= max_samples:
                break
        if not parts:
            raise ValueError("`inputs` yielded no batch: the probe needs at least one input")
        x = torch.cat(parts)
    else:
        raise TypeError(f"`inputs` must be a tensor or an iterable of batches, got {type(inputs).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"`inputs` must hold at least one sample along dim 0, got shape {tuple(x.shape)}")
    return x[:max_samples].detach().cpu().clone()


def _projection(seed: int, name: str, width: int, sketch_dim: int, device: torch.device) -> Tensor:
    """The fixed Gaussian projection of group ``name``: ``(width, sketch_dim)``, entries N(0, 1/sketch_dim).

    Drawn from a CPU generator seeded with ``seed * 1_000_003 + crc32(name)``, so each group's matrix depends on its
    name only, not on which other groups were recorded.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(width, sketch_dim, generator=gen) / math.sqrt(sketch_dim)).to(device)


def _sketch(output: Tensor, proj: Tensor) -> Tensor:
    return output.detach().reshape(output.shape[0], -1).to(proj.dtype) @ proj


def _relative_change(now: Tensor, ref: Tensor) -> float:
    ref = ref.to(now.device)
    scale = float(torch.linalg.vector_norm(ref.double()))
    diff = float(torch.linalg.vector_norm((now - ref).double()))
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _storable(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` can read ``value`` back: tensors and plain Python values."""
    if value is None or isinstance(value, (Tensor, bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _storable(v) for k, v in value.items())
    return False


class _Capture:
    """Forward hooks sketching each group's output (and optionally copying its inputs) on one forward pass.

    The output is sketched and the inputs copied inside the hooks, before a later in-place operation (an
    ``nn.ReLU(inplace=True)`` after the group) can change them.
    """

    def __init__(
        self, modules: Mapping[str, nn.Module], n_samples: int, sketch: Callable[[str, Tensor], Tensor], inputs: bool
    ) -> None:
        self.modules = modules
        self.n_samples = n_samples
        self.sketch = sketch
        self.inputs = inputs
        self.order: list[str] = []
        self.sketches: dict[str, Tensor] = {}
        self.shapes: dict[str, list[int]] = {}
        self.arguments: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.calls: dict[str, int] = {}
        self.reasons: dict[str, str] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _Capture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._post(name)))
            if self.inputs:
                self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in self.arguments:
                self.arguments[name] = (_cpu(tuple(args)), _cpu(dict(kwargs)))

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1:
                return
            self.order.append(name)
            tensor = output_tensor(output)
            if tensor is None:
                self.reasons[name] = f"its output ({type(output).__name__}) holds no floating-point tensor"
            elif tensor.dim() == 0 or tensor.shape[0] != self.n_samples:
                self.reasons[name] = (
                    f"its output of shape {tuple(tensor.shape)} is not batch-first over the {self.n_samples} probes"
                )
            else:
                self.shapes[name] = list(tensor.shape[1:])
                self.sketches[name] = self.sketch(name, tensor)

        return hook


def _run(
    model: nn.Module,
    inputs: Tensor,
    modules: Mapping[str, nn.Module],
    sketch: Callable[[str, Tensor], Tensor],
    capture_inputs: bool,
) -> _Capture:
    capture = _Capture(modules, inputs.shape[0], sketch, capture_inputs)
    with evaluating(model), capture:
        model(inputs.to(model_device(model)))
    for name, calls in capture.calls.items():
        if calls > 1:
            capture.reasons[name] = f"its module ran {calls} times in one forward pass (a reused module)"
    for name in modules:
        if name not in capture.calls:
            capture.reasons.setdefault(name, "its module did not run in the forward pass")
    return capture


def _groups(model: Any, groups: GroupBy | None) -> tuple[GroupBy, dict[str, list[str]], dict[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    try:
        group_by = check_group_by("auto" if groups is None else groups)
    except (TypeError, ValueError) as err:
        raise type(err)(f"`groups`: {err}") from err
    params = group_parameters(model, group_by)
    return group_by, params, group_modules(model, params)


def record_probe(
    model: nn.Module,
    inputs: Tensor | Iterable[Any],
    groups: GroupBy | None = None,
    sketch_dim: int = 64,
    seed: int = 0,
    replay: bool = True,
    max_samples: int = 256,
) -> ProbeRecord:
    """Record each layer group's output on a fixed probe set, sketched, as the reference of :func:`probe_localize`.

    One forward pass of all probe inputs at once, in eval mode under ``torch.no_grad()``, with a forward hook on each
    group's module (:func:`~lightning_beta.layer_groups.group_modules`); the model is left as it was (training
    flags, buffers; see :func:`~lightning_beta.reference.evaluating`). See the module docstring for the sketch,
    what replay stores and what it costs.

    Args:
        model: the healthy model; ``model(inputs)`` must run it.
        inputs: the probe inputs, a tensor of samples along dim 0, or an iterable of batches (a dataloader; the first
            element of an ``(inputs, targets)`` batch is taken) read until ``max_samples`` samples.
        groups: layer groups, as ``group_by`` of :func:`~lightning_beta.layer_groups.group_parameters`; ``None``
            is ``"auto"``. Defaults to ``None``.
        sketch_dim: numbers per sample in each group's sketch. Defaults to ``64``.
        seed: seed of the fixed random projections. Defaults to ``0``.
        replay: also keep each group's inputs, so that :func:`probe_localize` can replay each group alone.
            Defaults to ``True``.
        max_samples: at most this many probe inputs are kept. Defaults to ``256``.

    Returns:
        The record; groups that could not be recorded (no readable output, a module run twice, or a module not
        run) are left out with their reason in :attr:`ProbeRecord.reasons`.

    Raises:
        TypeError: if ``model`` is not a module, ``inputs`` is not a tensor or an iterable of batches, or an
            argument has the wrong type.
        ValueError: if ``inputs`` holds no sample, ``sketch_dim`` or ``max_samples`` is below 1, or no group's
            output could be recorded.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> record = record_probe(net, torch.randn(32, 4), sketch_dim=16)
        >>> record.order, tuple(record.sketches["2"].shape), record.n_samples
        (['0', '2'], (32, 16), 32)
    """
    check_int("sketch_dim", sketch_dim, minimum=1)
    check_int("seed", seed, minimum=0)
    check_bool("replay", replay)
    check_int("max_samples", max_samples, minimum=1)
    group_by, params, modules = _groups(model, groups)
    x = _probe_inputs(inputs, max_samples)
    fingerprints: dict[str, list[float]] = {}

    def sketch(name: str, output: Tensor) -> Tensor:
        proj = _projection(seed, name, output[0].numel(), sketch_dim, output.device)
        fingerprints[name] = proj.flatten()[:4].cpu().tolist()
        return _sketch(output, proj).float().cpu()

    capture = _run(model, x, modules, sketch, capture_inputs=replay)
    reasons = {name: "the group is not one module's parameters" for name in params if name not in modules}
    reasons.update(capture.reasons)
    order = [name for name in capture.order if name not in reasons]
    replay_inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    for name in order if replay else []:
        if _storable(capture.arguments[name]):
            replay_inputs[name] = capture.arguments[name]
        else:
            reasons[name] = "recorded without replay inputs: its module received a value torch.load cannot read"
    if not order:
        raise ValueError(f"no group's output could be recorded on the probe inputs: {reasons}")
    return ProbeRecord(
        inputs=x,
        order=order,
        sketches={name: capture.sketches[name] for name in order},
        shapes={name: capture.shapes[name] for name in order},
        sketch_dim=sketch_dim,
        seed=seed,
        group_by=_plain_group_by(group_by),
        replay_inputs=replay_inputs,
        reasons=reasons,
        fingerprints={name: fingerprints[name] for name in order},
    )


def probe_localize(model: nn.Module, record: ProbeRecord, tolerance: float = 1e-4, replay: bool = True) -> LayerScores:
    """Score each group by how much its own function changed on the probe set (see the module docstring's rule).

    Args:
        model: the model to examine, with the groups the record was made on.
        record: from :func:`record_probe` on the healthy model (or :meth:`ProbeRecord.load`).
        tolerance: a relative change at most this large counts as unchanged: rounding differences between devices
            or kernels (a float64 replay of a float32 record gives at most 4e-7 on the digits models; TF32 matmuls
            round at about 1e-3 and need a larger tolerance). Defaults to ``1e-4``.
        replay: run each group on its recorded input where the record has it. ``False`` uses the first-change
            rule for every group. Defaults to ``True``.

    Returns:
        Scores with ``method="probe"`` and the detail columns ``output`` (relative change of the group's output on
        the probe inputs) and ``own`` (relative change of its output on its recorded input; absent without
        replay). A group scores 0 where it cannot be scored; :attr:`LayerScores.message` says which and why.

    Raises:
        TypeError: if ``model`` is not a module or ``record`` is not a :class:`ProbeRecord`.
        ValueError: if ``tolerance`` is negative, or the model does not fit the record (a group missing, another
            output shape, another projection).

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
    _, params, modules = _groups(model, record.group_by)
    missing = [name for name in record.order if name not in modules]
    if missing:
        raise ValueError(
            f"`model` has no group module {missing} of the record; its groups are {list(modules)}: record the probe"
            " on this model"
        )
    device = model_device(model)
    projections: dict[str, Tensor] = {}
    for name in record.order:
        proj = _projection(record.seed, name, math.prod(record.shapes[name]), record.sketch_dim, device)
        if proj.flatten()[:4].cpu().tolist() != record.fingerprints[name]:
            raise ValueError(
                f"`record`'s projection of group {name!r} cannot be regenerated by this torch release: record the"
                " probe again"
            )
        projections[name] = proj

    def sketch(name: str, output: Tensor) -> Tensor:
        if list(output.shape[1:]) != record.shapes[name]:
            raise ValueError(
                f"`model` does not fit the record: group {name!r} outputs shape {tuple(output.shape)}, the record has"
                f" ({record.n_samples}, {', '.join(map(str, record.shapes[name]))})"
            )
        return _sketch(output, projections[name])

    recorded = {name: modules[name] for name in record.order}
    capture = _run(model, record.inputs, recorded, sketch, capture_inputs=False)
    output = {name: _relative_change(now, record.sketches[name]) for name, now in capture.sketches.items()}
    own: dict[str, float] = {}
    if replay and record.replay_inputs:
        with evaluating(model):
            for name in record.order:
                if name not in record.replay_inputs:
                    continue
                args, kwargs = _to(record.replay_inputs[name], device)
                out = output_tensor(modules[name](*args, **kwargs))
                if out is not None and out.dim() > 0 and out.shape[0] == record.n_samples:
                    own[name] = _relative_change(sketch(name, out), record.sketches[name])
    scores, message = _rule(record, params, output, own, tolerance)
    details = {"output": output, **({"own": own} if own else {})}
    return LayerScores(
        scores=scores,
        method="probe",
        n_params=group_sizes(model, params),
        details=details,
        n_samples=record.n_samples,
        message=message,
    )


def _rule(
    record: ProbeRecord,
    params: Mapping[str, list[str]],
    output: Mapping[str, float],
    own: Mapping[str, float],
    tolerance: float,
) -> tuple[dict[str, float], str | None]:
    """Scores by the module docstring's rule: ``own`` where replayed, else the output change up to the first change."""
    scores = dict.fromkeys(params, 0.0)
    downstream: list[str] = []
    unscored = [name for name in params if name not in record.order]
    changed_before = False
    for name in record.order:
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
    if all(value == 0 for value in scores.values()):
        notes.append(f"no group's function changed by more than the tolerance {tolerance:g} on the probe set")
    return scores, "; ".join(notes) or None
