"""Treat: surgical correction, retraining only the flagged layer groups in a fresh ``Trainer.fit`` (PAPER.md section 4).

The model is deep-copied; every other group is frozen (``requires_grad=False``, and its BatchNorm modules held in
eval mode so their running statistics do not move), and the copy is retrained with the physics momentum schedule.
``selection="parameters"`` spends the same parameter budget on the individual parameters with the largest
error gradient instead (a masked update). Retraining every group is the full-retraining baseline.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.diagnosis._batches import check_group_names, split_batch
from lightning_beta.diagnosis.localize import error_gradients
from lightning_beta.layer_groups import GroupBy, group_parameters, group_sizes

Selection = Literal["layers", "parameters"]


@dataclass
class SurgeryResult:
    """What a surgical correction produced and what it cost.

    Attributes:
        model: the corrected copy (same class as the input; requires_grad flags and training flag as the input's).
        layers: the groups treated (for ``selection="parameters"``, the groups whose size set the budget).
        selection: ``"layers"`` or ``"parameters"``.
        n_params_trained: scalar parameters the update could change.
        fraction_trained: ``n_params_trained`` over all parameters.
        optimizer_steps: optimizer steps taken (``trainer.global_step``).
        wall_time_s: wall time of ``Trainer.fit``.
        epochs: epochs run.
        momentum: ``"beta"`` or the constant momentum used.
    """

    model: nn.Module
    layers: list[str]
    selection: str
    n_params_trained: int
    fraction_trained: float
    optimizer_steps: int
    wall_time_s: float
    epochs: int
    momentum: str | float
    groups_touched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready."""
        return {
            "layers": self.layers,
            "selection": self.selection,
            "n_params_trained": self.n_params_trained,
            "fraction_trained": self.fraction_trained,
            "optimizer_steps": self.optimizer_steps,
            "wall_time_s": self.wall_time_s,
            "epochs": self.epochs,
            "momentum": self.momentum,
            "groups_touched": self.groups_touched,
        }


class SurgeryModule(pl.LightningModule):
    """Wraps a classifier for surgery: its loss, and SGD with a cosine lr over the trainable parameters only.

    Args:
        net: the network (any ``nn.Module``, a LightningModule included) returning logits.
        lr: peak learning rate, decayed to 0 by a per-step cosine schedule.
        momentum: SGD momentum (overwritten every step by ``BetaMomentumCallback`` when it is used).
        weight_decay: L2 penalty of the optimizer.
        loss_fn: ``loss_fn(logits, targets)`` per sample; its mean is minimised. Defaults to cross-entropy.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        momentum: float,
        weight_decay: float,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.loss_fn = loss_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.loss_fn is None:
            return nn.functional.cross_entropy(logits, y)
        return self.loss_fn(logits, y).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = split_batch(batch)
        loss = self._loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split_batch(batch)
        logits = self(x)
        self.log("val_loss", self._loss(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _force_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def _parameter_masks(
    net: nn.Module, budget: int, dataloader: Iterable[Any], loss_fn: Callable[[Tensor, Tensor], Tensor] | None
) -> dict[str, Tensor]:
    """Masks selecting the ``budget`` parameter entries with the largest error gradient (all samples if none wrong)."""
    grads = error_gradients(net, dataloader, loss_fn)
    source = grads.wrong if grads.n_wrong > 0 else grads.correct
    names = list(source)
    flat = torch.cat([source[n].abs().flatten() for n in names])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, k=min(budget, flat.numel())).indices] = True
    masks, start = {}, 0
    for name in names:
        n = source[name].numel()
        masks[name] = chosen[start : start + n].view_as(source[name])
        start += n
    return masks


def surgical_correction(
    model: nn.Module,
    layers: Sequence[str],
    train_dataloaders: Any,
    val_dataloaders: Any = None,
    max_epochs: int = 1,
    lr: float = 0.05,
    momentum: Literal["beta"] | float = "beta",
    selection: Selection = "layers",
    group_by: GroupBy = "auto",
    weight_decay: float = 0.0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    error_dataloader: Any = None,
    **trainer_kwargs: Any,
) -> SurgeryResult:
    """Retrain only ``layers`` of a copy of ``model`` (or the same budget of single parameters) in a fresh fit.

    Freezing happens on the copy before the Trainer wraps it, so it is DDP-safe. Frozen groups keep their
    parameters bit-identical, and their BatchNorm modules stay in eval mode so their running statistics do not
    move. The optimizer is SGD over the trainable parameters with a per-step cosine lr from ``lr`` to 0, and
    :class:`~lightning_beta.callbacks.BetaMomentumCallback` sets the momentum when ``momentum="beta"``.

    With ``selection="parameters"`` the budget is the number of parameters in ``layers``, spent on the entries
    with the largest gradient magnitude of the mean loss over the misclassified samples of ``error_dataloader``
    (``train_dataloaders`` if not given); every other entry's update is zeroed by a gradient hook (weight decay is
    applied inside the hook so masked entries do not decay), and BatchNorm modules without a chosen entry keep
    their running statistics.

    Args:
        model: a classifier returning logits (a LightningModule or a plain ``nn.Module``); not modified.
        layers: the groups to retrain; all groups is full retraining.
        train_dataloaders: passed to ``Trainer.fit``; batches are ``(inputs, targets)``.
        val_dataloaders: passed to ``Trainer.fit``. Defaults to ``None``.
        max_epochs: epochs of retraining, ``>= 1``. Defaults to ``1``.
        lr: peak learning rate, ``> 0``. Defaults to ``0.05``.
        momentum: ``"beta"`` for the critical-damping schedule, or a constant in ``[0, 1)``. Defaults to ``"beta"``.
        selection: ``"layers"`` or ``"parameters"``. Defaults to ``"layers"``.
        group_by: layer groups. Defaults to ``"auto"``.
        weight_decay: L2 penalty. Defaults to ``0.0``.
        loss_fn: per-sample loss ``loss_fn(logits, targets)``; its mean is minimised. Defaults to cross-entropy.
        error_dataloader: where the error gradients of ``selection="parameters"`` come from. Defaults to
            ``train_dataloaders``.
        **trainer_kwargs: further ``Trainer`` arguments (quiet CPU-friendly defaults: no logger, checkpointing,
            progress bar or model summary).

    Returns:
        The corrected copy and the measured cost.

    Raises:
        ValueError: for an unknown or empty ``layers``, an unknown ``selection``, ``max_epochs < 1``, ``lr <= 0`` or
            a constant momentum outside ``[0, 1)``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
        >>> result = surgical_correction(net, ["2"], data, max_epochs=1)
        >>> frozen_kept = torch.equal(result.model[0].weight, net[0].weight)
        >>> frozen_kept, result.optimizer_steps, round(result.fraction_trained, 3)
        (True, 4, 0.31)
    """
    groups = group_parameters(model, group_by)
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` is empty: name at least one group to retrain")
    check_group_names(layers, groups)
    if selection not in ("layers", "parameters"):
        raise ValueError(f'`selection` must be "layers" or "parameters", got {selection!r}')
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"`max_epochs` must be an int >= 1, got {max_epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be a finite number > 0, got {lr!r}")
    if momentum != "beta" and not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f'`momentum` must be "beta" or a float in [0, 1), got {momentum!r}')

    net = copy.deepcopy(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    sizes = group_sizes(net, groups)
    total = sum(sizes.values())
    budget = sum(sizes[g] for g in layers)
    params = dict(net.named_parameters())
    handles: list[Any] = []
    if selection == "layers":
        trainable = {p for g in layers for p in groups[g]}
        n_trained = budget
        touched = list(layers)
    else:
        masks = _parameter_masks(net, budget, error_dataloader or train_dataloaders, loss_fn)
        trainable = {name for name, mask in masks.items() if bool(mask.any())}
        n_trained = int(sum(int(mask.sum()) for mask in masks.values()))
        for name in trainable:
            param, mask = params[name], masks[name].to(params[name].dtype)

            def hook(grad: Tensor, param: Tensor = param, mask: Tensor = mask) -> Tensor:
                return (grad + weight_decay * param.detach()) * mask

            handles.append(param.register_hook(hook))
        touched = [g for g, names in groups.items() if any(n in trainable for n in names)]
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    # Lightning switches modes itself (and restores them by setting ``.training`` directly, bypassing an
    # overridden ``train()``), so a pre-hook puts frozen BatchNorm back in eval mode before every forward.
    for m in net.modules():
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            handles.append(m.register_forward_pre_hook(_force_eval))
    start_momentum = 0.9 if momentum == "beta" else float(momentum)
    module = SurgeryModule(
        net,
        lr=float(lr),
        momentum=start_momentum,
        weight_decay=weight_decay if selection == "layers" else 0.0,
        loss_fn=loss_fn,
    )
    callbacks = list(trainer_kwargs.pop("callbacks", []) or [])
    if momentum == "beta":
        callbacks.append(BetaMomentumCallback(log_momentum=False))
    kwargs: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    was_training = model.training
    begin = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders)
    finally:
        for handle in handles:
            handle.remove()
    wall = time.perf_counter() - begin
    for name, param in net.named_parameters():
        param.requires_grad_(flags[name])
    net.train(was_training)
    return SurgeryResult(
        model=net,
        layers=layers,
        selection=selection,
        n_params_trained=n_trained,
        fraction_trained=n_trained / max(total, 1),
        optimizer_steps=int(trainer.global_step),
        wall_time_s=wall,
        epochs=int(trainer.current_epoch),
        momentum=momentum,
        groups_touched=touched,
    )
