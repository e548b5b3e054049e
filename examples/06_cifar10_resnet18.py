"""The paper's setting: ResNet-18 on CIFAR-10 with the beta schedule, the regime monitor and layer attribution.

For users with the data: ``--data DIR`` holds ``cifar-10-batches-py/`` (the python version of CIFAR-10, as
distributed by its authors); ``--download`` fetches it with torchvision instead (``pip install torchvision``).
The ResNet-18 is torchvision's when installed, otherwise an identical one built here (same layer names and
parameter count), so the seven layer groups are conv1, bn1, layer1..layer4, fc.

Run: ``python examples/06_cifar10_resnet18.py --data ~/data --epochs 30 [--constant] [--devices 2]``; add
``--fast-dev-run`` to check the wiring on a couple of batches. Training takes hours on a CPU: use a GPU.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback
from lightning_beta.demos.digits import BasicBlock

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    with path.open("rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    data = torch.tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32)
    labels = torch.tensor(batch[b"labels"], dtype=torch.long)
    return data, labels


def load_cifar10(root: Path, download: bool = False) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 from ``root/cifar-10-batches-py`` as normalised float tensors: (train, test).

    Raises:
        FileNotFoundError: if the batches are missing and ``download`` is off (or torchvision is missing).
    """
    folder = Path(root) / "cifar-10-batches-py"
    if not folder.is_dir() and download:
        try:
            from torchvision.datasets import CIFAR10
        except ModuleNotFoundError as err:
            raise FileNotFoundError("--download needs torchvision: pip install torchvision") from err
        CIFAR10(str(root), train=True, download=True)
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_files, folder / "test_batch"] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: pass --data DIR holding cifar-10-batches-py/ or --download")
    parts = [_read_batch(p) for p in train_files]
    x_train = torch.cat([x for x, _ in parts])
    y_train = torch.cat([y for _, y in parts])
    x_test, y_test = _read_batch(folder / "test_batch")

    def normalise(x: Tensor) -> Tensor:
        return (x.float() / 255.0 - MEAN) / STD

    return TensorDataset(normalise(x_train), y_train), TensorDataset(normalise(x_test), y_test)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (conv1, bn1, layer1..layer4, fc); ``cifar_stem`` uses a 3x3 stem, no max-pool."""

    def __init__(self, num_classes: int = 10, cifar_stem: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) if cifar_stem else nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool: nn.Module = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        widths, c_in = (64, 128, 256, 512), 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            self.add_module(f"layer{i}", nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width)))
            c_in = width
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        return self.fc(out.mean(dim=(2, 3)))


def build_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR stem when torchvision is installed, else :class:`ResNet18`."""
    try:
        from torchvision.models import resnet18
    except ModuleNotFoundError:
        return ResNet18(num_classes)
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class CIFARModule(pl.LightningModule):
    """ResNet-18 classifier with SGD (momentum 0.9, weight decay 5e-4) and a per-step cosine lr."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_resnet18()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.training:  # random crop (pad 4) and horizontal flip, on the device
            x = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
            i, j = torch.randint(0, 9, (2,)).tolist()
            x = x[:, :, i : i + 32, j : j + 32]
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--constant", action="store_true", help="constant momentum 0.9 instead of the beta schedule")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--out", type=Path, default=Path("lightning_beta_runs"))
    parser.add_argument("--fast-dev-run", action="store_true", help="two batches, to check the wiring")
    args = parser.parse_args(argv)
    train, test = load_cifar10(args.data, args.download)
    callbacks: list[pl.Callback] = [DampingRegimeMonitor(), LayerAttributionCallback()]
    if not args.constant:
        callbacks.insert(0, BetaMomentumCallback())
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        callbacks=callbacks,
        logger=TensorBoardLogger(args.out, name="cifar10_resnet18", version="constant" if args.constant else "beta"),
        fast_dev_run=2 if args.fast_dev_run else False,
    )
    trainer.fit(
        CIFARModule(args.lr),
        DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=2),
        DataLoader(test, batch_size=512, num_workers=2),
    )
    print(f"done: tensorboard --logdir {args.out.resolve()}")


if __name__ == "__main__":
    main()
