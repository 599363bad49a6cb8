"""The Tinker-protocol HTTP front end: every route the tinker 0.38 SDK calls, as an ASGI app.

A Tinker user points an unmodified loop at this server by changing ``base_url`` and the
API key. The app speaks Tinker's protocol (``/api/v1/...``, ``X-API-Key``, JSON and
protobuf bodies, request ids polled through ``retrieve_future``) and does all domain work
through one :class:`~trainer_server.frontends.tinker.backend.TinkerBackend`, the same core the gRPC
API uses. Route table, encodings and known differences: docs/TINKER.md.

Invariants:
- Every response to an ``/api/v1`` route is JSON (or Tinker protobuf); every error has a
  ``{"detail": ...}`` body with the status the SDK maps to its exception class.
- Every route but ``healthz`` and signed downloads needs a valid key when keys are
  configured; ids of another key's sessions, models, requests and checkpoints are unknown.
- A refused request changes nothing; a training call whose ``seq_id`` was read is either
  run in ``seq_id`` order or consumed as refused (see ``ordering``).
- Work runs after the submission answered; its failure is delivered by ``retrieve_future``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from trainer_server.frontends.grpc_auth import owner_id
from trainer_server.frontends.tinker import backend, encoding, schema
from trainer_server.frontends.tinker.downloads import UrlSigner
from trainer_server.frontends.tinker.errors import (
    BadRequest,
    Conflict,
    HTTPError,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    Unauthenticated,
    error_category,
    from_backend,
)
from trainer_server.frontends.tinker.futures import FutureStore, Pending, Reply
from trainer_server.frontends.tinker.ordering import SeqOrder
from trainer_server.frontends.tinker.paths import TinkerPath, model_id, new_session_id, parse_model_id, sampler_id
from trainer_server.frontends.tinker.sessions import Registry, Sampler, Session, TrainingModel

__all__ = ["TinkerConfig", "TinkerFrontEnd"]

log = logging.getLogger(__name__)

BUILTIN_LOSSES = frozenset({"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"})
PROTOBUF = "application/x-protobuf"
API = "/api/v1"


@dataclass(frozen=True)
class TinkerConfig:
    """Settings of the Tinker front end.

    Attributes:
        api_keys: Accepted keys (the server's keys); empty: auth off, every caller is owner "".
        max_body_bytes: Largest request body, also after decompression.
        poll_wait_s: How long ``retrieve_future`` holds a poll for a result (long poll).
        gap_timeout_s: How long a training call waits for a missing earlier ``seq_id``.
        compress_forward_backward: Ask the SDK to zstd-compress forward_backward bodies.
        max_chunk_datums: Datums per forward_backward request the SDK may send.
    """

    api_keys: frozenset[str] = frozenset()
    max_body_bytes: int = 64 * 1024 * 1024
    poll_wait_s: float = 5.0
    gap_timeout_s: float = 120.0
    compress_forward_backward: bool = False
    max_chunk_datums: int = 1024


class TinkerFrontEnd:
    """The Tinker API over a backend: build it, then serve :attr:`app` with an ASGI server."""

    def __init__(self, backend_: backend.TinkerBackend, config: TinkerConfig | None = None) -> None:
        self.backend = backend_
        self.config = config or TinkerConfig()
        self.registry = Registry()
        self.futures = FutureStore(poll_wait_s=self.config.poll_wait_s)
        self.signer = UrlSigner()
        self._keys = sorted(k.encode() for k in self.config.api_keys)
        self.app = Starlette(routes=self._routes(), exception_handlers={404: _not_found, 405: _not_allowed})

    async def close(self) -> None:
        """Cancel pending work and close every live model (server shutdown)."""
        await self.futures.close()
        for session in list(self.registry.sessions.values()):
            for model in self.registry.finish(session, "interrupted"):
                await self.backend.close_model(model.handle)

    # ----------------------------------------------------------------- plumbing

    def _routes(self) -> list[Route]:
        r: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
            ("/healthz", self.healthz, ["GET"]),
            ("/client/config", self.client_config, ["POST"]),
            ("/client/dynamic_config", self.client_dynamic_config, ["POST"]),
            ("/get_server_capabilities", self.get_server_capabilities, ["GET"]),
            ("/create_session", self.create_session, ["POST"]),
            ("/session_heartbeat", self.session_heartbeat, ["POST"]),
            ("/sessions", self.list_sessions, ["GET"]),
            ("/sessions/{session_id}", self.get_session, ["GET"]),
            ("/sessions/{session_id}/finish", self.finish_session, ["POST"]),
            ("/telemetry", self.telemetry, ["POST"]),
            ("/create_model", self.create_model, ["POST"]),
            ("/get_info", self.get_info, ["POST"]),
            ("/forward_backward", self.forward_backward, ["POST"]),
            ("/optim_step", self.optim_step, ["POST"]),
            ("/save_weights", self.save_weights, ["POST"]),
            ("/save_weights_for_sampler", self.save_weights_for_sampler, ["POST"]),
            ("/save_weights_external", self.save_weights_external, ["POST"]),
            ("/load_weights", self.load_weights, ["POST"]),
            ("/create_sampling_session", self.create_sampling_session, ["POST"]),
            ("/samplers/{sampler_id:path}", self.get_sampler, ["GET"]),
            ("/asample", self.asample, ["POST"]),
            ("/retrieve_future", self.retrieve_future, ["POST"]),
            ("/cancel_future", self.cancel_future, ["POST"]),
            ("/weights_info", self.weights_info, ["POST"]),
            ("/training_runs", self.list_training_runs, ["GET"]),
            ("/training_runs/{run_id}", self.get_training_run, ["GET"]),
            ("/training_runs/{run_id}/checkpoints", self.list_run_checkpoints, ["GET"]),
            ("/checkpoints", self.list_all_checkpoints, ["GET"]),
            (
                "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls",
                self.external_weights_urls,
                ["GET"],
            ),
            ("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", self.hosted_only, ["POST", "DELETE"]),
            ("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl", self.hosted_only, ["PUT"]),
            ("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", self.delete_checkpoint, ["DELETE"]),
            ("/downloads/{owner}/{name}/{relpath:path}", self.download, ["GET"]),
        ]
        hosted = [
            ("/auth/token", ["POST"]),
            ("/auth/apikey/me", ["GET", "DELETE"]),
            ("/billing/{rest:path}", ["GET", "POST"]),
            ("/audit", ["GET"]),
            ("/copy_weights", ["POST"]),
            ("/create_custom_loss", ["POST"]),
            ("/join_sampling_session", ["POST"]),
            ("/retrieve_futures", ["POST"]),
            ("/sessions/search", ["POST"]),
            ("/sessions/{session_id}/project", ["PUT"]),
            ("/sessions/{session_id}/trace_export", ["GET"]),
        ]
        # Hosted-only routes first: "/sessions/search" must not reach "/sessions/{id}".
        routes = [Route(API + path, self._guard(self.hosted_only), methods=m) for path, m in hosted]
        routes += [Route(API + path, self._guard(handler), methods=m) for path, handler, m in r]
        return routes

    def _guard(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPError as exc:
                return exc.response()
            except backend.BackendError as exc:
                return from_backend(exc).response()
            except Exception:
                log.exception("tinker front end: %s %s failed", request.method, request.url.path)
                return HTTPError("internal server error; see the server log").response()

        return guarded

    def owner(self, request: Request) -> str:
        """The caller's owner id.

        Raises:
            Unauthenticated: Keys are configured and none matches ``X-API-Key``.
        """
        if not self._keys:
            return ""
        key = request.headers.get("x-api-key")
        if key is None:
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        presented = (key or "").encode()
        ok = False
        for k in self._keys:  # compare against every key: the time does not say which matched
            ok |= hmac.compare_digest(presented, k)
        if not ok or not key:
            raise Unauthenticated("missing or invalid API key (send it in the X-API-Key header)")
        return owner_id(key)

    async def body(self, request: Request) -> bytes:
        """The request body, decompressed, refused over ``max_body_bytes``.

        Raises:
            PayloadTooLarge: Over the limit (checked while reading).
            BadRequest: A bad Content-Encoding.
        """
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the server's limit of {limit} bytes")
        parts: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the server's limit of {limit} bytes")
            parts.append(chunk)
        return encoding.decompress(b"".join(parts), request.headers.get("content-encoding"), limit)

    async def json_body(self, request: Request, model: type[schema.Body]) -> tuple[str, schema.Body, bytes]:
        """Owner, parsed JSON body and raw body of a request."""
        owner = self.owner(request)
        raw = await self.body(request)
        return owner, schema.parse(model, raw, request.url.path.removeprefix(API + "/")), raw

    def _state(self, model: TrainingModel | None, seq_id: int | None) -> Callable[[], Pending]:
        def state() -> Pending:
            if not self.backend.ready():
                return Pending("paused_capacity", "the server is loading its models")
            if model is not None and seq_id is not None:
                waiting = model.order.waiting_for(seq_id)
                if waiting is not None:
                    return Pending("active", f"queued behind seq_id {waiting} of {model.model_id}")
            return Pending("active", "running")

        return state

    def _submit_ordered(
        self,
        owner: str,
        model_id_: str,
        seq_id: int | None,
        raw: bytes,
        *,
        prepare: Callable[[TrainingModel], Callable[[], Coroutine[Any, Any, Reply]]],
        kind: str,
    ) -> Response:
        """Submit one training call: order it by ``seq_id``, answer its request id.

        ``prepare`` validates the call (raising :class:`HTTPError` refuses it and consumes
        its ``seq_id``) and returns the work to run in turn.
        """
        model = self.registry.model(owner, model_id_)
        seq = model.order.assign(seq_id)
        fingerprint = hashlib.sha256(raw).hexdigest()
        earlier = model.order.claimed(seq, fingerprint)
        if earlier is not None:
            return JSONResponse({"request_id": earlier, "model_id": model_id_})
        try:
            work = prepare(model)
        except (HTTPError, backend.BackendError):
            model.order.skip(seq)
            raise
        model.last_request_s = _now()
        request_id = self.futures.submit(
            owner, _failing_as_reply(model.order.run_in_turn(seq, work)), self._state(model, seq), prefix=kind
        )
        model.order.claim(seq, fingerprint, request_id)
        return JSONResponse({"request_id": request_id, "model_id": model_id_})

    def _skip_unparsed(self, owner: str, raw: bytes) -> None:
        """Consume the seq_id of a JSON training call whose body failed validation."""
        try:
            data = schema.loads_object(raw)
            model = self.registry.model(owner, str(data.get("model_id")))
            seq = data.get("seq_id")
            if isinstance(seq, int) and seq >= 1:
                model.order.skip(seq)
        except (HTTPError, ValueError):
            pass

    async def _ordered_json(
        self,
        request: Request,
        model_type: type[schema.Body],
        prepare: Callable[[TrainingModel, schema.Body], Callable[[], Coroutine[Any, Any, Reply]]],
        kind: str,
    ) -> Response:
        owner = self.owner(request)
        raw = await self.body(request)
        try:
            body = schema.parse(model_type, raw, request.url.path.removeprefix(API + "/"))
        except BadRequest:
            self._skip_unparsed(owner, raw)
            raise
        model_id_ = getattr(body, "model_id")  # noqa: B009 - every ordered body has one
        seq_id = getattr(body, "seq_id")  # noqa: B009
        return self._submit_ordered(owner, model_id_, seq_id, raw, prepare=lambda m: prepare(m, body), kind=kind)

    # ----------------------------------------------------------------- service

    async def healthz(self, request: Request) -> Response:
        """``GET healthz``: ok once models are loaded (no key needed)."""
        if not self.backend.ready():
            return JSONResponse({"detail": "loading models"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def client_config(self, request: Request) -> Response:
        """``POST client/config``: feature flags that keep the SDK on what this server serves."""
        self.owner(request)
        return JSONResponse(
            {
                "pjwt_auth_enabled": False,
                "credential_default_source": "api_key",
                "use_pyqwest_transport": False,
                "parallel_fwdbwd_chunks": True,
                "proto_compress_fwdbwd": self.config.compress_forward_backward,
                "fwdbwd_max_chunk_len": self.config.max_chunk_datums,
                "fwdbwd_max_chunk_bytes_count": max(1, self.config.max_body_bytes // 2),
                "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False,
                "sample_join_sampling_session": False,
            }
        )

    async def client_dynamic_config(self, request: Request) -> Response:
        """``POST client/dynamic_config``: sampling cancellation on."""
        self.owner(request)
        return JSONResponse({"refresh_interval_sec": 300, "sample_cancel_enabled": True})

    async def get_server_capabilities(self, request: Request) -> Response:
        """``GET get_server_capabilities``: the base models served."""
        self.owner(request)
        models = [
            {"model_name": m.name, "max_context_length": m.max_context_length, "trainable": True, "sampleable": True}
            for m in self.backend.base_models()
        ]
        return JSONResponse({"supported_models": models})

    async def telemetry(self, request: Request) -> Response:
        """``POST telemetry``: accepted and dropped (this server keeps its own logs)."""
        self.owner(request)
        await self.body(request)
        return JSONResponse({"status": "accepted"})

    async def hosted_only(self, request: Request) -> Response:
        """Hosted Tinker features (billing, projects, publishing, TTLs, JWTs ...): refused clearly."""
        self.owner(request)
        raise NotSupported(
            f"{request.method} {request.url.path} is a hosted Tinker service feature and is not supported by this "
            "server (see docs/TINKER.md)"
        )

    # ----------------------------------------------------------------- sessions

    async def create_session(self, request: Request) -> Response:
        """``POST create_session``."""
        owner, body, _ = await self.json_body(request, schema.CreateSessionBody)
        session = Session(new_session_id(), owner, {k: str(v) for k, v in (body.user_metadata or {}).items()})
        self.registry.sessions[session.session_id] = session
        log.info("tinker session %s created (sdk %s)", session.session_id, body.sdk_version)
        return JSONResponse({"type": "create_session", "session_id": session.session_id})

    async def session_heartbeat(self, request: Request) -> Response:
        """``POST session_heartbeat``: renews the leases of the session's models."""
        owner, body, _ = await self.json_body(request, schema.SessionHeartbeatBody)
        session = self.registry.session(owner, body.session_id)
        session.last_heartbeat_s = asyncio.get_running_loop().time()
        for mid in session.model_ids:
            model = self.registry.models.get(mid)
            if model is not None:
                self.backend.keep_alive(model.handle)
        return JSONResponse({"type": "session_heartbeat"})

    async def finish_session(self, request: Request) -> Response:
        """``POST sessions/{id}/finish``: closes its models; the first reason wins."""
        owner, body, _ = await self.json_body(request, schema.FinishSessionBody)
        session = self.registry.session(owner, request.path_params["session_id"], live=False)
        reason = str((body.reason or {}).get("type", "success"))
        for model in self.registry.finish(session, reason):
            await self.backend.close_model(model.handle)
        return JSONResponse({})

    async def get_session(self, request: Request) -> Response:
        """``GET sessions/{id}``."""
        session = self.registry.session(self.owner(request), request.path_params["session_id"], live=False)
        return JSONResponse(
            {
                "training_run_ids": list(session.model_ids),
                "sampler_ids": list(session.sampler_ids),
                "user_metadata": session.user_metadata or None,
            }
        )

    async def list_sessions(self, request: Request) -> Response:
        """``GET sessions``: the caller's session ids, newest first."""
        owner = self.owner(request)
        limit, offset = _page(request)
        ids = [s.session_id for s in sorted(self.registry.sessions.values(), key=lambda s: -s.created_s)]
        ids = [sid for sid in ids if self.registry.sessions[sid].owner == owner]
        return JSONResponse({"sessions": ids[offset : offset + limit]})

    # ----------------------------------------------------------------- models

    async def create_model(self, request: Request) -> Response:
        """``POST create_model``: a LoRA (rank > 0) or full (no lora_config, or rank 0) model."""
        owner, body, raw = await self.json_body(request, schema.CreateModelBody)
        session = self.registry.session(owner, body.session_id)
        new_id = model_id(session.session_id, body.model_seq_id)
        spec = _model_spec(body)
        return self._submit_creation(
            owner, session, new_id, raw, make=lambda: self.backend.create_model(owner, spec), reply={}, kind="create"
        )

    def _submit_creation(
        self,
        owner: str,
        session: Session,
        new_id: str,
        raw: bytes,
        *,
        make: Callable[[], Awaitable[backend.ModelHandle]],
        reply: dict[str, Any],
        kind: str,
    ) -> Response:
        fingerprint = hashlib.sha256(raw).hexdigest()
        earlier = session.creations.get(new_id)
        if earlier is not None:
            if earlier[0] != fingerprint:
                raise Conflict(f"model_seq_id of {new_id} was already used by a different request")
            return JSONResponse({"request_id": earlier[1], "model_id": new_id})
        if new_id in self.registry.models:
            raise Conflict(f"model {new_id} exists")

        async def work() -> Reply:
            handle = await make()
            if session.finished is not None:
                await self.backend.close_model(handle)
                raise BadRequest(f"session {session.session_id} finished while the model was being created")
            info = self.backend.model_info(handle)
            self.registry.add_model(
                TrainingModel(new_id, session.session_id, owner, handle, info, SeqOrder(self.config.gap_timeout_s))
            )
            return encoding.JsonReply({"model_id": new_id, **reply})

        request_id = self.futures.submit(owner, _failing_as_reply(work()), self._state(None, None), prefix=kind)
        session.creations[new_id] = (fingerprint, request_id)
        return JSONResponse({"request_id": request_id, "model_id": new_id})

    async def get_info(self, request: Request) -> Response:
        """``POST get_info``: base model, tokenizer and adapter of a model."""
        owner, body, _ = await self.json_body(request, schema.GetInfoBody)
        model = self.registry.model(owner, body.model_id)
        base = _base_model(self.backend, model.info.base_model)
        lora = model.info.lora
        return JSONResponse(
            {
                "type": "get_info",
                "model_id": model.model_id,
                "model_name": base.name,
                "model_data": {"arch": base.arch, "model_name": base.name, "tokenizer_id": base.tokenizer_id},
                "is_lora": lora is not None,
                "lora_rank": lora.rank if lora is not None else None,
            }
        )

    # ----------------------------------------------------------------- training

    async def forward_backward(self, request: Request) -> Response:
        """``POST forward_backward``: protobuf body; a built-in loss, or forward only."""
        owner = self.owner(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(PROTOBUF):
            raise BadRequest(f"forward_backward: Content-Type must be {PROTOBUF}, got {content_type!r}")
        raw = await self.body(request)
        msg = encoding.parse_forward_backward(raw)

        def prepare(model: TrainingModel) -> Callable[[], Coroutine[Any, Any, Reply]]:
            call = encoding.forward_backward_call(msg)
            if call.loss.name not in BUILTIN_LOSSES:
                raise BadRequest(
                    f"forward_backward: loss_fn {call.loss.name!r} is not supported by this server; "
                    f"built-in losses: {sorted(BUILTIN_LOSSES)} (custom losses run client-side with "
                    "forward_backward_custom)"
                )

            data = call.data if call.loss.name == "cross_entropy" else _without_weights(call.data)

            async def work() -> Reply:
                result = await self.backend.forward_backward(
                    model.handle, data, call.loss, backward=not call.forward_only
                )
                return encoding.ForwardBackwardReply(result)

            return work

        kind = "fwd" if msg.forward_only else "fwdbwd"
        return self._submit_ordered(owner, msg.model_id, msg.seq_id or None, raw, prepare=prepare, kind=kind)

    async def optim_step(self, request: Request) -> Response:
        """``POST optim_step``: AdamW with Tinker's parameters (grad clipping included)."""

        def prepare(model: TrainingModel, body: schema.OptimStepBody) -> Callable[[], Coroutine[Any, Any, Reply]]:
            p = body.params
            adam = backend.AdamSettings(p.learning_rate, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_clip_norm)
            for name, value in vars(adam).items():
                if not math.isfinite(value) or value < 0:
                    raise BadRequest(f"optim_step: {name} must be finite and >= 0, got {value}")

            async def work() -> Reply:
                result = await self.backend.optim_step(model.handle, adam)
                return encoding.JsonReply({"metrics": encoding.tinker_metrics(result.metrics)})

            return work

        return await self._ordered_json(request, schema.OptimStepBody, prepare, "optim")

    async def save_weights(self, request: Request) -> Response:
        """``POST save_weights`` (``save_state``): a resumable checkpoint, ``tinker://R/weights/N``."""

        def prepare(model: TrainingModel, body: schema.SaveWeightsBody) -> Callable[[], Coroutine[Any, Any, Reply]]:
            path = TinkerPath.of(model.model_id, "state", body.path or _default_name(model))

            async def work() -> Reply:
                async with _naming(path):
                    await self.backend.save_state(model.handle, path.store_name)
                return encoding.JsonReply({"type": "save_weights", "path": str(path)})

            return work

        return await self._ordered_json(request, schema.SaveWeightsBody, prepare, "save")

    async def save_weights_for_sampler(self, request: Request) -> Response:
        """``POST save_weights_for_sampler``: named (a checkpoint) or ephemeral (a sampling session)."""

        def prepare(
            model: TrainingModel, body: schema.SaveWeightsForSamplerBody
        ) -> Callable[[], Coroutine[Any, Any, Reply]]:
            if body.kind != "snapshot":
                raise BadRequest("save_weights_for_sampler: kind 'inflight' is not supported by this server")
            if body.path is not None:
                path = TinkerPath.of(model.model_id, "sampler", body.path)

                async def save_named() -> Reply:
                    async with _naming(path):
                        await self.backend.save_sampler_weights(model.handle, path.store_name)
                    return encoding.JsonReply({"type": "save_weights_for_sampler", "path": str(path)})

                return save_named
            if body.sampling_session_seq_id is None:
                raise BadRequest("save_weights_for_sampler: give path, or sampling_session_seq_id (ephemeral weights)")
            session = self.registry.session(model.owner, model.session_id)
            new_sampler = sampler_id(session.session_id, body.sampling_session_seq_id)
            if new_sampler in self.registry.samplers:
                raise Conflict(f"sampling session {new_sampler} exists")

            async def save_ephemeral() -> Reply:
                ref = await self.backend.save_sampler_weights(model.handle, None)
                sampler = Sampler(new_sampler, model.owner, ref, model.info.base_model, None)
                self.registry.add_sampler(session, sampler)
                return encoding.JsonReply({"type": "save_weights_for_sampler", "sampling_session_id": new_sampler})

            return save_ephemeral

        return await self._ordered_json(request, schema.SaveWeightsForSamplerBody, prepare, "save")

    async def save_weights_external(self, request: Request) -> Response:
        """``POST save_weights_external``: Hugging Face layout, downloadable by its owner."""

        def prepare(
            model: TrainingModel, body: schema.SaveWeightsExternalBody
        ) -> Callable[[], Coroutine[Any, Any, Reply]]:
            if body.age_encryption_recipients:
                raise BadRequest("save_weights_external: age encryption is not supported by this server")
            path = TinkerPath.of(model.model_id, "external", body.path)

            async def work() -> Reply:
                async with _naming(path):
                    await self.backend.save_external(model.handle, path.store_name)
                return encoding.JsonReply({"type": "save_weights_external", "path": str(path)})

            return work

        return await self._ordered_json(request, schema.SaveWeightsExternalBody, prepare, "save")

    async def load_weights(self, request: Request) -> Response:
        """``POST load_weights``: into a model (ordered), or creating one from a checkpoint."""
        owner = self.owner(request)
        raw = await self.body(request)
        try:
            body = schema.parse(schema.LoadWeightsBody, raw, "load_weights")
        except BadRequest:
            self._skip_unparsed(owner, raw)
            raise
        if body.model_id is None:
            assert body.session_id is not None and body.model_seq_id is not None
            session = self.registry.session(owner, body.session_id)
            path = TinkerPath.parse(body.path)
            info = self._checkpoint(owner, path)
            if body.base_model is not None and body.base_model != info.base_model:
                raise BadRequest(
                    f"load_weights: base_model {body.base_model!r} differs from the checkpoint's {info.base_model!r}; "
                    "this server loads a checkpoint on its own base model only"
                )
            new_id = model_id(session.session_id, body.model_seq_id)
            with_optimizer = body.optimizer
            return self._submit_creation(
                owner,
                session,
                new_id,
                raw,
                make=lambda: self.backend.load_model(owner, path.store_name, with_optimizer=with_optimizer),
                reply={"type": "load_weights", "path": str(path)},
                kind="load",
            )

        def prepare(model: TrainingModel) -> Callable[[], Coroutine[Any, Any, Reply]]:
            path = TinkerPath.parse(body.path)

            async def work() -> Reply:
                async with _naming(path):
                    await self.backend.load_state(model.handle, path.store_name, with_optimizer=body.optimizer)
                return encoding.JsonReply({"type": "load_weights", "path": str(path), "model_id": model.model_id})

            return work

        return self._submit_ordered(owner, body.model_id, body.seq_id, raw, prepare=prepare, kind="load")

    # ----------------------------------------------------------------- sampling

    async def create_sampling_session(self, request: Request) -> Response:
        """``POST create_sampling_session``: from a base model or saved weights (``tinker://``)."""
        owner, body, _ = await self.json_body(request, schema.CreateSamplingSessionBody)
        session = self.registry.session(owner, body.session_id)
        new_id = sampler_id(session.session_id, body.sampling_session_seq_id)
        existing = self.registry.samplers.get(new_id)
        source, base, model_path = self._sample_source(owner, body.base_model, body.model_path)
        if existing is not None:
            if (existing.source, existing.model_path) != (source, model_path):
                raise Conflict(f"sampling_session_seq_id of {new_id} was already used for another source")
        else:
            self.registry.add_sampler(session, Sampler(new_id, owner, source, base, model_path))
        return JSONResponse({"type": "create_sampling_session", "sampling_session_id": new_id})

    def _sample_source(self, owner: str, base_model: str | None, model_path: str | None) -> tuple[str, str, str | None]:
        if model_path is not None:
            path = TinkerPath.parse(model_path)
            if path.kind == "external":
                raise BadRequest(f"{model_path}: external weights cannot be sampled; save sampler weights instead")
            info = self._checkpoint(owner, path)
            return path.store_name, info.base_model, model_path
        if base_model is None:
            raise BadRequest("give base_model or model_path")
        return base_model, _base_model(self.backend, base_model).name, None

    async def get_sampler(self, request: Request) -> Response:
        """``GET samplers/{id}``: a sampling session's base model and weights."""
        sampler = self.registry.sampler(self.owner(request), request.path_params["sampler_id"])
        return JSONResponse(
            {"sampler_id": sampler.sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}
        )

    async def asample(self, request: Request) -> Response:
        """``POST asample``: sample (or score a prompt: ``compute_logprobs``); idempotent per seq_id."""
        owner, body, raw = await self.json_body(request, schema.SampleBody)
        if body.sampling_session_id is not None:
            sampler = self.registry.sampler(owner, body.sampling_session_id)
            source, where = sampler.source, sampler.sampler_id
        else:
            source, _, _ = self._sample_source(owner, body.base_model, body.model_path)
            sampler, where = None, "direct"
        prompt = np.asarray(body.prompt_tokens(), dtype=np.int64)
        spec = _sample_spec(body, prompt.size)
        num = body.num_samples
        sequence_ids = [f"{where}:{body.seq_id}:{i}" for i in range(num)]
        fingerprint = hashlib.sha256(raw).hexdigest()
        if sampler is not None and body.seq_id is not None:
            earlier = sampler.requests.get(body.seq_id)
            if earlier is not None:
                if earlier[0] != fingerprint:
                    raise Conflict(f"seq_id {body.seq_id} of {where} was already used by a different request")
                return JSONResponse({"request_id": earlier[1], "sample_sequence_ids": sequence_ids})
        last_n = body.prompt_logprobs_last_n

        async def work() -> Reply:
            result = await self.backend.sample(
                owner,
                source,
                prompt,
                num,
                spec,
                prompt_logprobs=bool(body.prompt_logprobs),
                topk_prompt_logprobs=body.topk_prompt_logprobs,
            )
            if last_n is not None and result.prompt_logprobs is not None:
                masked = result.prompt_logprobs.copy()
                masked[: max(0, masked.size - last_n)] = np.nan
                result = dataclasses.replace(result, prompt_logprobs=masked)
            return encoding.SampleReply(result)

        request_id = self.futures.submit(owner, _failing_as_reply(work()), self._state(None, None), prefix="sample")
        if sampler is not None and body.seq_id is not None:
            sampler.requests[body.seq_id] = (fingerprint, request_id)
        return JSONResponse({"request_id": request_id, "sample_sequence_ids": sequence_ids})

    # ----------------------------------------------------------------- futures

    async def retrieve_future(self, request: Request) -> Response:
        """``POST retrieve_future``: the result (protobuf when accepted), a failure, or try_again."""
        owner, body, _ = await self.json_body(request, schema.RetrieveFutureBody)
        outcome = await self.futures.retrieve(owner, body.request_id)
        if isinstance(outcome, Pending):
            return JSONResponse(
                {
                    "type": "try_again",
                    "request_id": body.request_id,
                    "queue_state": outcome.queue_state,
                    "queue_state_reason": outcome.reason,
                }
            )
        if isinstance(outcome, BaseException):
            return JSONResponse({"error": _failure_message(outcome), "category": error_category(outcome)})
        if PROTOBUF in request.headers.get("accept", ""):
            proto = outcome.to_proto()
            if proto is not None:
                return Response(proto, media_type=PROTOBUF)
        return JSONResponse(outcome.to_json())

    async def cancel_future(self, request: Request) -> Response:
        """``POST cancel_future``: stop unfinished work (the SDK cancels abandoned samples)."""
        owner, body, _ = await self.json_body(request, schema.CancelFutureBody)
        self.futures.cancel(owner, body.request_id)
        return JSONResponse({})

    # ----------------------------------------------------------------- checkpoints

    async def weights_info(self, request: Request) -> Response:
        """``POST weights_info``: base model and adapter of a checkpoint."""
        owner, body, _ = await self.json_body(request, schema.WeightsInfoBody)
        info = self._checkpoint(owner, TinkerPath.parse(body.tinker_path))
        lora = info.lora
        return JSONResponse(
            {
                "base_model": info.base_model,
                "is_lora": lora is not None,
                "lora_rank": lora.rank if lora else None,
                "train_mlp": lora.train_mlp if lora else None,
                "train_attn": lora.train_attn if lora else None,
                "train_unembed": lora.train_unembed if lora else None,
            }
        )

    def _checkpoint(self, owner: str, path: TinkerPath) -> backend.CheckpointInfo:
        try:
            return self.backend.checkpoint(owner, path.store_name)
        except backend.NotFound:
            raise NotFound(f"no checkpoint {path}") from None

    def _checkpoints(self, owner: str, run_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        for info in self.backend.list_checkpoints(owner):
            path = TinkerPath.from_store_name(info.name)
            if path is None or (run_id is not None and path.run_id != run_id):
                continue
            out.append(_checkpoint_json(path, info))
        out.sort(key=lambda c: str(c["time"]))
        return out

    async def list_run_checkpoints(self, request: Request) -> Response:
        """``GET training_runs/{id}/checkpoints``."""
        owner = self.owner(request)
        run_id = request.path_params["run_id"]
        parse_model_id(run_id)
        return JSONResponse({"checkpoints": self._checkpoints(owner, run_id)})

    async def list_all_checkpoints(self, request: Request) -> Response:
        """``GET checkpoints``: all of the caller's Tinker checkpoints."""
        owner = self.owner(request)
        limit, offset = _page(request)
        every = self._checkpoints(owner)
        return JSONResponse(
            {
                "checkpoints": every[offset : offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(every)},
            }
        )

    def _run_path(self, request: Request) -> TinkerPath:
        return TinkerPath.parse(f"tinker://{request.path_params['run_id']}/{request.path_params['checkpoint_id']}")

    async def delete_checkpoint(self, request: Request) -> Response:
        """``DELETE training_runs/{id}/checkpoints/{checkpoint_id}``."""
        owner = self.owner(request)
        path = self._run_path(request)
        async with _naming(path):
            await self.backend.delete_checkpoint(owner, path.store_name)
        return JSONResponse({})

    async def external_weights_urls(self, request: Request) -> Response:
        """``GET .../external_weights_urls``: signed URLs of this server, one per file."""
        owner = self.owner(request)
        path = self._run_path(request)
        if path.kind != "external":
            raise BadRequest(f"{path} is not an external_weights checkpoint")
        files = self.backend.checkpoint_files(owner, path.store_name)
        base = str(request.base_url)
        urls: dict[str, str] = {}
        expires = 0
        for f in files:
            urls[f.relpath], expires = self.signer.url(base, owner, path.store_name, f.relpath)
        return JSONResponse({"urls": urls, "expires": _iso(expires)})

    async def download(self, request: Request) -> Response:
        """``GET downloads/...``: one checkpoint file through a signed URL."""
        p = request.path_params
        owner = "" if p["owner"] == "-" else p["owner"]
        try:
            expires = int(request.query_params.get("expires", ""))
        except ValueError:
            raise NotFound("invalid or expired download URL") from None
        if not self.signer.check(owner, p["name"], p["relpath"], expires, request.query_params.get("sig", "")):
            raise NotFound("invalid or expired download URL")
        for f in self.backend.checkpoint_files(owner, p["name"]):
            if f.relpath == p["relpath"]:
                return FileResponse(f.path, media_type="application/octet-stream")
        raise NotFound(f"no file {p['relpath']!r} in this checkpoint")

    # ----------------------------------------------------------------- training runs

    def _run_json(self, model: TrainingModel) -> dict[str, Any]:
        checkpoints = self._checkpoints(model.owner, model.model_id)
        last = {kind: [c for c in checkpoints if c["checkpoint_type"] == kind] for kind in ("training", "sampler")}
        lora = model.info.lora
        return {
            "training_run_id": model.model_id,
            "base_model": model.info.base_model,
            "model_owner": model.owner,
            "is_lora": lora is not None,
            "lora_rank": lora.rank if lora else None,
            "corrupted": False,
            "last_request_time": _iso(model.last_request_s),
            "last_checkpoint": last["training"][-1] if last["training"] else None,
            "last_sampler_checkpoint": last["sampler"][-1] if last["sampler"] else None,
            "user_metadata": model.user_metadata or None,
        }

    async def get_training_run(self, request: Request) -> Response:
        """``GET training_runs/{id}``: a live training model of the caller."""
        model = self.registry.model(self.owner(request), request.path_params["run_id"])
        return JSONResponse(self._run_json(model))

    async def list_training_runs(self, request: Request) -> Response:
        """``GET training_runs``: the caller's live training models."""
        owner = self.owner(request)
        limit, offset = _page(request)
        runs = sorted(self.registry.owned_models(owner), key=lambda m: m.model_id)
        return JSONResponse(
            {
                "training_runs": [self._run_json(m) for m in runs[offset : offset + limit]],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
            }
        )


# --------------------------------------------------------------------- helpers


async def _failing_as_reply(work: Awaitable[Reply]) -> Reply:
    """Run ``work``; unexpected exceptions are logged and become a generic server failure."""
    try:
        return await work
    except (HTTPError, backend.BackendError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("tinker front end: request failed")
        raise _InternalError(f"internal server error ({type(exc).__name__}); see the server log") from exc


@contextlib.asynccontextmanager
async def _naming(path: TinkerPath) -> AsyncIterator[None]:
    """Report a checkpoint by its Tinker path, not its store name."""
    try:
        yield
    except backend.Conflict:
        raise Conflict(f"checkpoint {path} exists") from None
    except backend.NotFound:
        raise NotFound(f"no checkpoint {path}") from None


class _InternalError(Exception):
    """An unexpected failure, reported without internals."""


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, HTTPError):
        return exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "the request was cancelled"
    return str(exc)


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        {"detail": f"unknown route {request.method} {request.url.path} (see docs/TINKER.md)"},
        status_code=404,
        headers={"x-should-retry": "false"},
    )


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        {"detail": f"method {request.method} is not allowed on {request.url.path}"},
        status_code=405,
        headers={"x-should-retry": "false"},
    )


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat()


def _page(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit", "20"))
        offset = int(request.query_params.get("offset", "0"))
    except ValueError:
        raise BadRequest("limit and offset must be integers") from None
    if limit < 1 or offset < 0:
        raise BadRequest(f"need limit >= 1 and offset >= 0, got limit={limit} offset={offset}")
    return limit, offset


def _default_name(model: TrainingModel) -> str:
    return f"seq-{model.order.next_seq}"


def _base_model(backend_: backend.TinkerBackend, name: str) -> backend.BaseModelInfo:
    for m in backend_.base_models():
        if m.name == name:
            return m
    served = sorted(m.name for m in backend_.base_models())
    raise NotFound(f"unknown base_model {name!r}; this server serves {served}")


def _without_weights(data: list[backend.TrainDatum]) -> list[backend.TrainDatum]:
    """Tinker's RL losses ignore ``weights``: drop them so the core's default (ones) applies."""
    return [dataclasses.replace(d, inputs={k: v for k, v in d.inputs.items() if k != "weights"}) for d in data]


def _model_spec(body: schema.CreateModelBody) -> backend.ModelSpec:
    lc = body.lora_config
    if body.optimizer_config and body.optimizer_config.get("type", "adamw") not in ("adam", "adamw"):
        raise BadRequest(f"create_model: optimizer {body.optimizer_config.get('type')!r} is not supported (adamw only)")
    if lc is None or lc.rank == 0:
        return backend.ModelSpec(body.base_model, None, lc.seed if lc else None)
    if not (lc.train_mlp or lc.train_attn or lc.train_unembed):
        raise BadRequest("create_model: at least one of train_mlp, train_attn, train_unembed must be true")
    return backend.ModelSpec(
        body.base_model, backend.LoraSpec(lc.rank, lc.train_mlp, lc.train_attn, lc.train_unembed), lc.seed
    )


def _sample_spec(body: schema.SampleBody, prompt_len: int) -> backend.SampleSpec:
    p = body.sampling_params
    if prompt_len == 0:
        raise BadRequest("asample: the prompt is empty")
    if p.max_tokens is None:
        raise BadRequest("asample: sampling_params.max_tokens is required by this server")
    unsupported = {
        "topk_sample_logprobs": body.topk_sample_logprobs,
        "prompt_alt_tokens_k": body.prompt_alt_tokens_k,
        "target_prompt_logprobs": body.target_prompt_logprobs,
    }
    for name, value in unsupported.items():
        if value:
            raise BadRequest(f"asample: {name} is not supported by this server")
    if body.prompt_logprobs_last_n is not None and not body.prompt_logprobs:
        raise BadRequest("asample: prompt_logprobs_last_n needs prompt_logprobs")
    stop = p.stop
    strings: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    if isinstance(stop, str):
        strings = (stop,)
    elif stop and isinstance(stop[0], str):
        strings = tuple(str(s) for s in stop)
    elif stop:
        tokens = tuple(int(t) for t in stop)
    seed = None if p.seed is None else p.seed % (2**63 - 1)
    return backend.SampleSpec(p.max_tokens, p.temperature, p.top_p, p.top_k, seed, strings, tokens)


def _checkpoint_json(path: TinkerPath, info: backend.CheckpointInfo) -> dict[str, Any]:
    kind = {"state": "training", "sampler": "sampler", "external": "external"}[path.kind]
    return {
        "checkpoint_id": path.checkpoint_id,
        "checkpoint_type": kind,
        "time": _iso(info.created_unix_s),
        "tinker_path": str(path),
        "size_bytes": info.size_bytes,
        "public": False,
        "user_metadata": None,
        "expires_at": None,
    }
