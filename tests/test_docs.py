"""Every ```python and ```bash / ```sh block of README.md and docs/*.md runs as written.

The blocks of one file run in order, in one fresh working directory (a later block may use what
an earlier one wrote, as a reader following the page would), with the venv's commands on PATH and
``$TRAINER_SERVER`` pointing at a live server this module starts on a free port, serving the
built-in ``tiny-llama`` and a Qwen2.5-shaped chat model as ``tiny-chat``. Blocks that start
servers of their own bind the default port 50051. ``ACCELERATE_USE_CPU=true`` makes the
multi-GPU commands run as gloo ranks on this CPU. Each block runs in its own process group, which
is killed when the block ends, so a server a block left in the background never outlives it.

A block that cannot run anywhere but on real hardware is written as ```text, and says why.
New files under docs/ are picked up without touching this test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNERS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    """One fenced code block of a doc file."""

    doc: Path
    line: int
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(path, text.count("\n", 0, m.start()) + 1, m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)
    ]


RUNNABLE = [b for path in doc_files() for b in blocks(path) if b.language in RUNNERS]


def test_the_blocks_are_found() -> None:
    """The extraction sees what a reader sees: README blocks of every kind, and none unclosed."""
    readme = blocks(REPO / "README.md")
    assert {b.language for b in readme} >= {"python", "bash"}
    for path in doc_files():
        assert path.read_text().count("\n```") % 2 == 0, f"{path}: an unclosed code fence"


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real trainer-server on a free port; yields the environment the blocks run in."""
    from trainer_server import ensure_builtin_model
    from trainer_server.model_families import build_family_model

    root = tmp_path_factory.mktemp("docs")
    home = root / "home"
    llama = ensure_builtin_model(home / "models")
    chat = build_family_model(root / "tiny-chat", "qwen2.5", max_position_embeddings=256)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TRAINER_HOME": str(home),
        "ACCELERATE_USE_CPU": "true",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TRAINER_API_KEY", None)
    log = (root / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer_server", "--port", "0", "--device", "cpu",
         "--model", f"tiny-llama={llama}", "--model", f"tiny-chat={chat}",
         "--checkpoint-dir", str(root / "checkpoints")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        address = ""
        deadline = time.monotonic() + 300
        while not address and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            m = re.search(r"trainer-server ready on (\S+)", (root / "server.log").read_text())
            address = m.group(1) if m else ""
        assert address, "the docs' server did not start:\n" + (root / "server.log").read_text()[-3000:]
        yield {**env, "TRAINER_SERVER": address}
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process and everything it started (its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.1)


_WORKDIRS: dict[Path, Path] = {}


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_doc_block_runs(block: Block, live_server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    if block.doc not in _WORKDIRS:
        _WORKDIRS[block.doc] = tmp_path_factory.mktemp(block.doc.stem.lower())
    cwd = _WORKDIRS[block.doc]
    runner = RUNNERS[block.language]
    if runner == "python":
        script = cwd / f"block_{block.line}.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    started = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=cwd, env=live_server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        out, _ = proc.communicate()
        pytest.fail(f"{block.id} ran past {BLOCK_TIMEOUT_S} s:\n{out.decode(errors='replace')[-4000:]}")
    finally:
        _stop_group(proc)  # whatever the block left running in the background
    text = out.decode(errors="replace")
    print(f"{block.id}: {time.monotonic() - started:.1f} s\n{text[-2000:]}")
    assert proc.returncode == 0, f"{block.id} ({block.language}) failed with {proc.returncode}:\n{text[-4000:]}"
