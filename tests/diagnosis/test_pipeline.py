import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.diagnosis import diagnose, reference_statistics, scan_history


@dataclass
class Record:
    epoch: int
    group: str
    median_zeta: float
    regime: str


def setup_case(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    return net, data


def test_diagnose_repairs_a_planted_fault(tmp_path):
    net, data = setup_case()
    ref = reference_statistics(net, data)
    with torch.no_grad():
        net[2].weight.add_(torch.randn_like(net[2].weight) * 2 * net[2].weight.std())
    history = [Record(0, "pg0", 1.4, "overdamped"), {"epoch": 1, "group": "pg0", "regime": "critical"}]
    report = diagnose(
        net, data, data, history=history, reference=ref, top_k=1, max_epochs=3, lr=0.05, baseline=True,
        default_root_dir=tmp_path,
    )  # fmt: skip
    assert report.scores.method == "drift" and report.flagged == ["2"]
    assert report.surgery.layers == ["2"] and report.baseline.layers == ["0", "2", "4"]
    assert report.verification.net > 0 and report.verification.accuracy_after > report.verification.accuracy_before
    assert report.scan == {"n_records": 2, "regimes": {"overdamped": 1, "critical": 1}, "last": history[1]}
    assert report.compute["steps_fraction"] == 1.0  # same epochs: only wall time and parameters differ
    assert report.compute["params_fraction"] == pytest.approx(1056 / 1443)
    data_json = json.loads(report.to_json())
    assert data_json["flagged"] == ["2"] and data_json["surgery"]["optimizer_steps"] == 12
    md = report.to_markdown()
    for heading in ("## Scan", "## Localize (drift)", "## Diagnose", "## Treat and verify", "every group (baseline)"):
        assert heading in md
    assert torch.equal(report.model[0].weight, net[0].weight)


def test_nothing_to_treat_is_a_clear_result():
    net = nn.Linear(3, 3)
    with torch.no_grad():
        net.weight.copy_(10 * torch.eye(3))
        net.bias.zero_()
    data = DataLoader(TensorDataset(torch.eye(3), torch.arange(3)))
    report = diagnose(net, data, data, localizer="gradient", group_by={"all": [".*"]})
    assert report.flagged == [] and report.surgery is None and report.model is None
    assert "nothing treated: no misclassified sample" in report.message
    assert json.loads(report.to_json())["verification"] is None


def test_diagnose_bad_inputs():
    net, data = setup_case()
    with pytest.raises(
        ValueError, match="`localizer` must be one of 'auto', 'gradient', 'drift', 'kinetic', 'probe', got 'x'"
    ):
        diagnose(net, data, data, localizer="x")
    with pytest.raises(ValueError, match="no BatchNorm running statistics"):
        diagnose(net, data, data, localizer="drift")
    with pytest.raises(TypeError, match="records must be dicts or dataclasses, got int"):
        scan_history([1])


def faulty_case():
    net, data = setup_case()
    with torch.no_grad():
        net[2].weight.add_(torch.randn_like(net[2].weight) * 2 * net[2].weight.std())
    return net, data


def test_a_treatment_that_breaks_the_model_is_not_handed_back(tmp_path):
    net, data = faulty_case()
    report = diagnose(
        net, data, data, localizer="gradient", top_k=1, lr=1e4, momentum=0.9, default_root_dir=tmp_path
    )  # an lr of 1e4 certainly breaks it
    check = report.verification
    assert check.worse and check.net < 0 and check.accuracy_after < check.accuracy_before
    assert report.worse and report.model is net and report.surgery.model is not net
    assert "worse than its input" in report.message and "`report.model` is the input model" in report.message
    md = report.to_markdown()
    assert "**Worse**: the treated model is worse than its input" in md
    assert "**Worse**: the treated model makes more errors than its input" in check.to_markdown()
    data_json = json.loads(report.to_json())
    assert data_json["worse"] is True and data_json["returned_model"] == "input"
    assert data_json["verification"]["worse"] is True


def test_epochs_and_trainer_arguments(tmp_path):
    net, data = faulty_case()
    # Trainer arguments reach both fits; the epochs are diagnose's own ``max_epochs``.
    report = diagnose(
        net, data, data, localizer="gradient", top_k=1, max_epochs=2, baseline=True, limit_train_batches=3,
        default_root_dir=tmp_path,
    )  # fmt: skip
    assert (report.surgery.epochs, report.surgery.optimizer_steps) == (2, 6)
    assert (report.baseline.epochs, report.baseline.optimizer_steps) == (2, 6)
    assert not report.worse and report.model is report.surgery.model
    assert json.loads(report.to_json())["returned_model"] == "treated"
    message = "`epochs` is an argument of neither diagnose nor Trainer: the retraining epochs are `max_epochs=2`"
    with pytest.raises(TypeError, match=message):
        diagnose(net, data, data, epochs=2)
    with pytest.raises(TypeError, match="`trainer_kwargs` is an argument of neither diagnose nor Trainer: pass"):
        diagnose(net, data, data, trainer_kwargs={"max_epochs": 2})


def test_a_lightning_module_without_forward_is_refused_before_any_work():
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(4, 2)

    with pytest.raises(
        TypeError, match=r"`model` \(Lit\) defines no `forward`.*pass the network it holds, e.g. `lit.model`"
    ):
        diagnose(Lit(), [], [])


def test_a_model_whose_forward_does_not_take_the_inputs_is_refused_before_any_work():
    class TwoArguments(nn.Module):  # the shape of Lightning's demo Transformer: forward(inputs, target)
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 2)

        def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.body(inputs)

    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    with pytest.raises(TypeError, match=r"`model` cannot run a batch's inputs .*missing 1 required positional"):
        diagnose(TwoArguments(), data, data, localizer="gradient")
