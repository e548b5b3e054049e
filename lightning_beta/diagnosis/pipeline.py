"""The whole pipeline in one call: Scan, Localize, Diagnose, Treat, Verify, and its report.

The method is in docs/method.md, sections 3 and 4. A treatment that leaves the model worse than its input on the
validation set is reported and not handed back: :attr:`DiagnosisReport.model` is then the input model.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_beta._checks import check_choice
from lightning_beta._text import json_safe, markdown_table
from lightning_beta.artifact import AttributionArtifact
from lightning_beta.diagnosis._batches import defines_forward, iter_batches, model_device, run_model
from lightning_beta.diagnosis._outputs import LossFn, Predict
from lightning_beta.diagnosis.drift import Reference, activation_drift
from lightning_beta.diagnosis.flag import flag_layers
from lightning_beta.diagnosis.kinetic import kinetic_energy_probe
from lightning_beta.diagnosis.localize import attribute_errors
from lightning_beta.diagnosis.probe import ProbeRecord, match_record, probe_localize
from lightning_beta.diagnosis.restore import restore_or_retrain
from lightning_beta.diagnosis.scores import LayerScores
from lightning_beta.diagnosis.treat import SurgeryResult, check_trainer_kwargs, surgical_correction
from lightning_beta.diagnosis.verify import Verification, verify
from lightning_beta.layer_groups import GroupBy, group_parameters
from lightning_beta.probe import load_probe
from lightning_beta.reference import Forward, evaluating

Localizer = Literal["auto", "gradient", "drift", "kinetic", "probe"]
LOCALIZERS = ("auto", "gradient", "drift", "kinetic", "probe")
TreatPolicy = Literal["auto", "fixed", "search", "restore"]
POLICIES = ("auto", "fixed", "search", "restore")

#: ``kind`` of the report JSON, read by ``lightning-beta report``.
KIND = "lightning_beta.diagnosis_report"
SCHEMA_VERSION = 1


def scan_history(history: Sequence[Any]) -> dict[str, Any]:
    """Summarise a damping-regime history: any list of dicts or dataclasses (e.g. ``DampingRegimeMonitor.history``).

    Args:
        history: per-epoch records; a ``regime`` field, when present, is counted.

    Returns:
        ``{"n_records", "regimes": {regime: count}, "last": the last record as a dict}``.

    Raises:
        TypeError: if a record is neither a mapping nor a dataclass instance.

    Example:
        >>> scan_history([{"epoch": 0, "regime": "underdamped"}, {"epoch": 1, "regime": "critical"}])["regimes"]
        {'underdamped': 1, 'critical': 1}
    """
    records = []
    for record in history:
        if dataclasses.is_dataclass(record) and not isinstance(record, type):
            records.append(dataclasses.asdict(record))
        elif isinstance(record, Mapping):
            records.append(dict(record))
        else:
            raise TypeError(f"`history` records must be dicts or dataclasses, got {type(record).__name__}")
    regimes = Counter(str(r["regime"]) for r in records if "regime" in r)
    return {"n_records": len(records), "regimes": dict(regimes), "last": records[-1] if records else None}


@dataclass
class DiagnosisReport:
    """Result of :func:`diagnose`.

    Attributes:
        scan: the damping-regime summary (:func:`scan_history`), ``None`` without a history.
        scores: the localizer's scores.
        flagged: the groups treated.
        surgery: the treatment, ``None`` when nothing was flagged.
        verification: treated model vs the input on the validation set, ``None`` when nothing was flagged.
        baseline: every group retrained from the input weights with the same recipe, when asked for.
        baseline_verification: the baseline vs the input on the validation set.
        message: why nothing was treated, or that the treatment made the model worse, if so.
        input_model: the model given to :func:`diagnose` (not modified), returned by :attr:`model` when the
            treatment made it worse.
    """

    scan: dict[str, Any] | None
    scores: LayerScores
    flagged: list[str]
    surgery: SurgeryResult | None = None
    verification: Verification | None = None
    baseline: SurgeryResult | None = None
    baseline_verification: Verification | None = None
    message: str | None = None
    input_model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def worse(self) -> bool:
        """Whether the treated model makes more errors than its input on the validation set."""
        return self.verification is not None and self.verification.worse

    @property
    def model(self) -> nn.Module | None:
        """The corrected model; the input model when treatment made it worse; ``None`` when nothing was treated."""
        if self.surgery is None:
            return None
        return self.input_model if self.worse else self.surgery.model

    @property
    def compute(self) -> dict[str, float] | None:
        """Surgery's measured cost as fractions of the baseline's: wall time and optimizer steps (and parameters)."""
        if self.surgery is None or self.baseline is None:
            return None
        s, b = self.surgery, self.baseline
        return {
            "time_fraction": s.wall_time_s / b.wall_time_s if b.wall_time_s > 0 else float("nan"),
            "steps_fraction": s.optimizer_steps / b.optimizer_steps if b.optimizer_steps else float("nan"),
            "params_fraction": s.fraction_trained / b.fraction_trained if b.fraction_trained else float("nan"),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything but the models, JSON-ready, tagged with ``kind`` and ``schema_version``."""
        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "scan": self.scan,
            "scores": self.scores.to_dict(),
            "flagged": self.flagged,
            "surgery": self.surgery.to_dict() if self.surgery else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "baseline_verification": self.baseline_verification.to_dict() if self.baseline_verification else None,
            "compute": self.compute,
            "worse": self.worse,
            "returned_model": None if self.surgery is None else ("input" if self.worse else "treated"),
            "message": self.message,
        }

    def to_json(self, indent: int | None = 1) -> str:
        """:meth:`to_dict` as JSON (non-finite numbers as ``null``)."""
        return json.dumps(json_safe(self.to_dict()), indent=indent, allow_nan=False)

    def to_markdown(self) -> str:
        """A human-readable report: scan, scores, flagged groups, treatment, verification and compute."""
        out = ["# Diagnosis report", ""]
        if self.scan is not None:
            out += ["## Scan", "", f"{self.scan['n_records']} record(s); regimes {self.scan['regimes']}", ""]
        out += [f"## Localize ({self.scores.method})", "", self.scores.to_markdown(), ""]
        out += ["## Diagnose", "", f"flagged: {', '.join(self.flagged) if self.flagged else 'nothing'}", ""]
        if self.message and not self.worse:
            out += [self.message, ""]
        rows = [
            ("surgery", self.surgery, self.verification),
            ("every group (baseline)", self.baseline, self.baseline_verification),
        ]
        if self.surgery is not None:
            table = [
                [
                    label,
                    ", ".join(run.groups_touched),
                    f"{run.fraction_trained:.1%}",
                    run.optimizer_steps,
                    f"{run.wall_time_s:.2f}",
                    f"{ver.accuracy_before:.4f}",
                    f"{ver.accuracy_after:.4f}",
                    ver.fixed,
                    ver.broken,
                    f"{ver.net:+d}",
                ]
                for label, run, ver in rows
                if run is not None and ver is not None
            ]
            header = ["run", "groups", "params trained", "steps", "wall s", "acc before", "acc after"]
            header += ["fixed", "broken", "net"]
            out += ["## Treat and verify", "", markdown_table(header, table, align="llrrrrrrrr")]
            if self.surgery.stages:
                out += ["", _stages_markdown(self.surgery)]
            if self.worse:
                out += ["", f"**Worse**: {self.message}"]
            compute = self.compute
            if compute is not None:
                steps = (
                    "; its steps are L-BFGS iterations on the probe set, not comparable with the baseline's"
                    if self.surgery.policy.startswith("restore")
                    else f" and {compute['steps_fraction']:.1%} of its optimizer steps"
                )
                out += [
                    "",
                    f"surgery used {compute['time_fraction']:.1%} of the baseline's wall time (measured; the baseline"
                    f" retrains every group from the input weights for the same epochs, not from scratch){steps}.",
                ]
        return "\n".join(out) + "\n"


