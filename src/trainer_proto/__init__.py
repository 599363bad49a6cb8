"""Generated ``trainer.v1`` stubs and the tensor wire format, shared by client and server.

``pb`` is the message module and ``pb_grpc`` the service module, both generated from
``proto/`` by ``scripts/gen_protos.py``; ``wire`` encodes tensors as raw bytes plus spec;
``alloc`` sets the C allocator up for streaming MiB-sized buffers.
"""

from trainer_proto import alloc, checksums, options, wire
from trainer_proto.trainer.v1 import trainer_pb2 as pb
from trainer_proto.trainer.v1 import trainer_pb2_grpc as pb_grpc

__all__ = ["alloc", "checksums", "options", "pb", "pb_grpc", "wire"]
