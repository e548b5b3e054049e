"""Probe records: each layer group's output on a fixed set of probe inputs, sketched, recorded on the healthy model.

The recording half of the probe localizer (the other half, ``lightning_beta.diagnosis.probe_localize``, compares a
model with a record). It lives outside :mod:`lightning_beta.diagnosis` so that ``LayerAttributionCallback`` records
a probe at the end of a fit without importing diagnosis.

:func:`record_probe`, on the healthy model: a small fixed set of probe inputs (64 to 256 samples), one forward pass
``forward(model, inputs)`` in eval mode under ``torch.no_grad()``, and for each group (a) its output, *sketched*:
the per-sample output flattened to ``D`` numbers times a fixed Gaussian projection ``R`` of shape
``(D, sketch_dim)``, so a group costs ``N x sketch_dim`` floats; (b) with ``replay=True``, the inputs the group's
module received (its positional and keyword arguments), kept whole.

The projection of group ``name`` is regenerated rather than stored: ``torch.randn(D, sketch_dim, generator=g) /
sqrt(sketch_dim)`` with ``g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))``, on the
CPU, so it depends on the group's name only; the record keeps its first entries to check that another torch release
still draws the same matrix.

Probe inputs are what the forward eats, batch-first (dim 0 indexes the probe samples): a tensor, or a dict of
tensors (a Hugging Face batch: ``input_ids``, ``attention_mask``, ``labels`` ...), or, with a ``forward`` of your
own, any tuple, list or dict of tensors (non-tensor values are kept from the first batch). The default forward is
:func:`~lightning_beta.reference.default_forward` (a tensor as ``model(x)``, a dict as keyword arguments), the
convention of the reference statistics; the localizer must run the model the same way.

Cost: one forward pass over the probe set. Memory and file size: the probe inputs, ``N x sketch_dim`` floats per
group, plus with replay every group's full input on the probe set (``N`` times the sum of the groups' per-sample
input sizes): 4.3 MB for the digits ResNet with 256 probes (0.46 MB without replay), but hundreds of MB for a
transformer with long sequences, where ``replay=False`` is the affordable choice.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_beta._checks import check_bool, check_int
from lightning_beta._probe_inputs import (
    batch_size,
    cpu_copy,
    model_device,
    probe_inputs,
    storable,
    tensors_of,
    to_device,
)
from lightning_beta.layer_groups import GroupBy, check_group_by, group_modules, group_parameters
from lightning_beta.reference import Forward, default_forward, evaluating, output_tensor

__all__ = ["PROBE_VERSION", "ProbeRecord", "load_probe", "probe_file_name", "record_probe"]

#: Version of the saved record; :meth:`ProbeRecord.load` reads this one and the earlier ones.
PROBE_VERSION = 2
#: Versions :meth:`ProbeRecord.load` reads (1: tensor inputs only).
READABLE_PROBE_VERSIONS = (1, 2)


@dataclass
class ProbeRecord:
    """What :func:`record_probe` recorded on the healthy model, and what ``probe_localize`` compares against.

    Attributes:
        inputs: the probe inputs on the CPU, batch-first: a tensor of ``N`` samples, a dict of such tensors, or the
            batch structure a custom ``forward`` takes.
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
        weight_norms: group name to the L2 norm of its parameters at recording (every group of the model, the
            unrecorded included), to tell a fault in a few groups from a record made on another run; empty in
            records of release 0.1.
        version: :data:`PROBE_VERSION`.
    """

    inputs: Any
    order: list[str]
    sketches: dict[str, Tensor]
    shapes: dict[str, list[int]]
    sketch_dim: int
    seed: int
    group_by: Any = "auto"
    replay_inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, list[float]] = field(default_factory=dict)
    weight_norms: dict[str, float] = field(default_factory=dict)
    version: int = PROBE_VERSION

    @property
    def n_samples(self) -> int:
        """Number of probe inputs."""
        return batch_size(self.inputs)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the record holds (inputs, sketches and replay inputs)."""
        tensors = [*tensors_of(self.inputs), *self.sketches.values()]
        for args, kwargs in self.replay_inputs.values():
            tensors += tensors_of((args, kwargs))
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
            "weight_norms": dict(self.weight_norms),
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
            ValueError: if the file holds no probe record or one of a version this release does not read.
        """
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "sketches" not in state:
            raise ValueError(f"`path` {str(path)!r} holds no probe record")
        if state.get("version") not in READABLE_PROBE_VERSIONS:
            raise ValueError(
                f"`path` {str(path)!r} holds a probe record of version {state.get('version')!r}; this release reads"
                f" versions {' and '.join(map(str, READABLE_PROBE_VERSIONS))}: record it again with record_probe"
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
            weight_norms={k: float(v) for k, v in state.get("weight_norms", {}).items()},
            version=int(state["version"]),
        )


def probe_file_name(artifact_name: str) -> str:
    """The file name of the probe saved beside an artifact: ``attribution.json`` -> ``attribution.probe.pt``.

    Example:
        >>> probe_file_name("attribution.json"), probe_file_name("run")
        ('attribution.probe.pt', 'run.probe.pt')
    """
    return f"{Path(artifact_name).stem}.probe.pt"


def load_probe(artifact: Any) -> ProbeRecord:
    """The probe record of an attribution artifact, read from the file its ``probe_path`` names.

    ``probe_path`` is relative to the artifact's file, so the artifact must have been read from disk
    (:func:`~lightning_beta.artifact.load_attribution` keeps its path) or passed as that path.

    Args:
        artifact: an :class:`~lightning_beta.artifact.AttributionArtifact` read from a file, or the path of an
            ``attribution.json``.

    Returns:
        The record (see :meth:`ProbeRecord.load`).

    Raises:
        TypeError: if ``artifact`` is neither an artifact nor a path.
        ValueError: if the artifact has no probe (written with ``probe_samples=0``, after an exception, or by an
            earlier release), or it was not read from a file.
        FileNotFoundError: if the probe file is not next to the artifact.
    """
    from lightning_beta.artifact import AttributionArtifact, load_attribution

    if isinstance(artifact, (str, os.PathLike)):
        artifact = load_attribution(artifact)
    if not isinstance(artifact, AttributionArtifact):
        raise TypeError(f"`artifact` must be an AttributionArtifact or its path, got {type(artifact).__name__}")
    if artifact.probe_path is None:
        raise ValueError(
            "`artifact` has no probe: it was written with `probe_samples=0`, after an exception, by a release before"
            " schema 3, or the probe could not be recorded (the fit warned why)"
        )
    if artifact.path is None:
        raise ValueError(
            f"`artifact` names the probe file {artifact.probe_path!r} relative to its own file, but it was not read"
            " from a file: pass the path of the attribution.json, or the artifact from `load_attribution`"
        )
    path = artifact.path.parent / artifact.probe_path
    if not path.is_file():
        raise FileNotFoundError(
            f"the artifact {str(artifact.path)!r} names the probe file {artifact.probe_path!r}, which is not beside"
            " it: keep the two files together"
        )
    return ProbeRecord.load(path)


def _plain_group_by(group_by: Any) -> Any:
    if isinstance(group_by, Mapping):
        return {str(k): list(v) for k, v in group_by.items()}
    return group_by


def projection(seed: int, name: str, width: int, sketch_dim: int, device: torch.device) -> Tensor:
    """The fixed Gaussian projection of group ``name``: ``(width, sketch_dim)``, entries N(0, 1/sketch_dim).

    Drawn from a CPU generator seeded with ``seed * 1_000_003 + crc32(name)``, so each group's matrix depends on its
    name only, not on which other groups were recorded.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(width, sketch_dim, generator=gen) / math.sqrt(sketch_dim)).to(device)


