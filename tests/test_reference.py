"""Reference statistics: no side effects on the fitted model, per feature for any layout, one implementation.

Real tiny fits (``Trainer.fit``) and real model definitions the project did not write (Hugging Face ``transformers``
GPT-2, BERT and Llama from tiny configs, random init, nothing downloaded); every statistic is compared with an
independent recomputation from hooked outputs.
"""

from __future__ import annotations

import copy
import json
import os
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_beta.artifact import AttributionArtifact, GroupTotals, ReferenceStats, artifact_from_dict
from lightning_beta.diagnosis import activation_drift, reference_statistics
from lightning_beta.layer_groups import group_modules, group_parameters
from lightning_beta.reference import (
    FeatureMoments,
    default_feature_dim,
    default_forward,
    output_tensor,
    record_reference,
    resolve_dims,
)

transformers = pytest.importorskip("transformers")


def _fit_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    kwargs = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(overrides)
    return kwargs


class Recorder(pl.Callback):
    """Calls ``record_reference`` in ``on_train_end``, as ``LayerAttributionCallback`` does, after a snapshot."""

    def __init__(self, groups: Any = "auto", n_batches: int = 4, **kwargs: Any) -> None:
        self.groups, self.n_batches, self.kwargs = groups, n_batches, kwargs

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = _snapshot(pl_module)
        modules = group_modules(pl_module, group_parameters(pl_module, self.groups))
        self.reference, self.reasons = record_reference(trainer, pl_module, modules, self.n_batches, **self.kwargs)


class Snapshot(pl.Callback):
    """The model as training left it: runs before the callbacks after it in ``on_train_end``."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = _snapshot(pl_module)


def _snapshot(module: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "training": {name: m.training for name, m in module.named_modules()},
        "attributes": {
            k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, (int, float, str))
        },
        "rng": torch.get_rng_state(),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
    }


def _assert_unchanged(before: dict[str, Any], module: nn.Module) -> None:
    after = _snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key  # bit-identical
    assert after["training"] == before["training"]
    assert after["attributes"] == before["attributes"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["hooks"] == before["hooks"]


class SelfDistillation(pl.LightningModule):
    """A student and its EMA teacher (kept in eval mode), a feature queue and a step counter, all moved in
    ``training_step``: what a reference pass through ``training_step`` would move after training ended."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)
        self.teacher = copy.deepcopy(nn.ModuleDict({"body": self.body, "head": self.head}))
        self.teacher.requires_grad_(False)
        self.register_buffer("queue", torch.zeros(32, 16))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def on_train_start(self) -> None:
        self.teacher.eval()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        features = self.body(x)
        with torch.no_grad():
            for p_t, p_s in zip(self.teacher.parameters(), [*self.body.parameters(), *self.head.parameters()]):
                p_t.mul_(0.9).add_(p_s.detach(), alpha=0.1)
            teacher = self.teacher["body"](x)
            ptr = int(self.queue_ptr)
            self.queue[ptr : ptr + len(x)] = teacher
            self.queue_ptr.fill_((ptr + len(x)) % len(self.queue))
        self.steps += 1
        self.log("loss", nn.functional.cross_entropy(self.head(features), y))
        distill = (features - teacher).pow(2).mean()
        return nn.functional.cross_entropy(self.head(features), y) + distill

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([*self.body.parameters(), *self.head.parameters()], lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=gen)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8, shuffle=True)


def _hooked_stats(model: nn.Module, modules: dict[str, nn.Module], batches: list[Any], dim: int) -> dict[str, Any]:
    """Independent recomputation: concatenate each module's outputs and take mean and population variance."""
    outs: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda mod, a, o, name=name: outs[name].append(output_tensor(o)))
        for name, m in modules.items()
    ]
    model.eval()
    with torch.no_grad():
        for batch in batches:
            default_forward(model, batch)
    for h in handles:
        h.remove()
    result = {}
    for name, xs in outs.items():
        x = torch.cat([t.double().movedim(dim, -1).reshape(-1, t.shape[dim]) for t in xs])
        result[name] = (x.mean(0), x.var(0, unbiased=False), x.shape[0])
    return result


