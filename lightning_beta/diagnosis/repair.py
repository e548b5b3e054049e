"""Treat, ``policy="search"``: a surgical correction that chooses its lr, re-initialises or widens, within a budget.

The method is in docs/method.md, section 4. The fixed policy of
:func:`~lightning_beta.diagnosis.surgical_correction` retrains the flagged groups for a set number of epochs at a
set lr, whatever the fault. This policy chooses instead, and spends at most ``floor(budget * full_steps)``
optimizer steps, every stage counted, where ``full_steps`` is what full retraining from scratch takes on the same
data. A held-out split of the training data (``holdout`` of it, drawn with a fixed seed; the fits see only the
rest) judges every choice:

1. **search**: for each candidate lr, ``k`` steps of the flagged groups from their faulty weights (cosine lr from
   the candidate to 0). ``k`` is a third of the budget shared among the candidates and a possible
   re-initialisation, at most one epoch. The lowest held-out loss wins (the accuracy of a few hundred easy samples
   saturates and ties).
2. **re-initialise**: if no lr lowers the held-out loss below the input's, the groups are beyond repair from their
   weights: ``k`` steps at the best lr from their re-initialised weights (each module's own ``reset_parameters``,
   which also resets BatchNorm running statistics), kept if that lowers the held-out loss.
3. **widen**: if that fails too, the fault reaches further: the flagged groups' neighbours (the groups just before
   and after each, in model order) are retrained with them, from the input weights.
4. **continue**: from the winner, at its lr, for the rest of the budget, validated on the held-out split after
   every epoch, with Lightning's ``EarlyStopping`` on the held-out loss (patience 2) and the best weights seen (the
   winner's included) restored at the end.

What it buys is measured in ``benchmarks/RESULTS.md``, section "Repair": on the digits models with the faulty group
given, it recovers more than the fixed policy on the MLP and less on the BatchNorm ResNet, at the same step budget.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_beta._checks import check_number
from lightning_beta.diagnosis._batches import check_group_names, iter_batches, model_device, run_model
from lightning_beta.diagnosis._outputs import LossFn, Predict, element_losses, element_predictions, valid_elements
from lightning_beta.diagnosis.treat import SurgeryResult, _budget_steps, retrain
from lightning_beta.layer_groups import GroupBy, group_parameters, group_sizes

#: Epochs without a lower held-out loss before the continuation stops.
PATIENCE = 2
#: The search (every lr, and the re-initialisation if tried) spends at most 1/SEARCH_SHARE of the budget.
SEARCH_SHARE = 3


def holdout_scores(
    net: nn.Module, dataloader: Iterable[Any], loss_fn: LossFn | None = None, predict: Predict | None = None
) -> tuple[float, float]:
    """Mean loss and accuracy of ``net`` in eval mode over the elements of ``dataloader`` (training flag restored).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.zero_(), net.bias.zero_()
        >>> loss, accuracy = holdout_scores(net, DataLoader(TensorDataset(torch.eye(2), torch.tensor([0, 0]))))
        >>> round(loss, 4), accuracy  # log(2); the argmax of a tie is class 0
        (0.6931, 1.0)
    """
    was_training = net.training
    net.eval()
    loss = 0.0
    right = total = 0
    try:
        with torch.no_grad():
            for x, y in iter_batches(dataloader, model_device(net)):
                output = run_model(net, x)
                valid = valid_elements(y)
                loss += float((element_losses(output, y, loss_fn) * valid).sum())
                right += int(((element_predictions(output, y, predict) == y) & valid).sum())
                total += int(valid.sum())
    finally:
        net.train(was_training)
    return loss / max(total, 1), right / max(total, 1)


def split_holdout(dataloader: Any, holdout: float, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """The fit and held-out loaders: a seeded random ``holdout`` share of ``dataloader``'s dataset is held out.

    The fit loader keeps the batch size, ``drop_last`` and ``collate_fn`` and shuffles with a seeded generator.

    Raises:
        TypeError: if ``dataloader`` is not a ``DataLoader`` over a sized dataset.
        ValueError: if ``holdout`` is outside ``(0, 1)`` or either split would be empty.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = DataLoader(TensorDataset(torch.zeros(10, 1), torch.zeros(10)), batch_size=4)
        >>> fit, held = split_holdout(data, 0.2)
        >>> len(fit.dataset), len(held.dataset), fit.batch_size
        (8, 2, 4)
    """
    check_number("holdout", holdout, low=0.0, high=1.0, low_open=True, high_open=True)
    if not isinstance(dataloader, DataLoader) or not hasattr(dataloader.dataset, "__len__"):
        raise TypeError(
            '`policy="search"` holds out part of `train_dataloaders`, which must be a DataLoader over a sized'
            f" dataset, got {type(dataloader).__name__}"
        )
    dataset = dataloader.dataset
    n = len(dataset)  # type: ignore[arg-type]
    n_hold = round(holdout * n)
    if n_hold < 1 or n - n_hold < 1:
        raise ValueError(f"`holdout`={holdout} of {n} samples leaves an empty split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    batch_size = dataloader.batch_size or 1
    fit = DataLoader(
        Subset(dataset, order[n_hold:]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=dataloader.drop_last and n - n_hold >= batch_size,
        collate_fn=dataloader.collate_fn,
    )
    held = DataLoader(
        Subset(dataset, order[:n_hold]), batch_size=max(batch_size, 256), collate_fn=dataloader.collate_fn
    )  # type: ignore[arg-type]
    return fit, held


def neighbours(layers: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The groups just before and after each of ``layers`` in model order, not already in ``layers``.

    Example:
        >>> neighbours(["b"], ["a", "b", "c", "d"])
        ['a', 'c']
    """
    index = {g: i for i, g in enumerate(groups)}
    around = {j for g in layers for j in (index[g] - 1, index[g] + 1) if 0 <= j < len(groups)}
    return [groups[j] for j in sorted(around) if groups[j] not in layers]


