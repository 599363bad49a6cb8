"""User-facing data types: datums, optimizer parameters and call results.

A :class:`Datum` follows the Tinker/Fireworks vocabulary: ``model_input`` holds the
input token ids and ``loss_fn_inputs`` holds per-token tensors of the same length:
``target_tokens`` (the next token at each position) and ``weights`` (0.0 for prompt
tokens, 1.0 for response tokens), plus whatever a loss needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainer_client._tokenizer import token_ids
from trainer_proto import pb

if TYPE_CHECKING:
    import torch

    from trainer_proto import wire
else:
    from trainer_client._lazy import torch, wire

__all__ = [
    "CHECKPOINT_KINDS",
    "AdamParams",
    "CheckpointFile",
    "CheckpointInfo",
    "Datum",
    "ForwardBackwardOutput",
    "ForwardOutput",
    "LossFn",
    "ModelInfo",
    "OptimStepResult",
    "SampleOutput",
    "SampledSequence",
    "SamplingParams",
    "ServerInfo",
    "SessionInfo",
    "TopLogprobs",
]


def _as_tensor(values: Sequence[int] | Sequence[float] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=dtype)
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {tuple(t.shape)}")
    return t.to(dtype)


@dataclass(frozen=True)
class Datum:
    """One training sequence.

    Tensors or plain lists are accepted: ``Datum([1, 2], {"target_tokens": [2, 3],
    "weights": [0.0, 1.0]})`` stores int64 ids and ``target_tokens``, float32 for every other input.

    Attributes:
        model_input: input token ids, 1-D int64.
        loss_fn_inputs: per-token tensors keyed by name, each as long as ``model_input``;
            ``target_tokens`` is required, ``weights`` defaults to all ones on the server.

    Raises:
        ValueError: a list that is not 1-D.
    """

    model_input: torch.Tensor
    loss_fn_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Lengths are checked by the server, which names the datum and field in its error.
        inputs = {
            name: value
            if isinstance(value, torch.Tensor)
            else _as_tensor(value, torch.int64 if name == "target_tokens" else torch.float32)
            for name, value in self.loss_fn_inputs.items()
        }
        object.__setattr__(self, "model_input", _as_tensor(self.model_input, torch.int64))
        object.__setattr__(self, "loss_fn_inputs", inputs)

    @property
    def target_tokens(self) -> torch.Tensor:
        """The next-token targets, one per input position."""
        return self.loss_fn_inputs["target_tokens"]

    @property
    def weights(self) -> torch.Tensor:
        """Per-token weights (all ones when not given)."""
        w = self.loss_fn_inputs.get("weights")
        return torch.ones(len(self.model_input), dtype=torch.float32) if w is None else w

    def __len__(self) -> int:
        return len(self.model_input)

    @classmethod
    def from_tokens(
        cls,
        prompt: Sequence[int] | torch.Tensor,
        response: Sequence[int] | torch.Tensor,
        **extra: Sequence[float] | torch.Tensor,
    ) -> Datum:
        """Build a datum from prompt and response token ids.

        The full sequence ``prompt + response`` is shifted by one: inputs are all but the
        last token, targets all but the first, and a target's weight is 1.0 when it is a
        response token, 0.0 when it is a prompt token.

        Args:
            prompt: prompt token ids (at least one).
            response: response token ids (at least one).
            **extra: more per-token loss inputs, already aligned with the targets.

        Raises:
            ValueError: an empty prompt or response, or an extra input of the wrong length.
        """
        p = _as_tensor(prompt, torch.int64)
        r = _as_tensor(response, torch.int64)
        if len(p) == 0 or len(r) == 0:
            raise ValueError("prompt and response must each have at least one token")
        tokens = torch.cat([p, r])
        weights = torch.cat([torch.zeros(len(p) - 1), torch.ones(len(r))]).to(torch.float32)
        inputs: dict[str, torch.Tensor] = {"target_tokens": tokens[1:].clone(), "weights": weights}
        for name, values in extra.items():
            t = _as_tensor(values, torch.float32)
            if len(t) != len(tokens) - 1:
                raise ValueError(f"{name} has {len(t)} values, expected {len(tokens) - 1} (one per target)")
            inputs[name] = t
        return cls(model_input=tokens[:-1].clone(), loss_fn_inputs=inputs)

    @classmethod
    def from_sequence(cls, tokens: Sequence[int] | torch.Tensor) -> Datum:
        """A datum scoring every token after the first of ``tokens`` (all weights 1)."""
        t = _as_tensor(tokens, torch.int64)
        if len(t) < 2:
            raise ValueError("a sequence needs at least two tokens to score")
        return cls(model_input=t[:-1].clone(), loss_fn_inputs={"target_tokens": t[1:].clone()})

    @classmethod
    def from_text(
        cls,
        tokenizer: Any,
        prompt: str,
        response: str,
        *,
        add_eos: bool = True,
        eos_token_id: int | None = None,
    ) -> Datum:
        """Tokenize a prompt and a response and build a datum (see :meth:`from_tokens`).

        The prompt is encoded with the tokenizer's special tokens (the BOS of families that
        have one, e.g. Llama-3, Gemma, Mistral), the response without, followed by the
        model's EOS: the tokenizer's ``eos_token_id``, which ``get_tokenizer()`` reads from the
        model's tokenizer config (else its generation config). For chat models, prefer
        :meth:`from_messages`, which applies the model's chat template.

        Args:
            tokenizer: the session's tokenizer (``await training_client.get_tokenizer()``),
                a Hugging Face tokenizer or a ``tokenizers.Tokenizer``.
            prompt: prompt text.
            response: response text.
            add_eos: append EOS to the response.
            eos_token_id: the EOS to append instead of the tokenizer's.

        Raises:
            ValueError: ``add_eos`` but the tokenizer has no EOS token and none was given.
        """
        p = token_ids(tokenizer, prompt, add_special_tokens=True)
        r = token_ids(tokenizer, response, add_special_tokens=False)
        if add_eos:
            eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError(
                    "the tokenizer has no EOS token (none in the model's tokenizer_config.json or "
                    "generation_config.json); pass eos_token_id=... or add_eos=False"
                )
            r.append(int(eos))
        return cls.from_tokens(p, r)

    @classmethod
    def from_messages(
        cls,
        tokenizer: Any,
        messages: Sequence[Mapping[str, str]],
        *,
        train_on: str = "all_assistant_messages",
        max_length: int | None = None,
    ) -> Datum:
        """A datum from chat messages, rendered with the model's chat template.

        The datum's tokens are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)``'s.
        Weights are 1.0 on the tokens the trained assistant turns produced (their content and
        end-of-turn token, e.g. ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``</s>``) and
        0.0 on everything else (system and user turns, role headers, the generation prompt).

        Args:
            tokenizer: the session's Hugging Face tokenizer (``await training_client.get_tokenizer()``
                with ``transformers`` installed).
            messages: ``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]``.
            train_on: "all_assistant_messages" (default), "last_assistant_message" (earlier turns
                are context only) or "all_tokens".
            max_length: keep at most this many input tokens (cut off the end); default the
                tokenizer's ``model_max_length``, which is the model's length for our models.

        Raises:
            TypeError: the tokenizer is not a Hugging Face one.
            ValueError: an unknown ``train_on``, no chat template, no assistant message, a template
                that rewrites earlier turns, or nothing left to train on after truncation.
        """
        from trainer_client._chat import datum_from_messages

        return datum_from_messages(tokenizer, messages, train_on=train_on, max_length=max_length)

    def to_proto(self) -> pb.Datum:
        """Encode for the wire."""
        msg = pb.Datum(model_input=wire.tensor_to_wire(self.model_input))
        for name, value in self.loss_fn_inputs.items():
            msg.loss_fn_inputs[name].CopyFrom(wire.tensor_to_wire(value))
        return msg


LossFn = Callable[[list["Datum"], list["torch.Tensor"]], tuple["torch.Tensor", Mapping[str, float]]]
"""``loss_fn(data: list[Datum], logprobs: list[Tensor]) -> (loss, metrics)``.

