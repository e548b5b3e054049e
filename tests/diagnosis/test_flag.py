import math

import pytest

from lightning_beta.diagnosis import LayerScores, flag_layers, jaccard, optimizer_overlap, spearman

SCORES = {"a": 1.0, "b": 2.0, "c": 5.0, "d": 0.5}  # median 1.5


def test_flag_by_ratio_of_the_median():
    assert flag_layers(SCORES) == ["c"]  # threshold 3.0
    assert flag_layers(SCORES, ratio=1.0) == ["c", "b"]  # threshold 1.5, highest first
    assert flag_layers(SCORES, ratio=1 / 3) == ["c", "b", "a", "d"]  # threshold 0.5, inclusive
    assert flag_layers(LayerScores(SCORES, "gradient")) == ["c"]


def test_flag_top_k():
    assert flag_layers(SCORES, top_k=3) == ["c", "b", "a"]
    assert flag_layers(SCORES, top_k=10) == ["c", "b", "a", "d"]
    assert flag_layers({"x": 1.0, "y": 1.0, "z": 0.0}, top_k=2) == ["x", "y"]  # tie: group order


def test_zero_scores_flag_nothing():
    assert flag_layers({"a": 0.0, "b": 0.0}) == []
    assert flag_layers({"a": 0.0, "b": 0.0}, top_k=1) == []
    assert flag_layers({"a": 0.0, "b": 0.0, "c": 1.0}) == ["c"]  # median 0: any positive score qualifies


def test_flag_bad_inputs():
    with pytest.raises(ValueError, match="`scores` is empty"):
        flag_layers({})
    with pytest.raises(ValueError, match=r"finite and >= 0, got \{'a': -1.0\}"):
        flag_layers({"a": -1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"`ratio` must be in \(0.0, inf\], got 0"):
        flag_layers(SCORES, ratio=0)
    with pytest.raises(ValueError, match="`top_k` must be >= 1, got 0"):
        flag_layers(SCORES, top_k=0)
    with pytest.raises(TypeError, match="`top_k` must be None or an int, got float"):
        flag_layers(SCORES, top_k=1.5)
    with pytest.raises(TypeError, match="`scores` must be LayerScores or a dict"):
        flag_layers([1.0, 2.0])


def test_jaccard_golden():
    assert jaccard({"a", "b", "c"}, {"b", "c", "d"}) == 0.5
    assert jaccard([], []) == 1.0
    assert jaccard(["a"], ["b"]) == 0.0


def test_spearman_golden():
    # Ranks (1, 2, 3, 4) vs (1, 3, 2, 4): sum d^2 = 2, rho = 1 - 6*2 / (4*15) = 0.8.
    # torchmetrics adds 1e-6 to the denominator: results are within 1e-5 of the exact values.
    assert spearman({"p": 4, "q": 3, "r": 2, "s": 1}, {"p": 4, "q": 2, "r": 3, "s": 1}) == pytest.approx(0.8, rel=1e-5)
    assert spearman({"p": 1, "q": 2, "r": 3}, {"p": 3, "q": 2, "r": 1}) == pytest.approx(-1.0, rel=1e-5)
    # Ties share average ranks: ra = (2.5, 2.5, 1), rb = (3, 2, 1): cov 1.5, var 1.5 and 2 -> 1.5/sqrt(3).
    tied = spearman({"x": 1, "y": 1, "z": 2}, {"x": 1, "y": 2, "z": 3})
    assert tied == pytest.approx(1.5 / math.sqrt(3), rel=1e-5)
    # Two ties on each side: ranks (1.5, 1.5, 3.5, 3.5) vs (1, 2.5, 2.5, 4): cov 3, var 4 and 4.5 -> 3/sqrt(18).
    pairs = spearman({"a": 1, "b": 1, "c": 5, "d": 5}, {"a": 0, "b": 2, "c": 2, "d": 7})
    assert pairs == pytest.approx(3 / math.sqrt(18), rel=1e-5)
    assert math.isnan(spearman({"x": 1, "y": 1}, {"x": 1, "y": 2}))  # one side constant
    assert math.isnan(spearman({"x": 1}, {"x": 1}))


def test_optimizer_overlap():
    sgd = {"conv": 4.0, "bn": 1.0, "fc": 9.0, "layer": 1.5}
    adam = {"conv": 5.0, "bn": 1.2, "fc": 3.0, "layer": 1.0}
    assert optimizer_overlap(sgd, adam).flagged_a == ["fc"]  # median 2.75, threshold 5.5
    o = optimizer_overlap(sgd, adam, ratio=1.0)
    assert o.flagged_a == ["fc", "conv"] and o.flagged_b == ["conv", "fc"]  # medians 2.75 and 2.1
    assert o.jaccard == 1.0
    assert o.spearman == pytest.approx(0.6, rel=1e-5)  # ranks (2,4,1,3) vs (1,3,2,4): sum d^2 = 4, 1 - 24/60
    with pytest.raises(ValueError, match="must name the same groups"):
        optimizer_overlap({"a": 1.0}, {"b": 1.0})
