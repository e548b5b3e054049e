import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.diagnosis import verify


def fixed_predictor(preds):
    """A 'model' predicting ``preds[i]`` for the one-hot input e_i (a linear map with a one-hot weight)."""
    n = len(preds)
    net = nn.Linear(n, 3, bias=False)
    with torch.no_grad():
        net.weight.zero_()
        for i, p in enumerate(preds):
            net.weight[p, i] = 1.0
    return net


def test_counts_on_a_hand_made_case():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    before = fixed_predictor([0, 1, 1, 0, 2, 1])  # right: 0, 2, 4
    after = fixed_predictor([0, 0, 2, 1, 2, 2])  # right: 0, 1, 3, 4, 5
    v = verify(before, after, DataLoader(TensorDataset(torch.eye(6), y), batch_size=4))
    assert (v.fixed, v.broken, v.net, v.n_samples) == (3, 1, 2, 6)
    assert v.accuracy_before == pytest.approx(0.5) and v.accuracy_after == pytest.approx(5 / 6)
    assert (v.per_class[0].fixed, v.per_class[0].broken, v.per_class[0].accuracy_after) == (1, 0, 1.0)
    assert (v.per_class[1].fixed, v.per_class[1].broken, v.per_class[1].net) == (1, 1, 0)
    assert (v.per_class[2].fixed, v.per_class[2].broken, v.per_class[2].accuracy_before) == (1, 0, 0.5)
    d = v.to_dict()
    assert d["net"] == 2 and d["per_class"]["1"]["net"] == 0
    assert "fixed 3, broken 1, net +2 of 6" in v.to_markdown()


def test_shuffled_loader_stays_aligned_and_flags_restored():
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    before = fixed_predictor([0, 1, 2, 0, 1, 2])
    after = fixed_predictor([1, 1, 2, 0, 1, 2])
    before.train()
    after.eval()
    gen = torch.Generator().manual_seed(3)
    v = verify(before, after, DataLoader(TensorDataset(torch.eye(6), y), batch_size=2, shuffle=True, generator=gen))
    assert (v.fixed, v.broken) == (0, 1)
    assert before.training and not after.training


def test_empty_dataloader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="yielded no samples"):
        verify(nn.Linear(3, 3), nn.Linear(3, 3), empty)
