#!/usr/bin/env python
"""Service-mode training demo: a local training loop with its own loss drives a remote model.

What it shows, end to end, in about a minute on a laptop CPU:

1. A training server (``trainer_server.TrainerServer``) is started inside this asyncio program
   on a free port, serving the built-in ``tiny-llama`` model (a randomly initialised ~190k
   parameter Llama, built locally on first use under ``$TRAINER_HOME``; nothing is downloaded).
   With ``--server HOST:PORT`` the demo connects to a running ``trainer-server`` instead.
2. An ``AsyncServiceClient`` opens a LoRA training session (``--full`` for a full fine-tune) and
   fetches the model's tokenizer.
3. The task is one-digit arithmetic, e.g. ``"3 + 4 ="`` -> ``" 7"`` and ``"8 - 5 ="`` -> ``" 3"``:
   100 training problems and 10 held-out ones. Every step sends a minibatch of datums; the server
   returns per-token logprobs; the loss written in this file (a length-normalised NLL over the
   response tokens, averaged per sequence, not the server's built-in token-sum cross-entropy)
   runs locally with torch autograd; its gradient goes back on the same stream and the server
   finishes the backward pass. Steps are pipelined: the next step is submitted before the current
   one is awaited, so the server never waits for the client.
4. Before and after training the demo scores all ten candidate answers of every problem in one
   batched ``forward`` call and reports the probability of the correct answer and the argmax
   accuracy, on the training problems (memorisation) and on the held-out ones (generalisation).
5. A loss plot is written to ``--plot`` (default ``out/demo_loss.png``).

Run it::

    python scripts/demo.py                      # embedded server, LoRA rank 16
    python scripts/demo.py --full --steps 100   # full fine-tune
    trainer-server --port 50051 &               # or: train against a separate server
    python scripts/demo.py --server localhost:50051

The last stdout line is machine readable: ``first_loss=... last_loss=... ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer_client import (
    AdamParams,
    APIFuture,
    AsyncServiceClient,
    AsyncTrainingClient,
    Datum,
    ForwardBackwardOutput,
    OptimStepResult,
    ServerInfo,
    TrainerError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger("demo")

BASE_MODEL = "tiny-llama"
DEFAULT_STEPS = 250
QUICK_STEPS = 6
DEFAULT_LR_LORA = 5e-3
DEFAULT_LR_FULL = 2e-3
NUM_HELD_OUT = 10
CANDIDATES = tuple(range(10))
"""Every answer is a single digit, so each problem has exactly ten candidate answers."""


# ---- the task ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One arithmetic question with a one-digit answer."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        """The correct answer (0-9)."""
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def prompt(self) -> str:
        """The prompt text; the response is ``" <answer>"``.

        A short prompt keeps the operands close to the answer: the tiny model learns it about twice as
        fast as ``"Question: 3 + 4 = ? Answer:"``, and each step costs half as much.
        """
        return f"{self.a} {self.op} {self.b} ="

    def __str__(self) -> str:
        return f"{self.a} {self.op} {self.b}"


def make_problems(seed: int) -> tuple[list[Problem], list[Problem]]:
    """All one-digit additions and subtractions with one-digit, non-negative answers.

    Returns:
        ``(train, held_out)``: 100 training problems and 10 held-out ones, split by ``seed``.
    """
    problems = [Problem(a, "+", b) for a in range(10) for b in range(10) if a + b <= 9]
    problems += [Problem(a, "-", b) for a in range(10) for b in range(10) if a >= b]
    random.Random(seed).shuffle(problems)
    return problems[NUM_HELD_OUT:], problems[:NUM_HELD_OUT]


def make_datum(tokenizer: Tokenizer, problem: Problem, answer: int | None = None) -> Datum:
    """The datum for ``problem`` answered with ``answer`` (default: the correct one), EOS appended."""
    return Datum.from_text(tokenizer, problem.prompt, f" {problem.answer if answer is None else answer}")


# ---- the loss, written here and run locally on the server's logprobs ----------------------------


def length_normalised_nll(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, Mapping[str, float]]:
    """Mean over datums of the mean negative logprob of each datum's response tokens.

    Unlike a token-sum cross-entropy, every sequence counts equally whatever its length.

    Args:
        data: the minibatch (``weights`` is 1.0 on response tokens, 0.0 on prompt tokens).
        logprobs: per datum, the logprob of each target token (``requires_grad=True``).

    Returns:
        ``(loss, metrics)``; metrics are ``token_prob`` (mean probability of a response token)
        and ``answer_prob`` (mean probability of the whole response, answer and EOS).
    """
    per_seq: list[torch.Tensor] = []
    token_probs: list[torch.Tensor] = []
    answer_logprobs: list[torch.Tensor] = []
    for datum, lp in zip(data, logprobs, strict=True):
        weights = datum.weights.to(lp.dtype)
        per_seq.append(-(weights * lp).sum() / weights.sum().clamp_min(1e-8))
        with torch.no_grad():
            token_probs.append(lp[weights > 0].exp())
            answer_logprobs.append((weights * lp).sum())
    loss = torch.stack(per_seq).mean()
    metrics = {
        "token_prob": float(torch.cat(token_probs).mean()),
        "answer_prob": float(torch.stack(answer_logprobs).exp().mean()),
    }
    return loss, metrics


# ---- evaluation ----------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Candidate scores of a problem set: ``probs[i][c]`` is P(answer c | problem i), normalised over c."""

    problems: list[Problem]
    probs: torch.Tensor
    raw_answer_prob: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def correct_prob(self) -> float:
        """Mean model probability (unnormalised) of the full correct response."""
        return float(self.raw_answer_prob.mean())

    @property
    def accuracy(self) -> float:
        """Fraction of problems whose highest-scoring candidate is the correct answer."""
        answers = torch.tensor([p.answer for p in self.problems])
        return float((self.probs.argmax(dim=1) == answers).float().mean())


