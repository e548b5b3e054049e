"""What the callbacks cost: per-step time and memory against a bare fit, measured side by side in one process.

Run: ``python benchmarks/overhead.py [--quick] [--repeats R] [--steps N] [--write]``.

For each model, every configuration (bare, each callback alone, all three, Lightning's ``LearningRateMonitor``,
and the ``grad_norm`` recipe ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``) is
fitted for ``--steps`` optimizer steps, in a shuffled order, ``--repeats`` times. The time of the training steps
after a warm-up is taken from inside the fit; the ratio to the bare fit of the same repeat is the overhead. The
median ratio and its interquartile range are reported. ``--write`` replaces the "Overhead" section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback
from lightning_beta.demos.digits import DigitsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_lines, replace_section

WARMUP = 10


class StepTimer(pl.Callback):
    """Wall time of the training steps after ``WARMUP`` steps (no validation runs)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > WARMUP:
            self.end = time.perf_counter()
            self.steps = trainer.global_step - WARMUP

    @property
    def ms_per_step(self) -> float:
        return 1000 * (self.end - self.start) / self.steps


class GradNormRecipe(pl.Callback):
    """Lightning's documented recipe, as a callback: log every parameter's gradient norm at every step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class WideMLP(pl.LightningModule):
    """About 100 parameter tensors: 50 linear layers of width 64 in 10 blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.blocks = nn.ModuleList(nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)]) for _ in range(10))
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(h)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10_000)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


MODELS: dict[str, Callable[[], pl.LightningModule]] = {
    "demo CNN (DigitsResNet, 25 tensors)": lambda: DigitsClassifier(arch="resnet", lr=0.05),
    "wide MLP (102 tensors)": WideMLP,
}

CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "bare": list,
    "BetaMomentumCallback": lambda: [BetaMomentumCallback()],
    "DampingRegimeMonitor": lambda: [DampingRegimeMonitor()],
    "LayerAttributionCallback": lambda: [LayerAttributionCallback(reference_batches=0)],
    "all three": lambda: [
        BetaMomentumCallback(),
        DampingRegimeMonitor(),
        LayerAttributionCallback(reference_batches=0),
    ],
    "LearningRateMonitor(log_momentum=True)": lambda: [LearningRateMonitor(log_momentum=True)],
    "grad_norm recipe": lambda: [GradNormRecipe()],
}


def loader(steps: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64 * steps, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (64 * steps,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=64)


def fit(model_fn: Callable[[], pl.LightningModule], callbacks: list[pl.Callback], steps: int, logger: Any) -> None:
    """One quiet CPU fit of ``steps`` optimizer steps, no validation, seed 0."""
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model_fn(), loader(steps))


def fit_once(model_fn: Callable[[], pl.LightningModule], config: str, steps: int, root: Path) -> float:
    timer = StepTimer()
    fit(model_fn, [*CONFIGS[config](), timer], steps + WARMUP, TensorBoardLogger(root, name=config.replace(" ", "_")))
    return timer.ms_per_step