def test_record_reference_leaves_the_fitted_model_as_training_left_it(tmp_path):
    seen: list[Any] = []

    def forward(module: nn.Module, batch: Any) -> Any:  # the default, and a copy of what it was given
        seen.append([t.clone() for t in batch])
        return default_forward(module, batch)

    model = SelfDistillation()
    recorder = Recorder(groups="auto", n_batches=4, forward=forward)
    trainer = pl.Trainer(callbacks=[recorder], **_fit_kwargs(tmp_path))
    trainer.fit(model)
    assert model.steps == 6 and not model.teacher.training and model.training
    _assert_unchanged(recorder.before, model)  # EMA teacher, queue, counter, flags, RNG: as after training
    # The teacher is a ModuleDict that only training_step uses: it does not run in the forward, and says so.
    assert set(recorder.reference) == {"body", "head"}
    assert recorder.reasons == {"teacher": "its module did not run in the forward pass"}
    # The statistics are those of a plain eval forward of 4 (shuffled) training batches.
    assert len(seen) == 4 and all(len(x) == 8 for x, _ in seen)
    batches = seen
    modules = {n: model.get_submodule(n) for n in ("body", "head")}
    expected = _hooked_stats(model, modules, batches, dim=-1)
    for name, (mean, var, count) in expected.items():
        got = recorder.reference[name]
        assert got.count == count == 32 and got.feature_dim == -1
        assert torch.allclose(torch.tensor(got.mean, dtype=torch.float64), mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(torch.tensor(got.var, dtype=torch.float64), var, rtol=1e-10, atol=1e-12)


def test_teacher_without_forward_is_skipped_with_its_reason(tmp_path):
    model = SelfDistillation()
    recorder = Recorder(groups={"teacher": [r"^teacher\."], "body": [r"^body\."], "rest": [r"^head\."]})
    pl.Trainer(callbacks=[recorder], **_fit_kwargs(tmp_path, limit_train_batches=2)).fit(model)
    assert set(recorder.reference) == {"body"}  # "rest" is not a module: not handed to record_reference
    assert recorder.reasons == {"teacher": "its module did not run in the forward pass"}


def test_attribution_callback_leaves_the_fitted_model_unchanged(tmp_path):
    from lightning_beta.callbacks import LayerAttributionCallback

    model, snapshot = SelfDistillation(), Snapshot()
    callback = LayerAttributionCallback(reference_batches=4, dirpath=tmp_path)
    pl.Trainer(callbacks=[snapshot, callback], **_fit_kwargs(tmp_path)).fit(model)
    assert model.steps == 6
    _assert_unchanged(snapshot.before, model)
    assert callback.artifact is not None and set(callback.artifact.reference) >= {"body", "head"}


def test_record_reference_without_batches_or_modules(tmp_path):
    model = SelfDistillation()
    recorder = Recorder(n_batches=0)
    pl.Trainer(callbacks=[recorder], **_fit_kwargs(tmp_path, limit_train_batches=1)).fit(model)
    assert recorder.reference == {} and set(recorder.reasons) == {"body", "head", "teacher"}
    assert recorder.reasons["body"] == "no reference batches were requested (0)"
    with pytest.raises(ValueError, match=r"`n_batches` must be an int >= 0, got -1"):
        record_reference(None, model, {}, -1)
    assert record_reference(None, model, {}, 2) == ({}, {})


def test_record_reference_reports_a_failing_forward(tmp_path):
    model = SelfDistillation()

    def broken(module: nn.Module, batch: Any) -> None:
        raise RuntimeError("no inputs here")

    recorder = Recorder(groups={"body": [r"^body\."]}, n_batches=2, forward=broken)
    pl.Trainer(callbacks=[recorder], **_fit_kwargs(tmp_path, limit_train_batches=1)).fit(model)
    assert recorder.reference == {}
    assert recorder.reasons == {"body": "the reference forward pass raised RuntimeError: no inputs here"}
    _assert_unchanged(recorder.before, model)


# --- per feature, for any layout ------------------------------------------------------------------------------


class ConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _images(n: int = 48, size: int = 5) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 1, size, size, generator=gen), torch.arange(n) % 3), batch_size=8)


