"""Reference statistics: per-feature mean and variance of each layer group's output, the drift localizer's reference.

One implementation for both places that need them: :func:`record_reference` at the end of a fit (what
``LayerAttributionCallback`` stores in its artifact) and ``lightning_beta.diagnosis.reference_statistics`` /
``activation_drift`` without a Trainer, so that at diagnosis time exactly what the reference recorded is measured
the same way: the same inputs, the same feature dim, the same sums.

Where the statistics come from: a plain forward pass, ``forward(model, batch)`` (by default :func:`default_forward`,
``model(inputs)``), in eval mode under ``torch.no_grad()``, with a forward hook on each group's module feeding its
output into a :class:`FeatureMoments`. The user's ``training_step`` is not run: its side effects (an EMA teacher, a
queue, a step counter, ``self.log``, a collective) would move the model after training ended. What the pass
leaves as it was: every module's ``training`` flag (restored one by one, so a teacher kept in eval mode stays so),
the random number generators (iterating a shuffled dataloader draws from them), the hooks, and the buffers (a
buffer the forward changes is restored, with a warning). What it cannot undo: Python attributes or parameters that
``forward`` itself changes; a ``forward`` with side effects needs the ``forward=`` override.

Which dim is a feature (:func:`default_feature_dim`): dim 1 for the outputs of convolutions, BatchNorm, instance or
group norms and pooling (``(B, C, ...)``), the last dim for everything else: Linear, attention, LayerNorm,
Embedding, recurrent and transformer blocks (``(B, T, C)``; dim 1 there is the sequence position, whose count
changes with the input). A container module takes the rule of its last such submodule. The dim is stored in
:class:`~lightning_beta.artifact.ReferenceStats` and used again at diagnosis time.
"""

from __future__ import annotations

import inspect
import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd
from torchmetrics import Metric

from lightning_beta.artifact import ReferenceStats

Forward = Callable[[nn.Module, Any], Any]
FeatureDim = int | Mapping[str, int] | None

#: Modules whose output is ``(B, C, ...)``: the feature is dim 1.
_CHANNELS_FIRST = (
    _ConvNd,
    _BatchNorm,
    _InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    _MaxPoolNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
)
#: Modules whose output is ``(..., C)``: the feature is the last dim.
_FEATURES_LAST = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


class FeatureMoments(Metric):
    """Running per-feature sum, sum of squares and count of activations, summed across processes.

    Sum states with ``dist_reduce_fx="sum"``, so a synced metric holds the statistics of the global batches; a
    process that never received an update contributes zeros (of the width the others agreed on, see
    :meth:`resize`). The width is taken from the first update when ``num_features`` is ``None``.

    Args:
        feature_dim: the dim of an activation that indexes features; a 0-D or 1-D activation is one feature.
            Defaults to ``-1``.
        num_features: the number of features, or ``None`` to take it from the first update. Defaults to ``None``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: from :meth:`update`, if an activation has another number of features than the earlier ones.

    Example:
        >>> m = FeatureMoments(feature_dim=1)
        >>> m.update(torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[5.0, 7.0], [2.0, 2.0]]]))  # (B=2, C=2, L=2)
        >>> mean, var = m.compute()
        >>> mean.tolist(), var.tolist(), int(m.count)
        ([4.0, 1.0], [5.0, 1.0], 4)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(self, feature_dim: int = -1, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature_dim = feature_dim
        width = 0 if num_features is None else num_features
        self.add_state("total", torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def num_features(self) -> int:
        """The number of features (0 before the first update of a metric built without ``num_features``)."""
        return int(self.total.shape[0])

    def resize(self, num_features: int) -> None:
        """Give a metric that has no features yet ``num_features`` zero sums, so that it can be synced.

        Raises:
            ValueError: if the metric already has another number of features.
        """
        if self.num_features == 0:
            self.total = torch.zeros(num_features, dtype=torch.float64, device=self.count.device)
            self.total_sq = torch.zeros_like(self.total)
        elif self.num_features != num_features:
            raise ValueError(f"has {self.num_features} feature(s), cannot resize to {num_features}")

    def update(self, activation: Tensor) -> None:
        """Add an activation's values, one row per position and sample, one column per feature."""
        rows = as_features(activation, self.feature_dim)
        if self.num_features == 0:
            self.resize(rows.shape[1])
        elif rows.shape[1] != self.num_features:
            raise ValueError(
                f"its output has {rows.shape[1]} feature(s) along dim {self.feature_dim} in one batch and"
                f" {self.num_features} in an earlier one"
            )
        self.total += rows.sum(0)
        self.total_sq += (rows * rows).sum(0)
        self.count += rows.shape[0]

    def compute(self) -> tuple[Tensor, Tensor]:
        """Per-feature mean and population variance (float64; torchmetrics makes a one-feature result 0-D)."""
        return self.moments()

    def moments(self) -> tuple[Tensor, Tensor]:
        """:meth:`compute` without torchmetrics' wrapper: always ``(C,)``, no warning on a process without updates."""
        mean = self.total / self.count
        return mean, (self.total_sq / self.count - mean * mean).clamp_min(0)

    def to_reference(self) -> ReferenceStats:
        """The statistics as a :class:`~lightning_beta.artifact.ReferenceStats` (host lists)."""
        mean, var = self.moments()
        return ReferenceStats(mean.cpu().tolist(), var.cpu().tolist(), round(float(self.count)), self.feature_dim)


