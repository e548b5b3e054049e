"""Diagnosis on a trained model or a saved artifact, no Trainer required.

Localize (:func:`attribute_errors`, :func:`activation_drift`, :func:`probe_localize`,
:func:`kinetic_energy_scores`), Diagnose (:func:`flag_layers`, :func:`optimizer_overlap`), Treat
(:func:`surgical_correction`), Verify (:func:`verify`), and all of them at once (:func:`diagnose`). Under
distribution shift, :func:`recommend_groups` proposes the groups to fine-tune, beside the Auto-RGN baseline
(:func:`auto_rgn`).
"""

from lightning_beta.artifact import AttributionArtifact, GroupTotals, ReferenceStats, load_attribution
from lightning_beta.diagnosis.drift import activation_drift, channel_drift, reference_statistics
from lightning_beta.diagnosis.flag import Overlap, flag_layers, jaccard, optimizer_overlap, spearman
from lightning_beta.diagnosis.kinetic import kinetic_energy_probe, kinetic_energy_scores
from lightning_beta.diagnosis.localize import attribute_errors, error_gradients
from lightning_beta.diagnosis.pipeline import DiagnosisReport, diagnose, scan_history
from lightning_beta.diagnosis.probe import ProbeRecord, probe_localize, record_probe
from lightning_beta.diagnosis.scores import LayerScores
from lightning_beta.diagnosis.shift import (
    FineTuneResult,
    ShiftRecommendation,
    auto_rgn,
    fine_tune,
    recommend_groups,
    relative_gradient_norms,
    rgn_multipliers,
)
from lightning_beta.diagnosis.treat import SurgeryResult, surgical_correction
from lightning_beta.diagnosis.verify import ClassChange, Verification, verify
from lightning_beta.probe import load_probe

__all__ = [
    "AttributionArtifact",
    "ClassChange",
    "DiagnosisReport",
    "FineTuneResult",
    "GroupTotals",
    "LayerScores",
    "Overlap",
    "ProbeRecord",
    "ReferenceStats",
    "ShiftRecommendation",
    "SurgeryResult",
    "Verification",
    "activation_drift",
    "attribute_errors",
    "auto_rgn",
    "channel_drift",
    "diagnose",
    "error_gradients",
    "fine_tune",
    "flag_layers",
    "jaccard",
    "kinetic_energy_probe",
    "kinetic_energy_scores",
    "load_attribution",
    "load_probe",
    "optimizer_overlap",
    "probe_localize",
    "recommend_groups",
    "record_probe",
    "reference_statistics",
    "relative_gradient_norms",
    "rgn_multipliers",
    "scan_history",
    "spearman",
    "surgical_correction",
    "verify",
]
