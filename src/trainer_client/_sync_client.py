"""The sync facade: ``ServiceClient`` and ``TrainingClient`` for scripts and notebooks.

aio objects may only be used on the event loop that made them, so the facade runs one
event loop in a background thread (an anyio ``BlockingPortal``) and marshals every call
onto it. Training methods return the same :class:`APIFuture` the async client returns;
call ``.result(timeout)`` on it. Submitting several calls before waiting on any keeps the
server busy, exactly as in async code.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from trainer_client._async_client import AsyncServiceClient, AsyncTrainingClient
from trainer_client._config import ClientConfig
from trainer_client._errors import ClientClosedError
from trainer_client._futures import APIFuture
from trainer_client._sampling import AsyncSamplingClient, Prompt
from trainer_client._types import (
    AdamParams,
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

if TYPE_CHECKING:
    import torch

__all__ = ["SamplingClient", "ServiceClient", "TrainingClient"]

T = TypeVar("T")


def _warn_if_in_event_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    warnings.warn(
        f"{what} blocks, and it was called from inside a running event loop; "
        "use AsyncServiceClient / AsyncTrainingClient and `await` in async code",
        RuntimeWarning,
        stacklevel=3,
    )


class _OnPortal:
    """Runs the async client's methods on the portal's loop thread."""

    _portal: BlockingPortal

    def _check_open(self) -> None:
        """Raise :class:`ClientClosedError` once the owning ServiceClient was closed."""

    def _submit(self, fn: Callable[..., APIFuture[T]], *args: Any, **kwargs: Any) -> APIFuture[T]:
        """Call a method that starts a call and returns its future (no waiting).

        The portal awaits whatever awaitable a function returns, and an APIFuture is
        awaitable: returned bare, the caller would block until the call finished and get
        its result instead of the future. So the future travels boxed in a tuple.
        """
        _warn_if_in_event_loop(f"{type(self).__name__}.{fn.__name__}")
        self._check_open()
        (future,) = self._portal.call(lambda: (fn(*args, **kwargs),))
        return future

    def _wait(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run a coroutine method to completion."""
        _warn_if_in_event_loop(f"{type(self).__name__}.{fn.__name__}")
        self._check_open()

        async def run() -> T:
            return await fn(*args, **kwargs)

        return self._portal.call(run)


