"""BetaMomentumCallback on scikit-learn's handwritten digits: SGD, AdamW and the hybrid schedule.

Run: ``python examples/01_beta_momentum.py [--epochs N]``. No download: the digits ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta import BetaMomentumCallback


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    train, val = order[:1400], order[1400:]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, generator=gen)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=256)
    return train_loader, val_loader


class DigitsMLP(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        if self.hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LastMomentum(pl.Callback):
    """Remembers the momentum (SGD) or beta1 (AdamW) of the last optimizer step."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.value = group["betas"][0] if "betas" in group else group["momentum"]


def run(name: str, optimizer: str, lr: float, callback: BetaMomentumCallback | None, epochs: int) -> None:
    pl.seed_everything(0, verbose=False)
    train_loader, val_loader = digits_loaders()
    last = LastMomentum()
    callbacks: list[pl.Callback] = [last] if callback is None else [callback, last]
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=10,
    )
    trainer.fit(DigitsMLP(optimizer, lr), train_loader, val_loader)
    acc = trainer.callback_metrics["val_acc"].item()
    # The callback logs through Lightning, so its key sits in callback_metrics beside the model's own.
    logged = trainer.callback_metrics.get("beta/momentum")
    shown = "" if logged is None else f"  last logged beta/momentum={logged.item():.3f}"
    print(f"{name:<32} val_acc={acc:.3f}  final momentum={last.value:.3f}{shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is clamped.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    print(f"critical momentum at lr=0.1: {1 - 2 * math.sqrt(0.1):.3f} (paper rule)")
    run("SGD, constant momentum 0.9", "sgd", 0.1, None, args.epochs)
    run("SGD + BetaMomentumCallback", "sgd", 0.1, BetaMomentumCallback(), args.epochs)
    run("SGD + hybrid (crossover)", "sgd", 0.1, BetaMomentumCallback(switch_at="crossover"), args.epochs)
    run("AdamW + BetaMomentumCallback", "adamw", 0.003, BetaMomentumCallback(), args.epochs)


if __name__ == "__main__":
    main()
