"""The probe localizer against the drift localizer on a fault that keeps per-channel statistics, and its record."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.diagnosis import activation_drift, reference_statistics
from lightning_beta.diagnosis.probe import PROBE_VERSION, ProbeRecord, probe_localize, record_probe


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _data(n: int = 256) -> tuple[torch.Tensor, DataLoader]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, DataLoader(TensorDataset(x, y), batch_size=64)


def _moment_matched_permutation(net: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """Layer 0's output units permuted, each rescaled and shifted to the mean and std of the unit it replaces.

    On ``x`` every unit keeps its mean and variance exactly (up to float rounding): per-unit statistics cannot see
    the fault, yet the function changed.
    """
    bad = _mlp()
    bad.load_state_dict(net.state_dict())
    layer = bad[0]
    with torch.no_grad():
        z = layer(x).double()
        mu, sd = z.mean(0), z.std(0)
        pi = torch.roll(torch.arange(16), 5)  # a derangement
        a = sd / sd[pi]
        b = mu - a * mu[pi]
        w, c = layer.weight.double(), layer.bias.double()
        layer.weight.copy_(a[:, None] * w[pi])
        layer.bias.copy_(a * c[pi] + b)
    return bad.eval()


def test_probe_finds_a_fault_drift_cannot_see() -> None:
    net = _mlp()
    x, loader = _data()
    ref = reference_statistics(net, loader)
    record = record_probe(net, x[:128])
    bad = _moment_matched_permutation(net, x)

    drift = activation_drift(bad, loader, ref)
    # The faulty group's per-unit statistics did not move; the drift it causes shows up downstream.
    assert drift.details["output"]["0"] < 1e-4
    assert drift.details["output"]["2"] > 0.1
    assert drift.ranking[0] != "0"

    probe = probe_localize(bad, record)
    assert probe.method == "probe"
    assert probe.ranking[0] == "0"
    # Replay isolates each group: the unchanged groups reproduce their reference outputs exactly ...
    assert probe.scores["2"] == 0.0 and probe.scores["4"] == 0.0
    assert probe.details["own"]["2"] == 0.0 and probe.details["own"]["4"] == 0.0
    # ... although their outputs on the probe inputs changed.
    assert probe.details["output"]["2"] > 0.1 and probe.details["output"]["4"] > 0.1

    first = probe_localize(bad, record, replay=False)
    assert first.ranking[0] == "0"
    assert first.scores == {"0": probe.scores["0"], "2": 0.0, "4": 0.0}
    assert "not replayed" in (first.message or "")


def test_scores_and_sketches_match_a_recomputation() -> None:
    net = _mlp()
    x, _ = _data()
    record = record_probe(net, x[:64], sketch_dim=8, seed=3)
    # The documented projection of group number i: N(0, 1/k) from a generator seeded with seed * 1_000_003 + i.
    proj = {
        name: torch.randn(width, 8, generator=torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(name.encode())))
        / math.sqrt(8)
        for name, width in (("0", 16), ("2", 16), ("4", 3))
    }
    with torch.no_grad():
        h0 = net[0](x[:64])
        h2 = net[2](torch.relu(h0))
    torch.testing.assert_close(record.sketches["0"], h0 @ proj["0"])
    torch.testing.assert_close(record.sketches["2"], h2 @ proj["2"])
    torch.testing.assert_close(record.replay_inputs["2"][0][0], torch.relu(h0))

    bad = _mlp()
    bad.load_state_dict(net.state_dict())
    with torch.no_grad():
        bad[2].weight.mul_(-1.0)
    scores = probe_localize(bad, record)
    with torch.no_grad():
        own = bad[2](torch.relu(h0)) @ proj["2"]
    expected = float(torch.linalg.vector_norm(own - h2 @ proj["2"]) / torch.linalg.vector_norm(h2 @ proj["2"]))
    assert scores.scores["2"] == pytest.approx(expected, rel=1e-5)
    assert scores.scores["0"] == 0.0 and scores.scores["4"] == 0.0
    assert scores.details["output"]["4"] > 0  # downstream of the fault


def test_two_faults_are_both_scored_with_replay() -> None:
    net = _mlp()
    x, _ = _data()
    record = record_probe(net, x[:64])
    bad = _moment_matched_permutation(net, x)
    with torch.no_grad():
        bad[4].bias.add_(1.0)
    scores = probe_localize(bad, record)
    assert scores.scores["0"] > 0 and scores.scores["4"] > 0 and scores.scores["2"] == 0.0
    assert probe_localize(net, record).degenerate  # the healthy model: nothing changed
    assert "no group's function changed" in (probe_localize(net, record).message or "")


def test_batchnorm_model_is_left_as_it_was_and_dataloader_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    net.train()
    x = torch.randn(50, 1, 4, 4)
    with torch.no_grad():
        net(x)  # running statistics that are not the defaults
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(TensorDataset(x, torch.zeros(50, dtype=torch.long)), batch_size=16)
    record = record_probe(net, loader, max_samples=40)
    assert record.n_samples == 40
    torch.testing.assert_close(record.inputs, x[:40])
    assert record.order == ["0", "1", "4"]
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert probe_localize(net, record).degenerate
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        net[1].running_mean.add_(0.5)  # a fault in a buffer: the BatchNorm group's function changed
    assert probe_localize(net, record).ranking[0] == "1"


def test_in_place_ops_after_a_group_and_a_reused_module() -> None:
    torch.manual_seed(0)
    # The ReLU overwrites group "0"'s output in place: the sketch must be taken before it runs.
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    record = record_probe(net, x)
    scores = probe_localize(net, record)
    assert scores.degenerate and scores.details["own"] == {"0": 0.0, "2": 0.0}

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.inner(self.inner(x)))

    record = record_probe(Twice(), x)
    assert record.order == ["head"]
    assert record.reasons == {"inner": "its module ran 2 times in one forward pass (a reused module)"}


def test_save_load_round_trip(tmp_path) -> None:
    net = _mlp()
    x, _ = _data()
    record = record_probe(net, x[:64], sketch_dim=16, seed=2)
    path = record.save(tmp_path / "sub" / "probe.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["probe.pt"]  # no temporary file left
    loaded = ProbeRecord.load(path)
    assert loaded.order == record.order and loaded.shapes == record.shapes and loaded.version == PROBE_VERSION
    assert (loaded.sketch_dim, loaded.seed, loaded.group_by) == (16, 2, "auto")
    assert all(torch.equal(loaded.sketches[k], record.sketches[k]) for k in record.order)
    assert torch.equal(loaded.inputs, record.inputs) and loaded.nbytes == record.nbytes
    bad = _moment_matched_permutation(net, x)
    assert probe_localize(bad, loaded).scores == probe_localize(bad, record).scores

    torch.save({"version": 99, "sketches": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"holds a probe record of version 99; this release reads versions 1 and 2"):
        ProbeRecord.load(tmp_path / "old.pt")
    torch.save([1, 2], tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds no probe record"):
        ProbeRecord.load(tmp_path / "other.pt")


def test_record_without_replay_is_small() -> None:
    net = _mlp()
    x, _ = _data()
    full = record_probe(net, x[:64])
    small = record_probe(net, x[:64], replay=False)
    assert small.replay_inputs == {} and small.nbytes < full.nbytes
    assert small.nbytes == (64 * 4 + 3 * 64 * 64) * 4  # the inputs and three (64, 64) float32 sketches


def test_bad_inputs() -> None:
    net = _mlp()
    x, _ = _data()
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got str"):
        record_probe("net", x)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"`inputs` must be a tensor, a dict of tensors or an iterable of batches, got int"
    ):
        record_probe(net, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`inputs` as an iterable must yield tensors"):
        record_probe(net, [["a"]])
    with pytest.raises(ValueError, match=r"`inputs` must hold at least one sample along dim 0, got shape \(0, 4\)"):
        record_probe(net, torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"`inputs` yielded no batch"):
        record_probe(net, [])
    with pytest.raises(ValueError, match=r"`sketch_dim` must be >= 1, got 0"):
        record_probe(net, x, sketch_dim=0)
    with pytest.raises(TypeError, match=r"`sketch_dim` must be an int, got float"):
        record_probe(net, x, sketch_dim=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`replay` must be a bool, got str"):
        record_probe(net, x, replay="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`groups`: `group_by` as a module depth must be >= 1, got 0"):
        record_probe(net, x, groups=0)
    record = record_probe(net, x[:32])
    with pytest.raises(TypeError, match=r"`record` must be a ProbeRecord \(from record_probe\), got dict"):
        probe_localize(net, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`tolerance` must be in \[0.0, inf\], got -1.0"):
        probe_localize(net, record, tolerance=-1.0)
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"`model` does not fit the record: group '2' outputs shape \(32, 8\)"):
        probe_localize(wider, record, replay=False)
    with pytest.raises(ValueError, match=r"`model` has no group module \['2', '4'\] of the record; its groups are"):
        probe_localize(nn.Sequential(nn.Linear(4, 3)), record)


def test_diagnose_with_a_probe_record_flags_the_faulty_group() -> None:
    from lightning_beta.diagnosis import diagnose

    net = _mlp()
    x, loader = _data()
    record = record_probe(net, x[:128])
    bad = _moment_matched_permutation(net, x)
    # "auto" takes the probe when a record is given; the drift localizer would name a later group (test above).
    report = diagnose(bad, loader, loader, probe=record, top_k=1, max_epochs=1, logger=False)
    assert report.scores.method == "probe"
    assert report.flagged == ["0"]
    with pytest.raises(ValueError, match='`localizer="probe"` needs `probe=`'):
        diagnose(bad, loader, loader, localizer="probe", top_k=1)


class _Keywords(nn.Module):
    """A model taking a dict batch as keyword arguments, as a Hugging Face model does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(self.embed(input_ids)) * attention_mask[..., None]
        return self.head(h.mean(1))


