"""Localize: which layer group do the errors come from (docs/method.md, section 3)?

Two localizers return :class:`~lightning_beta.diagnosis.scores.LayerScores`:

- :func:`attribute_errors`, the paper's: the size-normalised gradient of the loss over the misclassified
  samples, per group.
- :func:`~lightning_beta.diagnosis.drift.activation_drift`, ours: how far each group's output statistics moved
  from a reference, beyond the drift already present at its input (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_beta.diagnosis._batches import iter_batches, model_device, run_model
from lightning_beta.diagnosis._outputs import LossFn, Predict, element_losses, element_predictions, valid_elements
from lightning_beta.diagnosis.drift import activation_drift, reference_statistics
from lightning_beta.diagnosis.scores import LayerScores
from lightning_beta.layer_groups import GroupBy, group_parameters, group_sizes

__all__ = [
    "ErrorGradients",
    "LayerScores",
    "activation_drift",
    "attribute_errors",
    "error_gradients",
    "reference_statistics",
]


@dataclass
class ErrorGradients:
    """Gradients of the mean loss over the misclassified and over the correctly classified elements.

    An element is one entry of the targets: a sample for ``(N, C)`` logits, a pixel or a token for dense outputs.

    Attributes:
        wrong: parameter name to the gradient of the mean loss over misclassified elements (zeros if none).
        correct: the same over correctly classified elements.
        n_wrong: number of misclassified elements.
        n_correct: number of correctly classified elements.
    """

    wrong: dict[str, Tensor]
    correct: dict[str, Tensor]
    n_wrong: int
    n_correct: int


def error_gradients(
    model: nn.Module, dataloader: Iterable[Any], loss_fn: LossFn | None = None, predict: Predict | None = None
) -> ErrorGradients:
    """Per-parameter gradients of the mean loss over misclassified and over correct elements, in one pass.

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off), batch by batch on its own
    device. Gradients come from ``torch.autograd.grad``, so ``.grad`` of every parameter is left untouched;
    ``requires_grad`` is switched on for the pass and restored, and so is the training flag.

    Elements whose target is -100 (the padding label) are left out.

    Args:
        model: a classifier returning logits ``(N, C)``, ``(B, C, d1, ...)`` or ``(B, T, V)``, or an output holding
            them under ``logits`` (a Hugging Face ``ModelOutput``).
        dataloader: yields ``(inputs, targets)`` batches, or Hugging Face dicts with ``labels``.
        loss_fn: ``loss_fn(logits, targets)`` returning one loss per element (the targets' shape). Defaults to
            cross-entropy over the class dimension.
        predict: ``predict(logits)`` returning one predicted class per element. Defaults to the argmax over the
            class dimension.

    Returns:
        The two gradient sums divided by their element counts.

    Raises:
        ValueError: if the dataloader yields no samples, ``loss_fn`` does not return one loss per element, or the
            logits do not fit the targets.
    """
    named = [(name, p) for name, p in model.named_parameters()]
    params = [p for _, p in named]
    device = model_device(model)
    flags = [p.requires_grad for p in params]
    was_training = model.training
    wrong = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    correct = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n_wrong = torch.zeros((), dtype=torch.long, device=device)
    n_total = torch.zeros((), dtype=torch.long, device=device)
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for x, y in iter_batches(dataloader, device):
            output = run_model(model, x)
            losses = element_losses(output, y, loss_fn)
            with torch.no_grad():
                valid = valid_elements(y)
                wrong_mask = element_predictions(output, y, predict) != y
                is_wrong = (wrong_mask & valid).to(losses.dtype)
                is_right = (~wrong_mask & valid).to(losses.dtype)
            # Two sums of the same graph: the errors' loss and the correct elements' loss.
            g_wrong = torch.autograd.grad((losses * is_wrong).sum(), params, retain_graph=True, allow_unused=True)
            g_right = torch.autograd.grad((losses * is_right).sum(), params, allow_unused=True)
            for acc, g in zip(wrong, g_wrong):
                if g is not None:
                    acc.add_(g.float())
            for acc, g in zip(correct, g_right):
                if g is not None:
                    acc.add_(g.float())
            n_wrong += is_wrong.sum().long()
            n_total += valid.sum().long()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    wrong_count = int(n_wrong)
    right_count = int(n_total) - wrong_count
    for acc in wrong:
        acc.div_(max(wrong_count, 1))
    for acc in correct:
        acc.div_(max(right_count, 1))
    names = [name for name, _ in named]
    return ErrorGradients(dict(zip(names, wrong)), dict(zip(names, correct)), wrong_count, right_count)


def attribute_errors(
    model: nn.Module,
    dataloader: Iterable[Any],
    group_by: GroupBy = "auto",
    loss_fn: LossFn | None = None,
    predict: Predict | None = None,
) -> LayerScores:
    """The paper's localizer: RMS gradient of the mean loss over the misclassified elements, per group.

    For group ``g`` with ``n_g`` parameters, ``s_g = ||grad_g L_wrong||_2 / sqrt(n_g)`` where ``L_wrong`` is the
    mean loss over the misclassified elements. Every count is in elements, one per target entry: samples for
    ``(N, C)`` logits, pixels for a per-pixel classifier ``(B, C, H, W)``, tokens for a language model ``(B, T, V)``
    (``n_samples`` and ``n_misclassified`` of the result count them; targets of -100 are left out). The same score
    on the correctly classified elements is reported as
    the ``correct`` column, and ``ratio = s_g / s_g_correct`` beside it (``inf`` where the correct samples give a
    zero gradient). The model is left as it was: eval mode during the pass, ``.grad``, ``requires_grad`` and the
    training flag unchanged.

    With no misclassified element every score is 0 and :attr:`LayerScores.message` says so: there is nothing to
    attribute, which is a result rather than an error.

    Args:
        model: a classifier returning logits, or an output holding them under ``logits`` (a Hugging Face
            ``ModelOutput``).
        dataloader: yields ``(inputs, targets)`` batches, or Hugging Face dicts with ``labels``,
            preferably not shuffled.
        group_by: layer groups, as :func:`~lightning_beta.layer_groups.group_parameters`. Defaults to ``"auto"``.
        loss_fn: ``loss_fn(logits, targets)`` giving one loss per element, for outputs the default cross-entropy
            does not cover. Defaults to cross-entropy over the class dimension.
        predict: ``predict(logits)`` giving one predicted class per element. Defaults to the argmax over the class
            dimension.

    Returns:
        Scores with ``method="gradient"`` and the detail columns ``correct`` and ``ratio``.

    Raises:
        ValueError: if the dataloader yields no samples, for an invalid ``group_by``, or logits that do not fit the
            targets (pass ``loss_fn`` and ``predict``).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
        >>> scores = attribute_errors(net, data)
        >>> sorted(scores.scores), scores.n_samples, scores.n_misclassified > 0
        (['0', '2'], 32, True)
    """
    groups = group_parameters(model, group_by)
    sizes = group_sizes(model, groups)
    grads = error_gradients(model, dataloader, loss_fn, predict)
    wrong = _group_rms(grads.wrong, groups, sizes)
    right = _group_rms(grads.correct, groups, sizes)
    n = grads.n_wrong + grads.n_correct
    message = None
    if grads.n_wrong == 0:
        message = f"no misclassified sample (element) among the {n}: nothing to attribute, every score is 0"
        wrong = {name: 0.0 for name in groups}
    ratio = {name: _ratio(wrong[name], right[name]) for name in groups}
    return LayerScores(
        scores=wrong,
        method="gradient",
        n_params=sizes,
        details={"correct": right, "ratio": ratio},
        n_samples=n,
        n_misclassified=grads.n_wrong,
        message=message,
    )


def _group_rms(grads: dict[str, Tensor], groups: dict[str, list[str]], sizes: dict[str, int]) -> dict[str, float]:
    # One stack and one host copy for all groups.
    norms = torch.stack(
        [torch.linalg.vector_norm(torch.cat([grads[p].flatten() for p in names])) for names in groups.values()]
    )
    values = norms.double().cpu().tolist()
    return {name: value / math.sqrt(max(sizes[name], 1)) for name, value in zip(groups, values)}


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return 0.0 if a == 0 else math.inf