def test_conv_outputs_are_per_channel(tmp_path):
    model, data = ConvNet(), _images()
    recorder = Recorder(n_batches=3)
    pl.Trainer(callbacks=[recorder], **_fit_kwargs(tmp_path)).fit(model, data)
    assert recorder.reasons == {}
    assert {n: (len(r.mean), r.feature_dim) for n, r in recorder.reference.items()} == {
        "stem": (6, 1),
        "block": (4, 1),
        "head": (3, -1),
    }
    batches = list(data)[:3]
    for name, dim in (("stem", 1), ("block", 1), ("head", -1)):
        mean, var, count = _hooked_stats(model, {name: model.get_submodule(name)}, batches, dim)[name]
        got = recorder.reference[name]
        assert got.count == count == (24 * 25 if dim == 1 else 24)
        assert torch.allclose(torch.tensor(got.mean, dtype=torch.float64), mean, atol=1e-12)
        assert torch.allclose(torch.tensor(got.var, dtype=torch.float64), var, atol=1e-10)
    # Diagnosis measures the same thing the same way: on the same batches, no drift at all.
    three = DataLoader(TensorDataset(*(t[:24] for t in data.dataset.tensors)), batch_size=8)
    assert reference_statistics(model, three) == recorder.reference
    assert max(activation_drift(model, three, recorder.reference).scores.values()) < 1e-9