async def evaluate(tc: AsyncTrainingClient, tokenizer: Tokenizer, sets: Sequence[list[Problem]]) -> list[Evaluation]:
    """Score every candidate answer of every problem of ``sets`` in one batched ``forward`` call."""
    problems = [p for s in sets for p in s]
    data = [make_datum(tokenizer, p, c) for p in problems for c in CANDIDATES]
    out = await tc.forward(data)
    scores = torch.stack([(d.weights * lp).sum() for d, lp in zip(data, out.logprobs, strict=True)])
    scores = scores.view(len(problems), len(CANDIDATES))
    correct = torch.tensor([p.answer for p in problems])
    raw = scores.gather(1, correct.unsqueeze(1)).squeeze(1).exp()
    probs = scores.softmax(dim=1)
    evaluations, start = [], 0
    for s in sets:
        end = start + len(s)
        evaluations.append(Evaluation(problems=list(s), probs=probs[start:end], raw_answer_prob=raw[start:end]))
        start = end
    return evaluations


def report_evaluation(before: list[Evaluation], after: list[Evaluation], names: Sequence[str]) -> None:
    """Print accuracy and correct-answer probability before vs after, and a few examples."""
    print("\nEvaluation (each problem's 10 candidate answers scored with forward logprobs):")
    print(f"  {'set':<10} {'problems':>8}  {'P(correct) before':>17} -> after   {'accuracy before':>15} -> after")
    for name, b, a in zip(names, before, after, strict=True):
        print(
            f"  {name:<10} {len(b.problems):>8}  {b.correct_prob:>17.3f} -> {a.correct_prob:<6.3f}  "
            f"{b.accuracy:>15.0%} -> {a.accuracy:.0%}"
        )
    print("  examples (P(correct answer) among the 10 candidates, before -> after, and the argmax after):")
    for name, b, a in zip(names, before, after, strict=True):
        for i, problem in enumerate(a.problems[:4]):
            guess = int(a.probs[i].argmax())
            mark = "ok" if guess == problem.answer else "wrong"
            print(
                f"    [{name}] {problem!s:>5} = {problem.answer}:  {float(b.probs[i, problem.answer]):.2f} -> "
                f"{float(a.probs[i, problem.answer]):.2f}   model says {guess} ({mark})"
            )


# ---- training ------------------------------------------------------------------------------------


@dataclass
class History:
    """Per-step training record."""

    loss: list[float] = field(default_factory=list)
    answer_prob: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)


def minibatches(items: Sequence[Datum], batch_size: int, rng: random.Random) -> list[list[Datum]]:
    """One shuffled epoch of minibatches (the last, short one dropped when there is more than one)."""
    order = list(items)
    rng.shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


