import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.demos.digits import DigitsClassifier, DigitsMLP, DigitsResNet, load_digits_tensors
from lightning_beta.diagnosis import diagnose, kinetic_energy_probe, kinetic_energy_scores, surgical_correction
from tests.helpers import StepRecorder, trainer_kwargs


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits_tensors(seed=0)
    x, y = train.tensors[0][:128], train.tensors[1][:128]
    return DataLoader(TensorDataset(x, y), batch_size=32)


def quiet(tmp_path, **kw):
    kwargs = trainer_kwargs(tmp_path, **kw)
    kwargs.pop("max_epochs")
    kwargs.pop("limit_train_batches")
    return kwargs


def test_surgery_changes_only_the_flagged_group(tmp_path, digits):
    torch.manual_seed(0)
    net = DigitsResNet(width=4)
    original = copy.deepcopy(net.state_dict())
    result = surgical_correction(net, ["layer2"], digits, max_epochs=1, **quiet(tmp_path))
    after = result.model.state_dict()
    for key, value in original.items():
        if key.startswith("layer2."):
            continue
        assert torch.equal(after[key], value), key  # frozen parameters and BatchNorm buffers bit-identical
    assert not torch.equal(after["layer2.conv1.weight"], original["layer2.conv1.weight"])
    assert not torch.equal(after["layer2.bn1.running_mean"], original["layer2.bn1.running_mean"])
    for key, value in net.state_dict().items():
        assert torch.equal(value, original[key])  # the input model is untouched
    layer2 = sum(p.numel() for p in net.layer2.parameters())
    assert result.n_params_trained == layer2
    assert result.fraction_trained == pytest.approx(layer2 / sum(p.numel() for p in net.parameters()))
    assert result.optimizer_steps == 4 and result.epochs == 1 and result.wall_time_s > 0
    assert all(p.requires_grad for p in result.model.parameters())
    assert result.model.training == net.training


def test_beta_and_constant_momentum(tmp_path, digits):
    net = DigitsResNet(width=4)
    recorder = StepRecorder()
    surgical_correction(net, ["fc"], digits, lr=0.04, callbacks=[recorder], **quiet(tmp_path))
    assert recorder.momenta()[0] == pytest.approx(1 - 2 * 0.04**0.5)  # critical damping at the first lr
    recorder = StepRecorder()
    surgical_correction(net, ["fc"], digits, momentum=0.5, callbacks=[recorder], **quiet(tmp_path))
    assert recorder.momenta() == [0.5] * 4


def test_parameter_selection_spends_the_same_budget(tmp_path, digits):
    torch.manual_seed(0)
    net = DigitsResNet(width=4)
    result = surgical_correction(net, ["layer1"], digits, selection="parameters", **quiet(tmp_path))
    budget = sum(p.numel() for p in net.layer1.parameters())
    assert result.n_params_trained == budget and result.selection == "parameters"
    before, after = dict(net.named_parameters()), dict(result.model.named_parameters())
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    assert 0 < changed <= budget
    touched = set(result.groups_touched)
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d) and name.split(".")[0] not in touched:
            assert torch.equal(module.running_mean, result.model.get_submodule(name).running_mean), name


def test_lightning_module_input(tmp_path, digits):
    model = DigitsClassifier("mlp")
    result = surgical_correction(model, ["net.fc3"], digits, **quiet(tmp_path))
    assert isinstance(result.model, DigitsClassifier)
    assert torch.equal(result.model.net.fc1.weight, model.net.fc1.weight)
    assert not torch.equal(result.model.net.fc3.weight, model.net.fc3.weight)