def test_default_feature_dim_by_module_type():
    resnet_block = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(3)))
    assert [default_feature_dim(m) for m in (nn.Conv1d(2, 2, 1), nn.BatchNorm2d(2), nn.MaxPool2d(2))] == [1, 1, 1]
    assert default_feature_dim(resnet_block) == 1 and default_feature_dim(ConvNet().head) == -1
    sequence = (nn.Linear(2, 2), nn.LayerNorm(2), nn.Embedding(3, 2), nn.MultiheadAttention(4, 2), nn.GRU(2, 2))
    assert [default_feature_dim(m) for m in sequence] == [-1] * 5
    for backbone in (_gpt2(), _bert(), _llama()):  # blocks end with Linear, LayerNorm or (unknown) RMSNorm types
        blocks = backbone.get_submodule(_blocks(backbone))
        assert default_feature_dim(backbone) == -1 and {default_feature_dim(b) for b in blocks} == {-1}


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2Model(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return transformers.LlamaModel(config)


def _blocks(backbone: nn.Module) -> str:
    for path in ("h", "layers", "encoder.layer"):
        try:
            backbone.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise AssertionError("no blocks")


class Tokens(Dataset):
    """Hugging Face style batches: ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, n: int, length: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.roll(-1)}


class LanguageModel(pl.LightningModule):
    """A Hugging Face backbone and a token head: ``forward`` returns the backbone's ``ModelOutput``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = nn.Linear(32, 64)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        hidden = self(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        return nn.functional.cross_entropy(self.lm_head(hidden).flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _block_groups(model: nn.Module) -> dict[str, list[str]]:
    """Explicit groups: each block, the embedding and the whole backbone (independent of ``"auto"`` grouping)."""
    path = f"backbone.{_blocks(model.backbone)}"
    embedding = next(n for n, m in model.named_modules() if isinstance(m, nn.Embedding))
    groups = {f"{path}.{i}": [rf"^{path}\.{i}\."] for i in range(2)}
    groups[embedding] = [rf"^{embedding}\."]
    return groups


@pytest.mark.filterwarnings("ignore:.*belong to no layer group")
@pytest.mark.parametrize("make", [_gpt2, _bert, _llama], ids=["gpt2", "bert", "llama"])
def test_transformer_reference_is_per_hidden_feature(tmp_path, make):
    torch.manual_seed(0)
    model = LanguageModel(make())
    data = DataLoader(Tokens(24, length=16), batch_size=4)
    groups = _block_groups(model)
    recorder = Recorder(groups=groups, n_batches=2)
    pl.Trainer(callbacks=[recorder], **_fit_kwargs(tmp_path, limit_train_batches=3)).fit(model, data)
    modules = group_modules(model, group_parameters(model, groups))
    assert recorder.reasons == {} and set(recorder.reference) == set(modules) == set(groups)
    batches = list(data)[:2]
    for name, module in modules.items():
        got = recorder.reference[name]
        assert (len(got.mean), got.feature_dim, got.count) == (32, -1, 2 * 4 * 16)  # hidden size, not length 16
        mean, var, _ = _hooked_stats(model, {name: module}, batches, dim=-1)[name]
        assert torch.allclose(torch.tensor(got.mean, dtype=torch.float64), mean, atol=1e-9)
        assert torch.allclose(torch.tensor(got.var, dtype=torch.float64), var, atol=1e-9)
    # The whole backbone returns a ModelOutput: its last_hidden_state is read, per hidden feature.
    whole = reference_statistics(model, data, group_by={"backbone": [r"^backbone\."], "head": [r"^lm_head\."]})
    assert len(whole["backbone"].mean) == 32 and whole["backbone"].feature_dim == -1
    # Diagnosis on shorter sequences works (per feature: the old per-"channel" reference had 16 entries, the
    # sequence length, and raised "recorded on a different model" here).
    short = DataLoader(Tokens(24, length=7, seed=1), batch_size=4)
    drift = activation_drift(model, short, recorder.reference, group_by=groups)
    assert set(drift.details["output"]) == set(groups) and all(v >= 0 for v in drift.scores.values())
    # On the reference batches the healthy model has no drift, and a fault planted in the last block ranks first.
    same_batches = DataLoader(Tokens(8, length=16), batch_size=4)
    assert max(activation_drift(model, same_batches, recorder.reference, group_by=groups).scores.values()) < 1e-6
    bad, last = copy.deepcopy(model), f"backbone.{_blocks(model.backbone)}.1"
    with torch.no_grad():
        for p in bad.get_submodule(last).parameters():
            if p.dim() == 2:
                p.mul_(-2.0)
    assert activation_drift(bad, same_batches, recorder.reference, group_by=groups).ranking[0] == last


def test_model_output_and_block_tuples_are_read():
    class Block(nn.Module):
        def forward(self, x: Tensor) -> Any:
            return (x * 2, None)

    out = transformers.modeling_outputs.BaseModelOutputWithPast(last_hidden_state=torch.ones(2, 3, 4))
    assert output_tensor(out).shape == (2, 3, 4)
    logits = transformers.modeling_outputs.CausalLMOutputWithPast(logits=torch.ones(2, 5))
    assert output_tensor(logits).shape == (2, 5)
    assert output_tensor(Block()(torch.ones(1, 2, 3))).shape == (1, 2, 3)
    assert output_tensor({"ids": torch.arange(3)}) is None and output_tensor(()) is None


def test_unreadable_output_is_listed_with_its_reason():
    class Tokenizer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: Tensor) -> Any:
            return {"ids": (x * self.scale).long()}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = Tokenizer()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.tok(x)["ids"].float())

    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8)), batch_size=4)
    with pytest.warns(UserWarning, match=r"no statistics for group\(s\) 'tok': its output \(dict\) holds no"):
        ref = reference_statistics(Net(), data)
    assert set(ref) == {"fc"}


def test_feature_dim_override_and_errors():
    net = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Linear(5, 4))
    assert resolve_dims({"0": net[0], "1": net[1]}, None) == {"0": 1, "1": -1}
    assert resolve_dims({"0": net[0], "1": net[1]}, {"0": 2}) == {"0": 2, "1": -1}
    assert resolve_dims({"0": net[0]}, -1) == {"0": -1}
    with pytest.raises(ValueError, match=r"`feature_dim` names unknown group\(s\) \['x'\]"):
        resolve_dims({"0": net[0]}, {"x": 1})
    with pytest.raises(TypeError, match="`feature_dim` must be None, an int or a dict"):
        resolve_dims({"0": net[0]}, "last")
    data = DataLoader(TensorDataset(torch.randn(8, 2, 5), torch.zeros(8)), batch_size=4)
    ref = reference_statistics(net, data, group_by={"0": [r"^0\."], "1": [r"^1\."]}, feature_dim={"0": -1})
    assert (len(ref["0"].mean), ref["0"].feature_dim) == (5, -1)  # conv output (B, 3, 5) read along its last dim
    assert (len(ref["1"].mean), ref["1"].feature_dim) == (4, -1)