def test_dict_inputs_from_batches_are_cut_and_run_as_keyword_arguments() -> None:
    torch.manual_seed(0)
    net = _Keywords()
    ids = torch.randint(0, 10, (20, 5))
    mask = torch.ones(20, 5)
    batches = [{"input_ids": ids[i : i + 8], "attention_mask": mask[i : i + 8]} for i in range(0, 20, 8)]
    record = record_probe(net, batches, max_samples=12, replay=False)
    assert record.n_samples == 12 and torch.equal(record.inputs["input_ids"], ids[:12])
    with torch.no_grad():
        body = net.body(net.embed(ids[:12]))
    proj = torch.randn(40, 64, generator=torch.Generator().manual_seed(zlib.crc32(b"body"))) / 8.0
    torch.testing.assert_close(record.sketches["body"], body.reshape(12, -1) @ proj)
    assert probe_localize(net, record).degenerate
    with torch.no_grad():
        net.body.bias.add_(0.5)
    assert probe_localize(net, record).ranking[0] == "body"
    # One dict of tensors is one batch; its tensors must agree on dim 0.
    assert record_probe(net, {"input_ids": ids, "attention_mask": mask}, replay=False).n_samples == 20
    with pytest.raises(ValueError, match=r"`inputs` holds tensors of different sizes along dim 0 \[4, 20\]"):
        record_probe(net, {"input_ids": ids, "attention_mask": mask[:4]})
    with pytest.raises(TypeError, match=r"`forward` must be None or a callable forward\(model, inputs\), got int"):
        record_probe(net, batches, forward=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`forward` must be None or a callable"):
        probe_localize(net, record, forward="model")  # type: ignore[arg-type]


def test_a_custom_forward_keeps_whole_batches_and_runs_them_again() -> None:
    net = _mlp()
    x, loader = _data()
    calls = []

    def forward(model: nn.Module, batch: object) -> torch.Tensor:
        calls.append(type(batch).__name__)
        inputs, _ = batch  # type: ignore[misc]
        return model(inputs)

    record = record_probe(net, loader, max_samples=100, forward=forward)
    assert isinstance(record.inputs, list) and record.n_samples == 100 and torch.equal(record.inputs[0], x[:100])
    bad = _moment_matched_permutation(net, x)
    assert probe_localize(bad, record, forward=forward).ranking[0] == "0"
    assert calls == ["list", "list"]


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.net = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_names_recorded_on_a_wrapper_match_the_inner_model_with_the_prefix_stripped() -> None:
    net = _mlp()
    x, _ = _data()
    bad = _moment_matched_permutation(net, x)
    for groups in (None, 2):  # "auto" descends into the wrapper; a depth loses one level with the prefix
        record = record_probe(_Wrapper(net), x[:64], groups=groups)
        assert record.order == ["net.0", "net.2", "net.4"]
        scores = probe_localize(bad, record)
        assert list(scores.scores) == ["0", "2", "4"] and scores.ranking[0] == "0"
        assert scores.scores["2"] == scores.scores["4"] == 0.0
        assert "the record's group names carry the prefix 'net.'" in (scores.message or "")
        # The wrapper itself: the names as recorded, no prefix stripped, the same scores.
        direct = probe_localize(_Wrapper(bad), record)
        assert list(direct.scores) == ["net.0", "net.2", "net.4"] and "prefix" not in (direct.message or "")
        assert list(direct.scores.values()) == list(scores.scores.values())
    other = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 3))
    with pytest.raises(
        ValueError, match=r"its groups are \['0', '1'\], the record's are \['net.0', 'net.2', 'net.4'\]"
    ):
        probe_localize(other, record)


