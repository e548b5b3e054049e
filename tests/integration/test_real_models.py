"""Layer groups of model definitions this project did not write: Hugging Face, Lightning's demos, ViT, ResNet.

Every model is built from a tiny config with random weights; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos import Transformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import Tensor, nn

from lightning_beta.layer_groups import group_modules, group_parameters, group_sizes, shared_parameters

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _check_partition(model: nn.Module, groups: dict[str, list[str]]) -> None:
    """Every parameter (tied ones once) in exactly one group, no group empty, sizes adding up."""
    flat = [name for names in groups.values() for name in names]
    assert sorted(flat) == sorted(name for name, _ in model.named_parameters())
    assert all(groups.values())
    assert sum(group_sizes(model, groups).values()) == sum(p.numel() for p in model.parameters())


def _gpt2(n_layer: int = 2) -> nn.Module:
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_embeddings_each_block_final_norm(recwarn: Any) -> None:
    model = _gpt2()
    groups = group_parameters(model)
    assert list(groups) == [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0",
        "transformer.h.1",
        "transformer.ln_f",
    ]
    assert groups["transformer.wte"] == ["transformer.wte.weight"]
    assert groups["transformer.h.1"][0] == "transformer.h.1.ln_1.weight"
    _check_partition(model, groups)
    assert not [w for w in recwarn if "layer group" in str(w.message)]
    # lm_head.weight is wte.weight: the embedding's group owns it, the tie is reported.
    (tie,) = shared_parameters(model, groups)
    assert (tie.name, tie.group, tie.also) == ("transformer.wte.weight", "transformer.wte", ("lm_head.weight",))
    assert set(group_modules(model, groups)) == set(groups)


def test_gpt2_block_count_follows_the_config() -> None:
    groups = group_parameters(_gpt2(n_layer=5))
    assert [g for g in groups if ".h." in g] == [f"transformer.h.{i}" for i in range(5)]
    assert list(group_parameters(_gpt2(n_layer=1))) == [
        "transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.ln_f"
    ]  # fmt: skip


def test_gpt2_inside_a_lightning_module() -> None:
    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _gpt2()

    groups = group_parameters(LM())
    assert list(groups)[:3] == ["model.transformer.wte", "model.transformer.wpe", "model.transformer.h.0"]


def test_bert_embeddings_each_layer_head() -> None:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(config)
    groups = group_parameters(model)
    assert list(groups) == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.encoder.layer.2",
        "cls",
    ]
    _check_partition(model, groups)
    # The MLM decoder's weight is the word embedding (owned by bert.embeddings), its bias the head's own bias.
    ties = [(t.group, t.also) for t in shared_parameters(model, groups)]
    assert ties == [
        ("bert.embeddings", ("cls.predictions.decoder.weight",)),
        ("cls", ("cls.predictions.decoder.bias",)),
    ]
    # ``cls`` is still a module group (its other parameters are its own), so drift and references can hook it.
    assert "cls" in group_modules(model, groups)

    base = transformers.BertModel(config)
    assert list(group_parameters(base)) == [
        "embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "pooler"
    ]  # fmt: skip


def test_llama_embeddings_each_layer_norm_head() -> None:
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    groups = group_parameters(model)
    assert list(groups) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    _check_partition(model, groups)
    assert shared_parameters(model, groups) == []


def test_boring_model_one_group_without_warning(recwarn: Any) -> None:
    assert group_parameters(BoringModel()) == {"layer": ["layer.weight", "layer.bias"]}
    assert not [w for w in recwarn if "layer group" in str(w.message)]


def test_lightning_demo_transformer() -> None:
    model = Transformer(vocab_size=33, nlayers=2)
    groups = group_parameters(model)
    assert list(groups) == [
        "embedding",
        "transformer.encoder.layers.0", "transformer.encoder.layers.1", "transformer.encoder.norm",
        "transformer.decoder.layers.0", "transformer.decoder.layers.1", "transformer.decoder.norm",
        "decoder",
    ]  # fmt: skip
    _check_partition(model, groups)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)


class VisionTransformer(nn.Module):
    """The attribute names and registration order of timm's ``VisionTransformer`` (timm does not load here)."""

    def __init__(self, dim: int = 16, depth: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 65, dim))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])  # timm: nn.Sequential
        self.norm = nn.LayerNorm(dim)
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, num_classes)


@pytest.mark.parametrize("container", [nn.Sequential, nn.ModuleList])
def test_vit_root_parameters_named_and_twelve_blocks(container: Any, recwarn: Any) -> None:
    model = VisionTransformer()
    model.blocks = container(list(model.blocks)) if container is nn.ModuleList else model.blocks
    groups = group_parameters(model)
    blocks = [f"blocks.{i}" for i in range(12)]
    assert list(groups) == ["cls_token", "pos_embed", "patch_embed", *blocks, "norm", "head"]
    assert groups["cls_token"] == ["cls_token"] and groups["patch_embed"] == [
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    _check_partition(model, groups)
    assert not [w for w in recwarn if "layer group" in str(w.message)]
    assert set(group_modules(model, groups)) == {"patch_embed", *blocks, "norm", "head"}


def _example_resnet18() -> nn.Module:
    spec = importlib.util.spec_from_file_location("example06", EXAMPLES / "06_cifar10_resnet18.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ResNet18()


def test_resnet18_stages_stay_whole() -> None:
    model = _example_resnet18()
    groups = group_parameters(model)
    assert list(groups) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    _check_partition(model, groups)

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _example_resnet18()
            self.head = nn.Linear(10, 2)

    # Beside a head, the backbone holding the stages is opened: its stem, stages and fc are groups.
    assert list(group_parameters(Classifier())) == [
        "backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2", "backbone.layer3",
        "backbone.layer4", "backbone.fc", "head",
    ]  # fmt: skip
