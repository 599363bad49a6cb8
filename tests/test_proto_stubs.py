"""The committed stubs cannot drift from ``proto/``, and the protos stay ``buf lint`` clean.

``scripts/gen_protos.py`` regenerates into a temporary directory; every generated file must
equal the committed one byte for byte. When this fails, run ``python scripts/gen_protos.py``
and commit the result.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from trainer_proto import pb, pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "src" / "trainer_proto"
GENERATED_GLOB = "*_pb2*.py*"


def _load_gen_protos() -> ModuleType:
    path = ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted((root / "trainer").rglob(GENERATED_GLOB))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("stubs") / "trainer_proto"
    written = _load_gen_protos().generate(out)
    assert written, "gen_protos.generate() wrote nothing"
    return _generated(out)


def test_generation_covers_every_proto(regenerated: dict[str, bytes]) -> None:
    protos = sorted((ROOT / "proto").rglob("*.proto"))
    assert protos
    for proto in protos:
        stem = proto.relative_to(ROOT / "proto").with_suffix("").as_posix()
        for suffix in ("_pb2.py", "_pb2.pyi"):
            assert f"{stem}{suffix}" in regenerated, f"{stem}{suffix} was not generated"


def test_committed_stubs_match_regenerated_byte_for_byte(regenerated: dict[str, bytes]) -> None:
    committed = _generated(PACKAGE_DIR)
    assert sorted(committed) == sorted(regenerated), (
        "generated stub files differ from the committed ones; run `python scripts/gen_protos.py`"
    )
    stale = [name for name in regenerated if committed[name] != regenerated[name]]
    assert not stale, f"stale stubs {stale}; run `python scripts/gen_protos.py` and commit the result"


def test_stub_wire_names_are_the_protos() -> None:
    """Import rewriting must touch module names only, never ``/trainer.v1.TrainerService/...``:
    other clients (grpcurl, other languages) call the names in the proto."""
    service = pb.DESCRIPTOR.services_by_name["TrainerService"]
    assert service.full_name == "trainer.v1.TrainerService"
    text = Path(pb_grpc.__file__).read_text()
    for method in service.methods:
        assert f"'/{service.full_name}/{method.name}'" in text, f"{method.name}'s wire name is not the proto's"
    assert "'/trainer_proto." not in text


def _find_buf() -> str | None:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("buf")


def test_buf_lint_is_clean() -> None:
    buf = _find_buf()
    if buf is None:
        pytest.skip("buf not found on PATH or in .tools (npm install --prefix .tools @bufbuild/buf)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"buf lint:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip() == ""
