"""Continuous batching for sampling: one decode batch over many requests on one model (device side).

Everything here is synchronous and runs on the device thread, one call at a time. The scheduler
(:mod:`trainer_server._sampling_scheduler`) runs each :meth:`DecodeBatch.step` as one device job and
reads the admission state (:meth:`DecodeBatch.admissible`) between steps.

Layout. A row is one sample of one request. The KV cache holds every row left-padded to the batch's
common width: row ``r``'s tokens are the last ``length[r]`` columns, the attention mask hides the
columns before them and position ids count the row's own tokens only, so a row computes what it
would alone (up to the rounding of differently shaped matmuls, ~1e-7 in fp32). A request's prompt
is prefilled once and its cache row repeated for each of its samples.

Step. :meth:`DecodeBatch.step` (1) drops the rows of cancelled requests; (2) prefills the admitted
prompts in one left-padded forward and appends their rows; (3) draws one token per row from the
logits of the previous forward; (4) retires the rows that stopped and returns the requests whose
samples have all finished; (5) forwards the surviving rows' new tokens. Requests join and leave
between steps, and other device work (another session's training step) runs between steps.

Draws. Each request owns a ``torch.Generator`` on the model's device, seeded from its settings.
Every step it draws one Exp(1) number per sample and vocabulary entry (finished samples included),
whatever else shares the batch, and each row takes ``argmax(p / q)`` over its filtered
distribution ``p`` (the exponential race, equivalent to Gumbel-max: token ``i`` wins with
probability ``p[i]``), for all rows in one batched op. A seeded request therefore draws the same
tokens alone or batched; a token could only change if its two best ratios were within float
rounding of each other (inverse-CDF sampling, by contrast, flips whenever the uniform falls
within rounding of any of the vocabulary's CDF steps). Greedy requests (temperature 0) take
the argmax and draw nothing.

Logprobs. Reported logprobs are the model's own: ``log_softmax`` of the logits at temperature 1,
before top-k/top-p, for the sampled token and for the top-k alternatives.

Cache layouts. Plain ``DynamicLayer`` caches (Llama, Qwen2, GPT-2, ...) are padded and merged, so
new requests join a running batch. Other layouts (e.g. sliding-window layers) are batched only when
prefilled together: new requests wait until the running ones finish.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trainer_server._sampling import Sample, SampleRequest, SampleResult, SamplingModel, TopLogprobs

__all__ = ["DecodeBatch"]

_PAD_ID = 0
"""Token fed at padded prompt positions; masked out, so any valid id does."""


@dataclass(eq=False)
class _Job:
    """An admitted request: its draws, its stops and its samples."""

    id: int
    request: SampleRequest
    generator: torch.Generator | None  # None: greedy, draws nothing
    stops: dict[int, list[list[int]]]  # stop sequences (eos included) by their last token
    text_window: int  # how many trailing tokens are decoded to look for stop strings
    rows: list[_Row] = field(default_factory=list)
    open: int = 0
    prompt_logprobs: torch.Tensor | None = None
    prompt_top_logprobs: TopLogprobs | None = None

    def result(self) -> SampleResult:
        k = self.request.settings.top_logprobs
        samples = [
            Sample(
                row.tokens,
                row.logprobs,
                row.finish_reason or "length",
                TopLogprobs(torch.stack(row.top_ids), torch.stack(row.top_logprobs)) if k else None,
            )
            for row in self.rows
        ]
        return SampleResult(samples, self.prompt_logprobs, self.prompt_top_logprobs)


@dataclass(eq=False)
class _Row:
    """One sample being decoded."""

    job: _Job
    index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    top_logprobs: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True, eq=False)
class _RowParams:
    """Per-row sampling parameters as device tensors, rebuilt when the batch's rows change."""

    all_greedy: bool
    greedy: torch.Tensor | None  # bool [B]; None when no row is greedy
    temperature: torch.Tensor  # [B, 1], 1 for greedy rows
    top_k: torch.Tensor | None  # long [B], vocab size for "keep all"; None when no row filters
    top_p: torch.Tensor | None  # [B], 1 for "keep all"
    draws: list[tuple[_Job, int, int]]  # each drawing job's rows [start, end) in ``noise``
    noise: torch.Tensor  # [draws + 1, V], refilled every step; the last row (1s) serves greedy rows
    noise_index: torch.Tensor | None  # long [B]: each row's row of ``noise``; None when it is the identity
    top_logprobs: int  # widest top-k asked for


