"""Generate the Python stubs for ``proto/`` into ``src/trainer_proto/``.

Usage: ``python scripts/gen_protos.py [--out DIR]``

The generated ``*_pb2_grpc.py`` and the mypy stubs import their siblings absolutely
(``from trainer.v1 import trainer_pb2``); this script rewrites those imports to the
package both sides install (``trainer_proto.trainer.v1``), so no sys.path tricks are
needed. ``tests/test_proto_stubs.py`` regenerates into a temporary directory and fails
when the committed stubs differ, so the stubs cannot drift from the protos.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "src" / "trainer_proto"
PACKAGE = "trainer_proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    """All ``.proto`` files under ``proto/``, sorted for a stable output."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _rewrite_imports(text: str, proto_packages: set[str]) -> str:
    """Point absolute imports of generated modules at the installed package."""
    for pkg in sorted(proto_packages):
        text = re.sub(rf"^from {re.escape(pkg)} import", f"from {PACKAGE}.{pkg} import", text, flags=re.M)
        text = re.sub(rf"^import {re.escape(pkg)}\.", f"import {PACKAGE}.{pkg}.", text, flags=re.M)
        # Module names only (``trainer.v1.trainer_pb2``), never the wire names of services
        # and methods (``/trainer.v1.TrainerService/Forward``), which must match the proto.
        text = re.sub(rf"(?<![\w./]){re.escape(pkg)}\.(?=\w+_pb2(?:_grpc)?\b)", f"{PACKAGE}.{pkg}.", text)
    # The substitutions above can double-prefix names already rewritten.
    return text.replace(f"{PACKAGE}.{PACKAGE}.", f"{PACKAGE}.")


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and mypy-protobuf; return the files written."""
    from grpc_tools import protoc

    protos = proto_files()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        plugin = shutil.which("protoc-gen-mypy") or str(Path(sys.executable).parent / "protoc-gen-mypy")
        plugin_grpc = shutil.which("protoc-gen-mypy_grpc") or str(Path(sys.executable).parent / "protoc-gen-mypy_grpc")
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--plugin=protoc-gen-mypy_grpc={plugin_grpc}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        packages = {".".join(p.relative_to(PROTO_ROOT).parent.parts) for p in protos}
        written: list[Path] = []
        for src in sorted(tmp_path.rglob("*")):
            if not src.is_file() or not src.name.endswith(GENERATED_SUFFIXES):
                continue
            rel = src.relative_to(tmp_path)
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_rewrite_imports(src.read_text(), packages))
            written.append(dst)
        # Every generated directory is a regular package.
        for pkg in packages:
            d = out
            for part in pkg.split("."):
                d = d / part
                init = d / "__init__.py"
                if not init.exists():
                    init.write_text('"""Generated protobuf package; see scripts/gen_protos.py."""\n')
                written.append(init)
        return sorted(set(written))


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output package directory")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out.parent in path.parents else path)


if __name__ == "__main__":
    main()
