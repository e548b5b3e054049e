import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_beta import LayerAttributionCallback
from lightning_beta.demos.digits import DigitsClassifier, DigitsResNet
from lightning_beta.layer_groups import (
    SharedParameter,
    check_group_by,
    group_modules,
    group_parameters,
    group_sizes,
    match_group_names,
    shared_parameters,
)
from tests.helpers import TinyModel, make_loader


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


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)


@pytest.mark.parametrize("group_by", ["auto", 1])
def test_direct_parameters_of_the_root_get_their_own_group(group_by, recwarn):
    groups = group_parameters(WithScale(), group_by)
    assert groups == {"scale": ["scale"], "a": ["a.weight", "a.bias"], "b": ["b.weight", "b.bias"]}
    assert not [w for w in recwarn if "layer group" in str(w.message)]


def test_a_bare_layer_gives_one_group_per_parameter():
    assert group_parameters(nn.Linear(2, 2)) == {"weight": ["weight"], "bias": ["bias"]}


def test_wrapper_descended_into_but_not_a_single_layer():
    class Wraps(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    assert list(group_parameters(Wraps(nn.Linear(2, 2)))) == ["inner"]
    assert list(group_parameters(Wraps(Wraps(DigitsResNet())))) == [
        "inner.inner.conv1", "inner.inner.bn1", "inner.inner.layer1", "inner.inner.layer2", "inner.inner.layer3",
        "inner.inner.fc",
    ]  # fmt: skip


class Block(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))  # layers, not a stack


class Trunk(nn.Module):
    def __init__(self, n=3, head=None):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = head if head is not None else nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_a_stack_of_blocks_is_split_one_group_per_block():
    groups = group_parameters(Trunk())
    assert list(groups) == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert groups["blocks.1"] == [f"blocks.1.{n}" for n, _ in Block().named_parameters()]


def test_a_module_holding_a_stack_is_opened():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Trunk(n=2)
            self.scale = nn.Parameter(torch.ones(1))
            self.out = nn.Linear(2, 2)

    assert list(group_parameters(Outer())) == [
        "scale",
        "body.embed",
        "body.blocks.0",
        "body.blocks.1",
        "body.head",
        "out",
    ]


def test_sibling_stacks_are_stages_kept_whole():
    class Stages(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3)
            self.layer1 = nn.Sequential(Block(), Block())
            self.layer2 = nn.Sequential(Block(), Block())
            self.fc = nn.Linear(4, 2)

    assert list(group_parameters(Stages())) == ["stem", "layer1", "layer2", "fc"]
    stages = Stages()
    stages.layer2 = nn.Sequential(Block())  # one block per stage is still a stage
    assert list(group_parameters(stages)) == ["stem", "layer1", "layer2", "fc"]


def test_stacks_of_other_block_classes_side_by_side_are_each_split():
    class Other(Block):
        pass

    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList([Block(), Block()])
            self.dec = nn.ModuleList([Other()])  # one block is still a stack
            self.head = nn.Sequential(Trunk(n=0))

    assert list(group_parameters(EncoderDecoder())) == ["enc.0", "enc.1", "dec.0", "head.0"]
    model = EncoderDecoder()
    model.head = nn.Sequential(Block())  # now two stacks of Block side by side: stages
    assert list(group_parameters(model)) == ["enc", "dec.0", "head"]


def test_mixed_containers_are_not_stacks():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.mixed = nn.Sequential(Block(), Trunk(n=0))  # two classes
            self.out = nn.Linear(4, 2)

    assert list(group_parameters(Mixed())) == ["embed", "mixed", "out"]


def test_string_of_digits_is_a_depth():
    assert check_group_by("2") == 2 and check_group_by("auto") == "auto" and check_group_by(3) == 3
    assert group_parameters(DigitsResNet(), "2") == group_parameters(DigitsResNet(), 2)
    with pytest.raises(ValueError, match="`group_by` as a module depth must be >= 1, got 0"):
        check_group_by("0")
    with pytest.raises(ValueError, match="got '-1'"):
        check_group_by("-1")


