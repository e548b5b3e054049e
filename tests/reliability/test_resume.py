"""Resume exactness: N steps straight vs k steps, checkpoint, a new Trainer with ``ckpt_path``, fit to N.

What is and is not reproduced is written down in docs/reliability.md; these tests pin it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback, critical_momentum
from lightning_beta.callbacks.beta_momentum import SGD_MOMENTUM_FLOOR
from tests.reliability.helpers import EPOCHS, N_STEPS, STEPS_PER_EPOCH, fit, make_callbacks, of, scalars, sgd_cosine

OUR_PREFIXES = ("beta/", "damping/", "grad_norm/")


def _straight_with_checkpoints(root: Path, which: str, **overrides: Any) -> tuple[Any, Any, list[Any], Path]:
    """The straight run, which also writes a checkpoint at the end of every epoch."""
    callbacks = make_callbacks(which)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer, recorder = fit(
        root / "straight", sgd_cosine()(), [*callbacks, ckpt], max_epochs=EPOCHS, enable_checkpointing=True, **overrides
    )
    return trainer, recorder, callbacks, root / "ckpt"


@pytest.mark.parametrize("which", ["beta", "monitor", "attribution", "all"])
@pytest.mark.parametrize("resume_epoch", [0, 1])
def test_resume_from_epoch_end_is_exact(tmp_path: Path, which: str, resume_epoch: int) -> None:
    """Momentum used at every step, every logged value after the resume point and the artifact: all identical."""
    straight_trainer, straight, straight_cbs, ckpt_dir = _straight_with_checkpoints(tmp_path, which)
    k = (resume_epoch + 1) * STEPS_PER_EPOCH
    ckpt = ckpt_dir / f"epoch={resume_epoch}-step={k}.ckpt"

    resumed_cbs = make_callbacks(which)
    trainer, resumed = fit(tmp_path / "resumed", sgd_cosine()(), resumed_cbs, ckpt_path=ckpt, max_epochs=EPOCHS)

    assert trainer.global_step == straight_trainer.global_step == N_STEPS
    assert [s["global_step"] for s in resumed.steps] == list(range(k, N_STEPS))
    assert resumed.steps == straight.steps[k:]  # lr and momentum of every optimizer step, exactly

    want = {tag: [(s, v) for s, v in points if s >= k] for tag, points in scalars(straight_trainer).items()}
    want = {tag: points for tag, points in want.items() if points}
    got = scalars(trainer)
    assert any(tag.startswith(OUR_PREFIXES) for tag in got)
    assert got == want  # every tag, ours and train_loss, bit for bit

    if which in ("monitor", "all"):
        assert of(resumed_cbs, DampingRegimeMonitor).history == of(straight_cbs, DampingRegimeMonitor).history
    if which in ("attribution", "all"):
        a = json.loads(of(straight_cbs, LayerAttributionCallback).artifact_path.read_text())
        b = json.loads(of(resumed_cbs, LayerAttributionCallback).artifact_path.read_text())
        assert a == b and a["complete"] and a["total"]["count"] == N_STEPS


@pytest.mark.slow
def test_resume_mid_epoch_reproduces_schedule_not_data(tmp_path: Path) -> None:
    """Mid-epoch, Lightning restarts a plain DataLoader from its first batch: the lr and momentum schedule, the
    damping ratios and the step counts are reproduced, the gradients (so the attribution norms) are not."""
    callbacks = make_callbacks("all")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    _, straight = fit(
        tmp_path / "straight", sgd_cosine()(), [*callbacks, ckpt], max_epochs=EPOCHS, enable_checkpointing=True
    )
    resumed_cbs = make_callbacks("all")
    _, resumed = fit(
        tmp_path / "resumed",
        sgd_cosine()(),
        resumed_cbs,
        ckpt_path=tmp_path / "ckpt" / "epoch=1-step=6.ckpt",
        max_epochs=EPOCHS,
    )

    assert resumed.steps == straight.steps[6:]  # the lr and momentum of each step depend on the step only
    monitor, straight_monitor = of(resumed_cbs, DampingRegimeMonitor), of(callbacks, DampingRegimeMonitor)
    assert [(r.epoch, r.n_steps, r.median_zeta) for r in monitor.history] == [
        (r.epoch, r.n_steps, r.median_zeta) for r in straight_monitor.history
    ]
    art, straight_art = (
        of(resumed_cbs, LayerAttributionCallback).artifact,
        of(callbacks, LayerAttributionCallback).artifact,
    )
    assert art.total.count == straight_art.total.count == N_STEPS and art.history_epochs == [0, 1, 2]
    assert art.history[0] == straight_art.history[0]  # epoch 0 was complete in the checkpoint
    assert art.history[1] != straight_art.history[1]  # the rest of epoch 1 saw batches 0-1 again, not 2-3


@pytest.mark.slow
def test_max_steps_resume_from_epoch_end_keeps_the_schedule(tmp_path: Path) -> None:
    """Lightning 2.6.6: a ``max_steps``-limited run resumed from an end-of-epoch checkpoint replays one batch and
    shifts its epoch boundaries. The callbacks still give each global step the momentum of the straight run, and
    never count a step twice."""
    _, straight, _, ckpt_dir = _straight_with_checkpoints(tmp_path, "all", max_steps=N_STEPS)
    resumed_cbs = make_callbacks("all")
    trainer, resumed = fit(
        tmp_path / "resumed",
        sgd_cosine()(),
        resumed_cbs,
        ckpt_path=ckpt_dir / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt",
        max_epochs=EPOCHS,
        max_steps=N_STEPS,
    )
    by_step = {s["global_step"]: s["groups"] for s in straight.steps}
    steps = [s["global_step"] for s in resumed.steps]
    assert steps == sorted(set(steps)) and steps[0] == STEPS_PER_EPOCH  # no step twice, none before the resume
    for s in resumed.steps:
        assert s["groups"] == by_step[s["global_step"]]
    art = of(resumed_cbs, LayerAttributionCallback).artifact
    assert art.total.count == STEPS_PER_EPOCH + len(steps) == trainer.global_step  # one count per optimizer step


def test_resume_checkpoint_written_without_the_callbacks(tmp_path: Path) -> None:
    """The callbacks start fresh: no crash, momentum from the first resumed step, counts from the resume point."""
    trainer, _ = fit(tmp_path / "first", sgd_cosine()(), [], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    callbacks = make_callbacks("all")
    trainer, resumed = fit(
        tmp_path / "resumed", sgd_cosine()(), callbacks, ckpt_path=tmp_path / "plain.ckpt", max_epochs=2
    )
    for s in resumed.steps:
        (group,) = s["groups"]
        assert group["momentum"] == pytest.approx(critical_momentum(group["lr"], min_momentum=SGD_MOMENTUM_FLOOR))
    assert of(callbacks, LayerAttributionCallback).artifact.total.count == STEPS_PER_EPOCH
    assert [r.epoch for r in of(callbacks, DampingRegimeMonitor).history] == [1]


def test_resume_without_the_callbacks_that_wrote_the_checkpoint(tmp_path: Path) -> None:
    trainer, _ = fit(tmp_path / "first", sgd_cosine()(), make_callbacks("all"), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    trainer, _ = fit(tmp_path / "resumed", sgd_cosine()(), [], ckpt_path=tmp_path / "full.ckpt", max_epochs=2)
    assert trainer.global_step == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (BetaMomentumCallback, "BetaMomentumCallback"),
        (DampingRegimeMonitor, "DampingRegimeMonitor"),
        (LayerAttributionCallback, "LayerAttributionCallback"),
    ],
)
@pytest.mark.parametrize("version", [0, 2, None])
def test_checkpoint_of_another_state_version_is_refused(tmp_path: Path, kind: type, name: str, version: Any) -> None:
    """An older (0), newer (2) or unversioned (None) state in a real checkpoint: a ValueError naming the version."""
    callbacks = make_callbacks("all")
    trainer, _ = fit(tmp_path / "first", sgd_cosine()(), callbacks, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "v1.ckpt")
    checkpoint = torch.load(tmp_path / "v1.ckpt", weights_only=False)
    key = of(callbacks, kind).state_key
    if version is None:
        del checkpoint["callbacks"][key]["version"]
    else:
        checkpoint["callbacks"][key]["version"] = version
    torch.save(checkpoint, tmp_path / "other.ckpt")
    message = f"{name} state has version {version!r}; this release reads version 1"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fit(
            tmp_path / "resumed", sgd_cosine()(), make_callbacks("all"), ckpt_path=tmp_path / "other.ckpt", max_epochs=2
        )