``logprobs[i]`` has one entry per target of ``data[i]`` and ``requires_grad=True``;
``loss`` is a scalar tensor; ``metrics`` maps names to floats.
"""


@dataclass(frozen=True)
class AdamParams:
    """AdamW hyperparameters (defaults match the Tinker SDK).

    The server refuses values out of range with INVALID_ARGUMENT and changes nothing; a
    step that would still make a weight or the optimizer state non-finite is undone and
    answered FAILED_PRECONDITION.

    Attributes:
        learning_rate: step size, in [0, 10].
        beta1: first-moment decay, in [0, 1).
        beta2: second-moment decay, in [0, 1).
        eps: denominator epsilon, in [1e-30, 1].
        weight_decay: decoupled weight decay, >= 0, with ``learning_rate * weight_decay <= 1``.
        grad_clip_norm: clip the global gradient L2 norm to this; 0 disables; >= 0.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_proto(self) -> pb.AdamParams:
        """Encode for the wire (every field explicit)."""
        return pb.AdamParams(
            learning_rate=self.learning_rate,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.grad_clip_norm,
        )


@dataclass(frozen=True)
class ForwardOutput:
    """Result of a forward pass.

    Attributes:
        logprobs: per datum, the logprob of each target token.
        num_tokens: targets scored.
    """

    logprobs: list[torch.Tensor]
    num_tokens: int


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Result of a forward+backward pass; gradients are accumulated on the server.

    Attributes:
        loss: the loss value (for a custom loss, as the loss function computed it).
        metrics: loss metrics by name.
        logprobs: per-datum logprobs when they were returned, else empty.
        num_tokens: targets scored.
    """

    loss: float
    metrics: dict[str, float]
    logprobs: list[torch.Tensor]
    num_tokens: int


@dataclass(frozen=True)
class OptimStepResult:
    """Result of an optimizer step.

    Attributes:
        step: optimizer steps the session has taken, this one included.
        grad_norm: global L2 norm of the accumulated gradients before clipping.
        no_gradient: no forward_backward was submitted since the previous step, so there was
            nothing to apply: the step was counted (as in Tinker) but no weight changed.
    """

    step: int
    grad_norm: float
    no_gradient: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """A base model the server serves."""

    name: str
    architecture: str
    vocab_size: int
    max_sequence_length: int
    dtype: str
    num_parameters: int


@dataclass(frozen=True)
class ServerInfo:
    """What the server reports about itself."""

    version: str
    models: list[ModelInfo]
    devices: list[str]
    world_size: int
    limits: dict[str, int]
    capabilities: list[str]
    loss_functions: list[str]
    distributed_mode: str = "single"
    """"single", or accelerate's distributed type ("MULTI_GPU", "MULTI_CPU") for ``world_size`` > 1."""
    open_sessions: int = 0
    """Sessions open on the server now (all keys)."""
    held_graphs: int = 0
    """Forward graphs held for a custom loss's gradient still to come."""
    held_graph_bytes: int = 0
    """Bytes the held graphs' saved tensors use."""
    session_ttl_s: float = 0.0
    """A session is closed after this long without a call or a heartbeat."""
    held_graph_timeout_s: float = 0.0
    """A custom-loss call whose gradient does not arrive within this long fails and frees its graph."""
    max_held_graph_bytes: int = 0
    """Server-wide budget for held graphs."""

    @classmethod
    def from_proto(cls, msg: pb.GetServerInfoResponse) -> ServerInfo:
        """Decode the server's reply."""
        return cls(
            version=msg.version,
            models=[
                ModelInfo(
                    name=m.name,
                    architecture=m.architecture,
                    vocab_size=m.vocab_size,
                    max_sequence_length=m.max_sequence_length,
                    dtype=m.dtype,
                    num_parameters=m.num_parameters,
                )
                for m in msg.models
            ],
            devices=list(msg.devices),
            world_size=msg.world_size,
            limits={f.name: int(v) for f, v in msg.limits.ListFields()},
            capabilities=list(msg.capabilities),
            loss_functions=list(msg.loss_functions),
            distributed_mode=msg.distributed_mode or "single",
            open_sessions=msg.open_sessions,
            held_graphs=msg.held_graphs,
            held_graph_bytes=msg.held_graph_bytes,
            session_ttl_s=msg.session_ttl_s,
            held_graph_timeout_s=msg.held_graph_timeout_s,
            max_held_graph_bytes=msg.max_held_graph_bytes,
        )


