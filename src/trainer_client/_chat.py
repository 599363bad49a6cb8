"""Chat data: a :class:`~trainer_client.Datum` from chat messages, through the model's chat template.

The conversation is rendered once with the tokenizer's own template (``apply_chat_template``),
so the datum's tokens are exactly those ``apply_chat_template(messages, tokenize=True)`` gives.
Which tokens an assistant message produced is read off the template itself, for any family:
rendering the messages before it with the generation prompt must give a prefix of rendering
them with it, and the text in between is the assistant's turn (its content and end-of-turn
token, e.g. ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``</s>``; whitespace the template
puts after the end-of-turn token is not trained). A token that straddles a turn boundary counts
as prompt. Needs a Hugging Face tokenizer (``transformers`` installed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from trainer_client._types import Datum
else:
    from trainer_client._lazy import torch

__all__ = ["TRAIN_ON", "datum_from_messages"]

TRAIN_ON = ("all_assistant_messages", "last_assistant_message", "all_tokens")
"""What :func:`datum_from_messages` puts weight 1.0 on (as the Tinker cookbook's ``TrainOnWhat``)."""

_NO_LIMIT = 10**9  # transformers' model_max_length when the tokenizer does not know it is about 1e30


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], which: list[int], text: str
) -> list[tuple[int, int]]:
    """Character spans of the chosen assistant turns in ``text`` (the whole conversation rendered)."""
    spans = []
    for i in which:
        if i == 0:
            raise ValueError("the first message is the assistant's: there is no prompt before it to condition on")
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (end.startswith(start) and text.startswith(end)):
            raise ValueError(
                f"the chat template does not render message {i} as a continuation of the messages before it "
                "(it rewrites earlier turns), so its tokens cannot be told apart; use "
                "train_on='last_assistant_message' or build the datum with Datum.from_tokens"
            )
        spans.append((len(start), len(end)))
    return spans


def datum_from_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    train_on: str = "all_assistant_messages",
    max_length: int | None = None,
) -> Datum:
    """Render ``messages`` with the model's chat template; weight 1.0 on assistant tokens only.

    Args:
        tokenizer: the session's Hugging Face tokenizer (``await training_client.get_tokenizer()``).
        messages: ``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]``.
        train_on: "all_assistant_messages" (default), "last_assistant_message" (earlier turns are
            context only) or "all_tokens".
        max_length: keep at most this many input tokens (the rest is cut off the end); default
            the tokenizer's ``model_max_length`` (the model's length for our models).

    Returns:
        The datum; its tokens (inputs plus the last target) equal
        ``apply_chat_template(messages, tokenize=True)``'s.

    Raises:
        TypeError: the tokenizer is not a Hugging Face one (install ``transformers``).
        ValueError: an unknown ``train_on``, no chat template, no assistant message, or nothing
            left to train on after truncation.
    """
    from trainer_client._types import Datum

    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}; got {train_on!r}")
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(
            "chat datums need a Hugging Face tokenizer: install transformers (pip install transformers), "
            "then get_tokenizer() returns one"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template (no chat_template.jinja in its directory)")
    msgs = [dict(m) for m in messages]
    assistant = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    if not assistant:
        raise ValueError("no assistant message to train on")
    text = _render(tokenizer, msgs, generation_prompt=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids: list[int] = list(encoded["input_ids"])
    if train_on == "all_tokens":
        weights = [1.0] * len(ids)
    else:
        chosen = assistant[-1:] if train_on == "last_assistant_message" else assistant
        weights = [0.0] * len(ids)
        offsets = encoded["offset_mapping"]
        for start, end in _assistant_spans(tokenizer, msgs, chosen, text):
            inside = [j for j, (a, b) in enumerate(offsets) if start <= a < b <= end]
            while inside and not tokenizer.decode([ids[inside[-1]]]).strip():
                inside.pop()  # the newline a template writes after the end-of-turn token
            for j in inside:
                weights[j] = 1.0
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        max_length = limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None
    if max_length is not None:
        ids, weights = ids[: max_length + 1], weights[: max_length + 1]
    if sum(weights[1:]) == 0:
        raise ValueError(
            f"nothing to train on: the trained tokens start after max_length={max_length}"
            if max_length is not None and len(ids) == max_length + 1
            else "nothing to train on: the assistant messages rendered to no tokens"
        )
    tokens = torch.tensor(ids, dtype=torch.int64)
    return Datum(
        model_input=tokens[:-1],
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": torch.tensor(weights[1:], dtype=torch.float32)},
    )
