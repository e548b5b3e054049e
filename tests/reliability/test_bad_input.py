# ruff: noqa: E501  (one case per line: the table reads like docs/errors.md)
"""Every rejected input of the package, with its exact message: the same table as docs/errors.md.

``CASES`` is the table. Each row is pinned by ``test_rejected`` (the exception type and the whole message), and
``test_docs_table_matches_cases`` keeps docs/errors.md and this file from drifting apart. ``<path>`` in a message
stands for the file or directory of the case.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback, register_momentum
from lightning_beta.artifact import AttributionArtifact, GroupTotals, ReferenceStats, save_attribution
from lightning_beta.callbacks.layer_attribution import check_strategy
from lightning_beta.cli import main
from lightning_beta.diagnosis import diagnose, load_attribution, reference_statistics
from lightning_beta.diagnosis.restore import restore_from_probe
from lightning_beta.functional import DampingRegime, SecantCurvature, classify_regime, critical_momentum, damping_ratio
from lightning_beta.layer_groups import group_parameters
from lightning_beta.probe import ProbeRecord, load_probe, record_probe
from lightning_beta.reference import record_reference
from tests.helpers import TinyModel, make_loader, trainer_kwargs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Case:
    where: str
    given: str  # the bad input, as the table shows it
    error: type[BaseException]
    message: str  # exact; ``<path>`` is replaced by the case's path
    call: Callable[[Path], Any]  # gets a fresh directory; returns nothing, raises


def _fit(callbacks: list[Any], model: Any = None, **overrides: Any) -> Callable[[Path], Any]:
    def run(tmp: Path) -> None:
        trainer = pl.Trainer(**trainer_kwargs(tmp, callbacks=callbacks, **overrides))
        trainer.fit(model() if model else TinyModel(), make_loader())

    return run


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2))


def _record() -> ProbeRecord:
    return record_probe(_linear(), torch.randn(8, 2), sketch_dim=4)


def _artifact() -> dict[str, Any]:
    art = AttributionArtifact(
        groups={"body": 3, "head": 2},
        parameters={},
        history_epochs=[0],
        history=[[1.0, 2.0]],
        history_total=[2.2],
        totals={"body": GroupTotals(1.0, 1.0, 1.0, 1, 0), "head": GroupTotals(2.0, 2.0, 2.0, 1, 0)},
        total=GroupTotals(2.2, 2.2, 2.2, 1, 0),
        reference={"head": ReferenceStats([0.0], [1.0], 4)},
    )
    return art.to_dict()


def _load(content: Any) -> Callable[[Path], Any]:
    def run(tmp: Path) -> None:
        path = tmp / "a.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        load_attribution(path)

    return run


def _load_probe(content: dict[str, Any]) -> Callable[[Path], Any]:
    def run(tmp: Path) -> None:
        path = tmp / "a.json"
        path.write_text(json.dumps(content))
        load_probe(path)

    return run


def _cli(*args: str, file: str | None = None) -> Callable[[Path], Any]:
    """Run the CLI in-process; ``<path>`` in ``args`` is a file holding ``file`` (or a missing file if None)."""

    def run(tmp: Path) -> None:
        path = tmp / "a.json"
        if file is not None:
            path.write_text(file)
        argv = [a.replace("<path>", str(path)) for a in args]
        code: Any
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        raise CliError(code)

    return run


class CliError(Exception):
    """Stands for 'the CLI exited with a code and printed the message on stderr' in the table."""


class Crossing(TinyModel):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class HasTotal(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.total = nn.Linear(2, 2)


class Lion(torch.optim.Optimizer):
    """Lion's shape (``betas`` in each group; the update is the sign of a mix of buffer and gradient): refused by name."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__(params, {"lr": lr, "betas": betas})

    def step(self, closure: Any = None) -> None:
        return None


def _unknown_length(tmp: Path) -> None:
    loader = make_loader()
    trainer = pl.Trainer(**trainer_kwargs(tmp, callbacks=[BetaMomentumCallback(switch_at=0.5)], max_epochs=-1))
    trainer.fit(TinyModel(), loader)


