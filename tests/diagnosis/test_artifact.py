from __future__ import annotations

import json
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_beta.callbacks.layer_attribution import LayerAttributionCallback
from lightning_beta.diagnosis import AttributionArtifact, GroupTotals, ReferenceStats, load_attribution
from lightning_beta.artifact import heatmap_image, save_attribution
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
    assert json.loads(cb.artifact_path.read_text())["schema_version"] == 1
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


def test_heatmap_image() -> None:
    image = heatmap_image(torch.tensor([[1.0, 10.0], [100.0, float("nan")]]), cell=3)
    assert image.shape == (6, 6, 3) and image.dtype == torch.uint8
    assert image[0, 0].tolist() == [68, 1, 84]  # smallest: the dark end of the colormap
    assert image[3, 0].tolist() == [253, 231, 37]  # largest: yellow
    assert image[3, 3].tolist() == [128, 128, 128]  # missing: grey
    flat = heatmap_image(torch.full((1, 2), 3.0), cell=1)
    assert flat[0, 0].tolist() == flat[0, 1].tolist()
    assert _artifact().heatmap(cell=2).shape == (4, 4, 3)


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
        (lambda d: {**d, "schema_version": 99}, "has schema_version 99; this release reads 1"),
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
