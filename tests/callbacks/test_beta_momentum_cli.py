import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_beta import BetaMomentumCallback, critical_momentum
from tests.helpers import StepRecorder, TinyModel, make_loader


class CLIModel(TinyModel):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(optimizer_fn=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9))

    def train_dataloader(self):
        return make_loader()


def test_callback_from_lightning_cli_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path}
  max_epochs: 1
  limit_train_batches: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_beta.BetaMomentumCallback
      init_args:
        rule: exact
        switch_at: 2
        constant_momentum: 0.95
    - class_path: tests.helpers.StepRecorder
model:
  lr: 0.01
"""
    )
    cli = LightningCLI(CLIModel, run=False, args=["--config", str(config)], save_config_callback=None)
    beta = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BetaMomentumCallback))
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, StepRecorder))
    assert (beta.rule, beta.switch_at, beta.constant_momentum) == ("exact", 2, 0.95)
    cli.trainer.fit(cli.model)
    expected = [critical_momentum(0.01, rule="exact")] * 2 + [0.95]
    assert recorder.momenta() == pytest.approx(expected)