def sketch_output(output: Tensor, proj: Tensor) -> Tensor:
    """A batch-first output flattened per sample, times the projection."""
    return output.detach().reshape(output.shape[0], -1).to(proj.dtype) @ proj


class Capture:
    """Forward hooks sketching each group's output (and optionally copying its inputs) on one forward pass.

    The output is sketched and the inputs copied inside the hooks, before a later in-place operation (an
    ``nn.ReLU(inplace=True)`` after the group) can change them.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        n_samples: int,
        sketch: Callable[[str, Tensor], Tensor],
        inputs: bool,
        max_input_bytes: int | None = None,
    ) -> None:
        self.modules = modules
        self.n_samples = n_samples
        self.sketch = sketch
        self.inputs = inputs
        self.max_input_bytes = max_input_bytes
        self.input_bytes = 0  # of the inputs copied so far; past ``max_input_bytes`` every copy is dropped
        self.order: list[str] = []
        self.sketches: dict[str, Tensor] = {}
        self.shapes: dict[str, list[int]] = {}
        self.arguments: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.calls: dict[str, int] = {}
        self.reasons: dict[str, str] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
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
            if name in self.arguments or not self.inputs:
                return
            self.input_bytes += sum(t.numel() * t.element_size() for t in tensors_of((args, kwargs)))
            if self.max_input_bytes is not None and self.input_bytes > self.max_input_bytes:
                self.inputs = False  # over the budget: keep none rather than some
                self.arguments.clear()
                return
            self.arguments[name] = (cpu_copy(tuple(args)), cpu_copy(dict(kwargs)))

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


def run_probe(
    model: nn.Module,
    inputs: Any,
    modules: Mapping[str, nn.Module],
    sketch: Callable[[str, Tensor], Tensor],
    capture_inputs: bool,
    forward: Forward | None = None,
    max_input_bytes: int | None = None,
) -> Capture:
    """One ``forward(model, inputs)`` in eval mode under ``torch.no_grad()``, with :class:`Capture` on ``modules``."""
    capture = Capture(modules, batch_size(inputs), sketch, capture_inputs, max_input_bytes)
    with evaluating(model), capture:
        (forward or default_forward)(model, to_device(inputs, model_device(model)))
    for name, calls in capture.calls.items():
        if calls > 1:
            capture.reasons[name] = f"its module ran {calls} times in one forward pass (a reused module)"
    for name in modules:
        if name not in capture.calls:
            capture.reasons.setdefault(name, "its module did not run in the forward pass")
    return capture


def resolve_groups(model: Any, groups: GroupBy | None) -> tuple[GroupBy, dict[str, list[str]], dict[str, nn.Module]]:
    """The checked ``group_by``, the model's layer groups and their modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    try:
        group_by = check_group_by("auto" if groups is None else groups)
    except (TypeError, ValueError) as err:
        raise type(err)(f"`groups`: {err}") from err
    params = group_parameters(model, group_by)
    return group_by, params, group_modules(model, params)


