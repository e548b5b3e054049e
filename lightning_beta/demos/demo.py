"""The main job: constant momentum vs the beta schedule on the bundled digits, then a diagnosis of the beta run.

``lightning-beta demo`` calls :func:`run_demo`. Everything runs on scikit-learn's handwritten digits (no
download); the TensorBoard logs go under ``out/constant`` and ``out/beta``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Subset

from lightning_beta.artifact import AttributionArtifact
from lightning_beta.callbacks import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback
from lightning_beta.demos.digits import DigitsClassifier, digits_dataloaders, load_digits_tensors
from lightning_beta.demos.faults import moment_matched
from lightning_beta.diagnosis import (
    DiagnosisReport,
    activation_drift,
    attribute_errors,
    diagnose,
    probe_localize,
    reference_statistics,
    verify,
)
from lightning_beta.diagnosis._batches import defines_forward
from lightning_beta.diagnosis.pipeline import Localizer, TreatPolicy

TARGETS = (0.90, 0.95)


@dataclass(frozen=True)
class DemoConfig:
    """What ``lightning-beta demo`` was asked for."""

    out: Path
    epochs: int = 12
    seed: int = 0
    quick: bool = False
    accelerator: str = "cpu"
    devices: str = "1"
    progress: bool = True


class AccuracyCurve(pl.Callback):
    """Records ``(global_step, val_acc)`` after every validation run, for steps-to-target."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val_acc")
        if acc is not None:
            self.points.append((trainer.global_step, float(acc)))

    def steps_to(self, target: float) -> int | None:
        """The first validated step whose accuracy is at least ``target``, or ``None``."""
        return next((step for step, acc in self.points if acc >= target), None)


@dataclass
class RunResult:
    """One training run of the demo."""

    name: str
    curve: AccuracyCurve
    monitor: DampingRegimeMonitor
    attribution: LayerAttributionCallback
    model: DigitsClassifier
    log_dir: str
    is_global_zero: bool = True
    fit_seconds: float = float("nan")

    @property
    def final_accuracy(self) -> float:
        return self.curve.points[-1][1] if self.curve.points else float("nan")

    def regime_fractions(self) -> dict[str, float]:
        """Share of all optimizer steps in each regime, weighted by the steps of each epoch."""
        totals = {"underdamped": 0.0, "critical": 0.0, "overdamped": 0.0}
        steps = 0
        for record in self.monitor.history:
            for regime in totals:
                totals[regime] += record.fractions[regime] * record.n_steps
            steps += record.n_steps
        return {regime: value / steps for regime, value in totals.items()} if steps else totals


