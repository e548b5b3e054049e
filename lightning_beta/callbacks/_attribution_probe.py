"""Private: LayerAttributionCallback's probe record at the end of a fit, and its file beside the artifact.

The probe (:mod:`lightning_beta.probe`) is recorded on every rank, as the reference statistics are: under a
sharded strategy each rank's forward takes part in the others' collectives. Each rank reads its own first training
batches; rank zero's record is the one saved. A failure costs the probe only, never the fit: it comes back as a
reason, which the callback warns about once.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from lightning_beta.artifact import AttributionArtifact
from lightning_beta.layer_groups import GroupBy
from lightning_beta.probe import ProbeRecord, record_probe
from lightning_beta.reference import Forward, isolated_rng


def _raised_by_forward(err: BaseException) -> bool:
    """Whether ``err`` came from running the model, not from reading the batches (the hint is about the former)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or not tb.tb_frame.f_code.co_filename.endswith("_probe_inputs.py")


#: ``probe_replay="auto"``: the most bytes of group inputs a probe keeps for the replay rule.
AUTO_REPLAY_BYTES = 64 * 2**20


def record_fit_probe(
    trainer: Any,
    pl_module: Any,
    group_by: GroupBy,
    n_samples: int,
    sketch_dim: int,
    replay: bool | str,
    forward: Forward | None,
) -> tuple[ProbeRecord | None, str | None]:
    """The probe record of the fitted ``pl_module`` on its first ``n_samples`` training samples, or why there is none.

    The batches are those of the reference pass: the training dataloader's first batches, moved by the strategy
    (``batch_to_device``, so the LightningModule's transfer hooks apply), read with the random number generators
    restored afterwards (:func:`~lightning_beta.reference.isolated_rng`). ``forward(pl_module, batch)`` is the
    callback's ``reference_forward`` (with it the whole batches are kept as the probe inputs; by default their
    inputs, as :func:`~lightning_beta.reference.default_forward` takes them). The forward runs in eval mode under
    ``torch.no_grad()`` with every flag and buffer restored, outside the precision plugin's autocast, as
    ``probe_localize`` runs it later.

    Returns:
        ``(record, None)``, or ``(None, reason)`` when the probe could not be recorded.
    """
    loaders = trainer.train_dataloader
    if loaders is None:
        return None, "no training dataloader was left for the probe inputs"

    def batches() -> Iterator[Any]:
        for batch, _, _ in itertools.islice(iter(CombinedLoader(loaders, mode="max_size_cycle")), n_samples):
            yield trainer.strategy.batch_to_device(batch)

    try:
        with isolated_rng():
            record = record_probe(
                pl_module,
                batches(),
                groups=group_by,
                sketch_dim=sketch_dim,
                replay=bool(replay),
                max_samples=n_samples,
                forward=forward,
                max_replay_bytes=AUTO_REPLAY_BYTES if replay == "auto" else None,
            )
    except Exception as err:  # the fit is over: a failed probe costs the probe only
        reason = f"{type(err).__name__}: {err}"
        if forward is None and isinstance(err, (TypeError, NotImplementedError)) and _raised_by_forward(err):
            reason += (
                " (a LightningModule whose `forward` does not take the batch's inputs needs"
                " `LayerAttributionCallback(reference_forward=...)`)"
            )
        return None, reason
    return record, None


def attach_probe(
    artifact: AttributionArtifact, record: ProbeRecord | None, why: str | None, path: Path
) -> tuple[AttributionArtifact, Path | None]:
    """On rank zero: stage the record beside ``path`` and name ``path`` in the artifact, or warn once why not.

    The record is written (atomically) under a temporary name, which the caller renames to ``path`` once the
    artifact naming it is written, or removes if that fails: an artifact and its probe are replaced together, and a
    failed write leaves the previous pair as it was.

    Returns:
        The artifact (with ``probe_path`` when staged) and the staged file, ``None`` without a probe.
    """
    if record is not None:
        staged = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            record.save(staged)
            return dataclasses.replace(artifact, probe_path=path.name), staged
        except (OSError, RuntimeError) as err:  # a full or read-only disk must not kill the fit (save cleans up)
            why = f"could not write {str(path)!r} ({err})"
    rank_zero_warn(f"LayerAttributionCallback: the artifact has no probe: {why}. The fit is not affected.")
    return artifact, None
