import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.demos.digits import DigitsResNet, load_digits_tensors
from lightning_beta.diagnosis import (
    AttributionArtifact,
    GroupTotals,
    LayerScores,
    ReferenceStats,
    activation_drift,
    attribute_errors,
    reference_statistics,
)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def loader(n=96, dim=8, classes=3, seed=0, batch_size=32):
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, dim, generator=gen), torch.randint(0, classes, (n,), generator=gen)),
        batch_size=batch_size,
    )


def test_gradient_score_matches_hand_computation():
    net, data = mlp(), loader()
    scores = attribute_errors(net, data)
    x, y = data.dataset.tensors
    wrong = net(x).argmax(1) != y
    loss = nn.functional.cross_entropy(net(x[wrong]), y[wrong])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    expected = {
        "0": torch.cat([grads[0].flatten(), grads[1].flatten()]),
        "2": torch.cat([grads[2].flatten(), grads[3].flatten()]),
        "4": torch.cat([grads[4].flatten(), grads[5].flatten()]),
    }
    assert scores.n_misclassified == int(wrong.sum()) and scores.n_samples == 96
    for name, g in expected.items():
        assert scores.scores[name] == pytest.approx(g.norm().item() / math.sqrt(g.numel()), rel=1e-5)
    assert scores.details["ratio"]["4"] == pytest.approx(scores.scores["4"] / scores.details["correct"]["4"])


def test_gradient_score_names_the_dominating_group():
    # The first layer's gradient is proportional to the head's weights: a tiny head leaves the head on top.
    net = mlp()
    with torch.no_grad():
        net[4].weight.mul_(1e-3)
    assert attribute_errors(net, loader()).ranking[0] == "4"
    # The same function with inputs 1000x larger and first-layer weights 1000x smaller: the first layer's weight
    # gradient grows 1000-fold, nothing else changes.
    net, data = mlp(), loader()
    before = attribute_errors(net, data)
    with torch.no_grad():
        net[0].weight.mul_(1e-3)
    x, y = data.dataset.tensors
    scaled = attribute_errors(net, DataLoader(TensorDataset(x * 1e3, y), batch_size=32))
    assert scaled.ranking[0] == "0" and before.ranking[0] != "0"
    assert scaled.scores["4"] == pytest.approx(before.scores["4"], rel=1e-3)


def test_model_left_unchanged():
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    net.train()
    net[0].bias.requires_grad_(False)
    net[3].weight.grad = torch.full_like(net[3].weight, 7.0)
    state = copy.deepcopy(net.state_dict())
    scores = attribute_errors(net, loader())
    assert net.training and not net[0].bias.requires_grad and net[0].weight.requires_grad
    assert torch.equal(net[3].weight.grad, torch.full_like(net[3].weight, 7.0)) and net[0].weight.grad is None
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running statistics included: eval mode
    assert scores.scores["0"] > 0  # a frozen parameter's group is still scored


def test_no_misclassified_sample_is_a_result():
    net = nn.Linear(3, 3)
    with torch.no_grad():
        net.weight.copy_(10 * torch.eye(3))
        net.bias.zero_()
    data = DataLoader(TensorDataset(torch.eye(3), torch.arange(3)), batch_size=2)
    scores = attribute_errors(net, data, group_by={"all": [".*"]})
    assert scores.scores == {"all": 0.0} and scores.degenerate and scores.n_misclassified == 0
    assert "no misclassified sample" in scores.message


def test_empty_dataloader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="yielded no samples"):
        attribute_errors(mlp(), empty)
    with pytest.raises(ValueError, match="yielded no samples"):
        activation_drift(mlp(), empty, {"0": ReferenceStats([0.0] * 16, [1.0] * 16, 1)})


def test_bad_loss_fn():
    with pytest.raises(ValueError, match="one loss per sample"):
        attribute_errors(mlp(), loader(), loss_fn=lambda logits, y: nn.functional.cross_entropy(logits, y))


