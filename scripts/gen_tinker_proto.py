"""Generate the stubs of the Tinker SDK's wire schema used by the Tinker front end.

Usage: ``python scripts/gen_tinker_proto.py [--out DIR]``

The schema (``src/trainer_server/frontends/tinker/wire/tinker_wire.proto``) copies the SDK's
package, names and field numbers; it is not our API, so it is generated apart from
``proto/`` (``scripts/gen_protos.py``) and kept out of ``buf lint``.
``tests/test_tinker_wire.py`` regenerates into a temporary directory and fails when the
committed stubs differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIRE_DIR = ROOT / "src" / "trainer_server" / "frontends" / "tinker" / "wire"
PROTO = "tinker_wire.proto"
OUTPUTS = ("tinker_wire_pb2.py", "tinker_wire_pb2.pyi")


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and mypy-protobuf into ``out``; return the files written."""
    from grpc_tools import protoc

    plugin = shutil.which("protoc-gen-mypy") or str(Path(sys.executable).parent / "protoc-gen-mypy")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{WIRE_DIR}",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--python_out={tmp}",
            f"--mypy_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            dst = out / name
            dst.write_text((Path(tmp) / name).read_text())
            written.append(dst)
        return written


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WIRE_DIR, help="output directory")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
