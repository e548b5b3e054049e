"""Localization benchmark: plant a fault in one layer group, see which localizer names it, then repair it.

Trains the digits ResNet (6 groups, BatchNorm) and MLP (3 groups, no normalisation) over several seeds, plants
faults (noise, re-initialisation, per-channel scaling) in each group in turn, and scores every localizer by top-1
and top-3 hit rate against chance. Then treats each fault by surgery on the flagged groups, on the true group,
on the same budget of single parameters, by fine-tuning everything for the same epochs, and compares with full
retraining from scratch: accuracy recovered, net errors fixed and measured compute (wall time, optimizer steps).

    python benchmarks/localization.py            # full run, writes the "## Localization" section of RESULTS.md
    python benchmarks/localization.py --quick    # one seed, a smoke test (prints, writes nothing)
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_beta.demos.digits import build_network, digits_dataloaders
from lightning_beta.diagnosis import (
    activation_drift,
    attribute_errors,
    flag_layers,
    kinetic_energy_probe,
    reference_statistics,
    surgical_correction,
    verify,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section

from lightning_beta.layer_groups import group_parameters

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Localization"
RECIPE = {"resnet": {"epochs": 8, "lr": 0.1}, "mlp": {"epochs": 15, "lr": 0.1}}
FAULTS = ("noise", "reinit", "scale")
MIN_DROP = 0.02  # a fault that costs less accuracy than this is not counted (nothing to localize or repair)
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def accuracy(net: nn.Module, loader: DataLoader) -> float:
    net.eval()
    x, y = loader.dataset.tensors
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def train_from_scratch(arch: str, seed: int, train: DataLoader) -> tuple[nn.Module, float, int]:
    """The original recipe (SGD, momentum 0.9, cosine lr, weight decay): the model and its measured cost."""
    torch.manual_seed(seed)
    net = build_network(arch)
    recipe = RECIPE[arch]
    groups = list(group_parameters(net))
    result = surgical_correction(
        net, groups, train, max_epochs=recipe["epochs"], lr=recipe["lr"], momentum=0.9, weight_decay=5e-4, **QUIET
    )
    return result.model.eval(), result.wall_time_s, result.optimizer_steps


def plant(net: nn.Module, group: str, kind: str, seed: int) -> nn.Module:
    bad = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    module = bad.get_submodule(group)
    with torch.no_grad():
        if kind == "reinit":
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                elif hasattr(m, "reset_parameters") and next(m.parameters(recurse=False), None) is not None:
                    m.reset_parameters()
        for p in module.parameters():
            if kind == "noise" and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std())
            elif kind == "scale":
                factor = torch.exp((torch.rand(p.shape[0], generator=gen) * 2 - 1) * math.log(4.0))
                p.mul_(factor.view(-1, *[1] * (p.dim() - 1)))
    return bad.eval()


def localize(bad: nn.Module, ref: dict, loc_loader: DataLoader, has_bn: bool) -> dict:
    out = {}
    grad = attribute_errors(bad, loc_loader)
    out["gradient (paper)"] = grad.ranking
    ratio = grad.details["ratio"]
    out["gradient ratio wrong/correct"] = sorted(ratio, key=lambda g: -(ratio[g] if math.isfinite(ratio[g]) else 1e300))
    drift = activation_drift(bad, loc_loader, ref)
    out["drift, recorded reference (ours)"] = drift.ranking
    if has_bn:
        out["drift, BatchNorm statistics (ours)"] = activation_drift(bad, loc_loader).ranking
    out["kinetic energy probe"] = kinetic_energy_probe(bad, loc_loader, steps=10, lr=0.01).ranking
    out["_drift_scores"] = drift
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, no file written")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--surgery-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else list(range(args.seeds))
    begin = time.perf_counter()
    hits: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    n_groups: dict[str, int] = {}
    skipped: dict[str, int] = {"resnet": 0, "mlp": 0}
    surgery_rows: dict[tuple[str, str], list[dict]] = {}
    scratch_cost: dict[str, list[tuple[float, int, float]]] = {}
    for arch in ("resnet", "mlp"):
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            train, val = digits_dataloaders(seed=seed)
            loc_loader = DataLoader(train.dataset, batch_size=512)
            net, scratch_time, scratch_steps = train_from_scratch(arch, seed, train)
            clean = accuracy(net, val)
            scratch_cost.setdefault(arch, []).append((scratch_time, scratch_steps, clean))
            ref = reference_statistics(net, loc_loader)
            groups = list(group_parameters(net))
            n_groups[arch] = len(groups)
            has_bn = arch == "resnet"
            for gi, group in enumerate(groups):
                for fi, kind in enumerate(FAULTS):
                    bad = plant(net, group, kind, seed=1000 * seed + 10 * gi + fi)
                    faulty = accuracy(bad, val)
                    if clean - faulty < MIN_DROP:
                        skipped[arch] += 1
                        continue
                    ranks = localize(bad, ref, loc_loader, has_bn)
                    drift = ranks.pop("_drift_scores")
                    for name, ranking in ranks.items():
                        hits.setdefault((arch, name), []).append((ranking[0] == group, group in ranking[:3]))
                    flagged = flag_layers(drift) or drift.ranking[:1]
                    treatments = {
                        "surgery on flagged (drift)": (flagged, "layers"),
                        "surgery on true group": ([group], "layers"),
                        "same budget, single parameters": (flagged, "parameters"),
                        "fine-tune all groups, same epochs": (groups, "layers"),
                    }
                    for label, (layers, selection) in treatments.items():
                        res = surgical_correction(
                            bad, layers, train, max_epochs=args.surgery_epochs, lr=0.05, selection=selection, **QUIET
                        )
                        after = accuracy(res.model, val)
                        ver = verify(bad, res.model, val)
                        surgery_rows.setdefault((arch, label), []).append(
                            {
                                "recovered": (after - faulty) / (clean - faulty),
                                "net": ver.net,
                                "time": res.wall_time_s / scratch_time,
                                "steps": res.optimizer_steps / scratch_steps,
                                "params": res.fraction_trained,
                                "hit": label != "surgery on flagged (drift)" or flagged == [group],
                            }
                        )
            print(f"{arch} seed {seed} done at {time.perf_counter() - begin:.0f}s (clean acc {clean:.3f})", flush=True)
    runtime = time.perf_counter() - begin
    text = render(hits, n_groups, skipped, surgery_rows, scratch_cost, seeds, args, runtime)
    print(text)
    if not args.quick:
        write_section(text)
        print(f"wrote the {HEADING!r} section of {RESULTS}")


def _pct(values: list[bool]) -> str:
    return f"{100 * sum(values) / len(values):.0f}%"


def render(hits, n_groups, skipped, surgery_rows, scratch_cost, seeds, args, runtime) -> str:
    command = "python benchmarks/localization.py" + (" --quick" if args.quick else "")
    lines = [
        HEADING,
        "",
        f"Command: `{command}` (seeds {seeds}, surgery {args.surgery_epochs} epoch(s), {args.threads} thread(s));"
        f" runtime {runtime / 60:.1f} min.",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {platform.system()}, {torch.get_num_threads()}"
        f" torch thread(s) on a shared 2-core CPU; Python {platform.python_version()}, torch {torch.__version__},"
        f" lightning {lightning.__version__}.",
        "",
        "Faults planted in each group in turn: `noise` (Gaussian, std = the tensor's std), `reinit` (fresh init;"
        " BatchNorm weight 1, bias 0, running statistics kept), `scale` (each output channel times a factor"
        " log-uniform in [1/4, 4]). Cases that cost less than"
        f" {MIN_DROP:.0%} validation accuracy are not counted (resnet: {skipped['resnet']}, mlp: {skipped['mlp']}"
        " skipped). Localization runs on the training set; verification on the held-out 25%.",
        "",
        "### Which group is named first",
        "",
        "| model | localizer | cases | top-1 | chance | top-3 | chance |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (arch, name), values in hits.items():
        g = n_groups[arch]
        top1, top3 = [v[0] for v in values], [v[1] for v in values]
        lines.append(
            f"| {arch} ({g} groups) | {name} | {len(values)} | {_pct(top1)} | {100 / g:.0f}% | {_pct(top3)} |"
            f" {100 * min(3, g) / g:.0f}% |"
        )
    lines += [
        "",
        "### Repair: what surgery recovers and what it costs",
        "",
        "Recovered = (accuracy after - faulty) / (clean - faulty), median and share of cases >= 95%. Compute is"
        " measured against full retraining from scratch with the original recipe"
        f" ({RECIPE['resnet']['epochs']} epochs resnet, {RECIPE['mlp']['epochs']} epochs mlp): wall time of"
        " `Trainer.fit` and optimizer steps.",
        "",
        "| model | treatment | cases | recovered (median) | >= 95% recovered | net fixed (mean) | params trained"
        " | wall time vs scratch | steps vs scratch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (arch, label), rows in surgery_rows.items():
        rec = [r["recovered"] for r in rows]
        lines.append(
            f"| {arch} | {label} | {len(rows)} | {100 * statistics.median(rec):.0f}% |"
            f" {_pct([x >= 0.95 for x in rec])} | {statistics.mean(r['net'] for r in rows):+.1f} |"
            f" {100 * statistics.mean(r['params'] for r in rows):.0f}% |"
            f" {100 * statistics.mean(r['time'] for r in rows):.0f}% |"
            f" {100 * statistics.mean(r['steps'] for r in rows):.0f}% |"
        )
    for arch, costs in scratch_cost.items():
        lines.append(
            f"\nFull retraining from scratch, {arch}: {statistics.mean(c[0] for c in costs):.2f} s,"
            f" {costs[0][1]} optimizer steps, clean accuracy {statistics.mean(c[2] for c in costs):.3f}"
            " (mean over seeds)."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