def test_surgery_bad_inputs(digits):
    net = DigitsResNet(width=4)
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['head'\]; the model's groups are \['conv1', 'bn1'"):
        surgical_correction(net, ["fc", "head"], digits)
    with pytest.raises(ValueError, match="`layers` is empty"):
        surgical_correction(net, [], digits)
    with pytest.raises(ValueError, match="`selection` must be one of 'layers', 'parameters', got 'weights'"):
        surgical_correction(net, ["fc"], digits, selection="weights")
    with pytest.raises(ValueError, match=r'`momentum` must be "beta" or a float in \[0, 1\), got 1.5'):
        surgical_correction(net, ["fc"], digits, momentum=1.5)
    with pytest.raises(ValueError, match="`max_epochs` must be >= 1, got 0"):
        surgical_correction(net, ["fc"], digits, max_epochs=0)
    with pytest.raises(ValueError, match=r"`lr` must be in \(0.0, inf\], got -1.0"):
        surgical_correction(net, ["fc"], digits, lr=-1.0)
    with pytest.raises(ValueError, match=r"`weight_decay` must be in \[0.0, inf\], got -0.1"):
        surgical_correction(net, ["fc"], digits, weight_decay=-0.1)
    with pytest.raises(TypeError, match="`epochs` is an argument of neither surgical_correction nor Trainer: the"):
        surgical_correction(net, ["fc"], digits, epochs=2)


def test_kinetic_energy_golden():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(5, 2)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step()  # the first buffer is the gradient
    scores = kinetic_energy_scores(opt, net)
    assert scores.scores["0"] == pytest.approx(float(grads[0].pow(2).sum() + grads[1].pow(2).sum()) / 9)
    assert scores.scores["1"] == pytest.approx(float(grads[2].pow(2).sum() + grads[3].pow(2).sum()) / 4)
    assert kinetic_energy_scores(opt.state_dict(), net).scores == pytest.approx(scores.scores)


def test_kinetic_energy_bad_inputs():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="holds no momentum buffer"):
        kinetic_energy_scores(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    with pytest.raises(ValueError, match="indexes parameter 9 but the model has 4 parameters"):
        kinetic_energy_scores({"state": {9: {"momentum_buffer": torch.ones(1)}}, "param_groups": []}, net)
    with pytest.raises(TypeError, match="must be a torch optimizer or its state_dict"):
        kinetic_energy_scores(3, net)


def test_kinetic_energy_probe_leaves_model_alone(digits):
    net = DigitsResNet(width=4)
    state = copy.deepcopy(net.state_dict())
    scores = kinetic_energy_probe(net, digits, steps=2)
    assert set(scores.scores) == {"conv1", "bn1", "layer1", "layer2", "layer3", "fc"}
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_masked_weight_decay_once_per_optimizer_step(tmp_path):
    # Two micro-batches accumulated into one optimizer step: the decay enters once, not once per backward.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    lr, wd = 0.1, 0.5
    result = surgical_correction(
        net, ["1"], data, lr=lr, momentum=0.0, selection="parameters", weight_decay=wd,
        accumulate_grad_batches=2, **quiet(tmp_path),
    )  # fmt: skip
    assert result.optimizer_steps == 1  # at the first step the cosine lr is the peak lr
    params = list(net.parameters())
    loss = sum(nn.functional.cross_entropy(net(x[i : i + 4]), y[i : i + 4]) for i in (0, 4)) / 2
    grads = torch.autograd.grad(loss, params)
    changed = 0
    for old, new, g in zip(params, result.model.parameters(), grads):
        moved = new != old
        changed += int(moved.sum())
        expected = old - lr * (g + wd * old)  # one decay term per optimizer step
        assert torch.allclose(new[moved], expected[moved], atol=1e-6)
    assert changed == result.n_params_trained == 12  # the budget: the 12 parameters of group "1"


class CountingLoader:
    """An iterable of ``n`` batches that counts how many were drawn."""

    def __init__(self, n):
        gen = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(4, 2, generator=gen), torch.randint(0, 2, (4,), generator=gen)) for _ in range(n)]
        self.drawn = 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch


def test_kinetic_probe_draws_only_the_batches_it_uses():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    long = CountingLoader(50)
    kinetic_energy_probe(net, long, steps=3)
    assert long.drawn == 3
    short = CountingLoader(2)
    kinetic_energy_probe(net, short, steps=5)
    assert short.drawn == 5  # re-iterated