def as_features(activation: Tensor, feature_dim: int) -> Tensor:
    """An activation as float64 ``(rows, features)``: ``feature_dim`` moved last, everything else flattened.

    Example:
        >>> as_features(torch.zeros(2, 7, 4), -1).shape, as_features(torch.zeros(2, 3, 5, 5), 1).shape
        (torch.Size([14, 4]), torch.Size([50, 3]))
    """
    x = activation.detach().to(torch.float64)
    if x.dim() <= 1:
        return x.reshape(-1, 1)
    return x.movedim(feature_dim, -1).reshape(-1, x.shape[feature_dim])


def default_feature_dim(module: nn.Module) -> int:
    """Which dim of ``module``'s output is a feature: ``1`` for convolution-type outputs, else ``-1``.

    The module's own type decides if it is a known one; a container takes the rule of its last known submodule
    (registration order: a ResNet block ends with BatchNorm, a transformer block with Linear or LayerNorm); a
    module with none is taken as features-last.

    Example:
        >>> default_feature_dim(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
        1
        >>> default_feature_dim(nn.TransformerEncoderLayer(16, 2)), default_feature_dim(nn.Linear(4, 4))
        (-1, -1)
    """
    for sub in itertools.chain([module], reversed(list(module.modules()))):
        if isinstance(sub, _CHANNELS_FIRST):
            return 1
        if isinstance(sub, _FEATURES_LAST):
            return -1
    return -1


