"""Private: iterate ``(inputs, targets)`` batches on a model's device and validate group names.

Shared by the localizers, the treatment and the verification, so they agree on what a batch is and on the
wording of their errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """The inputs and integer targets of a batch: the first two items of a tuple/list, or a dict's ``x``/``y``.

    Raises:
        TypeError: if the batch is none of these.
    """
    if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "a diagnosis batch must be an (inputs, targets) tuple/list or a dict with 'x' and 'y',"
        f" got {type(batch).__name__}"
    )


def iter_batches(dataloader: Iterable[Any], device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` on ``device``.

    Raises:
        ValueError: if the dataloader yields no batch (checked after iterating it, so it is read only once).
    """
    empty = True
    for batch in dataloader:
        x, y = split_batch(batch)
        if y.numel() == 0:
            continue
        empty = False
        yield x.to(device), y.to(device)
    if empty:
        raise ValueError("`dataloader` yielded no samples: diagnosis needs at least one (inputs, targets) batch")


def check_group_names(names: Sequence[str], groups: Iterable[str], argument: str = "layers") -> None:
    """Raise a ``ValueError`` naming every unknown group and listing the known ones.

    Example:
        >>> check_group_names(["fc"], ["conv", "fc"])
        >>> check_group_names(["head"], ["conv", "fc"])
        Traceback (most recent call last):
        ...
        ValueError: `layers` names unknown group(s) ['head']; the model's groups are ['conv', 'fc']
    """
    known = list(groups)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"`{argument}` names unknown group(s) {unknown}; the model's groups are {known}")