B, M, L = "BetaMomentumCallback", "DampingRegimeMonitor", "LayerAttributionCallback"
CASES: list[Case] = [
    # ---- BetaMomentumCallback(...)
    Case(B, 'rule="fast"', ValueError, "`rule` must be one of ('paper', 'exact'), got 'fast'", lambda t: BetaMomentumCallback(rule="fast")),  # type: ignore[arg-type]
    Case(B, "curvature=-1.0", ValueError, "`curvature` must be a finite number > 0, got -1.0", lambda t: BetaMomentumCallback(curvature=-1.0)),
    Case(B, "curvature=inf", ValueError, "`curvature` must be a finite number > 0, got inf", lambda t: BetaMomentumCallback(curvature=INF)),
    Case(B, 'curvature="high"', TypeError, "`curvature` must be a positive float, got str", lambda t: BetaMomentumCallback(curvature="high")),  # type: ignore[arg-type]
    Case(B, "min_momentum=-0.1", ValueError, "`min_momentum` must be >= 0, got -0.1", lambda t: BetaMomentumCallback(min_momentum=-0.1)),
    Case(B, "min_momentum=nan", ValueError, "`min_momentum` must be finite, got nan", lambda t: BetaMomentumCallback(min_momentum=NAN)),
    Case(B, "max_momentum=1.0", ValueError, "`max_momentum` must be < 1 (momentum 1 never forgets), got 1.0", lambda t: BetaMomentumCallback(max_momentum=1.0)),
    Case(B, 'max_momentum="0.9"', TypeError, "`max_momentum` must be a float, got str", lambda t: BetaMomentumCallback(max_momentum="0.9")),  # type: ignore[arg-type]
    Case(B, "min_momentum=0.5, max_momentum=0.4", ValueError, "`min_momentum` (0.5) must be <= `max_momentum` (0.4)", lambda t: BetaMomentumCallback(min_momentum=0.5, max_momentum=0.4)),
    Case(B, "switch_at=1.5", ValueError, "`switch_at` as a fraction of training must be in (0, 1), got 1.5", lambda t: BetaMomentumCallback(switch_at=1.5)),
    Case(B, "switch_at=-3", ValueError, "`switch_at` as an optimizer step must be >= 0, got -3", lambda t: BetaMomentumCallback(switch_at=-3)),
    Case(B, 'switch_at="later"', ValueError, "`switch_at` as a string must be \"crossover\", got 'later'", lambda t: BetaMomentumCallback(switch_at="later")),
    Case(B, "switch_at=True", TypeError, "`switch_at` must be None, an int step, a float in (0, 1) or 'crossover', got bool", lambda t: BetaMomentumCallback(switch_at=True)),
    Case(B, "switch_at=[3]", TypeError, "`switch_at` must be None, an int step, a float in (0, 1) or 'crossover', got list", lambda t: BetaMomentumCallback(switch_at=[3])),  # type: ignore[arg-type]
    Case(B, "constant_momentum=1.0", ValueError, "`constant_momentum` must be in [0, 1), got 1.0", lambda t: BetaMomentumCallback(constant_momentum=1.0)),
    Case(B, 'constant_momentum="0.9"', TypeError, "`constant_momentum` must be a float, got str", lambda t: BetaMomentumCallback(constant_momentum="0.9")),  # type: ignore[arg-type]
    Case(B, 'on_unsupported="ignore"', ValueError, "`on_unsupported` must be \"raise\" or \"warn\", got 'ignore'", lambda t: BetaMomentumCallback(on_unsupported="ignore")),  # type: ignore[arg-type]
    Case(B, "log_momentum=1", TypeError, "`log_momentum` must be a bool, got int", lambda t: BetaMomentumCallback(log_momentum=1)),  # type: ignore[arg-type]
    Case(B, "fit with Adagrad", MisconfigurationException, "BetaMomentumCallback cannot write the momentum of optimizer 0 (Adagrad): supported are SGD, RMSprop, Adam, AdamW, NAdam, RAdam and Adamax. Pass `on_unsupported=\"warn\"` to skip it.", _fit([BetaMomentumCallback()], lambda: TinyModel(lambda m: torch.optim.Adagrad(m.parameters())))),
    Case(B, "fit with OneCycleLR(cycle_momentum=True)", MisconfigurationException, "OneCycleLR with `cycle_momentum=True` also writes momentum and would fight BetaMomentumCallback. Build it with `cycle_momentum=False`.", _fit([BetaMomentumCallback()], Crossing)),
    Case(B, "switch_at=0.5, fit with max_epochs=-1", MisconfigurationException, "`switch_at=0.5` is a fraction of the run, but the run's length is unknown (`trainer.estimated_stepping_batches` is infinite). Pass an int step or set `max_steps`.", _unknown_length),
    Case(B, "a scheduler sets lr to NaN", ValueError, "learning rate `lr` must be a finite number >= 0, got nan", _fit([BetaMomentumCallback()], lambda: TinyModel(lambda m: torch.optim.SGD(m.parameters(), lr=NAN, momentum=0.9)))),
    Case(B, "load_state_dict of version 0", ValueError, "BetaMomentumCallback state has version 0; this release reads version 1. Resume with the release that wrote the checkpoint, or start the fit without it (`ckpt_path=None`).", lambda t: BetaMomentumCallback().load_state_dict({"version": 0})),
    Case(B, "fit with Lion", MisconfigurationException, "BetaMomentumCallback cannot write the momentum of optimizer 0 (Lion): its betas interpolate the update direction (sign of a mix of buffer and gradient), not a heavy-ball buffer. If its update follows a heavy-ball buffer `buf = mu*buf + c*grad`, declare where `mu` lives with `lightning_beta.register_momentum(Lion, slot=\"betas\")` (or `slot=\"momentum\"`). Pass `on_unsupported=\"warn\"` to skip it.", _fit([BetaMomentumCallback()], lambda: TinyModel(lambda m: Lion(m.parameters())))),
    Case("register_momentum", 'slot="beta"', ValueError, "`slot` must be \"momentum\" or \"betas\", got 'beta'", lambda t: register_momentum(torch.optim.SGD, slot="beta")),  # type: ignore[arg-type]
    Case("register_momentum", "an SGD instance", TypeError, "`optimizer_cls` must be an optimizer class, got SGD", lambda t: register_momentum(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), slot="momentum")),  # type: ignore[arg-type]
    # ---- DampingRegimeMonitor(...)
    Case(M, "tolerance=1.0", ValueError, "`tolerance` must be in [0, 1), got 1.0", lambda t: DampingRegimeMonitor(tolerance=1.0)),
    Case(M, 'tolerance="0.1"', TypeError, "`tolerance` must be a float, got str", lambda t: DampingRegimeMonitor(tolerance="0.1")),  # type: ignore[arg-type]
    Case(M, 'rule="fast"', ValueError, "`rule` must be one of ('paper', 'exact'), got 'fast'", lambda t: DampingRegimeMonitor(rule="fast")),  # type: ignore[arg-type]
    Case(M, 'curvature="measured"', ValueError, "`curvature` must be a positive float or \"secant\", got 'measured'", lambda t: DampingRegimeMonitor(curvature="measured")),  # type: ignore[arg-type]
    Case(M, "curvature=0.0", ValueError, "`curvature` must be a finite number > 0, got 0.0", lambda t: DampingRegimeMonitor(curvature=0.0)),
    Case(M, 'logging_interval="batch"', ValueError, "`logging_interval` must be \"step\" or \"epoch\", got 'batch'", lambda t: DampingRegimeMonitor(logging_interval="batch")),  # type: ignore[arg-type]
    Case(M, 'layout="yes"', TypeError, "`layout` must be a bool, got str", lambda t: DampingRegimeMonitor(layout="yes")),  # type: ignore[arg-type]
    Case(M, "log=1", TypeError, "`log` must be a bool, got int", lambda t: DampingRegimeMonitor(log=1)),  # type: ignore[arg-type]
    Case(M, 'group_by="flat"', ValueError, "`group_by` must be \"auto\", an int depth or a dict of regex lists, got 'flat'", lambda t: DampingRegimeMonitor(group_by="flat")),
    Case(M, "curvature_decay=1.0", ValueError, "`curvature_decay` must be in [0, 1), got 1.0", lambda t: DampingRegimeMonitor(curvature_decay=1.0)),
    Case(M, "fit with logger=False", MisconfigurationException, "DampingRegimeMonitor has nowhere to log: the Trainer has no logger (`logger=False`). Pass a logger, or `DampingRegimeMonitor(log=False)` to keep only `history`.", _fit([DampingRegimeMonitor()])),
    Case(M, "load_state_dict of version 0", ValueError, "DampingRegimeMonitor state has version 0; this release reads version 1. Resume with the release that wrote the checkpoint, or start the fit without it (`ckpt_path=None`).", lambda t: DampingRegimeMonitor().load_state_dict({"version": 0})),
    # ---- LayerAttributionCallback(...)
    Case(L, "group_by=0", ValueError, "`group_by` as a module depth must be >= 1, got 0", lambda t: LayerAttributionCallback(group_by=0)),
    Case(L, "group_by=True", TypeError, "`group_by` must be 'auto', an int or a dict, got bool", lambda t: LayerAttributionCallback(group_by=True)),
    Case(L, "group_by=1.5", TypeError, "`group_by` must be 'auto', an int or a dict, got float", lambda t: LayerAttributionCallback(group_by=1.5)),  # type: ignore[arg-type]
    Case(L, "group_by={}", ValueError, "`group_by` as a dict must name at least one group", lambda t: LayerAttributionCallback(group_by={})),
    Case(L, 'group_by={"": ["x"]}', TypeError, "`group_by` group names must be non-empty strings, got ''", lambda t: LayerAttributionCallback(group_by={"": ["x"]})),
    Case(L, 'group_by={"a": "x"}', ValueError, "`group_by['a']` must be a non-empty list of regexes, got 'x'", lambda t: LayerAttributionCallback(group_by={"a": "x"})),
    Case(L, 'group_by={"a": ["("]}', ValueError, "`group_by['a']` holds an invalid regex '(': missing ), unterminated subpattern at position 0", lambda t: LayerAttributionCallback(group_by={"a": ["("]})),
    Case(L, "norm_type=0.0", ValueError, "`norm_type` must be > 0 or inf, got 0.0", lambda t: LayerAttributionCallback(norm_type=0.0)),
    Case(L, 'norm_type="l2"', TypeError, "`norm_type` must be a float, got str", lambda t: LayerAttributionCallback(norm_type="l2")),  # type: ignore[arg-type]
    Case(L, "log_every_n_steps=0", ValueError, "`log_every_n_steps` must be >= 1, got 0", lambda t: LayerAttributionCallback(log_every_n_steps=0)),
    Case(L, "log_every_n_steps=2.0", TypeError, "`log_every_n_steps` must be None or an int, got float", lambda t: LayerAttributionCallback(log_every_n_steps=2.0)),  # type: ignore[arg-type]
    Case(L, "reference_batches=-1", ValueError, "`reference_batches` must be >= 0, got -1", lambda t: LayerAttributionCallback(reference_batches=-1)),
    Case(L, "reference_batches=None", TypeError, "`reference_batches` must be an int, got NoneType", lambda t: LayerAttributionCallback(reference_batches=None)),  # type: ignore[arg-type]
    Case(L, "dirpath=3", TypeError, "`dirpath` must be None, a str or os.PathLike, got int", lambda t: LayerAttributionCallback(dirpath=3)),  # type: ignore[arg-type]
    Case(L, "filename=None", TypeError, "`filename` must be a str, got NoneType", lambda t: LayerAttributionCallback(filename=None)),  # type: ignore[arg-type]
    Case(L, 'filename=""', ValueError, "`filename` must be a non-empty file name without a directory, got ''", lambda t: LayerAttributionCallback(filename="")),
    Case(L, 'filename="runs/a.json"', ValueError, "`filename` must be a non-empty file name without a directory, got 'runs/a.json'", lambda t: LayerAttributionCallback(filename="runs/a.json")),
    Case(L, "probe_samples=-1", ValueError, "`probe_samples` must be >= 0, got -1", lambda t: LayerAttributionCallback(probe_samples=-1)),
    Case(L, "probe_samples=0.5", TypeError, "`probe_samples` must be an int, got float", lambda t: LayerAttributionCallback(probe_samples=0.5)),  # type: ignore[arg-type]
    Case(L, "probe_sketch_dim=0", ValueError, "`probe_sketch_dim` must be >= 1, got 0", lambda t: LayerAttributionCallback(probe_sketch_dim=0)),
    Case(L, 'probe_replay="yes"', TypeError, "`probe_replay` must be True, False or \"auto\", got 'yes'", lambda t: LayerAttributionCallback(probe_replay="yes")),  # type: ignore[arg-type]
    Case(L, "fit with a module named total", MisconfigurationException, "LayerAttributionCallback: a layer group is named 'total', which clashes with the `grad_norm/total` key. Pass `group_by` as a dict to name the groups.", _fit([LayerAttributionCallback()], HasTotal)),
    Case(L, "fit under FSDPStrategy", MisconfigurationException, "LayerAttributionCallback does not support the sharded strategy FSDPStrategy: each rank holds only a shard of each gradient, so its norms would be wrong. Use DDP or a single device.", lambda t: check_strategy(FSDPStrategy())),
    Case(L, "load_state_dict of version 0", ValueError, "LayerAttributionCallback state has version 0; this release reads version 1. Resume with the release that wrote the checkpoint, or start the fit without it (`ckpt_path=None`).", lambda t: LayerAttributionCallback().load_state_dict({"version": 0})),
    # ---- functional core
    Case("critical_momentum", "lr=nan", ValueError, "learning rate `lr` must be a finite number >= 0, got nan", lambda t: critical_momentum(NAN)),
    Case("critical_momentum", "lr=inf", ValueError, "learning rate `lr` must be a finite number >= 0, got inf", lambda t: critical_momentum(INF)),
    Case("critical_momentum", "lr=-0.1", ValueError, "learning rate `lr` must be a finite number >= 0, got -0.1", lambda t: critical_momentum(-0.1)),
    Case("critical_momentum", 'lr="0.1"', TypeError, "learning rate `lr` must be a float or a Tensor, got str", lambda t: critical_momentum("0.1")),  # type: ignore[call-overload]
    Case("critical_momentum", 'rule="fast"', ValueError, "`rule` must be one of ('paper', 'exact'), got 'fast'", lambda t: critical_momentum(0.1, rule="fast")),
    Case("critical_momentum", "min_momentum=0.5, max_momentum=0.4", ValueError, "`min_momentum` (0.5) must be <= `max_momentum` (0.4)", lambda t: critical_momentum(0.1, min_momentum=0.5, max_momentum=0.4)),
    Case("damping_ratio", "momentum=1.5", ValueError, "`momentum` must be in [0, 1], got 1.5", lambda t: damping_ratio(1.5, 0.1)),
    Case("damping_ratio", "momentum=nan", ValueError, "`momentum` must be in [0, 1], got nan", lambda t: damping_ratio(NAN, 0.1)),
    Case("damping_ratio", 'momentum="0.9"', TypeError, "`momentum` must be a float or a Tensor, got str", lambda t: damping_ratio("0.9", 0.1)),  # type: ignore[call-overload]
    Case("damping_ratio", "lr=nan", ValueError, "learning rate `lr` must be a finite number >= 0, got nan", lambda t: damping_ratio(0.9, NAN)),
    Case("damping_ratio", "curvature=0", ValueError, "`curvature` must be a finite number > 0, got 0", lambda t: damping_ratio(0.9, 0.1, curvature=0)),
    Case("classify_regime", "zeta=nan", ValueError, "`zeta` is NaN: the damping ratio is undefined (momentum 1 with lr 0?)", lambda t: classify_regime(NAN)),
    Case("classify_regime", "tolerance=-0.1", ValueError, "`tolerance` must be in [0, 1), got -0.1", lambda t: classify_regime(0.5, tolerance=-0.1)),
    Case("DampingRegime.from_code", "code=2", ValueError, "`code` must be -1, 0 or 1, got 2", lambda t: DampingRegime.from_code(2)),
    Case("SecantCurvature", "groups={}", ValueError, "`groups` must name at least one parameter group", lambda t: SecantCurvature({})),
    Case("SecantCurvature", 'groups={"a": []}', ValueError, "group 'a' has no parameter", lambda t: SecantCurvature({"a": []})),
    Case("SecantCurvature", "decay=1.5", ValueError, "`decay` must be in [0, 1), got 1.5", lambda t: SecantCurvature({"a": [nn.Parameter(torch.ones(1))]}, decay=1.5)),
    Case("SecantCurvature", 'decay="0.9"', TypeError, "`decay` must be a float, got str", lambda t: SecantCurvature({"a": [nn.Parameter(torch.ones(1))]}, decay="0.9")),  # type: ignore[arg-type]
    # ---- layer groups
    Case("group_parameters", 'group_by={"x": ["nomatch"]}', ValueError, "`group_by['x']` regex 'nomatch' matches no parameter of the model", lambda t: group_parameters(nn.Linear(2, 2), {"x": ["nomatch"]})),
    Case("group_parameters", 'group_by={"a": ["w"], "b": ["weight"]}', ValueError, "parameter 'weight' is matched by both group 'a' and group 'b' of `group_by`: every parameter must belong to exactly one group", lambda t: group_parameters(nn.Linear(2, 2), {"a": ["w"], "b": ["weight"]})),
    Case("group_parameters", 'group_by={"other": ["w"]}', ValueError, "`group_by` may not name a group 'other': it is reserved for unclaimed parameters", lambda t: group_parameters(nn.Linear(2, 2), {"other": ["w"]})),
    Case("group_parameters", "a model without parameters", ValueError, "`model` (ReLU) has no parameters to group", lambda t: group_parameters(nn.ReLU())),
    # ---- the artifact
    Case("load_attribution", "path=3", TypeError, "`path` must be a str or os.PathLike, got int", lambda t: load_attribution(3)),  # type: ignore[arg-type]
    Case("load_attribution", "a missing file", FileNotFoundError, "[Errno 2] No such file or directory: '<path>'", lambda t: load_attribution(t / "a.json")),
    Case("load_attribution", "{not json", ValueError, "'<path>' is not an attribution artifact: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))", _load("{not json")),
    Case("load_attribution", "[1, 2]", ValueError, "'<path>' is not an attribution artifact: expected a JSON object, got list", _load([1, 2])),
    Case("load_attribution", "{}", ValueError, "'<path>' is not an attribution artifact: missing key(s) ['schema_version', 'kind', 'complete', 'groups', 'history', 'totals', 'total']", _load({})),
    Case("load_attribution", '"kind": "checkpoint"', ValueError, "'<path>' is not an attribution artifact: `kind` is 'checkpoint', expected 'lightning_beta.layer_attribution'", _load({**_artifact(), "kind": "checkpoint"})),
    Case("load_attribution", '"schema_version": 0', ValueError, "'<path>' has schema_version 0; this release reads 1, 2 and 3", _load({**_artifact(), "schema_version": 0})),
    Case("load_attribution", "a group without n_params", ValueError, "'<path>' is not an attribution artifact: malformed field (KeyError: 'n_params')", _load({**_artifact(), "groups": [{"name": "body"}]})),
    Case("load_attribution", "a history row of the wrong length", ValueError, "'<path>' is not an attribution artifact: `history` must have one row of 2 values per epoch", _load({**_artifact(), "history": {"epochs": [0], "mean": [[1.0]], "total": [1.0]}})),
    Case("load_attribution", "totals of other groups", ValueError, "'<path>' is not an attribution artifact: `totals` names ['body'] but `groups` names ['body', 'head']", _load({**_artifact(), "totals": {"body": _artifact()["totals"]["body"]}})),
    Case("load_attribution", "reference of an unknown group", ValueError, "'<path>' is not an attribution artifact: `reference` names unknown group(s) ['neck']", _load({**_artifact(), "reference": {"neck": {"mean": [0.0], "var": [1.0], "count": 1}}})),
    Case("save_attribution", "an artifact holding NaN", ValueError, "Out of range float values are not JSON compliant: nan", lambda t: save_attribution(AttributionArtifact({"a": 1}, {}, [0], [[NAN]], [NAN], {"a": GroupTotals(NAN, NAN, NAN, 1, 0)}, GroupTotals(NAN, NAN, NAN, 1, 0)), t / "a.json")),
    Case("load_attribution", '"probe_path": "../probe.pt"', ValueError, "'<path>' is not an attribution artifact: `probe_path` must be null or a file name beside the artifact, got '../probe.pt'", _load({**_artifact(), "probe_path": "../probe.pt"})),
    Case("load_probe", "artifact=3", TypeError, "`artifact` must be an AttributionArtifact or its path, got int", lambda t: load_probe(3)),
    Case("load_probe", "an artifact without a probe", ValueError, "`artifact` has no probe: it was written with `probe_samples=0`, after an exception, by a release before schema 3, or the probe could not be recorded (the fit warned why)", _load_probe({**_artifact(), "probe_path": None})),
    Case("load_probe", "its probe file missing", FileNotFoundError, "the artifact '<path>' names the probe file 'attribution.probe.pt', which is not beside it: keep the two files together", _load_probe({**_artifact(), "probe_path": "attribution.probe.pt"})),
    # ---- reference statistics
    Case("record_reference", "n_batches=-1", ValueError, "`n_batches` must be an int >= 0, got -1", lambda t: record_reference(None, TinyModel(), {"head": nn.Linear(2, 2)}, -1)),
    Case("record_reference", 'feature_dim="last"', TypeError, "`feature_dim` must be None, an int or a dict of group names to ints, got 'last'", lambda t: record_reference(None, TinyModel(), {"head": nn.Linear(2, 2)}, 1, feature_dim="last")),  # type: ignore[arg-type]
    Case("record_reference", 'feature_dim={"neck": 1}', ValueError, "`feature_dim` names unknown group(s) ['neck']; the groups are ['head']", lambda t: record_reference(None, TinyModel(), {"head": nn.Linear(2, 2)}, 1, feature_dim={"neck": 1})),
    Case("reference_statistics", 'feature_dim={"neck": 1}', ValueError, "`feature_dim` names unknown group(s) ['neck']; the groups are ['body', 'head']", lambda t: reference_statistics(TinyModel(), make_loader(), feature_dim={"neck": 1})),
    Case("reference_statistics", "feature_dim=1.5", TypeError, "`feature_dim` must be None, an int or a dict of group names to ints, got 1.5", lambda t: reference_statistics(TinyModel(), make_loader(), feature_dim=1.5)),  # type: ignore[arg-type]
    # ---- diagnosis: the treatment
    Case("diagnose", 'policy="often"', ValueError, "`policy` must be one of 'auto', 'fixed', 'search', 'restore', got 'often'", lambda t: diagnose(nn.Sequential(nn.Linear(2, 2)), make_loader(), make_loader(), policy="often")),  # type: ignore[arg-type]
    Case("diagnose", 'policy="restore" without a probe', ValueError, '`policy="restore"` needs a probe: `probe=` a ProbeRecord, or `reference=` an artifact with one (LayerAttributionCallback(probe_samples > 0))', lambda t: diagnose(nn.Sequential(nn.Linear(2, 2)), make_loader(), make_loader(), policy="restore")),
    Case("restore_from_probe", 'layers=["head"]', ValueError, "`layers` names unknown group(s) ['head']; the model's groups are ['0']", lambda t: restore_from_probe(_linear(), ["head"], _record())),
    Case("restore_from_probe", "max_iter=0", ValueError, "`max_iter` must be >= 1, got 0", lambda t: restore_from_probe(_linear(), ["0"], _record(), max_iter=0)),
    Case("restore_from_probe", "tolerance=-1", ValueError, "`tolerance` must be in [0.0, inf], got -1", lambda t: restore_from_probe(_linear(), ["0"], _record(), tolerance=-1)),
    Case("restore_from_probe", "forward=3", TypeError, "`forward` must be None or a callable forward(model, inputs), got int", lambda t: restore_from_probe(_linear(), ["0"], _record(), forward=3)),  # type: ignore[arg-type]
    # ---- the command line: exit code 2 and this text on stderr
    Case("lightning-beta", "demo --epochs 0", CliError, "argument --epochs: expected a whole number >= 1, got 0", _cli("demo", "--epochs", "0")),
    Case("lightning-beta", "demo --epochs many", CliError, "argument --epochs: expected a whole number >= 1, got 'many'", _cli("demo", "--epochs", "many")),
    Case("lightning-beta", "demo --seed -1", CliError, "argument --seed: expected a whole number >= 0, got -1", _cli("demo", "--seed", "-1")),
    Case("lightning-beta", "launch", CliError, "argument {demo,report,diagnose}: invalid choice: 'launch'", _cli("launch")),
    Case("lightning-beta", "(no command)", CliError, "the following arguments are required: {demo,report,diagnose}", _cli()),
    Case("lightning-beta", "demo --out FILE", CliError, "--out <path>: cannot create the directory (File exists)", _cli("demo", "--out", "<path>", file="x")),
    Case("lightning-beta", "demo --out FILE/runs", CliError, "--out <path>/runs: cannot create the directory (Not a directory)", _cli("demo", "--out", "<path>/runs", file="x")),
    Case("lightning-beta", "report MISSING", CliError, "<path>: no such file", _cli("report", "<path>")),
    Case("lightning-beta", "report FILE (not JSON)", CliError, "<path>: not JSON (Expecting property name enclosed in double quotes at line 1), so not an artifact", _cli("report", "<path>", file="{not json")),
    Case("lightning-beta", "report FILE (other JSON)", CliError, "<path>: not a lightning_beta artifact (its `kind` is None)", _cli("report", "<path>", file='{"hello": 1}')),
    Case("lightning-beta", "report CHECKPOINT", CliError, "<path>: a torch/Lightning checkpoint, not a JSON artifact; pass the attribution.json that LayerAttributionCallback writes (its `path`) or a diagnosis report (diagnosis.json)", _cli("report", "<path>", file="PK\x03\x04")),
    Case("lightning-beta", "diagnose FILE --model Model", CliError, "--model Model: expected a class path such as package.module.Class", _cli("diagnose", "<path>", "--model", "Model", "--data", "x.Y", file="x")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{c.where}: {c.given}" for c in CASES])
def test_rejected(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = case.message.replace("<path>", str(tmp_path / "a.json"))
    with pytest.raises(case.error) as info:
        case.call(tmp_path)
    if case.error is CliError:
        assert info.value.args == (2,)
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err  # argparse: usage, then the error
    else:
        assert str(info.value) == message


def _label(case: Case) -> str:
    return "exit 2" if case.error is CliError else case.error.__name__


def _docs_rows() -> list[tuple[str, str, str, str]]:
    """The rows of docs/errors.md: ``| `where` | `given` | error | `` message `` |``."""
    rows = []
    for line in DOCS.read_text().splitlines():
        found = re.fullmatch(r"\| `(.+?)` \| `(.+?)` \| (.+?) \| `` (.*) `` \|", line)
        if found:
            rows.append(found.groups())
    return rows


def test_docs_table_matches_cases() -> None:
    """docs/errors.md lists exactly these cases and messages, in order: neither can change without the other."""
    assert _docs_rows() == [(c.where, c.given, _label(c), c.message) for c in CASES]
