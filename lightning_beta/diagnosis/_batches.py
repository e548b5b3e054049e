"""Private: what a diagnosis batch is, how its inputs reach the model, and the wording of group-name errors.

Shared by the localizers, the treatment, the repair, the shift recommendation and the verification, so they agree
on what a batch is. Three kinds of batch (:func:`split_batch`):

- ``(inputs, targets, ...)``, a tuple or list: the inputs are called as ``model(inputs)``;
- ``{"x": inputs, "y": targets}``: the same;
- a Hugging Face batch, a dict holding its targets under ``labels``: the inputs are **the whole dict, ``labels``
  included**, passed as keyword arguments by :func:`~lightning_beta.reference.default_forward`'s rule (the keys
  ``forward`` accepts, all of them if it takes ``**kwargs``). A Hugging Face model given ``labels`` computes its
  own loss too; the diagnosis ignores it (it computes one loss per element from the logits), and keeping
  ``labels`` is what the reference pass passes (so drift compares like with like) and lets an encoder-decoder
  model build its decoder inputs from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# One device helper for the probe and the diagnosis; re-exported for the diagnosis modules.
from lightning_beta._probe_inputs import model_device as model_device
from lightning_beta._probe_inputs import to_device as to_device
from lightning_beta.reference import default_forward

#: The key of a Hugging Face batch that holds the targets.
LABELS = "labels"


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """The inputs and integer targets of a batch (see the module docstring for the three kinds).

    Returns:
        ``(inputs, targets)``: the first two items of a tuple/list, a dict's ``x`` and ``y``, or a Hugging Face
        dict itself (``labels`` included) and its ``labels``.

    Raises:
        TypeError: if the batch is none of these, or a dict's ``labels`` is not a tensor.

    Example:
        >>> batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}
        >>> inputs, targets = split_batch(batch)
        >>> sorted(inputs), targets.tolist()
        (['input_ids', 'labels'], [0, 1])
    """
    if isinstance(batch, Mapping):
        if "x" in batch and "y" in batch:
            return batch["x"], batch["y"]
        if LABELS in batch:
            if not isinstance(batch[LABELS], Tensor):
                raise TypeError(
                    f"a diagnosis dict batch holds its targets under 'labels' as a tensor, got"
                    f" {type(batch[LABELS]).__name__}"
                )
            return batch, batch[LABELS]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
    raise TypeError(
        "a diagnosis batch must be an (inputs, targets) tuple/list, a dict with 'x' and 'y', or a Hugging Face dict"
        f" with 'labels', got {type(batch).__name__}{keys}"
    )


def defines_forward(model: nn.Module) -> bool:
    """Whether ``model``'s class has a ``forward`` of its own (not ``nn.Module``'s nor ``LightningModule``'s stand-in).

    Example:
        >>> defines_forward(nn.Linear(2, 1)), defines_forward(nn.Module())
        (True, False)
    """
    from lightning.pytorch import LightningModule

    return getattr(type(model), "forward", None) not in (nn.Module.forward, LightningModule.forward)


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a batch's inputs: a dict as keyword arguments (by ``default_forward``'s rule), else as one.

    Example:
        >>> run_model(nn.Linear(2, 1), torch.ones(3, 2)).shape
        torch.Size([3, 1])
    """
    if isinstance(inputs, Mapping):
        return default_forward(model, inputs)
    return model(inputs)


def iter_batches(dataloader: Iterable[Any], device: torch.device) -> Iterator[tuple[Any, Tensor]]:
    """Yield ``(inputs, targets)`` on ``device`` (the inputs a tensor, or a dict of them for a Hugging Face batch).

    Raises:
        ValueError: if the dataloader yields no batch (checked after iterating it, so it is read only once).
    """
    empty = True
    for batch in dataloader:
        x, y = split_batch(batch)
        if y.numel() == 0:
            continue
        empty = False
        yield to_device(x, device), y.to(device)
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
