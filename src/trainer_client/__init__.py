"""trainer_client: drive a remote training server from a local Python training loop.

Async (the real client)::

    async with AsyncServiceClient("localhost:50051") as service:
        tc = await service.create_training_client(base_model="tiny-llama", lora_rank=16)
        fb = tc.forward_backward_custom(datums, loss_fn)
        op = tc.optim_step(AdamParams(learning_rate=1e-4))
        out, step = await fb, await op

Sync (a facade running the async client on a background loop)::

    with ServiceClient("localhost:50051") as service:
        tc = service.create_training_client(base_model="tiny-llama", lora_rank=16)
        out = tc.forward_backward_custom(datums, loss_fn).result()

This package needs grpcio, protobuf, torch, numpy, anyio and tokenizers, and never needs
transformers, peft or accelerate: with transformers installed, ``get_tokenizer()`` returns a
Hugging Face tokenizer (chat templates, ``Datum.from_messages``), else the raw ``tokenizers``
one. torch is imported on first use, so the ``trainer-client`` shell commands start fast.
"""

from trainer_client._async_client import AsyncServiceClient, AsyncTrainingClient
from trainer_client._config import ClientConfig
from trainer_client._errors import (
    AbortedError,
    AlreadyExistsError,
    APIStatusError,
    CallCancelledError,
    ClientClosedError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LossFunctionError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    PreviousCallFailedError,
    ProtocolError,
    ResourceExhaustedError,
    TrainerError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from trainer_client._futures import APIFuture
from trainer_client._sampling import AsyncSamplingClient
from trainer_client._sync_client import SamplingClient, ServiceClient, TrainingClient
from trainer_client._types import (
    CHECKPOINT_KINDS,
    AdamParams,
    CheckpointFile,
    CheckpointInfo,
    Datum,
    ForwardBackwardOutput,
    ForwardOutput,
    LossFn,
    ModelInfo,
    OptimStepResult,
    SampledSequence,
    SampleOutput,
    SamplingParams,
    ServerInfo,
    SessionInfo,
    TopLogprobs,
)

__all__ = [
    "CHECKPOINT_KINDS",
    "APIFuture",
    "APIStatusError",
    "AbortedError",
    "AdamParams",
    "AlreadyExistsError",
    "AsyncSamplingClient",
    "AsyncServiceClient",
    "AsyncTrainingClient",
    "CallCancelledError",
    "CheckpointFile",
    "CheckpointInfo",
    "ClientClosedError",
    "ClientConfig",
    "DataLossError",
    "Datum",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "ForwardBackwardOutput",
    "ForwardOutput",
    "InternalError",
    "InvalidArgumentError",
    "LossFn",
    "LossFunctionError",
    "ModelInfo",
    "NotFoundError",
    "OptimStepResult",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PreviousCallFailedError",
    "ProtocolError",
    "ResourceExhaustedError",
    "SampleOutput",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "ServerInfo",
    "ServiceClient",
    "SessionInfo",
    "TopLogprobs",
    "TrainerError",
    "TrainingClient",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
]
