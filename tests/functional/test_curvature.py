from __future__ import annotations

import math

import pytest
import torch

from lightning_beta.functional.curvature import (
    SecantCurvature,
    check_decay,
    ema_update_,
    group_sq_sums,
    secant_curvature,
)
from lightning_beta.functional.grad_norms import group_norms


def test_group_norms_by_hand() -> None:
    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]]), torch.tensor([12.0])]
    out = group_norms(tensors, torch.tensor([0, 1, 0]), 3)
    assert out.tolist() == pytest.approx([13.0, 5.0, 0.0])
    assert out.dtype == torch.float32


def test_group_norms_empty_and_half() -> None:
    assert group_norms([], torch.zeros(0, dtype=torch.long), 2).tolist() == [0.0, 0.0]
    out = group_norms([torch.tensor([3.0, 4.0], dtype=torch.float16)], torch.tensor([0]), 1)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(5.0)
    sums = group_sq_sums([torch.tensor([3.0, 4.0], dtype=torch.float16), torch.tensor([2.0])], torch.tensor([0, 1]), 3)
    assert sums.dtype == torch.float32 and sums.tolist() == pytest.approx([25.0, 4.0, 0.0])


def test_secant_curvature_guards() -> None:
    change = torch.tensor([2.0, 1.0, float("nan"), 1.0])
    step = torch.tensor([0.5, 0.0, 1.0, float("inf")])
    out = secant_curvature(change, step, fallback=torch.full((4,), 7.0))
    assert out.tolist() == [4.0, 7.0, 7.0, 0.0]
    assert torch.isnan(secant_curvature(torch.tensor([1.0]), torch.tensor([0.0]))).all()


def test_ema_update_starts_at_first_finite_value() -> None:
    avg, count = torch.zeros(3), torch.zeros(3)
    ema_update_(avg, torch.tensor([4.0, float("nan"), float("inf")]), 0.75, count)
    assert avg.tolist() == [4.0, 0.0, 0.0] and count.tolist() == [1.0, 0.0, 0.0]
    ema_update_(avg, torch.tensor([8.0, 2.0, 1.0]), 0.75, count)
    assert avg.tolist() == [5.0, 2.0, 1.0] and count.tolist() == [2.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("decay", "error", "match"),
    [
        (1.0, ValueError, r"`decay` must be in \[0, 1\), got 1.0"),
        ("0.5", TypeError, "`decay` must be a float, got str"),
    ],
)
def test_check_decay(decay: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_decay(decay)  # type: ignore[arg-type]


def test_estimator_rejects_empty_groups() -> None:
    with pytest.raises(ValueError, match="`groups` must name at least one parameter group"):
        SecantCurvature({})
    with pytest.raises(ValueError, match="group 'a' has no parameter"):
        SecantCurvature({"a": []})


def _heavy_ball(est: SecantCurvature, params: list[torch.nn.Parameter], grad_fn, steps: int, lr: float) -> None:
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        for p, g in zip(params, grad_fn()):
            p.grad = g
        est.observe()
        opt.step()


def test_estimator_exact_on_quadratic_per_group() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))
    lam = {"a": 2.0, "b": 9.0}
    est = SecantCurvature({"a": [a], "b": [b]}, decay=0.5)
    assert est.memory_bytes == 2 * (5 + 6) * 4  # previous gradient and previous parameters
    _heavy_ball(est, [a, b], lambda: [lam["a"] * a.detach(), lam["b"] * b.detach()], steps=6, lr=0.02)
    assert est.curvature.tolist() == pytest.approx([2.0, 9.0], rel=1e-4)
    assert est.count.tolist() == [5.0, 5.0]


def test_estimator_within_ten_percent_with_noise() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50) * 3)
    est = SecantCurvature({"w": [w]}, decay=0.9)
    _heavy_ball(est, [w], lambda: [4.0 * w.detach() + 0.01 * torch.randn(50)], steps=20, lr=0.01)
    assert math.isclose(est.curvature.item(), 4.0, rel_tol=0.1)


def test_estimator_restarts_pairing_when_a_grad_is_missing() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    est = SecantCurvature({"a": [a], "b": [b]}, decay=0.0)
    for step in range(4):
        a.grad = 3.0 * a.detach()
        b.grad = None if step == 2 else 5.0 * b.detach()
        est.observe()
        with torch.no_grad():
            a -= 0.1 * a.grad
            if b.grad is not None:
                b -= 0.1 * b.grad
    # a: estimates at steps 1, 2, 3; b: step 1 only (step 2 had no gradient, step 3 has no previous pair).
    assert est.count.tolist() == [3.0, 1.0]
    assert est.curvature.tolist() == pytest.approx([3.0, 5.0])


