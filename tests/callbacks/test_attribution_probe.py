"""LayerAttributionCallback's probe: recorded at fit end beside the artifact, and used by diagnose(reference=...).

Real tiny fits. The saved sketches are checked against a recomputation with hooks of the test's own and the
projection rebuilt from the documented seed formula; the planted fault keeps the faulty group's per-channel output
statistics (a moment-matched channel permutation), which the drift localizer cannot see at that group.
"""

from __future__ import annotations

import copy
import json
import math
import random
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_beta.artifact import load_attribution
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from lightning_beta.diagnosis import activation_drift, diagnose, probe_localize
from lightning_beta.probe import ProbeRecord, load_probe
from tests.helpers import SpawnDDP, TinyModel, make_loader, sgd_momentum, strided_loader, trainer_kwargs


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.block(self.stem(x))))


class LitNet(pl.LightningModule):
    """A LightningModule holding ``self.model``: its groups are ``model.stem``, ``model.block``, ``model.head``."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = model or Net()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _images(n: int = 96) -> tuple[Tensor, DataLoader]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return x, DataLoader(TensorDataset(x, y), batch_size=16)


class _Snapshot(pl.Callback):
    """The model's tensors and training flags and the RNG states at ``on_train_end``, where it stands in the list."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.flags = [m.training for m in pl_module.modules()]
        self.rng = (torch.get_rng_state(), random.getstate())


