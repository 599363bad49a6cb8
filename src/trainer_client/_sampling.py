"""Sampling: request building, response reading, and :class:`AsyncSamplingClient`.

A sampling client samples one fixed set of weights: a served base model, a saved checkpoint
(``save_weights_for_sampler``: for a LoRA session just its adapter), or a training session's
weights as of each call's place in the session's order. Its calls return :class:`APIFuture`
objects at once, so a loop fires hundreds of them concurrently (as Tinker's cookbook does); the
server batches concurrent requests on the same weights into shared decode steps.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from trainer_client._errors import ProtocolError
from trainer_client._futures import APIFuture
from trainer_client._types import SampledSequence, SampleOutput, SamplingParams, TopLogprobs
from trainer_proto import pb

if TYPE_CHECKING:
    import torch

    from trainer_client._async_client import AsyncServiceClient, AsyncTrainingClient
    from trainer_proto import wire
else:
    from trainer_client._lazy import torch, wire

__all__ = ["AsyncSamplingClient", "Prompt", "read_samples", "sample_request"]

Prompt: TypeAlias = "Sequence[int] | torch.Tensor"
"""A prompt's token ids: a list or a 1-D integer tensor."""


def _tokens(prompt: Prompt, where: str) -> torch.Tensor:
    if isinstance(prompt, str):
        raise TypeError(
            f"{where} takes the prompt's token ids, not text: encode it first, e.g. "
            "tokenizer.encode(prompt) with tokenizer = await training_client.get_tokenizer()"
        )
    tokens = prompt if isinstance(prompt, torch.Tensor) else torch.tensor(list(prompt), dtype=torch.int64)
    return tokens.to(torch.int64)


def sample_request(
    prompts: Sequence[tuple[Prompt, int]],
    params: SamplingParams | None,
    *,
    prompt_logprobs: bool = False,
    prompt_top_logprobs: int = 0,
    where: str = "sample()",
) -> pb.SampleRequest:
    """A Sample request for one or more ``(prompt, num_samples)`` (the source is set by the caller)."""
    request = pb.SampleRequest(
        params=(params or SamplingParams()).to_proto(),
        return_prompt_logprobs=prompt_logprobs,
        prompt_top_logprobs=prompt_top_logprobs,
    )
    if len(prompts) == 1:
        ((prompt, n),) = prompts
        request.prompt.CopyFrom(wire.tensor_to_wire(_tokens(prompt, where)))
        request.num_samples = n
    else:
        for prompt, n in prompts:
            request.prompts.add(tokens=wire.tensor_to_wire(_tokens(prompt, where)), num_samples=n)
    return request


def _top(ids: pb.TensorData, values: pb.TensorData, where: str) -> TopLogprobs | None:
    if not ids.data and not values.data:
        return None
    return TopLogprobs(wire.tensor_from_wire(ids, f"{where} top_token_ids"), wire.tensor_from_wire(values, where))


async def read_samples(call: Any, request: pb.SampleRequest) -> list[SampleOutput]:
    """Read a Sample call's stream into one output per prompt, checking what arrives."""
    counts = [p.num_samples for p in request.prompts] or [request.num_samples]
    sequences: list[list[SampledSequence]] = [[] for _ in counts]
    prompt_lp: list[torch.Tensor | None] = [None] * len(counts)
    prompt_top: list[TopLogprobs | None] = [None] * len(counts)
    async for msg in call:
        kind = msg.WhichOneof("message")
        if kind == "prompt_logprobs":
            prompt_lp[0] = wire.tensor_from_wire(msg.prompt_logprobs, "prompt_logprobs")
        elif kind == "prompt":
            p = msg.prompt.prompt_index
            if p >= len(counts):
                raise ProtocolError(f"Sample: logprobs of prompt {p} of {len(counts)}")
            if msg.prompt.HasField("logprobs"):
                prompt_lp[p] = wire.tensor_from_wire(msg.prompt.logprobs, "prompt_logprobs")
            prompt_top[p] = _top(msg.prompt.top_token_ids, msg.prompt.top_logprobs, "prompt_top_logprobs")
        else:
            s = msg.sequence
            p = s.prompt_index
            if p >= len(counts) or s.index != len(sequences[p]):
                raise ProtocolError(f"Sample: sequence {s.index} of prompt {p} arrived out of order")
            sequences[p].append(
                SampledSequence(
                    tokens=wire.tensor_from_wire(s.tokens, "tokens").tolist(),
                    logprobs=wire.tensor_from_wire(s.logprobs, "logprobs"),
                    finish_reason=s.finish_reason,
                    top_logprobs=_top(s.top_token_ids, s.top_logprobs, "top_logprobs"),
                )
            )
    for p, (got, want) in enumerate(zip(sequences, counts, strict=True)):
        if len(got) != want:
            raise ProtocolError(f"Sample: got {len(got)} sequences for prompt {p}, asked for {want}")
    return [
        SampleOutput(sequences=s, prompt_logprobs=lp, prompt_top_logprobs=top)
        for s, lp, top in zip(sequences, prompt_lp, prompt_top, strict=True)
    ]


