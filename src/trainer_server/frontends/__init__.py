"""Front ends: thin adapters from a wire protocol to :mod:`trainer_server.core`.

Modules:
    grpc_servicer: ``trainer.v1.TrainerService`` (gRPC, chunked tensor streams).
    grpc_auth: API-key interceptor and owner ids for the gRPC front end.
    tinker: the Tinker-protocol HTTP API (the official ``tinker`` SDK runs against it).
"""
