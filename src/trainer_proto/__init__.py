"""Generated ``trainer.v1`` stubs and the tensor wire format, shared by client and server.

``pb`` is the message module and ``pb_grpc`` the service module, both generated from
``proto/`` by ``scripts/gen_protos.py``; ``wire`` encodes tensors as raw bytes plus spec;
``alloc`` sets the C allocator up for streaming MiB-sized buffers.

Submodules are imported on first use (PEP 562): ``wire`` needs torch, which takes seconds to
import, and the shell client (``trainer-client``) needs only ``pb`` and ``pb_grpc``.
"""

import importlib
import typing

if typing.TYPE_CHECKING:
    from trainer_proto import alloc, checksums, options, wire
    from trainer_proto.trainer.v1 import trainer_pb2 as pb
    from trainer_proto.trainer.v1 import trainer_pb2_grpc as pb_grpc

__all__ = ["alloc", "checksums", "options", "pb", "pb_grpc", "wire"]

_MODULES = {
    "alloc": "trainer_proto.alloc",
    "checksums": "trainer_proto.checksums",
    "options": "trainer_proto.options",
    "wire": "trainer_proto.wire",
    "pb": "trainer_proto.trainer.v1.trainer_pb2",
    "pb_grpc": "trainer_proto.trainer.v1.trainer_pb2_grpc",
}


def __getattr__(name: str) -> typing.Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'trainer_proto' has no attribute {name!r}")
    module = importlib.import_module(_MODULES[name])
    globals()[name] = module
    return module
