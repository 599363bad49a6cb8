"""The demo (``scripts/demo.py``), run as a user runs it: a subprocess with an embedded server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(stdout: str) -> dict[str, float]:
    """The values of the demo's machine-readable ``first_loss=... last_loss=...`` line."""
    lines = [line for line in stdout.splitlines() if line.startswith("first_loss=")]
    assert len(lines) == 1, f"expected one summary line in stdout:\n{stdout}"
    return {key: float(value) for key, value in re.findall(r"(\w+)=(\S+)", lines[0])}


@pytest.mark.timeout(240)
def test_demo_quick_trains_and_writes_a_plot(tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "loss.png"
    env = dict(os.environ, TRAINER_HOME=str(tmp_path / "trainer-home"))
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--no-progress", "--plot", str(plot)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert plot.is_file(), f"no plot at {plot}:\n{proc.stdout}"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert f"loss plot: {plot}" in proc.stdout
    summary = _summary(proc.stdout)
    assert summary["steps"] == 6
    assert summary["last_loss"] < summary["first_loss"], proc.stdout
    # The built-in model was created under the given TRAINER_HOME, not the user's cache.
    assert (tmp_path / "trainer-home" / "models" / "tiny-llama" / "config.json").is_file()
    assert "demo failed" not in proc.stderr


def test_demo_help() -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--server", "--full", "--steps", "--quick", "--plot"):
        assert option in proc.stdout


def test_demo_unreachable_server_fails_readably(tmp_path: Path) -> None:
    env = dict(os.environ, TRAINER_HOME=str(tmp_path / "trainer-home"))
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--server", "127.0.0.1:1", "--plot", str(tmp_path / "x.png")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "demo failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
