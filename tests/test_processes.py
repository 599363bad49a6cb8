"""The guard that no process outlives the tests (see conftest): it finds orphans and stops trees."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil  # type: ignore[import-untyped]
from conftest import _started_by_tests, process_tree, stop_process_tree, stop_processes

SLEEPER = "import time; time.sleep(300)"


def _spawn_grandchild_and_exit() -> int:
    """Run a launcher that starts a sleeper and exits at once; the sleeper's pid (an orphan now)."""
    quiet = "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL"  # or ``run`` waits for the sleeper's pipe to close
    code = f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], {quiet}).pid)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


def test_an_orphan_of_a_launcher_is_found_and_stopped() -> None:
    pid = _spawn_grandchild_and_exit()
    orphan = psutil.Process(pid)
    try:
        assert orphan.ppid() != psutil.Process().pid  # reparented: not among this process's children
        assert pid in {p.pid for p in _started_by_tests()}  # found by the tag in its environment
    finally:
        stop_processes([orphan], grace_s=5)
    assert not orphan.is_running()
    assert pid not in {p.pid for p in _started_by_tests()}


def test_stop_process_tree_stops_a_launcher_and_what_it_started() -> None:
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep(300)"
    launcher = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while len(process_tree(launcher.pid)) < 2:
            assert time.monotonic() < deadline, "the launcher never started its child"
            time.sleep(0.05)
        tree = process_tree(launcher.pid)
    finally:
        stop_process_tree(launcher.pid, grace_s=5)
    launcher.wait(10)
    assert not any(p.is_running() for p in tree[1:])