class TrainingClient(_OnPortal):
    """Sync facade over :class:`AsyncTrainingClient`; see that class for each method."""

    def __init__(self, service: ServiceClient, inner: AsyncTrainingClient) -> None:
        self._service = service
        self._portal = service._portal
        self._inner = inner
        self.session_id = inner.session_id
        self.base_model = inner.base_model

    def _check_open(self) -> None:
        self._service._check_open()

    def forward(self, data: Sequence[Datum], *, logprobs_dtype: str = "float32") -> APIFuture[ForwardOutput]:
        """See :meth:`AsyncTrainingClient.forward`."""
        return self._submit(self._inner.forward, data, logprobs_dtype=logprobs_dtype)

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
        *,
        return_logprobs: bool = False,
    ) -> APIFuture[ForwardBackwardOutput]:
        """See :meth:`AsyncTrainingClient.forward_backward`."""
        return self._submit(
            self._inner.forward_backward, data, loss_fn, loss_fn_config, return_logprobs=return_logprobs
        )

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: LossFn, *, logprobs_dtype: str = "float32"
    ) -> APIFuture[ForwardBackwardOutput]:
        """See :meth:`AsyncTrainingClient.forward_backward_custom`."""
        return self._submit(self._inner.forward_backward_custom, data, loss_fn, logprobs_dtype=logprobs_dtype)

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResult]:
        """See :meth:`AsyncTrainingClient.optim_step`."""
        return self._submit(self._inner.optim_step, adam_params)

    def sample(
        self,
        prompt: Sequence[int] | torch.Tensor,
        num_samples: int = 1,
        params: SamplingParams | None = None,
        *,
        return_prompt_logprobs: bool = False,
    ) -> APIFuture[SampleOutput]:
        """See :meth:`AsyncTrainingClient.sample`."""
        return self._submit(
            self._inner.sample, prompt, num_samples, params, return_prompt_logprobs=return_prompt_logprobs
        )

    def sample_many(
        self,
        prompts: Sequence[Prompt | tuple[Prompt, int]],
        params: SamplingParams | None = None,
        *,
        num_samples: int = 1,
        return_prompt_logprobs: bool = False,
    ) -> APIFuture[list[SampleOutput]]:
        """See :meth:`AsyncTrainingClient.sample_many`."""
        return self._submit(
            self._inner.sample_many,
            prompts,
            params,
            num_samples=num_samples,
            return_prompt_logprobs=return_prompt_logprobs,
        )

    def create_sampling_client(self) -> SamplingClient:
        """See :meth:`AsyncTrainingClient.create_sampling_client`."""
        return SamplingClient(self._service, self._inner.create_sampling_client())

    def save_state(self, name: str) -> APIFuture[CheckpointInfo]:
        """See :meth:`AsyncTrainingClient.save_state`."""
        return self._submit(self._inner.save_state, name)

    def save_weights_for_sampler(self, name: str) -> APIFuture[CheckpointInfo]:
        """See :meth:`AsyncTrainingClient.save_weights_for_sampler`."""
        return self._submit(self._inner.save_weights_for_sampler, name)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """See :meth:`AsyncTrainingClient.save_weights_and_get_sampling_client` (blocks until saved)."""
        inner = self._submit(self._inner.save_weights_and_get_sampling_client, name).result()
        return SamplingClient(self._service, inner)

    def compute_logprobs(self, sequences: Sequence[Sequence[int] | torch.Tensor]) -> APIFuture[list[torch.Tensor]]:
        """See :meth:`AsyncTrainingClient.compute_logprobs`."""
        return self._submit(self._inner.compute_logprobs, sequences)

    def save_checkpoint(self, name: str, kind: str = "state", *, dtype: str = "bfloat16") -> APIFuture[CheckpointInfo]:
        """See :meth:`AsyncTrainingClient.save_checkpoint`."""
        return self._submit(self._inner.save_checkpoint, name, kind, dtype=dtype)

    def get_tokenizer(self) -> Any:
        """See :meth:`AsyncTrainingClient.get_tokenizer`."""
        return self._wait(self._inner.get_tokenizer)

    def close(self) -> None:
        """Close the session after the calls already submitted (nothing to do once the client is closed)."""
        if self._service._portal_cm is not None:
            self._wait(self._inner.close)

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SamplingClient(_OnPortal):
    """Sync facade over :class:`AsyncSamplingClient`; see that class for each method."""

    def __init__(self, service: ServiceClient, inner: AsyncSamplingClient) -> None:
        self._service = service
        self._portal = service._portal
        self._inner = inner
        self.source = inner.source

    def _check_open(self) -> None:
        self._service._check_open()

    def sample(
        self,
        prompt: Prompt,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        *,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[SampleOutput]:
        """See :meth:`AsyncSamplingClient.sample`."""
        return self._submit(
            self._inner.sample,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
        )

    def sample_many(
        self,
        prompts: Sequence[Prompt | tuple[Prompt, int]],
        sampling_params: SamplingParams | None = None,
        *,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[list[SampleOutput]]:
        """See :meth:`AsyncSamplingClient.sample_many`."""
        return self._submit(
            self._inner.sample_many,
            prompts,
            sampling_params,
            num_samples=num_samples,
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
        )

    def compute_logprobs(self, prompt: Prompt) -> APIFuture[list[float | None]]:
        """See :meth:`AsyncSamplingClient.compute_logprobs`."""
        return self._submit(self._inner.compute_logprobs, prompt)


class ServiceClient(_OnPortal):
    """Sync facade over :class:`AsyncServiceClient`; arguments are the same."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        config: ClientConfig | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self._portal_cm: Any = start_blocking_portal(backend="asyncio")
        self._portal = self._portal_cm.__enter__()

        async def make() -> AsyncServiceClient:
            return AsyncServiceClient(
                target, api_key=api_key, config=config, tls=tls, root_certificates=root_certificates
            )

        try:
            self._inner = self._portal.call(make)
        except BaseException:
            cm, self._portal_cm = self._portal_cm, None
            cm.__exit__(None, None, None)
            raise
        self.target = self._inner.target

    def get_server_info(self) -> ServerInfo:
        """See :meth:`AsyncServiceClient.get_server_info`."""
        return self._wait(self._inner.get_server_info)

    def create_training_client(
        self,
        base_model: str,
        *,
        lora_rank: int | None = 32,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        seed: int = 0,
    ) -> TrainingClient:
        """See :meth:`AsyncServiceClient.create_training_client`."""
        inner = self._wait(
            self._inner.create_training_client,
            base_model,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=lora_target_modules,
            seed=seed,
        )
        return TrainingClient(self, inner)

    def create_training_client_from_state(self, checkpoint: str) -> TrainingClient:
        """See :meth:`AsyncServiceClient.create_training_client_from_state`."""
        return TrainingClient(self, self._wait(self._inner.create_training_client_from_state, checkpoint))

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, *, seed: int = 0, target_modules: Sequence[str] | None = None
    ) -> TrainingClient:
        """See :meth:`AsyncServiceClient.create_lora_training_client`."""
        inner = self._wait(
            self._inner.create_lora_training_client, base_model, rank, seed=seed, target_modules=target_modules
        )
        return TrainingClient(self, inner)

    def create_sampling_client(self, model_path: str | None = None, *, base_model: str | None = None) -> SamplingClient:
        """See :meth:`AsyncServiceClient.create_sampling_client`."""
        return SamplingClient(self, self._inner.create_sampling_client(model_path, base_model=base_model))

    def attach_training_client(self, session_id: str) -> TrainingClient:
        """See :meth:`AsyncServiceClient.attach_training_client`."""
        return TrainingClient(self, self._wait(self._inner.attach_training_client, session_id))

    def list_sessions(self) -> list[SessionInfo]:
        """See :meth:`AsyncServiceClient.list_sessions`."""
        return self._wait(self._inner.list_sessions)

    def end_session(self, session_id: str) -> None:
        """See :meth:`AsyncServiceClient.end_session`."""
        self._wait(self._inner.end_session, session_id)

    def sample_from_checkpoint(
        self,
        checkpoint: str,
        prompt: Sequence[int] | torch.Tensor,
        num_samples: int = 1,
        params: SamplingParams | None = None,
        *,
        return_prompt_logprobs: bool = False,
    ) -> SampleOutput:
        """See :meth:`AsyncServiceClient.sample_from_checkpoint`."""
        return self._wait(
            self._inner.sample_from_checkpoint,
            checkpoint,
            prompt,
            num_samples,
            params,
            return_prompt_logprobs=return_prompt_logprobs,
        )

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """See :meth:`AsyncServiceClient.list_checkpoints`."""
        return self._wait(self._inner.list_checkpoints)

    def delete_checkpoint(self, name: str) -> None:
        """See :meth:`AsyncServiceClient.delete_checkpoint`."""
        self._wait(self._inner.delete_checkpoint, name)

    def download_checkpoint(self, name: str, out_dir: str | Path, *, progress: bool = True) -> Path:
        """See :meth:`AsyncServiceClient.download_checkpoint`."""
        return self._wait(self._inner.download_checkpoint, name, out_dir, progress=progress)

    def get_tokenizer(self, base_model: str) -> Any:
        """See :meth:`AsyncServiceClient.get_tokenizer`."""
        return self._wait(self._inner.get_tokenizer, base_model)

    def get_tokenizer_files(self, base_model: str) -> dict[str, bytes]:
        """See :meth:`AsyncServiceClient.get_tokenizer_files`."""
        return self._wait(self._inner.get_tokenizer_files, base_model)

    def _check_open(self) -> None:
        if self._portal_cm is None:
            raise ClientClosedError(f"the client to {self.target} is closed; open a new one")

    def close(self) -> None:
        """Close the channel and stop the background loop."""
        if self._portal_cm is None:
            return
        try:
            self._portal.call(self._inner.close)
        finally:
            cm, self._portal_cm = self._portal_cm, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
