"""Kinetic-energy layer ranking: mean squared momentum buffer per group (the iKFAD idea).

The method is in docs/method.md, section 6.

iKFAD drives a per-parameter friction by the kinetic energy ``p^2`` of the momentum. Read the other way round, the
groups still carrying the most kinetic energy are those the optimizer is still moving: a third layer selector for
the treatment, beside the gradient and drift scores.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_beta._checks import check_int
from lightning_beta._optim import unwrap_optimizer
from lightning_beta.diagnosis._batches import iter_batches, model_device, run_model
from lightning_beta.diagnosis._outputs import LossFn, mean_loss
from lightning_beta.diagnosis.scores import LayerScores
from lightning_beta.layer_groups import GroupBy, group_parameters, group_sizes

#: Optimizer-state keys holding a first-moment (momentum) buffer: SGD/RMSprop, then the Adam family.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def _buffer(state: Mapping[str, Any]) -> Tensor | None:
    for key in MOMENTUM_KEYS:
        value = state.get(key)
        if isinstance(value, Tensor):
            return value
    return None


def kinetic_energy_scores(
    optimizer_or_state: Optimizer | Mapping[str, Any], model: nn.Module, group_by: GroupBy = "auto"
) -> LayerScores:
    """Score each group by the mean squared momentum buffer of its parameters, ``sum(buf^2) / n_params``.

    Args:
        optimizer_or_state: a torch optimizer (or a wrapper with ``.optimizer``) over the model's parameters, or
            its ``state_dict()`` (whose parameter indices follow ``model.parameters()`` order, as when the
            optimizer was built from ``model.parameters()``).
        model: the model the optimizer updates.
        group_by: layer groups. Defaults to ``"auto"``.

    Returns:
        Scores with ``method="kinetic"``; parameters without a buffer count as zero energy.

    Raises:
        ValueError: if the optimizer holds no momentum buffer (no step taken, or momentum 0), or a state dict
            indexes more parameters than the model has.
        TypeError: if ``optimizer_or_state`` is neither an optimizer nor a state dict.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> net(torch.ones(4, 2)).sum().backward(); opt.step()
        >>> kinetic_energy_scores(opt, net).method
        'kinetic'
    """
    groups = group_parameters(model, group_by)
    sizes = group_sizes(model, groups)
    named = dict(model.named_parameters())
    buffers: dict[str, Tensor] = {}
    inner = unwrap_optimizer(optimizer_or_state)
    if isinstance(inner, Optimizer):
        by_id = {id(p): name for name, p in named.items()}
        for param, state in inner.state.items():
            buf = _buffer(state)
            name = by_id.get(id(param))
            if buf is not None and name is not None:
                buffers[name] = buf
    elif isinstance(optimizer_or_state, Mapping) and "state" in optimizer_or_state:
        names = list(named)
        for index, state in optimizer_or_state["state"].items():
            if int(index) >= len(names):
                raise ValueError(
                    f"`optimizer_or_state` indexes parameter {index} but the model has {len(names)} parameters:"
                    " it belongs to a different model"
                )
            buf = _buffer(state)
            if buf is not None:
                buffers[names[int(index)]] = buf
    else:
        raise TypeError(
            f"`optimizer_or_state` must be a torch optimizer or its state_dict, got {type(optimizer_or_state).__name__}"
        )
    if not buffers:
        raise ValueError(
            "`optimizer_or_state` holds no momentum buffer ('momentum_buffer' or 'exp_avg'): take at least one"
            " optimizer step with momentum first"
        )
    energy = torch.stack(
        [
            torch.stack([buffers[p].double().pow(2).sum() for p in names if p in buffers]).sum()
            if any(p in buffers for p in names)
            else torch.zeros((), dtype=torch.float64)
            for names in groups.values()
        ]
    )
    values = energy.cpu().tolist()
    scores = {name: value / max(sizes[name], 1) for name, value in zip(groups, values)}
    return LayerScores(scores=scores, method="kinetic", n_params=sizes)


def _cycle(dataloader: Iterable[Any], device: torch.device) -> Iterator[tuple[Any, Tensor]]:
    # Re-iterates the dataloader when it runs out, moving each batch to the device only when it is drawn: the
    # probe holds one batch at a time, not the whole dataloader.
    while True:
        yield from iter_batches(dataloader, device)


def kinetic_energy_probe(
    model: nn.Module,
    dataloader: Iterable[Any],
    steps: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    group_by: GroupBy = "auto",
    loss_fn: LossFn | None = None,
) -> LayerScores:
    """Kinetic energy after a few momentum-SGD steps on a copy of the model (the model itself is not changed).

    For a model whose training optimizer is gone (or predates the fault): the copy takes ``steps`` steps of SGD with
    heavy-ball momentum on the mean loss in train mode, then :func:`kinetic_energy_scores` reads its buffers. Only
    the ``steps`` batches used are drawn from the dataloader and moved to the model's device, one at a time.

    Args:
        model: a classifier returning logits (or an output holding them under ``logits``).
        dataloader: yields ``(inputs, targets)`` batches, or Hugging Face dicts with ``labels``,
            re-iterated if shorter than ``steps``.
        steps: optimizer steps, ``>= 1``. Defaults to ``10``.
        lr: learning rate. Defaults to ``0.01``.
        momentum: heavy-ball momentum. Defaults to ``0.9``.
        group_by: layer groups. Defaults to ``"auto"``.
        loss_fn: ``loss_fn(logits, targets)``, one loss per element; its mean is minimised. Defaults to
            cross-entropy over the class dimension.

    Returns:
        The kinetic-energy scores of the copy.

    Raises:
        ValueError: if ``steps < 1`` or the dataloader is empty.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
        >>> sorted(kinetic_energy_probe(net, data, steps=3).scores)
        ['0', '2']
    """
    check_int("steps", steps, minimum=1)
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.requires_grad_(True)
    probe.train()
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum)
    batches = _cycle(dataloader, model_device(probe))
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        mean_loss(run_model(probe, x), y, loss_fn).backward()
        optimizer.step()
    return kinetic_energy_scores(optimizer, probe, group_by)
