"""The RL example (``scripts/rl_example.py``), run as a user runs it: a subprocess with an embedded server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "rl_example.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_GAIN = 0.25
"""How much the mean reward of the last steps must exceed that of the first (it rises from ~0.05 to ~0.6+)."""


def _summary(stdout: str) -> dict[str, float]:
    """The values of the machine-readable ``first_reward=... last_reward=...`` line."""
    lines = [line for line in stdout.splitlines() if line.startswith("first_reward=")]
    assert len(lines) == 1, f"expected one summary line in stdout:\n{stdout}"
    return {key: float(value) for key, value in re.findall(r"(\w+)=(\S+)", lines[0])}


@pytest.mark.timeout(300)
def test_rl_example_quick_improves_reward_and_writes_a_plot(tmp_path: Path) -> None:
    plot = tmp_path / "x.png"
    env = dict(os.environ, TRAINER_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--plot", str(plot)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, f"rl_example failed ({proc.returncode}):\n{output}"
    assert plot.is_file(), f"no plot at {plot}:\n{output}"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    summary = _summary(proc.stdout)
    assert summary["last_reward"] > summary["first_reward"] + MIN_GAIN, output
    assert summary["last_exact"] >= summary["first_exact"], output
    # The built-in model was created under the given TRAINER_HOME, not the user's cache.
    assert (tmp_path / "models" / "tiny-llama" / "config.json").is_file()
    assert "rl example failed" not in proc.stderr


def test_rl_example_help() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--server", "--quick", "--plot", "--loss", "--group-size"):
        assert option in proc.stdout


def test_rl_datum_layout() -> None:
    """The RL datum the example builds: shifted targets, per-target sampler logprobs/advantages/weights."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import torch
        from rl_example import rl_datum, score
    finally:
        sys.path.remove(str(SCRIPT.parent))
    d = rl_datum([10, 11, 12], [20, 21], torch.tensor([-0.5, -1.5]), 0.25)
    assert d.model_input.tolist() == [10, 11, 12, 20]
    assert d.target_tokens.tolist() == [11, 12, 20, 21]
    assert d.weights.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert d.loss_fn_inputs["logprobs"].tolist() == [0.0, 0.0, -0.5, -1.5]
    assert d.loss_fn_inputs["advantages"].tolist() == [0.0, 0.0, 0.25, 0.25]
    assert score("7", 7) == (1.0, 7)
    assert score(" 5 apples", 7) == (pytest.approx(7 / 9), 5)
    assert score("x7", 7) == (0.0, None)
    assert score("70", 7) == (0.0, 70)
