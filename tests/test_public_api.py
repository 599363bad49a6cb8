"""The public surface: what each package exports, what importing the client pulls in, and
that every gRPC status has its own exception class."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from types import ModuleType

import grpc
import pytest

import trainer_client
import trainer_proto
import trainer_server
from trainer_client import _errors

PACKAGES = [trainer_client, trainer_server, trainer_proto]

# Private modules whose public classes are the user's API and so must be exported.
USER_FACING_MODULES = {
    trainer_client: ["_errors", "_types", "_futures", "_async_client", "_sync_client", "_config"],
    trainer_server: ["_config", "_server", "core.errors", "core.types"],
}

HEAVY_SERVER_PACKAGES = ("transformers", "peft", "accelerate")


def _isort_style_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then functions."""
    if all(c.isupper() or c.isdigit() or c == "_" for c in name):
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_is_sorted_and_unique(package: ModuleType) -> None:
    names = list(package.__all__)
    assert names, f"{package.__name__}.__all__ is empty"
    assert len(set(names)) == len(names), f"duplicates in {package.__name__}.__all__"
    assert names == sorted(names, key=_isort_style_key), f"{package.__name__}.__all__ is not sorted"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_exported_name_imports(package: ModuleType) -> None:
    for name in package.__all__:
        namespace: dict[str, object] = {}
        exec(f"from {package.__name__} import {name}", namespace)
        assert namespace[name] is getattr(package, name)
        assert namespace[name] is not None


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_no_public_name_is_left_out_of_all(package: ModuleType) -> None:
    stray = [
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in package.__all__
    ]
    assert not stray, f"{package.__name__} has public names missing from __all__: {stray}"


@pytest.mark.parametrize(
    ("package", "module_name"),
    [(pkg, mod) for pkg, mods in USER_FACING_MODULES.items() for mod in mods],
    ids=lambda v: v.__name__ if isinstance(v, ModuleType) else v,
)
def test_public_classes_of_private_modules_are_exported(package: ModuleType, module_name: str) -> None:
    module = importlib.import_module(f"{package.__name__}.{module_name}")
    classes = [
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and not name.startswith("_")
    ]
    assert classes, f"{module.__name__} defines no public class (is the list above stale?)"
    missing = [name for name in classes if name not in package.__all__]
    assert not missing, f"{module.__name__} defines {missing}, which {package.__name__}.__all__ does not export"
    for name in classes:
        assert getattr(package, name) is getattr(module, name)


def test_trainer_proto_exports_the_generated_modules() -> None:
    from trainer_proto.trainer.v1 import trainer_pb2, trainer_pb2_grpc

    assert trainer_proto.pb is trainer_pb2
    assert trainer_proto.pb_grpc is trainer_pb2_grpc
    assert trainer_proto.pb.DESCRIPTOR.package == "trainer.v1"
    assert hasattr(trainer_proto.pb_grpc, "TrainerServiceStub")


def test_importing_the_client_pulls_in_no_server_packages() -> None:
    code = (
        "import json, sys\n"
        "import trainer_client\n"
        "from trainer_client import AsyncServiceClient, Datum, ServiceClient\n"
        "Datum.from_tokens([1, 2], [3])\n"
        f"heavy = {HEAVY_SERVER_PACKAGES!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.split('.')[0] == 'trainer_server')\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"`import trainer_client` imported server-side packages: {loaded}"


NON_OK_CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


@pytest.mark.parametrize("code", NON_OK_CODES, ids=lambda c: c.name)
def test_every_status_code_has_its_exception_class(code: grpc.StatusCode) -> None:
    exc = _errors.from_status(code, "x", "M")
    assert isinstance(exc, trainer_client.APIStatusError)
    assert isinstance(exc, trainer_client.TrainerError)
    assert exc.code == code
    assert type(exc).code == code, f"{code.name} maps to {type(exc).__name__}, whose code is {type(exc).code.name}"
    assert type(exc).__name__ in trainer_client.__all__
    assert exc.details == "x"
    assert exc.method == "M"
    assert str(exc) == f"M: {code.name}: x"


def test_status_classes_are_distinct() -> None:
    classes = {type(_errors.from_status(code, "x", "M")) for code in NON_OK_CODES}
    assert len(classes) == len(NON_OK_CODES)


def test_from_grpc_error_translates_an_aio_error() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="too big"
    )
    exc = _errors.from_grpc_error(error, "Forward")
    assert isinstance(exc, trainer_client.ResourceExhaustedError)
    assert str(exc) == "Forward: RESOURCE_EXHAUSTED: too big"
