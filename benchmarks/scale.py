"""How the per-step cost of LayerAttributionCallback grows with parameter tensors and layer groups.

Run: ``python benchmarks/scale.py [--quick] [--write]``.

The time of the callback's ``on_before_optimizer_step`` alone is measured inside real fits (a wrapper around the
hook), for models of 10 to 1000 parameter tensors split into 1 to 100 groups. It reports the median microseconds
per step, the cost in the first and last third of the steps (flat in steps means no state grows), and a
least-squares fit ``time = a + b * tensors`` with the log-log slope (1 means linear in tensors).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta import LayerAttributionCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_lines, replace_section


class TimedAttribution(LayerAttributionCallback):
    """The callback, with the wall time of each ``on_before_optimizer_step`` recorded."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.times: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.times.append(time.perf_counter() - start)


class Blocks(pl.LightningModule):
    """``groups`` top-level blocks holding ``tensors`` parameter tensors in all (Linear 8x8: weight and bias)."""

    def __init__(self, tensors: int, groups: int) -> None:
        super().__init__()
        layers = max(tensors // 2, groups)
        per_group = [layers // groups + (1 if g < layers % groups else 0) for g in range(groups)]
        for g, n in enumerate(per_group):
            self.add_module(f"block{g}", nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)]))

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for block in self.children():
            for layer in block:
                out = out + 0.01 * layer(out)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def run(tensors: int, groups: int, steps: int, root: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = Blocks(tensors, groups)
    # group_by=1: one group per top-level block ("auto" would descend into a single block).
    callback = TimedAttribution(group_by=1, reference_batches=0)
    data = TensorDataset(torch.randn(8 * steps, 8), torch.randn(8 * steps, 8))
    trainer = pl.Trainer(
        max_steps=steps,
        log_every_n_steps=0,  # the per-step hook alone: no logging step
        callbacks=[callback],
        logger=False,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    times = callback.times[5:]  # the first steps build index caches
    third = max(len(times) // 3, 1)
    return {
        "tensors": sum(1 for _ in model.parameters()),
        "groups": len(callback.groups),
        "us": 1e6 * statistics.median(times),
        "first": 1e6 * statistics.median(times[:third]),
        "last": 1e6 * statistics.median(times[-third:]),
    }


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few sizes, 20 steps")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    steps = 20 if args.quick else args.steps
    tensor_sizes = [10, 100] if args.quick else [10, 30, 100, 300, 1000]
    group_sizes = [1, 10] if args.quick else [1, 3, 10, 30, 100]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        by_tensors = [run(t, 5, steps, Path(tmp)) for t in tensor_sizes]
        by_groups = [run(200, g, steps, Path(tmp)) for g in group_sizes]
    lines = ["### Parameter tensors (5 groups)", "", "| tensors | us/step (median) | first third | last third |"]
    lines.append("|---:|---:|---:|---:|")
    lines += [f"| {r['tensors']} | {r['us']:.0f} | {r['first']:.0f} | {r['last']:.0f} |" for r in by_tensors]
    a, b = fit_line([r["tensors"] for r in by_tensors], [r["us"] for r in by_tensors])
    loglog = fit_line([math.log(r["tensors"]) for r in by_tensors], [math.log(r["us"]) for r in by_tensors])[1]
    lines += ["", f"Fit: time = {a:.0f} us + {b:.2f} us x tensors; log-log slope {loglog:.2f}.", ""]
    lines += ["### Layer groups (200 tensors)", "", "| groups | us/step (median) | first third | last third |"]
    lines.append("|---:|---:|---:|---:|")
    lines += [f"| {r['groups']} | {r['us']:.0f} | {r['first']:.0f} | {r['last']:.0f} |" for r in by_groups]
    ga, gb = fit_line([r["groups"] for r in by_groups], [r["us"] for r in by_groups])
    drift = max(abs(r["last"] / r["first"] - 1) for r in by_tensors + by_groups)
    lines += [
        "",
        f"Fit: time = {ga:.0f} us + {gb:.2f} us x groups.",
        f"Largest change between the first and last third of a run: {drift:.0%} (flat in steps means no growth).",
        f"{steps} steps per run, one CPU thread; hook time only. Run time: {time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
        replace_section("Scale", [*machine_lines(command), "", text])


if __name__ == "__main__":
    main()
