"""The command line: ``lightning-beta demo``, ``diagnose`` and ``report`` (also ``python -m lightning_beta``).

Errors a user can make (an unwritable ``--out``, a bad number, a file that is not an artifact) end with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_beta.__about__ import __version__

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs, reported as one line with exit code 2."""


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``, with a message naming what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-beta``."""
    parser = argparse.ArgumentParser(
        prog="lightning-beta",
        description="Critical-damping momentum, damping regimes and layer diagnosis for PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"lightning_beta {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,report,diagnose}")

    demo = commands.add_parser(
        "demo",
        help="train on the bundled digits with and without the beta schedule, then diagnose",
        description="Train a small residual CNN on scikit-learn's digits twice (constant momentum 0.9 and"
        " BetaMomentumCallback) with the regime monitor and layer attribution, plant a fault in the beta run,"
        " localize and repair it, and print a comparison table and the tensorboard command to view the logs."
        " No download.",
    )
    demo.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on two CPU cores)")
    demo.add_argument("--epochs", type=_whole_number(1), help="epochs per run (default 12; 4 with --quick)")
    demo.add_argument("--seed", type=_whole_number(0), default=0, help="random seed (default 0)")
    demo.add_argument("--out", type=Path, default=Path("lightning_beta_runs"), help="output directory")
    demo.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    demo.add_argument("--devices", default="1", help="Lightning devices (default 1)")
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Lightning's progress bars (default: on when the output is a terminal)",
    )

    report = commands.add_parser("report", help="render an attribution.json or a diagnosis report as a table")
    report.add_argument("path", type=Path, help="an attribution.json or a diagnosis report JSON")
    report.add_argument("--markdown", action="store_true", help="print markdown instead of a terminal table")

    diag = commands.add_parser(
        "diagnose",
        help="Localize, Diagnose, Treat and Verify your own checkpoint on your own data",
        description="Load a LightningModule checkpoint (`--model` and `--data` are class paths, as in LightningCLI)"
        " and run the diagnosis pipeline on it: localize on one half of the validation set, treat the flagged"
        " groups (restored from the probe of --artifact, or retrained on the training set), verify on the other"
        " half. Writes diagnosis.json and diagnosis.md to --out, the report of the demo; the input checkpoint is"
        " not changed.",
    )
    diag.add_argument("checkpoint", type=Path, help="a Lightning checkpoint (.ckpt) of the --model class")
    diag.add_argument("--model", required=True, help="class path of the LightningModule, e.g. pkg.module.Model")
    diag.add_argument("--data", required=True, help="class path of the LightningDataModule")
    diag.add_argument(
        "--data-args", type=_json_object, default={}, help="init arguments of --data as JSON, e.g. '{\"seed\": 0}'"
    )
    diag.add_argument(
        "--artifact",
        type=Path,
        help="the attribution.json LayerAttributionCallback wrote for this model (its reference and probe)",
    )
    diag.add_argument(
        "--localizer",
        choices=("auto", "probe", "drift", "gradient", "kinetic"),
        default="auto",
        help="auto: the artifact's probe, else drift with an artifact or BatchNorm, else gradient (default auto)",
    )
    diag.add_argument(
        "--policy",
        choices=("auto", "restore", "fixed", "search"),
        default="auto",
        help="treatment; auto: restore from the artifact's probe when it holds the flagged groups, else fixed",
    )
    diag.add_argument("--top-k", type=_whole_number(1), help="flag the k highest groups (default: 2x the median)")
    diag.add_argument("--max-epochs", type=_whole_number(1), default=1, help="retraining epochs (default 1)")
    diag.add_argument("--lr", type=_positive_number, default=0.01, help="peak retraining lr (default 0.01)")
    diag.add_argument("--baseline", action="store_true", help="also retrain every group, to measure the saving")
    diag.add_argument("--out", type=Path, default=Path("lightning_beta_diagnosis"), help="output directory")
    diag.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    diag.add_argument("--devices", default="1", help="Lightning devices (default 1)")
    return parser


def _positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (the init arguments of a class)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the directory ({err.strerror})") from err
    if not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the directory is not writable")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_accelerator(accelerator: str, devices: str) -> None:
    """Refuse an accelerator or device count Lightning cannot use here, before any training starts."""
    import lightning.pytorch as pl

    from lightning_beta.demos.demo import parse_devices, quiet

    try:
        with quiet():
            pl.Trainer(accelerator=accelerator, devices=parse_devices(devices), logger=False)
    except Exception as err:  # a Trainer given only these two arguments fails for no other reason
        reason = _first_line(err)
        raise UsageError(f"--accelerator {accelerator} --devices {devices}: not usable here ({reason})") from None


def _run_demo(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)
    _check_accelerator(args.accelerator, args.devices)
    from lightning_beta.demos.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=args.out,
        epochs=args.epochs or (4 if args.quick else 12),
        seed=args.seed,
        quick=args.quick,
        accelerator=args.accelerator,
        devices=args.devices,
        progress=sys.stdout.isatty() if args.progress is None else args.progress,
    )
    result = run_demo(config)
    if result.is_global_zero:  # every process of a multi-device run gets here; one prints
        print(result.table())
        print(f"\nView the panels:  tensorboard --logdir {args.out.resolve()}")
    return 0


#: The first bytes of a file ``torch.save`` wrote: a zip archive (the default since torch 1.6) or a raw pickle.
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _is_checkpoint(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return any(head.startswith(magic) for magic in CHECKPOINT_MAGIC)


def _run_report(args: argparse.Namespace) -> int:
    path: Path = args.path
    if _is_checkpoint(path):
        raise UsageError(
            f"{path}: a torch/Lightning checkpoint, not a JSON artifact; pass the attribution.json that"
            " LayerAttributionCallback writes (its `path`) or a diagnosis report (diagnosis.json)"
        )
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not JSON ({err.msg} at line {err.lineno}), so not an artifact") from None
    from lightning_beta.render import render_report

    try:
        print(render_report(data, source=str(path), markdown=args.markdown))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return 0


def _import_class(option: str, path: str, base: type) -> Any:
    """The class at ``path`` (``package.module.Class``), which must subclass ``base``."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise UsageError(f"{option} {path}: expected a class path such as package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"{option} {path}: cannot import {module_name} ({err})") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UsageError(f"{option} {path}: not a {base.__name__} subclass")
    return cls