class DecodeBatch:
    """A continuous decode batch over many requests on one model.

    Args:
        model: The model every request of the batch samples from.
        max_rows: Most rows (samples) decoded together; a request waits while it does not fit,
            except that an empty batch always takes the next request.
        max_prefill_tokens: Most (padded) prompt tokens prefilled in one step, beyond the first request.
        agree: Makes the ranks of a sharded model choose the same tokens (rank 0's), so that they
            run the same forwards; ``None`` on a single device.
    """

    def __init__(
        self,
        model: SamplingModel,
        *,
        max_rows: int = 256,
        max_prefill_tokens: int = 16384,
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self._max_rows = max_rows
        self._max_prefill_tokens = max_prefill_tokens
        self._agree = agree
        self._jobs: dict[int, _Job] = {}
        self._rows: list[_Row] = []
        self._params: _RowParams | None = None
        self._cache: Any = None
        self._cache_kw = "past_key_values"
        self._mergeable: bool | None = None  # learnt from the first prefill's cache
        self._width = 0  # columns of the cache
        self._padded: bool | None = None  # whether some row is shorter than the cache (None: not known yet)
        self._lengths = torch.zeros(0, dtype=torch.int64)  # each row's tokens in the cache
        self._logits = torch.zeros(0)  # [B, V] float32: the next token's logits of each row

    @property
    def num_rows(self) -> int:
        """Samples being decoded."""
        return len(self._rows)

    def admissible(self, requests: Sequence[SampleRequest]) -> int:
        """How many of ``requests`` (from the front) the next step can admit."""
        if self._rows and not self._mergeable:
            return 0
        rows, count, widest = len(self._rows), 0, 0
        for request in requests:
            n, widest_after = request.settings.num_samples, max(widest, len(request.tokens))
            if rows and rows + n > self._max_rows:
                break
            if count and (count + 1) * widest_after > self._max_prefill_tokens:
                break
            rows, count, widest = rows + n, count + 1, widest_after
        return count

    @torch.no_grad()
    def step(
        self, admit: Sequence[tuple[int, SampleRequest]], cancel: Collection[int]
    ) -> list[tuple[int, SampleResult]]:
        """Run one decode step: drop ``cancel``, prefill ``admit``, draw a token for every row.

        Args:
            admit: New requests with their ids (unique in this batch), at most :meth:`admissible` of them.
            cancel: Ids of admitted requests to drop (their clients went away).

        Returns:
            The requests that finished in this step, with their results.
        """
        if cancel:
            self._retire({job_id for job_id in cancel if job_id in self._jobs})
        if admit:
            self._prefill(admit)
        if not self._rows:
            return []
        params = self._params if self._params is not None else self._build_params()
        chosen = _choose(self._logits, params, self._noise(params))
        if self._agree is not None:
            chosen = self._agree(chosen)
        logp = torch.log_softmax(self._logits, dim=-1)
        tokens = chosen.tolist()
        logprobs = logp.gather(-1, chosen[:, None])[:, 0].tolist()
        top_ids = top_lps = None
        if params.top_logprobs:
            top = logp.topk(min(params.top_logprobs, logp.shape[-1]), dim=-1)
            top_ids, top_lps = top.indices.cpu(), top.values.cpu()
        keep: list[int] = []
        done: list[_Job] = []
        for r, (row, token, logprob) in enumerate(zip(self._rows, tokens, logprobs, strict=True)):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            k = row.job.request.settings.top_logprobs
            if k and top_ids is not None and top_lps is not None:
                row.top_ids.append(top_ids[r, :k])
                row.top_logprobs.append(top_lps[r, :k])
            row.finish_reason = self._finish_reason(row)
            if row.finish_reason is None:
                keep.append(r)
                continue
            row.job.open -= 1
            if row.job.open == 0:
                done.append(row.job)
        for job in done:
            del self._jobs[job.id]
        if len(keep) < len(self._rows):
            chosen = chosen[torch.tensor(keep, dtype=torch.int64, device=chosen.device)]
            self._select(keep)
        if self._rows:
            self._forward(chosen)
        return [(job.id, job.result()) for job in done]

    def run(self, requests: Sequence[SampleRequest]) -> list[SampleResult]:
        """Sample every request to completion on this (idle) batch; results in request order."""
        assert not self._jobs, "run() needs an idle batch"
        pending = list(enumerate(requests))
        results: dict[int, SampleResult] = {}
        while pending or self._rows:
            n = self.admissible([request for _, request in pending])
            results.update(self.step(pending[:n], ()))
            pending = pending[n:]
        return [results[i] for i in range(len(requests))]

    # ---- admission --------------------------------------------------------------------------

    def _new_job(self, job_id: int, request: SampleRequest) -> _Job:
        settings = request.settings
        generator = None
        if settings.temperature > 0:
            seed = settings.seed if settings.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        stops: dict[int, list[list[int]]] = {}
        for seq in [*settings.stop, *((eos,) for eos in sorted(self.model.eos_token_ids))]:
            stops.setdefault(seq[-1], []).append(list(seq))
        # A character is at most 4 UTF-8 bytes and a token at least one byte; the margin absorbs a
        # window that starts inside a character.
        window = 4 * max((len(s) for s in settings.stop_strings), default=0) + 8
        job = _Job(job_id, request, generator, stops, window, open=settings.num_samples)
        job.rows = [_Row(job, i) for i in range(settings.num_samples)]
        return job

    def _prefill(self, admit: Sequence[tuple[int, SampleRequest]]) -> None:
        """Prefill the admitted prompts in one left-padded forward and append one row per sample."""
        assert not self._rows or self._mergeable, "admit only what admissible() allows"
        device = self.model.device
        jobs = [self._new_job(job_id, request) for job_id, request in admit]
        sizes = [len(job.request.tokens) for job in jobs]
        width = max(sizes)
        ids = torch.full((len(jobs), width), _PAD_ID, dtype=torch.int64)
        mask = torch.zeros((len(jobs), width), dtype=torch.int64)
        for i, (job, size) in enumerate(zip(jobs, sizes, strict=True)):
            ids[i, width - size :] = job.request.tokens
            mask[i, width - size :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        every_position = any(job.request.prompt_logprobs or job.request.prompt_top_logprobs for job in jobs)
        out = self.model.module(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
        )
        # transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`.
        self._cache_kw = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        cache = getattr(out, self._cache_kw)
        if every_position:
            for i, (job, size) in enumerate(zip(jobs, sizes, strict=True)):
                _score_prompt(job, out.logits[i, width - size : width - 1].float())
        repeat = [i for i, job in enumerate(jobs) for _ in range(job.open)]
        index = torch.tensor(repeat, dtype=torch.int64, device=device)
        if repeat != list(range(len(jobs))):
            cache.batch_select_indices(index)  # one cache row per sample, sharing the prompt's prefill
        logits = out.logits[:, -1].float()[index]
        lengths = torch.tensor(sizes, dtype=torch.int64, device=device)[index]
        rows = [row for job in jobs for row in job.rows]
        if not self._rows:
            self._cache, self._width, self._lengths, self._logits = cache, width, lengths, logits
            if self._mergeable is None:
                self._mergeable = _is_mergeable(cache)
        else:
            self._merge(cache, width, lengths, logits)
        self._rows.extend(rows)
        self._jobs.update((job.id, job) for job in jobs)
        self._params, self._padded = None, None

    def _merge(self, cache: Any, width: int, lengths: torch.Tensor, logits: torch.Tensor) -> None:
        """Append prefilled rows to the running ones, left-padding both to the wider of the two."""
        common = max(self._width, width)
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, common), _left_pad(new.keys, common)])
            old.values = torch.cat([_left_pad(old.values, common), _left_pad(new.values, common)])
        self._width = common
        self._lengths = torch.cat([self._lengths, lengths])
        self._logits = torch.cat([self._logits, logits])

    # ---- retirement -------------------------------------------------------------------------

    def _retire(self, job_ids: set[int]) -> None:
        """Drop every row of the given (admitted) requests."""
        for job_id in job_ids:
            del self._jobs[job_id]
        self._select([r for r, row in enumerate(self._rows) if row.job.id not in job_ids])

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (in order), and drop cache columns no row uses any more."""
        self._rows = [self._rows[r] for r in keep]
        self._params, self._padded = None, None
        if not self._rows:
            self._cache, self._width = None, 0
            self._lengths, self._logits = self._lengths[:0], self._logits[:0]
            return
        index = torch.tensor(keep, dtype=torch.int64, device=self._lengths.device)
        self._cache.batch_select_indices(index)
        self._lengths, self._logits = self._lengths[index], self._logits[index]
        if self._mergeable:
            width = int(self._lengths.max())
            if width < self._width:
                for layer in self._cache.layers:
                    layer.keys = layer.keys[..., self._width - width :, :]
                    layer.values = layer.values[..., self._width - width :, :]
                self._width = width

    # ---- decoding ---------------------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor) -> None:
        """Feed each row its new token; keep the logits for the next step's draw."""
        width = self._width + 1
        lengths = self._lengths + 1
        if self._padded is None:  # every row grows by one token per step: known until the rows change
            self._padded = bool((self._lengths < self._width).any())
        mask = None  # no padding: the plain causal path, as a request alone takes it
        if self._padded:
            columns = torch.arange(width, device=lengths.device)
            mask = (columns[None, :] >= (width - lengths)[:, None]).to(torch.int64)
        out = self.model.module(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=self._lengths[:, None],
            use_cache=True,
            **{self._cache_kw: self._cache},
        )
        self._cache = getattr(out, self._cache_kw)
        self._logits = out.logits[:, -1].float()
        self._width, self._lengths = width, lengths

    def _build_params(self) -> _RowParams:
        device = self._logits.device
        vocab = self._logits.shape[-1]
        draws: list[tuple[_Job, int, int]] = []
        starts: dict[int, int] = {}
        total = 0
        for job in self._jobs.values():
            if job.generator is not None:
                starts[job.id] = total
                total += job.request.settings.num_samples
                draws.append((job, starts[job.id], total))
        greedy, temperature, top_k, top_p, noise_rows = [], [], [], [], []
        for row in self._rows:
            settings = row.job.request.settings
            greedy.append(settings.temperature == 0)
            temperature.append(settings.temperature or 1.0)
            top_k.append(settings.top_k if 0 < settings.top_k < vocab else vocab)
            top_p.append(settings.top_p)
            noise_rows.append(starts[row.job.id] + row.index if row.job.generator is not None else total)
        filtered = any(k < vocab for k in top_k) or any(p < 1 for p in top_p)
        noise = torch.empty((total + 1, vocab), device=device)
        noise[total] = 1.0
        self._params = _RowParams(
            all_greedy=all(greedy),
            greedy=torch.tensor(greedy, device=device) if any(greedy) else None,
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device)[:, None],
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device) if filtered else None,
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device) if filtered else None,
            draws=draws,
            noise=noise,
            noise_index=None
            if noise_rows == list(range(total))
            else torch.tensor(noise_rows, dtype=torch.int64, device=device),
            top_logprobs=max(row.job.request.settings.top_logprobs for row in self._rows),
        )
        return self._params

    def _noise(self, params: _RowParams) -> torch.Tensor | None:
        """Exp(1) noise ``[B, V]``, each row's from its request's generator (all its samples draw, finished or not)."""
        if params.all_greedy:
            return None
        for job, start, end in params.draws:
            params.noise[start:end].exponential_(generator=job.generator)
        noise = params.noise[: len(self._rows)] if params.noise_index is None else params.noise[params.noise_index]
        # q = 0 has probability ~0 but would make p / q NaN for a filtered-out token; keep q > 0.
        return noise.clamp_(min=torch.finfo(torch.float32).tiny)

    def _finish_reason(self, row: _Row) -> str | None:
        """Why the row's sample ends after its newest token, or None if it goes on."""
        tokens = row.tokens
        job = row.job
        for seq in job.stops.get(tokens[-1], ()):
            if tokens[-len(seq) :] == seq:
                return "stop"
        settings = job.request.settings
        if settings.stop_strings:
            assert self.model.decode is not None  # SamplingModel.check refuses stop strings without a decoder
            text = self.model.decode(tokens[-job.text_window :])
            if any(s in text for s in settings.stop_strings):
                return "stop"
        if len(tokens) >= settings.max_tokens:
            return "length"
        return None


