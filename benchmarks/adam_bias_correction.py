"""Adam's bias correction under a scheduled ``beta1``: how far torch's update is from the one the betas call for.

Run: ``python benchmarks/adam_bias_correction.py [--steps N] [--write]``.

torch's Adam divides the first moment by ``1 - beta1_t**t`` with the *current* ``beta1_t``. A first moment built
with changing betas, ``m_t = beta1_t*m_{t-1} + (1 - beta1_t)*g_t``, carries the total weight ``1 - prod_s beta1_s``,
so the unbiased estimate divides by that product instead. With BetaMomentumCallback's schedule
(``beta1_t = critical_momentum(lr_t)``, clamped to 0.99, left as it is while ``lr == 0``) the two differ.

The measurement is exact and deterministic: one scalar parameter, gradient 1 at every step, ``beta2`` constant (so
its correction is exact and ``v_hat = 1``). The unbiased Adam step is then exactly ``lr_t``, and torch's step divided
by ``lr_t`` *is* the ratio of torch's update to the update the betas actually used call for. It is printed beside the
closed form ``(1 - prod_s beta1_s) / (1 - beta1_t**t)``; the two agree to float precision.

Cases: linear warmup from lr 0 to 1e-3 over 100 steps then constant; the same warmup to 1e-2; a warmup from 1e-4
(``LinearLR(start_factor=0.1)``); cosine decay from 1e-3;
constant 1e-3 (beta1 constant: ratio 1 exactly, the control).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_beta.functional import critical_momentum

INITIAL_BETA1 = 0.9  # the optimizer's own beta1, kept while lr == 0 (a frozen group is left alone)
REPORT_STEPS = (2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)


def schedules(steps: int) -> dict[str, Callable[[int], float]]:
    """lr at optimizer step ``t`` (1-based), per case."""
    return {
        "warmup 0->1e-3 (100 steps)": lambda t: 1e-3 * min(t - 1, 100) / 100,
        "warmup 0->1e-2 (100 steps)": lambda t: 1e-2 * min(t - 1, 100) / 100,
        "warmup 1e-4->1e-3 (100 steps)": lambda t: 1e-4 + 0.9e-3 * min(t - 1, 100) / 100,
        "cosine 1e-3->0": lambda t: 0.5e-3 * (1 + math.cos(math.pi * (t - 1) / steps)),
        "constant 1e-3": lambda t: 1e-3,
    }


def measure(lr_at: Callable[[int], float], steps: int) -> list[tuple[int, float, float, float, float]]:
    """(t, lr_t, beta1_t, torch step / lr_t, closed form) for each step with lr_t > 0."""
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch.optim.Adam([param], lr=0.0, betas=(INITIAL_BETA1, 0.999), eps=1e-30)
    group = optimizer.param_groups[0]
    product, rows = 1.0, []
    for t in range(1, steps + 1):
        lr = lr_at(t)
        group["lr"] = lr
        if lr > 0:  # the callback's write; a frozen group keeps its beta1
            group["betas"] = (critical_momentum(lr, max_momentum=0.99), 0.999)
        beta1 = group["betas"][0]
        product *= beta1
        before = param.detach().clone()
        param.grad = torch.ones((), dtype=torch.float64)
        optimizer.step()
        if lr > 0:
            measured = float((before - param.detach()) / lr)
            rows.append((t, lr, beta1, measured, (1 - product) / (1 - beta1**t)))
    return rows


def report(steps: int) -> str:
    lines = [
        "## Adam bias correction with a scheduled beta1",
        "",
        "torch's Adam step divided by the step the betas actually used call for (exact for a constant gradient).",
        "",
        f"- Command: `python benchmarks/adam_bias_correction.py --steps {steps}`",
        "",
        "| case | "
        + " | ".join(f"t={t}" for t in REPORT_STEPS if t <= steps)
        + " | max | last step off by 1% or more |",
        "|---|" + "---:|" * (len([t for t in REPORT_STEPS if t <= steps]) + 2),
    ]
    for name, lr_at in schedules(steps).items():
        rows = measure(lr_at, steps)
        by_step = {t: (measured, closed) for t, _, _, measured, closed in rows}
        for measured, closed in by_step.values():
            if not math.isclose(measured, closed, rel_tol=1e-6):
                raise RuntimeError(f"{name}: torch's step {measured} differs from the closed form {closed}")
        cells = [f"{by_step[t][0]:.3f}" if t in by_step else "-" for t in REPORT_STEPS if t <= steps]
        worst = max(rows, key=lambda r: abs(r[3] - 1))
        late = [t for t, _, _, m, _ in rows if abs(m - 1) >= 0.01]
        settle = "none" if not late else str(max(late))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst[3]:.4f} (t={worst[0]}) | {settle} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    body = report(args.steps)
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_section

        write_section(body)


if __name__ == "__main__":
    main()
