"""Repair benchmark: the treatment alone (the faulty group given), the fixed policy against the search policy.

Plants the faults of ``benchmarks/localization.py`` (noise, re-initialisation, per-channel scaling) in each layer
group of the digits ResNet and MLP trained by the same recipe, over several seeds, and treats each with the true
group named (an oracle localizer, so only the treatment is measured):

- fixed: ``surgical_correction(bad, [group], train, max_epochs=3, lr=0.05)``, the old default treatment;
- fixed, capped: the same, stopped at the search's step budget (``budget=0.3, full_steps=<scratch steps>``);
- search: ``surgical_correction(bad, [group], train, policy="search", budget=0.3, full_steps=<scratch steps>)``.

Reports, per case, clean, faulty and treated validation accuracy, the share of the lost accuracy recovered, and
compute as fractions of full retraining from scratch's measured optimizer steps and wall time. The search policy
was designed (candidate lrs, search share, patience) looking at the ``noise`` and ``reinit`` families only;
``scale`` is reported separately as held out.

    python benchmarks/repair.py --quick           # 2 seeds, ~8 min on 2 busy cores; prints
    python benchmarks/repair.py --quick --write   # and writes the "## Repair" section of RESULTS.md
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

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_lines, write_section
from localization import FAULTS, MIN_DROP, QUIET, RECIPE, accuracy, plant, train_from_scratch

from lightning_beta.demos.digits import digits_dataloaders
from lightning_beta.diagnosis import surgical_correction
from lightning_beta.layer_groups import group_parameters

HEADING = "## Repair"
DESIGN = ("noise", "reinit")
GOAL = (0.95, 0.90, 0.30)  # recovered share, share of cases, compute fraction
FIXED_EPOCHS, FIXED_LR, BUDGET = 3, 0.05, 0.3
POLICIES = ("fixed", "fixed, capped", "search")


def treat(policy: str, bad: torch.nn.Module, group: str, train: DataLoader, scratch_steps: int):
    if policy == "fixed":
        return surgical_correction(bad, [group], train, max_epochs=FIXED_EPOCHS, lr=FIXED_LR, **QUIET)
    if policy == "fixed, capped":
        capped = {"budget": BUDGET, "full_steps": scratch_steps}
        return surgical_correction(bad, [group], train, max_epochs=FIXED_EPOCHS, lr=FIXED_LR, **capped, **QUIET)
    return surgical_correction(bad, [group], train, policy="search", budget=BUDGET, full_steps=scratch_steps, **QUIET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help='write the "## Repair" section of RESULTS.md')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", choices=("resnet", "mlp"), nargs="+", default=["resnet", "mlp"])
    parser.add_argument("--rows", type=Path, help="also write every case as JSON to this path")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    seeds = [0, 1] if args.quick else list(range(args.seeds))
    begin = time.perf_counter()
    rows: list[dict] = []
    skipped = 0
    for arch in args.arch:
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            train, val = digits_dataloaders(seed=seed)
            net, scratch_time, scratch_steps = train_from_scratch(arch, seed, train)
            clean = accuracy(net, val)
            for gi, group in enumerate(group_parameters(net)):
                for fi, kind in enumerate(FAULTS):
                    bad = plant(net, group, kind, seed=1000 * seed + 10 * gi + fi)
                    faulty = accuracy(bad, val)
                    if clean - faulty < MIN_DROP:
                        skipped += 1
                        continue
                    for policy in POLICIES:
                        torch.manual_seed(seed)
                        res = treat(policy, bad, group, train, scratch_steps)
                        after = accuracy(res.model, val)
                        rows.append(
                            {
                                "arch": arch,
                                "seed": seed,
                                "group": group,
                                "fault": kind,
                                "policy": policy,
                                "clean": clean,
                                "faulty": faulty,
                                "after": after,
                                "recovered": (after - faulty) / (clean - faulty),
                                "steps": res.optimizer_steps / scratch_steps,
                                "time": res.wall_time_s / scratch_time,
                                "within_budget": res.budget_steps is None or res.optimizer_steps <= res.budget_steps,
                                "reinit": res.reinit,
                                "widened": bool(res.widened_to),
                                "lr": res.lr,
                            }
                        )
            print(f"{arch} seed {seed} done at {time.perf_counter() - begin:.0f}s (clean {clean:.3f})", flush=True)
    runtime = time.perf_counter() - begin
    command = "python benchmarks/repair.py" + (" --quick" if args.quick else f" --seeds {args.seeds}") + " --write"
    text = render(rows, skipped, seeds, command, runtime)
    print(text)
    if args.rows:
        args.rows.write_text(json.dumps(rows, indent=1))
    if args.write:
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
        f"{100 * statistics.mean(r['steps'] for r in rows):.0f}% (max {100 * max(r['steps'] for r in rows):.0f}%)",
        f"{100 * statistics.mean(r['time'] for r in rows):.0f}% (max {100 * max(r['time'] for r in rows):.0f}%)",
        f"{100 * sum(r['steps'] < goal_compute and r['time'] < goal_compute for r in rows) / len(rows):.0f}%",
        f"{sum(r['reinit'] for r in rows)} / {sum(r['widened'] for r in rows)}",
    ]


def render(rows: list[dict], skipped: int, seeds: list[int], command: str, runtime: float) -> str:
    goal_rec, goal_share, goal_compute = GOAL
    lines = [
        HEADING,
        "",
        *machine_lines(command),
        f"- Runtime: {runtime / 60:.1f} min; seeds {seeds}; {skipped} planted faults costing < {MIN_DROP:.0%}"
        " accuracy not counted.",
        "",
        "The faulty group is given (an oracle localizer), so the treatment alone is measured. Faults and models as in"
        " the Localization section. Recovered = (treated - faulty) / (clean - faulty) validation accuracy. Compute is"
        " the treatment's measured optimizer steps and wall time (every stage, the search and held-out evaluations"
        " included) over those of full retraining from scratch with the original recipe"
        f" ({RECIPE['resnet']['epochs']} epochs resnet, {RECIPE['mlp']['epochs']} epochs mlp)."
        f" fixed: {FIXED_EPOCHS} epochs at lr {FIXED_LR}; fixed, capped: the same stopped at the budget;"
        f' search: `policy="search"`, `budget={BUDGET}`,'
        " `full_steps` = the scratch run's steps. The search was designed on the"
        f" {' and '.join(DESIGN)} families; `scale` is held out.",
        "",
        f"Goal: >= {goal_rec:.0%} of the lost accuracy recovered in >= {goal_share:.0%} of cases at"
        f" < {goal_compute:.0%} of full retraining's measured compute.",
        "",
        "| model | faults | policy | cases | recovered (median) | >= 95% recovered | >= 70% recovered"
        " | steps vs scratch | wall time vs scratch | cases < 30% of both | reinit / widened |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in ("resnet", "mlp"):
        for label, kinds in ((f"{'+'.join(DESIGN)} (design)", DESIGN), ("scale (held out)", ("scale",))):
            for policy in POLICIES:
                sel = [r for r in rows if r["arch"] == arch and r["fault"] in kinds and r["policy"] == policy]
                if sel:
                    lines.append("| " + " | ".join([arch, label, policy, *_summary(sel)]) + " |")
    search = [r for r in rows if r["policy"] == "search"]
    if search:
        over = sum(not r["within_budget"] for r in search)
        lines += ["", f"Search policy: {over} of {len(search)} runs above their step budget."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