def test_shared_parameters_report_the_owner_and_the_other_names():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.mid = nn.Linear(4, 4)
            self.dec = nn.Linear(4, 4)
            self.dec.weight = self.enc.weight

    model = Tied()
    groups = group_parameters(model)
    assert shared_parameters(model, groups) == [SharedParameter("enc.weight", "enc", ("dec.weight",))]
    assert shared_parameters(model, {"all": ["mid.weight"]}) == [SharedParameter("enc.weight", None, ("dec.weight",))]
    assert shared_parameters(DigitsResNet(), group_parameters(DigitsResNet())) == []
    # ``dec`` keeps its own bias and borrows the tied weight: still the module of its group.
    assert set(group_modules(model, groups)) == {"enc", "mid", "dec"}


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


class _CLIModel(TinyModel):
    def train_dataloader(self):
        return make_loader()


@pytest.mark.parametrize(
    ("yaml_group_by", "args", "expected"),
    [
        ("", ["--trainer.callbacks.group_by=2"], ["body.0", "head"]),  # the command line hands "2"
        ("group_by: 1", [], ["body", "head"]),
        ("group_by: {front: ['body\\.'], back: ['head\\.']}", [], ["front", "back"]),
    ],
)
def test_group_by_through_lightning_cli(tmp_path, yaml_group_by, args, expected):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path}
  max_epochs: 1
  limit_train_batches: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_beta.LayerAttributionCallback
      init_args:
        reference_batches: 0
        {yaml_group_by}
"""
    )
    cli = LightningCLI(_CLIModel, run=False, args=["--config", str(config), *args], save_config_callback=None)
    cli.trainer.fit(cli.model)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LayerAttributionCallback)]
    assert list(callback.groups) == expected


def test_callbacks_read_a_digit_string_group_by_as_the_same_depth():
    from lightning_beta import DampingRegimeMonitor, LayerAttributionCallback

    from_cli, from_yaml = LayerAttributionCallback(group_by="2"), LayerAttributionCallback(group_by=2)
    assert from_cli.group_by == 2 and isinstance(from_cli.group_by, int)
    assert from_cli.state_key == from_yaml.state_key
    assert DampingRegimeMonitor(curvature="secant", group_by="3", log=False).group_by == 3


def test_a_child_named_other_beside_root_parameters_is_an_ordinary_group():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.other = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(1))

    assert group_parameters(Model()) == {"scale": ["scale"], "other": ["other.weight", "other.bias"]}


def test_match_group_names_strips_one_unambiguous_prefix():
    assert match_group_names(["fc", "conv"], ["conv", "fc", "bn"]) == ({"fc": "fc", "conv": "conv"}, "")
    recorded = ["model.bert.embeddings", "model.bert.encoder.layer.0", "model.classifier"]
    present = ["bert.embeddings", "bert.encoder.layer.0", "classifier"]
    assert match_group_names(recorded, present) == (dict(zip(recorded, present)), "model.")
    # Two components deep: the wrapper of a wrapper.
    mapping, prefix = match_group_names(["lit.net.head", "lit.net.body"], ["body", "head"])
    assert prefix == "lit.net." and mapping == {"lit.net.head": "head", "lit.net.body": "body"}
    # A subset of the groups (the reference skipped some) is enough.
    assert match_group_names(["model.head"], ["body", "head"])[1] == "model."
    assert match_group_names([], ["body"]) == ({}, "")


def test_match_group_names_refuses_partial_and_ambiguous_matches():
    with pytest.raises(
        ValueError,
        match=r"it names group\(s\) \['neck'\] that the model does not have \(neither as they are nor after stripping"
        r" one leading prefix common to all of them\); the recorded groups are \['head', 'neck'\], the model's groups"
        r" are \['body', 'head'\]\. Pass the model the `reference` was recorded on",
    ):
        match_group_names(["head", "neck"], ["body", "head"])
    with pytest.raises(ValueError, match=r"`probe` was recorded on a different model: it names group\(s\) \['model.x'"):
        match_group_names(["model.x", "model.head"], ["head"], argument="probe")  # 'x' is not a group once stripped
    with pytest.raises(ValueError, match=r"stripping any of the prefixes \['a.', 'a.b.'\] would match them"):
        match_group_names(["a.b.c", "a.b.d"], ["b.c", "b.d", "c", "d"])