def test_default_forward_batches():
    class Keywords(nn.Module):
        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return input_ids.float() * (1 if attention_mask is None else attention_mask)

    batch = {"input_ids": torch.ones(2, 3), "attention_mask": torch.zeros(2, 3), "labels": torch.ones(2, 3)}
    assert default_forward(Keywords(), batch).sum() == 0  # labels dropped: forward does not take them
    assert default_forward(nn.Identity(), {"x": torch.ones(2), "y": torch.zeros(2)}).sum() == 2
    assert default_forward(nn.Identity(), [torch.ones(3), torch.zeros(3)]).sum() == 3
    with pytest.raises(TypeError, match=r"accepts none of its keys \['a'\]: pass `forward="):
        default_forward(nn.Identity(), {"a": torch.ones(1)})
    with pytest.raises(TypeError, match="non-empty batch"):
        default_forward(nn.Identity(), ())


def test_drift_uses_the_recorded_feature_dim_and_old_artifacts_load():
    total = GroupTotals(1.0, 1.0, 1.0, 1, 0)
    art = AttributionArtifact(
        groups={"fc": 10}, parameters={}, history_epochs=[], history=[], history_total=[], totals={"fc": total},
        total=total, reference={"fc": ReferenceStats([0.0, 1.0], [1.0, 2.0], 16, feature_dim=-1)},
    )  # fmt: skip
    data = json.loads(json.dumps(art.to_dict()))
    assert data["reference"]["fc"]["feature_dim"] == -1
    assert artifact_from_dict(data).reference == art.reference
    del data["reference"]["fc"]["feature_dim"]  # written before the field existed: channel = dim 1
    assert artifact_from_dict(data).reference["fc"].feature_dim == 1


def test_feature_moments_rejects_another_width():
    m = FeatureMoments(-1)
    m.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"2 feature\(s\) along dim -1 in one batch and 3 in an earlier one"):
        m.update(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"has 3 feature\(s\), cannot resize to 4"):
        m.resize(4)


# --- DDP: one implementation, reduced by sum states -------------------------------------------------------------