async def train(
    tc: AsyncTrainingClient,
    data: list[Datum],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int,
    progress: bool,
) -> History:
    """Run ``steps`` pipelined steps of forward_backward_custom + optim_step with our own loss.

    Step ``i + 1`` is submitted before step ``i`` is awaited: the server runs a session's calls
    in submission order, so this is correct, and it keeps the server busy while the client
    handles a result.
    """
    rng = random.Random(seed)
    pending: list[Datum] = []

    def next_batch() -> list[Datum]:
        nonlocal pending
        if not pending:
            pending = [d for batch in minibatches(data, batch_size, rng) for d in batch]
        batch, pending = pending[:batch_size], pending[batch_size:]
        return batch

    def submit(step: int) -> tuple[APIFuture[ForwardBackwardOutput], APIFuture[OptimStepResult]]:
        # A short warm-up, then cosine decay to 10% of the peak learning rate.
        warmup = max(1, min(10, steps // 10))
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        fb = tc.forward_backward_custom(next_batch(), length_normalised_nll)
        op = tc.optim_step(AdamParams(learning_rate=lr * scale, grad_clip_norm=1.0))
        return fb, op

    history = History()
    in_flight = [submit(0)]
    bar = tqdm(total=steps, desc="training", unit="step", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    try:
        with logging_redirect_tqdm():
            for step in range(steps):
                if step + 1 < steps:
                    in_flight.append(submit(step + 1))
                fb, op = in_flight[0]
                out = await fb
                result = await op
                in_flight.pop(0)
                history.loss.append(out.loss)
                history.answer_prob.append(out.metrics["answer_prob"])
                history.grad_norm.append(result.grad_norm)
                bar.set_postfix(loss=f"{out.loss:.3f}", p_answer=f"{out.metrics['answer_prob']:.2f}")
                bar.update()
                if step == 0 or (step + 1) % log_every == 0 or step + 1 == steps:
                    log.info(
                        "step %4d/%d  loss %.4f  P(response) %.3f  token prob %.3f  grad norm %.3f",
                        result.step,
                        steps,
                        out.loss,
                        out.metrics["answer_prob"],
                        out.metrics["token_prob"],
                        result.grad_norm,
                    )
    finally:
        bar.close()
        # Only left over when a step failed: cancel what has not run (nothing more is applied),
        # and collect the outcome of what already finished, so no error goes unretrieved.
        for future in [f for pair in in_flight for f in pair]:
            if not future.cancel():
                with contextlib.suppress(Exception):
                    await future
    return history


# ---- plot ----------------------------------------------------------------------------------------


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Centred moving average (no lag); the window shrinks at the ends. Default window: ~1/30 of the run."""
    if window is None:
        window = max(3, len(values) // 30)
    half = window // 2
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def write_plot(history: History, path: Path, title: str) -> None:
    """Save the loss curve (raw and smoothed) and the response probability as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    steps = list(range(1, len(history.loss) + 1))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, history.loss, color="tab:blue", alpha=0.35, linewidth=1, label="loss (per step)")
    ax.plot(steps, smooth(history.loss), color="tab:blue", linewidth=2, label="loss, smoothed")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("length-normalised NLL of the response")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    prob_ax = ax.twinx()
    prob_ax.plot(
        steps, smooth(history.answer_prob), color="tab:orange", linewidth=1.5, label="P(correct response), smoothed"
    )
    prob_ax.set_ylabel("P(correct response)")
    prob_ax.set_ylim(0, 1)
    lines = ax.get_lines() + prob_ax.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the program ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def server_address(args: argparse.Namespace) -> AsyncIterator[str]:
    """The address of ``--server``, or of a server started here for the duration of the block."""
    if args.server:
        yield args.server
        return
    # Quiet the server's third-party stack: progress bars and deprecation chatter.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\..*)?")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    from trainer_server import ServerConfig, TrainerServer

    started = time.monotonic()
    async with TrainerServer(ServerConfig(port=0)) as server:
        log.info("embedded server ready on %s in %.1f s", server.address, time.monotonic() - started)
        yield server.address


def describe_server(info: ServerInfo) -> str:
    """One line about the server."""
    models = ", ".join(f"{m.name} ({m.architecture}, {m.num_parameters / 1e6:.2f}M params)" for m in info.models)
    return f"server {info.version} on {', '.join(info.devices) or '?'}: {models}"


async def run(args: argparse.Namespace) -> None:
    """The demo proper (see the module docstring)."""
    lr = args.lr if args.lr is not None else (DEFAULT_LR_FULL if args.full else DEFAULT_LR_LORA)
    mode = "full fine-tune" if args.full else f"LoRA rank {args.lora_rank}"
    async with server_address(args) as address, AsyncServiceClient(address) as service:
        info = await service.get_server_info()
        print(describe_server(info))
        if args.base_model not in {m.name for m in info.models}:
            served = ", ".join(m.name for m in info.models)
            raise ValueError(f"the server does not serve {args.base_model!r} (it serves: {served})")
        tc = await service.create_training_client(
            base_model=args.base_model,
            lora_rank=None if args.full else args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_target_modules=[m for m in args.lora_targets.split(",") if m.strip()] or None,
            seed=args.seed,
        )
        try:
            print(f"session {tc.session_id}: {mode}, {tc.trainable_parameters:,} trainable parameters")
            tokenizer: Tokenizer = await tc.get_tokenizer()
            train_set, held_out = make_problems(args.seed)
            data = [make_datum(tokenizer, p) for p in train_set]
            example = data[0]
            print(
                f"task: {len(train_set)} training problems, {len(held_out)} held out; e.g. "
                f"{train_set[0].prompt!r} -> ' {train_set[0].answer}' "
                f"({len(example)} tokens, {int(example.weights.sum())} of them scored)"
            )
            before = await evaluate(tc, tokenizer, [train_set, held_out])
            print(
                f"training {args.steps} steps, batch {args.batch_size}, peak lr {lr:g} "
                "(loss: length-normalised NLL written in scripts/demo.py)"
            )
            started = time.monotonic()
            history = await train(
                tc,
                data,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=lr,
                seed=args.seed,
                log_every=args.log_every or max(1, args.steps // 10),
                progress=not args.no_progress,
            )
            elapsed = time.monotonic() - started
            after = await evaluate(tc, tokenizer, [train_set, held_out])
        finally:
            with contextlib.suppress(TrainerError, RuntimeError):
                await tc.close()

    n = min(10, max(1, len(history.loss) // 2))
    first_mean = sum(history.loss[:n]) / n
    last_mean = sum(history.loss[-n:]) / n
    print(f"\ntrained {len(history.loss)} steps in {elapsed:.1f} s ({len(history.loss) / elapsed:.1f} steps/s)")
    print(f"loss: first {history.loss[0]:.4f} -> last {history.loss[-1]:.4f}")
    print(f"      mean of first {n} steps {first_mean:.4f} -> mean of last {n} steps {last_mean:.4f}")
    report_evaluation(before, after, ["train", "held-out"])
    write_plot(history, args.plot, f"{BASE_MODEL} one-digit arithmetic, {mode}, custom loss via gRPC")
    print(f"\nloss plot: {args.plot}")
    print(
        f"first_loss={history.loss[0]:.6f} last_loss={history.loss[-1]:.6f} "
        f"first_mean={first_mean:.6f} last_mean={last_mean:.6f} steps={len(history.loss)} "
        f"train_accuracy={after[0].accuracy:.4f} held_out_accuracy={after[1].accuracy:.4f}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n", 1)[0],
        epilog="Set TRAINER_HOME to choose where the built-in model is cached (default ~/.cache/trainer-service).",
    )
    parser.add_argument(
        "--server", metavar="HOST:PORT", help="use a running trainer-server instead of starting one in-process"
    )
    parser.add_argument("--base-model", default=BASE_MODEL, help=f"model to train (default {BASE_MODEL})")
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--lora-alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/rank (default: rank)"
    )
    parser.add_argument(
        "--lora-targets",
        default="",
        metavar="NAMES",
        help="comma-separated module names LoRA adapts (default: the server's, every linear layer with lm_head)",
    )
    parser.add_argument(
        "--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help=f"a few steps ({QUICK_STEPS}), for smoke tests")
    parser.add_argument("--batch-size", type=int, default=32, help="datums per step (default 32)")
    parser.add_argument(
        "--lr", type=float, help=f"peak learning rate (default {DEFAULT_LR_LORA:g} for LoRA, {DEFAULT_LR_FULL:g} full)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the data split, batch order and LoRA init")
    parser.add_argument("--plot", type=Path, default=Path("out/demo_loss.png"), help="loss plot PNG path")
    parser.add_argument("--log-every", type=int, default=0, help="log the loss every N steps (default: steps/10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the log lines remain)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads in this process (default 1: fastest for the tiny model, and robust on busy machines)",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    for name in ("steps", "batch_size", "lora_rank", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "accelerate", "matplotlib", "PIL", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except TrainerError as exc:
        log.error("demo failed: %s: %s", type(exc).__name__, exc)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        log.error("demo failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    log.info("done in %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
