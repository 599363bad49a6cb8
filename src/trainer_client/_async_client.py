"""The asyncio client: ``AsyncServiceClient`` and ``AsyncTrainingClient``.

::

    async with AsyncServiceClient("localhost:50051") as service:
        tc = await service.create_training_client(base_model="tiny-llama", lora_rank=16)
        fb = tc.forward_backward_custom(datums, loss_fn)   # sequence number taken now
        op = tc.optim_step(AdamParams(learning_rate=1e-4))
        out = await fb
        step = await op

Training-client methods are plain (not ``async``) methods: each takes the session's next
sequence number at the moment it is called, starts the RPC as a task on the running
loop, and returns an :class:`APIFuture`. The server runs a session's calls in sequence
order, so submitting several calls before awaiting any is correct, and is the fast
pattern. aio objects belong to the loop that made them: create and use a client on one
loop (the sync facade runs that loop in a background thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from trainer_client._address import DEFAULT_TARGET, parse_target
from trainer_client._config import ClientConfig
from trainer_client._errors import (
    APIStatusError,
    ClientClosedError,
    DataLossError,
    LossFunctionError,
    NotFoundError,
    PreviousCallFailedError,
    ProtocolError,
    UnavailableError,
    after_retries,
    from_grpc_error,
    from_status,
)
from trainer_client._futures import APIFuture
from trainer_client._sampling import AsyncSamplingClient, Prompt, read_samples
from trainer_client._tokenizer import load_tokenizer
from trainer_client._types import (
    CHECKPOINT_KINDS,
    AdamParams,
    CheckpointFile,
    CheckpointInfo,
    Datum,
    ForwardBackwardOutput,
    ForwardOutput,
    LossFn,
    OptimStepResult,
    SampleOutput,
    SamplingParams,
    ServerInfo,
    SessionInfo,
)
from trainer_proto import alloc, options, pb, pb_grpc
from trainer_proto.checksums import sha256_file

if TYPE_CHECKING:
    import torch

    from trainer_proto import wire
else:
    from trainer_client._lazy import torch, wire

__all__ = ["AsyncServiceClient", "AsyncTrainingClient"]

log = logging.getLogger("trainer_client")

T = TypeVar("T")

_WIRE_DTYPES = {"float32": pb.DATA_TYPE_FLOAT32, "bfloat16": pb.DATA_TYPE_BFLOAT16}


def _wire_dtype(name: str) -> pb.DataType.ValueType:
    try:
        return _WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"logprobs_dtype must be one of {sorted(_WIRE_DTYPES)}, got {name!r}") from None


def _batches(data: Sequence[Datum], chunk_bytes: int) -> Iterator[pb.DatumBatch]:
    """Pack datums into messages of about ``chunk_bytes`` each."""
    batch = pb.DatumBatch()
    size = 0
    for d in data:
        if not isinstance(d, Datum):
            raise TypeError(f"expected Datum, got {type(d).__name__}")
        msg = d.to_proto()
        n = msg.ByteSize()
        if batch.datums and size + n > chunk_bytes:
            yield batch
            batch, size = pb.DatumBatch(), 0
        batch.datums.append(msg)
        size += n
    if batch.datums:
        yield batch


_SERVICE = pb.DESCRIPTOR.services_by_name["TrainerService"].full_name

_REQUESTS: Mapping[str, Any] = {
    "Forward": pb.ForwardRequest,
    "ForwardBackward": pb.ForwardBackwardRequest,
    "ForwardBackwardCustom": pb.ForwardBackwardCustomRequest,
}
"""Request message class of each datum-streaming RPC."""


class _Stream:
    """One bidi call with typed reads: errors become client exceptions."""

    def __init__(self, call: Any, method: str, service: AsyncServiceClient) -> None:
        self.call = call
        self.method = method
        self.service = service

    async def write(self, msg: Any) -> None:
        try:
            await self.call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The server already ended the call (it rejected an earlier message): the write
            # then fails with InvalidStateError or a synthetic INTERNAL "Internal error from
            # Core". Report the status the server actually sent.
            await self._raise_status()

    async def _raise_status(self) -> None:
        code = await self.call.code()
        details = await self.call.details()
        if code != grpc.StatusCode.OK:
            raise from_status(code, details, self.method, target=self.service.target, tls=self.service.tls)
        raise ProtocolError(f"{self.method}: the server ended the stream early")

    async def read(self, *expected: str) -> Any:
        """Read the next message, which must set one of the ``expected`` oneof fields."""
        try:
            msg = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise self.service._translate(exc, self.method) from exc
        if msg is grpc.aio.EOF:
            await self._raise_status()
        kind = msg.WhichOneof("message")
        if kind not in expected:
            raise ProtocolError(f"{self.method}: expected {' or '.join(expected)}, got {kind!r}")
        return msg

    async def read_logprobs(self, header_msg: Any, lengths: list[int], max_bytes: int) -> torch.Tensor:
        """Reassemble the logprobs stream that ``header_msg`` opened; returns float32."""
        try:
            assembler = wire.ChunkAssembler(
                header_msg.logprobs_header, "logprobs", max_bytes=max_bytes, expected_lengths=lengths
            )
            while not assembler.done:
                assembler.add((await self.read("logprobs_chunk")).logprobs_chunk)
            return assembler.tensor().float()
        except wire.WireError as exc:
            raise ProtocolError(f"{self.method}: {exc}") from exc

    def cancel(self) -> None:
        self.call.cancel()


def _run_loss(
    loss_fn: LossFn, data: Sequence[Datum], logprobs: torch.Tensor, lengths: list[int]
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """Run the user's loss on detached logprobs; return d_loss/d_logprobs, loss, metrics."""
    leaf = logprobs.detach().clone().requires_grad_(True)
    try:
        out = loss_fn(list(data), list(torch.split(leaf, lengths)))
    except Exception as exc:
        raise LossFunctionError(f"loss_fn raised {exc!r}") from exc
    if not (isinstance(out, tuple) and len(out) == 2):
        raise LossFunctionError(f"loss_fn must return (loss, metrics), got {type(out).__name__}")
    loss, metrics = out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise LossFunctionError(f"loss_fn's loss must be a scalar tensor, got {loss!r}")
    if not loss.requires_grad:
        raise LossFunctionError("loss_fn's loss does not depend on the logprobs (no gradient)")
    if not isinstance(metrics, Mapping):
        raise LossFunctionError(f"loss_fn's metrics must be a mapping of name to number, got {type(metrics).__name__}")
    (grad,) = torch.autograd.grad(loss.reshape(()), leaf, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(leaf)
    try:
        values = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as exc:
        raise LossFunctionError(f"loss_fn's metrics must be numbers: {exc}") from exc
    return grad.detach().float(), float(loss.detach()), values


class AsyncTrainingClient:
    """A training session. Create it with :meth:`AsyncServiceClient.create_training_client`.

    Attributes:
        session_id: the server's id of the session.
        base_model: the base model's name.
    """

    def __init__(self, service: AsyncServiceClient, response: pb.CreateSessionResponse | pb.SessionInfo) -> None:
        self._service = service
        self.session_id = response.session_id
        self.base_model = response.base_model
        self.trainable_parameters = response.trainable_parameters
        self.lora_rank: int | None = response.lora.rank if response.HasField("lora") else None
        """The session's LoRA rank; None for a full fine-tune."""
        self._sampler_saves = 0
        self._next_seq = response.next_seq or 1
        self._loop = asyncio.get_running_loop()
        self._failed: list[APIFuture[Any]] = []
        self._closed = False
        self._gradient_calls = 0  # forward_backward calls since the last optim_step
        # The server refuses calls beyond its in-flight limit; hold them back here instead,
        # so a loop may submit as far ahead as it likes.
        self._slots = asyncio.Semaphore(response.max_inflight_calls or 1 << 30)
        service._lease(self.session_id, response.session_ttl_s)

    # ---- sequencing and futures -----------------------------------------------------

    def _record_failure(self, future: APIFuture[Any]) -> None:
        self._failed.append(future)

    def _raise_unretrieved(self) -> None:
        failed, self._failed = self._failed, []
        for fut in failed:
            if not fut.error_retrieved:
                exc = fut.peek_exception()
                raise PreviousCallFailedError(
                    f"{fut.description} failed and its error was never retrieved: {exc!r}"
                ) from exc

    def _submit(self, name: str, run: Callable[[int], Awaitable[T]]) -> APIFuture[T]:
        if self._closed:
            raise ClientClosedError(f"session {self.session_id} is closed; create a new training client")
        self._service._check_open()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("use a training client on the event loop that created it (or the sync TrainingClient)")
        self._raise_unretrieved()
        seq = self._next_seq
        self._next_seq += 1

        async def call() -> T:
            # Safe to repeat: the server answers a retried (session, seq, same request)
            # with the stored outcome and never applies a call twice.
            attempts = self._service.config.retry_attempts
            failures: list[UnavailableError] = []
            async with self._slots:
                for attempt in range(attempts):
                    try:
                        return await run(seq)
                    except UnavailableError as exc:
                        failures.append(exc)
                        if attempt == attempts - 1:
                            raise after_retries(failures) from exc
                    await asyncio.sleep(random.uniform(0, self._service.config.retry_backoff_s * 2**attempt))
            raise AssertionError("unreachable")

        task = loop.create_task(call(), name=f"trainer {name} #{seq}")
        return APIFuture(
            task, description=f"{name} #{seq} of session {self.session_id}", on_failure=self._record_failure
        )

    def _header(self, seq: int) -> pb.CallHeader:
        return pb.CallHeader(session_id=self.session_id, seq=seq)

    def _open(self, method: str) -> _Stream:
        """Open a tensor-streaming call with the chunk fast path (see ``wire.STREAM_CODECS``)."""
        svc = self._service
        requests, responses = wire.STREAM_CODECS[method]
        call = svc._channel.stream_stream(
            f"/{_SERVICE}/{method}", request_serializer=requests.serialize, response_deserializer=responses.deserialize
        )(timeout=svc.config.timeout_s, metadata=svc._metadata)
        return _Stream(call, method, svc)

    async def _send_datums(self, stream: _Stream, start_field: str, start: Any, batches: list[pb.DatumBatch]) -> None:
        request = _REQUESTS[stream.method]
        await stream.write(request(**{start_field: start}))
        for batch in batches:
            await stream.write(request(datums=batch))

    # ---- training calls ---------------------------------------------------------------

    def forward(self, data: Sequence[Datum], *, logprobs_dtype: str = "float32") -> APIFuture[ForwardOutput]:
        """Logprobs of each datum's targets on the current weights; no gradient is kept."""
        batches = list(_batches(data, self._service.config.chunk_bytes))
        lengths = [len(d) for d in data]
        dtype = _wire_dtype(logprobs_dtype)

        async def run(seq: int) -> ForwardOutput:
            stream = self._open("Forward")
            start = pb.ForwardStart(call=self._header(seq), num_datums=len(data), logprobs_dtype=dtype)
            await self._send_datums(stream, "start", start, batches)
            await stream.call.done_writing()
            flat = await stream.read_logprobs(
                await stream.read("logprobs_header"), lengths, self._service.config.max_message_bytes * 64
            )
            result = (await stream.read("result")).result
            return ForwardOutput(logprobs=list(torch.split(flat, lengths)), num_tokens=result.num_tokens)

        return self._submit("forward", run)

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
        *,
        return_logprobs: bool = False,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Run a built-in loss on the server and accumulate its gradients.

        Args:
            data: the batch.
            loss_fn: a built-in loss name (see ``ServerInfo.loss_functions``).
            loss_fn_config: the loss's parameters.
            return_logprobs: also return the per-token logprobs.
        """
        batches = list(_batches(data, self._service.config.chunk_bytes))
        lengths = [len(d) for d in data]
        config = {str(k): float(v) for k, v in (loss_fn_config or {}).items()}

        async def run(seq: int) -> ForwardBackwardOutput:
            stream = self._open("ForwardBackward")
            start = pb.ForwardBackwardStart(
                call=self._header(seq),
                num_datums=len(data),
                loss_fn=loss_fn,
                loss_fn_config=config,
                return_logprobs=return_logprobs,
            )
            await self._send_datums(stream, "start", start, batches)
            await stream.call.done_writing()
            logprobs: list[torch.Tensor] = []
            msg = await stream.read("logprobs_header", "result")
            if msg.WhichOneof("message") == "logprobs_header":
                flat = await stream.read_logprobs(msg, lengths, self._service.config.max_message_bytes * 64)
                logprobs = list(torch.split(flat, lengths))
                msg = await stream.read("result")
            r = msg.result
            return ForwardBackwardOutput(
                loss=r.loss, metrics=dict(r.metrics), logprobs=logprobs, num_tokens=r.num_tokens
            )

        self._gradient_calls += 1
        return self._submit("forward_backward", run)

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: LossFn, *, logprobs_dtype: str = "float32"
    ) -> APIFuture[ForwardBackwardOutput]:
        """Forward on the server, your loss here, backward on the server, in one stream.

        The server keeps the forward graph while ``loss_fn`` runs, so a custom loss costs
        one forward and one backward, like a built-in loss.

        Args:
            data: the batch.
            loss_fn: ``loss_fn(data, logprobs) -> (loss, metrics)``; ``logprobs[i]`` has
                one entry per target of ``data[i]`` and ``requires_grad=True``.
            logprobs_dtype: "float32" (default) or "bfloat16" on the wire, both ways.

        Raises:
            LossFunctionError: (from the future) ``loss_fn`` raised or returned something
                unusable; the call is then cancelled and nothing is applied.
        """
        batches = list(_batches(data, self._service.config.chunk_bytes))
        lengths = [len(d) for d in data]
        dtype = _wire_dtype(logprobs_dtype)
        torch_dtype = wire.dtype_from_wire(dtype)

        async def run(seq: int) -> ForwardBackwardOutput:
            stream = self._open("ForwardBackwardCustom")
            start = pb.ForwardStart(call=self._header(seq), num_datums=len(data), logprobs_dtype=dtype)
            try:
                await self._send_datums(stream, "start", start, batches)
                flat = await stream.read_logprobs(
                    await stream.read("logprobs_header"), lengths, self._service.config.max_message_bytes * 64
                )
                grad, loss, metrics = await asyncio.to_thread(_run_loss, loss_fn, data, flat, lengths)
                grad = grad.to(torch_dtype)
                req = pb.ForwardBackwardCustomRequest
                await stream.write(req(grad_header=wire.stream_header(grad, lengths)))
                for raw in wire.STREAM_CODECS["ForwardBackwardCustom"][0].chunk_messages(
                    grad, self._service.config.chunk_bytes
                ):
                    await stream.write(raw)
                await stream.call.done_writing()
                result = (await stream.read("result")).result
            except BaseException:
                stream.cancel()  # the server drops the held graph; nothing is applied
                raise
            return ForwardBackwardOutput(
                loss=loss,
                metrics=metrics,
                logprobs=[t.detach() for t in torch.split(flat, lengths)],
                num_tokens=result.num_tokens,
            )

        self._gradient_calls += 1
        return self._submit("forward_backward_custom", run)

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResult]:
        """Apply AdamW to the gradients accumulated since the last step, then clear them.

        With no forward_backward submitted since the previous step there is nothing to apply.
        As in Tinker, the step is still taken and counted, and changes no weight (AdamW skips
        parameters without a gradient); the result says so (``no_gradient=True``) and a
        ``RuntimeWarning`` is emitted, since it is almost always a bug in the loop.
        """
        params = (adam_params or AdamParams()).to_proto()
        no_gradient = self._gradient_calls == 0
        if no_gradient:
            warnings.warn(
                f"optim_step on session {self.session_id} with no forward_backward since the last step: "
                "no gradient to apply, the weights will not change",
                RuntimeWarning,
                stacklevel=2,
            )

        async def run(seq: int) -> OptimStepResult:
            request = pb.OptimStepRequest(call=self._header(seq), adam_params=params)
            response = await self._service._unary("OptimStep", request, self._service.config.timeout_s)
            return OptimStepResult(step=response.step, grad_norm=response.grad_norm, no_gradient=no_gradient)

        future = self._submit("optim_step", run)
        self._gradient_calls = 0
        return future

    def sample(
        self,
        prompt: Prompt,
        num_samples: int = 1,
        params: SamplingParams | None = None,
        *,
        return_prompt_logprobs: bool = False,
    ) -> APIFuture[SampleOutput]:
        """Sample from the session's weights as of this call's place in the sequence.

        Sampling never changes training state; submitted between training calls, it sees
        exactly the weights those calls produced. Concurrent sample calls share decode steps
        on the server.
        """
        return self.create_sampling_client().sample(
            prompt, num_samples, params, include_prompt_logprobs=return_prompt_logprobs
        )

    def sample_many(
        self,
        prompts: Sequence[Prompt | tuple[Prompt, int]],
        params: SamplingParams | None = None,
        *,
        num_samples: int = 1,
        return_prompt_logprobs: bool = False,
    ) -> APIFuture[list[SampleOutput]]:
        """Sample many prompts (each with its own number of samples) in one sequenced call."""
        return self.create_sampling_client().sample_many(
            prompts, params, num_samples=num_samples, include_prompt_logprobs=return_prompt_logprobs
        )

    def create_sampling_client(self) -> AsyncSamplingClient:
        """A sampling client over this session's live weights.

        Each of its calls takes the session's next sequence number when it is made, so it sees
        the weights of the calls submitted before it.
        """
        return AsyncSamplingClient(self._service, training_client=self)

    def save_state(self, name: str) -> APIFuture[CheckpointInfo]:
        """Save everything needed to resume (Tinker's ``save_state``): a STATE checkpoint."""
        return self.save_checkpoint(name, "state")

    def save_weights_for_sampler(self, name: str) -> APIFuture[CheckpointInfo]:
        """Save weights to sample from (Tinker's ``save_weights_for_sampler``), cheaply.

        A LoRA session saves its adapter alone (the server lays it over the base it already
        holds when sampling); a full fine-tune saves its STATE (float32, so samples' logprobs
        equal the session's).
        """
        return self.save_checkpoint(name, "adapter" if self.lora_rank is not None else "state")

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> APIFuture[AsyncSamplingClient]:
        """Save sampler weights and return a sampling client over them (Tinker's name).

        Args:
            name: the checkpoint's name; default ``SESSION-sampler-STEP-N``.
        """
        self._sampler_saves += 1
        name = name or f"{self.session_id}-sampler-{self._sampler_saves}"
        saved = self.save_weights_for_sampler(name)

        async def client() -> AsyncSamplingClient:
            info = await saved
            return AsyncSamplingClient(self._service, checkpoint=info.name)

        return APIFuture(asyncio.ensure_future(client()), description=saved.description)

    def compute_logprobs(self, sequences: Sequence[Sequence[int] | torch.Tensor]) -> APIFuture[list[torch.Tensor]]:
        """Logprob of every token after the first of each sequence (a Forward call)."""
        data = [Datum.from_sequence(s) for s in sequences]
        inner = self.forward(data)

        async def result() -> list[torch.Tensor]:
            return (await inner).logprobs

        return APIFuture(
            asyncio.ensure_future(result()), description=inner.description, on_failure=self._record_failure
        )

    def save_checkpoint(self, name: str, kind: str = "state", *, dtype: str = "bfloat16") -> APIFuture[CheckpointInfo]:
        """Save a checkpoint after the calls already submitted (a barrier on the server).

        Args:
            name: the checkpoint's name (letters, digits, ``.``, ``_``, ``-``).
            kind: "state" (resumable: weights, optimizer, step, RNG), "base" (full Hugging
                Face weights, LoRA merged), "delta" (lossless diff from this session's
                last base) or "adapter" (LoRA in PEFT layout).
            dtype: export dtype of "base" weights: "bfloat16" or "float32". A delta uses
                its base's dtype.
        """
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
        request = pb.SaveCheckpointRequest(
            name=name, kind=pb.CheckpointKind.Value(f"CHECKPOINT_KIND_{kind.upper()}"), dtype=_wire_dtype(dtype)
        )

        async def run(seq: int) -> CheckpointInfo:
            request.call.CopyFrom(self._header(seq))
            response = await self._service._unary("SaveCheckpoint", request, self._service.config.timeout_s)
            return CheckpointInfo.from_proto(response.checkpoint)

        return self._submit("save_checkpoint", run)

    async def get_tokenizer(self) -> Any:
        """The base model's tokenizer, fetched once (see :meth:`AsyncServiceClient.get_tokenizer`)."""
        return await self._service.get_tokenizer(self.base_model)

    async def close(self) -> None:
        """Close the session on the server, after the calls already submitted."""
        if self._closed:
            return

        async def run(seq: int) -> None:
            await self._service._unary(
                "CloseSession", pb.CloseSessionRequest(call=self._header(seq)), self._service.config.timeout_s
            )

        fut = self._submit("close", run)
        self._closed = True
        try:
            await fut
        finally:
            self._service._release(self.session_id)

    async def __aenter__(self) -> AsyncTrainingClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncServiceClient:
    """A connection to a training server.

    Args:
        target: the server: ``host:port``, ``host`` (port 50051), ``http://host:port`` or
            ``https://host:port`` (TLS); defaults to ``$TRAINER_SERVER``, else ``localhost:50051``.
        api_key: sent as ``authorization: Bearer <key>``; defaults to ``$TRAINER_API_KEY``.
        config: deadlines, sizes and retries.
        tls: connect with TLS (system roots unless ``root_certificates`` is given).
        root_certificates: PEM roots to verify the server with (implies TLS).
        channel: use this channel instead of opening one (e.g. with interceptors).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        config: ClientConfig | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        target = target or os.environ.get("TRAINER_SERVER") or DEFAULT_TARGET
        self.target, self.tls = parse_target(target, tls=tls or root_certificates is not None)
        target = self.target
        self.config = config or ClientConfig()
        if self.config.tune_allocator:
            alloc.tune_allocator()
        opts = options.grpc_options(
            max_message_bytes=self.config.max_message_bytes,
            keepalive_time_s=self.config.keepalive_time_s,
            keepalive_timeout_s=self.config.keepalive_timeout_s,
        )
        if channel is None and self.tls:
            channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=opts)
        self._channel = channel or grpc.aio.insecure_channel(target, options=opts)
        self._stub = pb_grpc.TrainerServiceStub(self._channel)
        api_key = api_key if api_key is not None else os.environ.get("TRAINER_API_KEY")
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._tokenizers: dict[str, Any] = {}
        self._leases: dict[str, float] = {}  # open sessions of this client -> their TTL
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(f"the client to {self.target} is closed; open a new one")

    def _translate(self, exc: grpc.aio.AioRpcError, method: str) -> Exception:
        """The client exception for a gRPC error (connection failures worded for this target)."""
        return from_grpc_error(exc, method, target=self.target, tls=self.tls)

    # ---- leases ----------------------------------------------------------------------

    def _lease(self, session_id: str, ttl_s: float) -> None:
        """Keep ``session_id`` alive with background heartbeats while this client holds it."""
        self._leases[session_id] = ttl_s
        interval = self.config.heartbeat_interval_s
        if interval == 0 or (interval is None and ttl_s <= 0):
            return
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="trainer heartbeat")

    def _release(self, session_id: str) -> None:
        self._leases.pop(session_id, None)

    async def _beat(self) -> None:
        """Renew the leases of this client's open sessions until none is left."""
        while self._leases:
            configured = self.config.heartbeat_interval_s
            interval = configured if configured else min(ttl for ttl in self._leases.values() if ttl > 0) / 3
            await asyncio.sleep(interval)
            ids = list(self._leases)
            if not ids:
                return
            try:
                response = await self._stub.Heartbeat(
                    pb.HeartbeatRequest(session_ids=ids), timeout=self.config.unary_timeout_s, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:  # the server is away for now: its calls will say so
                log.debug("heartbeat failed: %s", exc.details())
                continue
            for session_id in response.missing_session_ids:
                log.warning("session %s is no longer open on the server (expired or closed)", session_id)
                self._leases.pop(session_id, None)

    async def list_sessions(self) -> list[SessionInfo]:
        """The open sessions of this client's API key on the server, oldest first."""
        request = pb.ListSessionsRequest()
        response = await self._unary("ListSessions", request, self.config.unary_timeout_s, retry=True)
        return [SessionInfo.from_proto(s) for s in response.sessions]

    async def attach_training_client(self, session_id: str) -> AsyncTrainingClient:
        """Take over a live session by id (e.g. from a crashed process, or after a server restart).

        The new client continues the session's sequence: its first call runs after every
        call the server has already received for the session.
        """
        response = await self._unary(
            "AttachSession", pb.AttachSessionRequest(session_id=session_id), self.config.unary_timeout_s, retry=True
        )
        return AsyncTrainingClient(self, response.session)

    async def end_session(self, session_id: str) -> None:
        """Close a session by id at once, out of sequence (one a crashed client left open)."""
        await self._unary("EndSession", pb.EndSessionRequest(session_id=session_id), self.config.unary_timeout_s)
        self._release(session_id)

    async def _with_retry(self, method: str, attempt: Callable[[], Awaitable[T]], *, retry: bool) -> T:
        """Run ``attempt``; on UNAVAILABLE, when ``retry``, again after a jittered backoff."""
        self._check_open()
        attempts = self.config.retry_attempts if retry else 1
        failures: list[APIStatusError] = []
        for n in range(attempts):
            try:
                return await attempt()
            except grpc.aio.AioRpcError as exc:
                error = self._translate(exc, method)
                if not isinstance(error, UnavailableError):
                    raise error from exc
                failures.append(error)
                if n == attempts - 1:
                    raise after_retries(failures) from exc
            await asyncio.sleep(random.uniform(0, self.config.retry_backoff_s * 2**n))
        raise AssertionError("unreachable")

    async def _unary(self, method: str, request: Any, timeout_s: float, *, retry: bool = False) -> Any:
        """One unary call with errors translated; retried on UNAVAILABLE when ``retry``."""

        async def attempt() -> Any:
            return await getattr(self._stub, method)(request, timeout=timeout_s, metadata=self._metadata)

        return await self._with_retry(method, attempt, retry=retry)

    async def get_server_info(self) -> ServerInfo:
        """Version, models, devices, limits and capabilities of the server."""
        response = await self._unary(
            "GetServerInfo", pb.GetServerInfoRequest(), self.config.unary_timeout_s, retry=True
        )
        return ServerInfo.from_proto(response)

    async def create_training_client(
        self,
        base_model: str,
        *,
        lora_rank: int | None = 32,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        seed: int = 0,
    ) -> AsyncTrainingClient:
        """Start a training session.

        Args:
            base_model: a model name from ``get_server_info().models``.
            lora_rank: LoRA rank; ``None`` trains every parameter (full fine-tune).
            lora_alpha: LoRA scaling numerator (default: the rank).
            lora_target_modules: modules to adapt (default: every linear layer, the output layer included).
            seed: seeds the adapter initialisation.
        """
        request = pb.CreateSessionRequest(base_model=base_model, seed=seed)
        if lora_rank is None:
            request.full.SetInParent()
        else:
            request.lora.rank = lora_rank
            request.lora.alpha = lora_alpha or 0.0
            request.lora.target_modules.extend(lora_target_modules or [])
        response = await self._unary("CreateSession", request, self.config.unary_timeout_s)
        return AsyncTrainingClient(self, response)

    async def create_training_client_from_state(self, checkpoint: str) -> AsyncTrainingClient:
        """Resume training from a STATE checkpoint (on this or any server that has it).

        The new session has the checkpoint's base model, mode, weights, optimizer state
        and step; training continues exactly as if it had never stopped.
        """
        request = pb.CreateSessionRequest(resume_from=checkpoint)
        response = await self._unary("CreateSession", request, self.config.unary_timeout_s)
        return AsyncTrainingClient(self, response)

    async def _sample(self, request: pb.SampleRequest) -> list[SampleOutput]:
        self._check_open()
        call = self._stub.Sample(request, timeout=self.config.timeout_s, metadata=self._metadata)
        try:
            return await read_samples(call, request)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, "Sample") from exc

    def create_sampling_client(
        self, model_path: str | None = None, *, base_model: str | None = None
    ) -> AsyncSamplingClient:
        """A sampling client (Tinker's ``create_sampling_client``).

        Args:
            model_path: a checkpoint to sample (e.g. from ``save_weights_for_sampler``: BASE,
                STATE or ADAPTER), or
            base_model: a served base model, sampled with its own weights.
        """
        if (model_path is None) == (base_model is None):
            raise ValueError("create_sampling_client takes model_path (a checkpoint) or base_model, one of them")
        return AsyncSamplingClient(self, base_model=base_model, checkpoint=model_path)

    async def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        *,
        seed: int = 0,
        target_modules: Sequence[str] | None = None,
    ) -> AsyncTrainingClient:
        """Start a LoRA session (Tinker's name for :meth:`create_training_client`).

        Args:
            base_model: a model name from ``get_server_info().models``.
            rank: LoRA rank.
            seed: seeds the adapter initialisation.
            target_modules: modules to adapt (default: every linear layer, the output layer included).
        """
        return await self.create_training_client(
            base_model, lora_rank=rank, lora_target_modules=target_modules, seed=seed
        )

    async def sample_from_checkpoint(
        self,
        checkpoint: str,
        prompt: Prompt,
        num_samples: int = 1,
        params: SamplingParams | None = None,
        *,
        return_prompt_logprobs: bool = False,
    ) -> SampleOutput:
        """Sample from a BASE, STATE or ADAPTER checkpoint's weights (see :meth:`create_sampling_client`)."""
        sampler = self.create_sampling_client(checkpoint)
        return await sampler.sample(prompt, num_samples, params, include_prompt_logprobs=return_prompt_logprobs)

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints on the server, oldest first."""
        response = await self._unary(
            "ListCheckpoints", pb.ListCheckpointsRequest(), self.config.unary_timeout_s, retry=True
        )
        return [CheckpointInfo.from_proto(c) for c in response.checkpoints]

    async def delete_checkpoint(self, name: str) -> None:
        """Delete a checkpoint."""
        await self._unary("DeleteCheckpoint", pb.DeleteCheckpointRequest(name=name), self.config.unary_timeout_s)

    async def download_checkpoint(self, name: str, out_dir: str | Path, *, progress: bool = True) -> Path:
        """Download a checkpoint's files into ``out_dir``; resumable, sha256-verified.

        Each file is streamed into ``FILE.part`` from where an earlier, interrupted
        download stopped, then checked against the manifest's sha256 and renamed. Files
        already present with the right hash are skipped.

        Raises:
            DataLossError: a file's bytes do not match its sha256 (the partial file is
                removed, so a retry starts that file afresh).
        """
        info = next((c for c in await self.list_checkpoints() if c.name == name), None)
        if info is None:
            raise NotFoundError(f"checkpoint {name!r} does not exist", method="DownloadCheckpoint")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        with tqdm(
            total=info.total_bytes, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress
        ) as bar:
            for f in info.files:
                await self._download_file(name, f, out, bar)
            await self._download_file(name, None, out, bar)
        return out

    async def _download_file(self, name: str, entry: CheckpointFile | None, out: Path, bar: Any) -> None:
        file_name = entry.path if entry is not None else "manifest.json"
        dest = out / file_name
        if not dest.resolve().is_relative_to(out.resolve()):
            raise ProtocolError(f"DownloadCheckpoint: the server listed a file outside {out}: {file_name!r}")
        if (
            entry is not None
            and dest.is_file()
            and dest.stat().st_size == entry.size
            and await asyncio.to_thread(sha256_file, dest) == entry.sha256
        ):
            bar.update(entry.size)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        if part.exists() and (entry is None or part.stat().st_size > entry.size):
            part.unlink()  # the manifest has no sha256 to check a resumed copy; an oversized part can never resume
        offset = part.stat().st_size if part.exists() else 0
        if entry is not None:
            bar.update(offset)

        async def attempt() -> None:
            nonlocal offset
            request = pb.DownloadCheckpointRequest(name=name, file=file_name, offset=offset)
            call = self._stub.DownloadCheckpoint(request, timeout=self.config.timeout_s, metadata=self._metadata)
            with part.open("ab") as fh:
                async for chunk in call:
                    if chunk.offset != offset:
                        raise ProtocolError(f"DownloadCheckpoint: chunk at {chunk.offset}, expected {offset}")
                    fh.write(chunk.data)
                    offset += len(chunk.data)
                    if entry is not None:
                        bar.update(len(chunk.data))

        await self._with_retry("DownloadCheckpoint", attempt, retry=True)
        if entry is not None and (offset != entry.size or await asyncio.to_thread(sha256_file, part) != entry.sha256):
            part.unlink()
            raise DataLossError(
                f"{file_name} of checkpoint {name!r} does not match its sha256; removed, retry the download",
                method="DownloadCheckpoint",
            )
        part.replace(dest)

    async def get_tokenizer(self, base_model: str) -> Any:
        """The tokenizer of a served model, built from its own files (cached).

        With ``transformers`` installed: a Hugging Face ``PreTrainedTokenizerFast`` (via
        ``AutoTokenizer``), chat template and special tokens included (``apply_chat_template``,
        ``eos_token_id``, ``decode(skip_special_tokens=True)``). Without it: the raw
        ``tokenizers.Tokenizer``, with ``eos_token``/``eos_token_id`` attributes set from the
        model's files. Either way the EOS is the model's (tokenizer config, else generation config).
        """
        if base_model not in self._tokenizers:
            files = await self.get_tokenizer_files(base_model)
            try:
                tokenizer = await asyncio.to_thread(load_tokenizer, files)
            except ProtocolError as exc:
                raise ProtocolError(f"model {base_model!r}: {exc}") from exc
            self._tokenizers[base_model] = tokenizer
        return self._tokenizers[base_model]

    async def get_tokenizer_files(self, base_model: str) -> dict[str, bytes]:
        """The model's tokenizer and generation files by name: ``tokenizer.json``, ``chat_template.jinja``, ..."""

        async def attempt() -> dict[str, bytes]:
            files: dict[str, bytearray] = {}
            call = self._stub.GetTokenizer(
                pb.GetTokenizerRequest(base_model=base_model),
                timeout=self.config.unary_timeout_s,
                metadata=self._metadata,
            )
            async for chunk in call:
                buf = files.setdefault(chunk.file_name, bytearray())
                if chunk.offset != len(buf):
                    raise ProtocolError(f"GetTokenizer: {chunk.file_name} chunk at {chunk.offset}, expected {len(buf)}")
                buf += chunk.data
            return {name: bytes(data) for name, data in files.items()}

        return await self._with_retry("GetTokenizer", attempt, retry=True)

    async def close(self) -> None:
        """Stop the heartbeats and close the channel; later calls raise :class:`ClientClosedError`.

        Sessions stay open on the server until their lease ends (or are closed by their clients).
        """
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self._channel.close()

    async def __aenter__(self) -> AsyncServiceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