def weight_norms(model: nn.Module, groups: Mapping[str, list[str]]) -> dict[str, float]:
    """The L2 norm of each group's parameters (in float64, on the host); empty for sharded (DTensor) parameters."""
    named = dict(model.named_parameters())
    if any(hasattr(p, "placements") for p in named.values()):  # a shard's norm is not the tensor's
        return {}
    norms = {}
    with torch.no_grad():
        for name, params in groups.items():
            total = sum(float(named[p].detach().double().pow(2).sum()) for p in params if p in named)
            norms[name] = math.sqrt(total)
    return norms


def check_forward(forward: Any) -> None:
    """Raise ``TypeError`` unless ``forward`` is ``None`` or a callable."""
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be None or a callable forward(model, inputs), got {type(forward).__name__}")


def record_probe(
    model: nn.Module,
    inputs: Any,
    groups: GroupBy | None = None,
    sketch_dim: int = 64,
    seed: int = 0,
    replay: bool = True,
    max_samples: int = 256,
    forward: Forward | None = None,
    max_replay_bytes: int | None = None,
) -> ProbeRecord:
    """Record each layer group's output on a fixed probe set, sketched, as the reference of ``probe_localize``.

    One forward pass of all probe inputs at once, ``forward(model, inputs)`` in eval mode under
    ``torch.no_grad()``, with a forward hook on each group's module
    (:func:`~lightning_beta.layer_groups.group_modules`); the model is left as it was (training flags, buffers; see
    :func:`~lightning_beta.reference.evaluating`). See the module docstring for the inputs, the sketch, what replay
    stores and what it costs.

    Args:
        model: the healthy model.
        inputs: the probe inputs: a tensor of samples along dim 0, a dict of such tensors (a Hugging Face batch),
            or an iterable of batches (a dataloader) read until ``max_samples`` samples; of a batch the default
            forward's inputs are kept (the first element of an ``(inputs, targets)`` tuple), with a custom
            ``forward`` the whole batch.
        groups: layer groups, as ``group_by`` of :func:`~lightning_beta.layer_groups.group_parameters`; ``None``
            is ``"auto"``. Defaults to ``None``.
        sketch_dim: numbers per sample in each group's sketch. Defaults to ``64``.
        seed: seed of the fixed random projections. Defaults to ``0``.
        replay: also keep each group's inputs, so that ``probe_localize`` can replay each group alone.
            Defaults to ``True``.
        max_samples: at most this many probe inputs are kept. Defaults to ``256``.
        forward: ``forward(model, inputs)`` runs the model on the probe inputs without side effects; the localizer
            needs the same. Defaults to ``None`` (:func:`~lightning_beta.reference.default_forward`: a tensor as
            ``model(x)``, a dict as keyword arguments).
        max_replay_bytes: with ``replay``, the most bytes of group inputs to keep; past it none is kept (each
            group's reason says so) and the localizer uses the first-change rule. ``None`` keeps them all.
            Defaults to ``None``.

    Returns:
        The record; groups that could not be recorded (no readable output, a module run twice, or a module not
        run) are left out with their reason in :attr:`ProbeRecord.reasons`.

    Raises:
        TypeError: if ``model`` is not a module, ``inputs`` is not a tensor, a dict or an iterable of batches,
            ``forward`` is not callable, or an argument has the wrong type.
        ValueError: if ``inputs`` holds no sample or tensors that are not batch-first, ``sketch_dim`` or
            ``max_samples`` is below 1, or no group's output could be recorded.

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
    check_int("max_replay_bytes", max_replay_bytes, minimum=0, optional=True)
    check_forward(forward)
    group_by, params, modules = resolve_groups(model, groups)
    x = probe_inputs(inputs, max_samples, whole_batches=forward is not None)
    fingerprints: dict[str, list[float]] = {}

    def sketch(name: str, output: Tensor) -> Tensor:
        proj = projection(seed, name, output[0].numel(), sketch_dim, output.device)
        fingerprints[name] = proj.flatten()[:4].cpu().tolist()
        return sketch_output(output, proj).float().cpu()

    capture = run_probe(model, x, modules, sketch, replay, forward, max_replay_bytes)
    reasons = {name: "the group is not one module's parameters" for name in params if name not in modules}
    reasons.update(capture.reasons)
    order = [name for name in capture.order if name not in reasons]
    replay_inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    over = replay and not capture.inputs  # the budget ran out: no group keeps its inputs
    for name in order if over else []:
        reasons[name] = (
            f"recorded without replay inputs: the groups' inputs on the probe set exceed `max_replay_bytes`"
            f" ({max_replay_bytes} bytes)"
        )
    for name in order if replay and not over else []:
        if storable(capture.arguments[name]):
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
        weight_norms=weight_norms(model, params),
    )