def test_localizer_probe_without_any_probe_says_where_one_comes_from() -> None:
    from lightning_beta.artifact import AttributionArtifact, GroupTotals
    from lightning_beta.diagnosis import diagnose

    net = _mlp()
    _, loader = _data()
    empty = GroupTotals(None, None, None, 0, 0)
    art = AttributionArtifact({"0": 80}, {}, [], [], [], {"0": empty}, empty)  # no probe_path
    with pytest.raises(ValueError, match=r"or `reference=` an artifact with a probe"):
        diagnose(net, loader, loader, localizer="probe", reference=art, top_k=1)


def test_replay_inputs_are_kept_within_a_budget_or_not_at_all():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    whole = record_probe(net, x)  # inputs of the groups "0" and "2": 32 x 4 and 32 x 8 float32 = 1536 bytes
    assert set(whole.replay_inputs) == {"0", "2"}
    assert record_probe(net, x, max_replay_bytes=1536).replay_inputs.keys() == {"0", "2"}
    over = record_probe(net, x, max_replay_bytes=1535)
    assert over.replay_inputs == {} and over.order == ["0", "2"]
    assert all("exceed `max_replay_bytes` (1535 bytes)" in over.reasons[name] for name in ("0", "2"))
    torch.testing.assert_close(over.sketches["2"], whole.sketches["2"])  # the sketches do not depend on it