def test_kinetic_probe_takes_a_loss_fn():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    calls = []

    def squared_error(logits, targets):
        calls.append(logits.shape)
        return (logits - nn.functional.one_hot(targets, 2).float()).pow(2).sum(1)

    data = CountingLoader(4)
    scores = kinetic_energy_probe(net, data, steps=1, lr=0.1, momentum=0.9, loss_fn=squared_error)
    assert calls == [torch.Size([4, 2])]
    x, y = data.batches[0]
    grads = torch.autograd.grad(squared_error(net(x), y).mean(), list(net.parameters()))
    # After one step the momentum buffer is the gradient of the mean loss.
    assert scores.scores["1"] == pytest.approx(float(grads[2].pow(2).sum() + grads[3].pow(2).sum()) / 8, rel=1e-5)


# The search policy: real fits on the digits MLP, each choice checked against what the fits did.


@pytest.fixture(scope="module")
def digits_full():
    train, val = load_digits_tensors(seed=0)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return loader, val


@pytest.fixture(scope="module")
def clean_mlp(digits_full, tmp_path_factory):
    """A DigitsMLP trained from scratch on every group: the model, its accuracy and full retraining's steps."""
    train, val = digits_full
    torch.manual_seed(0)
    net = DigitsMLP(hidden=32)
    groups = ["fc1", "fc2", "fc3"]
    kwargs = search_kwargs(tmp_path_factory.mktemp("scratch"))
    full = surgical_correction(net, groups, train, max_epochs=10, lr=0.1, momentum=0.9, **kwargs)
    return full.model.eval(), accuracy(full.model, val), full.optimizer_steps


def search_kwargs(tmp_path, **kw):
    kwargs = quiet(tmp_path, **kw)
    kwargs.pop("limit_val_batches")  # the continuation validates on the held-out split
    return kwargs