@dataclass
class DemoResult:
    """Both runs and the diagnosis of the beta run."""

    config: DemoConfig
    runs: dict[str, RunResult]
    diagnosis: DiagnosisReport | None = None
    fault: PlantedFault | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_global_zero(self) -> bool:
        """Whether this process is global rank zero, the one that prints and writes (every run agrees)."""
        return all(run.is_global_zero for run in self.runs.values())

    def table(self) -> str:
        """The comparison table printed by the demo."""
        names = list(self.runs)
        header = f"{'':34}" + "".join(f"{name:>18}" for name in names)
        rows = [header, "-" * len(header)]

        def row(label: str, values: list[str]) -> None:
            rows.append(f"{label:34}" + "".join(f"{v:>18}" for v in values))

        for target in TARGETS:
            steps = [self.runs[n].curve.steps_to(target) for n in names]
            row(f"steps to {target:.0%} val accuracy", [str(s) if s is not None else "not reached" for s in steps])
        row("final val accuracy", [f"{self.runs[n].final_accuracy:.3f}" for n in names])
        for regime in ("underdamped", "critical", "overdamped"):
            row(f"steps {regime}", [f"{self.runs[n].regime_fractions()[regime]:.0%}" for n in names])
        if self.diagnosis is not None:
            rows.append("")
            rows.extend(self.diagnosis_lines())
        rows.extend(self.notes)
        return "\n".join(rows)

    def diagnosis_lines(self) -> list[str]:
        """Lines on the fault planted in the beta run, who found it, and what the treatment recovered."""
        report, fault = self.diagnosis, self.fault
        if report is None or fault is None:
            return []
        lines = [
            f"Diagnosis of a fault planted in the beta run: {fault.description}.",
            f"  accuracy on the verification half: {fault.clean:.3f} healthy, {fault.faulty:.3f} with the fault",
            "  group named first: "
            + "; ".join(
                f"{label} {name} ({'right' if name == fault.group else 'wrong'})" for label, name in fault.named.items()
            ),
        ]
        if report.message:
            lines.append(f"  {report.message}")
        surgery, check = report.surgery, report.verification
        if surgery is not None and check is not None:
            lost = fault.clean - fault.faulty
            recovered = (check.accuracy_after - fault.faulty) / lost if lost > 0 else float("nan")
            lines.append(
                f"  treatment ({surgery.policy} {', '.join(surgery.groups_touched)}): accuracy"
                f" {check.accuracy_before:.3f} -> {check.accuracy_after:.3f}, fixed {check.fixed}, broken"
                f" {check.broken}, net {check.net:+d}: {recovered:.0%} of the lost accuracy recovered"
            )
            train_s = self.runs["beta schedule"].fit_seconds
            lines.append(
                f"  compute (measured): {surgery.wall_time_s:.2f} s = {surgery.wall_time_s / train_s:.1%} of the beta"
                f" run's training ({train_s:.1f} s); {surgery.n_params_trained} parameters"
                f" ({surgery.fraction_trained:.1%}) fitted, {surgery.optimizer_steps}"
                f" {'L-BFGS iterations on the probe inputs' if surgery.policy == 'restore' else 'optimizer steps'}"
            )
        return lines


@dataclass
class PlantedFault:
    """The fault the demo plants in the beta run and what each localizer made of it."""

    group: str
    description: str
    clean: float
    faulty: float
    named: dict[str, str]


#: Lightning's loggers whose info lines (accelerator, tips) the demo hides; warnings still show. Both namespaces:
#: once ``pytorch_lightning`` is imported, ``lightning``'s own ``rank_zero_info`` lines go through its logger.
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators",
    "pytorch_lightning.utilities.rank_zero",
    "pytorch_lightning.accelerators",
)
#: Harmless warnings of the demo's own setup (tiny in-memory dataloaders; a torch deprecation inside Lightning).
QUIET_WARNINGS = (".*does not have many workers.*", ".*LeafSpec.*")
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _HideLightningInfo(logging.Filter):
    """Drops info records that Lightning emits, keeping every warning and everything lightning_beta emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        # ``rank_zero_info`` sets ``stacklevel`` so ``pathname`` is its caller: lightning_beta's lines pass.
        return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Inside the block: Lightning's info lines and :data:`QUIET_WARNINGS` hidden; everything restored on exit.

    Scoped to the block (the filters are removed and the warning filters restored after it), and never touching
    what lightning_beta itself logs or warns (e.g. BetaMomentumCallback's clamp warning).

    Example:
        >>> before = list(warnings.filters)
        >>> with quiet():
        ...     pass
        >>> warnings.filters == before
        True
    """
    hide = _HideLightningInfo()
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", pattern)
        for logger in loggers:
            logger.addFilter(hide)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(hide)