def _run_diagnose(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl

    if not args.checkpoint.is_file():
        raise UsageError(f"{args.checkpoint}: no such file")
    model_cls = _import_class("--model", args.model, pl.LightningModule)
    data_cls = _import_class("--data", args.data, pl.LightningDataModule)
    _check_out_dir(args.out)
    _check_accelerator(args.accelerator, args.devices)
    from lightning_beta.demos.demo import diagnose_checkpoint, quiet, write_report

    artifact = None
    if args.artifact is not None:
        from lightning_beta.artifact import load_attribution

        try:
            artifact = load_attribution(args.artifact)
        except (OSError, ValueError) as err:
            raise UsageError(f"--artifact {args.artifact}: {_first_line(err)}") from None

    try:
        datamodule = data_cls(**args.data_args)
    except TypeError as err:
        raise UsageError(f"--data-args: {args.data} does not take them ({_first_line(err)})") from None
    with quiet():
        try:
            model = model_cls.load_from_checkpoint(args.checkpoint, map_location="cpu")
        except Exception as err:  # a checkpoint of another class, or not a checkpoint at all
            reason = f"{type(err).__name__}: {_first_line(err).rstrip(':')}"
            raise UsageError(f"{args.checkpoint}: cannot load it as {args.model} ({reason})") from None
        try:
            report, is_global_zero = diagnose_checkpoint(
                model,
                datamodule,
                checkpoint=args.checkpoint,
                artifact=artifact,
                localizer=args.localizer,
                policy=args.policy,
                top_k=args.top_k,
                max_epochs=args.max_epochs,
                lr=args.lr,
                baseline=args.baseline,
                accelerator=args.accelerator,
                devices=args.devices,
            )
        except (ValueError, TypeError, FileNotFoundError) as err:  # the model, data and artifact do not fit
            raise UsageError(_first_line(err)) from None
    if is_global_zero:
        write_report(report, args.out)
        print(report.to_markdown())
        print(f"Diagnosis report: {args.out / 'diagnosis.json'} and {args.out / 'diagnosis.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-beta``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "diagnose":
            return _run_diagnose(args)
        return _run_report(args)
    except UsageError as err:
        print(f"lightning-beta {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lightning-beta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
