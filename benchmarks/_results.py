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


def write_section(body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section of ``path`` whose ``## `` heading is ``body``'s first line.

    Every other section is kept as it is.
    """
    heading = body.splitlines()[0]
    if not heading.startswith("## "):
        raise ValueError(f"a section must start with a '## ' heading, got {heading!r}")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    block = body.rstrip("\n") + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text.rstrip("\n") + "\n")


def replace_section(title: str, lines: list[str], path: Path = RESULTS) -> None:
    """Write ``lines`` as the ``## title`` section of ``RESULTS.md``."""
    write_section("\n".join([f"## {title}", "", *lines]), path)
