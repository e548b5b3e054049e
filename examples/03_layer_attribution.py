"""LayerAttributionCallback on scikit-learn's handwritten digits: which layer carries the gradient?

A small CNN (conv1, bn1, conv2, bn2, fc) is trained for a few epochs with the callback. It logs
``grad_norm/<layer>`` (the mean over each of Lightning's logging intervals, ``Trainer(log_every_n_steps=5)``) and
``grad_norm_epoch/<layer>`` to TensorBoard, draws the layer x epoch heatmap (matplotlib) and the ranking table, and
writes ``attribution.json`` into the logger's run directory, read back here with ``load_attribution``.

Run: ``python examples/03_layer_attribution.py [--epochs N]``, then
``tensorboard --logdir lightning_beta_runs/03_layer_attribution`` (Custom Scalars, Images and Text tabs).
No download: the digits ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.artifact import load_attribution
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback


def digits_loader(batch_size: int = 64) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, torch.tensor(y)), batch_size=batch_size, shuffle=True, generator=gen)


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # a tiny model: more threads only add contention

    start = time.perf_counter()
    attribution = LayerAttributionCallback(reference_batches=4)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        log_every_n_steps=5,
        accelerator="cpu",
        logger=TensorBoardLogger("lightning_beta_runs", name="03_layer_attribution"),
        callbacks=[attribution],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsCNN(), digits_loader())

    assert attribution.artifact_path is not None, "the artifact is written at the end of training"
    artifact = load_attribution(attribution.artifact_path)
    print(f"artifact: {attribution.artifact_path}  ({trainer.global_step} optimizer steps)")
    print(f"{'group':<8}{'n_params':>9}{'mean norm':>11}{'max':>9}{'mean/sqrt(n)':>14}")
    scores = artifact.size_normalised()
    for name, n in artifact.groups.items():
        t = artifact.totals[name]
        print(f"{name:<8}{n:>9}{t.mean:>11.4f}{t.max:>9.4f}{scores[name]:>14.5f}")
    print("ranking by size-normalised norm:", " > ".join(name for name, _ in artifact.ranking()))
    print("per-epoch mean norm (epochs x groups):")
    print(artifact.history_tensor())
    ref = artifact.reference["bn2"]
    print(f"reference: bn2 output over {ref.count} positions, feature 0 mean {ref.mean[0]:.3f} var {ref.var[0]:.3f}")
    print("heatmap: TensorBoard's Images tab, attribution/heatmap (lightning_beta.figures.attribution_heatmap)")
    print(f"took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