def reset_groups(net: nn.Module, groups: Mapping[str, Sequence[str]], layers: Sequence[str]) -> None:
    """Re-initialise, in place, every module owning a parameter of ``layers`` with its own ``reset_parameters``."""
    names = {p for g in layers for p in groups[g]}
    for module_name, module in net.named_modules():
        own = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
        if any(n in names for n in own) and hasattr(module, "reset_parameters"):
            module.reset_parameters()


class _KeepBest(pl.Callback):
    """Keeps, in memory, the weights with the lowest ``val_loss`` seen, starting from a known loss and accuracy."""

    def __init__(self, net: nn.Module, loss: float, accuracy: float) -> None:
        self.net, self.loss, self.accuracy = net, loss, accuracy
        self.state = copy.deepcopy(net.state_dict())

    def offer(self, loss: float, accuracy: float) -> None:
        """Keep the current weights if ``loss`` is the lowest seen."""
        if loss < self.loss:
            self.loss, self.accuracy = loss, accuracy
            self.state = copy.deepcopy(self.net.state_dict())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Once per validation run, on the host: read once per epoch, not per step.
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val_loss" not in metrics:
            return
        self.offer(float(metrics["val_loss"]), float(metrics["val_acc"]))


def search_repair(
    model: nn.Module,
    layers: Sequence[str],
    train_dataloaders: Any,
    *,
    budget: float,
    full_steps: int | None,
    lrs: Sequence[float],
    holdout: float,
    momentum: Literal["beta"] | float,
    group_by: GroupBy,
    weight_decay: float,
    loss_fn: LossFn | None,
    predict: Predict | None,
    trainer_kwargs: Mapping[str, Any],
) -> SurgeryResult:
    """``surgical_correction(..., policy="search")``: see the module docstring; arguments as there.

    Raises:
        ValueError: without ``full_steps``, with no candidate lr or one ``<= 0``, or when the budget is too small
            for the search (two steps per candidate).
        TypeError: if ``train_dataloaders`` is not a ``DataLoader`` over a sized dataset.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=8)
        >>> from lightning_beta.diagnosis import surgical_correction
        >>> result = surgical_correction(net, ["2"], data, policy="search", full_steps=100)
        >>> result.optimizer_steps <= result.budget_steps == 30, result.lrs_tried
        (True, [0.01, 0.05, 0.2])
    """
    if full_steps is None:
        raise ValueError(
            '`full_steps` is required with policy="search": the optimizer steps of full retraining from scratch,'
            " the unit of `budget`"
        )
    limit = _budget_steps(budget, full_steps)
    assert limit is not None  # full_steps is given
    lrs = [float(lr) for lr in lrs]
    if not lrs:
        raise ValueError("`lrs` is empty: give at least one candidate learning rate")
    for lr in lrs:
        check_number("lrs", lr, low=0.0, low_open=True)
    fit, held = split_holdout(train_dataloaders, holdout)
    groups = group_parameters(model, group_by)
    check_group_names(layers, groups)
    order = list(groups)
    per_epoch = max(len(fit), 1)
    n_candidates = len(lrs) + 1
    k = min(per_epoch, limit // (SEARCH_SHARE * n_candidates))
    if k < 1:
        raise ValueError(
            f"`budget` * `full_steps` = {limit} optimizer step(s) cannot hold the search: {SEARCH_SHARE * n_candidates}"
            f" are needed for {len(lrs)} lr(s) and the re-initialisation"
        )
    common: dict[str, Any] = {
        "momentum": momentum,
        "weight_decay": weight_decay,
        "loss_fn": loss_fn,
        "predict": predict,
        "trainer_kwargs": trainer_kwargs,
    }
    stages: list[dict[str, Any]] = []

    def record(name: str, chosen: Sequence[str], lr: float, reinit: bool, trainer: pl.Trainer, begin: float) -> None:
        stages.append(
            {
                "stage": name,
                "groups": list(chosen),
                "lr": lr,
                "reinit": reinit,
                "optimizer_steps": int(trainer.global_step),
                "epochs": int(trainer.current_epoch),
                "wall_time_s": time.perf_counter() - begin,
            }
        )

    def candidate(net: nn.Module, lr: float, reinit: bool) -> tuple[float, float]:
        begin = time.perf_counter()
        trainable = {p for g in layers for p in groups[g]}
        trainer, _ = retrain(net, trainable, fit, None, lr=lr, max_epochs=1, max_steps=k, **common)
        loss, accuracy = holdout_scores(net, held, loss_fn, predict)
        loss = loss if math.isfinite(loss) else math.inf  # a diverged candidate loses every comparison
        record("search", layers, lr, reinit, trainer, begin)
        stages[-1].update(holdout_loss=loss, holdout_accuracy=accuracy)
        return loss, accuracy

    begin = time.perf_counter()
    input_loss, input_accuracy = holdout_scores(model, held, loss_fn, predict)
    layers = list(layers)
    # The held-out loss judges: the accuracy of a few hundred easy samples saturates and ties.
    candidates = []
    for lr in lrs:
        net = copy.deepcopy(model)
        candidates.append((*candidate(net, lr, False), net, lr))
    best_loss, best_accuracy, best_net, best_lr = min(candidates, key=lambda c: c[0])
    reinit = False
    if best_loss >= input_loss:  # retraining from the faulty weights failed: the group may be beyond repair
        net = copy.deepcopy(model)
        reset_groups(net, groups, layers)
        reinit_loss, reinit_accuracy = candidate(net, best_lr, True)
        reinit = reinit_loss < input_loss
        if reinit:
            best_loss, best_accuracy, best_net = reinit_loss, reinit_accuracy, net
    widened: list[str] = []
    if best_loss >= input_loss:  # neither helped: the fault reaches beyond the flagged groups
        widened = neighbours(layers, order)
        best_net = copy.deepcopy(model)
        best_loss, best_accuracy = input_loss, input_accuracy
    chosen = layers + widened
    remaining = limit - sum(s["optimizer_steps"] for s in stages)
    if remaining >= 1:
        keep = _KeepBest(best_net, best_loss, best_accuracy)
        stop = EarlyStopping(monitor="val_loss", mode="min", patience=PATIENCE, check_on_train_epoch_end=False)
        trainable = {p for g in chosen for p in groups[g]}
        stage_begin = time.perf_counter()
        trainer, _ = retrain(
            best_net,
            trainable,
            fit,
            held,
            lr=best_lr,
            max_epochs=math.ceil(remaining / per_epoch),
            max_steps=remaining,
            callbacks=[keep, stop],
            **{**common, "trainer_kwargs": {**trainer_kwargs, "num_sanity_val_steps": 0}},
        )
        # A fit stopped by ``max_steps`` mid-epoch does not validate its last steps: score them here.
        keep.offer(*holdout_scores(best_net, held, loss_fn, predict))
        best_net.load_state_dict(keep.state)
        best_loss, best_accuracy = keep.loss, keep.accuracy
        record("continue", chosen, best_lr, reinit, trainer, stage_begin)
        stages[-1].update(
            holdout_loss=best_loss, holdout_accuracy=best_accuracy, stopped_early=bool(stop.stopped_epoch)
        )
    wall = time.perf_counter() - begin
    for name, param in best_net.named_parameters():
        param.requires_grad_(dict(model.named_parameters())[name].requires_grad)
    best_net.train(model.training)
    sizes = group_sizes(best_net, groups)
    n_trained = sum(sizes[g] for g in chosen)
    return SurgeryResult(
        model=best_net,
        layers=layers,
        selection="layers",
        n_params_trained=n_trained,
        fraction_trained=n_trained / max(sum(sizes.values()), 1),
        optimizer_steps=sum(s["optimizer_steps"] for s in stages),
        wall_time_s=wall,
        epochs=sum(int(s.get("epochs", 0)) for s in stages),
        momentum=momentum,
        groups_touched=chosen,
        policy="search",
        budget_steps=limit,
        stages=stages,
        lrs_tried=lrs,
        lr=best_lr,
        reinit=reinit,
        widened_to=widened,
        holdout_accuracy={"input": input_accuracy, "final": best_accuracy},
        holdout_loss={"input": input_loss, "final": best_loss},
    )
