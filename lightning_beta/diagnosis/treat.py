"""Treat: surgical correction, retraining only the flagged layer groups in a fresh ``Trainer.fit``.

The method is in docs/method.md, section 4.

The model is deep-copied; every other group is frozen (``requires_grad=False``, and its BatchNorm modules held in
eval mode so their running statistics do not move), and the copy is retrained with the physics momentum schedule.
``selection="parameters"`` spends the same parameter budget on the individual parameters with the largest
error gradient instead (a masked update). Retraining every group is the full-retraining baseline.

Two policies: ``"fixed"`` (the default) retrains for ``max_epochs`` at ``lr``; ``"search"``
(:mod:`lightning_beta.diagnosis.repair`) chooses the lr on a held-out split of the training data, re-initialises or
widens to neighbour groups when retraining fails, and stops early, within ``budget`` of full retraining's steps.
Without retraining, :mod:`lightning_beta.diagnosis.restore` fits a flagged group back to its probe record, which
``diagnose(policy="auto")`` prefers when a probe is at hand.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_beta._checks import check_choice, check_int, check_number
from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.diagnosis._batches import check_group_names, run_model, split_batch
from lightning_beta.diagnosis._outputs import LossFn, Predict, element_predictions, mean_loss, valid_elements
from lightning_beta.diagnosis.localize import error_gradients
from lightning_beta.layer_groups import GroupBy, group_parameters, group_sizes

Selection = Literal["layers", "parameters"]
Policy = Literal["fixed", "search"]

#: Candidate peak learning rates of ``policy="search"``.
SEARCH_LRS = (0.01, 0.05, 0.2)

#: Names a user may mean for the retraining epochs, which are ``max_epochs``.
_EPOCH_ALIASES = ("epochs", "num_epochs", "n_epochs", "max_epoch")

#: Lightning's warnings that the internal fits raise by design, silenced around them (regexes from the start).
FIT_NOISE = (
    r"You defined a `validation_step` but have no `val_dataloader`",  # the search's candidate fits validate later
    r"Found \d+ module\(s\) in eval mode at the start of training",  # frozen BatchNorm held in eval mode on purpose
    r"GPU available but not used",
    r"The '\w+' does not have many workers",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's FutureWarning from inside Lightning's own code
)
#: The loggers of Lightning's info lines (``GPU available: ...``, the litlogger tip, ``Trainer.fit` stopped``).
#: Both namespaces: once ``pytorch_lightning`` is imported, Lightning's own info lines go through its loggers.
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
_SUMMARY_LOGGERS = ("lightning.pytorch.callbacks.model_summary", "pytorch_lightning.callbacks.model_summary")


@contextmanager
def quiet_fit(trainer_kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Silence Lightning's console noise around one internal fit: the warnings of :data:`FIT_NOISE` and info lines.

    Inside, the ``lightning.pytorch`` and ``lightning.fabric`` loggers (and those of ``pytorch_lightning``, which
    Lightning's info lines go through once it is imported) are at ``WARNING`` at least (their levels are restored
    afterwards, also after an error), and :data:`FIT_NOISE` is ignored by ``warnings.catch_warnings``; every other
    warning, ours included, is shown as usual. A model summary the caller asks for (``enable_model_summary=True``)
    is still logged.
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    summaries = [logging.getLogger(name) for name in _SUMMARY_LOGGERS]
    levels = [(logger, logger.level) for logger in [*loggers, *summaries]]
    try:
        for logger in loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        if trainer_kwargs.get("enable_model_summary"):
            for summary in summaries:
                summary.setLevel(logging.INFO)
        with warnings.catch_warnings():
            for pattern in FIT_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in levels:
            logger.setLevel(level)


def check_trainer_kwargs(owner: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse, before any work, a keyword argument that neither ``owner`` nor ``Trainer`` takes.

    Raises:
        TypeError: naming the argument and, where one is meant, the argument to use instead.

    Example:
        >>> check_trainer_kwargs("diagnose", {"epochs": 3})
        Traceback (most recent call last):
        ...
        TypeError: `epochs` is an argument of neither diagnose nor Trainer: the retraining epochs are `max_epochs=3`
    """
    accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for name, value in kwargs.items():
        if name in accepted:
            continue
        if name in _EPOCH_ALIASES:
            hint = f": the retraining epochs are `max_epochs={value!r}`"
        elif name == "trainer_kwargs":
            hint = ': pass Trainer arguments as keyword arguments, e.g. `accelerator="cpu"`'
        else:
            hint = ""
        raise TypeError(f"`{name}` is an argument of neither {owner} nor Trainer{hint}")


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
        groups_touched: the groups whose parameters the update could change (the widened set included).
        policy: ``"fixed"`` or ``"search"``.
        budget_steps: the optimizer-step cap (``floor(budget * full_steps)``), ``None`` when uncapped.
        stages: ``policy="search"``: one dict per fit, in order (``stage``, ``groups``, ``lr``, ``reinit``,
            ``optimizer_steps``, ``epochs``, ``wall_time_s``, ``holdout_loss``, ``holdout_accuracy``); the totals
            above include every stage.
        lrs_tried: the candidate learning rates of the search.
        lr: the learning rate chosen (``lr`` itself for ``"fixed"``).
        reinit: whether the groups were re-initialised with their modules' ``reset_parameters``.
        widened_to: neighbour groups added because the flagged ones alone did not improve the held-out accuracy.
        holdout_accuracy: accuracy on the held-out split: ``{"input": ..., "final": ...}``.
        holdout_loss: mean loss on the held-out split, which every choice of the search minimises, same keys.
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
    policy: str = "fixed"
    budget_steps: int | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    lrs_tried: list[float] = field(default_factory=list)
    lr: float | None = None
    reinit: bool = False
    widened_to: list[str] = field(default_factory=list)
    holdout_accuracy: dict[str, float] = field(default_factory=dict)
    holdout_loss: dict[str, float] = field(default_factory=dict)

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
            "policy": self.policy,
            "budget_steps": self.budget_steps,
            "stages": self.stages,
            "lrs_tried": self.lrs_tried,
            "lr": self.lr,
            "reinit": self.reinit,
            "widened_to": self.widened_to,
            "holdout_accuracy": self.holdout_accuracy,
            "holdout_loss": self.holdout_loss,
        }