def output_tensor(output: Any) -> Tensor | None:
    """The activation a module's output stands for, or ``None`` if there is no floating-point one.

    A tensor itself; a mapping (a Hugging Face ``ModelOutput``) its ``last_hidden_state``, else its ``logits``, else
    its first value; a tuple or list its first element (a transformer block's ``(hidden_states, ...)``).

    Example:
        >>> output_tensor((torch.ones(2, 3), None)).shape, output_tensor({"logits": torch.ones(1)}).shape
        (torch.Size([2, 3]), torch.Size([1]))
        >>> output_tensor(torch.arange(3)) is None
        True
    """
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "logits"):
            if isinstance(output.get(key), Tensor):
                return output_tensor(output[key])
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return output_tensor(output[0]) if output else None
    return output if isinstance(output, Tensor) and output.is_floating_point() else None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch's inputs: the default of the reference pass and of the drift localizer.

    The inputs are the batch itself if it is a tensor, the first element of a tuple or list (``(inputs, targets)``),
    and a mapping (a Hugging Face batch, or such a first element) is passed as keyword arguments: the keys that
    ``model.forward`` accepts (all of them if it takes ``**kwargs``), or its ``"x"`` alone when it accepts none of
    them (the diagnosis batches ``{"x": inputs, "y": targets}``).

    Raises:
        TypeError: if the batch is an empty tuple or list, or a mapping none of whose keys ``forward`` accepts.

    Example:
        >>> default_forward(nn.Linear(2, 1), (torch.ones(3, 2), torch.zeros(3))).shape
        torch.Size([3, 1])
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("the default forward needs a non-empty batch; got an empty tuple/list")
        batch = batch[0]
    if isinstance(batch, Mapping):
        params = inspect.signature(model.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return model(**batch)
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        kwargs = {key: value for key, value in batch.items() if key in names}
        if kwargs:
            return model(**kwargs)
        if "x" in batch:
            return model(batch["x"])
        raise TypeError(
            f"the default forward passes a dict batch as keyword arguments, but {type(model).__name__}.forward"
            f" accepts none of its keys {sorted(map(str, batch))}: pass `forward=lambda model, batch: ...`"
        )
    return model(batch)


class OutputRecorder:
    """Forward hooks feeding each module's output (or first input) into its :class:`FeatureMoments`.

    Use it as a context manager: the hooks exist inside it only. A module whose output is not readable
    (:func:`output_tensor`) or changes its number of features stops recording and gets a reason in ``reasons``.

    Args:
        modules: name to module.
        dims: name to feature dim, for the modules to record (the others are not hooked).
        device: where the sums live (the model's device).
        inputs: record each module's first positional input instead of its output. Defaults to ``False``.
    """

    def __init__(
        self, modules: Mapping[str, nn.Module], dims: Mapping[str, int], device: torch.device, inputs: bool = False
    ) -> None:
        self.modules = {name: modules[name] for name in dims}
        self.metrics = {name: FeatureMoments(dim, sync_on_compute=False).to(device) for name, dim in dims.items()}
        self.reasons: dict[str, str] = {}
        self.inputs = inputs
        self._handles: list[Any] = []

    def _record(self, name: str, value: Any) -> None:
        if name in self.reasons:
            return
        tensor = output_tensor(value)
        what = "input" if self.inputs else "output"
        if tensor is None:
            self.reasons[name] = (
                f"its {what} ({type(value).__name__}) holds no floating-point tensor (a tensor, the first element of"
                " a tuple, or a ModelOutput's last_hidden_state or logits)"
            )
            return
        try:
            self.metrics[name].update(tensor)
        except (ValueError, IndexError, RuntimeError) as err:
            self.reasons[name] = f"its {what} of shape {tuple(tensor.shape)} cannot be read per feature: {err}"

    def __enter__(self) -> OutputRecorder:
        for name, module in self.modules.items():
            if self.inputs:
                hook = module.register_forward_pre_hook(lambda m, args, name=name: self._record(name, args))
            else:
                hook = module.register_forward_hook(lambda m, args, out, name=name: self._record(name, out))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def local_widths(self) -> dict[str, int]:
        """Per module: its number of features, 0 if it never ran, -1 if it could not be read."""
        return {n: -1 if n in self.reasons else m.num_features for n, m in self.metrics.items()}


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.no_grad()`` inside; every module's flag and every buffer as they were afterwards.

    The flags are restored module by module (``model.train(True)`` would also switch on a teacher that training
    keeps in eval mode); a buffer the forward changed (a queue, a counter kept as a tensor) is copied back, with
    one warning naming them.
    """
    flags = [(module, module.training) for module in model.modules()]
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        changed = []
        with torch.no_grad():
            for name, buf in model.named_buffers():
                before = buffers.get(name)
                if before is not None and not (buf.shape == before.shape and torch.equal(buf, before)):
                    changed.append(name)
                    buf.resize_as_(before).copy_(before)
        if changed:
            rank_zero_warn(
                f"the forward of the reference statistics changed the buffer(s) {changed}; they were restored."
                " Pass a `forward` without side effects."
            )


@contextmanager
def isolated_rng() -> Iterator[None]:
    """The torch (CPU and initialised CUDA devices), Python and NumPy generators as they were, also after an error.

    Iterating a shuffled dataloader draws from them; the reference pass must not move them.
    """
    python_state = random.getstate()
    try:
        import numpy

        numpy_state: Any = numpy.random.get_state()  # noqa: NPY002 - the legacy global generator is the one to keep
    except ImportError:  # pragma: no cover - numpy ships with every torch wheel we support
        numpy = None  # type: ignore[assignment]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


@contextmanager
def rank_zero_buffers(trainer: Any, model: nn.Module) -> Iterator[None]:
    """Under several processes, rank zero's buffers on every rank inside; each rank's own afterwards.

    DDP broadcasts rank zero's buffers at the start of each training forward, so after the last step every rank's
    BatchNorm running statistics hold its own last batch; the reference describes the model rank zero saves (the
    checkpoint's), which is the one diagnosed later. One broadcast, run by every rank.
    """
    if int(getattr(trainer, "world_size", 1)) <= 1:
        yield
        return
    buffers = dict(model.named_buffers())
    own = {name: buf.clone() for name, buf in buffers.items()}
    zero = trainer.strategy.broadcast(own, src=0)
    try:
        with torch.no_grad():
            for name, buf in buffers.items():
                if name in zero and zero[name].shape == buf.shape:
                    buf.copy_(zero[name])
        yield
    finally:
        with torch.no_grad():
            for name, buf in buffers.items():
                buf.copy_(own[name])


def resolve_dims(modules: Mapping[str, nn.Module], feature_dim: FeatureDim) -> dict[str, int]:
    """The feature dim of each module: ``feature_dim`` (one int, or per name), else :func:`default_feature_dim`.

    Raises:
        TypeError: if ``feature_dim`` is not ``None``, an int or a mapping of names to ints.
        ValueError: if the mapping names a module that is not in ``modules``.
    """
    if feature_dim is None:
        return {name: default_feature_dim(m) for name, m in modules.items()}
    if isinstance(feature_dim, int) and not isinstance(feature_dim, bool):
        return dict.fromkeys(modules, feature_dim)
    if isinstance(feature_dim, Mapping) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in feature_dim.values()
    ):
        unknown = [name for name in feature_dim if name not in modules]
        if unknown:
            raise ValueError(f"`feature_dim` names unknown group(s) {unknown}; the groups are {list(modules)}")
        return {name: feature_dim.get(name, default_feature_dim(m)) for name, m in modules.items()}
    raise TypeError(f"`feature_dim` must be None, an int or a dict of group names to ints, got {feature_dim!r}")


def record_reference(
    trainer: Any,
    pl_module: nn.Module,
    modules: Mapping[str, nn.Module],
    n_batches: int,
    forward: Forward | None = None,
    feature_dim: FeatureDim = None,
) -> tuple[dict[str, ReferenceStats], dict[str, str]]:
    """Reference statistics of each module's output on the first ``n_batches`` training batches, after a fit.

    ``forward(pl_module, batch)`` (by default :func:`default_forward`: ``pl_module(inputs)``) runs on each batch as
    the strategy moves it to the device (``batch_to_device``, so the LightningModule's batch transfer hooks apply),
    under the precision plugin's forward context, in eval mode under ``torch.no_grad()``; ``training_step`` is
    not run and the model is left as training left it (see the module docstring). Every process runs the same
    collectives: under DDP each rank reads its own share of the batches, the ranks agree on each module's number
    of features (one ``all_gather``), and the sums are reduced across ranks, so the statistics cover the global
    batches; a rank whose share is empty contributes zeros. Every rank uses rank zero's buffers for the pass (see
    :func:`rank_zero_buffers`). The LightningModule is called directly, not through the DDP wrapper, so no
    collective of the user's forward (nor DDP's buffer broadcast) runs.

    Args:
        trainer: the Trainer that fitted ``pl_module`` (``lightning`` or ``pytorch_lightning``).
        pl_module: the fitted module.
        modules: group name to the module whose output is recorded (see
            :func:`~lightning_beta.layer_groups.group_modules`).
        n_batches: training batches to read; 0 records nothing.
        forward: ``forward(pl_module, batch)``, which must run the modules on the batch without side effects.
            Defaults to ``None`` (:func:`default_forward`).
        feature_dim: the dim of a feature, one int or per group; ``None`` uses :func:`default_feature_dim`.
            Defaults to ``None``.

    Returns:
        The statistics of each module recorded, and for each module skipped the reason (every rank skips the same
        modules); one ``rank_zero_warn`` lists the skipped modules and reasons, unless ``n_batches`` is 0.

    Raises:
        TypeError: for a bad ``feature_dim`` (see :func:`resolve_dims`).
        ValueError: if ``n_batches`` is negative, or ``feature_dim`` names an unknown group.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 0:
        raise ValueError(f"`n_batches` must be an int >= 0, got {n_batches!r}")
    dims = resolve_dims(modules, feature_dim)
    if not modules:
        return {}, {}
    if n_batches == 0:
        return {}, dict.fromkeys(modules, "no reference batches were requested (0)")
    loaders = trainer.train_dataloader
    if loaders is None:
        reasons = dict.fromkeys(modules, "no training dataloader was left for the reference batches")
        rank_zero_warn(f"reference statistics: none for group(s) {list(reasons)}: {reasons[next(iter(reasons))]}")
        return {}, reasons
    run = forward or default_forward
    device = next(pl_module.parameters(), torch.zeros(())).device
    recorder = OutputRecorder(modules, dims, device)
    failure = None
    try:
        with (
            isolated_rng(),
            rank_zero_buffers(trainer, pl_module),
            evaluating(pl_module),
            recorder,
            trainer.precision_plugin.forward_context(),
        ):
            batches = iter(CombinedLoader(loaders, mode="max_size_cycle"))
            for batch, _, _ in itertools.islice(batches, n_batches):
                run(pl_module, trainer.strategy.batch_to_device(batch))
    except Exception as err:  # the fit is over: a failed pass costs the reference only
        # Kept as a reason, not raised: the other ranks wait in the collectives below for this one.
        failure = f"the reference forward pass raised {type(err).__name__}: {err}"
        if forward is None:  # the default forward: say how to give another
            failure += (
                " (a LightningModule whose `forward` does not take the batch's inputs needs"
                " `LayerAttributionCallback(reference_forward=...)`)"
            )
    widths = recorder.local_widths()
    if failure is not None:
        widths = dict.fromkeys(widths, -1)
    reference, reasons = _reduce(trainer, recorder, widths, failure)
    if reasons:
        rank_zero_warn(f"reference statistics: none for group(s) {_listing(reasons)}")
    return reference, reasons


def _listing(reasons: Mapping[str, str]) -> str:
    """``'a', 'b': why; 'c': other``: the groups that share a reason listed once with it."""
    groups: dict[str, list[str]] = {}
    for name, why in reasons.items():
        groups.setdefault(why, []).append(repr(name))
    return "; ".join(f"{', '.join(names)}: {why}" for why, names in groups.items())


def _reduce(
    trainer: Any, recorder: OutputRecorder, widths: dict[str, int], failure: str | None
) -> tuple[dict[str, ReferenceStats], dict[str, str]]:
    """Agree on the widths (one all_gather), sum the metrics across ranks, and give every rank the same results."""
    names = list(widths)
    world = int(getattr(trainer, "world_size", 1))
    local = torch.tensor([widths[n] for n in names], dtype=torch.long, device=recorder.metrics[names[0]].device)
    table = trainer.strategy.all_gather(local).reshape(-1, len(names)).cpu() if world > 1 else local.reshape(1, -1)

    def gather(tensor: Tensor, group: Any = None) -> list[Tensor]:
        return list(trainer.strategy.all_gather(tensor).reshape(world, *tensor.shape).unbind(0))

    reference: dict[str, ReferenceStats] = {}
    reasons: dict[str, str] = {}
    for col, name in enumerate(names):
        column = table[:, col].tolist()
        present = sorted({w for w in column if w > 0})
        if -1 in column:
            # Skipped on every rank; the reason is this rank's own when it has one (rank zero's is the one written).
            here = failure or recorder.reasons.get(name)
            ranks = [rank for rank, w in enumerate(column) if w == -1]
            if world == 1:
                reasons[name] = here or "its output could not be read"
            else:
                reasons[name] = (
                    f"on rank(s) {ranks}: {here}" if here else f"its output could not be read on rank(s) {ranks}"
                )
            continue
        if not present:
            reasons[name] = "its module did not run in the forward pass"
            continue
        if len(present) > 1:
            reasons[name] = f"its number of features differs across ranks: {column}"
            continue
        metric = recorder.metrics[name]
        metric.resize(present[0])  # a rank that never ran the module contributes zeros of the agreed width
        with metric.sync_context(dist_sync_fn=gather, distributed_available=lambda: world > 1):
            stats = metric.to_reference()
        if not all(map(_finite, stats.mean + stats.var)):
            reasons[name] = "its statistics are not finite (a diverged model's outputs)"
            continue
        reference[name] = stats
    return reference, reasons


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
