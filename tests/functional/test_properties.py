"""Property-based tests of the functional core over the whole float range: 0, subnormals, huge, inf and NaN."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_beta.functional import classify_regime, critical_momentum, damping_ratio
from lightning_beta.functional.damping import DampingRegime
from lightning_beta.functional.grad_norms import ABSENT, add_group_powers_, combine_norms, grouped_norms, step_norms
from lightning_beta.functional.momentum import unclamped_critical_momentum

#: Per test, not a global profile: other modules keep hypothesis defaults.
SETTINGS = settings(deadline=None, max_examples=200)

any_float = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
lr_ok = st.floats(min_value=0.0, allow_infinity=False, allow_nan=False, allow_subnormal=True)
subnormal = st.floats(min_value=5e-324, max_value=sys.float_info.min, exclude_max=True, allow_subnormal=True)
rules = st.sampled_from(["paper", "exact"])
bounds = st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.99)).map(sorted)
momentum_ok = st.floats(min_value=0.0, max_value=1.0, allow_subnormal=True)
tolerance = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@SETTINGS
@given(any_float, rules, bounds)
def test_float_lr_is_rejected_or_clamped(lr: float, rule: str, lo_hi: list[float]) -> None:
    low, high = lo_hi
    if math.isnan(lr) or math.isinf(lr) or lr < 0:
        with pytest.raises(ValueError, match="learning rate `lr` must be a finite number >= 0"):
            critical_momentum(lr, rule=rule, min_momentum=low, max_momentum=high)
        with pytest.raises(ValueError, match="`lr`"):
            damping_ratio(0.9, lr, rule=rule)
        return
    value = critical_momentum(lr, rule=rule, min_momentum=low, max_momentum=high)
    assert isinstance(value, float) and low <= value <= high


@SETTINGS
@given(subnormal, rules)
def test_subnormal_lr_is_a_tiny_lr(lr: float, rule: str) -> None:
    """A subnormal lr works and, like any lr below ~1e-4, gives the upper clamp."""
    assert critical_momentum(lr, rule=rule) == 0.99
    assert critical_momentum(lr, rule=rule, max_momentum=0.999999) == 0.999999
    assert unclamped_critical_momentum(lr, rule=rule) <= 1.0
    assert damping_ratio(0.9, lr, rule=rule) > 1e100  # finite but enormous: heavily overdamped


@SETTINGS
@given(lr_ok, lr_ok, rules)
def test_momentum_non_increasing_in_lr(a: float, b: float, rule: str) -> None:
    lo, hi = sorted((a, b))
    assert critical_momentum(hi, rule=rule) <= critical_momentum(lo, rule=rule)


@SETTINGS
@given(st.floats(min_value=1e-12, max_value=0.2499), rules)
def test_unclamped_critical_momentum_has_zeta_one(lr: float, rule: str) -> None:
    assert damping_ratio(unclamped_critical_momentum(lr, rule=rule), lr, rule=rule) == pytest.approx(1.0, rel=1e-6)


@SETTINGS
@given(momentum_ok, lr_ok, rules)
def test_damping_ratio_is_non_negative_or_undefined_only_at_rest(mu: float, lr: float, rule: str) -> None:
    zeta = damping_ratio(mu, lr, rule=rule)
    if lr == 0.0:
        assert math.isinf(zeta) if mu < 1.0 else math.isnan(zeta)
    else:
        assert zeta >= 0.0 and not math.isnan(zeta)


@SETTINGS
@given(any_float)
def test_damping_ratio_rejects_momentum_outside_unit_interval(mu: float) -> None:
    if not math.isnan(mu) and 0.0 <= mu <= 1.0:
        return
    with pytest.raises(ValueError, match="`momentum` must be in"):
        damping_ratio(mu, 0.01)


@SETTINGS
@given(any_float, tolerance)
def test_classify_regime_partitions_the_line(zeta: float, tol: float) -> None:
    if math.isnan(zeta):
        with pytest.raises(ValueError, match="`zeta` is NaN"):
            classify_regime(zeta, tol)
        assert math.isnan(classify_regime(torch.tensor([zeta], dtype=torch.float64), tol).item())
        return
    regime = classify_regime(zeta, tol)
    expected = (
        DampingRegime.UNDERDAMPED
        if zeta < 1 - tol
        else DampingRegime.OVERDAMPED
        if zeta > 1 + tol
        else DampingRegime.CRITICAL
    )
    assert regime is expected
    assert classify_regime(torch.tensor([zeta], dtype=torch.float64), tol).item() == regime.code


@SETTINGS
@given(st.lists(any_float, min_size=1, max_size=16), rules, bounds, st.sampled_from([torch.float32, torch.float64]))
def test_tensor_lr_never_raises_and_stays_clamped(
    lrs: list[float], rule: str, lo_hi: list[float], dtype: torch.dtype
) -> None:
    """Tensors are never validated (no host sync): NaN or negative entries give NaN, documented; the rest is clamped."""
    low, high = lo_hi
    lr = torch.tensor(lrs, dtype=torch.float64).to(dtype)
    out = critical_momentum(lr, rule=rule, min_momentum=low, max_momentum=high)
    assert out.shape == lr.shape and out.dtype == dtype
    bad = torch.isnan(lr) | (lr < 0)
    assert torch.isnan(out[bad]).all()
    good = out[~bad].double()
    assert ((good >= low - 1e-7) & (good <= high + 1e-7)).all()  # float32 rounding of the bounds
    zeta = damping_ratio(torch.full_like(lr, 0.5), lr, rule=rule)  # never raises either
    assert zeta.shape == lr.shape


@SETTINGS
@given(lr_ok, rules)
def test_float_and_tensor_agree_everywhere(lr: float, rule: str) -> None:
    tensor = critical_momentum(torch.tensor(lr, dtype=torch.float64), rule=rule)
    assert tensor.item() == pytest.approx(critical_momentum(lr, rule=rule), abs=1e-12)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)


@SETTINGS
@given(st.lists(st.lists(finite_or_not, min_size=1, max_size=4), min_size=1, max_size=6), st.integers(1, 3))
def test_grouped_norms_are_finite_and_flag_the_rest(tensors: list[list[float]], n_groups: int) -> None:
    """Non-finite entries, and groups whose norm overflows float32 (e.g. two entries of 3e19), are flagged and
    zeroed; a finite norm matches a float64 recomputation (to ~1e-19, where float32 squares underflow)."""
    grads = [torch.tensor(t, dtype=torch.float32) for t in tensors]
    index = torch.tensor([i % n_groups for i in range(len(grads))])
    norms, present, nonfinite = grouped_norms(grads, index, n_groups)
    assert torch.isfinite(norms).all()
    for g in range(n_groups):
        members = [t for t, i in zip(grads, index.tolist()) if i == g]
        assert bool(present[g]) == bool(members)
        if not members:
            continue
        exact = torch.linalg.vector_norm(torch.cat(members).double()).item()
        if math.isfinite(exact) and exact < 1e19:
            assert not nonfinite[g] and norms[g].item() == pytest.approx(exact, rel=1e-5, abs=1e-18)
        elif not math.isfinite(exact):
            assert nonfinite[g] and norms[g].item() == 0.0


def test_grouped_norms_overflow_of_a_sum_is_flagged() -> None:
    norms, _, nonfinite = grouped_norms([torch.tensor([3e19]), torch.tensor([3e19])], torch.tensor([0, 0]), 1)
    assert nonfinite.tolist() == [True] and norms.tolist() == [0.0]


@SETTINGS
@given(
    st.lists(st.lists(st.lists(finite_or_not, min_size=1, max_size=3), min_size=1, max_size=5), min_size=1, max_size=4),
    st.integers(1, 3),
    st.sampled_from([1.0, 2.0, 1.5, math.inf]),
    st.floats(1e-3, 1e5),
)
def test_batched_step_norms_equal_one_step_at_a_time(
    steps: list[list[list[float]]], n_groups: int, norm_type: float, scale: float
) -> None:
    """``add_group_powers_`` per step and one ``step_norms`` over the rows give, bit for bit, what ``grouped_norms``
    then ``combine_norms`` in float64 give step by step (absent groups, non-finite and overflowing groups included)."""
    rows = torch.full((len(steps), n_groups), ABSENT)
    scales = torch.full((len(steps), 1), scale)
    expected_values, expected_valid, expected_bad = [], [], []
    for r, tensors in enumerate(steps):
        grads = [torch.tensor(t, dtype=torch.float32) for t in tensors]
        index = torch.tensor([(i * 2) % n_groups for i in range(len(grads))])  # n_groups=3 leaves group 1 absent
        rows[r, index.unique()] = 0.0
        add_group_powers_(rows[r], grads, index, norm_type)
        norms, present, bad = grouped_norms(grads, index, n_groups, norm_type)
        norms = norms / scales[r]
        total = combine_norms(norms.double(), norm_type).reshape(1)
        total_bad = (bad.any() | ~torch.isfinite(total)).reshape(1)
        valid = torch.cat([present & ~bad, present.any().reshape(1) & ~total_bad])
        expected_values.append(torch.where(valid, torch.cat([norms.double(), total]), 0.0))
        expected_valid.append(valid)
        expected_bad.append(torch.cat([bad, total_bad]))
    values, valid, bad = step_norms(rows, scales, norm_type)
    assert torch.equal(valid, torch.stack(expected_valid)) and torch.equal(bad, torch.stack(expected_bad))
    assert torch.equal(values, torch.stack(expected_values))
