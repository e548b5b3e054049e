"""Layer groups: how the package splits a model's parameters into named groups (PAPER.md section 3).

Used by the attribution callback, the secant curvature of the regime monitor and the diagnosis functions, so
all of them name the same groups the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

GroupBy = str | int | Mapping[str, Sequence[str]]

#: Name of the group that collects parameters no rule claimed.
OTHER = "other"


def check_group_by(group_by: GroupBy) -> None:
    """Validate a ``group_by`` argument without a model, so constructors can fail early.

    Raises:
        TypeError: if ``group_by`` is not ``"auto"``, an int or a mapping of group names to regex lists.
        ValueError: if the int is below 1, the mapping is empty, a group has no regex, or a regex does not compile.

    Example:
        >>> check_group_by(0)
        Traceback (most recent call last):
        ...
        ValueError: `group_by` as a module depth must be >= 1, got 0
    """
    if isinstance(group_by, str):
        if group_by != "auto":
            raise ValueError(f'`group_by` must be "auto", an int depth or a dict of regex lists, got {group_by!r}')
        return
    if isinstance(group_by, bool):
        raise TypeError("`group_by` must be 'auto', an int or a dict, got bool")
    if isinstance(group_by, int):
        if group_by < 1:
            raise ValueError(f"`group_by` as a module depth must be >= 1, got {group_by}")
        return
    if not isinstance(group_by, Mapping):
        raise TypeError(f"`group_by` must be 'auto', an int or a dict, got {type(group_by).__name__}")
    if not group_by:
        raise ValueError("`group_by` as a dict must name at least one group")
    for name, patterns in group_by.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"`group_by` group names must be non-empty strings, got {name!r}")
        if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not patterns:
            raise ValueError(f"`group_by[{name!r}]` must be a non-empty list of regexes, got {patterns!r}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"`group_by[{name!r}]` holds an invalid regex {pattern!r}: {err}") from err


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _auto_groups(model: nn.Module) -> dict[str, list[str]]:
    # A LightningModule that wraps one network (``self.model = resnet18()``) is descended into, so the groups
    # are the network's top-level children rather than a single group.
    root, prefix = model, ""
    while True:
        children = [(name, child) for name, child in root.named_children() if _owns_parameters(child)]
        direct = list(root.named_parameters(recurse=False))
        if len(children) == 1 and not direct:
            name, root = children[0]
            prefix = f"{prefix}{name}."
            continue
        break
    # A parameter shared between two modules is named once by the root (its first name): keep only those names.
    known = {name for name, _ in model.named_parameters()}
    groups: dict[str, list[str]] = {}
    for name, child in children:
        names = [f"{prefix}{name}.{p}" for p, _ in child.named_parameters()]
        groups[f"{prefix}{name}"] = [n for n in names if n in known]
    return {group: names for group, names in groups.items() if names}


def _depth_groups(model: nn.Module, depth: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        module_path = name.split(".")[:-1]
        if not module_path:
            continue
        groups.setdefault(".".join(module_path[:depth]), []).append(name)
    return groups


def _regex_groups(model: nn.Module, group_by: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if OTHER in group_by:
        raise ValueError(f"`group_by` may not name a group {OTHER!r}: it is reserved for unclaimed parameters")
    names = [name for name, _ in model.named_parameters()]
    owner: dict[str, str] = {}
    groups: dict[str, list[str]] = {group: [] for group in group_by}
    for group, patterns in group_by.items():
        for pattern in patterns:
            regex = re.compile(pattern)
            matched = [name for name in names if regex.match(name)]
            if not matched:
                raise ValueError(f"`group_by[{group!r}]` regex {pattern!r} matches no parameter of the model")
            for name in matched:
                if owner.get(name, group) != group:
                    raise ValueError(
                        f"parameter {name!r} is matched by both group {owner[name]!r} and group {group!r} of"
                        " `group_by`: every parameter must belong to exactly one group"
                    )
                if name not in owner:
                    owner[name] = group
                    groups[group].append(name)
    return groups


def group_parameters(model: nn.Module, group_by: GroupBy = "auto") -> dict[str, list[str]]:
    r"""Split a model's parameters into named layer groups.

    Every parameter (shared ones once, under their first name) lands in exactly one group. Parameters no rule
    claims go to a group ``"other"``, with one warning.

    Args:
        model: the module, usually the LightningModule.
        group_by: ``"auto"``: the parameter-owning top-level children, in registration order (descending
            through a single wrapping child such as ``self.model``); an int: the module path truncated to that
            depth (``2`` gives ``layer1.0``); a dict ``{group: [regex, ...]}``: each regex is matched with
            ``re.match`` (anchored at the start) against dotted parameter names. Defaults to ``"auto"``.

    Returns:
        Group name to the dotted names of its parameters, in parameter-registration order of first appearance.

    Raises:
        ValueError: if a regex matches nothing, a parameter is matched by two groups, a group is named
            ``"other"``, or the model has no parameters.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> group_parameters(net)
        {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
        >>> group_parameters(net, {"body": [r"0\."], "head": [r"2\."]})["head"]
        ['2.weight', '2.bias']
    """
    check_group_by(group_by)
    all_names = [name for name, _ in model.named_parameters()]
    if not all_names:
        raise ValueError(f"`model` ({type(model).__name__}) has no parameters to group")
    if isinstance(group_by, str):
        groups = _auto_groups(model)
    elif isinstance(group_by, int):
        groups = _depth_groups(model, group_by)
    else:
        groups = _regex_groups(model, group_by)
    claimed = {name for names in groups.values() for name in names}
    leftover = [name for name in all_names if name not in claimed]
    if leftover:
        if OTHER in groups:
            raise ValueError(f"the model has a module named {OTHER!r}, reserved for unclaimed parameters")
        rank_zero_warn(
            f"{len(leftover)} parameter(s) belong to no layer group and are grouped as {OTHER!r}: {leftover[:5]}"
        )
        groups[OTHER] = leftover
    return groups


def group_sizes(model: nn.Module, groups: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Number of scalar parameters in each group."""
    params = dict(model.named_parameters())
    return {group: sum(params[name].numel() for name in names) for group, names in groups.items()}


def group_modules(model: nn.Module, groups: Mapping[str, Sequence[str]]) -> dict[str, nn.Module]:
    """The submodule of each group whose parameters are exactly the group's, found by the group's name.

    Groups that are not a module (a regex group spanning modules, ``"other"``) are left out.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> sorted(group_modules(net, {"0": ["0.weight", "0.bias"], "x": ["2.weight"]}))
        ['0']
    """
    named = dict(model.named_parameters())
    found = {}
    for name, params in groups.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if {id(p) for p in module.parameters()} == {id(named[n]) for n in params}:
            found[name] = module
    return found
