"""Faults to plant in a trained model, for the demo and the benchmarks: ones that per-channel statistics cannot see.

:func:`moment_matched` rewires a layer group's output layer so that its output channels are permuted
(``"permute"``) or half of them negated (``"signflip"``), each channel then rescaled and shifted so that its mean
and standard deviation on given inputs are those of the channel it replaces. Per-channel means and variances of the
group's output are kept, so a localizer that compares them (activation drift) cannot see the fault at the group
that holds it; what the group computes has changed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_beta.reference import as_features, default_feature_dim

__all__ = ["moment_matched", "output_layer"]

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def output_layer(group: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The group's output layer (last conv/Linear outside a shortcut, else its norm) and the norm right after it."""
    if isinstance(group, nn.TransformerEncoderLayer):  # pre-norm: no norm after the feed-forward's output Linear
        return group.linear2, None
    named = [(n, m) for n, m in group.named_modules() if "shortcut" not in n]
    layers = [i for i, (_, m) in enumerate(named) if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not layers:
        norm = [m for _, m in named if isinstance(m, NORMS)][-1]
        return norm, None
    i = layers[-1]
    after = named[i + 1][1] if i + 1 < len(named) and isinstance(named[i + 1][1], NORMS) else None
    return named[i][1], after


def channel_moments(net: nn.Module, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``module``'s output on ``x`` (channel dim as the reference uses it)."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        net(x)
    handle.remove()
    rows = as_features(seen[0], default_feature_dim(module))
    return rows.mean(0).float(), rows.std(0).float().clamp_min(1e-6)


def _rows(t: Tensor, index: Tensor) -> Tensor:
    return t[index]


def moment_matched(net: nn.Module, group: str, x: Tensor, gen: torch.Generator, kind: str) -> nn.Module | None:
    """A copy of ``net`` whose group outputs ``y'_c = a_c y_{pi(c)} + b_c``, each channel's mean and std on ``x`` kept.

    Args:
        net: the trained model (not modified); ``net(x)`` must run it.
        group: the name of the group's module.
        x: inputs on which the moments are matched (training inputs).
        gen: the generator of the permutation or of the negated half.
        kind: ``"permute"`` (a derangement of the channels) or ``"signflip"`` (half of them negated).

    Returns:
        The faulty copy in eval mode, or ``None`` for ``"permute"`` on a group that is only a norm (a norm cannot
        reach another channel's input).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
        >>> x = torch.randn(256, 4)
        >>> bad = moment_matched(net, "0", x, torch.Generator().manual_seed(0), "permute")
        >>> before, after = net[0](x), bad[0](x)
        >>> torch.allclose(before.mean(0), after.mean(0), atol=1e-5), torch.allclose(before, after)
        (True, False)
    """
    bad = copy.deepcopy(net).eval()  # the moments are measured without moving any BatchNorm statistics
    found: Any = output_layer(bad.get_submodule(group))  # modules whose tensors are reached by name below
    layer, norm = found
    is_norm = isinstance(layer, NORMS)
    watched = norm if norm is not None else layer
    mu, sd = channel_moments(bad, watched, x)
    c = mu.shape[0]
    if kind == "permute":
        if is_norm:
            return None  # a norm cannot reach another channel's input: no permutation within the group
        pi = torch.randperm(c, generator=gen)
        while (pi == torch.arange(c)).any():  # a derangement: every channel replaced
            pi = torch.randperm(c, generator=gen)
        sign = torch.ones(c)
    else:
        pi = torch.arange(c)
        sign = torch.ones(c)
        sign[torch.randperm(c, generator=gen)[: c // 2]] = -1
    a = sign * sd / sd[pi]
    b = mu - a * mu[pi]
    with torch.no_grad():
        if is_norm:
            layer.weight.mul_(a)
            layer.bias.mul_(a).add_(b)
        elif norm is not None:
            layer.weight.copy_(_rows(layer.weight, pi))
            if layer.bias is not None:
                layer.bias.copy_(_rows(layer.bias, pi))
            stats: Any = norm  # a BatchNorm's running statistics follow their channels
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                stats.running_mean.copy_(_rows(stats.running_mean, pi))
                stats.running_var.copy_(_rows(stats.running_var, pi))
            norm.weight.copy_(a * _rows(norm.weight, pi))
            norm.bias.copy_(a * _rows(norm.bias, pi) + b)
        else:
            shape = (-1, *[1] * (layer.weight.dim() - 1))
            layer.weight.copy_(_rows(layer.weight, pi) * a.view(shape))
            if layer.bias is not None:
                layer.bias.copy_(a * _rows(layer.bias, pi) + b)
    return bad.eval()
