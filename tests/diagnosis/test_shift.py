"""Auto-RGN's multipliers against hand-computed values, and the recommendation on a real tiny shift."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.demos.digits import DigitsMLP, load_digits_tensors
from lightning_beta.diagnosis.shift import (
    ShiftRecommendation,
    accuracy,
    auto_rgn,
    fine_tune,
    recommend_groups,
    relative_gradient_norms,
    rgn_multipliers,
)


def test_rgn_multipliers_golden() -> None:
    # ratios 2/1 = 2, 1/2 = 0.5, 3/6 = 0.5 -> divided by the largest
    out = rgn_multipliers({"a": 2.0, "b": 1.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "c": 6.0})
    assert out == {"a": 1.0, "b": 0.25, "c": 0.25}
    # a zero-norm tensor is not scaled down; no gradient at all gives zeros
    assert rgn_multipliers({"a": 1.0, "z": 0.5}, {"a": 4.0, "z": 0.0}) == {"a": 1.0, "z": 1.0}
    assert rgn_multipliers({"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 1.0}) == {"a": 0.0, "b": 0.0}


def _hand_model() -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    # W = I, b = (0, 1), x = (1, 0), y = 0: logits (1, 1), softmax (1/2, 1/2), dL/dlogits = (-1/2, 1/2).
    # grad W = [[-1/2, 0], [1/2, 0]]: ||g|| = 1/sqrt(2), ||W|| = sqrt(2) -> 1/2.
    # grad b = (-1/2, 1/2): ||g|| = 1/sqrt(2), ||b|| = 1 -> 1/sqrt(2). Multipliers: W 1/sqrt(2), b 1.
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
        net.bias.copy_(torch.tensor([0.0, 1.0]))
    return net, [(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))]


def test_relative_gradient_norms_golden() -> None:
    net, data = _hand_model()
    norms = relative_gradient_norms(net, data)
    assert norms == pytest.approx({"weight": 0.5, "bias": 1 / math.sqrt(2)})
    assert net.weight.grad is None  # the model's gradients are left as they were


def test_auto_rgn_step_uses_the_multipliers() -> None:
    # Adam's first step moves each entry by lr * sign(g) (m / sqrt(v) = g / |g|), times the tensor's multiplier.
    net, data = _hand_model()
    result = auto_rgn(net, data, steps=1, lr=0.1)
    assert result.multipliers == pytest.approx({"weight": 1 / math.sqrt(2), "bias": 1.0})
    step_w = 0.1 / math.sqrt(2)
    expected_w = torch.tensor([[1.0 + step_w, 0.0], [-step_w, 1.0]])
    torch.testing.assert_close(result.model.weight, expected_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.model.bias, torch.tensor([0.1, 0.9]), atol=1e-6, rtol=0)
    torch.testing.assert_close(net.weight, torch.eye(2))  # the input model is not modified


def test_fine_tune_trains_only_the_chosen_group_and_freezes_batchnorm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(16, 4) + 2.0, torch.randint(0, 3, (16,)))]
    result = fine_tune(net, data, ["3"], steps=4, lr=0.01)
    tuned = result.model
    assert torch.equal(tuned[0].weight, net[0].weight)
    assert torch.equal(tuned[1].running_mean, net[1].running_mean)  # frozen BatchNorm kept in eval mode
    assert not torch.equal(tuned[3].weight, net[3].weight)
    assert (result.n_params_trained, result.optimizer_steps) == (27, 4)


def test_fine_tune_rejects_unknown_groups() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    data = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="head"):
        fine_tune(net, data, ["head"], steps=1)
    with pytest.raises(ValueError, match="`groups` is empty"):
        fine_tune(net, data, [], steps=1)


def test_recommend_groups_needs_two_batches_without_holdout() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    data = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="at least two batches"):
        recommend_groups(net, data)


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """An MLP trained on the clean half of the digits, and the other half to shift."""
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    source, target = load_digits_tensors(seed=0, val_fraction=0.5)
    net = DigitsMLP(hidden=64)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = DataLoader(source, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(8):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net.eval(), source, target


def _shifted(target: TensorDataset, invert: bool = False, cycle: bool = False) -> tuple[DataLoader, DataLoader]:
    x, y = target.tensors
    if invert:
        x = 1.0 - x
    if cycle:  # classes 0 -> 1 -> 2 -> 3 -> 0, the others kept
        table = torch.arange(10)
        table[:4] = torch.tensor([1, 2, 3, 0])
        y = table[y]
    gen = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=32, shuffle=True, generator=gen)
    held = DataLoader(TensorDataset(x[400:], y[400:]), batch_size=512)
    return train, held


def _check_choice_rule(rec: ShiftRecommendation, tolerance: float = 0.02) -> None:
    # The smallest probed group within `tolerance` of the best probe, recomputed from the reported scores.
    best = max(rec.probe.values())
    eligible = [g for g in rec.candidates if rec.probe[g] >= best - tolerance]
    assert rec.groups == [min(eligible, key=lambda g: (rec.n_params[g], -rec.probe[g]))]
    assert rec.optimizer_steps == 10 * len(rec.candidates)


def test_label_permutation_has_no_drift_and_probes_the_head_first(digits_mlp) -> None:
    net, source, target = digits_mlp
    train, held = _shifted(target, cycle=True)
    before = {n: p.clone() for n, p in net.state_dict().items()}
    rec = recommend_groups(net, train, DataLoader(source, batch_size=512), held, probe_steps=10)
    assert rec.kind == "label"
    assert max(rec.drift.values()) < 0.25
    assert rec.candidates[0] == "fc3"
    _check_choice_rule(rec)
    assert all(torch.equal(before[n], p) for n, p in net.state_dict().items())  # the model is not modified
    tuned = fine_tune(net, train, rec.groups, steps=100, lr=1e-2).model
    assert accuracy(tuned, held) > accuracy(net, held) + 0.1


def test_inversion_drifts_at_the_first_group_which_is_probed_with_its_reader(digits_mlp) -> None:
    net, source, target = digits_mlp
    train, held = _shifted(target, invert=True)
    rec = recommend_groups(net, train, DataLoader(source, batch_size=512), held, probe_steps=10)
    assert rec.kind == "input"
    assert max(rec.drift, key=lambda g: rec.drift[g]) == "fc1"
    assert "fc1" in rec.candidates and "fc2" in rec.candidates  # the drifting group and its reader
    _check_choice_rule(rec)
