"""The ``trainer.v1.TrainerService`` servicer: a thin gRPC adapter over the core.

Each handler reads its request (streams in chunks), decodes it into domain types, calls
the :class:`~trainer_server.core.service.TrainingCore` (which sequences the call, replays
retries and runs the model work), and encodes the domain result back into messages. Core
errors are turned into gRPC statuses in one place, :func:`translate_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from trainer_proto import pb, pb_grpc, wire
from trainer_server._checkpoints import MANIFEST, Manifest
from trainer_server._config import ServerConfig
from trainer_server._models import BaseModel
from trainer_server._sampling import Sample, SampleRequest, SampleResult, SamplingSettings
from trainer_server.core.errors import (
    ErrorCode,
    ServiceError,
    cap_message,
    echo,
    invalid_argument,
    not_found,
    resource_exhausted,
)
from trainer_server.core.service import TrainingCore
from trainer_server.core.sessions import Session
from trainer_server.core.types import (
    CallRef,
    ForwardResult,
    LoraSpec,
    RawDatum,
    ServerSummary,
    SessionSpec,
)
from trainer_server.frontends.grpc_auth import owner_of

__all__ = ["TrainerServicer", "translate_errors"]

log = logging.getLogger("trainer_server.servicer")

_Servicer = TypeVar("_Servicer", bound="TrainerServicer")
_Response = TypeVar("_Response", bound=Message)
_Handler = Callable[[_Servicer, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]

_LOGPROB_DTYPES: dict[int, torch.dtype] = {
    pb.DATA_TYPE_UNSPECIFIED: torch.float32,
    pb.DATA_TYPE_FLOAT32: torch.float32,
    pb.DATA_TYPE_BFLOAT16: torch.bfloat16,
}


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    """The gRPC status of a core error code (the same canonical name)."""
    return grpc.StatusCode[code.name]


def translate_errors(handler: _Handler[_Servicer]) -> _Handler[_Servicer]:
    """Turn engine errors into statuses; log unexpected ones and answer INTERNAL."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: _Servicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        streaming = not isinstance(request, Message)  # request-streaming handlers get an iterator
        try:
            return await handler(self, request, context)
        except ServiceError as exc:
            log.info("%s -> %s: %s", name, exc.code.name, exc.message)
            code, message = grpc_status(exc.code), exc.message
        except wire.WireError as exc:
            log.info("%s -> INVALID_ARGUMENT: %s", name, exc)
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("%s failed", name)
            code, message = grpc.StatusCode.INTERNAL, f"{name}: internal error; see the server log"
        if streaming:
            await _drain(context)
        await context.abort(code, cap_message(message))

    return wrapper


