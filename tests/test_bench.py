"""The benchmark suite (``scripts/bench.py``) keeps working: ``--quick`` runs end to end.

No timing assertions: the numbers depend on the machine and its load; only that every
section ran and printed its table is checked.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"

SECTIONS = {
    "## 1. Wire": "1 wire",
    "## 2. Custom loss": "2 custom loss",
    "## 3. Service overhead": "3 overhead",
    "## 4. Pipelining": "4 pipelining",
    "## 5. Overlap": "5 overlap",
    "## 6. Multi-tenant LoRA": "6 LoRA",
    "## 7. Memory": "7 memory",
    "## 4b. Pipelining with the server in its own process": "4 pipelining",
    "## 9. Sampling through the service": "9 sampling",
}
if importlib.util.find_spec("tinker") is not None:  # the dev extra; the bench skips section 8 without it
    SECTIONS["## 8. Tinker SDK vs our client"] = "8 tinker"


@pytest.mark.timeout(330)
def test_bench_quick_prints_every_table(tmp_path: Path) -> None:
    home = tmp_path / "trainer-home"
    env = dict(os.environ, TRAINER_HOME=str(home))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    blocks = {block.split("\n", 1)[0]: block for block in out.split("\n## ")[1:]}
    summary = next((b for t, b in blocks.items() if t.startswith("Summary")), "")
    for heading, summary_label in SECTIONS.items():
        title = next((t for t in blocks if t.startswith(heading.removeprefix("## "))), None)
        assert title is not None, f"no section {heading!r} in:\n{out}"
        assert "\n|---|" in blocks[title], f"section {heading!r} printed no markdown table:\n{blocks[title]}"
        assert f"| {summary_label} |" in summary, f"summary has no row for {summary_label!r}:\n{summary}"
    # The models were built under the given TRAINER_HOME, not the user's cache.
    assert any((home / "bench-models").iterdir())
