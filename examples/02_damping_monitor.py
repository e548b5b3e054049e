"""DampingRegimeMonitor on scikit-learn's handwritten digits: which damping regime is SGD in, epoch by epoch?

Two runs of the same MLP under cosine lr from 0.1: constant momentum 0.9 (underdamped for most of the run,
docs/method.md, section 2) and BetaMomentumCallback (critical while unclamped). The monitor also measures the
curvature of each layer (``curvature="secant"``). Everything goes to TensorBoard; open the "Damping" category of
the Custom Scalars tab with ``tensorboard --logdir <logdir>``.

Run: ``python examples/02_damping_monitor.py [--epochs N] [--logdir DIR]``. No download: the digits ship with
scikit-learn.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.callbacks.beta_momentum import BetaMomentumCallback
from lightning_beta.callbacks.damping_regime_monitor import DampingRegimeMonitor


def digits_loader(batch_size: int = 64) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, torch.tensor(y)), batch_size=batch_size, shuffle=True, generator=gen)


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.hidden = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
        self.out = nn.Linear(128, 10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.out(self.hidden(x)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def run(name: str, beta: bool, epochs: int, logdir: str) -> DampingRegimeMonitor:
    pl.seed_everything(0, verbose=False)
    monitor = DampingRegimeMonitor(curvature="secant")
    # The monitor may sit anywhere in the list: it reads the lr and momentum each step actually used.
    callbacks: list[pl.Callback] = [monitor, BetaMomentumCallback()] if beta else [monitor]
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name=name),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(DigitsMLP(), digits_loader())
    print(f"\n## {name}  (TensorBoard run: {trainer.logger.log_dir})")  # type: ignore[union-attr]
    print(monitor.summary())
    curvature = ", ".join(f"{layer} {value:.3g}" for layer, value in monitor.layer_curvature().items())
    print(f"measured curvature at the end (secant, EMA): {curvature}")
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--logdir", default="lightning_logs/damping")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*is clamped.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    run("constant_momentum", beta=False, epochs=args.epochs, logdir=args.logdir)
    run("beta_momentum", beta=True, epochs=args.epochs, logdir=args.logdir)


if __name__ == "__main__":
    main()