def _stages_markdown(surgery: SurgeryResult) -> str:
    """What the search or restore policy did, stage by stage, and what it chose."""
    if surgery.policy.startswith("restore"):
        return _restore_markdown(surgery)
    rows = [
        [
            s["stage"],
            ", ".join(s["groups"]),
            f"{s['lr']:g}",
            "yes" if s["reinit"] else "no",
            s["optimizer_steps"],
            f"{s['wall_time_s']:.2f}",
            f"{s['holdout_loss']:.4f}",
            f"{s['holdout_accuracy']:.4f}",
        ]
        for s in surgery.stages
    ]
    header = ["stage", "groups", "lr", "reinit", "steps", "wall s", "held-out loss", "held-out acc"]
    widened = ", ".join(surgery.widened_to) or "no"
    return "\n".join(
        [
            f"policy {surgery.policy}: lr {surgery.lr:g} chosen of {surgery.lrs_tried}, reinit"
            f" {'yes' if surgery.reinit else 'no'}, widened to {widened}; {surgery.optimizer_steps} of"
            f" {surgery.budget_steps} budgeted optimizer steps; held-out loss {surgery.holdout_loss['input']:.4f} ->"
            f" {surgery.holdout_loss['final']:.4f}, accuracy {surgery.holdout_accuracy['input']:.4f} ->"
            f" {surgery.holdout_accuracy['final']:.4f}",
            "",
            markdown_table(header, rows, align="llrlrrrr"),
        ]
    )


