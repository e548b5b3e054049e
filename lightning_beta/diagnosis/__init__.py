"""Diagnosis on a trained model or a saved artifact, no Trainer required."""

from lightning_beta.diagnosis.artifact import AttributionArtifact, GroupTotals, ReferenceStats, load_attribution

__all__ = ["AttributionArtifact", "GroupTotals", "ReferenceStats", "load_attribution"]
