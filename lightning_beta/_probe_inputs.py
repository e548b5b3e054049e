"""Private: probe inputs as nested batches (a tensor, a dict of tensors, or tuples, lists and dicts of them).

What :func:`lightning_beta.probe.record_probe` keeps of its inputs: batch-first tensors, read from one batch or
from an iterable of batches until enough samples, joined along dim 0, cut to at most ``max_samples`` and copied to
the CPU; and the moves between the CPU and the model's device, which the diagnosis uses too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn


def tensors_of(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def batch_size(value: Any) -> int:
    """The number of samples of batch-first probe inputs: the common size of dim 0 of the tensors they hold.

    Raises:
        ValueError: if they hold no tensor with a dim 0, or tensors of different sizes along it.

    Example:
        >>> batch_size({"input_ids": torch.zeros(4, 7, dtype=torch.long), "attention_mask": torch.ones(4, 7)})
        4
    """
    sizes = {int(t.shape[0]) for t in tensors_of(value) if t.dim() > 0}
    if not sizes:
        raise ValueError("`inputs` holds no tensor with a batch dim: the probe needs batch-first tensors")
    if len(sizes) > 1:
        raise ValueError(
            f"`inputs` holds tensors of different sizes along dim 0 {sorted(sizes)}: probe inputs must be batch-first"
        )
    return sizes.pop()


def _take(value: Any, n: int) -> Any:
    """The first ``n`` samples of batch-first inputs, as CPU copies (non-tensor values as they are)."""
    if isinstance(value, Tensor):
        return value[:n].detach().cpu().clone() if value.dim() else value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {k: _take(v, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, n) for v in value)
    return value


def _concat(parts: list[Any]) -> Any:
    """Batches of one structure joined along dim 0 (non-tensor values from the first batch)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        if not all(isinstance(p, Tensor) for p in parts):
            raise TypeError("`inputs` yielded batches of different structures: a tensor in one, not in another")
        return torch.cat(parts) if first.dim() else first
    if isinstance(first, Mapping):
        if any(not isinstance(p, Mapping) or list(p) != list(first) for p in parts):
            raise TypeError(f"`inputs` yielded batches of different structures: dicts of keys other than {list(first)}")
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        if any(not isinstance(p, (tuple, list)) or len(p) != len(first) for p in parts):
            raise TypeError("`inputs` yielded batches of different structures: tuples or lists of other lengths")
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return first


def _is_batch(value: Any) -> bool:
    return isinstance(value, (Tensor, Mapping))


def _batch_inputs(batch: Any, whole: bool) -> Any:
    """What a batch feeds the forward: all of it for a custom forward, else its inputs as the default forward takes."""
    if whole:
        return batch
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not _is_batch(inputs):
        raise TypeError(
            "`inputs` as an iterable must yield tensors, dicts of tensors or (inputs, targets) tuples/lists, got a"
            f" batch of {type(inputs).__name__}; with a `forward` (LayerAttributionCallback's `reference_forward`)"
            " the whole batches are kept, whatever they hold"
        )
    return inputs


def probe_inputs(inputs: Any, max_samples: int, whole_batches: bool = False) -> Any:
    """At most ``max_samples`` probe inputs on the CPU, from one batch or from an iterable of batches.

    Args:
        inputs: a tensor or a dict of tensors (one batch of probe inputs), or an iterable of batches (a
            dataloader) read until ``max_samples`` samples.
        max_samples: at most this many samples are kept.
        whole_batches: keep each batch of the iterable whole (for a custom forward) instead of its inputs (the
            first element of an ``(inputs, targets)`` tuple, as the default forward takes). Defaults to ``False``.

    Raises:
        TypeError: if ``inputs`` is none of these, or its batches differ in structure.
        ValueError: if it holds no sample, or its tensors are not batch-first.

    Example:
        >>> batches = [(torch.ones(3, 2), torch.zeros(3)), (torch.zeros(3, 2), torch.zeros(3))]
        >>> probe_inputs(batches, 4).shape
        torch.Size([4, 2])
    """
    if _is_batch(inputs):
        parts = [inputs]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        parts, count = [], 0
        for batch in inputs:
            part = _batch_inputs(batch, whole_batches)
            parts.append(_take(part, max_samples))
            count += batch_size(part)
            if count >= max_samples:
                break
        if not parts:
            raise ValueError("`inputs` yielded no batch: the probe needs at least one input")
    else:
        raise TypeError(
            f"`inputs` must be a tensor, a dict of tensors or an iterable of batches, got {type(inputs).__name__}"
        )
    if isinstance(inputs, Tensor) and (inputs.dim() == 0 or inputs.shape[0] == 0):
        raise ValueError(f"`inputs` must hold at least one sample along dim 0, got shape {tuple(inputs.shape)}")
    joined = _concat(parts)
    if batch_size(joined) == 0:
        raise ValueError("`inputs` must hold at least one sample along dim 0, got 0")
    if not storable(joined):
        raise TypeError("`inputs` must hold only tensors and plain values (None, bool, int, float, str)")
    return _take(joined, max_samples)


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or every tensor of a nested tuple, list or dict, on ``device`` (by ``move_data_to_device``)."""
    return move_data_to_device(value, device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def cpu_copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(cpu_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    return value


def storable(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` can read ``value`` back: tensors and plain Python values."""
    if value is None or isinstance(value, (Tensor, bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and storable(v) for k, v in value.items())
    return False
