"""restore_from_probe: a faulty group fitted back to the function its probe record holds."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_beta.diagnosis.restore import restore_from_probe
from lightning_beta.probe import record_probe


def _scaled(net: nn.Module, name: str, factor: float) -> nn.Module:
    bad = copy.deepcopy(net)
    with torch.no_grad():
        for p in bad.get_submodule(name).parameters():
            p.mul_(factor)
    return bad


def test_a_linear_layer_is_recovered_exactly():
    # One Linear layer, 32 probes, a sketch wider than its 3 outputs: the least-squares fit has one solution, the
    # healthy weights, which the test knows without the function under test.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    record = record_probe(net, torch.randn(32, 4), sketch_dim=8)
    bad = _scaled(net, "0", 2.5)
    result = restore_from_probe(bad, ["0"], record, max_iter=100)
    torch.testing.assert_close(result.model[0].weight, net[0].weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.model[0].bias, net[0].bias, atol=1e-4, rtol=0)
    stage = result.stages[0]
    assert stage["probe_error"]["input"] == pytest.approx(1.5, rel=1e-4)  # ||2.5 y - y|| / ||y||
    assert stage["probe_error"]["final"] < 1e-4
    assert stage["method"] == "least squares"  # a plain Linear group has a closed-form fit
    assert result.policy == "restore" and result.optimizer_steps == 0
    assert result.n_params_trained == 15 and result.fraction_trained == 1.0


def _bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 5),
    )
    net.train()
    with torch.no_grad():  # running statistics that are not the defaults
        for _ in range(3):
            net(torch.randn(16, 1, 6, 6))
    return net.eval()


def test_restore_touches_only_the_group_and_leaves_the_input_alone():
    net = _bn_cnn()
    x = torch.randn(128, 1, 6, 6)
    record = record_probe(net, x, sketch_dim=64)
    bad = _scaled(net, "1", 3.0)
    bad.train()  # the caller's flags are kept
    before = {k: v.clone() for k, v in bad.state_dict().items()}
    result = restore_from_probe(bad, ["1"], record)
    assert all(torch.equal(v, bad.state_dict()[k]) for k, v in before.items())  # input unchanged
    treated = result.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, treated[k])}
    assert changed and all(k.startswith("1.") for k in changed)
    assert not any("running" in k or "num_batches" in k for k in changed)  # buffers are not fitted
    assert all(m.training for m in result.model.modules())
    assert all(p.grad is None for p in result.model.parameters())
    # The function is back on inputs the probe never saw.
    fresh = torch.randn(64, 1, 6, 6)
    with torch.no_grad():
        clean_out, bad_out, fixed_out = net(fresh), bad.eval()(fresh), result.model.eval()(fresh)
    assert (fixed_out - clean_out).norm() < 0.1 * (bad_out - clean_out).norm()


def test_two_groups_are_restored_in_forward_order():
    net = _bn_cnn()
    # 512 probes x 5 outputs pin down the head's 1085 parameters; 128 probes would not (see the module docstring).
    record = record_probe(net, torch.randn(512, 1, 6, 6), sketch_dim=64, max_samples=512)
    bad = _scaled(_scaled(net, "0", 0.3), "3", 2.0)
    result = restore_from_probe(bad, ["3", "0"], record, max_iter=200)
    assert [s["groups"] for s in result.stages] == [["0"], ["3"]]
    assert [s["method"] for s in result.stages] == ["L-BFGS", "least squares"]
    assert all(s["probe_error"]["final"] < 0.05 for s in result.stages)
    fresh = torch.randn(64, 1, 6, 6)
    with torch.no_grad():
        clean_out, bad_out, fixed_out = net(fresh), bad(fresh), result.model(fresh)
    assert (fixed_out - clean_out).norm() < 0.05 * (bad_out - clean_out).norm()


def test_a_hugging_face_block_on_dict_inputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    net = transformers.GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (96, 8)), "attention_mask": torch.ones(96, 8, dtype=torch.long)}
    record = record_probe(net, inputs, sketch_dim=128)
    name = "transformer.h.1"  # receives a key-value cache object: restored through the model, not replayed
    assert name in record.order
    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.get_submodule(name).mlp.c_proj.weight.mul_(4.0)
    result = restore_from_probe(bad, [name], record)
    stage = result.stages[0]
    assert stage["probe_error"]["final"] < 0.1 * stage["probe_error"]["input"]
    fresh = {"input_ids": torch.randint(0, 64, (32, 8))}
    with torch.no_grad():
        clean, broken, fixed = (m(**fresh).logits for m in (net, bad, result.model))
    assert (fixed - clean).norm() < 0.2 * (broken - clean).norm()


def test_bad_arguments_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    record = record_probe(net, torch.randn(16, 4), sketch_dim=4)
    with pytest.raises(ValueError, match=r"`layers` names unknown group\(s\) \['head'\]"):
        restore_from_probe(net, ["head"], record)
    with pytest.raises(ValueError, match="`max_iter` must be"):
        restore_from_probe(net, ["0"], record, max_iter=0)
    with pytest.raises(TypeError, match="`forward` must be None or a callable"):
        restore_from_probe(net, ["0"], record, forward=3)


def test_frozen_parameters_stay_frozen_and_unchanged():
    net = _bn_cnn()
    record = record_probe(net, torch.randn(128, 1, 6, 6), sketch_dim=64)
    bad = _scaled(net, "1", 2.0)
    bad[1][0].bias.requires_grad_(False)  # the user froze one tensor of the group
    bad[3].weight.requires_grad_(False)  # and one of another group
    result = restore_from_probe(bad, ["1"], record)
    model = result.model
    assert torch.equal(model[1][0].bias, bad[1][0].bias) and not model[1][0].bias.requires_grad
    assert not model[3].weight.requires_grad
    assert model[1][0].weight.requires_grad and not torch.equal(model[1][0].weight, bad[1][0].weight)
    assert result.n_params_trained == sum(p.numel() for p in bad[1].parameters()) - 6


def test_a_group_left_far_from_its_record_is_retrained_on_the_task():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_beta.diagnosis.restore import restore_or_retrain

    net = _bn_cnn()
    x = torch.randn(128, 1, 6, 6)
    record = record_probe(net, x, sketch_dim=64)
    bad = _scaled(net, "1", 5.0)
    loader = DataLoader(TensorDataset(x, net(x).argmax(1)), batch_size=32)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    # One L-BFGS iteration cannot bring a five-fold scale back under the 0.5 error of a restored group.
    result = restore_or_retrain(bad, ["1"], record, loader, max_iter=1, max_epochs=1, lr=0.01, **quiet)
    restore, retrain = result.stages
    assert restore["stage"] == "restore" and restore["probe_error"]["final"] > 0.5
    assert retrain["stage"] == "retrain (fixed)" and retrain["groups"] == ["1"]
    assert result.policy == "restore+fixed"
    assert result.optimizer_steps == restore["optimizer_steps"] + retrain["optimizer_steps"] == 1 + len(loader)
    assert result.wall_time_s >= restore["wall_time_s"] + retrain["wall_time_s"]
