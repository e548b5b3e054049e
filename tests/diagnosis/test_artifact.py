from __future__ import annotations

import json
import math
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_beta.artifact import (
    AttributionArtifact,
    GroupTotals,
    ReferenceStats,
    artifact_from_dict,
    load_attribution,
    save_attribution,
)
from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from lightning_beta.figures import attribution_heatmap, heatmap_rows
from tests.helpers import TinyModel, make_loader, trainer_kwargs


def _artifact(**overrides: Any) -> AttributionArtifact:
    kwargs: dict[str, Any] = {
        "groups": {"body": 100, "head": 4},
        "parameters": {"body": ["body.0.weight"], "head": ["head.weight"]},
        "history_epochs": [0, 1],
        "history": [[1.0, 0.5], [2.0, None]],
        "history_total": [1.1, 2.0],
        "totals": {"body": GroupTotals(1.5, 1.6, 2.0, 2, 0), "head": GroupTotals(0.5, 0.5, 0.5, 1, 1)},
        "total": GroupTotals(1.55, 1.6, 2.0, 2, 1),
        "norm_type": math.inf,
        "reference": {"head": ReferenceStats([0.0, 1.0], [1.0, 2.0], 16)},
        "reference_skipped": ["body"],
        "interval_steps": [3, 7],
        "interval_history": [[1.0, 0.5], [2.0, None]],
    }
    kwargs.update(overrides)
    return AttributionArtifact(**kwargs)


def test_round_trip(tmp_path: Any) -> None:
    art = _artifact()
    path = save_attribution(art, tmp_path / "sub" / "attribution.json")
    assert load_attribution(path) == art
    assert load_attribution(str(path)) == art
    assert [p.name for p in path.parent.iterdir()] == ["attribution.json"]  # no temp file left behind


def test_fit_artifact_round_trips(tmp_path: Any) -> None:
    cb = LayerAttributionCallback(reference_batches=2)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[cb])).fit(TinyModel(), make_loader())
    assert cb.artifact is not None and cb.artifact_path is not None
    loaded = load_attribution(cb.artifact_path)
    assert loaded == cb.artifact
    assert json.loads(cb.artifact_path.read_text())["schema_version"] == 3
    assert loaded.probe_path == "attribution.probe.pt" and loaded.path == cb.artifact_path
    assert loaded.parameters["head"] == ["head.weight", "head.bias"]
    assert loaded.history_tensor().shape == (2, 2)


def test_ranking_and_size_normalisation() -> None:
    art = _artifact()
    scores = art.size_normalised()
    assert scores == {"body": pytest.approx(0.15), "head": pytest.approx(0.25)}
    assert [name for name, _ in art.ranking()] == ["head", "body"]  # the smaller group wins once normalised
    table = art.ranking_markdown()
    assert table.splitlines()[2].startswith("| 1 | head | 4 |")
    assert (
        _artifact(totals={**art.totals, "head": GroupTotals(None, None, None, 0, 0)}).size_normalised()["head"] is None
    )


def test_version_1_artifacts_are_still_read() -> None:
    # Version 1 had no "intervals"; everything else is read as before.
    data = _artifact().to_dict()
    del data["intervals"]
    old = artifact_from_dict({**data, "schema_version": 1})
    assert old.interval_steps == [] and old.interval_history == []
    assert old.totals == _artifact().totals and old.history == _artifact().history


def test_version_2_artifacts_are_read_without_a_probe(tmp_path: Any) -> None:
    # Version 2 had no "probe_path": read as an artifact without a probe, which load_probe says.
    data = _artifact().to_dict()
    del data["probe_path"]
    path = _write(tmp_path, {**data, "schema_version": 2})
    old = load_attribution(path)
    assert old.probe_path is None and old.path == path and old.totals == _artifact().totals
    with pytest.raises(ValueError, match=r"`artifact` has no probe: it was written with `probe_samples=0`"):
        old.load_probe()


def test_heatmap_rows_and_figure() -> None:
    art = _artifact()
    assert heatmap_rows(art) == ("epoch", ["0", "1"], [[1.0, 2.0], [0.5, None]])
    one_epoch = _artifact(history_epochs=[0], history=[[1.0, 0.5]], history_total=[1.1])
    assert heatmap_rows(one_epoch) == ("optimizer step", ["3", "7"], [[1.0, 2.0], [0.5, None]])
    ax, bar = attribution_heatmap(art, title="t").axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["body", "head"]
    assert ax.get_title() == "t" and bar.get_ylabel() == "log10 mean gradient Linf norm"
    values = ax.images[0].get_array()
    assert values[0].tolist() == [0.0, pytest.approx(math.log10(2.0))] and bool(values.mask[1, 1])


def test_writer_is_atomic_and_refuses_nan(tmp_path: Any) -> None:
    path = save_attribution(_artifact(), tmp_path / "attribution.json")
    before = path.read_text()
    bad = _artifact(history_total=[float("nan"), 1.0])
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        save_attribution(bad, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["attribution.json"]


def _write(tmp_path: Any, data: Any) -> Any:
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: [1, 2], "expected a JSON object, got list"),
        (lambda d: {"metrics": {}}, r"missing key\(s\) \['schema_version', 'kind'"),
        (lambda d: {**d, "kind": "checkpoint"}, "`kind` is 'checkpoint'"),
        (lambda d: {**d, "schema_version": 99}, "has schema_version 99; this release reads 1, 2 and 3"),
        (lambda d: {**d, "probe_path": "../probe.pt"}, "`probe_path` must be null or a file name beside the artifact"),
        (lambda d: {**d, "intervals": {"steps": [1], "mean": []}}, "`intervals` must have one row of 2 values"),
        (lambda d: {**d, "groups": [{"name": "body"}]}, "malformed field"),
        (lambda d: {**d, "history": {**d["history"], "mean": [[1.0], [2.0, 3.0]]}}, "one row of 2 values per epoch"),
        (lambda d: {**d, "totals": {"body": d["totals"]["body"]}}, r"`totals` names \['body'\]"),
        (lambda d: {**d, "reference": {"neck": d["reference"]["head"]}}, r"unknown group\(s\) \['neck'\]"),
    ],
)
def test_non_artifact_json_raises(tmp_path: Any, mutate: Any, match: str) -> None:
    data = _artifact().to_dict()
    with pytest.raises(ValueError, match=match):
        load_attribution(_write(tmp_path, mutate(data)))


def test_bad_inputs(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        load_attribution(_write(tmp_path, "{not json"))
    with pytest.raises(TypeError, match="`path` must be a str or os.PathLike, got int"):
        load_attribution(3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_attribution(tmp_path / "missing.json")
