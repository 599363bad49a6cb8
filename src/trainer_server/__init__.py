"""trainer_server: the gRPC training server (grpc.aio, torch, transformers, peft).

Embed it in an asyncio program::

    from trainer_server import ServerConfig, TrainerServer

    async with TrainerServer(ServerConfig(port=0)) as server:
        ...  # connect clients to server.address

or run ``trainer-server --model NAME=PATH``. aio objects belong to the event loop that
made them: start, use and stop a server on one loop.

Under ``accelerate launch`` every process joins with :func:`init_cluster`; rank 0 serves
(``TrainerServer(config, cluster=cluster)``) and the others call :func:`run_worker`.
"""

from trainer_server._cluster import Cluster, ClusterFailure, init_cluster
from trainer_server._config import Limits, ServerConfig
from trainer_server._server import SERVICE_NAME, TrainerServer, run_worker
from trainer_server.builtin_models import BUILTIN_MODEL_NAME, build_tiny_model, ensure_builtin_model
from trainer_server.core.errors import ErrorCode, ServiceError
from trainer_server.core.service import TrainingCore
from trainer_server.core.types import (
    CallRef,
    CheckpointResult,
    CustomResult,
    ForwardBackwardResult,
    ForwardResult,
    LoraSpec,
    ModelSummary,
    OptimStepResult,
    RawDatum,
    ServerSummary,
    SessionSpec,
)

__all__ = [
    "BUILTIN_MODEL_NAME",
    "SERVICE_NAME",
    "CallRef",
    "CheckpointResult",
    "Cluster",
    "ClusterFailure",
    "CustomResult",
    "ErrorCode",
    "ForwardBackwardResult",
    "ForwardResult",
    "Limits",
    "LoraSpec",
    "ModelSummary",
    "OptimStepResult",
    "RawDatum",
    "ServerConfig",
    "ServerSummary",
    "ServiceError",
    "SessionSpec",
    "TrainerServer",
    "TrainingCore",
    "build_tiny_model",
    "ensure_builtin_model",
    "init_cluster",
    "run_worker",
]
