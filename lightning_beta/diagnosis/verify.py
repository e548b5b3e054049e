"""Verify: what a treatment fixed and what it broke, on a held-out set (docs/method.md, section 4).

Counts are in elements, one per target entry: samples for ``(N, C)`` logits, pixels for a per-pixel classifier,
tokens for a language model (targets of -100 left out), the same unit as the localizer's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_beta._text import markdown_table
from lightning_beta.diagnosis._batches import iter_batches, model_device, run_model, to_device
from lightning_beta.diagnosis._outputs import Predict, element_predictions, valid_elements

#: The markdown line of a verification whose treated model is worse than its input.
WORSE_LINE = "**Worse**: the treated model makes more errors than its input (net {net:+d}); keep the input model."


@dataclass(frozen=True)
class ClassChange:
    """Fixed and broken elements of one true class."""

    n_samples: int
    fixed: int
    broken: int
    accuracy_before: float
    accuracy_after: float

    @property
    def net(self) -> int:
        """``fixed - broken``."""
        return self.fixed - self.broken


@dataclass(frozen=True)
class Verification:
    """Errors fixed (wrong before, right after) and broken (right before, wrong after), overall and per class.

    Every count is in elements: samples for ``(N, C)`` logits, pixels or tokens for dense outputs.

    Attributes:
        n_samples: elements compared.
        fixed: wrong before, right after.
        broken: right before, wrong after.
        accuracy_before: accuracy of the model before treatment.
        accuracy_after: accuracy after.
        per_class: true class to its :class:`ClassChange`, for classes present in the data.
    """

    n_samples: int
    fixed: int
    broken: int
    accuracy_before: float
    accuracy_after: float
    per_class: dict[int, ClassChange] = field(default_factory=dict)

    @property
    def net(self) -> int:
        """``fixed - broken``: the change in the number of correct predictions."""
        return self.fixed - self.broken

    @property
    def worse(self) -> bool:
        """Whether the treated model makes more errors than its input (``net < 0``): the treatment failed."""
        return self.net < 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the totals, ``worse``, and ``per_class`` keyed by the class as a string."""
        return {
            "n_samples": self.n_samples,
            "fixed": self.fixed,
            "broken": self.broken,
            "net": self.net,
            "worse": self.worse,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "per_class": {str(c): {**vars(v), "net": v.net} for c, v in self.per_class.items()},
        }

    def to_markdown(self) -> str:
        """The totals and the per-class changes as a markdown table."""
        lines = [
            f"fixed {self.fixed}, broken {self.broken}, net {self.net:+d} of {self.n_samples} elements;"
            f" accuracy {self.accuracy_before:.4f} -> {self.accuracy_after:.4f}"
        ]
        if self.worse:
            lines.append("")
            lines.append(WORSE_LINE.format(net=self.net))
        rows = [
            [c, v.n_samples, v.fixed, v.broken, f"{v.net:+d}", f"{v.accuracy_before:.3f}", f"{v.accuracy_after:.3f}"]
            for c, v in self.per_class.items()
        ]
        header = ["class", "n", "fixed", "broken", "net", "acc before", "acc after"]
        return "\n".join([*lines, "", markdown_table(header, rows, align="rrrrrrr")])

    def __str__(self) -> str:
        return self.to_markdown()


def _predict_both(
    before: nn.Module, after: nn.Module, dataloader: Iterable[Any], predict: Predict | None
) -> tuple[Tensor, Tensor, Tensor]:
    # Both models see the same batch, so a shuffling dataloader cannot misalign their predictions. Predictions and
    # targets are flattened to one entry per counted element.
    device = model_device(before)
    flags = before.training, after.training
    before.eval()
    after.eval()
    preds_b, preds_a, targets = [], [], []
    try:
        with torch.no_grad():
            for x, y in iter_batches(dataloader, device):
                valid = valid_elements(y)
                preds_b.append(element_predictions(run_model(before, x), y, predict)[valid])
                y_after = y.to(model_device(after))
                pred_a = element_predictions(run_model(after, to_device(x, y_after.device)), y_after, predict)
                preds_a.append(pred_a.to(device)[valid])
                targets.append(y[valid])
    finally:
        before.train(flags[0])
        after.train(flags[1])
    return torch.cat(preds_b).cpu(), torch.cat(preds_a).cpu(), torch.cat(targets).cpu()


def verify(
    model_before: nn.Module, model_after: nn.Module, dataloader: Iterable[Any], predict: Predict | None = None
) -> Verification:
    """Compare two classifiers element by element on a held-out set.

    Both run in eval mode under ``torch.no_grad()`` on the same batches; their training flags are restored.
    An element is one target entry (a sample, a pixel or a token); targets of -100 are left out.
    :attr:`Verification.worse` says when the treated model makes more errors than its input.

    Args:
        model_before: the model before treatment.
        model_after: the treated model.
        dataloader: yields ``(inputs, targets)`` batches, or Hugging Face dicts with ``labels``.
        predict: ``predict(logits)`` giving one predicted class per element (the targets' shape), for outputs the
            default does not cover. Defaults to the argmax over the class dimension of the logits (the output, or
            its ``logits``: a Hugging Face ``ModelOutput``).

    Returns:
        Fixed, broken, net, accuracies and per-class changes.

    Raises:
        ValueError: if the dataloader yields no samples, or the logits do not fit the targets.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x = torch.eye(4)  # sample i is the one-hot vector e_i
        >>> before, after = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = before.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))  # predicts 0,0,1,1
        ...     _ = after.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))  # predicts 0,1,0,1
        >>> v = verify(before, after, DataLoader(TensorDataset(x, torch.tensor([0, 1, 1, 1]))))
        >>> v.fixed, v.broken, v.net, v.accuracy_before, v.accuracy_after, v.worse
        (1, 1, 0, 0.75, 0.75, False)
    """
    pb, pa, y = _predict_both(model_before, model_after, dataloader, predict)
    right_b, right_a = pb == y, pa == y
    fixed = ~right_b & right_a
    broken = right_b & ~right_a
    per_class = {}
    for c in torch.unique(y).tolist():
        sel = y == c
        n = int(sel.sum())
        per_class[int(c)] = ClassChange(
            n_samples=n,
            fixed=int((fixed & sel).sum()),
            broken=int((broken & sel).sum()),
            accuracy_before=float(right_b[sel].float().mean()),
            accuracy_after=float(right_a[sel].float().mean()),
        )
    return Verification(
        n_samples=int(y.numel()),
        fixed=int(fixed.sum()),
        broken=int(broken.sum()),
        accuracy_before=float(right_b.float().mean()),
        accuracy_after=float(right_a.float().mean()),
        per_class=per_class,
    )