class _Tokens(nn.Module):
    """A ViT-like model: a position table held by the root, added before the first block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.randn(6, 8))
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x) + self.pos).mean(1))


def test_a_change_in_a_group_that_cannot_be_scored_is_blamed_on_it():
    torch.manual_seed(0)
    net = _Tokens()
    record = record_probe(net, torch.randn(32, 6, 4))
    assert "pos" not in record.order  # a parameter of the root is no module: not recorded
    with torch.no_grad():
        net.pos.copy_(net.pos.flip(0))  # the positions shuffled
    scores = probe_localize(net, record)
    # Every recorded group reproduces its own function on its recorded input, yet the outputs moved.
    assert scores.details["own"]["block"] == 0.0 and scores.details["output"]["head"] > 0.1
    assert scores.ranking[0] == "pos" and scores.scores["pos"] == max(scores.details["output"].values())
    assert "the cause is in a group that could not be scored, ['pos']" in (scores.message or "")


def test_a_record_of_another_run_is_pointed_out():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))  # same shapes
    x = torch.randn(32, 4)
    record = record_probe(other, x)
    scores = probe_localize(ours, record)
    assert "the weights of 3 of 3 groups differ from those the probe was recorded with" in (scores.message or "")
    assert all(value > 0 for value in scores.details["weights"].values())
    with torch.no_grad():
        other[2].weight.mul_(2.0)  # a fault in one group: no such note
    faulty = probe_localize(other, record)
    assert "differ from those the probe was recorded" not in (faulty.message or "")
    assert faulty.details["weights"]["2"] > 0 and faulty.details["weights"]["0"] == 0.0
