"""Diagnose and repair a broken layer: Localize, Diagnose, Treat, Verify on the digits ResNet.

Trains the small residual CNN on scikit-learn's digits, records reference activation statistics, plants a fault
in one layer group (noise, 3x the weights' std, in ``layer2``), then compares the paper's gradient localizer
with activation drift and repairs what drift flags by surgery, against fine-tuning every group for the same
epochs.

    python examples/04_diagnose_and_repair.py
"""

import logging
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_beta.demos.digits import DigitsClassifier, digits_dataloaders
from lightning_beta.diagnosis import activation_drift, attribute_errors, diagnose, reference_statistics

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def main() -> None:
    pl.seed_everything(0, verbose=False)
    train, val = digits_dataloaders(seed=0)
    model = DigitsClassifier("resnet", lr=0.1)
    pl.Trainer(max_epochs=8, **QUIET).fit(model, train)
    net = model.net.eval()
    plain_train = DataLoader(train.dataset, batch_size=512)
    reference = reference_statistics(net, plain_train)  # LayerAttributionCallback stores the same statistics

    broken = DigitsClassifier("resnet").net
    broken.load_state_dict(net.state_dict())
    with torch.no_grad():
        weight = broken.layer2.conv1.weight
        weight.add_(3 * torch.randn_like(weight) * weight.std())
    broken.eval()

    x, y = val.dataset.tensors
    with torch.no_grad():
        healthy, faulty = ((n(x).argmax(1) == y).float().mean().item() for n in (net, broken))
    print(f"validation accuracy: healthy {healthy:.4f}, with the planted fault {faulty:.4f}\n")
    print("Localize: the paper's gradient score of the misclassified samples")
    print(attribute_errors(broken, plain_train))
    print("\nLocalize: activation drift added by each group")
    print(activation_drift(broken, plain_train, reference))

    report = diagnose(
        broken, train, val, reference=reference, localize_dataloader=plain_train, max_epochs=2, baseline=True, **QUIET
    )
    print()
    print(report.to_markdown())
    print(f"flagged: {report.flagged}")


if __name__ == "__main__":
    main()
