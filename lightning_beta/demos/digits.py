"""Bundled-data workloads: scikit-learn's handwritten digits, a small residual CNN and an MLP.

The demo, the examples and the benchmarks train these, so every number the project reports comes from data that
ships with a package (no download). Needs the ``demo`` extra (scikit-learn).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

Arch = Literal["resnet", "mlp"]
OptimizerName = Literal["sgd", "nesterov", "adam"]
Schedule = Literal["cosine", "onecycle", "constant"]


def load_digits_tensors(seed: int = 0, val_fraction: float = 0.25) -> tuple[TensorDataset, TensorDataset]:
    """The 1797 8x8 digits as ``(N, 1, 8, 8)`` float images in ``[0, 1]`` and labels, split train/validation.

    Args:
        seed: seed of the split. Defaults to ``0``.
        val_fraction: share of the samples held out, in ``(0, 1)``. Defaults to ``0.25``.

    Raises:
        ValueError: if ``val_fraction`` is outside ``(0, 1)``.
        ModuleNotFoundError: if scikit-learn is not installed (``pip install lightning_beta[demo]``).
    """
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
        raise ModuleNotFoundError("the digits need scikit-learn: pip install 'lightning_beta[demo]'") from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def digits_dataloaders(
    batch_size: int = 64, seed: int = 0, val_fraction: float = 0.25, split_seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over the digits.

    The split depends on ``split_seed`` only, so runs with different ``seed`` are compared on the same validation
    set; ``seed`` drives the shuffling. The last partial training batch is dropped: a batch of 4 samples (1348 =
    21 x 64 + 4) would upset BatchNorm's running statistics once per epoch.

    Args:
        batch_size: training batch size. Defaults to ``64``.
        seed: seed of the shuffling. Defaults to ``0``.
        val_fraction: share held out for validation. Defaults to ``0.25``.
        split_seed: seed of the train/validation split. Defaults to ``0``.
    """
    train, val = load_digits_tensors(split_seed, val_fraction)
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True),
        DataLoader(val, batch_size=512),
    )


class DigitsDataModule(pl.LightningDataModule):
    """The digits as a ``LightningDataModule`` (for ``LightningCLI`` configs).

    Args:
        batch_size: training batch size. Defaults to ``64``.
        seed: seed of the split and the shuffling. Defaults to ``0``.
        val_fraction: share held out for validation. Defaults to ``0.25``.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, val_fraction: float = 0.25) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction

    def train_dataloader(self) -> DataLoader:
        return digits_dataloaders(self.batch_size, self.seed, self.val_fraction)[0]

    def val_dataloader(self) -> DataLoader:
        return digits_dataloaders(self.batch_size, self.seed, self.val_fraction)[1]


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with BatchNorm and a projected shortcut when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A ResNet-style CNN for 8x8 digits with six layer groups: conv1, bn1, layer1, layer2, layer3, fc."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(out.mean(dim=(2, 3)))


class DigitsMLP(nn.Module):
    """A three-layer MLP without normalisation, groups fc1, fc2, fc3."""

    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(out)))


def build_network(arch: Arch) -> nn.Module:
    """``"resnet"`` (:class:`DigitsResNet`) or ``"mlp"`` (:class:`DigitsMLP`)."""
    if arch == "resnet":
        return DigitsResNet()
    if arch == "mlp":
        return DigitsMLP()
    raise ValueError(f'`arch` must be "resnet" or "mlp", got {arch!r}')


class DigitsClassifier(pl.LightningModule):
    """Classifier of the digits whose optimizer and lr schedule are named by arguments.

    The network is ``self.net``; the ``"auto"`` layer groups descend into it (``net.conv1``, ..., ``net.fc``).

    Args:
        arch: ``"resnet"`` or ``"mlp"``. Defaults to ``"resnet"``.
        optimizer: ``"sgd"`` (heavy ball), ``"nesterov"`` or ``"adam"``. Defaults to ``"sgd"``.
        lr: peak learning rate. Defaults to ``0.1``.
        momentum: SGD momentum or Adam ``beta1`` at the start. Defaults to ``0.9``.
        weight_decay: L2 penalty of the SGD variants (Adam runs without). Defaults to ``5e-4``.
        schedule: ``"cosine"`` (per step, from ``lr`` to 0), ``"onecycle"`` (with cyclic momentum 0.85-0.95)
            or ``"constant"``. Defaults to ``"cosine"``.
    """

    def __init__(
        self,
        arch: Arch = "resnet",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Schedule = "cosine",
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "nesterov", "adam"):
            raise ValueError(f'`optimizer` must be "sgd", "nesterov" or "adam", got {optimizer!r}')
        if schedule not in ("cosine", "onecycle", "constant"):
            raise ValueError(f'`schedule` must be "cosine", "onecycle" or "constant", got {schedule!r}')
        self.save_hyperparameters()
        self.net = build_network(arch)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        # Reduced over ranks, so that every process of a multi-device run sees the same accuracy.
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        optimizer: torch.optim.Optimizer
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=(hp.momentum, 0.999))
        else:
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                weight_decay=hp.weight_decay,
                nesterov=hp.optimizer == "nesterov",
            )
        if hp.schedule == "constant":
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler: Any
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