@pytest.mark.parametrize("victim", ["0", "2", "4"])
def test_drift_finds_a_planted_fault(victim):
    net, data = mlp(), loader(n=256)
    ref = reference_statistics(net, data)
    torch.manual_seed(1)
    with torch.no_grad():
        weight = net.get_submodule(victim).weight
        weight.add_(torch.randn_like(weight) * weight.std() * 2)
    scores = activation_drift(net, data, ref)
    assert scores.ranking[0] == victim
    healthy = activation_drift(mlp(), data, ref)
    assert max(healthy.scores.values()) < 1e-6


@pytest.fixture(scope="module")
def trained_resnet():
    train, _ = load_digits_tensors(seed=0)
    x, y = train.tensors[:512], None
    x, y = train.tensors[0][:512], train.tensors[1][:512]
    torch.manual_seed(0)
    net = DigitsResNet(width=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for _ in range(3):
        for i in range(0, 512, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    # A few passes without updates let the running statistics settle on the final weights.
    with torch.no_grad():
        for _ in range(20):
            net(x)
    return net, DataLoader(TensorDataset(x, y), batch_size=256)


def test_batchnorm_drift_finds_a_planted_conv_fault(trained_resnet):
    net, data = trained_resnet
    net = copy.deepcopy(net)
    torch.manual_seed(2)
    with torch.no_grad():
        net.layer2.conv1.weight.add_(torch.randn_like(net.layer2.conv1.weight) * net.layer2.conv1.weight.std())
    scores = activation_drift(net, data)  # BatchNorm running statistics as the reference
    assert scores.ranking[0] == "layer2"
    assert "bn1" in scores.message and "fc" in scores.message  # they feed no BatchNorm: unobservable
    assert scores.scores["bn1"] == 0.0


def test_drift_reference_from_another_model(trained_resnet):
    net, data = trained_resnet
    with pytest.raises(ValueError, match=r"different model: it names group\(s\) \['body'\]"):
        activation_drift(net, data, {"body": ReferenceStats([0.0], [1.0], 1)})
    with pytest.raises(ValueError, match=r"group 'fc' has 3 feature\(s\) \(dim 1\) in the reference but 10"):
        activation_drift(net, data, {"fc": ReferenceStats([0.0] * 3, [1.0] * 3, 1)})
    total = GroupTotals(1.0, 1.0, 1.0, 1, 0)
    artifact = AttributionArtifact(
        groups={"conv1": 1, "fc": 2}, parameters={}, history_epochs=[], history=[], history_total=[],
        totals={"conv1": total, "fc": total}, total=total, reference={"fc": ReferenceStats([0.0], [1.0], 1)},
    )  # fmt: skip
    with pytest.raises(ValueError, match="recorded on a different model: its groups"):
        activation_drift(net, data, artifact)


def test_drift_without_reference_or_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm running statistics"):
        activation_drift(mlp(), loader())
    with pytest.raises(TypeError, match="`reference` must be"):
        activation_drift(mlp(), loader(), reference=[1, 2])


def test_drift_with_artifact_reference(trained_resnet):
    net, data = trained_resnet
    ref = reference_statistics(net, data)
    sizes = {n: sum(p.numel() for p in net.get_submodule(n).parameters()) for n in ref}
    total = GroupTotals(1.0, 1.0, 1.0, 1, 0)
    artifact = AttributionArtifact(
        groups=sizes, parameters={}, history_epochs=[], history=[], history_total=[],
        totals=dict.fromkeys(sizes, total), total=total, reference=ref,
    )  # fmt: skip
    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.fc.weight.mul_(-1)
    assert activation_drift(bad, data, artifact).ranking[0] == "fc"


def test_layer_scores_table_and_dict():
    s = LayerScores({"a": 1.0, "b": 3.0}, "gradient", {"a": 4, "b": 9}, {"ratio": {"a": math.inf, "b": 2.0}})
    d = s.to_dict()
    assert d["ranking"] == ["b", "a"] and d["details"]["ratio"]["a"] is None
    assert str(s).splitlines()[2] == "| 1 | b | 9 | 3 | 2 |"
