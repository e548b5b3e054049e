"""Private: the one point where the package reads gradients, for every consumer (attribution, secant curvature).

Gradients are read in ``on_before_optimizer_step``, which Lightning calls once per optimizer step (also under
gradient accumulation) after the backward pass and the AMP unscale, and **before gradient clipping**. So every
consumer sees the raw gradients of the step, unscaled, whatever ``gradient_clip_val`` is:

- under 16-bit AMP, Lightning unscales the gradients before the hook, except for optimizers that unscale inside
  ``step()`` (``fused=True``), for which :func:`pending_scale` gives the scaler's device scale to divide by;
- under a sharded strategy (FSDP2's ``DTensor`` gradients), :func:`local_tensor` gives the rank's own shard, whose
  sums of powers add up over ranks to those of the full gradient.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def handles_unscaling(optimizer: Any) -> bool:
    """Whether the optimizer unscales gradients inside ``step()`` (fused optimizers), as Lightning decides it."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def grad_scaler(trainer: Any) -> Any | None:
    """The Trainer's ``GradScaler`` (16-bit AMP), or ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)


def pending_scale(scaler: Any | None, optimizer: Any) -> Tensor | None:
    """The AMP scale still multiplied into the gradients in ``on_before_optimizer_step``, or ``None``.

    Only a fused optimizer under a ``GradScaler`` leaves scaled gradients for the hook. The value is the scaler's
    device tensor ``_scale`` (``get_scale()`` would copy it to the host); divide by it on the device.
    """
    if scaler is None or not handles_unscaling(optimizer):
        return None
    return getattr(scaler, "_scale", None)


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank's own shard of a ``DTensor`` (FSDP2), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def is_distributed_tensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    return callable(getattr(tensor, "to_local", None))