def train_run(name: str, config: DemoConfig, beta: bool) -> RunResult:
    """Train the digits ResNet once, constant momentum 0.9 or with the beta schedule, with both monitors."""
    pl.seed_everything(config.seed, verbose=False)
    train_loader, val_loader = digits_dataloaders(batch_size=64, seed=config.seed)
    model = DigitsClassifier(arch="resnet", optimizer="sgd", lr=0.1, momentum=0.9, schedule="cosine")
    curve = AccuracyCurve()
    monitor = DampingRegimeMonitor()
    attribution = LayerAttributionCallback()
    callbacks: list[pl.Callback] = [monitor, attribution, curve]
    if beta:
        callbacks.insert(0, BetaMomentumCallback())
    logger = TensorBoardLogger(save_dir=str(config.out), name=name, version="")
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=parse_devices(config.devices),
        logger=logger,
        callbacks=callbacks,
        val_check_interval=0.25,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        deterministic=True,
    )
    begin = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    seconds = time.perf_counter() - begin
    return RunResult(name, curve, monitor, attribution, model, logger.log_dir, trainer.is_global_zero, seconds)


def run_demo(config: DemoConfig) -> DemoResult:
    """Train both runs, diagnose the beta run, and return everything the table needs.

    Under several devices every process runs this; the accuracies are the ranks' reduced validation metrics, the
    diagnosis is the same on every rank, and only global rank zero writes the report (see
    :attr:`DemoResult.is_global_zero` for printing).
    """
    with quiet():
        runs = {
            "constant 0.9": train_run("constant", config, beta=False),
            "beta schedule": train_run("beta", config, beta=True),
        }
        result = DemoResult(config, runs)
        result.diagnosis, result.fault = diagnose_run(runs["beta schedule"], config)
    if result.is_global_zero:
        write_report(result.diagnosis, config.out)
    report_path = config.out / "diagnosis.json"
    result.notes.append(f"\nDiagnosis report: {report_path} (render it with `lightning-beta report {report_path}`)")
    return result


def _halves(val_loader: Any) -> tuple[Any, Any] | None:
    # The validation set split by sample parity: one half to localize on, the other to verify on.
    dataset = getattr(val_loader, "dataset", None)
    if not isinstance(val_loader, DataLoader) or dataset is None or not hasattr(dataset, "__len__"):
        return None
    n = len(dataset)
    if n < 2:
        return None
    batch = val_loader.batch_size or 1
    return (
        DataLoader(Subset(dataset, range(0, n, 2)), batch_size=batch),
        DataLoader(Subset(dataset, range(1, n, 2)), batch_size=batch),
    )