class AsyncSamplingClient:
    """Samples one set of weights; see :meth:`AsyncServiceClient.create_sampling_client`.

    Args:
        service: the connection.
        base_model: sample a served base model's own weights, or
        checkpoint: a saved checkpoint (BASE, STATE or ADAPTER), or
        training_client: a session's weights as of each call's place in its order (the call
            takes the session's next sequence number when it is made).

    Attributes:
        source: what it samples, e.g. ``base_model:tiny-llama`` or ``checkpoint:NAME``.
    """

    def __init__(
        self,
        service: AsyncServiceClient,
        *,
        base_model: str | None = None,
        checkpoint: str | None = None,
        training_client: AsyncTrainingClient | None = None,
    ) -> None:
        given = [x for x in (base_model, checkpoint, training_client) if x is not None]
        if len(given) != 1:
            raise ValueError("a sampling client samples exactly one of: base_model, checkpoint, training_client")
        self._service = service
        self._base_model = base_model
        self._checkpoint = checkpoint
        self._training_client = training_client
        if base_model is not None:
            self.source = f"base_model:{base_model}"
        elif checkpoint is not None:
            self.source = f"checkpoint:{checkpoint}"
        else:
            assert training_client is not None
            self.source = f"session:{training_client.session_id}"

    def _submit(self, name: str, request: pb.SampleRequest) -> APIFuture[list[SampleOutput]]:
        tc = self._training_client
        if tc is not None:  # sequenced with the session's training calls

            async def sequenced(seq: int) -> list[SampleOutput]:
                request.call.CopyFrom(tc._header(seq))
                return await self._service._sample(request)

            return tc._submit(name, sequenced)
        if self._base_model is not None:
            request.base_model = self._base_model
        else:
            assert self._checkpoint is not None
            request.checkpoint = self._checkpoint
        self._service._check_open()
        return APIFuture(
            asyncio.ensure_future(self._service._sample(request)), description=f"{name} from {self.source}"
        )

    def sample(
        self,
        prompt: Prompt,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        *,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[SampleOutput]:
        """Sample ``num_samples`` completions of ``prompt`` (Tinker's ``sample``).

        Args:
            prompt: token ids.
            num_samples: completions, sharing the prompt's prefill.
            sampling_params: length, temperature, top-k/p, stops, seed, top-k logprobs.
            include_prompt_logprobs: also return each prompt token's logprob (after the first).
            topk_prompt_logprobs: also return the k most likely tokens at each prompt position.
        """
        request = sample_request(
            [(prompt, num_samples)],
            sampling_params,
            prompt_logprobs=include_prompt_logprobs,
            prompt_top_logprobs=topk_prompt_logprobs,
        )
        return _first(self._submit("sample", request))

    def sample_many(
        self,
        prompts: Sequence[Prompt | tuple[Prompt, int]],
        sampling_params: SamplingParams | None = None,
        *,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[list[SampleOutput]]:
        """Sample many prompts in one call, each with its own number of samples.

        Args:
            prompts: token ids, or ``(token ids, num_samples)`` pairs.
            sampling_params: shared by every prompt.
            num_samples: for prompts given without a count.
            include_prompt_logprobs: also return each prompt's logprobs.
            topk_prompt_logprobs: also return the k most likely tokens at each prompt position.
        """
        pairs = [p if isinstance(p, tuple) else (p, num_samples) for p in prompts]
        if not pairs:
            raise ValueError("sample_many needs at least one prompt")
        if len(pairs) == 1:  # the wire's single-prompt form answers the same way
            return _listed(self.sample(pairs[0][0], pairs[0][1], sampling_params,
                                       include_prompt_logprobs=include_prompt_logprobs,
                                       topk_prompt_logprobs=topk_prompt_logprobs))  # fmt: skip
        request = sample_request(
            pairs, sampling_params, prompt_logprobs=include_prompt_logprobs, prompt_top_logprobs=topk_prompt_logprobs
        )
        return self._submit("sample_many", request)

    def compute_logprobs(self, prompt: Prompt) -> APIFuture[list[float | None]]:
        """Each prompt token's logprob given the ones before it; ``None`` for the first (Tinker's layout)."""
        request = sample_request(
            [(prompt, 1)], SamplingParams(max_tokens=1), prompt_logprobs=True, where="compute_logprobs()"
        )
        inner = self._submit("compute_logprobs", request)

        async def result() -> list[float | None]:
            (out,) = await inner
            assert out.prompt_logprobs is not None
            values: list[float | None] = [None]
            values += [float(v) if math.isfinite(float(v)) else None for v in out.prompt_logprobs.tolist()]
            return values

        return APIFuture(asyncio.ensure_future(result()), description=inner.description)


def _first(future: APIFuture[list[SampleOutput]]) -> APIFuture[SampleOutput]:
    async def first() -> SampleOutput:
        (out,) = await future
        return out

    return APIFuture(asyncio.ensure_future(first()), description=future.description)


def _listed(future: APIFuture[SampleOutput]) -> APIFuture[list[SampleOutput]]:
    async def listed() -> list[SampleOutput]:
        return [await future]

    return APIFuture(asyncio.ensure_future(listed()), description=future.description)