def test_estimator_skipped_update_keeps_estimate() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    est = SecantCurvature({"w": [w]}, decay=0.0)
    for step in range(5):
        w.grad = 2.0 * w.detach()
        est.observe()
        if step != 2:  # an update skipped (e.g. by a GradScaler): the next pair has no step
            with torch.no_grad():
                w -= 0.1 * w.grad
    assert est.curvature.item() == pytest.approx(2.0)
    assert est.count.item() == 3.0  # pairs (0, 1), (1, 2), (3, 4); (2, 3) has no step


def test_estimator_skipped_inf_step_does_not_poison_the_average() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    est = SecantCurvature({"w": [w]}, decay=0.5)
    for step in range(6):
        if step == 2:  # a GradScaler overflow: non-finite gradient, update skipped
            w.grad = torch.full((3,), float("inf"))
            est.observe()
            continue
        w.grad = 5.0 * w.detach()
        est.observe()
        with torch.no_grad():
            w -= 0.1 * w.grad
    assert torch.isfinite(est.curvature).all()
    assert est.curvature.item() == pytest.approx(5.0)
    assert est.count.item() == 3.0  # pairs (0, 1), (3, 4), (4, 5)


def test_estimator_divides_out_a_pending_scale() -> None:
    """Gradients still multiplied by a loss scale that changes between steps (fused optimizer under fp16 AMP)."""
    w = torch.nn.Parameter(torch.ones(4))
    est = SecantCurvature({"w": [w]}, decay=0.0)
    for step in range(4):
        scale = torch.tensor(2.0 ** (10 - step))
        w.grad = scale * 3.0 * w.detach()
        est.observe(scale)
        with torch.no_grad():
            w -= 0.1 * w.grad / scale
    assert est.curvature.item() == pytest.approx(3.0, rel=1e-6)


def test_estimator_state_round_trip() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    est = SecantCurvature({"w": [w]}, decay=0.0)
    _heavy_ball(est, [w], lambda: [6.0 * w.detach()], steps=3, lr=0.01)
    other = SecantCurvature({"w": [torch.nn.Parameter(torch.ones(3))], "x": [torch.nn.Parameter(torch.ones(1))]})
    other.load_state_dict(est.state_dict())
    assert other.curvature[0].item() == pytest.approx(6.0)
    assert torch.isnan(other.curvature[1])
    assert other.count.tolist() == [2.0, 0.0]


def _flush_together(ranks: list[SecantCurvature]) -> None:
    """What an all-reduce (sum) over two ranks does at a flush: each rank adds the other's waiting sums."""
    waiting = [est._waiting[: est._n_waiting].clone() for est in ranks]
    for est, other in zip(ranks, reversed(waiting)):
        est._reduce = lambda t, other=other: t + other
        est.flush()


def test_sharded_estimators_reduced_match_the_whole_tensors() -> None:
    """Two "ranks" each hold half of every parameter; their squared sums, summed at flush, give the whole secant."""
    torch.manual_seed(0)
    whole = {"a": torch.nn.Parameter(torch.randn(6)), "b": torch.nn.Parameter(torch.randn(4))}
    lam = {"a": torch.linspace(1.0, 3.0, 6), "b": torch.linspace(5.0, 8.0, 4)}  # not isotropic: the halves differ

    def half(t: torch.Tensor, rank: int) -> torch.Tensor:
        n = t.numel() // 2
        return t[rank * n : (rank + 1) * n]

    shards = [{n: torch.nn.Parameter(half(p.detach(), r).clone()) for n, p in whole.items()} for r in range(2)]
    reference = SecantCurvature({n: [p] for n, p in whole.items()}, decay=0.5)
    alone = SecantCurvature({n: [p] for n, p in shards[0].items()}, decay=0.5)  # one shard, never reduced
    ranks = [SecantCurvature({n: [p] for n, p in shard.items()}, decay=0.5, reduce=lambda t: t) for shard in shards]
    for step in range(5):
        for name, p in whole.items():
            p.grad = lam[name] * p.detach()
        for r, shard in enumerate(shards):
            for name, p in shard.items():
                p.grad = half(lam[name], r) * p.detach()
        for est in (reference, alone, *ranks):
            est.observe()
        with torch.no_grad():
            for p in [*whole.values(), *(p for shard in shards for p in shard.values())]:
                p -= 0.05 * p.grad
        if step == 2:  # a logging step: both ranks flush at the same step
            _flush_together(ranks)
    _flush_together(ranks)
    for est in ranks:
        assert est.curvature.tolist() == pytest.approx(reference.curvature.tolist(), rel=1e-5)
        assert est.count.tolist() == reference.count.tolist() == [4.0, 4.0]
    assert alone.curvature.tolist() != pytest.approx(reference.curvature.tolist(), rel=1e-2)