def callback_bytes(callbacks: list[pl.Callback]) -> int:
    """Bytes of the tensors a callback holds (its accumulators and buffers), found through its attributes."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal total
        if depth > 4 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Parameter):  # the model's own parameters, not memory the callback added
            return
        if isinstance(obj, Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, pl.Trainer, torch.optim.Optimizer)):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for callback in callbacks:
        visit(callback, 0)
    return total


def held_memory(model_fn: Callable[[], pl.LightningModule], config: str, root: Path) -> int:
    callbacks = CONFIGS[config]()
    fit(model_fn, callbacks, 3, TensorBoardLogger(root, name="memory"))
    return callback_bytes(callbacks)


#: The per-step hooks of each callback: where its cost per optimizer step is spent.
HOOKS: dict[str, tuple[type[pl.Callback], list[str]]] = {
    "BetaMomentumCallback": (BetaMomentumCallback, ["on_before_optimizer_step"]),
    "DampingRegimeMonitor": (DampingRegimeMonitor, ["on_before_optimizer_step", "_after_step"]),
    "LayerAttributionCallback": (LayerAttributionCallback, ["on_before_optimizer_step"]),
}


def _timed(method: Callable[..., Any], per_step: dict[int, float]) -> Callable[..., Any]:
    """``method`` with its wall time added to ``per_step[trainer.global_step]`` (its first argument is the trainer)."""

    def timed(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = method(trainer, *args, **kwargs)
        per_step[trainer.global_step] = per_step.get(trainer.global_step, 0.0) + time.perf_counter() - start
        return result

    return timed


def hook_times(model_fn: Callable[[], pl.LightningModule], steps: int, root: Path) -> dict[str, float]:
    """Median wall time per optimizer step spent in each callback's per-step hooks (microseconds).

    Less noisy than the ratio of two whole fits: it times only the callback's own code, logging steps included.
    """
    out = {}
    for name, (cls, hooks) in HOOKS.items():
        per_step: dict[int, float] = {}
        callback = cls(reference_batches=0) if cls is LayerAttributionCallback else cls()
        for hook in hooks:
            setattr(callback, hook, _timed(getattr(callback, hook), per_step))
        fit(model_fn, [callback], steps + WARMUP, TensorBoardLogger(root, name="hooks"))
        times = [per_step[k] for k in sorted(per_step)][WARMUP:]
        out[name] = 1e6 * statistics.median(times)
    return out


def measure(repeats: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for model_name, model_fn in MODELS.items():
            times: dict[str, list[float]] = {c: [] for c in CONFIGS}
            ratios: dict[str, list[float]] = {c: [] for c in CONFIGS}
            fit_once(model_fn, "bare", 5, root)  # warm caches and imports
            for rep in range(repeats):
                order = list(CONFIGS)
                rng.shuffle(order)
                this = {config: fit_once(model_fn, config, steps, root) for config in order}
                for config, ms in this.items():
                    times[config].append(ms)
                    ratios[config].append(ms / this["bare"])
                print(f"  {model_name} repeat {rep + 1}/{repeats}", file=sys.stderr)
            bare = statistics.median(times["bare"])
            hooks = hook_times(model_fn, steps, root)
            for config in CONFIGS:
                q = statistics.quantiles(ratios[config], n=4) if len(ratios[config]) > 1 else [ratios[config][0]] * 3
                rows.append(
                    {
                        "model": model_name,
                        "config": config,
                        "ms": statistics.median(times[config]),
                        "ratio": statistics.median(ratios[config]),
                        "q1": q[0],
                        "q3": q[2],
                        "bare_ms": bare,
                        "bytes": held_memory(model_fn, config, root),
                        "hook_us": hooks.get(config),
                    }
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | configuration | ms/step (median) | ratio to bare (median) | IQR of ratio | hook time per step"
        " | hook time / bare step | tensors held |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        hook = "" if r["hook_us"] is None else f"{r['hook_us']:.0f} us"
        share = "" if r["hook_us"] is None else f"{r['hook_us'] / (10 * r['bare_ms']):.2f}%"
        lines.append(
            f"| {r['model']} | {r['config']} | {r['ms']:.2f} | {r['ratio']:.3f} | [{r['q1']:.3f}, {r['q3']:.3f}]"
            f" | {hook} | {share} | {r['bytes'] / 1024:.1f} KiB |"
        )
    return "\n".join(lines)


def cheaper_than_recipe(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for model in MODELS:
        by = {r["config"]: r for r in rows if r["model"] == model}
        ours = by["all three"]["ratio"] - 1
        recipe = by["grad_norm recipe"]["ratio"] - 1
        factor = f"{recipe / ours:.1f}x" if ours > 0 else "not measurable (our overhead <= 0)"
        lines.append(
            f"- {model}: all three add {ours:+.1%}, the grad_norm recipe adds {recipe:+.1%}; the recipe's overhead is"
            f" {factor} ours."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats of 20 steps (a smoke run)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    repeats, steps = (2, 20) if args.quick else (args.repeats, args.steps)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = measure(repeats, steps)
    text = "\n".join(
        [
            table(rows),
            "",
            *cheaper_than_recipe(rows),
            "",
            f"{repeats} interleaved repeats of {steps} timed steps (after {WARMUP} warm-up steps) per configuration,"
            " batch 64, one CPU thread, TensorBoard logger with `log_every_n_steps=50`.",
            f"Run time: {time.perf_counter() - started:.0f} s.",
        ]
    )
    print(text)
    if args.write:
        command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
        replace_section("Overhead", [*machine_lines(command), "", text])


if __name__ == "__main__":
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, {platform.python_version()}", file=sys.stderr)
    main()