def _projection(seed: int, name: str, width: int, k: int) -> Tensor:
    """The documented projection: N(0, 1/k) from a CPU generator seeded with seed * 1_000_003 + crc32(name)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(width, k, generator=gen) / math.sqrt(k)


def _fit(tmp_path: Path, cb: LayerAttributionCallback, **overrides: Any) -> tuple[LitNet, Any, list[_Snapshot]]:
    x, loader = _images()
    lit, before, after = LitNet(), _Snapshot(), _Snapshot()
    kwargs = trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=None, **overrides)
    pl.Trainer(**kwargs, callbacks=[before, cb, after]).fit(lit, loader)
    return lit, x, [before, after]


def test_probe_file_matches_an_independent_recomputation_and_changes_nothing(tmp_path: Path) -> None:
    cb = LayerAttributionCallback(dirpath=tmp_path / "run", probe_samples=40, probe_sketch_dim=8)
    lit, x, (before, after) = _fit(tmp_path, cb)
    path = tmp_path / "run" / "attribution.json"
    assert json.loads(path.read_text())["probe_path"] == "attribution.probe.pt"
    art = load_attribution(path)
    assert art.probe_path == "attribution.probe.pt" and (tmp_path / "run" / "attribution.probe.pt").is_file()
    record = load_probe(art)
    assert load_probe(path).order == record.order == art.load_probe().order
    assert record.order == ["model.stem", "model.block", "model.head"]
    # The first training batches (16 + 16 + 8 of the third), as the loader gives them.
    assert torch.equal(record.inputs, x[:40]) and record.sketch_dim == 8
    # probe_replay="auto": a small model's group inputs are kept (the stem's is the images themselves).
    assert set(record.replay_inputs) == set(record.order) and torch.equal(
        record.replay_inputs["model.stem"][0][0], x[:40]
    )

    outputs: dict[str, Tensor] = {}
    hooks = [
        getattr(lit.model, name).register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out))
        for name in ("stem", "block", "head")
    ]
    lit.eval()
    with torch.no_grad():
        lit.model(x[:40])
    for hook in hooks:
        hook.remove()
    for name, out in outputs.items():
        flat = out.reshape(40, -1)
        expected = flat @ _projection(0, f"model.{name}", flat.shape[1], 8)
        torch.testing.assert_close(record.sketches[f"model.{name}"], expected, rtol=1e-5, atol=1e-5)
        assert record.shapes[f"model.{name}"] == list(out.shape[1:])

    # Recording left the model, its BatchNorm buffers, its training flags and the random generators as they were.
    assert before.flags == after.flags and any(before.flags)
    assert before.state.keys() == after.state.keys()
    assert all(torch.equal(before.state[k], after.state[k]) for k in before.state)
    assert torch.equal(before.rng[0], after.rng[0]) and before.rng[1] == after.rng[1]
    assert cb.probe is not None and cb.artifact is not None and cb.artifact.path == path
    assert "probe" not in json.dumps(sorted(cb.state_dict()))  # the probe is not callback state


def _moment_matched_permutation(model: nn.Module, x: Tensor) -> Any:
    """``block``'s conv output channels permuted; its BatchNorm set so that each channel keeps its mean and variance.

    On ``x``, channel ``i`` of the block's output now carries channel ``pi(i)``'s signal, rescaled and
    shifted to the mean and variance channel ``i`` had: per-channel statistics cannot see the fault.
    """
    bad: Any = copy.deepcopy(model).eval()
    conv, bn = bad.block[0], bad.block[1]
    with torch.no_grad():
        h = bad.stem(x)
        dims = (0, 2, 3)
        healthy = bn(conv(h)).double()
        mu, sd = healthy.mean(dims), healthy.std(dims, unbiased=False)
        pi = torch.roll(torch.arange(8), 3)
        conv.weight.copy_(conv.weight[pi])
        conv.bias.copy_(conv.bias[pi])
        c = conv(h).double()
        m, v = c.mean(dims), c.var(dims, unbiased=False)
        bn.running_mean.copy_(m)
        bn.running_var.copy_(v)
        bn.weight.copy_(sd / torch.sqrt(v / (v + bn.eps)))
        bn.bias.copy_(mu)
    return bad


def test_diagnose_with_the_artifact_names_a_fault_drift_cannot_see(tmp_path: Path) -> None:
    cb = LayerAttributionCallback(dirpath=tmp_path, probe_samples=64)
    lit, x, _ = _fit(tmp_path, cb)
    art = load_attribution(tmp_path / "attribution.json")
    bad = _moment_matched_permutation(lit.model, x)
    _, loader = _images()

    drift = activation_drift(LitNet(bad), loader, art)  # the LightningModule: the artifact's group names
    unchanged = activation_drift(LitNet(copy.deepcopy(lit.model)), loader, art)
    # The faulty group's drift is the healthy model's (sampling noise against the 4 reference batches) ...
    assert drift.scores["model.block"] == pytest.approx(unchanged.scores["model.block"], rel=1e-4)
    # ... and the head, which receives the permuted channels, takes the blame.
    assert drift.ranking[0] == "model.head" and drift.scores["model.head"] > 5 * drift.scores["model.block"]

    # The inner model: the probe's group names lose their "model." prefix, and the scores say so.
    report = diagnose(bad, loader, loader, reference=art, top_k=1, max_epochs=1, logger=False)
    assert report.scores.method == "probe"
    assert report.scores.ranking[0] == "block" and report.flagged == ["block"]
    assert report.scores.scores["stem"] == 0.0 and report.scores.scores["head"] == 0.0
    assert "prefix 'model.'" in (report.scores.message or "")
    healthy = probe_localize(lit.model, load_probe(art))
    assert healthy.degenerate and set(healthy.scores) == {"stem", "block", "head"}

    # Treat: with the probe at hand "auto" restores the flagged group to its record (no label is read).
    assert report.surgery is not None and report.surgery.policy == "restore"
    stage = report.surgery.stages[0]
    assert stage["groups"] == ["block"] and stage["probe_error"]["final"] < 0.05 * stage["probe_error"]["input"]
    with torch.no_grad():
        clean, broken, fixed = lit.model.eval()(x), bad(x), report.model(x)
    assert (fixed - clean).norm() < 0.05 * (broken - clean).norm()
    assert "L-BFGS iterations" in report.to_markdown()

    forced = diagnose(bad, loader, loader, localizer="probe", reference=art, top_k=1, max_epochs=1, logger=False)
    assert forced.scores.scores == report.scores.scores
    with pytest.raises(ValueError, match=r"its groups are \['0', '1'\], the record's are \['model.stem'"):
        probe_localize(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Linear(2, 2)), load_probe(art))


class _Tokens(Dataset):
    def __init__(self, n: int = 32, length: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=gen)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::3, -4:] = 0  # padded samples

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class LitGPT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, **batch: Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_transformer_with_dict_batches(tmp_path: Path) -> None:
    lit, data = LitGPT(), _Tokens()
    cb = LayerAttributionCallback(dirpath=tmp_path, probe_samples=12, reference_batches=1)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(lit, DataLoader(data, batch_size=8))
    record = load_probe(tmp_path / "attribution.json")
    assert isinstance(record.inputs, dict) and sorted(record.inputs) == ["attention_mask", "input_ids", "labels"]
    assert torch.equal(record.inputs["input_ids"], data.ids[:12]) and record.n_samples == 12
    blocks = ["model.transformer.wte", "model.transformer.h.0", "model.transformer.h.1", "model.transformer.ln_f"]
    assert [name for name in record.order if name in blocks] == blocks
    assert "not batch-first" in record.reasons["model.transformer.wpe"]  # position embeddings are (1, T, C)

    scores = probe_localize(lit.model, record)  # the inner GPT2LMHeadModel, run as the default forward runs a dict
    assert scores.degenerate and max(scores.details["output"].values()) < 1e-5
    assert "prefix 'model.'" in (scores.message or "")
    with torch.no_grad():
        weight = lit.model.transformer.h[1].mlp.c_fc.weight
        weight.add_(0.05 * torch.randn_like(weight))
    scores = probe_localize(lit.model, record)
    assert scores.ranking[0] == "transformer.h.1"
    assert scores.scores["transformer.h.0"] == 0.0 and scores.scores["transformer.wte"] == 0.0
    # The LightningModule itself, through its own forward: the names as recorded.
    assert probe_localize(lit, record, forward=lambda m, b: m(**b)).ranking[0] == "model.transformer.h.1"


def test_no_probe_when_disabled_after_an_exception_or_under_fast_dev_run(tmp_path: Path) -> None:
    cb = LayerAttributionCallback(dirpath=tmp_path / "off", probe_samples=0)
    _fit(tmp_path, cb)
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["attribution.json"]
    art = load_attribution(tmp_path / "off" / "attribution.json")
    assert art.probe_path is None and cb.probe is None
    with pytest.raises(ValueError, match=r"`artifact` has no probe"):
        load_probe(art)

    class Failing(LitNet):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    cb = LayerAttributionCallback(dirpath=tmp_path / "fail")
    with pytest.raises(RuntimeError, match="boom"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(Failing(), _images()[1])
    assert sorted(p.name for p in (tmp_path / "fail").iterdir()) == ["attribution.json"]
    art = load_attribution(tmp_path / "fail" / "attribution.json")
    assert not art.complete and art.probe_path is None

    cb = LayerAttributionCallback(dirpath=tmp_path / "dev")
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], fast_dev_run=True)).fit(LitNet(), _images()[1])
    assert not (tmp_path / "dev").exists() and cb.probe is None


def test_a_failed_probe_warns_once_and_the_fit_goes_on(tmp_path: Path) -> None:
    class NoForward(LitNet):
        def forward(self, x: Tensor) -> Tensor:
            raise NotImplementedError("no forward here")

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    cb = LayerAttributionCallback(dirpath=tmp_path, reference_batches=0)
    with pytest.warns(UserWarning, match=r"the artifact has no probe: NotImplementedError: no forward here \(a") as rec:
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(NoForward(), _images()[1])
    assert sum("no probe" in str(w.message) for w in rec) == 1
    assert load_attribution(tmp_path / "attribution.json").probe_path is None
    assert not (tmp_path / "attribution.probe.pt").exists()

    # reference_forward is the probe's forward too, and then the whole batch is kept as the probe inputs.
    cb = LayerAttributionCallback(dirpath=tmp_path / "own", reference_forward=lambda m, b: m.model(b[0]))
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(NoForward(), _images()[1])
    record = ProbeRecord.load(tmp_path / "own" / "attribution.probe.pt")
    assert isinstance(record.inputs, list) and len(record.inputs) == 2 and record.n_samples == 96


def test_resumed_fit_records_its_own_probe(tmp_path: Path) -> None:
    first = LayerAttributionCallback(dirpath=tmp_path / "first", probe_samples=16)
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True, limit_train_batches=2)
    trainer = pl.Trainer(**kwargs, callbacks=[first])
    trainer.fit(LitNet(), _images()[1])
    ckpt = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    resumed = LayerAttributionCallback(dirpath=tmp_path / "resumed", probe_samples=16)
    lit = LitNet()
    pl.Trainer(**{**kwargs, "max_epochs": 2}, callbacks=[resumed]).fit(lit, _images()[1], ckpt_path=ckpt)
    art = load_attribution(tmp_path / "resumed" / "attribution.json")
    assert art.total.count == 4 and art.probe_path == "attribution.probe.pt"
    assert probe_localize(lit, art.load_probe()).degenerate  # recorded on the resumed fit's final weights
    assert not probe_localize(lit, load_probe(tmp_path / "first" / "attribution.json")).degenerate


class _StridedTiny(TinyModel):
    def __init__(self) -> None:
        super().__init__(sgd_momentum)

    def train_dataloader(self) -> Any:
        return strided_loader(self.trainer)


@pytest.mark.ddp
def test_ddp_rank_zero_saves_its_own_probe(tmp_path: Path) -> None:
    cb = LayerAttributionCallback(dirpath=tmp_path, probe_samples=8, reference_batches=1)
    kwargs = trainer_kwargs(tmp_path, strategy=SpawnDDP(), devices=2, use_distributed_sampler=False)
    model = _StridedTiny()
    pl.Trainer(**kwargs, callbacks=[cb]).fit(model)
    record = load_probe(tmp_path / "attribution.json")
    x = make_loader(n=64).dataset.tensors[0]  # type: ignore[attr-defined]
    torch.testing.assert_close(record.inputs, x[0:16:2])  # rank zero's first two batches of 4
    with torch.no_grad():  # the main process holds rank zero's final weights
        body = model.body(record.inputs)
        head = model.head(body)
    k = cb.probe_sketch_dim
    torch.testing.assert_close(record.sketches["body"], body @ _projection(0, "body", 16, k), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(record.sketches["head"], head @ _projection(0, "head", 2, k), rtol=1e-5, atol=1e-5)


def test_the_callback_imports_no_diagnosis() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lightning_beta.callbacks.layer_attribution, lightning_beta.probe;"
        " print([m for m in sys.modules if m.startswith('lightning_beta.diagnosis')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_diagnose_on_shifted_data_says_the_data_changed_not_the_model(tmp_path: Path) -> None:
    cb = LayerAttributionCallback(dirpath=tmp_path, probe_samples=64)
    lit, x, _ = _fit(tmp_path, cb)
    art = load_attribution(tmp_path / "attribution.json")
    _, loader = _images()
    shifted = DataLoader(TensorDataset(-x, loader.dataset.tensors[1]), batch_size=16)  # inverted images
    report = diagnose(lit.model, shifted, shifted, reference=art, max_epochs=1, logger=False)
    assert report.flagged == [] and report.surgery is None and report.model is None
    assert report.scores.method == "probe" and report.scores.degenerate
    assert "the data changed" in (report.message or "") and "recommend_groups" in (report.message or "")


def test_auto_replay_drops_the_inputs_past_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_beta.callbacks import _attribution_probe

    monkeypatch.setattr(_attribution_probe, "AUTO_REPLAY_BYTES", 40 * 64 * 4)  # the images alone: 40 x 1 x 8 x 8
    cb = LayerAttributionCallback(dirpath=tmp_path / "run", probe_samples=40)
    _fit(tmp_path, cb)
    record = load_probe(tmp_path / "run" / "attribution.json")
    assert record.replay_inputs == {} and record.order == ["model.stem", "model.block", "model.head"]
    assert "exceed `max_replay_bytes` (10240 bytes)" in record.reasons["model.block"]
