"""JSON request bodies of the Tinker API, as the tinker 0.38 SDK sends them.

Each model mirrors the SDK's request type (``tinker/types/*_request.py``) with the fields
this server reads; unknown fields are ignored, as Tinker's server does, so newer SDKs
keep working. :func:`parse` turns a validation failure into one precise message that
names the route, the field and the problem.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer_server.frontends.tinker.errors import BadRequest

__all__ = [
    "AdamParamsBody",
    "Body",
    "CancelFutureBody",
    "CreateModelBody",
    "CreateSamplingSessionBody",
    "CreateSessionBody",
    "FinishSessionBody",
    "GetInfoBody",
    "LoadWeightsBody",
    "LoraConfigBody",
    "OptimStepBody",
    "RetrieveFutureBody",
    "SampleBody",
    "SamplingParamsBody",
    "SaveWeightsBody",
    "SaveWeightsExternalBody",
    "SaveWeightsForSamplerBody",
    "SessionHeartbeatBody",
    "WeightsInfoBody",
    "loads_object",
    "parse",
]

Body = TypeVar("Body", bound=BaseModel)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSessionBody(_Request):
    """``POST /api/v1/create_session``."""

    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str = ""
    project_id: str | None = None
    display_name: str | None = None


class SessionHeartbeatBody(_Request):
    """``POST /api/v1/session_heartbeat``."""

    session_id: str


class FinishSessionBody(_Request):
    """``POST /api/v1/sessions/{id}/finish``."""

    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraConfigBody(_Request):
    """``lora_config`` of create_model; rank 0 means a full fine-tune (this server's extension)."""

    rank: int = Field(ge=0)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelBody(_Request):
    """``POST /api/v1/create_model``; no ``lora_config`` means a full fine-tune."""

    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigBody | None = None
    optimizer_config: dict[str, Any] | None = None


class AdamParamsBody(_Request):
    """Tinker's ``AdamParams`` (its defaults)."""

    type: Literal["adam", "adamw"] | None = None
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepBody(_Request):
    """``POST /api/v1/optim_step``: the SDK sends ``adam_params`` (legacy) or ``optim_params``."""

    model_id: str
    seq_id: int | None = None
    adam_params: AdamParamsBody | None = None
    optim_params: AdamParamsBody | None = None

    @model_validator(mode="after")
    def _one_params(self) -> OptimStepBody:
        if (self.adam_params is None) == (self.optim_params is None):
            raise ValueError("give exactly one of adam_params and optim_params (AdamParams)")
        return self

    @property
    def params(self) -> AdamParamsBody:
        """The Adam parameters, whichever key carried them."""
        params = self.adam_params or self.optim_params
        assert params is not None
        return params


class SaveWeightsBody(_Request):
    """``POST /api/v1/save_weights`` (``save_state``)."""

    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSamplerBody(_Request):
    """``POST /api/v1/save_weights_for_sampler``: named, or ephemeral with a sampling session seq id."""

    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternalBody(_Request):
    """``POST /api/v1/save_weights_external``."""

    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


class LoadWeightsBody(_Request):
    """``POST /api/v1/load_weights``: into a model, or creating one (session id + model seq id)."""

    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool
    weights_access_token: str | None = None

    @model_validator(mode="after")
    def _target(self) -> LoadWeightsBody:
        creating = self.session_id is not None or self.model_seq_id is not None
        if self.model_id is None and not (self.session_id is not None and self.model_seq_id is not None):
            raise ValueError("give model_id, or session_id and model_seq_id to create a model")
        if self.model_id is not None and creating:
            raise ValueError("give model_id or session_id + model_seq_id, not both")
        return self


class SamplingParamsBody(_Request):
    """Tinker's ``SamplingParams``."""

    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class _Chunk(_Request):
    type: str = "encoded_text"
    tokens: list[int] = Field(default_factory=list)


class _ModelInput(_Request):
    chunks: list[_Chunk]


class SampleBody(_Request):
    """``POST /api/v1/asample``."""

    num_samples: int = Field(default=1, ge=1)
    prompt: _ModelInput
    sampling_params: SamplingParamsBody
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(default=0, ge=0)
    topk_sample_logprobs: int = Field(default=0, ge=0)
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = Field(default=0, ge=0)
    prompt_logprobs_last_n: int | None = Field(default=None, ge=1)

    def prompt_tokens(self) -> list[int]:
        """The prompt's token ids.

        Raises:
            BadRequest: A chunk that is not text tokens.
        """
        tokens: list[int] = []
        for chunk in self.prompt.chunks:
            if chunk.type != "encoded_text":
                raise BadRequest(f"asample: prompt chunks of type {chunk.type!r} are not supported by this server")
            tokens.extend(chunk.tokens)
        return tokens


class CreateSamplingSessionBody(_Request):
    """``POST /api/v1/create_sampling_session``."""

    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CreateSamplingSessionBody:
        if (self.base_model is None) == (self.model_path is None):
            raise ValueError("give exactly one of base_model and model_path")
        return self


class GetInfoBody(_Request):
    """``POST /api/v1/get_info``."""

    model_id: str


class RetrieveFutureBody(_Request):
    """``POST /api/v1/retrieve_future``."""

    request_id: str
    allow_metadata_only: bool = False


class CancelFutureBody(_Request):
    """``POST /api/v1/cancel_future``."""

    request_id: str


class WeightsInfoBody(_Request):
    """``POST /api/v1/weights_info``."""

    tinker_path: str


def loads_object(body: bytes) -> dict[str, Any]:
    """A JSON object from a body.

    Raises:
        ValueError: Not JSON, or not an object.
    """
    try:
        data = json.loads(body) if body else None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"body must be a JSON object, got {type(data).__name__}")
    return data


def parse(model: type[Body], body: bytes, route: str) -> Body:
    """Parse a JSON body into ``model``.

    Raises:
        BadRequest: Not JSON, not an object, or a field missing or of the wrong type;
            the message names the route and every bad field.
    """
    try:
        data = loads_object(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"{route}: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors())
        raise BadRequest(f"{route}: {problems}") from None
