"""K-dimensional classifiers and language models: every count of the diagnosis is in elements (pixels, tokens).

Each result is compared with an independent computation on the whole tensor: the misclassified elements, the
gradient of the mean loss over them (and over the correct ones) per layer group, and the fixed/broken elements.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.diagnosis import attribute_errors, diagnose, kinetic_energy_probe, surgical_correction, verify
from lightning_beta.layer_groups import group_parameters

IGNORE = -100


def pixel_classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))  # (B, 4, H, W) logits


def pixel_data(n=12, seed=0, ignore=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 5, generator=gen)
    y = torch.randint(0, 4, (n, 6, 5), generator=gen)
    if ignore:
        y[:, 0, :] = IGNORE  # a padded row: no element
    return x, y


def tiny_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)  # random init, nothing downloaded


def token_data(n=8, length=17, seed=0):
    tokens = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]  # next-token targets


def independent_scores(model, x, y, logits_fn, groups):
    """The gradient score and the ``correct`` column from one pass over the whole tensor, in eval mode."""
    model.eval()
    logits = logits_fn(model(x))  # class-last, (..., C)
    valid = y != IGNORE
    wrong = (logits.argmax(-1) != y) & valid
    right = (logits.argmax(-1) == y) & valid
    named = dict(model.named_parameters())
    out = {}
    for label, mask in (("wrong", wrong), ("right", right)):
        loss = nn.functional.cross_entropy(logits[mask], y[mask])  # mean over the selected elements
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), retain_graph=True)))
        out[label] = {
            g: torch.cat([grads[p].flatten() for p in names]).norm().item()
            / math.sqrt(sum(named[p].numel() for p in names))
            for g, names in groups.items()
        }
    return out, int(wrong.sum()), int(valid.sum())


@pytest.mark.parametrize("ignore", [False, True])
def test_per_pixel_classifier_counts_pixels(ignore):
    net, (x, y) = pixel_classifier(), pixel_data(ignore=ignore)
    scores = attribute_errors(net, DataLoader(TensorDataset(x, y), batch_size=5))
    groups = group_parameters(net)
    expected, n_wrong, n_valid = independent_scores(net, x, y, lambda out: out.permute(0, 2, 3, 1), groups)
    assert scores.n_samples == n_valid == (12 * 5 * 5 if ignore else 12 * 6 * 5)  # pixels, not the 12 images
    assert scores.n_misclassified == n_wrong
    for g in groups:
        assert scores.scores[g] == pytest.approx(expected["wrong"][g], rel=1e-4)
        assert scores.details["correct"][g] == pytest.approx(expected["right"][g], rel=1e-4)
        assert scores.details["ratio"][g] == pytest.approx(expected["wrong"][g] / expected["right"][g], rel=1e-4)


def test_per_pixel_verify_counts_pixels():
    before, (x, y) = pixel_classifier(0), pixel_data(ignore=True)
    after = pixel_classifier(1)
    v = verify(before, after, DataLoader(TensorDataset(x, y), batch_size=5))
    with torch.no_grad():
        valid = y != IGNORE
        right_b, right_a = (before(x).argmax(1) == y)[valid], (after(x).argmax(1) == y)[valid]
    assert v.n_samples == int(valid.sum()) == 12 * 5 * 5
    assert v.fixed == int((~right_b & right_a).sum()) and v.broken == int((right_b & ~right_a).sum())
    assert v.accuracy_before == pytest.approx(right_b.float().mean().item())
    assert sum(c.n_samples for c in v.per_class.values()) == v.n_samples
    assert "of 300 elements" in v.to_markdown()


def test_gpt2_token_level_attribution():
    model, (x, y) = tiny_gpt2(), token_data()
    scores = attribute_errors(model, DataLoader(TensorDataset(x, y), batch_size=3))
    groups = group_parameters(model)
    expected, n_wrong, n_valid = independent_scores(model, x, y, lambda out: out.logits, groups)
    assert scores.n_samples == n_valid == 8 * 16  # tokens
    assert scores.n_misclassified == n_wrong > 0
    for g in groups:
        assert scores.scores[g] == pytest.approx(expected["wrong"][g], rel=1e-4)
        assert scores.details["correct"][g] == pytest.approx(expected["right"][g], rel=1e-4)


def test_gpt2_verify_and_surgery_at_the_token_level(tmp_path):
    model, (x, y) = tiny_gpt2(), token_data()
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    result = surgical_correction(model, ["transformer.h.1"], data, lr=0.5, momentum=0.5, default_root_dir=tmp_path)
    assert torch.equal(result.model.transformer.wte.weight, model.transformer.wte.weight)  # frozen
    v = verify(model, result.model, data)
    model.eval()
    result.model.eval()
    with torch.no_grad():
        right_b = model(x).logits.argmax(-1) == y
        right_a = result.model(x).logits.argmax(-1) == y
    assert v.n_samples == 8 * 16
    assert (v.fixed, v.broken) == (int((~right_b & right_a).sum()), int((right_b & ~right_a).sum()))
    assert v.fixed > 0  # half an lr of SGD on 128 tokens moves predictions


def test_gpt2_diagnose_end_to_end(tmp_path):
    model, (x, y) = tiny_gpt2(), token_data()
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    report = diagnose(model, data, data, localizer="gradient", top_k=1, lr=0.5, momentum=0.5, default_root_dir=tmp_path)
    assert report.scores.n_samples == report.verification.n_samples == 8 * 16
    assert report.flagged == [report.scores.ranking[0]]


def test_kinetic_probe_reads_model_output_logits():
    model, (x, y) = tiny_gpt2(), token_data()
    scores = kinetic_energy_probe(model, DataLoader(TensorDataset(x, y), batch_size=4), steps=2)
    assert set(scores.scores) == set(group_parameters(model)) and all(v > 0 for v in scores.scores.values())


class TupleNet(nn.Module):
    """Returns ``(logits, features)``: an output none of the default rules reads."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return self.head(features), features


def test_loss_fn_and_predict_for_any_other_output():
    torch.manual_seed(0)
    net = TupleNet()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(TypeError, match="the model returned tuple, neither logits nor an output with `logits`"):
        attribute_errors(net, data)
    loss_fn = lambda out, t: nn.functional.cross_entropy(out[0], t, reduction="none")
    predict = lambda out: out[0].argmax(1)
    scores = attribute_errors(net, data, loss_fn=loss_fn, predict=predict)
    plain = nn.Sequential(copy.deepcopy(net.body), nn.ReLU(), copy.deepcopy(net.head))
    reference = attribute_errors(plain, data, group_by={"body": ["^0\\."], "head": ["^2\\."]})
    assert scores.scores == pytest.approx(reference.scores, rel=1e-6)
    assert scores.n_misclassified == reference.n_misclassified
    v = verify(net, net, data, predict=predict)
    assert (v.fixed, v.broken, v.n_samples) == (0, 0, 40)
    with pytest.raises(ValueError, match=r"`predict` must return one class per element, shape \(16,\), got \(16, 3\)"):
        verify(net, net, data, predict=lambda out: out[0])


def test_logits_that_fit_no_layout():
    net = nn.Linear(4, 3)
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8, 2))), batch_size=4)
    with pytest.raises(ValueError, match=r"logits of shape \(4, 3\) do not fit targets of shape \(4, 2\)"):
        attribute_errors(net, data)
