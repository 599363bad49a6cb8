"""The ``trainer.v1.TrainerService`` servicer: protocol handling, no model math.

Each handler reads its request stream, validates it, waits for the call's turn in the
session's sequence, hands the model work to the :class:`~trainer_server._runtime.Runtime`
(which runs it on the device thread), and streams results back. Engine errors are turned
into gRPC statuses in one place, :func:`translate_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from trainer_proto import pb, pb_grpc, wire
from trainer_server._auth import owner_of
from trainer_server._batch import Batch, parse_datums
from trainer_server._checkpoints import MANIFEST, Manifest
from trainer_server._engine import AdamSettings
from trainer_server._errors import ServiceError, cap_message, echo, invalid_argument, resource_exhausted
from trainer_server._losses import LOSSES
from trainer_server._losses import validate as validate_loss
from trainer_server._models import BaseModel
from trainer_server._runtime import Runtime
from trainer_server._sampling import SamplingSettings, generate
from trainer_server._sessions import SequencedCall, Session

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
            code, message = exc.code, exc.message
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


def _fingerprint(method: str, request: Message) -> bytes:
    """What tells a retry (same bytes) from another call that reuses a sequence number."""
    return hashlib.sha256(method.encode() + request.SerializeToString(deterministic=True)).digest()


def _logprobs_dtype(value: int) -> torch.dtype:
    try:
        return _LOGPROB_DTYPES[value]
    except KeyError:
        raise invalid_argument(f"logprobs_dtype must be DATA_TYPE_FLOAT32 or DATA_TYPE_BFLOAT16, got {value}") from None


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    """Implements every RPC of ``trainer.v1.TrainerService`` over a :class:`Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def held_graphs(self) -> dict[int, Any]:
        """Forward graphs kept alive for a gradient still to come, by handle (rank 0's view)."""
        return self.runtime.engine.held

    def _owner(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The caller's owner id ("" when auth is off)."""
        return owner_of(context, bool(self.runtime.config.api_keys))

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
    ) -> tuple[Any, list[pb.Datum], Any, ServiceError | None]:
        """Read the start message and every datum message of a call, hashing what was read.

        Everything the client sends before it waits for a reply is read before anything is
        judged, so a refusal never races the client's writes; the hash is the request's
        fingerprint, which tells a retry from a different call with the same number.

        Returns:
            The start message, the datums, the running sha256 of the request, and the
            problem with the datum stream, if any: the caller raises it once it holds the
            call's sequence number, so a refused call still uses up its number.

        Raises:
            ServiceError: INVALID_ARGUMENT when there is no start message (and so no number).
        """
        hasher = hashlib.sha256(method.encode())
        msg = await self._read(context, "the start message", hasher)
        if msg.WhichOneof("message") != "start":
            raise invalid_argument(f"the first message must be 'start', got {msg.WhichOneof('message')!r}")
        start = msg.start
        num_datums = start.num_datums
        limits = self.runtime.config.limits
        datums: list[pb.Datum] = []
        if num_datums == 0:
            problem = invalid_argument("the batch has no datums (start.num_datums is 0); send at least one")
            return start, datums, hasher, problem
        if num_datums > limits.max_datums_per_call:
            problem = resource_exhausted(
                f"{num_datums} datums in one call is over the limit max_datums_per_call={limits.max_datums_per_call}"
            )
            return start, datums, hasher, problem
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
        except ServiceError as exc:
            return start, datums, hasher, exc
        return start, datums, hasher, None

    async def _parse(self, datums: list[pb.Datum], session: Session) -> Batch:
        """Validate datums off the event loop (the work is proportional to the tokens)."""
        return await asyncio.to_thread(parse_datums, datums, session.base, self.runtime.config.limits)

    @staticmethod
    async def _write_all(context: grpc.aio.ServicerContext[Any, Any], responses: list[Any]) -> None:
        for response in responses:
            await context.write(response)

    def _logprobs_messages(
        self, method: str, logprobs: torch.Tensor, lengths: list[int], dtype: torch.dtype
    ) -> list[Any]:
        """The header message and the encoded chunk messages that stream ``logprobs`` back."""
        codec = wire.STREAM_CODECS[method][1]
        flat = logprobs.detach().to(device="cpu", dtype=dtype)
        messages: list[Any] = [codec.message_class(logprobs_header=wire.stream_header(flat, lengths))]
        messages += codec.chunk_messages(flat, self.runtime.config.limits.chunk_bytes)
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
        assembler = wire.ChunkAssembler(header, "gradient", max_bytes=self.runtime.config.limits.max_message_bytes * 64)
        while not assembler.done:
            msg = await self._read(
                context, f"gradient bytes ({assembler.received} of {assembler.total_bytes} received)", hasher
            )
            if msg.WhichOneof("message") != "grad_chunk":
                raise invalid_argument(f"expected 'grad_chunk', got {msg.WhichOneof('message')!r}")
            assembler.add(msg.grad_chunk)
        grad = assembler.tensor()
        finite = torch.isfinite(grad)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0, 0])
            datum, offset = 0, index
            while offset >= lengths[datum]:
                offset -= lengths[datum]
                datum += 1
            raise invalid_argument(
                f"gradient contains {float(grad[index])} at datum {datum}, position {offset}; nothing was applied"
            )
        return grad

    # ---- RPCs -----------------------------------------------------------------------

    @translate_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        """Describe the server."""
        return self.runtime.server_info()

    @translate_errors
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        """Start a LoRA or full fine-tune session."""
        session = await self.runtime.create_session(request, self._owner(context))
        return pb.CreateSessionResponse(
            session_id=session.id,
            base_model=session.base.name,
            trainable_parameters=session.state.num_trainable,
            total_parameters=session.state.num_total,
            next_seq=session.next_seq,
            max_inflight_calls=session.max_inflight,
        )

    @translate_errors
    async def GetTokenizer(self, request: pb.GetTokenizerRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]  # streams via context.write
        """Stream the model's tokenizer files in chunks."""
        base = self.runtime.model(request.base_model)
        if not base.tokenizer_files:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"model {base.name!r} has no tokenizer files")
        step = self.runtime.config.limits.chunk_bytes
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
        start, datums, hasher, problem = await self._read_request(context, "Forward")
        session = self.runtime.session(start.call.session_id, self._owner(context))
        async with session.call(start.call.seq, hasher.digest()) as call:
            if problem is not None:
                raise problem
            if call.replay is None:
                dtype = _logprobs_dtype(start.logprobs_dtype)
                batch = await self._parse(datums, session)
                await call.wait_turn(self.runtime.config.sequence_gap_timeout_s, queued=True)

                async def apply() -> list[Any]:
                    logprobs = await self.runtime.forward(session, batch)
                    out = self._logprobs_messages("Forward", logprobs, batch.lengths, dtype)
                    out.append(pb.ForwardResponse(result=pb.ForwardResult(seq=call.seq, num_tokens=batch.num_tokens)))
                    session.record(call.seq, hasher.digest(), out)
                    return out

                responses = await call.commit(apply())
        await self._write_all(context, responses if call.replay is None else call.replay.responses)

    @translate_errors
    async def ForwardBackward(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]  # streams via context.write
        """A built-in loss: forward, loss, backward; gradients accumulate."""
        start, datums, hasher, problem = await self._read_request(context, "ForwardBackward")
        session = self.runtime.session(start.call.session_id, self._owner(context))
        async with session.call(start.call.seq, hasher.digest()) as call:
            if problem is not None:
                raise problem
            if call.replay is None:
                dtype = _logprobs_dtype(start.logprobs_dtype)
                loss_fn = LOSSES.get(start.loss_fn)
                if loss_fn is None:
                    raise invalid_argument(f"unknown loss_fn {echo(start.loss_fn)}; built-in losses: {sorted(LOSSES)}")
                batch = await self._parse(datums, session)
                config = dict(start.loss_fn_config)
                validate_loss(start.loss_fn, batch, config)  # refused before its turn, with no model work
                await call.wait_turn(self.runtime.config.sequence_gap_timeout_s, queued=True)

                async def apply() -> list[Any]:
                    logprobs, loss, metrics = await self.runtime.forward_backward(session, batch, loss_fn, config)
                    out = []
                    if start.return_logprobs:
                        out = self._logprobs_messages("ForwardBackward", logprobs, batch.lengths, dtype)
                    result = pb.ForwardBackwardResult(
                        seq=call.seq, num_tokens=batch.num_tokens, loss=loss, metrics=metrics
                    )
                    out.append(pb.ForwardBackwardResponse(result=result))
                    session.record(call.seq, hasher.digest(), out)
                    return out

                responses = await call.commit(apply())
        await self._write_all(context, responses if call.replay is None else call.replay.responses)

    @translate_errors
    async def ForwardBackwardCustom(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]  # streams via context.write
        """Logprobs out, d_loss/d_logprobs in, backward from the graph held in between.

        A stream that breaks before the whole gradient arrived applies nothing: the graph
        is released and the session's gradients are untouched. A retry of a finished call
        gets the stored logprobs, must send the same gradient, and gets the stored result.
        """
        start, datums, hasher, problem = await self._read_request(context, "ForwardBackwardCustom")
        session = self.runtime.session(start.call.session_id, self._owner(context))
        async with session.call(start.call.seq, hasher.digest()) as call:
            if problem is not None:
                raise problem
            if call.replay is not None:
                *logprob_messages, result_message = call.replay.responses
                await self._write_all(context, logprob_messages)
                lengths = list(logprob_messages[0].logprobs_header.lengths)
                await self._read_gradient(context, lengths, hasher)
                if hasher.digest() != call.replay.final_fingerprint:
                    raise ServiceError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"session {session.id}: call {call.seq} was already applied with a different gradient",
                    )
                await context.write(result_message)
                return
            dtype = _logprobs_dtype(start.logprobs_dtype)
            batch = await self._parse(datums, session)
            request_fingerprint = hasher.digest()
            gap_timeout_s = self.runtime.config.sequence_gap_timeout_s
            # The forward may run while the previous call waits for its client's loss (overlap).
            await call.wait_turn(gap_timeout_s, ahead=True)
            handle, logprobs = await self.runtime.forward_held(session, batch)
            try:
                await call.forward_done()
                responses = self._logprobs_messages("ForwardBackwardCustom", logprobs, batch.lengths, dtype)
                await self._write_all(context, responses)
                grad = await self._read_gradient(context, batch.lengths, hasher)
                await call.wait_turn(gap_timeout_s, queued=True)  # gradients accumulate in sequence order
            except BaseException:
                self.runtime.release(handle)  # drop the graph on every rank; nothing is applied
                raise

            async def apply() -> Any:
                await self.runtime.backward(session, handle, grad)
                out = pb.ForwardBackwardCustomResponse(
                    result=pb.ForwardBackwardCustomResult(seq=call.seq, num_tokens=batch.num_tokens)
                )
                session.record(call.seq, request_fingerprint, [*responses, out], final_fingerprint=hasher.digest())
                return out

            result = await call.commit(apply())
        await context.write(result)

    @translate_errors
    async def OptimStep(
        self, request: pb.OptimStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.OptimStepResponse:
        """AdamW on the accumulated gradients; always reports the gradient norm."""

        async def run(session: Session, call: SequencedCall) -> pb.OptimStepResponse:
            settings = AdamSettings(request.adam_params)
            await call.wait_turn(self.runtime.config.sequence_gap_timeout_s, queued=True)

            async def apply() -> pb.OptimStepResponse:
                step, norm = await self.runtime.optim_step(session, settings)
                return pb.OptimStepResponse(seq=call.seq, step=step, grad_norm=norm)

            return await call.commit(apply(), record=True)

        return await self._sequenced_unary("OptimStep", request, context, run)

    async def _sequenced_unary(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        run: Callable[[Session, SequencedCall], Awaitable[_Response]],
    ) -> _Response:
        """Run a unary session call in sequence order; answer a retry with its stored response."""
        session = self.runtime.session(request.call.session_id, self._owner(context))
        fingerprint = _fingerprint(method, request)
        async with session.call(request.call.seq, fingerprint) as call:
            if call.replay is not None:
                stored: _Response = call.replay.responses[0]
                return stored
            response = await run(session, call)
        return response

    @translate_errors
    async def SaveCheckpoint(
        self, request: pb.SaveCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SaveCheckpointResponse:
        """Write a checkpoint after the session's earlier calls (a barrier)."""

        async def run(session: Session, call: SequencedCall) -> pb.SaveCheckpointResponse:
            return await self.runtime.save_checkpoint(
                session,
                call,
                request,
                lambda manifest: pb.SaveCheckpointResponse(seq=call.seq, checkpoint=checkpoint_info(manifest)),
            )

        return await self._sequenced_unary("SaveCheckpoint", request, context, run)

    @translate_errors
    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListCheckpointsResponse:
        """Committed checkpoints, oldest first."""
        manifests = await asyncio.to_thread(self.runtime.checkpoint_store(self._owner(context)).all)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_info(m) for m in manifests])

    @translate_errors
    async def DeleteCheckpoint(
        self, request: pb.DeleteCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteCheckpointResponse:
        """Remove a checkpoint."""
        await asyncio.to_thread(self.runtime.checkpoint_store(self._owner(context)).delete, request.name)
        return pb.DeleteCheckpointResponse()

    @translate_errors
    async def DownloadCheckpoint(  # type: ignore[override]  # streams via context.write
        self, request: pb.DownloadCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Stream one file of a checkpoint from ``offset``, in chunks."""
        store = self.runtime.checkpoint_store(self._owner(context))
        manifest = await asyncio.to_thread(store.manifest, request.name)
        if request.file != MANIFEST:
            manifest.file(request.file)  # NOT_FOUND for a file the manifest does not list
        path = store.path(request.name) / request.file
        if not path.is_file():
            raise ServiceError(
                grpc.StatusCode.DATA_LOSS, f"checkpoint {echo(request.name)}: {echo(request.file)} is missing"
            )
        size = path.stat().st_size
        if not 0 <= request.offset <= size:
            raise ServiceError(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is outside {echo(request.file)} ({size} bytes)"
            )
        step = self.runtime.config.limits.chunk_bytes
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
        """Generate from a session's current weights (sequenced) or from a checkpoint."""
        source = request.WhichOneof("source")
        if source == "call":
            session = self.runtime.session(request.call.session_id, self._owner(context))
            async with session.call(request.call.seq) as call:
                prompt, settings = self._sampling_request(request, session.base)
                await call.wait_turn(self.runtime.config.sequence_gap_timeout_s)
                samples, prompt_lp = await self.runtime.sample(session, prompt, settings)
        elif source == "checkpoint":
            owner = self._owner(context)
            manifest = self.runtime.checkpoint_store(owner).manifest(request.checkpoint)
            # Bad parameters are refused before the checkpoint is verified and loaded.
            prompt, settings = self._sampling_request(request, self.runtime.model(manifest.base_model))
            model, base = await self.runtime.checkpoint_model(request.checkpoint, owner)
            samples, prompt_lp = await self.runtime.on_device(
                generate, model, prompt, settings, base.eos_token_ids, self.runtime.device
            )
        else:
            raise invalid_argument("set either call (sample from a session) or checkpoint")
        if request.return_prompt_logprobs:
            await context.write(pb.SampleResponse(prompt_logprobs=wire.tensor_to_wire(prompt_lp)))
        for i, s in enumerate(samples):
            sequence = pb.SampledSequence(
                index=i,
                tokens=wire.tensor_to_wire(torch.tensor(s.tokens, dtype=torch.int64)),
                logprobs=wire.tensor_to_wire(torch.tensor(s.logprobs, dtype=torch.float32)),
                finish_reason=s.finish_reason,
            )
            await context.write(pb.SampleResponse(sequence=sequence))

    def _sampling_request(self, request: pb.SampleRequest, base: BaseModel) -> tuple[torch.Tensor, SamplingSettings]:
        """Decode and validate a Sample request's prompt and parameters."""
        if not request.HasField("prompt"):
            raise invalid_argument("prompt is required")
        if list(request.prompt.shape) == [0]:
            raise invalid_argument("prompt is empty; send at least one token")
        try:
            batch = parse_datums(
                [pb.Datum(model_input=request.prompt, loss_fn_inputs={"target_tokens": request.prompt})],
                base,
                self.runtime.config.limits,
            )
        except ServiceError as exc:  # name the request's field, not the datum it was wrapped in
            message = exc.message.replace("datum 0: loss_fn_inputs['target_tokens']", "prompt")
            raise ServiceError(exc.code, message.replace("datum 0: model_input", "prompt")) from None
        prompt = batch.tokens[0]
        settings = SamplingSettings.from_proto(
            request.params,
            num_samples=request.num_samples,
            prompt_len=len(prompt),
            max_length=base.max_sequence_length,
            max_samples=self.runtime.config.limits.max_samples_per_call,
        )
        return prompt, settings

    @translate_errors
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseSessionResponse:
        """Close the session after its earlier calls; its memory is freed."""
        session = self.runtime.session(request.call.session_id, self._owner(context))
        async with session.call(request.call.seq) as call:
            await call.wait_turn(self.runtime.config.sequence_gap_timeout_s)
            await call.commit(self.runtime.close_session(session))
        return pb.CloseSessionResponse()