def _choose(logits: torch.Tensor, params: _RowParams, noise: torch.Tensor | None) -> torch.Tensor:
    """Each row's token: the argmax for greedy rows, else the exponential race ``argmax(p / noise)``."""
    best = logits.argmax(dim=-1)
    if params.all_greedy or noise is None:
        return best
    # Shift the max to 0 first: over a tiny temperature the scores are then 0 or -inf, never
    # inf - inf = NaN; softmax ignores the shift, so the distribution is unchanged.
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k is not None and params.top_p is not None:
        scores = _filter(scores, params.top_k, params.top_p)
    drawn = (torch.softmax(scores, dim=-1) / noise).argmax(dim=-1)
    return drawn if params.greedy is None else torch.where(params.greedy, best, drawn)


def _filter(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) each row's tokens outside its top-k (ties kept) and outside its top-p nucleus."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    kth = sorted_scores.gather(-1, (top_k - 1)[:, None])
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    probs = torch.softmax(sorted_scores, dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays);
    # rows with top_p = 1 drop nothing (their cumulated mass may round to 1 before the tail).
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)


def _score_prompt(job: _Job, logits: torch.Tensor) -> None:
    """Fill the job's prompt logprobs from the logits at its prompt positions (all but the last)."""
    request = job.request
    logp = torch.log_softmax(logits, dim=-1)
    if request.prompt_logprobs:
        targets = request.tokens[1:].to(logp.device)
        job.prompt_logprobs = logp.gather(-1, targets[:, None])[:, 0].cpu()
    if request.prompt_top_logprobs:
        top = logp.topk(min(request.prompt_top_logprobs, logp.shape[-1]), dim=-1)
        job.prompt_top_logprobs = TopLogprobs(top.indices.cpu(), top.values.cpu())


def _is_mergeable(cache: Any) -> bool:
    """Whether the cache's layers are plain ``DynamicLayer``s, which can be padded, merged and trimmed."""
    from transformers.cache_utils import DynamicLayer

    layers: list[Any] = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """Pad ``[batch, heads, length, dim]`` states with zeros on the left of the length axis up to ``width``."""
    missing = width - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states