CHECKPOINT_KINDS = ("base", "delta", "adapter", "state")
"""Checkpoint kinds: full weights, lossless delta from the last base, LoRA adapter, resumable state."""


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint.

    Attributes:
        name: its name on the server.
        kind: one of :data:`CHECKPOINT_KINDS`.
        base_model: the base model it belongs to.
        session_id: the session that saved it.
        step: optimizer steps taken when it was saved.
        seq: the sequence number of the save call.
        dtype: export dtype of the weights.
        created_at: Unix time of the save.
        files: its files, with sizes and sha256.
        base_checkpoint: for a delta, the BASE it applies to.
    """

    name: str
    kind: str
    base_model: str
    session_id: str
    step: int
    seq: int
    dtype: str
    created_at: float
    files: list[CheckpointFile]
    base_checkpoint: str

    @property
    def total_bytes(self) -> int:
        """Bytes of all files."""
        return sum(f.size for f in self.files)

    @classmethod
    def from_proto(cls, msg: pb.CheckpointInfo) -> CheckpointInfo:
        """Decode the server's description."""
        return cls(
            name=msg.name,
            kind=pb.CheckpointKind.Name(msg.kind).removeprefix("CHECKPOINT_KIND_").lower(),
            base_model=msg.base_model,
            session_id=msg.session_id,
            step=msg.step,
            seq=msg.seq,
            dtype=msg.dtype,
            created_at=msg.created_at,
            files=[CheckpointFile(path=f.path, size=f.size, sha256=f.sha256) for f in msg.files],
            base_checkpoint=msg.base_checkpoint,
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
        max_tokens: new tokens per sample.
        temperature: softmax temperature; 0 is greedy. It changes which tokens are
            drawn, not the logprobs reported (those are the model's, at temperature 1,
            so they equal ``forward`` logprobs for the same tokens).
        top_p: nucleus mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 is off.
        stop: token sequences that end a sample (included in its tokens); EOS always stops.
        seed: same seed, weights and request give the same samples, alone or batched with
            other requests on the server; None is random.
        stop_strings: texts that end a sample once its decoded text contains one (the tokens
            up to the one completing the text are kept).
        top_logprobs: also return the k most likely tokens at each sampled position (0: off).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[Sequence[int]] = ()
    seed: int | None = None
    stop_strings: Sequence[str] = ()
    top_logprobs: int = 0

    def to_proto(self) -> pb.SamplingParams:
        """Encode for the wire."""
        msg = pb.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=[pb.TokenSequence(tokens=list(s)) for s in self.stop],
            stop_strings=list(self.stop_strings),
            top_logprobs=self.top_logprobs,
        )
        if self.seed is not None:
            msg.seed = self.seed
        return msg


