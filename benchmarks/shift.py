"""Distribution-shift benchmark: which layer groups to fine-tune on shifted digits, against an oracle and Auto-RGN.

Trains the digits ResNet (6 groups, BatchNorm) and MLP (3 groups, no normalisation) on clean digits, then shifts
a disjoint part of the digits and adapts to it with a fixed step budget, five ways, all through the same loop
(``lightning_beta.diagnosis.shift.fine_tune``: Adam, constant lr, frozen BatchNorm in eval mode):

- none: the clean model as it is;
- oracle: each single group fine-tuned alone, the best on the held-out split of the shifted data (its cost is
  every group's run);
- ours: ``recommend_groups`` (drift + relative gradient norms shortlist, short probes), then its group;
- auto-rgn: Auto-RGN (Lee et al., 2023), every tensor at its normalised relative-gradient-norm rate;
- full: every group at the base rate.

The shifted data: the digits are split source (train the clean model) / target; the target half is split into
adapt-train (every arm trains on it), adapt-held (the oracle and our probes select on it) and test (reported).
Shift families are DESIGN (looked at while designing ``recommend_groups``) or HELD-OUT (run once, at the end,
with the design frozen); they are reported apart.

    python benchmarks/shift.py            # full run, prints the tables
    python benchmarks/shift.py --write    # and writes the "## Distribution shift" section of RESULTS.md
    python benchmarks/shift.py --quick    # one seed, a shorter budget, design families only
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta._text import markdown_table
from lightning_beta.demos.digits import build_network, load_digits_tensors
from lightning_beta.diagnosis.drift import reference_statistics
from lightning_beta.diagnosis.shift import accuracy, auto_rgn, fine_tune, recommend_groups
from lightning_beta.layer_groups import group_parameters, group_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_lines, write_section

HEADING = "## Distribution shift"
ARCHS = ("resnet", "mlp")
#: group whose output a feature-level shift changes, per architecture (design / held-out)
FEATURE_AT = {"resnet": ("layer1", "layer2"), "mlp": ("fc1", "fc2")}


def blur(x: Tensor) -> Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3)
    return nn.functional.conv2d(x, kernel, padding=1)


def pixel_shift(x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    out[..., 1:, 2:] = x[..., :-1, :-2]  # two pixels right, one down
    return out


def noise(x: Tensor) -> Tensor:
    return x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(123))


def label_map(mapping: dict[int, int]) -> Callable[[Tensor], Tensor]:
    table = torch.arange(10)
    for a, b in mapping.items():
        table[a] = b
    return lambda y: table[y]


class FeatureShift:
    """A fixed change of one group's output, applied by a forward hook: not an input shift, not a label shift.

    ``"permute"``: a fixed random permutation of half the features (channels) of the output. ``"mix"``: the output
    features mixed by a fixed random matrix ``I + 0.7 R / sqrt(C)`` (along the channel dim).
    """

    def __init__(self, group: str, how: str) -> None:
        self.group, self.how = group, how

    def install(self, net: nn.Module) -> nn.Module:
        shifted = copy.deepcopy(net)
        module = shifted.get_submodule(self.group)
        gen = torch.Generator().manual_seed(7)
        width = module.weight.shape[0] if hasattr(module, "weight") else _out_width(module)
        if self.how == "permute":
            index = torch.arange(width)
            half = torch.randperm(width, generator=gen)[: width // 2]
            index[half] = half[torch.randperm(len(half), generator=gen)]
            module.register_forward_hook(lambda m, i, out: out.index_select(1, index))
        else:
            mix = torch.eye(width) + 0.7 * torch.randn(width, width, generator=gen) / math.sqrt(width)
            module.register_forward_hook(lambda m, i, out: torch.einsum("dc,nc...->nd...", mix, out))
        return shifted


def _out_width(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


# family -> (split, kind, input shift, label shift, feature shift index or None)
FAMILIES: dict[str, tuple[str, str, Callable[[Tensor], Tensor] | None, Callable[[Tensor], Tensor] | None, tuple]] = {
    "noise": ("design", "input", noise, None, ()),
    "invert": ("design", "input", lambda x: 1.0 - x, None, ()),
    "feature-permute": ("design", "feature", None, None, (0, "permute")),
    "label-cycle": ("design", "label", None, label_map({0: 1, 1: 2, 2: 3, 3: 0}), ()),
    "blur": ("held-out", "input", blur, None, ()),
    "pixel-shift": ("held-out", "input", pixel_shift, None, ()),
    "contrast": ("held-out", "input", lambda x: 0.35 + 0.3 * x, None, ()),
    "feature-mix": ("held-out", "feature", None, None, (1, "mix")),
    "label-swap": ("held-out", "label", None, label_map({4: 9, 9: 4, 5: 6, 6: 5, 7: 8, 8: 7}), ()),
}


def train_clean(arch: str, data: TensorDataset, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build_network(arch)
    epochs = 10 if arch == "resnet" else 20
    loader = DataLoader(
        data, batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            scheduler.step()
    return net.eval()


def run_family(arch: str, family: str, net: nn.Module, ref: dict, target: TensorDataset, seed: int, args) -> dict:
    _, _, shift_x, shift_y, feature = FAMILIES[family]
    x, y = target.tensors
    x = shift_x(x) if shift_x else x
    y = shift_y(y) if shift_y else y
    model = FeatureShift(FEATURE_AT[arch][feature[0]], feature[1]).install(net) if feature else net
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + seed))
    n_train, n_held = round(0.35 * len(x)), round(0.15 * len(x))
    parts = order[:n_train], order[n_train : n_train + n_held], order[n_train + n_held :]
    adapt = DataLoader(
        TensorDataset(x[parts[0]], y[parts[0]]),
        batch_size=32,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    held = DataLoader(TensorDataset(x[parts[1]], y[parts[1]]), batch_size=512)
    test = DataLoader(TensorDataset(x[parts[2]], y[parts[2]]), batch_size=512)
    steps, lr = args.steps, args.lr
    sizes = group_sizes(model, group_parameters(model))
    rows: dict[str, dict] = {"none": {"acc": accuracy(model, test), "params": 0, "steps": 0, "wall": 0.0}}
    singles = {}
    for g in sizes:
        result = fine_tune(model, adapt, [g], steps, lr)
        singles[g] = (accuracy(result.model, held), accuracy(result.model, test), result.wall_time_s)
    best = max(singles, key=lambda g: (singles[g][0], -sizes[g]))
    rows["oracle"] = {
        "acc": singles[best][1],
        "params": sizes[best],
        "steps": steps * len(sizes),
        "wall": sum(s[2] for s in singles.values()),
        "group": best,
    }
    rec = recommend_groups(
        model, adapt, ref, held, max_candidates=args.max_candidates, probe_steps=args.probe_steps, lr=args.probe_lr
    )
    ours = fine_tune(model, adapt, rec.groups, steps, lr)
    rows["ours"] = {
        "acc": accuracy(ours.model, test),
        "params": ours.n_params_trained,
        "steps": rec.optimizer_steps + steps,
        "wall": rec.wall_time_s + ours.wall_time_s,
        "group": rec.groups[0],
        "kind": rec.kind,
        "candidates": rec.candidates,
        "drift": {g: round(v, 2) for g, v in rec.drift.items()},
        "probe": {g: round(v, 3) for g, v in rec.probe.items()},
    }
    for name, result in (
        ("auto-rgn", auto_rgn(model, adapt, steps, lr)),
        ("full", fine_tune(model, adapt, None, steps, lr)),
    ):
        rows[name] = {
            "acc": accuracy(result.model, test),
            "params": result.n_params_trained,
            "steps": result.optimizer_steps,
            "wall": result.wall_time_s,
        }
    rows["single"] = {g: s[1] for g, s in singles.items()}
    return rows


def summarise(results: dict[tuple[str, str], list[dict]], split: str) -> tuple[list[str], dict[str, int]]:
    header = [
        "arch",
        "family",
        "none",
        "oracle (group)",
        "ours (group)",
        "auto-rgn",
        "full",
        "params ours/oracle/all",
        "steps ours/oracle/rgn",
        "wall s ours/oracle/rgn",
        "goals",
    ]
    lines, goals = [], {"rows": 0, "near_oracle": 0, "near_acc": 0, "ahead_rgn": 0}
    arms: dict[str, list[float]] = {arm: [] for arm in ("none", "oracle", "ours", "auto-rgn", "full")}
    table = []
    for (arch, family), runs in results.items():
        if FAMILIES[family][0] != split:
            continue

        def mean(arm: str, key: str = "acc", runs: list[dict] = runs) -> float:
            return statistics.mean(r[arm][key] for r in runs)

        near = sum(
            r["ours"]["acc"] >= r["oracle"]["acc"] - 0.02 and r["ours"]["params"] <= r["oracle"]["params"] for r in runs
        )
        ahead = sum(r["ours"]["acc"] > r["auto-rgn"]["acc"] for r in runs)
        goals["near_acc"] += sum(r["ours"]["acc"] >= r["oracle"]["acc"] - 0.02 for r in runs)
        for arm, values in arms.items():
            values.extend(r[arm]["acc"] for r in runs)
        goals["rows"] += len(runs)
        goals["near_oracle"] += near
        goals["ahead_rgn"] += ahead
        groups_o = "/".join(sorted({r["oracle"]["group"] for r in runs}))
        groups_r = "/".join(sorted({r["ours"]["group"] for r in runs}))
        total = runs[0]["full"]["params"]
        table.append(
            [
                arch,
                f"{family} ({FAMILIES[family][1]})",
                f"{mean('none'):.3f}",
                f"{mean('oracle'):.3f} ({groups_o})",
                f"{mean('ours'):.3f} ({groups_r})",
                f"{mean('auto-rgn'):.3f}",
                f"{mean('full'):.3f}",
                f"{mean('ours', 'params'):.0f}/{mean('oracle', 'params'):.0f}/{total}",
                f"{mean('ours', 'steps'):.0f}/{mean('oracle', 'steps'):.0f}/{mean('auto-rgn', 'steps'):.0f}",
                f"{mean('ours', 'wall'):.1f}/{mean('oracle', 'wall'):.1f}/{mean('auto-rgn', 'wall'):.1f}",
                f"{near}/{len(runs)} near oracle, {ahead}/{len(runs)} ahead of rgn",
            ]
        )
    lines += markdown_table(header, table, "llrrrrrrrrl").splitlines()
    lines += [
        "",
        "Mean accuracy over these runs: " + ", ".join(f"{a} {statistics.mean(v):.3f}" for a, v in arms.items()) + ".",
    ]
    return lines, goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 60 steps, design families, no file written")
    parser.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--probe-lr", type=float, default=1e-2)
    parser.add_argument("--max-candidates", type=int, default=6, help="groups recommend_groups probes")
    parser.add_argument("--splits", default="design,held-out", help="comma-separated: design, held-out")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = ["design"] if args.quick else args.splits.split(",")
    seeds = [0] if args.quick else list(range(args.seeds))
    if args.quick:
        args.steps, args.probe_steps = 60, 15
    begin = time.perf_counter()
    source, target = load_digits_tensors(seed=0, val_fraction=0.5)
    results: dict[tuple[str, str], list[dict]] = {}
    clean_acc: dict[str, list[float]] = {}
    for arch in ARCHS:
        for seed in seeds:
            net = train_clean(arch, source, seed)
            ref = reference_statistics(net, DataLoader(source, batch_size=512))
            clean_acc.setdefault(arch, []).append(accuracy(net, DataLoader(target, batch_size=512)))
            for family, spec in FAMILIES.items():
                if spec[0] not in splits:
                    continue
                rows = run_family(arch, family, net, ref, target, seed, args)
                results.setdefault((arch, family), []).append(rows)
                print(
                    f"{arch} {family} seed {seed}: "
                    + ", ".join(f"{k} {v['acc']:.3f}" for k, v in rows.items() if k != "single")
                    + f"; ours {rows['ours']['group']} ({rows['ours']['kind']}, {rows['ours']['candidates']}),"
                    f" drift {rows['ours']['drift']} probe {rows['ours']['probe']},"
                    f" oracle {rows['oracle']['group']}; singles "
                    + ", ".join(f"{g} {a:.3f}" for g, a in rows["single"].items()),
                    flush=True,
                )
    elapsed = time.perf_counter() - begin
    command = "python benchmarks/shift.py" + (" --quick" if args.quick else "") + (" --write" if args.write else "")
    body = [
        HEADING,
        "",
        "Clean digits models adapted to shifted digits with a fixed budget of"
        f" {args.steps} Adam steps (lr {args.lr}, batch 32) per fine-tuning run; our probes take"
        f" {args.probe_steps} steps per candidate (at most {args.max_candidates}). Accuracy on the shifted test"
        f" split, mean over {len(seeds)} seed(s). Clean accuracy on the target half before shifting: "
        + ", ".join(f"{a} {statistics.mean(v):.3f}" for a, v in clean_acc.items())
        + ". Goals per run: ours within 2 points of the oracle with no more parameters trained, and ahead of"
        " Auto-RGN. The oracle's steps and wall time are those of all its single-group runs.",
        "",
    ]
    for split in splits:
        lines, goals = summarise(results, split)
        body += [
            f"### {split.upper()} families",
            "",
            *lines,
            "",
            f"Goals met ({split}): near oracle {goals['near_oracle']}/{goals['rows']} (accuracy alone, ignoring the"
            f" parameter count: {goals['near_acc']}/{goals['rows']}),"
            f" ahead of Auto-RGN {goals['ahead_rgn']}/{goals['rows']}.",
            "",
        ]
    body += [*machine_lines(command), f"- Total time: {elapsed:.0f} s", ""]
    print("\n".join(body))
    if args.write and not args.quick:
        write_section("\n".join(body))


if __name__ == "__main__":
    main()
