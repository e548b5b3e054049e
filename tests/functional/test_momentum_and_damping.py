import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_beta.functional import DampingRegime, classify_regime, critical_momentum, damping_ratio
from lightning_beta.functional.momentum import unclamped_critical_momentum

# Golden values by hand. paper: 1 - 2*sqrt(lr); exact: (1 - sqrt(lr))**2, then clamp to [0, 0.99].
#   lr=0.1:    sqrt=0.316227766 -> paper 0.367544468, exact 0.683772234**2 = 0.467544468
#   lr=0.01:   sqrt=0.1         -> paper 0.8,         exact 0.81
#   lr=0.0025: sqrt=0.05        -> paper 0.9,         exact 0.9025
#   lr=0.25:   sqrt=0.5         -> paper 0.0,         exact 0.25
#   lr=1.0:    sqrt=1           -> paper -1 -> 0.0,   exact 0.0
#   lr=0:      sqrt=0           -> paper 1 -> 0.99,   exact 1 -> 0.99
GOLDEN = [
    (0.1, 0.367544468, 0.467544468),
    (0.01, 0.8, 0.81),
    (0.0025, 0.9, 0.9025),
    (0.25, 0.0, 0.25),
    (1.0, 0.0, 0.0),
    (0.0, 0.99, 0.99),
]


@pytest.mark.parametrize(("lr", "paper", "exact"), GOLDEN)
def test_critical_momentum_golden_float(lr, paper, exact):
    assert critical_momentum(lr) == pytest.approx(paper, abs=1e-9)
    assert critical_momentum(lr, rule="exact") == pytest.approx(exact, abs=1e-9)
    assert isinstance(critical_momentum(lr), float)


def test_critical_momentum_golden_tensor_same_kind():
    lrs = torch.tensor([g[0] for g in GOLDEN], dtype=torch.float64)
    paper = critical_momentum(lrs)
    exact = critical_momentum(lrs, rule="exact")
    assert isinstance(paper, torch.Tensor) and paper.dtype == torch.float64 and paper.shape == lrs.shape
    torch.testing.assert_close(paper, torch.tensor([g[1] for g in GOLDEN], dtype=torch.float64))
    torch.testing.assert_close(exact, torch.tensor([g[2] for g in GOLDEN], dtype=torch.float64))


