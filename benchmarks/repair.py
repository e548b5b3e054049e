"""Repair benchmark: what each treatment recovers of a planted fault, and at what measured compute.

Five digits models (the BatchNorm ResNet and the MLP of ``lightning_beta.demos.digits``; the LayerNorm MLP, the plain
CNN and the two-block transformer of ``benchmarks/localization_heldout.py``), trained by one recipe, each given a
probe record of its healthy state (``record_probe`` on 256 training inputs, ``sketch_dim=256``, no replay: what
``LayerAttributionCallback`` records). Every fault family of ``localization_heldout.py`` is planted in each layer
group in turn, and each case is treated:

- restore: ``restore_from_probe(bad, [group], record)``, the faulty group given (the treatment alone);
- probe + restore: the group ``probe_localize`` names first, restored (localization and treatment, end to end);
- fixed: ``surgical_correction(bad, [group], train, max_epochs=3, lr=0.05)``, the task-loss retraining;
- search: ``surgical_correction(bad, [group], train, policy="search", budget=0.3, full_steps=...)``.

Recovered = (treated - faulty) / (clean - faulty) validation accuracy. Compute is measured wall time over that of
full retraining from scratch, like for like: restore (plain torch, no Trainer) against the recipe's plain torch
training loop; fixed and search (``Trainer.fit``) against the same recipe run by ``surgical_correction`` over every
group. Protocol: restore (L-BFGS, ``max_iter``, ``sketch_dim``) was designed looking at the ResNet and the MLP with
the noise, reinit and scale families on seeds 0 and 1 (``design`` rows); every other case is ``held out``: the other
seeds, the families that keep per-channel statistics and the bad fine-tune, and the LayerNorm MLP, plain CNN and
transformer.

    python benchmarks/repair.py --quick           # 1 seed, resnet and mlp, restore only; prints
    python benchmarks/repair.py --write           # 3 seeds (fixed and search on seed 0), writes "## Repair"
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_lines, write_section
from localization import QUIET
from localization_heldout import DESIGN, EPOCHS, HELDOUT, MIN_DROP, accuracy, build, plant, train

from lightning_beta.demos.digits import digits_dataloaders
from lightning_beta.diagnosis import surgical_correction
from lightning_beta.diagnosis.probe import probe_localize
from lightning_beta.diagnosis.restore import restore_from_probe
from lightning_beta.layer_groups import group_parameters
from lightning_beta.probe import record_probe

HEADING = "## Repair"
ARCHS = ("resnet", "mlp", "cnn", "lnmlp", "transformer")
DESIGN_ARCHS, DESIGN_SEEDS = ("resnet", "mlp"), (0, 1)
GOAL = (0.95, 0.90, 0.30)  # recovered share, share of cases, compute fraction
FIXED_EPOCHS, FIXED_LR, BUDGET = 3, 0.05, 0.3
PROBES, SKETCH = 256, 256
TRAINER_POLICIES = ("fixed", "search")
POLICIES = ("restore", "probe + restore", *TRAINER_POLICIES)


def scratch(arch: str, seed: int, loader: DataLoader, trainer: bool) -> tuple[torch.nn.Module, float, int]:
    """Full retraining from scratch by the recipe: the model, its wall time and its optimizer steps."""
    begin = time.perf_counter()
    net = train(arch, seed, loader)
    seconds, steps = time.perf_counter() - begin, EPOCHS[arch] * len(loader)
    if trainer:  # the same recipe through Trainer.fit, the unit of the Trainer-based treatments
        torch.manual_seed(seed)
        fresh = build(arch)
        res = surgical_correction(
            fresh, list(group_parameters(fresh)), loader, max_epochs=EPOCHS[arch], lr=0.1, momentum=0.9,
            weight_decay=5e-4, **QUIET,
        )  # fmt: skip
        seconds, steps = res.wall_time_s, res.optimizer_steps
    return net, seconds, steps


def treat(policy: str, bad, group: str, named: str, record, train_loader, full_steps: int):
    if policy == "restore":
        return restore_from_probe(bad, [group], record)
    if policy == "probe + restore":
        return restore_from_probe(bad, [named], record)
    if policy == "fixed":
        return surgical_correction(bad, [group], train_loader, max_epochs=FIXED_EPOCHS, lr=FIXED_LR, **QUIET)
    return surgical_correction(
        bad, [group], train_loader, policy="search", budget=BUDGET, full_steps=full_steps, **QUIET
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, resnet and mlp, restore only, nothing written")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trainer-seeds", type=int, default=1, help="seeds on which fixed and search also run")
    parser.add_argument("--arch", choices=ARCHS, nargs="+", default=list(ARCHS))
    parser.add_argument("--write", action="store_true", help=f"write the {HEADING!r} section of RESULTS.md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=Path, help="also write every case as JSON to this path")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else list(range(args.seeds))
    archs = ["resnet", "mlp"] if args.quick else args.arch
    trainer_seeds = [] if args.quick else seeds[: args.trainer_seeds]
    begin = time.perf_counter()
    rows: list[dict] = []
    skipped = 0
    units: dict[str, list[tuple[float, int]]] = {"torch": [], "trainer": []}
    for arch in archs:
        for seed in seeds:
            train_loader, val = digits_dataloaders(seed=seed)
            x_all = train_loader.dataset.tensors[0]
            net, torch_s, torch_steps = scratch(arch, seed, train_loader, trainer=False)
            units["torch"].append((torch_s, torch_steps))
            trainer_s = trainer_steps = None
            if seed in trainer_seeds:
                _, trainer_s, trainer_steps = scratch(arch, seed, train_loader, trainer=True)
                units["trainer"].append((trainer_s, trainer_steps))
            clean = accuracy(net, val)
            record = record_probe(net, x_all[:PROBES], sketch_dim=SKETCH, replay=False)
            for gi, group in enumerate(group_parameters(net)):
                for fi, kind in enumerate(DESIGN + HELDOUT):
                    bad = plant(net, group, kind, 1000 * seed + 10 * gi + fi, x_all, train_loader)
                    if bad is None:
                        continue
                    faulty = accuracy(bad, val)
                    finite = all(torch.isfinite(p).all() for p in bad.parameters())
                    if not finite or clean - faulty < MIN_DROP or group not in record.sketches:
                        skipped += 1
                        continue
                    named = probe_localize(bad, record).ranking[0]
                    split = "design" if arch in DESIGN_ARCHS and kind in DESIGN and seed in DESIGN_SEEDS else "held out"
                    for policy in POLICIES:
                        if policy in TRAINER_POLICIES and seed not in trainer_seeds:
                            continue
                        torch.manual_seed(seed)
                        res = treat(policy, bad, group, named, record, train_loader, trainer_steps or 0)
                        after = accuracy(res.model, val)
                        unit_s, unit_steps = (
                            (trainer_s, trainer_steps) if policy in TRAINER_POLICIES else (torch_s, torch_steps)
                        )
                        rows.append(
                            {
                                "arch": arch,
                                "seed": seed,
                                "group": group,
                                "fault": kind,
                                "split": split,
                                "policy": policy,
                                "named": named,
                                "clean": clean,
                                "faulty": faulty,
                                "after": after,
                                "recovered": (after - faulty) / (clean - faulty),
                                "time": res.wall_time_s / unit_s,
                                "steps": res.optimizer_steps / unit_steps,
                                "probe_error": [s["probe_error"]["final"] for s in res.stages if "probe_error" in s],
                            }
                        )
            print(f"{arch} seed {seed} done at {time.perf_counter() - begin:.0f}s (clean {clean:.3f})", flush=True)
    runtime = time.perf_counter() - begin
    command = "python benchmarks/repair.py" + (" --quick" if args.quick else f" --seeds {args.seeds} --write")
    text = render(rows, skipped, seeds, trainer_seeds, archs, units, command, runtime)
    print(text)
    if args.rows:
        args.rows.write_text(json.dumps(rows, indent=1))
    if args.write and not args.quick:
        write_section(text)
        print(f"wrote the {HEADING!r} section of benchmarks/RESULTS.md")


def _summary(rows: list[dict]) -> list[str]:
    rec = [r["recovered"] for r in rows]
    goal_rec, _, goal_compute = GOAL
    return [
        str(len(rows)),
        f"{100 * statistics.median(rec):.0f}%",
        f"{100 * sum(x >= goal_rec for x in rec) / len(rec):.0f}%",
        f"{100 * sum(x >= 0.7 for x in rec) / len(rec):.0f}%",
        f"{100 * statistics.median(r['time'] for r in rows):.1f}% (max {100 * max(r['time'] for r in rows):.0f}%)",
        f"{100 * sum(r['time'] < goal_compute for r in rows) / len(rows):.0f}%",
        f"{100 * sum(x >= goal_rec and r['time'] < goal_compute for x, r in zip(rec, rows)) / len(rows):.0f}%",
    ]


def _table(rows: list[dict], keys: list[tuple[str, list[dict]]]) -> list[str]:
    lines = [
        "| cases of | policy | cases | recovered (median) | >= 95% recovered | >= 70% recovered"
        " | wall time vs scratch (median) | < 30% of scratch | >= 95% at < 30% |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, sel in keys:
        for policy in POLICIES:
            chosen = [r for r in sel if r["policy"] == policy]
            if chosen:
                lines.append("| " + " | ".join([label, policy, *_summary(chosen)]) + " |")
    return lines


def render(rows, skipped, seeds, trainer_seeds, archs, units, command, runtime) -> str:
    goal_rec, goal_share, goal_compute = GOAL
    restored = [r for r in rows if r["policy"] == "restore"]
    hits = [r for r in rows if r["policy"] == "probe + restore"]
    lines = [
        HEADING,
        "",
        *machine_lines(command),
        f"- Runtime: {runtime / 60:.1f} min; seeds {seeds} (fixed and search on {trainer_seeds}); {skipped} planted"
        f" faults costing < {MIN_DROP:.0%} accuracy (or non-finite) not counted.",
        "",
        "What each treatment recovers of a fault planted in one layer group. restore: the group fitted back to its"
        f" probe record (L-BFGS, {PROBES} probes, sketch_dim {SKETCH}); probe + restore: the group the probe names"
        f" first, restored; fixed: {FIXED_EPOCHS} epochs at lr {FIXED_LR} on the task loss; search:"
        f' `policy="search"`, `budget={BUDGET}`. Recovered = (treated - faulty) / (clean - faulty) validation'
        " accuracy. Wall time is over full retraining from scratch, like for like (restore against the recipe's plain"
        " torch loop, fixed and search against the recipe run through `Trainer.fit`). Design cases: ResNet and MLP,"
        f" families {', '.join(DESIGN)}, seeds {list(DESIGN_SEEDS)}; every other case is held out.",
        "",
        f"Goal: >= {goal_rec:.0%} of the lost accuracy recovered in >= {goal_share:.0%} of cases at"
        f" < {goal_compute:.0%} of full retraining's measured compute.",
        "",
        "### By split and architecture",
        "",
    ]
    keys = [(split, [r for r in rows if r["split"] == split]) for split in ("design", "held out")]
    keys += [
        (f"held out, {arch}", [r for r in rows if r["split"] == "held out" and r["arch"] == arch]) for arch in archs
    ]
    lines += _table(rows, [(k, v) for k, v in keys if v])
    lines += ["", "### Held out, by fault family", ""]
    families = [(f, [r for r in rows if r["split"] == "held out" and r["fault"] == f]) for f in DESIGN + HELDOUT]
    lines += _table(rows, [(k, v) for k, v in families if v])
    if restored:
        wrong = sum(r["named"] != r["group"] for r in hits)
        errors = [e for r in restored for e in r["probe_error"]]
        lines += [
            "",
            f"The probe named another group than the faulty one first in {wrong} of {len(hits)} cases.",
            f"Restore's final relative sketch error: median {statistics.median(errors):.3g}, max {max(errors):.3g}.",
        ]
    for unit, label in (("torch", "plain torch loop"), ("trainer", "`Trainer.fit`")):
        if units[unit]:
            median = statistics.median(s for s, _ in units[unit])
            lines.append(f"Full retraining from scratch ({label}): median {median:.2f} s over {len(units[unit])} runs.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
