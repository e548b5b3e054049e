"""Private: what a model's output means to the diagnosis: logits, one loss and one prediction per element.

Every step of the diagnosis counts in one unit, the *element*: one entry of the targets. For ``(N, C)`` logits
with ``(N,)`` targets an element is a sample; for a per-pixel classifier (``(B, C, d1, ...)`` logits with
``(B, d1, ...)`` targets) it is a pixel; for a language model (``(B, T, V)`` logits with ``(B, T)`` targets) it is
a token. Targets equal to ``IGNORE_INDEX`` (-100, the padding label of PyTorch and Hugging Face) are no element:
they are neither counted nor part of any loss.

The output may be a Tensor of logits, or anything holding them under ``logits`` (a Hugging Face ``ModelOutput``,
a dict): those are read as class-last, the Hugging Face layout. For any other output, or a layout these rules do
not cover, the user passes ``loss_fn(output, targets)`` and ``predict(output)``, each returning one value per
element (the shape of the targets).

The default loss does not shift: for a causal language model, whose logits at position ``t`` predict token ``t + 1``
(Hugging Face's ``labels`` are the ``input_ids``, shifted inside the model's own loss), pass a ``loss_fn`` and a
``predict`` that shift (element ``t`` is token ``t`` scored by the logits at ``t - 1``, and 0 / any class at ``t = 0``,
whose target should be -100), or give targets that are already shifted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

#: ``loss_fn(logits, targets)``: one loss per element, shaped like ``targets``.
LossFn = Callable[[Any, Tensor], Tensor]
#: ``predict(logits)``: one predicted class per element, shaped like the targets.
Predict = Callable[[Any], Tensor]

IGNORE_INDEX = -100


def logits_of(output: Any) -> Any:
    """The logits in a model's output: the output itself if a Tensor, else its ``logits`` attribute or key.

    Anything else is returned unchanged, for a user's ``loss_fn`` and ``predict`` to read.

    Example:
        >>> logits_of({"logits": torch.zeros(2, 3), "loss": None}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    return output


def class_dim(logits: Tensor, targets: Tensor, class_last: bool = False) -> int:
    """The class dimension of ``logits`` for these ``targets``: 1 (PyTorch's layout) or the last (a language model's).

    ``(N, C)`` logits are both. When both layouts fit (``(B, C, T)`` with ``C == T``), PyTorch's wins unless
    ``class_last`` (set for logits read from a ``ModelOutput``).

    Raises:
        ValueError: if neither layout matches the targets' shape.

    Example:
        >>> class_dim(torch.zeros(2, 5, 4, 4), torch.zeros(2, 4, 4))  # per-pixel classes
        1
        >>> class_dim(torch.zeros(2, 7, 64), torch.zeros(2, 7))  # a language model's tokens
        2
    """
    if logits.ndim == targets.ndim + 1:
        first = logits.shape[:1] + logits.shape[2:] == targets.shape
        last = logits.shape[:-1] == targets.shape
        if last and (class_last or not first):
            return logits.ndim - 1
        if first:
            return 1
    raise ValueError(
        f"the model's logits of shape {tuple(logits.shape)} do not fit targets of shape {tuple(targets.shape)}:"
        " expected (N, C) with (N,), (B, C, d1, ...) with (B, d1, ...) or (B, T, V) with (B, T); for other outputs"
        " pass `loss_fn` and `predict`"
    )


def _tensor_logits(output: Any, argument: str) -> tuple[Tensor, bool]:
    logits = logits_of(output)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}, neither logits nor an output with `logits`: pass `{argument}`"
        )
    return logits, logits is not output


def element_losses(output: Any, targets: Tensor, loss_fn: LossFn | None = None) -> Tensor:
    """One loss per element (cross-entropy by default; 0 where the target is ``IGNORE_INDEX``).

    Raises:
        ValueError: if ``loss_fn`` does not return one loss per element, or the logits do not fit the targets.
        TypeError: if the output holds no logits and no ``loss_fn`` is given.
    """
    if loss_fn is not None:
        losses = loss_fn(logits_of(output), targets)
        if not isinstance(losses, Tensor) or losses.shape != targets.shape:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"`loss_fn` must return one loss per sample (per element: the targets' shape {tuple(targets.shape)}),"
                f" got {shape}"
            )
        return losses
    logits, hinted = _tensor_logits(output, "loss_fn")
    dim = class_dim(logits, targets, class_last=hinted)
    if logits.ndim > 2 and dim != 1:
        logits = logits.movedim(dim, 1)
    return nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)


def element_predictions(output: Any, targets: Tensor, predict: Predict | None = None) -> Tensor:
    """One predicted class per element: the argmax over the class dimension, or ``predict(logits)``.

    Raises:
        ValueError: if ``predict`` does not return the targets' shape, or the logits do not fit the targets.
        TypeError: if the output holds no logits and no ``predict`` is given.
    """
    if predict is not None:
        preds = predict(logits_of(output))
        if not isinstance(preds, Tensor) or preds.shape != targets.shape:
            shape = tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__
            raise ValueError(f"`predict` must return one class per element, shape {tuple(targets.shape)}, got {shape}")
        return preds
    logits, hinted = _tensor_logits(output, "predict")
    return logits.argmax(dim=class_dim(logits, targets, class_last=hinted))


def valid_elements(targets: Tensor) -> Tensor:
    """The mask of elements that count: every target but ``IGNORE_INDEX``."""
    return targets != IGNORE_INDEX


def mean_loss(output: Any, targets: Tensor, loss_fn: LossFn | None = None) -> Tensor:
    """The mean loss over the counted elements (0 with a gradient when none counts).

    Example:
        >>> float(mean_loss(torch.zeros(2, 4), torch.tensor([1, IGNORE_INDEX])))  # log(4)
        1.3862943649291992
    """
    losses = element_losses(output, targets, loss_fn)
    valid = valid_elements(targets).to(losses.dtype)
    return (losses * valid).sum() / valid.sum().clamp_min(1)