@dataclass(frozen=True)
class TopLogprobs:
    """The most likely tokens at each position: ``token_ids[i, j]`` has logprob ``logprobs[i, j]``.

    Rows are positions, columns go from most to least likely (int64 and float32 tensors).
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass(frozen=True)
class SampledSequence:
    """One sample: new tokens, their logprobs, and why it ended ("stop" or "length").

    ``top_logprobs`` holds the most likely tokens at each sampled position when
    ``SamplingParams.top_logprobs`` asked for them.
    """

    tokens: list[int]
    logprobs: torch.Tensor
    finish_reason: str
    top_logprobs: TopLogprobs | None = None

    @property
    def stop_reason(self) -> str:
        """Tinker's name for :attr:`finish_reason`."""
        return self.finish_reason


@dataclass(frozen=True)
class SampleOutput:
    """Samples of one prompt, in index order; prompt logprobs (and their top-k) when asked for."""

    sequences: list[SampledSequence]
    prompt_logprobs: torch.Tensor | None
    prompt_top_logprobs: TopLogprobs | None = None


@dataclass(frozen=True)
class SessionInfo:
    """An open session on the server (``list_sessions``, ``attach_training_client``).

    Attributes:
        session_id: the server's id of the session.
        base_model: the base model's name.
        lora_rank: the LoRA rank, or None for a full fine-tune.
        step: optimizer steps applied so far.
        next_seq: the sequence number the session's next new call carries.
        calls_in_flight: calls submitted and not finished.
        held_graphs: forward graphs held for a gradient still to come.
        created_at: Unix time of creation.
        last_active_at: Unix time of the last call or heartbeat.
        session_ttl_s: the session is closed after this long without either.
        restored: saved at the server's last graceful stop and restored at its start.
    """

    session_id: str
    base_model: str
    lora_rank: int | None
    step: int
    next_seq: int
    calls_in_flight: int
    held_graphs: int
    created_at: float
    last_active_at: float
    session_ttl_s: float
    restored: bool

    @classmethod
    def from_proto(cls, msg: pb.SessionInfo) -> SessionInfo:
        """Decode the wire's SessionInfo."""
        return cls(
            session_id=msg.session_id,
            base_model=msg.base_model,
            lora_rank=msg.lora.rank if msg.HasField("lora") else None,
            step=msg.step,
            next_seq=msg.next_seq,
            calls_in_flight=msg.calls_in_flight,
            held_graphs=msg.held_graphs,
            created_at=msg.created_at,
            last_active_at=msg.last_active_at,
            session_ttl_s=msg.session_ttl_s,
            restored=msg.restored,
        )