class SurgeryModule(pl.LightningModule):
    """Wraps a classifier for surgery: its loss, and SGD with a cosine lr over the trainable parameters only.

    The loss is the mean over the elements (samples, pixels or tokens) of the batch, as in the localizer.

    Args:
        net: the network (any ``nn.Module``, a LightningModule included) returning logits.
        lr: peak learning rate, decayed to 0 by a per-step cosine schedule.
        momentum: SGD momentum (overwritten every step by ``BetaMomentumCallback`` when it is used).
        weight_decay: L2 penalty, applied once per optimizer step.
        loss_fn: ``loss_fn(logits, targets)`` per element; its mean is minimised. Defaults to cross-entropy.
        predict: ``predict(logits)`` per element, for ``val_acc``. Defaults to the argmax over the classes.
        masks: parameter name to the 0/1 mask of its entries the update may change (``selection="parameters"``);
            the weight decay of a masked parameter is then added, masked, in ``on_before_optimizer_step``.
            Defaults to ``None``: every trainable entry, decay by the optimizer.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        momentum: float,
        weight_decay: float,
        loss_fn: LossFn | None = None,
        predict: Predict | None = None,
        masks: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.loss_fn, self.predict = loss_fn, predict
        self.masks = masks
        self.handles: list[Any] = []

    def forward(self, inputs: Any) -> Any:
        # A Hugging Face batch's inputs are a dict, passed as keyword arguments (diagnosis/_batches.py).
        return run_model(self.net, inputs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = split_batch(batch)
        loss = mean_loss(self(x), y, self.loss_fn)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split_batch(batch)
        output = self(x)
        valid = valid_elements(y)
        right = (element_predictions(output, y, self.predict) == y) & valid
        self.log("val_loss", mean_loss(output, y, self.loss_fn))
        self.log("val_acc", right.sum() / valid.sum().clamp_min(1))

    def on_fit_start(self) -> None:
        # The masks follow the net to its device; a gradient hook zeroes the update of every unchosen entry.
        if self.masks is None:
            return
        self.masks = {name: mask.to(self.device) for name, mask in self.masks.items()}
        params = dict(self.net.named_parameters())
        for name, mask in self.masks.items():

            def hook(grad: Tensor, mask: Tensor = mask) -> Tensor:
                return grad * mask

            self.handles.append(params[name].register_hook(hook))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer step, after the micro-batches' gradients are accumulated: a decay added in a gradient
        # hook would be added once per backward, ``accumulate_grad_batches`` times.
        if self.masks is None or self.weight_decay == 0:
            return
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                param = params[name]
                if param.grad is not None:
                    param.grad.add_(param * mask, alpha=self.weight_decay)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        decay = self.weight_decay if self.masks is None else 0.0
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _force_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def _parameter_masks(
    net: nn.Module, budget: int, dataloader: Iterable[Any], loss_fn: LossFn | None, predict: Predict | None
) -> dict[str, Tensor]:
    """Masks selecting the ``budget`` parameter entries with the largest error gradient (all elements if none wrong)."""
    grads = error_gradients(net, dataloader, loss_fn, predict)
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


def _budget_steps(budget: float, full_steps: int | None) -> int | None:
    """The optimizer-step cap ``floor(budget * full_steps)``, ``None`` without ``full_steps``."""
    check_number("budget", budget, low=0.0, high=1.0, low_open=True)
    check_int("full_steps", full_steps, minimum=1, optional=True)
    return None if full_steps is None else max(int(budget * full_steps), 1)


def retrain(
    net: nn.Module,
    trainable: Collection[str],
    train_dataloaders: Any,
    val_dataloaders: Any,
    *,
    lr: float,
    momentum: Literal["beta"] | float,
    weight_decay: float,
    loss_fn: LossFn | None,
    predict: Predict | None,
    max_epochs: int,
    max_steps: int | None = None,
    masks: dict[str, Tensor] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[pl.Trainer, float]:
    """One fresh ``Trainer.fit`` of ``net`` in place, updating only the parameters named in ``trainable``.

    Every other parameter is frozen, and BatchNorm modules without a trainable parameter are held in eval mode.
    The ``requires_grad`` flags are left as the fit set them (the caller restores them). The fit is quiet unless
    ``trainer_kwargs`` say otherwise: no logger, checkpointing, progress bar or model summary, and Lightning's info
    lines and by-design warnings silenced around it (:func:`quiet_fit`).

    Returns:
        The Trainer (``global_step``, ``current_epoch``, ``callback_metrics``) and the wall time of the fit.
    """
    for name, param in net.named_parameters():
        param.requires_grad_(name in trainable)
    handles: list[Any] = []
    # Lightning switches modes itself (and restores them by setting ``.training`` directly, bypassing an
    # overridden ``train()``), so a pre-hook puts frozen BatchNorm back in eval mode before every forward.
    for m in net.modules():
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            handles.append(m.register_forward_pre_hook(_force_eval))
    start_momentum = 0.9 if momentum == "beta" else float(momentum)
    module = SurgeryModule(
        net, lr=lr, momentum=start_momentum, weight_decay=weight_decay, loss_fn=loss_fn, predict=predict, masks=masks
    )
    kwargs: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    kwargs.update(trainer_kwargs or {})
    all_callbacks = list(kwargs.pop("callbacks", []) or []) + list(callbacks)
    if momentum == "beta":
        all_callbacks.append(BetaMomentumCallback(log_momentum=False))
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    begin = 0.0
    try:
        # Quiet by default: the user called a diagnosis function, not a fit (device lines, tips, "no val_dataloader").
        with quiet_fit(kwargs):
            trainer = pl.Trainer(max_epochs=max_epochs, callbacks=all_callbacks, **kwargs)
            begin = time.perf_counter()
            trainer.fit(module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders)
    finally:
        for handle in handles + module.handles:
            handle.remove()
    return trainer, time.perf_counter() - begin


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
    loss_fn: LossFn | None = None,
    error_dataloader: Any = None,
    predict: Predict | None = None,
    policy: Policy = "fixed",
    budget: float = 0.3,
    full_steps: int | None = None,
    lrs: Sequence[float] = SEARCH_LRS,
    holdout: float = 0.1,
    **trainer_kwargs: Any,
) -> SurgeryResult:
    """Retrain only ``layers`` of a copy of ``model`` (or the same budget of single parameters) in a fresh fit.

    Freezing happens on the copy before the Trainer wraps it, so it is DDP-safe. Frozen groups keep their
    parameters bit-identical, and their BatchNorm modules stay in eval mode so their running statistics do not
    move. The optimizer is SGD over the trainable parameters with a per-step cosine lr from ``lr`` to 0, and
    :class:`~lightning_beta.callbacks.BetaMomentumCallback` sets the momentum when ``momentum="beta"``.

    With ``selection="parameters"`` the budget is the number of parameters in ``layers``, spent on the entries
    with the largest gradient magnitude of the mean loss over the misclassified samples of ``error_dataloader``
    (``train_dataloaders`` if not given); every other entry's gradient is zeroed by a gradient hook, the weight decay
    of the chosen entries is added once per optimizer step (so masked entries do not decay, and gradient
    accumulation does not multiply it), and BatchNorm modules without a chosen entry keep their running statistics.

    Args:
        model: a classifier returning logits (a LightningModule or a plain ``nn.Module``); not modified.
        layers: the groups to retrain; all groups is full retraining.
        train_dataloaders: passed to ``Trainer.fit``; batches are ``(inputs, targets)``, or Hugging Face dicts
            with ``labels`` (passed whole, as keyword arguments).
        val_dataloaders: passed to ``Trainer.fit``. Defaults to ``None``.
        max_epochs: epochs of retraining, ``>= 1``. Defaults to ``1``.
        lr: peak learning rate, ``> 0``. Defaults to ``0.05``.
        momentum: ``"beta"`` for the critical-damping schedule, or a constant in ``[0, 1)``. Defaults to ``"beta"``.
        selection: ``"layers"`` or ``"parameters"``. Defaults to ``"layers"``.
        group_by: layer groups. Defaults to ``"auto"``.
        weight_decay: L2 penalty, ``>= 0``, once per optimizer step. Defaults to ``0.0``.
        loss_fn: per-element loss ``loss_fn(logits, targets)`` (one per target entry); its mean is minimised.
            Defaults to cross-entropy over the class dimension (``(N, C)``, ``(B, C, d1, ...)`` and ``(B, T, V)``
            logits, or the ``logits`` of a Hugging Face ``ModelOutput``).
        error_dataloader: where the error gradients of ``selection="parameters"`` come from. Defaults to
            ``train_dataloaders``.
        predict: ``predict(logits)`` giving one predicted class per element, for outputs the default argmax does
            not cover. Defaults to ``None``.
        policy: ``"fixed"``: ``max_epochs`` at ``lr``, as above; ``"search"``: an lr search on a held-out split of
            the training data, re-initialisation or widening to neighbour groups when the held-out accuracy asks for
            it, and a continuation with early stopping and the best weights restored, all within the budget
            (``lightning_beta.diagnosis.repair``; ``max_epochs`` and ``lr`` are then unused). Defaults to
            ``"fixed"``.
        budget: the share of ``full_steps`` that every stage together may spend, in ``(0, 1]``. Defaults to ``0.3``.
        full_steps: optimizer steps of full retraining from scratch on the same data, the unit of ``budget``;
            required by ``"search"``, a step cap for ``"fixed"`` when given. Defaults to ``None`` (uncapped).
        lrs: candidate peak learning rates of ``"search"``. Defaults to ``(0.01, 0.05, 0.2)``.
        holdout: share of ``train_dataloaders``' dataset held out by ``"search"`` to judge its choices, in
            ``(0, 1)``. Defaults to ``0.1``.
        **trainer_kwargs: further ``Trainer`` arguments (quiet CPU-friendly defaults: no logger, checkpointing,
            progress bar or model summary); the epochs are ``max_epochs`` above.

    Returns:
        The corrected copy and the measured cost.

    Raises:
        ValueError: for an unknown or empty ``layers``, an unknown ``selection``, ``max_epochs < 1``, ``lr <= 0``,
            ``weight_decay < 0``, a constant momentum outside ``[0, 1)``, an unknown ``policy``, ``budget`` outside
            ``(0, 1]``, ``full_steps < 1``, and for ``"search"``: no ``full_steps``, a budget too small for the
            search, ``selection="parameters"``, ``holdout`` outside ``(0, 1)``.
        TypeError: for a keyword argument that is not a ``Trainer`` argument either (e.g. ``epochs``: the message
            names ``max_epochs``), or a wrong type of ``max_epochs`` or ``lr``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
        >>> result = surgical_correction(net, ["2"], data, max_epochs=1)
        >>> frozen_kept = torch.equal(result.model[0].weight, net[0].weight)
        >>> frozen_kept, result.optimizer_steps, round(result.fraction_trained, 3)
        (True, 4, 0.31)
    """
    check_trainer_kwargs("surgical_correction", trainer_kwargs)
    groups = group_parameters(model, group_by)
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` is empty: name at least one group to retrain")
    check_group_names(layers, groups)
    check_choice("selection", selection, ("layers", "parameters"))
    check_int("max_epochs", max_epochs, minimum=1)
    check_number("lr", lr, low=0.0, low_open=True)
    check_number("weight_decay", weight_decay, low=0.0)
    constant = isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
    if momentum != "beta" and not (constant and 0.0 <= momentum < 1.0):
        raise ValueError(f'`momentum` must be "beta" or a float in [0, 1), got {momentum!r}')
    check_choice("policy", policy, ("fixed", "search"))
    if policy == "search":
        if selection != "layers":
            raise ValueError(
                f'`policy="search"` retrains layer groups: `selection` must be "layers", got {selection!r}'
            )
        from lightning_beta.diagnosis.repair import search_repair  # repair builds on this module's fit

        return search_repair(
            model,
            layers,
            train_dataloaders,
            budget=budget,
            full_steps=full_steps,
            lrs=lrs,
            holdout=holdout,
            momentum=momentum,
            group_by=group_by,
            weight_decay=float(weight_decay),
            loss_fn=loss_fn,
            predict=predict,
            trainer_kwargs=trainer_kwargs,
        )

    net = copy.deepcopy(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    sizes = group_sizes(net, groups)
    total = sum(sizes.values())
    n_budget = sum(sizes[g] for g in layers)
    params = dict(net.named_parameters())
    masks: dict[str, Tensor] | None = None
    if selection == "layers":
        trainable = {p for g in layers for p in groups[g]}
        n_trained = n_budget
        touched = list(layers)
    else:
        chosen = _parameter_masks(net, n_budget, error_dataloader or train_dataloaders, loss_fn, predict)
        trainable = {name for name, mask in chosen.items() if bool(mask.any())}
        n_trained = int(sum(int(mask.sum()) for mask in chosen.values()))
        masks = {name: chosen[name].to(params[name].dtype) for name in trainable}
        touched = [g for g, names in groups.items() if any(n in trainable for n in names)]
    budget_steps = _budget_steps(budget, full_steps)
    trainer, wall = retrain(
        net,
        trainable,
        train_dataloaders,
        val_dataloaders,
        lr=float(lr),
        momentum=momentum,
        weight_decay=float(weight_decay),
        loss_fn=loss_fn,
        predict=predict,
        masks=masks,
        max_epochs=max_epochs,
        max_steps=budget_steps,
        trainer_kwargs=trainer_kwargs,
    )
    for name, param in net.named_parameters():
        param.requires_grad_(flags[name])
    net.train(model.training)
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
        budget_steps=budget_steps,
        lr=float(lr),
    )