def _restore_markdown(surgery: SurgeryResult) -> str:
    restored = [s for s in surgery.stages if s["stage"] == "restore"]
    rows = [
        [
            ", ".join(s["groups"]),
            s["optimizer_steps"],
            s["evaluations"],
            f"{s['wall_time_s']:.2f}",
            f"{s['probe_error']['input']:.4g}",
            f"{s['probe_error']['final']:.4g}",
        ]
        for s in restored
    ]
    header = ["group", "L-BFGS iterations", "evaluations", "wall s", "probe error before", "after"]
    lines = [
        f"policy {surgery.policy}: each group fitted back to its probe record (relative sketch error, section 4 of"
        " docs/method.md)",
        "",
        markdown_table(header, rows, align="lrrrrr"),
    ]
    for stage in surgery.stages:
        if stage["stage"] != "restore":
            lines += [
                "",
                f"{', '.join(stage['groups'])} stayed above the error of a restored group: {stage['stage']},"
                f" {stage['optimizer_steps']} optimizer steps, {stage['wall_time_s']:.2f} s",
            ]
    return "\n".join(lines)


def _check_forward_defined(model: nn.Module) -> None:
    """Refuse, before any work, a module without a ``forward`` of its own (a LightningModule that only trains)."""
    if not defines_forward(model):
        holds = [name for name, child in model.named_children() if next(child.parameters(), None) is not None]
        example = f"`{type(model).__name__.lower()}.{holds[0]}`" if holds else "the network it holds"
        raise TypeError(
            f"`model` ({type(model).__name__}) defines no `forward`, and every step of the diagnosis runs the model:"
            f" pass the network it holds, e.g. {example} (a reference or probe recorded on the LightningModule is"
            " matched to it without the attribute's prefix)"
        )


def _check_model_runs(model: nn.Module, dataloader: Iterable[Any]) -> None:
    """Run ``model`` once on the first batch of ``dataloader``, as every step will, before any work.

    A one-pass iterator is left alone (its first batch would be lost).
    """
    if iter(dataloader) is dataloader:
        return
    x = next(iter_batches(dataloader, model_device(model)))[0]
    try:
        with evaluating(model):
            run_model(model, x)
    except (TypeError, NotImplementedError) as err:
        raise TypeError(
            f"`model` cannot run a batch's inputs the way every step of the diagnosis calls it (`model(inputs)`, a"
            f" dict of inputs as keyword arguments): {type(err).__name__}: {err}. Pass a module whose"
            " `forward(inputs)` runs it as it needs (`forward=` covers the probe only)"
        ) from err


def _holds(probe: ProbeRecord, model: nn.Module, groups: Sequence[str]) -> bool:
    """Whether the probe record holds every one of ``groups`` of ``model`` (a wrapper's prefix stripped)."""
    try:
        _, _, names, _ = match_record(model, probe)
    except ValueError:
        return False
    return set(groups) <= set(names.values())


def _localize(
    localizer: Localizer,
    model: nn.Module,
    dataloader: Iterable[Any],
    reference: Reference | None,
    group_by: GroupBy,
    loss_fn: LossFn | None,
    predict: Predict | None,
    probe: ProbeRecord | None = None,
    forward: Forward | None = None,
) -> LayerScores:
    if localizer == "probe" or (localizer == "auto" and probe is not None):
        if probe is None:
            raise ValueError(
                '`localizer="probe"` needs `probe=` (a ProbeRecord from `record_probe(healthy_model, inputs)`) or'
                " `reference=` an artifact with a probe (LayerAttributionCallback(probe_samples > 0))"
            )
        return probe_localize(model, probe, forward=forward)
    if localizer == "auto":
        has_bn = any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())
        localizer = "drift" if reference is not None or has_bn else "gradient"
    if localizer == "gradient":
        return attribute_errors(model, dataloader, group_by, loss_fn=loss_fn, predict=predict)
    if localizer == "drift":
        return activation_drift(model, dataloader, reference, group_by)
    return kinetic_energy_probe(model, dataloader, group_by=group_by, loss_fn=loss_fn)


