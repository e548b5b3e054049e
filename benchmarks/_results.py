"""Shared by the benchmark scripts: the machine description and the section writer of ``RESULTS.md``."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import lightning
import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_lines(command: str) -> list[str]:
    """Where, with what and how a table was produced."""
    return [
        f"- Command: `{command}`",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} (CPU),"
        f" lightning {lightning.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.date.today().isoformat()}",
    ]


def replace_section(title: str, lines: list[str], path: Path = RESULTS) -> None:
    """Replace (or append) the ``## title`` section of ``RESULTS.md``, keeping every other section."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    body = f"## {title}\n\n" + "\n".join(lines).rstrip() + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text.rstrip() + "\n")