def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        m = FeatureMoments(-1, sync_on_compute=False)
        if rank == 0:  # rank 1 never receives an update
            m.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        width = torch.tensor([m.num_features])
        widths = [torch.zeros_like(width) for _ in range(world)]
        dist.all_gather(widths, width)
        m.resize(int(max(widths)))
        with m.sync_context():
            stats = m.to_reference()
        torch.save({"stats": stats, "local_count": float(m.count)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_metric_without_updates_on_one_rank_still_reduces(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["stats"] == ReferenceStats([2.0, 4.0], [1.0, 4.0], 2, -1)  # rank 0's rows alone
        assert result["local_count"] == (2.0 if rank == 0 else 0.0)  # unsynced afterwards


class _RankModel(pl.LightningModule):
    """Rank r of w reads samples r, r + w, ... in batches of 8 // w; ``side`` runs on rank 0 only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU())
        self.side = nn.Linear(5, 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(15, 2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if self.trainer.global_rank == 0:
            h = h + self.side(h).sum() * 0
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, sync_dist=True)  # a collective in the user's code: not run by the reference pass
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        x, y = _rank_data()
        return DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=8 // world)


def _rank_data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(32, 2, 5, generator=gen), torch.randint(0, 2, (32,), generator=gen)


class _WriteReference(Recorder):
    def __init__(self, path: str) -> None:
        super().__init__(n_batches=2)
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        result = {"reference": self.reference, "reasons": self.reasons, "state": pl_module.state_dict()}
        torch.save(result, f"{self.path}.rank{trainer.global_rank}")


@pytest.mark.ddp
def test_record_reference_under_ddp_covers_the_global_batches(tmp_path):
    from tests.helpers import SpawnDDP

    path = str(tmp_path / "reference")
    model = _RankModel()
    strategy = SpawnDDP(timeout=timedelta(seconds=60), find_unused_parameters=True)  # `side`: rank 0 only
    pl.Trainer(
        callbacks=[_WriteReference(path)],
        **_fit_kwargs(tmp_path, strategy=strategy, devices=2, use_distributed_sampler=False),
    ).fit(model)
    results = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(2)]
    assert results[0]["reference"] == results[1]["reference"]  # every rank ends with the same statistics
    reference = results[0]["reference"]
    assert results[0]["reasons"] == {} and set(reference) == {"body", "side", "head"}
    # One process over the same global batches: the first 2 batches of 8 (both ranks' shares of batches 0 and 1).
    x, _ = _rank_data()
    fresh = _RankModel()
    fresh.load_state_dict(results[0]["state"])  # BatchNorm's running statistics moved in training
    fresh.eval()
    body_out = fresh.body(x[:16])
    expected = {
        "body": as_rows(body_out, 1),
        "head": as_rows(fresh.head(body_out), -1),
        # ``side`` ran on rank 0 only (samples 0, 2, 4, ...): rank 1's metric never received an update and reduced
        "side": as_rows(fresh.side(fresh.body(x[0:16:2])), -1),
    }
    for name, rows in expected.items():
        got = reference[name]
        assert got.count == rows.shape[0], name
        assert torch.allclose(torch.tensor(got.mean, dtype=torch.float64), rows.mean(0), atol=1e-6), name
        assert torch.allclose(torch.tensor(got.var, dtype=torch.float64), rows.var(0, unbiased=False), atol=1e-6), name


def as_rows(t: Tensor, dim: int) -> Tensor:
    t = t.detach().double()
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


class ConvNetWithoutForward(ConvNet):
    """The common Lightning shape: `training_step` calls the submodules, no `forward` is defined."""

    forward = pl.LightningModule.forward  # type: ignore[assignment]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.block(self.stem(x))), y)


def test_attribution_reference_forward_for_a_module_without_forward(tmp_path):
    from lightning_beta.callbacks import LayerAttributionCallback

    loader = _images()
    plain = LayerAttributionCallback(reference_batches=2, dirpath=tmp_path / "plain")
    with pytest.warns(UserWarning, match=r"needs `LayerAttributionCallback\(reference_forward=\.\.\.\)`"):
        pl.Trainer(callbacks=[plain], **_fit_kwargs(tmp_path)).fit(ConvNetWithoutForward(), loader)
    assert plain.artifact.reference == {} and set(plain.artifact.reference_skipped) == {"stem", "block", "head"}

    def run(module: Any, batch: Any) -> Tensor:
        return module.head(module.block(module.stem(batch[0])))

    model = ConvNetWithoutForward()
    given = LayerAttributionCallback(reference_batches=2, reference_forward=run, feature_dim=1, dirpath=tmp_path)
    pl.Trainer(callbacks=[given], **_fit_kwargs(tmp_path)).fit(model, loader)
    stats = given.artifact.reference
    assert set(stats) == {"stem", "block", "head"}
    # The stem's per-channel mean over the first two batches, recomputed with the fitted weights.
    model.eval()
    with torch.no_grad():
        out = torch.cat([model.stem(x) for x, _ in list(loader)[:2]]).double()
    expected = out.transpose(0, 1).reshape(out.shape[1], -1).mean(1)
    assert torch.allclose(torch.tensor(stats["stem"].mean, dtype=torch.float64), expected, atol=1e-6)


def test_reference_forward_must_be_callable():
    from lightning_beta.callbacks import LayerAttributionCallback

    with pytest.raises(TypeError, match="`reference_forward` must be None or a callable, got int"):
        LayerAttributionCallback(reference_forward=3)  # type: ignore[arg-type]
