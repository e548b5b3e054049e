"""What LayerAttributionCallback costs under ModelParallel (FSDP2) against DDP: two CPU ranks, side by side.

Run: ``python benchmarks/sharded.py [--quick] [--steps N] [--warmup W] [--log-every K] [--repeats R]``.

The same MLP (16 linear layers of width 256, 32 parameter tensors) is fitted on two CPU ranks over gloo, in
spawned workers (``tests/multidevice/model_parallel.py``), under ``DDPStrategy`` and under ``ModelParallelStrategy``
with ``fully_shard`` per layer and at the root, each with and without ``LayerAttributionCallback(reference_batches=0)``,
in alternating order, ``--repeats`` times. On every rank and step after a warm-up, the wall time of the callback's
per-step hook (``on_before_optimizer_step``, where it also logs and flushes) is recorded, and every collective of
``torch.distributed`` called inside its hooks is counted. Reported per strategy: the median hook time per step (both
ranks, all repeats), the median step time without the callback, their ratio, and the collectives per flush (the hook
calls that issued any collective) and per step, and the median hook time of those flushing calls. The ranks have one
thread each (Lightning's default for two CPU processes). ``--quick`` (1 repeat, 6 steps after 2 warm-up steps,
logging every 4) is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import machine_lines

from lightning_beta import LayerAttributionCallback
from tests.helpers import SpawnDDP
from tests.multidevice.model_parallel import TIMEOUT, SpawnModelParallel

BATCH = 32  # per rank
WIDTH, DEPTH = 256, 16
#: The collectives of ``torch.distributed`` that are counted (looked up by attribute at call time, as Lightning and
#: the package call them).
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter_tensor",
    "reduce",
    "broadcast",
    "broadcast_object_list",
    "barrier",
)
#: The callback's hooks in which collectives are counted; the first is timed per step.
HOOKS = ("on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end")


class DeepMLP(pl.LightningModule):
    """``DEPTH`` linear layers of width ``WIDTH``; ``fully_shard`` per layer and at the root under ModelParallel."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH - 1)], nn.Linear(WIDTH, 10))

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.layers:
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Timed(pl.Callback):
    """Per-step wall time of the training batches, on every rank, written to ``<out>/<tag>-rank<r>.json``."""

    def __init__(self, out: Path, tag: str, warmup: int) -> None:
        self.out, self.tag, self.warmup = out, tag, warmup
        self.step_s: list[float] = []
        self.hook_s: list[float] = []  # every per-step hook call after the warm-up
        self.flush_s: list[float] = []  # the hook calls among those that issued collectives
        self.collectives: list[list[str]] = []  # the collectives of each hook call that issued any
        self.counting = False
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.warmup:
            self.step_s.append(time.perf_counter() - self._start)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        payload = {
            "step_s": self.step_s,
            "hook_s": self.hook_s,
            "flush_s": self.flush_s,
            "collectives": self.collectives,
        }
        (self.out / f"{self.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(payload))


def instrument(callback: pl.Callback, timed: Timed) -> None:
    """Time ``callback``'s per-step hook and count the collectives in its hooks (in the rank, at fit start)."""
    calls: list[str] = []
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_counted", False):
            continue

        def counted(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kwargs: Any) -> Any:
            if timed.counting:
                calls.append(_name)
            return _original(*args, **kwargs)

        counted._counted = True  # type: ignore[attr-defined]
        setattr(dist, name, counted)
    for hook in HOOKS:
        method = getattr(callback, hook)

        def wrapped(trainer: pl.Trainer, *args: Any, _method: Callable[..., Any] = method, _hook: str = hook) -> Any:
            calls.clear()
            timed.counting = True
            start = time.perf_counter()
            try:
                return _method(trainer, *args)
            finally:
                elapsed = time.perf_counter() - start
                timed.counting = False
                if _hook == HOOKS[0] and trainer.global_step >= timed.warmup:
                    timed.hook_s.append(elapsed)
                    if calls:
                        timed.flush_s.append(elapsed)
                if calls:
                    timed.collectives.append(sorted(calls))

        setattr(callback, hook, wrapped)


class Instrumented(LayerAttributionCallback):
    """``LayerAttributionCallback(reference_batches=0)`` whose hooks are timed and counted once the rank runs."""

    def __init__(self, timed: Timed, **kwargs: Any) -> None:
        super().__init__(reference_batches=0, **kwargs)
        self.timed = timed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        instrument(self, self.timed)


def loader(steps: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps, WIDTH, generator=gen)
    y = torch.randint(0, 10, (BATCH * steps,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def run(out: Path, tag: str, strategy: str, attribution: bool, steps: int, warmup: int, log_every: int) -> None:
    timed = Timed(out, tag, warmup)
    callbacks: list[pl.Callback] = [timed]
    if attribution:
        callbacks.insert(0, Instrumented(timed))
    made = SpawnModelParallel() if strategy == "ModelParallel (FSDP2)" else SpawnDDP(timeout=TIMEOUT)
    trainer = pl.Trainer(
        strategy=made,
        accelerator="cpu",
        devices=2,
        max_steps=steps + warmup,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(out, name=tag),
        log_every_n_steps=log_every,
        use_distributed_sampler=False,  # the same per-rank batches under both strategies
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    torch.manual_seed(0)
    trainer.fit(DeepMLP(), loader(steps + warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat of 6 steps after 2, logging every 4 (smoke)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per fit, after the warm-up")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each fit")
    parser.add_argument("--log-every", type=int, default=10, help="the Trainer's log_every_n_steps")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup, args.log_every = 1, 6, 2, 4
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    strategies = ["DDP", "ModelParallel (FSDP2)"]
    started = time.perf_counter()
    results: dict[str, dict[str, list[Any]]] = {
        s: {"hook": [], "flush": [], "bare": [], "coll": []} for s in strategies
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for rep in range(args.repeats):
            order = strategies if rep % 2 == 0 else strategies[::-1]
            for strategy in order:
                for attribution in (False, True):
                    tag = f"{'mp' if 'Model' in strategy else 'ddp'}-{int(attribution)}-{rep}"
                    run(out, tag, strategy, attribution, args.steps, args.warmup, args.log_every)
                    for path in sorted(out.glob(f"{tag}-rank*.json")):
                        data = json.loads(path.read_text())
                        if attribution:
                            results[strategy]["hook"] += data["hook_s"]
                            results[strategy]["flush"] += data["flush_s"]
                            results[strategy]["coll"].append(data["collectives"])
                        else:
                            results[strategy]["bare"] += data["step_s"]
            print(f"  repeat {rep + 1}/{args.repeats}", file=sys.stderr)
    lines = [
        "| strategy | hook time per step (median) | step time, no callback (median) | hook / step"
        " | collectives per flush | flushes per fit | collectives per step | hook time of a flush (median) |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for strategy in strategies:
        r = results[strategy]
        hook_us = 1e6 * statistics.median(r["hook"])
        step_ms = 1e3 * statistics.median(r["bare"])
        kinds = sorted({" + ".join(call) for rank in r["coll"] for call in rank})
        per_step = statistics.mean(sum(map(len, rank)) for rank in r["coll"]) / (args.steps + args.warmup)
        flushes = statistics.mean(len(rank) for rank in r["coll"])
        flush = f"{1e6 * statistics.median(r['flush']):.0f} us" if r["flush"] else "-"
        lines.append(
            f"| {strategy} | {hook_us:.0f} us | {step_ms:.2f} ms | {hook_us / (10 * step_ms):.2f}%"
            f" | {'; '.join(kinds) or 'none'} | {flushes:.0f} | {per_step:.3f} | {flush} |"
        )
    command = "python benchmarks/sharded.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            *machine_lines(command),
            "",
            *lines,
            "",
            f"Two CPU ranks (gloo), MLP of {DEPTH} linear layers of width {WIDTH} ({2 * DEPTH} tensors), batch"
            f" {BATCH} per rank, {args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} repeats,"
            f" `log_every_n_steps={args.log_every}`. Collectives: calls of `torch.distributed` inside the callback's"
            " hooks (per rank); a flush is a hook call that issued any; a fit has"
            f" {args.steps + args.warmup} steps.",
            f"Run time: {time.perf_counter() - started:.0f} s.",
        ]
    )
    print(text)


if __name__ == "__main__":
    main()