def diagnose(
    model: nn.Module,
    train_dataloaders: Any,
    val_dataloader: Iterable[Any],
    *,
    history: Sequence[Any] | None = None,
    localizer: Localizer = "auto",
    reference: Reference | None = None,
    probe: ProbeRecord | None = None,
    localize_dataloader: Iterable[Any] | None = None,
    group_by: GroupBy = "auto",
    ratio: float = 2.0,
    top_k: int | None = None,
    max_epochs: int = 1,
    lr: float = 0.05,
    momentum: Literal["beta"] | float = "beta",
    selection: Literal["layers", "parameters"] = "layers",
    baseline: bool = False,
    baseline_epochs: int | None = None,
    policy: TreatPolicy = "auto",
    budget: float = 0.3,
    full_steps: int | None = None,
    loss_fn: LossFn | None = None,
    predict: Predict | None = None,
    forward: Forward | None = None,
    **trainer_kwargs: Any,
) -> DiagnosisReport:
    """Scan, Localize, Diagnose, Treat and Verify a trained classifier; optionally measure full retraining too.

    Args:
        model: the classifier to repair (not modified).
        train_dataloaders: data for the retraining (``(inputs, targets)`` batches).
        val_dataloader: held-out data for the verification.
        history: a damping-regime history (``DampingRegimeMonitor.history`` or any list of dicts/dataclasses).
            Defaults to ``None``.
        localizer: ``"drift"`` (:func:`activation_drift`), ``"gradient"`` (:func:`attribute_errors`),
            ``"kinetic"`` (:func:`kinetic_energy_probe`), ``"probe"`` (:func:`probe_localize`, needs ``probe`` or
            an artifact with a probe) or ``"auto"``: the probe when a record is given or the ``reference`` artifact
            has one, else drift when a reference is given or the model has BatchNorm, else gradient. Defaults to
            ``"auto"``.
        reference: reference statistics for the drift localizer: an :class:`AttributionArtifact` (whose probe,
            when ``LayerAttributionCallback`` recorded one, the probe localizer uses; see
            :func:`lightning_beta.probe.load_probe`) or a dict of statistics. Defaults to ``None``.
        probe: a :class:`ProbeRecord` of the healthy model (:func:`record_probe`), for the probe localizer, which
            finds faults that keep per-channel statistics; it wins over the artifact's. Its group names may carry
            the prefix of a LightningModule's attribute (``model.``) when ``model`` is that attribute: they are
            matched by stripping it. Defaults to ``None``.
        localize_dataloader: data to localize on. Defaults to ``train_dataloaders``.
        group_by: layer groups. Defaults to ``"auto"``.
        ratio: flagging rule of :func:`flag_layers`. Defaults to ``2.0``.
        top_k: flagging rule of :func:`flag_layers`. Defaults to ``None``.
        max_epochs: retraining epochs of the surgery. Defaults to ``1``.
        lr: peak learning rate of the surgery. Defaults to ``0.05``.
        momentum: ``"beta"`` or a constant. Defaults to ``"beta"``.
        selection: ``"layers"`` or ``"parameters"`` (same budget). Defaults to ``"layers"``.
        baseline: also retrain every group, to measure the compute saved. Defaults to ``False``.
        baseline_epochs: epochs of the baseline. Defaults to ``max_epochs``.
        policy: the treatment: ``"restore"`` (:func:`~lightning_beta.diagnosis.restore.restore_or_retrain`: each
            flagged group fitted back to its probe record, and retrained on the task loss, as ``"search"`` when
            ``full_steps`` is known and else as ``"fixed"``, only if its sketch error stays above 0.5; needs a
            probe), ``"fixed"`` (``max_epochs`` at ``lr``), ``"search"`` (lr search, re-initialisation, widening and
            early stopping on a held-out split of ``train_dataloaders``, within ``budget * full_steps`` optimizer
            steps), or ``"auto"``: ``"restore"`` when a probe holds every flagged group, else ``"fixed"``.
            Defaults to ``"auto"``.
        budget: share of ``full_steps`` the treatment may spend. Defaults to ``0.3``.
        full_steps: optimizer steps of full retraining from scratch; required by ``"search"``; with
            ``baseline=True`` and ``"search"`` it defaults to the baseline's measured steps. Defaults to ``None``.
        loss_fn: ``loss_fn(logits, targets)``, one loss per element, for the localizer and the retraining.
            Defaults to cross-entropy over the class dimension of ``(N, C)``, ``(B, C, d1, ...)`` or ``(B, T, V)``
            logits (the output, or its ``logits``: a Hugging Face ``ModelOutput``).
        predict: ``predict(logits)``, one predicted class per element, for the localizer and the verification.
            Defaults to the argmax over the class dimension.
        forward: ``forward(model, inputs)`` runs the model on the probe's inputs as the recording did (the
            ``reference_forward`` given to ``LayerAttributionCallback``, if any). Defaults to ``None``
            (:func:`~lightning_beta.reference.default_forward`).
        **trainer_kwargs: further ``Trainer`` arguments for both fits (checked before any work; the epochs are
            ``max_epochs``).

    Returns:
        The report; ``report.model`` is the corrected model, or the input model when the treatment made it worse
        on ``val_dataloader`` (``report.worse``; the report says so).

    Raises:
        ValueError: for an unknown ``localizer``, ``localizer="probe"`` without ``probe`` nor an artifact with one,
            and the errors of the steps it runs.
        FileNotFoundError: if the artifact names a probe file that is not beside it.
        TypeError: for a keyword argument that neither ``diagnose`` nor ``Trainer`` takes (``epochs`` is named
            ``max_epochs``).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
        >>> report = diagnose(net, data, data, localizer="gradient", top_k=1)
        >>> len(report.flagged), report.verification.n_samples
        (1, 32)
    """
    check_choice("localizer", localizer, LOCALIZERS)
    check_choice("policy", policy, POLICIES)
    _check_forward_defined(model)
    check_trainer_kwargs("diagnose", trainer_kwargs)
    scan = scan_history(history) if history is not None else None
    if probe is None and isinstance(reference, AttributionArtifact) and reference.probe_path is not None:
        if localizer in ("auto", "probe") or policy in ("auto", "restore"):
            probe = load_probe(reference)  # LayerAttributionCallback recorded one beside the artifact
    if policy == "restore" and probe is None:
        raise ValueError(
            '`policy="restore"` needs a probe: `probe=` a ProbeRecord, or `reference=` an artifact with one'
            " (LayerAttributionCallback(probe_samples > 0))"
        )
    _check_model_runs(model, val_dataloader)
    localize_data = localize_dataloader or train_dataloaders
    scores = _localize(localizer, model, localize_data, reference, group_by, loss_fn, predict, probe, forward)
    flagged = flag_layers(scores, ratio=ratio, top_k=top_k)
    if not flagged:
        reason = scores.message or "no group scored high enough to be flagged"
        if scores.method == "probe":
            reason += (
                ". The model computes what it computed when the probe was recorded: if it does worse on new data,"
                " the data changed, and `recommend_groups(model, new_loader, reference=old_loader)` proposes the"
                " groups to fine-tune"
            )
        return DiagnosisReport(scan, scores, flagged, message=f"nothing treated: {reason}", input_model=model)
    if policy == "auto":
        policy = "restore" if probe is not None and _holds(probe, model, flagged) else "fixed"
    common = {
        "max_epochs": max_epochs,
        "lr": lr,
        "momentum": momentum,
        "group_by": group_by,
        "loss_fn": loss_fn,
        "predict": predict,
        **trainer_kwargs,
    }
    base = base_ver = None
    if baseline:
        # The baseline runs first so that the search policy can take its measured steps as the budget's unit.
        everything = list(group_parameters(model, group_by))
        base = surgical_correction(
            model, everything, train_dataloaders, **{**common, "max_epochs": baseline_epochs or max_epochs}
        )
        base_ver = verify(model, base.model, val_dataloader, predict=predict)
        if full_steps is None and policy in ("search", "restore"):
            full_steps = base.optimizer_steps
    retrain = {"selection": selection, "budget": budget, "full_steps": full_steps, **common}
    if policy == "restore":
        assert probe is not None
        fallback = "search" if full_steps is not None else "fixed"
        surgery = restore_or_retrain(
            model, flagged, probe, train_dataloaders, forward=forward, policy=fallback, **retrain
        )
    else:
        surgery = surgical_correction(model, flagged, train_dataloaders, policy=policy, **retrain)
    verification = verify(model, surgery.model, val_dataloader, predict=predict)
    message = None
    if verification.worse:
        message = (
            f"the treated model is worse than its input on the validation set (accuracy"
            f" {verification.accuracy_before:.4f} -> {verification.accuracy_after:.4f}, net {verification.net:+d}):"
            " `report.model` is the input model, unchanged"
        )
    return DiagnosisReport(scan, scores, flagged, surgery, verification, base, base_ver, message, input_model=model)
