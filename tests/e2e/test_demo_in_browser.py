"""End to end: ``lightning-beta demo --quick``, a real TensorBoard server, and its pages in headless Chromium.

Needs Debian's ``chromium`` (``.ci/run`` installs it). Set ``LIGHTNING_BETA_SCREENSHOTS=DIR`` to keep the
screenshots (the ones under ``docs/`` come from this test).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def tensorboard(logdir: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if get_json(f"{url}/data/runs"):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read().decode() if process.stdout else ""
                raise RuntimeError(f"tensorboard did not come up: {output[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def screenshot(url: str, path: Path, profile: Path) -> None:
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={profile}",
            "--window-size=1400,1100",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def assert_not_blank(path: Path) -> None:
    from PIL import Image

    image = Image.open(path).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert image.size[0] >= 1000 and image.size[1] >= 800
    # A blank or error page has a handful of colours; plotted charts and text have hundreds.
    assert colors is not None and len(colors) > 200, f"{path} looks blank ({len(colors or [])} colours)"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_beta", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_demo_prints_table_and_tensorboard_line(demo_out):
    out, stdout = demo_out
    assert "steps to 90% val accuracy" in stdout and "constant 0.9" in stdout and "beta schedule" in stdout
    assert "group named first: probe (ours) net.layer2 (right)" in stdout and "treatment (restore net.layer2)" in stdout
    assert f"tensorboard --logdir {out.resolve()}" in stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_tensorboard_serves_runs_tags_layout_and_renders(demo_out, tmp_path):
    out, _ = demo_out
    with tensorboard(out) as url:
        runs = get_json(f"{url}/data/runs")
        assert set(runs) >= {"constant", "beta"}
        tags = get_json(f"{url}/data/plugin/scalars/tags")
        assert {"damping/zeta", "damping/band_low", "grad_norm/total"} <= set(tags["constant"])
        assert "beta/momentum" in tags["beta"] and "beta/momentum" not in tags["constant"]
        layout = get_json(f"{url}/data/plugin/custom_scalars/layout")
        titles = {category["title"] for category in layout["category"]}
        assert {"Damping", "Layer attribution"} <= titles
        images = get_json(f"{url}/data/plugin/images/tags")
        assert "attribution/heatmap" in images["beta"]

        keep = os.environ.get("LIGHTNING_BETA_SCREENSHOTS")
        shots = Path(keep) if keep else tmp_path
        shots.mkdir(parents=True, exist_ok=True)
        pages = {
            "custom_scalars.png": f"{url}/?darkMode=false#custom_scalars",
            "images.png": f"{url}/?darkMode=false#images",
            "text.png": f"{url}/?darkMode=false#text",
        }
        for name, page in pages.items():
            screenshot(page, shots / name, tmp_path / f"profile-{name}")
            assert_not_blank(shots / name)