async def _drain(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Read what the client is still sending before failing the call.

    A client rejected mid-stream may still be writing; if the call ends under it, grpc-aio
    hands the client a generic INTERNAL instead of the status sent here. Reading until the
    client goes quiet (or ends its stream) lets the precise status reach it. Bounded in
    time, so a client that keeps writing cannot hold the handler.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DRAIN_MAX_S
    with contextlib.suppress(Exception):
        while loop.time() < deadline:
            msg = await asyncio.wait_for(context.read(), _DRAIN_IDLE_S)
            if msg is grpc.aio.EOF:
                return


_DRAIN_IDLE_S = 0.2
"""A rejected client that sends nothing for this long is waiting for our reply."""
_DRAIN_MAX_S = 10.0
"""Stop draining a rejected stream after this long, whatever the client does."""


_KINDS = {
    "base": pb.CHECKPOINT_KIND_BASE,
    "delta": pb.CHECKPOINT_KIND_DELTA,
    "adapter": pb.CHECKPOINT_KIND_ADAPTER,
    "state": pb.CHECKPOINT_KIND_STATE,
}
_KIND_NAMES = {value: name for name, value in _KINDS.items()}
_EXPORT_DTYPES = {pb.DATA_TYPE_UNSPECIFIED: "", pb.DATA_TYPE_BFLOAT16: "bfloat16", pb.DATA_TYPE_FLOAT32: "float32"}


def checkpoint_info(manifest: Manifest) -> pb.CheckpointInfo:
    """A manifest as the wire's CheckpointInfo."""
    return pb.CheckpointInfo(
        name=manifest.name,
        kind=_KINDS[manifest.kind],
        base_model=manifest.base_model,
        session_id=manifest.session_id,
        step=manifest.step,
        seq=manifest.seq,
        dtype=manifest.dtype,
        created_at=manifest.created_at,
        files=[pb.CheckpointFile(path=f.path, size=f.size, sha256=f.sha256) for f in manifest.files],
        total_bytes=manifest.total_bytes,
        base_checkpoint=manifest.base_checkpoint,
    )


def server_info(summary: ServerSummary, config: ServerConfig) -> pb.GetServerInfoResponse:
    """The core's server summary and the server's settings as the wire's GetServerInfoResponse."""
    return pb.GetServerInfoResponse(
        version=summary.version,
        models=[
            pb.ModelInfo(
                name=m.name,
                architecture=m.architecture,
                vocab_size=m.vocab_size,
                max_sequence_length=m.max_sequence_length,
                dtype=m.dtype,
                num_parameters=m.num_parameters,
            )
            for m in summary.models
        ],
        devices=summary.devices,
        world_size=summary.world_size,
        distributed_mode=summary.distributed_mode,
        limits=pb.Limits(**dataclasses.asdict(config.limits)),
        capabilities=summary.capabilities,
        loss_functions=summary.loss_functions,
        session_ttl_s=config.session_ttl_s,
        held_graph_timeout_s=config.held_graph_timeout_s,
        max_held_graph_bytes=config.max_held_graph_bytes,
    )


def session_info(session: Session, core: TrainingCore) -> pb.SessionInfo:
    """An open session as the wire's SessionInfo."""
    lora = session.state.lora
    held = sum(1 for h in list(core.held_graphs.values()) if h.session_id == session.id)
    return pb.SessionInfo(
        session_id=session.id,
        base_model=session.base.name,
        lora=None
        if lora is None
        else pb.LoraConfig(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules),
        step=session.state.step,
        next_seq=session.next_free_seq,
        calls_in_flight=session.calls_in_flight,
        held_graphs=held,
        created_at=session.created_at,
        last_active_at=time.time() - (time.monotonic() - session.last_active),
        trainable_parameters=session.state.num_trainable,
        total_parameters=session.state.num_total,
        max_inflight_calls=session.max_inflight,
        session_ttl_s=core.config.session_ttl_s,
        restored=session.restored,
    )


def _raw_datums(datums: list[pb.Datum], max_bytes: int) -> list[RawDatum]:
    """Decode the wire's datums into tensors (validation against the model is the core's)."""
    out = []
    for i, d in enumerate(datums):
        where = f"datum {i}"
        if not d.HasField("model_input"):
            raise invalid_argument(f"{where}: model_input is missing")
        out.append(
            RawDatum(
                wire.tensor_from_wire(d.model_input, f"{where}: model_input", max_bytes=max_bytes),
                {
                    name: wire.tensor_from_wire(t, f"{where}: loss_fn_inputs[{name!r}]", max_bytes=max_bytes)
                    for name, t in d.loss_fn_inputs.items()
                },
            )
        )
    return out


def _lora_config(lora: LoraSpec | None) -> pb.LoraConfig | None:
    return None if lora is None else pb.LoraConfig(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)


def _prompt_logprobs(index: int, result: SampleResult) -> pb.PromptLogprobs:
    msg = pb.PromptLogprobs(prompt_index=index)
    if result.prompt_logprobs is not None:
        msg.logprobs.CopyFrom(wire.tensor_to_wire(result.prompt_logprobs))
    if result.prompt_top_logprobs is not None:
        msg.top_token_ids.CopyFrom(wire.tensor_to_wire(result.prompt_top_logprobs.token_ids))
        msg.top_logprobs.CopyFrom(wire.tensor_to_wire(result.prompt_top_logprobs.logprobs))
    return msg


def _sampled_sequence(prompt_index: int, index: int, sample: Sample) -> pb.SampledSequence:
    msg = pb.SampledSequence(
        index=index,
        prompt_index=prompt_index,
        tokens=wire.tensor_to_wire(torch.tensor(sample.tokens, dtype=torch.int64)),
        logprobs=wire.tensor_to_wire(torch.tensor(sample.logprobs, dtype=torch.float32)),
        finish_reason=sample.finish_reason,
    )
    if sample.top_logprobs is not None:
        msg.top_token_ids.CopyFrom(wire.tensor_to_wire(sample.top_logprobs.token_ids))
        msg.top_logprobs.CopyFrom(wire.tensor_to_wire(sample.top_logprobs.logprobs))
    return msg


def _fingerprint(method: str, request: Message) -> bytes:
    """What tells a retry (same bytes) from another call that reuses a sequence number."""
    return hashlib.sha256(method.encode() + request.SerializeToString(deterministic=True)).digest()


def _logprobs_dtype(value: int) -> torch.dtype:
    try:
        return _LOGPROB_DTYPES[value]
    except KeyError:
        raise invalid_argument(f"logprobs_dtype must be DATA_TYPE_FLOAT32 or DATA_TYPE_BFLOAT16, got {value}") from None


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    """Implements every RPC of ``trainer.v1.TrainerService`` over a :class:`TrainingCore`."""

    def __init__(self, core: TrainingCore) -> None:
        self.core = core
        self._server_info: pb.GetServerInfoResponse | None = None

    def _owner(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The caller's owner id ("" when auth is off)."""
        return owner_of(context, bool(self.core.config.api_keys))

    # ---- stream helpers -------------------------------------------------------------

    @staticmethod
    async def _read(context: grpc.aio.ServicerContext[Any, Any], expecting: str, hasher: Any = None) -> Any:
        msg = await context.read()
        if msg is grpc.aio.EOF:
            raise invalid_argument(f"the request stream ended while waiting for {expecting}")
        if hasher is not None:
            hasher.update(msg.SerializeToString(deterministic=True))
        return msg

    async def _read_request(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> tuple[Any, list[RawDatum], Any, ServiceError | None]:
        """Read the start message and every datum message of a call, hashing what was read.

        Everything the client sends before it waits for a reply is read before anything is
        judged, so a refusal never races the client's writes; the hash is the request's
        fingerprint, which tells a retry from a different call with the same number.

        Returns:
            The start message, the decoded datums, the running sha256 of the request, and
            the problem with the datum stream, if any: the core raises it once the call
            holds its sequence number, so a refused call still uses up its number.

        Raises:
            ServiceError: INVALID_ARGUMENT when there is no start message (and so no number).
        """
        hasher = hashlib.sha256(method.encode())
        msg = await self._read(context, "the start message", hasher)
        if msg.WhichOneof("message") != "start":
            raise invalid_argument(f"the first message must be 'start', got {msg.WhichOneof('message')!r}")
        start = msg.start
        num_datums = start.num_datums
        limits = self.core.config.limits
        datums: list[pb.Datum] = []
        if num_datums == 0:
            problem = invalid_argument("the batch has no datums (start.num_datums is 0); send at least one")
            return start, [], hasher, problem
        if num_datums > limits.max_datums_per_call:
            problem = resource_exhausted(
                f"{num_datums} datums in one call is over the limit max_datums_per_call={limits.max_datums_per_call}"
            )
            return start, [], hasher, problem
        try:
            while len(datums) < num_datums:
                msg = await self._read(context, f"datums ({len(datums)} of {num_datums} received)", hasher)
                if msg.WhichOneof("message") != "datums":
                    raise invalid_argument(
                        f"expected 'datums' ({len(datums)} of {num_datums} received), got {msg.WhichOneof('message')!r}"
                    )
                datums.extend(msg.datums.datums)
            if len(datums) != num_datums:
                raise invalid_argument(f"got {len(datums)} datums, but start.num_datums is {num_datums}")
            tokens = sum(len(d.model_input.shape) and int(d.model_input.shape[0]) for d in datums)
            if tokens > limits.max_tokens_per_call:  # refused before decoding anything
                raise resource_exhausted(
                    f"{tokens} tokens in one call is over the limit max_tokens_per_call={limits.max_tokens_per_call}"
                )
            raw = await asyncio.to_thread(_raw_datums, datums, limits.max_message_bytes)
        except ServiceError as exc:
            return start, [], hasher, exc
        except wire.WireError as exc:
            return start, [], hasher, invalid_argument(str(exc))
        return start, raw, hasher, None

    def _call(self, context: grpc.aio.ServicerContext[Any, Any], header: pb.CallHeader, fingerprint: bytes) -> CallRef:
        return CallRef(self._owner(context), header.session_id, header.seq, fingerprint)

    @staticmethod
    async def _write_all(context: grpc.aio.ServicerContext[Any, Any], responses: list[Any]) -> None:
        for response in responses:
            await context.write(response)

    def _logprobs_messages(self, method: str, result: ForwardResult, dtype: torch.dtype) -> list[Any]:
        """The header message and the encoded chunk messages that stream a result's logprobs back."""
        codec = wire.STREAM_CODECS[method][1]
        flat = result.logprobs.detach().to(device="cpu", dtype=dtype)
        messages: list[Any] = [codec.message_class(logprobs_header=wire.stream_header(flat, result.lengths))]
        messages += codec.chunk_messages(flat, self.core.config.limits.chunk_bytes)
        return messages

    async def _read_gradient(
        self, context: grpc.aio.ServicerContext[Any, Any], lengths: list[int], hasher: Any
    ) -> torch.Tensor:
        msg = await self._read(context, "the gradient header", hasher)
        if msg.WhichOneof("message") != "grad_header":
            raise invalid_argument(f"expected 'grad_header' after the logprobs, got {msg.WhichOneof('message')!r}")
        header = msg.grad_header
        if list(header.lengths) != lengths:
            raise invalid_argument(
                f"gradient has {sum(header.lengths)} values in {len(header.lengths)} datums, but the logprobs have "
                f"{sum(lengths)} in {len(lengths)} (lengths {list(header.lengths)} vs {lengths})"
            )
        assembler = wire.ChunkAssembler(header, "gradient", max_bytes=self.core.config.limits.max_message_bytes * 64)
        while not assembler.done:
            msg = await self._read(
                context, f"gradient bytes ({assembler.received} of {assembler.total_bytes} received)", hasher
            )
            if msg.WhichOneof("message") != "grad_chunk":
                raise invalid_argument(f"expected 'grad_chunk', got {msg.WhichOneof('message')!r}")
            assembler.add(msg.grad_chunk)
        return assembler.tensor()

    # ---- RPCs -----------------------------------------------------------------------

    @translate_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        """Describe the server."""
        info = self._server_info
        if info is None:
            info = server_info(self.core.server_summary(), self.core.config)
            if self.core.ready:  # models and limits never change once loaded: build that part once
                self._server_info = info
        live = pb.GetServerInfoResponse()
        live.CopyFrom(info)
        live.open_sessions = len(self.core.sessions)
        live.held_graphs = len(self.core.held_graphs)
        live.held_graph_bytes = self.core.held_graph_bytes
        return live

    @translate_errors
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        """Start a LoRA or full fine-tune session, or resume one from a STATE checkpoint."""
        owner = self._owner(context)
        if request.resume_from:
            if request.WhichOneof("mode") is not None:
                raise invalid_argument("resume_from takes the mode from the checkpoint; do not set lora or full")
            session = await self.core.resume_session(owner, request.resume_from, base_model=request.base_model)
        else:
            mode = request.WhichOneof("mode")
            self.core.model(request.base_model)  # an unknown model is named before a missing mode
            if mode is None:
                raise invalid_argument("mode is required: set 'lora' (with a rank) or 'full'")
            lora = None
            if mode == "lora":
                msg = request.lora
                lora = LoraSpec(msg.rank, msg.alpha, tuple(msg.target_modules))
            session = await self.core.create_session(owner, SessionSpec(request.base_model, lora, request.seed))
        return pb.CreateSessionResponse(
            session_id=session.id,
            base_model=session.base.name,
            trainable_parameters=session.state.num_trainable,
            total_parameters=session.state.num_total,
            next_seq=session.next_seq,
            max_inflight_calls=session.max_inflight,
            session_ttl_s=self.core.config.session_ttl_s,
            lora=_lora_config(session.state.lora),
        )

    @translate_errors
    async def GetTokenizer(self, request: pb.GetTokenizerRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]  # streams via context.write
        """Stream the model's tokenizer files in chunks."""
        base = self.core.model(request.base_model)
        if not base.tokenizer_files:
            raise not_found(f"model {base.name!r} has no tokenizer files")
        step = self.core.config.limits.chunk_bytes
        for name, data in sorted(base.tokenizer_files.items()):
            for offset in range(0, max(len(data), 1), step):
                await context.write(
                    pb.GetTokenizerResponse(
                        file_name=name, total_bytes=len(data), offset=offset, data=data[offset : offset + step]
                    )
                )

    @translate_errors
    async def Forward(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]  # streams via context.write
        """Logprobs of the targets on the session's current weights; nothing is kept."""
        start, data, hasher, problem = await self._read_request(context, "Forward")
        dtype = _logprobs_dtype(start.logprobs_dtype)
        result = await self.core.forward(self._call(context, start.call, hasher.digest()), data, problem=problem)
        out = self._logprobs_messages("Forward", result, dtype)
        out.append(pb.ForwardResponse(result=pb.ForwardResult(seq=result.seq, num_tokens=result.num_tokens)))
        await self._write_all(context, out)

    @translate_errors
    async def ForwardBackward(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]  # streams via context.write
        """A built-in loss: forward, loss, backward; gradients accumulate."""
        start, data, hasher, problem = await self._read_request(context, "ForwardBackward")
        dtype = _logprobs_dtype(start.logprobs_dtype)
        call = self._call(context, start.call, hasher.digest())
        result = await self.core.forward_backward(
            call, data, start.loss_fn, dict(start.loss_fn_config), problem=problem
        )
        out = self._logprobs_messages("ForwardBackward", result, dtype) if start.return_logprobs else []
        summary = pb.ForwardBackwardResult(
            seq=result.seq, num_tokens=result.num_tokens, loss=result.loss, metrics=result.metrics
        )
        out.append(pb.ForwardBackwardResponse(result=summary))
        await self._write_all(context, out)

    @translate_errors
    async def ForwardBackwardCustom(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]  # streams via context.write
        """Logprobs out, d_loss/d_logprobs in, backward from the graph held in between.

        A stream that breaks before the whole gradient arrived applies nothing: the graph
        is released and the session's gradients are untouched. A retry of a finished call
        gets the stored logprobs, must send the same gradient, and gets the stored result.
        """
        start, data, hasher, problem = await self._read_request(context, "ForwardBackwardCustom")
        dtype = _logprobs_dtype(start.logprobs_dtype)
        call = self._call(context, start.call, hasher.digest())
        async with self.core.forward_backward_custom(call, data, problem=problem) as held:
            await self._write_all(context, self._logprobs_messages("ForwardBackwardCustom", held.result, dtype))
            grad = await held.receive(self._read_gradient(context, held.result.lengths, hasher))
            result = await held.finish(grad, hasher.digest())
        await context.write(
            pb.ForwardBackwardCustomResponse(
                result=pb.ForwardBackwardCustomResult(seq=result.seq, num_tokens=result.num_tokens)
            )
        )

    @translate_errors
    async def OptimStep(
        self, request: pb.OptimStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.OptimStepResponse:
        """AdamW on the accumulated gradients; always reports the gradient norm."""
        adam = {field.name: float(value) for field, value in request.adam_params.ListFields()}
        call = self._call(context, request.call, _fingerprint("OptimStep", request))
        result = await self.core.optim_step(call, adam)
        return pb.OptimStepResponse(seq=result.seq, step=result.step, grad_norm=result.grad_norm)

    @translate_errors
    async def SaveCheckpoint(
        self, request: pb.SaveCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SaveCheckpointResponse:
        """Write a checkpoint after the session's earlier calls (a barrier)."""
        call = self._call(context, request.call, _fingerprint("SaveCheckpoint", request))
        kind = _KIND_NAMES.get(request.kind, "")
        dtype = _EXPORT_DTYPES.get(request.dtype, "?")
        result = await self.core.save_checkpoint(call, request.name, kind, dtype)
        return pb.SaveCheckpointResponse(seq=result.seq, checkpoint=checkpoint_info(result.manifest))

    @translate_errors
    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListCheckpointsResponse:
        """Committed checkpoints, oldest first."""
        manifests = await asyncio.to_thread(self.core.checkpoint_store(self._owner(context)).all)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_info(m) for m in manifests])

    @translate_errors
    async def DeleteCheckpoint(
        self, request: pb.DeleteCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteCheckpointResponse:
        """Remove a checkpoint."""
        await asyncio.to_thread(self.core.checkpoint_store(self._owner(context)).delete, request.name)
        return pb.DeleteCheckpointResponse()

    @translate_errors
    async def DownloadCheckpoint(  # type: ignore[override]  # streams via context.write
        self, request: pb.DownloadCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Stream one file of a checkpoint from ``offset``, in chunks."""
        store = self.core.checkpoint_store(self._owner(context))
        manifest = await asyncio.to_thread(store.manifest, request.name)
        if request.file != MANIFEST:
            manifest.file(request.file)  # NOT_FOUND for a file the manifest does not list
        path = store.path(request.name) / request.file
        if not path.is_file():
            raise ServiceError(ErrorCode.DATA_LOSS, f"checkpoint {echo(request.name)}: {echo(request.file)} is missing")
        size = path.stat().st_size
        if not 0 <= request.offset <= size:
            raise ServiceError(
                ErrorCode.OUT_OF_RANGE, f"offset {request.offset} is outside {echo(request.file)} ({size} bytes)"
            )
        step = self.core.config.limits.chunk_bytes
        with path.open("rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while offset < size:
                data = await asyncio.to_thread(f.read, step)
                if not data:
                    break
                await context.write(pb.DownloadCheckpointResponse(offset=offset, data=data, total_bytes=size))
                offset += len(data)
        if offset == size == request.offset:
            await context.write(pb.DownloadCheckpointResponse(offset=offset, data=b"", total_bytes=size))

    @translate_errors
    async def Sample(  # type: ignore[override]  # streams via context.write
        self, request: pb.SampleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Generate from a session's weights (sequenced), a checkpoint or a base model.

        Concurrent Sample calls on the same weights share decode steps on the server.
        """
        source = request.WhichOneof("source")

        def prepare(base: BaseModel) -> list[SampleRequest]:
            return self._sampling_requests(request, base)

        if source == "call":
            results = await self.core.sample(self._call(context, request.call, b""), prepare)
        elif source == "checkpoint":
            results = await self.core.sample_checkpoint(self._owner(context), request.checkpoint, prepare)
        elif source == "base_model":
            results = await self.core.sample_base(request.base_model, prepare)
        else:
            raise invalid_argument("set one source: call (a session), checkpoint or base_model")
        single = not request.prompts and not request.prompt_top_logprobs
        for p, result in enumerate(results):
            if result.prompt_logprobs is not None and single:
                await context.write(pb.SampleResponse(prompt_logprobs=wire.tensor_to_wire(result.prompt_logprobs)))
            elif result.prompt_logprobs is not None or result.prompt_top_logprobs is not None:
                await context.write(pb.SampleResponse(prompt=_prompt_logprobs(p, result)))
            for i, sample in enumerate(result.samples):
                await context.write(pb.SampleResponse(sequence=_sampled_sequence(p, i, sample)))

    def _sampling_requests(self, request: pb.SampleRequest, base: BaseModel) -> list[SampleRequest]:
        """Decode and validate a Sample request's prompts and parameters."""
        if request.prompts and request.HasField("prompt"):
            raise invalid_argument("set either prompt (with num_samples) or prompts, not both")
        if request.prompts:
            prompts = [(f"prompts[{i}]", p.tokens, p.num_samples) for i, p in enumerate(request.prompts)]
        elif request.HasField("prompt"):
            prompts = [("prompt", request.prompt, request.num_samples)]
        else:
            raise invalid_argument("prompt is required")
        params = request.params
        room = base.max_sequence_length
        out = []
        for where, tensor, num_samples in prompts:
            if list(tensor.shape) == [0]:
                raise invalid_argument(f"{where} is empty; send at least one token")
            try:
                raw = wire.tensor_from_wire(tensor, where, max_bytes=self.core.config.limits.max_message_bytes)
            except wire.WireError as exc:
                raise invalid_argument(str(exc)) from None
            tokens = self.core.validate_prompt(raw, base)
            if params.max_tokens > room - len(tokens):
                raise invalid_argument(
                    f"params.max_tokens {params.max_tokens} is over the limit: a {len(tokens)}-token {where} leaves "
                    f"{room - len(tokens)} of the model's maximum length {room}"
                )
            try:
                settings = SamplingSettings(
                    num_samples=num_samples,
                    max_tokens=params.max_tokens,
                    temperature=params.temperature if params.HasField("temperature") else 1.0,
                    top_p=params.top_p if params.HasField("top_p") else 1.0,
                    top_k=params.top_k,
                    stop=tuple(tuple(int(t) for t in s.tokens) for s in params.stop),
                    seed=params.seed if params.HasField("seed") else None,
                    stop_strings=tuple(params.stop_strings),
                    top_logprobs=params.top_logprobs,
                )
                out.append(
                    SampleRequest(
                        tokens,
                        settings,
                        prompt_logprobs=request.return_prompt_logprobs,
                        prompt_top_logprobs=request.prompt_top_logprobs,
                    )
                )
            except ServiceError as exc:  # name the request's field
                raise ServiceError(exc.code, f"params.{exc.message}" if where == "prompt" else exc.message) from None
        return out

    @translate_errors
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatResponse:
        """Renew the leases of the caller's sessions."""
        alive, missing = self.core.heartbeat(self._owner(context), list(request.session_ids))
        return pb.HeartbeatResponse(open_session_ids=alive, missing_session_ids=missing)

    @translate_errors
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSessionsResponse:
        """The caller's open sessions."""
        return pb.ListSessionsResponse(
            sessions=[session_info(s, self.core) for s in self.core.list_sessions(self._owner(context))]
        )

    @translate_errors
    async def AttachSession(
        self, request: pb.AttachSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AttachSessionResponse:
        """Hand a live session to a new client."""
        session = self.core.attach(self._owner(context), request.session_id)
        return pb.AttachSessionResponse(session=session_info(session, self.core))

    @translate_errors
    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EndSessionResponse:
        """Close a session by id now."""
        await self.core.end_session(self._owner(context), request.session_id)
        return pb.EndSessionResponse()

    @translate_errors
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseSessionResponse:
        """Close the session after its earlier calls; its memory is freed."""
        await self.core.close_session(self._call(context, request.call, b""))
        return pb.CloseSessionResponse()
