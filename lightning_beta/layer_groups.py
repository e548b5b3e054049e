"""Layer groups: how the package splits a model's parameters into named groups (docs/method.md, section 3).

Used by the attribution callback, the secant curvature of the regime monitor and the diagnosis functions, so
all of them name the same groups the same way.

``group_by="auto"`` follows the model's own structure, by five rules applied from the model down:

1. **Wrappers are descended into.** A module that holds no parameter itself and has one parameter-owning child,
   itself made of submodules, stands for that child: a LightningModule holding ``self.model``, a
   ``GPT2LMHeadModel`` inside a LightningModule. A child that is a single layer is not descended into
   (Lightning's ``BoringModel`` gives one group ``layer``).
2. **The module reached is opened.** Each parameter it holds itself is a group named after the parameter
   (a ViT's ``cls_token`` and ``pos_embed``), and each parameter-owning child is a group named by its dotted
   path (``conv1``, ``lm_head``), except for rules 3 and 4.
3. **A stack is split into its blocks.** A stack is an ``nn.ModuleList`` or ``nn.Sequential`` whose
   parameter-owning children are modules of one class, each made of submodules (transformer blocks, residual
   blocks; ``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)`` is a layer, not a stack). It gives one group per
   block (``transformer.h.0``, ``blocks.11``), however many blocks it holds. Two or more stacks side by side
   whose blocks are of one class are *stages* and each stays one group: a ResNet-18, whose ``layer1`` ..
   ``layer4`` each hold two ``BasicBlock``, gives ``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``fc`` (seven
   groups, as torchvision ResNets are usually grouped).
4. **A child holding a stack deeper inside is opened** by rules 2-4 in turn (GPT-2's ``transformer``, BERT's
   ``bert`` and ``bert.encoder``, ``nn.Transformer``'s ``encoder`` and ``decoder``), so the embeddings, the final
   norm and the head beside the blocks get their own groups: a GPT-2 gives ``transformer.wte``,
   ``transformer.wpe``, ``transformer.h.0`` .. ``transformer.h.{n-1}``, ``transformer.ln_f``.
5. **A tied tensor belongs to one group**, the one of its first name in ``model.named_parameters()`` (GPT-2's
   ``lm_head.weight`` is ``transformer.wte.weight``: the embedding owns it, and ``lm_head``, left with no tensor
   of its own, is no group). :func:`shared_parameters` lists the ties.

A model that is a single layer (an ``nn.Linear``) gives one group per parameter. Every parameter lands in exactly
one group; ``"auto"`` and an int depth never leave one over. ``list(group_parameters(model))`` shows the groups
before a fit; an int depth or a dict of regexes groups otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

GroupBy = str | int | Mapping[str, Sequence[str]]

#: Name of the group that collects parameters no rule of a ``group_by`` dict claimed.
OTHER = "other"

_DIGITS = re.compile(r"[0-9]+")


def check_group_by(group_by: GroupBy) -> GroupBy:
    """Validate a ``group_by`` argument without a model, so constructors can fail early.

    A string of digits is a depth: ``--trainer.callbacks.group_by=2`` on a ``LightningCLI`` command line arrives as
    ``"2"``.

    Args:
        group_by: ``"auto"``, an int depth (or its digits as a string) or a dict of group names to regex lists.

    Returns:
        ``group_by``, with a string of digits turned into its int.

    Raises:
        TypeError: if ``group_by`` is not ``"auto"``, an int or a mapping of group names to regex lists.
        ValueError: if the int is below 1, the mapping is empty, a group has no regex, or a regex does not compile.

    Example:
        >>> check_group_by("2")
        2
        >>> check_group_by(0)
        Traceback (most recent call last):
        ...
        ValueError: `group_by` as a module depth must be >= 1, got 0
    """
    if isinstance(group_by, str):
        if _DIGITS.fullmatch(group_by):
            return check_group_by(int(group_by))
        if group_by != "auto":
            raise ValueError(f'`group_by` must be "auto", an int depth or a dict of regex lists, got {group_by!r}')
        return group_by
    if isinstance(group_by, bool):
        raise TypeError("`group_by` must be 'auto', an int or a dict, got bool")
    if isinstance(group_by, int):
        if group_by < 1:
            raise ValueError(f"`group_by` as a module depth must be >= 1, got {group_by}")
        return group_by
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
    return group_by


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _parameter_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, child) for name, child in module.named_children() if _owns_parameters(child)]


def _is_composite(module: nn.Module) -> bool:
    """Made of parameter-owning submodules (a block), as opposed to a single layer."""
    return bool(_parameter_children(module))


def _stack_block(module: nn.Module) -> type[nn.Module] | None:
    """Rule 3: the class of the blocks when ``module`` is a ModuleList or Sequential of blocks of one class."""
    if not isinstance(module, nn.ModuleList | nn.Sequential):
        return None
    kinds = {type(child) for _, child in _parameter_children(module)}
    if len(kinds) != 1 or not all(_is_composite(child) for _, child in _parameter_children(module)):
        return None
    return kinds.pop()


def _is_stack(module: nn.Module) -> bool:
    return _stack_block(module) is not None


def _holds_stack(module: nn.Module) -> bool:
    return any(_is_stack(sub) for sub in module.modules())


def _open(module: nn.Module, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """Rules 2-4 on an opened module: (group name, dotted names of every parameter it reaches, tied ones too)."""
    for name, _ in module.named_parameters(recurse=False):
        yield f"{prefix}{name}", [f"{prefix}{name}"]
    children = _parameter_children(module)
    blocks = [_stack_block(child) for _, child in children]
    # Rule 3: stacks of one block class side by side are stages (a ResNet's layer1..layer4), kept whole.
    stages = {kind for kind in blocks if kind is not None and blocks.count(kind) >= 2}
    for (name, child), kind in zip(children, blocks, strict=True):
        path = f"{prefix}{name}"
        if kind is not None and kind not in stages:
            for block, sub in _parameter_children(child):
                yield f"{path}.{block}", [n for n, _ in sub.named_parameters(f"{path}.{block}", remove_duplicate=False)]
        elif kind is not None or not _holds_stack(child):
            yield path, [n for n, _ in child.named_parameters(path, remove_duplicate=False)]
        else:
            yield from _open(child, f"{path}.")


def _auto_groups(model: nn.Module) -> dict[str, list[str]]:
    root, prefix = model, ""
    while not list(root.parameters(recurse=False)):
        children = _parameter_children(root)
        if len(children) != 1 or not _is_composite(children[0][1]):
            break
        name, root = children[0]
        prefix = f"{prefix}{name}."
    # Rule 5: a tensor reached under several names belongs to the group of the name the model gives it.
    known = {name for name, _ in model.named_parameters()}
    groups = {group: [n for n in names if n in known] for group, names in _open(root, prefix)}
    return {group: names for group, names in groups.items() if names}


def _depth_groups(model: nn.Module, depth: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        # A parameter held by the root has no module path: it is a group of its own, named after it.
        module_path = name.split(".")[:-1] or [name]
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

    Every parameter (a tied one once, under its first name in ``model.named_parameters()``) lands in exactly one
    group. With a dict, parameters no regex claims go to a group ``"other"``, with one warning.

    Args:
        model: the module, usually the LightningModule.
        group_by: ``"auto"``: the model's structure, by the rules of this module's docstring (per block for a
            transformer, per stage for a ResNet); an int: the module path truncated to that depth (``2`` gives
            ``layer1.0``; a string of digits is read as its int); a dict ``{group: [regex, ...]}``: each regex is
            matched with ``re.match`` (anchored at the start) against dotted parameter names. Defaults to
            ``"auto"``.

    Returns:
        Group name to the dotted names of its parameters, in the order of ``model.named_parameters()``.

    Raises:
        ValueError: if a regex matches nothing, a parameter is matched by two groups, a group is named
            ``"other"``, or the model has no parameters.

    Example:
        >>> blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(2))
        >>> net = nn.ModuleDict({"embed": nn.Embedding(10, 4), "blocks": blocks, "head": nn.Linear(4, 10)})
        >>> list(group_parameters(net))
        ['embed', 'blocks.0', 'blocks.1', 'head']
        >>> group_parameters(net, {"body": [r"embed\.", r"blocks\."], "head": [r"head\."]})["head"]
        ['head.weight', 'head.bias']
        >>> list(group_parameters(net, "1"))
        ['embed', 'blocks', 'head']
    """
    group_by = check_group_by(group_by)
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
        rank_zero_warn(
            f"{len(leftover)} parameter(s) belong to no layer group and are grouped as {OTHER!r}: {leftover[:5]}"
        )
        groups[OTHER] = leftover
    return groups