def accuracy(net, data):
    net.eval()
    with torch.no_grad():
        return float((net(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean())


def kill(net, group):
    """A fault beyond repair by retraining: every ReLU after ``group`` is dead, so its gradient is exactly zero."""
    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.get_submodule(group).bias.fill_(-100.0)
    return bad


def test_search_reinitialises_a_dead_group_and_recovers(tmp_path, digits_full, clean_mlp):
    train, val = digits_full
    clean, clean_acc, full_steps = clean_mlp
    bad = kill(clean, "fc1")
    faulty_acc = accuracy(bad, val)
    assert faulty_acc < 0.2  # a constant prediction
    recorder = StepRecorder()
    result = surgical_correction(
        bad, ["fc1"], train, policy="search", full_steps=full_steps, callbacks=[recorder], **search_kwargs(tmp_path)
    )
    search = [s for s in result.stages if s["stage"] == "search"]
    assert [s["lr"] for s in search[:3]] == result.lrs_tried == [0.01, 0.05, 0.2]
    # From the dead weights the gradient is zero: every lr leaves the held-out loss where the input had it.
    for s in search[:3]:
        assert s["holdout_loss"] == pytest.approx(result.holdout_loss["input"])
    assert search[3]["reinit"] and search[3]["holdout_loss"] < result.holdout_loss["input"]
    assert result.reinit and result.widened_to == [] and result.groups_touched == ["fc1"]
    assert result.stages[-1]["stage"] == "continue"
    recovered = accuracy(result.model, val)
    assert recovered >= faulty_acc + 0.8 * (clean_acc - faulty_acc)  # >= 80% of the lost accuracy (measured: 88%)
    # fc2 and fc3 frozen: bit-identical to the input.
    for name in ("fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"):
        assert torch.equal(result.model.state_dict()[name], bad.state_dict()[name])
    # The budget, against an independent count of the optimizer steps every stage took.
    assert result.budget_steps == int(0.3 * full_steps)
    assert len(recorder.steps) == result.optimizer_steps == sum(s["optimizer_steps"] for s in result.stages)
    assert result.optimizer_steps <= 0.3 * full_steps


def test_search_widens_when_the_flagged_group_cannot_improve(tmp_path, digits_full, clean_mlp):
    # fc2's ReLUs are dead, fc1 is flagged: neither retraining fc1 nor resetting it moves the held-out loss.
    train, _ = digits_full
    clean, _, full_steps = clean_mlp
    bad = kill(clean, "fc2")
    result = surgical_correction(bad, ["fc1"], train, policy="search", full_steps=full_steps, **search_kwargs(tmp_path))
    assert result.widened_to == ["fc2"] and result.groups_touched == ["fc1", "fc2"] and not result.reinit
    assert result.stages[-1]["groups"] == ["fc1", "fc2"]
    assert result.holdout_loss["final"] <= result.holdout_loss["input"]  # the best weights seen, the input's included
    assert result.optimizer_steps <= result.budget_steps


@pytest.mark.parametrize("budget", [0.1, 0.5])
def test_search_never_exceeds_its_budget(tmp_path, digits_full, clean_mlp, budget):
    train, _ = digits_full
    clean, _, full_steps = clean_mlp
    recorder = StepRecorder()
    bad = kill(clean, "fc3")
    result = surgical_correction(
        bad, ["fc3"], train, policy="search", budget=budget, full_steps=full_steps, callbacks=[recorder],
        **search_kwargs(tmp_path),
    )  # fmt: skip
    assert len(recorder.steps) == result.optimizer_steps <= budget * full_steps
    assert result.to_dict()["policy"] == "search" and result.to_dict()["budget_steps"] == int(budget * full_steps)


def test_fixed_policy_capped_by_the_budget(tmp_path, digits):
    net = DigitsResNet(width=4)
    result = surgical_correction(net, ["fc"], digits, max_epochs=3, budget=0.5, full_steps=10, **quiet(tmp_path))
    assert result.optimizer_steps == result.budget_steps == 5 and result.policy == "fixed" and result.stages == []


def test_search_bad_inputs(digits):
    net = DigitsResNet(width=4)
    with pytest.raises(ValueError, match="`policy` must be one of 'fixed', 'search', got 'best'"):
        surgical_correction(net, ["fc"], digits, policy="best")
    with pytest.raises(ValueError, match='`full_steps` is required with policy="search"'):
        surgical_correction(net, ["fc"], digits, policy="search")
    with pytest.raises(ValueError, match=r"`budget` must be in \(0.0, 1.0\], got 0"):
        surgical_correction(net, ["fc"], digits, policy="search", budget=0, full_steps=10)
    with pytest.raises(ValueError, match=r"`budget` must be in \(0.0, 1.0\], got 1.5"):
        surgical_correction(net, ["fc"], digits, budget=1.5, full_steps=10)
    with pytest.raises(ValueError, match="`full_steps` must be >= 1, got 0"):
        surgical_correction(net, ["fc"], digits, policy="search", full_steps=0)
    with pytest.raises(ValueError, match=r"`budget` \* `full_steps` = 3 optimizer step\(s\) cannot hold the search"):
        surgical_correction(net, ["fc"], digits, policy="search", full_steps=10)
    with pytest.raises(ValueError, match=r"`holdout` must be in \(0.0, 1.0\), got 1.0"):
        surgical_correction(net, ["fc"], digits, policy="search", full_steps=100, holdout=1.0)
    with pytest.raises(ValueError, match="`lrs` is empty"):
        surgical_correction(net, ["fc"], digits, policy="search", full_steps=100, lrs=[])
    with pytest.raises(ValueError, match=r"`lrs` must be in \(0.0, inf\], got -1.0"):
        surgical_correction(net, ["fc"], digits, policy="search", full_steps=100, lrs=[0.1, -1.0])
    with pytest.raises(ValueError, match="`selection` must be \"layers\", got 'parameters'"):
        surgical_correction(net, ["fc"], digits, policy="search", full_steps=100, selection="parameters")
    batches = list(digits)
    with pytest.raises(TypeError, match="must be a DataLoader over a sized dataset, got list"):
        surgical_correction(net, ["fc"], batches, policy="search", full_steps=100)


def test_diagnose_search_takes_the_baseline_steps_as_budget_unit(tmp_path, digits):
    torch.manual_seed(0)
    net = DigitsResNet(width=4)
    report = diagnose(
        net, digits, digits, localizer="gradient", top_k=1, policy="search", baseline=True, baseline_epochs=10,
        **search_kwargs(tmp_path),
    )  # fmt: skip
    assert report.baseline.optimizer_steps == 40
    assert report.surgery.policy == "search" and report.surgery.budget_steps == 12
    assert report.surgery.optimizer_steps <= 12
    text = report.to_markdown()
    assert "policy search: lr" in text and "| search |" in text
    assert report.to_dict()["surgery"]["stages"] == report.surgery.stages