def checkpoint_history(checkpoint: Path) -> list[dict[str, Any]] | None:
    """The damping-regime history a ``DampingRegimeMonitor`` saved in a Lightning checkpoint, ``None`` if none."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key, value in (state.get("callbacks") or {}).items():
        if str(key).startswith("DampingRegimeMonitor") and isinstance(value, dict) and value.get("history"):
            return list(value["history"])
    return None


def diagnose_checkpoint(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    checkpoint: Path | None = None,
    artifact: AttributionArtifact | None = None,
    localizer: Localizer = "auto",
    policy: TreatPolicy = "auto",
    top_k: int | None = None,
    max_epochs: int = 1,
    lr: float = 0.01,
    baseline: bool = False,
    accelerator: str = "cpu",
    devices: str = "1",
) -> tuple[DiagnosisReport, bool]:
    """The demo's diagnosis on a user's model and data (``lightning-beta diagnose``).

    Localize on the even samples of the datamodule's validation set (all of the training set if the validation
    loader has no sized dataset), treat (restore from the ``artifact``'s probe, or retrain on the training set),
    verify on the odd samples; the damping-regime history of a ``DampingRegimeMonitor`` saved in ``checkpoint`` is
    scanned. ``artifact`` is what ``LayerAttributionCallback`` wrote for the model: the reference of the drift
    localizer and the probe of the probe localizer and of the restore treatment.

    Returns:
        The report and whether this process is global rank zero (the one to write it).
    """
    model = _network(model)
    datamodule.prepare_data()
    datamodule.setup("fit")
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    halves = _halves(val_loader)
    localize_on, verify_on = halves if halves is not None else (train_loader, val_loader)
    report = diagnose(
        model,
        train_loader,
        verify_on,
        history=checkpoint_history(checkpoint) if checkpoint is not None else None,
        reference=artifact,
        localizer=localizer,
        policy=policy,
        localize_dataloader=localize_on,
        top_k=top_k,
        max_epochs=max_epochs,
        lr=lr,
        baseline=baseline,
        accelerator=accelerator,
        devices=parse_devices(devices),
    )
    return report, getattr(rank_zero_only, "rank", 0) == 0  # set by the Trainers of the fits


def _network(model: pl.LightningModule) -> Any:
    """The LightningModule itself, or, when it defines no ``forward``, the one child module holding parameters."""
    if defines_forward(model):
        return model
    children = [child for _, child in model.named_children() if next(child.parameters(), None) is not None]
    return children[0] if len(children) == 1 else model  # else diagnose says what to pass


def write_report(report: DiagnosisReport, out: Path) -> None:
    """``diagnosis.json`` and ``diagnosis.md`` under ``out``: the report ``lightning-beta report`` renders."""
    (out / "diagnosis.json").write_text(report.to_json())
    (out / "diagnosis.md").write_text(report.to_markdown())


#: The group the demo damages, and how (:func:`lightning_beta.demos.faults.moment_matched`).
FAULT_GROUP, FAULT_KIND = "net.layer2", "permute"


def diagnose_run(run: RunResult, config: DemoConfig) -> tuple[DiagnosisReport, PlantedFault]:
    """Plant a fault in the beta run, name the faulty group with each localizer, restore it, verify.

    The fault: ``net.layer2``'s output channels permuted, each rescaled to the mean and variance of the channel it
    replaces (:func:`~lightning_beta.demos.faults.moment_matched`), so per-channel statistics cannot see it. The
    localizers run on one half of the validation set: the probe that ``LayerAttributionCallback`` recorded at the
    end of the run (ours), activation drift against the healthy model's statistics (ours) and the error-gradient
    score (the paper's). :func:`~lightning_beta.diagnosis.diagnose` then flags the probe's first group and treats it
    with the ``"auto"`` policy, which restores it from the probe record; Verify counts the errors fixed and broken
    on the other half. The compute is measured against the run's own training time.
    """
    train_loader, _ = digits_dataloaders(batch_size=64, seed=config.seed)
    _, val = load_digits_tensors()  # the validation split of the runs (it depends on the split seed only)
    localize_half = DataLoader(Subset(val, range(0, len(val), 2)), batch_size=512)
    verify_half = DataLoader(Subset(val, range(1, len(val), 2)), batch_size=512)
    healthy, probe = run.model, run.attribution.probe
    if probe is None:
        raise RuntimeError("LayerAttributionCallback recorded no probe in the beta run")
    x_train = torch.cat([batch[0] for batch in train_loader])
    gen = torch.Generator().manual_seed(config.seed)
    bad = moment_matched(healthy, FAULT_GROUP, x_train, gen, FAULT_KIND)
    assert bad is not None  # a block with a convolution can be permuted
    named = {
        "probe (ours)": probe_localize(bad, probe).ranking[0],
        "drift (ours)": activation_drift(bad, localize_half, reference_statistics(healthy, localize_half)).ranking[0],
        "error gradient (paper)": attribute_errors(bad, localize_half).ranking[0],
    }
    report = diagnose(
        bad,
        train_loader,
        verify_half,
        history=run.monitor.history,
        localizer="probe",
        probe=probe,
        top_k=1,
        accelerator=config.accelerator,
        devices=parse_devices(config.devices),
        enable_progress_bar=config.progress,
    )
    fault = PlantedFault(
        group=FAULT_GROUP,
        description=f"{FAULT_GROUP}'s output channels permuted, each channel's mean and variance kept",
        clean=verify(healthy, healthy, verify_half).accuracy_before,
        faulty=report.verification.accuracy_before if report.verification else float("nan"),
        named=named,
    )
    return report, fault


def parse_devices(devices: str) -> int | str:
    """``--devices`` as Lightning takes it: a count as an int, anything else (``"auto"``, ``"0,1"``) as given."""
    return int(devices) if devices.isdigit() else devices
