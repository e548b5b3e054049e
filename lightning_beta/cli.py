"""The command line: ``lightning-beta demo`` and ``lightning-beta report`` (also ``python -m lightning_beta``).

Errors a user can make (an unwritable ``--out``, a bad number, a file that is not an artifact) end with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,report}")

    demo = commands.add_parser(
        "demo",
        help="train on the bundled digits with and without the beta schedule, then diagnose",
        description="Train a small residual CNN on scikit-learn's digits twice (constant momentum 0.9 and"
        " BetaMomentumCallback) with the regime monitor and layer attribution, diagnose the beta run, and print"
        " a comparison table and the tensorboard command to view the logs. No download.",
    )
    demo.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on two CPU cores)")
    demo.add_argument("--epochs", type=_whole_number(1), help="epochs per run (default 12; 4 with --quick)")
    demo.add_argument("--seed", type=_whole_number(0), default=0, help="random seed (default 0)")
    demo.add_argument("--out", type=Path, default=Path("lightning_beta_runs"), help="output directory")
    demo.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    demo.add_argument("--devices", default="1", help="Lightning devices (default 1)")

    report = commands.add_parser("report", help="render an attribution.json or a diagnosis report as a table")
    report.add_argument("path", type=Path, help="an attribution.json or a diagnosis report JSON")
    report.add_argument("--markdown", action="store_true", help="print markdown instead of a terminal table")
    return parser


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the directory ({err.strerror})") from err
    if not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the directory is not writable")


def _check_accelerator(accelerator: str, devices: str) -> None:
    """Refuse an accelerator or device count Lightning cannot use here, before any training starts."""
    import lightning.pytorch as pl

    from lightning_beta.demos.demo import parse_devices, quiet

    try:
        with quiet():
            pl.Trainer(accelerator=accelerator, devices=parse_devices(devices), logger=False)
    except Exception as err:  # a Trainer given only these two arguments fails for no other reason
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-beta``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _run_demo(args)
        return _run_report(args)
    except UsageError as err:
        print(f"lightning-beta {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lightning-beta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