def group_sizes(model: nn.Module, groups: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Number of scalar parameters in each group (a tied tensor counts once, in the group that owns it).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> group_sizes(net, group_parameters(net))
        {'0': 9, '2': 4}
    """
    params = dict(model.named_parameters())
    return {group: sum(params[name].numel() for name in names) for group, names in groups.items()}


class SharedParameter(NamedTuple):
    """A tensor the model reaches under several names (tied weights)."""

    #: Its first name in ``model.named_parameters()``: the name the groups list it under.
    name: str
    #: The group that owns it, or ``None`` when no group lists it.
    group: str | None
    #: Its other names, in registration order.
    also: tuple[str, ...]


def shared_parameters(model: nn.Module, groups: Mapping[str, Sequence[str]]) -> list[SharedParameter]:
    """The tied tensors of a model: the group that owns each, and the other names it is used under.

    ``model.named_parameters()`` names a tied tensor once, so the groups count it once; this lists where else the
    model uses it (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``).

    Args:
        model: the module the groups were made from.
        groups: the layer groups, as :func:`group_parameters` returns them.

    Returns:
        One entry per tied tensor, in the order of ``model.named_parameters()``; empty when nothing is tied.

    Example:
        >>> net = nn.ModuleDict({"enc": nn.Linear(4, 4), "dec": nn.Linear(4, 4)})
        >>> net["dec"].weight = net["enc"].weight
        >>> shared_parameters(net, group_parameters(net))
        [SharedParameter(name='enc.weight', group='enc', also=('dec.weight',))]
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    owner = {name: group for group, members in groups.items() for name in members}
    return [
        SharedParameter(aliases[0], owner.get(aliases[0]), tuple(aliases[1:]))
        for aliases in names.values()
        if len(aliases) > 1
    ]


def group_modules(model: nn.Module, groups: Mapping[str, Sequence[str]]) -> dict[str, nn.Module]:
    """The submodule of each group whose parameters are the group's, found by the group's name.

    A module that also uses a tensor tied to another group (BERT's ``cls`` uses the word embedding) still counts:
    its parameters under the names ``model.named_parameters()`` gives them are exactly the group's. Groups that are
    not a module (a regex group spanning modules, a parameter held by the root, ``"other"``) are left out.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> sorted(group_modules(net, {"0": ["0.weight", "0.bias"], "x": ["2.weight"]}))
        ['0']
    """
    known = {name for name, _ in model.named_parameters()}
    found = {}
    for name, params in groups.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        own = {n for n, _ in module.named_parameters(name, remove_duplicate=False)} & known
        if own and own == set(params):
            found[name] = module
    return found


def common_prefixes(names: Iterable[str]) -> list[str]:
    """The leading prefixes of whole dotted components that every name shares, shortest first, each leaving a name.

    Example:
        >>> common_prefixes(["model.net.fc1", "model.net.fc2"]), common_prefixes(["a", "b.c"])
        (['model.', 'model.net.'], [])
    """
    parts = [name.split(".") for name in names]
    common: list[str] = []
    for column in zip(*(p[:-1] for p in parts)) if parts else ():
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return [".".join(common[:depth]) + "." for depth in range(1, len(common) + 1)]


def match_group_names(
    recorded: Iterable[str], present: Iterable[str], argument: str = "reference"
) -> tuple[dict[str, str], str]:
    """Match group names recorded on one model (a reference, a probe record) to the groups of the model at hand.

    The names match as they are, or all of them after stripping one leading prefix of whole dotted components: a
    LightningModule that holds its network as ``self.model`` records ``model.bert.encoder.layer.0`` where the
    network itself has ``bert.encoder.layer.0``. The prefix must be unambiguous: exactly one prefix, common to every
    recorded name, makes every one of them a group of the model.

    Args:
        recorded: the recorded group names.
        present: the model's group names.
        argument: the argument the recorded names came in, for the error message. Defaults to ``"reference"``.

    Returns:
        ``(mapping, prefix)``: each recorded name to the model's group it stands for, and the prefix stripped
        (``""`` when the names match as they are).

    Raises:
        ValueError: if some recorded name is no group of the model, as it is and after stripping any one common
            prefix, or if two different prefixes would both do; the message lists both sets of names and how to fix
            it.

    Example:
        >>> match_group_names(["model.embed", "model.head"], ["embed", "head"])
        ({'model.embed': 'embed', 'model.head': 'head'}, 'model.')
        >>> match_group_names(["embed"], ["embed", "head"])
        ({'embed': 'embed'}, '')
    """
    names, known = list(recorded), list(present)
    known_set = set(known)
    if all(name in known_set for name in names):
        return {name: name for name in names}, ""
    fits = [prefix for prefix in common_prefixes(names) if all(name[len(prefix) :] in known_set for name in names)]
    if len(fits) == 1:
        return {name: name[len(fits[0]) :] for name in names}, fits[0]
    unknown = [name for name in names if name not in known_set]
    if fits:
        why = f"stripping any of the prefixes {fits} would match them, which is ambiguous"
    else:
        why = "neither as they are nor after stripping one leading prefix common to all of them"
    raise ValueError(
        f"`{argument}` was recorded on a different model: it names group(s) {unknown} that the model does not have"
        f" ({why}); the recorded groups are {names}, the model's groups are {known}. Pass the model the"
        f" `{argument}` was recorded on (for groups recorded as 'model.…' on a LightningModule holding"
        " `self.model`, that network is `lit.model`), or record it again on the model you pass"
    )
