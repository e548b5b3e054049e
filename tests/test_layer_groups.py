import pytest
import torch
from torch import nn

from lightning_beta.demos.digits import DigitsClassifier, DigitsResNet
from lightning_beta.layer_groups import check_group_by, group_parameters, group_sizes


def test_auto_resnet_groups_in_registration_order():
    groups = group_parameters(DigitsResNet())
    assert list(groups) == ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"]
    assert groups["bn1"] == ["bn1.weight", "bn1.bias"]


def test_auto_descends_into_a_single_wrapping_child():
    groups = group_parameters(DigitsClassifier())
    assert list(groups) == ["net.conv1", "net.bn1", "net.layer1", "net.layer2", "net.layer3", "net.fc"]


def test_every_parameter_in_exactly_one_group_and_sizes():
    model = DigitsResNet()
    groups = group_parameters(model)
    flat = [name for names in groups.values() for name in names]
    assert sorted(flat) == sorted(name for name, _ in model.named_parameters())
    sizes = group_sizes(model, groups)
    assert sizes["conv1"] == 16 * 1 * 3 * 3
    assert sizes["fc"] == 64 * 10 + 10
    assert sum(sizes.values()) == sum(p.numel() for p in model.parameters())


def test_depth_groups():
    groups = group_parameters(DigitsResNet(), 2)
    assert "layer1.conv1" in groups and "layer2.shortcut" in groups
    assert groups["conv1"] == ["conv1.weight"]  # a path shorter than the depth is kept whole


def test_regex_groups_and_other_bucket():
    model = DigitsResNet()
    with pytest.warns(UserWarning, match=r"belong to no layer group and are grouped as 'other'"):
        groups = group_parameters(model, {"stem": [r"conv1\.", r"bn1\."], "head": [r"fc\."]})
    assert groups["stem"] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert groups["head"] == ["fc.weight", "fc.bias"]
    assert all(name.startswith("layer") for name in groups["other"])


def test_direct_parameters_of_the_root_go_to_other():
    class WithScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

    with pytest.warns(UserWarning, match="grouped as 'other'"):
        groups = group_parameters(WithScale())
    assert groups == {"a": ["a.weight", "a.bias"], "b": ["b.weight", "b.bias"], "other": ["scale"]}


def test_shared_parameter_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.dec = nn.Linear(4, 4)
            self.dec.weight = self.enc.weight

    groups = group_parameters(Tied())
    assert groups == {"enc": ["enc.weight", "enc.bias"], "dec": ["dec.bias"]}


@pytest.mark.parametrize(
    ("group_by", "error", "match"),
    [
        ("layers", ValueError, "`group_by` must be \"auto\", an int depth or a dict of regex lists, got 'layers'"),
        (0, ValueError, "`group_by` as a module depth must be >= 1, got 0"),
        (True, TypeError, "got bool"),
        (1.5, TypeError, "`group_by` must be 'auto', an int or a dict, got float"),
        ({}, ValueError, "must name at least one group"),
        ({"a": []}, ValueError, r"`group_by\['a'\]` must be a non-empty list of regexes"),
        ({"a": "fc"}, ValueError, r"`group_by\['a'\]` must be a non-empty list of regexes"),
        ({"a": ["("]}, ValueError, r"`group_by\['a'\]` holds an invalid regex '\('"),
    ],
)
def test_check_group_by_rejects(group_by, error, match):
    with pytest.raises(error, match=match):
        check_group_by(group_by)


def test_regex_errors_name_the_culprit():
    model = DigitsResNet()
    with pytest.raises(ValueError, match=r"`group_by\['head'\]` regex 'classifier' matches no parameter"):
        group_parameters(model, {"head": ["classifier"]})
    with pytest.raises(ValueError, match=r"parameter 'fc.weight' is matched by both group 'a' and group 'b'"):
        group_parameters(model, {"a": ["fc"], "b": [r"fc\.weight"]})
    with pytest.raises(ValueError, match="may not name a group 'other'"):
        group_parameters(model, {"other": ["fc"]})
    with pytest.raises(ValueError, match="has no parameters to group"):
        group_parameters(nn.ReLU())