def test_critical_momentum_tensor_never_calls_item(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "__float__", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    out = critical_momentum(torch.tensor(0.01), rule="exact")
    assert isinstance(out, torch.Tensor)


def test_curvature_and_bounds():
    # curvature 4 at lr 0.01: sqrt(0.04) = 0.2 -> paper 0.6, exact 0.64
    assert critical_momentum(0.01, curvature=4.0) == pytest.approx(0.6)
    assert critical_momentum(0.01, curvature=4.0, rule="exact") == pytest.approx(0.64)
    assert critical_momentum(0.1, min_momentum=0.5) == 0.5
    assert critical_momentum(1e-6, max_momentum=0.95) == 0.95


def test_damping_ratio_golden():
    # paper: (1 - 0.9) / (2*sqrt(0.01)) = 0.1 / 0.2 = 0.5; at lr 0.0025: 0.1 / 0.1 = 1
    assert damping_ratio(0.9, 0.01) == pytest.approx(0.5)
    assert damping_ratio(0.9, 0.0025) == pytest.approx(1.0)
    # exact: (1 - sqrt(0.81)) / sqrt(0.01) = 0.1 / 0.1 = 1; (1 - sqrt(0.64)) / 0.1 = 2
    assert damping_ratio(0.81, 0.01, rule="exact") == pytest.approx(1.0)
    assert damping_ratio(0.64, 0.01, rule="exact") == pytest.approx(2.0)
    # curvature 4: (1 - 0.9) / (2*sqrt(0.04)) = 0.25
    assert damping_ratio(0.9, 0.01, curvature=4.0) == pytest.approx(0.25)
    assert damping_ratio(0.9, 0.0) == math.inf
    assert math.isnan(damping_ratio(1.0, 0.0))


def test_damping_ratio_tensor():
    zeta = damping_ratio(torch.tensor([0.9, 0.9]), torch.tensor([0.01, 0.0025]))
    torch.testing.assert_close(zeta, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(damping_ratio(0.9, torch.tensor(0.01)), torch.tensor(0.5))


def test_classify_regime():
    assert classify_regime(0.5) is DampingRegime.UNDERDAMPED
    assert classify_regime(0.9) is DampingRegime.CRITICAL
    assert classify_regime(1.1) is DampingRegime.CRITICAL
    assert classify_regime(1.11) is DampingRegime.OVERDAMPED
    assert classify_regime(1.15, tolerance=0.2) is DampingRegime.CRITICAL
    assert classify_regime(math.inf) is DampingRegime.OVERDAMPED
    assert DampingRegime.CRITICAL == "critical"
    codes = classify_regime(torch.tensor([0.5, 0.95, 1.5, float("nan")]))
    assert codes[:3].tolist() == [-1.0, 0.0, 1.0]
    assert torch.isnan(codes[3])
    assert classify_regime(torch.tensor([2, 0])).tolist() == [1.0, -1.0]


def test_regime_codes_round_trip():
    for regime in DampingRegime:
        assert DampingRegime.from_code(regime.code) is regime
    with pytest.raises(ValueError, match="`code` must be -1, 0 or 1"):
        DampingRegime.from_code(2)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: critical_momentum(-0.1), ValueError, "learning rate `lr` must be a finite number >= 0, got -0.1"),
        (lambda: critical_momentum(float("nan")), ValueError, "`lr` must be a finite number >= 0, got nan"),
        (lambda: critical_momentum(float("inf")), ValueError, "`lr` must be a finite number >= 0, got inf"),
        (lambda: critical_momentum(0.1, rule="magic"), ValueError, "`rule` must be one of"),
        (lambda: critical_momentum(0.1, curvature=0.0), ValueError, "`curvature` must be a finite number > 0"),
        (lambda: critical_momentum(0.1, curvature=-1.0), ValueError, "`curvature` must be a finite number > 0"),
        (lambda: critical_momentum(0.1, curvature="1"), TypeError, "`curvature` must be a positive float, got str"),
        (lambda: critical_momentum(0.1, min_momentum=-0.1), ValueError, "`min_momentum` must be >= 0"),
        (lambda: critical_momentum(0.1, max_momentum=1.0), ValueError, "`max_momentum` must be < 1"),
        (lambda: critical_momentum(0.1, min_momentum=0.6, max_momentum=0.5), ValueError, "must be <= `max_momentum`"),
        (lambda: critical_momentum(0.1, max_momentum=float("nan")), ValueError, "`max_momentum` must be finite"),
        (lambda: damping_ratio(1.5, 0.1), ValueError, r"`momentum` must be in \[0, 1\], got 1.5"),
        (lambda: damping_ratio(0.9, -1.0), ValueError, "`lr` must be a finite number >= 0"),
        (lambda: classify_regime(1.0, tolerance=1.0), ValueError, r"`tolerance` must be in \[0, 1\)"),
        (lambda: classify_regime(float("nan")), ValueError, "`zeta` is NaN"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


lrs = st.floats(min_value=0.0, max_value=1e3, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@settings(max_examples=300, deadline=None)
@given(lr=st.floats(min_value=1e-12, max_value=0.2499, allow_subnormal=False), rule=st.sampled_from(["paper", "exact"]))
def test_critical_momentum_is_critical_where_unclamped(lr, rule):
    mu = unclamped_critical_momentum(lr, rule=rule)
    assert 0.0 <= mu <= 1.0
    assert damping_ratio(mu, lr, rule=rule) == pytest.approx(1.0, rel=1e-6)


@settings(max_examples=300, deadline=None)
@given(a=lrs, b=lrs, rule=st.sampled_from(["paper", "exact"]))
def test_critical_momentum_monotone_and_bounded(a, b, rule):
    low, high = min(a, b), max(a, b)
    mu_low, mu_high = critical_momentum(low, rule=rule), critical_momentum(high, rule=rule)
    assert mu_low >= mu_high
    assert 0.0 <= mu_high <= mu_low <= 0.99


@settings(max_examples=100, deadline=None)
@given(lr=lrs, rule=st.sampled_from(["paper", "exact"]))
def test_float_and_tensor_agree(lr, rule):
    as_tensor = critical_momentum(torch.tensor(lr, dtype=torch.float64), rule=rule)
    assert as_tensor.item() == pytest.approx(critical_momentum(lr, rule=rule), abs=1e-12)


# The crossover switch, by hand: (armed, switched, reached) -> (armed, switched) after the step.
#   not armed, physics above the constant (a warmup that starts above) -> stays unarmed, no switch
#   not armed, below -> armed;  armed, still below -> armed, no switch;  armed, reached -> switch
#   already switched stays switched whatever follows
CROSSOVER = [
    ((False, False, True), (False, False)),
    ((False, False, False), (True, False)),
    ((True, False, False), (True, False)),
    ((True, False, True), (True, True)),
    ((True, True, False), (True, True)),
]


@pytest.mark.parametrize(("given", "expected"), CROSSOVER)
def test_crossover_update_bool_and_tensor_agree(given, expected):
    from lightning_beta.functional.momentum import crossover_update

    assert crossover_update(*given) == expected
    out = crossover_update(*(torch.tensor(v) for v in given))
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in out)
    assert tuple(bool(t) for t in out) == expected


def test_crossover_over_a_warmup_and_decay():
    from lightning_beta.functional.momentum import crossover_update

    # lr 0.001 (physics 0.937 >= 0.9), 0.01 (0.8 < 0.9), 0.004 (0.874), 0.0025 (0.9: reached) -> switch at index 3
    armed, switched, fired = False, False, []
    for lr in (0.001, 0.01, 0.004, 0.0025):
        armed, switched = crossover_update(armed, switched, critical_momentum(lr) >= 0.9 - 1e-12)
        fired.append(switched)
    assert fired == [False, False, False, True]


def test_dampening_golden():
    from lightning_beta._optim import effective_lr

    # SGD lr 0.04, dampening 0.75: buf = mu*buf + 0.25*g is heavy ball at 0.01 -> paper 0.8, exact 0.81
    lr_eff = effective_lr({"lr": 0.04, "dampening": 0.75})
    assert lr_eff == pytest.approx(0.01)
    assert critical_momentum(lr_eff) == pytest.approx(0.8)
    assert critical_momentum(lr_eff, rule="exact") == pytest.approx(0.81)
    tensor_eff = effective_lr({"lr": torch.tensor(0.04), "dampening": 0.75})
    assert isinstance(tensor_eff, torch.Tensor) and float(tensor_eff) == pytest.approx(0.01)
