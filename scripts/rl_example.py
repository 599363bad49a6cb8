#!/usr/bin/env python
"""Reinforcement learning over gRPC: sample from the current policy, score locally, train with a policy-gradient loss.

What it shows, end to end, in about a minute on a laptop CPU:

1. A training server (``trainer_server.TrainerServer``) is started inside this asyncio program on
   a free port, serving the built-in ``tiny-llama`` model (a randomly initialised ~190k parameter
   Llama, built locally on first use under ``$TRAINER_HOME``; nothing is downloaded). With
   ``--server HOST:PORT`` the example connects to a running ``trainer-server`` instead.
2. The task: one-digit addition, ``"3 + 4 = "`` -> ``"7"``. The reward is computed here, from
   the sampled tokens alone: the completion is decoded and its leading number ``pred`` is
   compared with the answer, ``reward = max(0, 1 - |pred - answer| / 9)`` (1 for the exact
   answer, partial credit for a near miss, 0 for no number at all). The random model knows
   nothing, not even that an answer is a digit (about 2% of its first samples are). In a minute
   the mean reward rises from about 0.02 to about 0.75: the policy learns to answer with a
   digit (a random digit already earns about 0.6), then to favour digits near the typical
   answer; exact answers rise from about 1% to 10-25%. What it does not do in a minute is learn
   to add: a tiny policy trained by policy gradient alone soon settles on a safe guess and
   stops exploring (the log shows the number of datums with a non-zero advantage fall to 0).
3. Each step samples ``--group-size`` completions of each of ``--prompts`` problems from the
   session's *current* weights (``sample``: KV-cached, seeded, streamed back with the
   sampler's logprobs, which are the model's own at temperature 1, so samples are drawn at
   temperature 1 to keep the importance ratios exact), scores them, and turns rewards into
   group-relative advantages (reward
   minus the mean reward of the samples of the same prompt, as in GRPO). Each sample becomes
   one RL datum (see :func:`rl_datum`) for a built-in policy-gradient loss,
   ``importance_sampling`` (default) or ``ppo``, computed on the server.
4. The loop is pipelined. Right after the batch of step k is known, the client submits
   ``forward_backward`` and ``optim_step`` of step k *and* the sampling calls of step k+1, and
   only then awaits the results of step k-1. The server runs a session's calls in the order
   they were submitted, so the samples of step k+1 come from the weights after step k (fully
   on-policy) and the server never waits for a client round trip between training and
   sampling.
5. A progress bar shows the mean reward; a reward plot is written to ``--plot`` (default
   ``out/rl_reward.png``).

Run it::

    python scripts/rl_example.py                     # embedded server, full fine-tune
    python scripts/rl_example.py --loss ppo          # PPO's clipped objective instead
    trainer-server --port 50051 &                    # or: against a separate server
    python scripts/rl_example.py --server localhost:50051

The last stdout line is machine readable: ``first_reward=... last_reward=... ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import re
import sys
import time
import warnings
from collections.abc import AsyncIterator, Sequence
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
    SampleOutput,
    SamplingParams,
    TrainerError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger("rl_example")

BASE_MODEL = "tiny-llama"
DEFAULT_STEPS = 60
QUICK_STEPS = 25
DEFAULT_LR = 1e-2
LOSSES = ("importance_sampling", "ppo")


# ---- the task and its reward ---------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """``a + b`` with a one-digit answer."""

    a: int
    b: int

    @property
    def answer(self) -> int:
        """The correct answer (0-9)."""
        return self.a + self.b

    @property
    def prompt(self) -> str:
        """The prompt text; it ends with a space, so the answer's first token is a digit."""
        return f"{self.a} + {self.b} = "


def make_problems() -> list[Problem]:
    """All 55 one-digit additions whose sum is one digit."""
    return [Problem(a, b) for a in range(10) for b in range(10) if a + b <= 9]


_LEADING_NUMBER = re.compile(r"\s*(\d+)")


def score(text: str, answer: int) -> tuple[float, int | None]:
    """Reward of a decoded completion: ``max(0, 1 - |pred - answer| / 9)`` for its leading number.

    Returns:
        ``(reward, pred)``; ``pred`` is None (and the reward 0) when the text does not start
        with a number.
    """
    match = _LEADING_NUMBER.match(text)
    if match is None:
        return 0.0, None
    pred = int(match.group(1))
    return max(0.0, 1.0 - abs(pred - answer) / 9.0), pred


def eos_ids(tokenizer: Tokenizer) -> set[int]:
    """The model's end-of-sequence token id (read from its tokenizer config by get_tokenizer)."""
    return {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()


# ---- RL datums ------------------------------------------------------------------------------------


def rl_datum(prompt: Sequence[int], completion: Sequence[int], logprobs: torch.Tensor, advantage: float) -> Datum:
    """One sampled completion as a datum for ``importance_sampling`` / ``ppo``.

    The sequence ``prompt + completion`` is shifted by one: ``model_input`` is all but its
    last token and ``target_tokens`` all but its first, so target ``i`` is the token that
    follows input ``i``. Per target, aligned with ``target_tokens``:

    - ``weights``: 0 on the ``len(prompt) - 1`` prompt targets, 1 on the completion's;
    - ``logprobs``: the sampler's logprob of each completion token (0 on prompt targets);
    - ``advantages``: the sample's advantage on every completion token (0 on prompt targets).
    """
    n_prompt = len(prompt) - 1
    n = len(completion)
    return Datum.from_tokens(
        prompt,
        completion,
        logprobs=torch.cat([torch.zeros(n_prompt), logprobs.float()]),
        advantages=torch.cat([torch.zeros(n_prompt), torch.full((n,), advantage)]),
    )


@dataclass
class Scored:
    """A step's samples, scored."""

    datums: list[Datum]
    reward: float
    exact: float
    numeric: float


def score_groups(
    tokenizer: Tokenizer,
    problems: Sequence[Problem],
    prompts: Sequence[list[int]],
    outputs: Sequence[SampleOutput],
    eos: set[int],
) -> Scored:
    """Rewards, group-relative advantages and datums of one step's samples.

    Groups whose samples all earned the same reward have zero advantage everywhere and add no
    gradient, so they are left out of the batch.
    """
    datums: list[Datum] = []
    rewards: list[float] = []
    exact: list[bool] = []
    numeric: list[bool] = []
    for problem, prompt, out in zip(problems, prompts, outputs, strict=True):
        group = []
        for seq in out.sequences:
            text = str(tokenizer.decode([t for t in seq.tokens if t not in eos]))
            reward, pred = score(text, problem.answer)
            group.append(reward)
            exact.append(pred == problem.answer)
            numeric.append(pred is not None)
        rewards += group
        mean = sum(group) / len(group)
        if max(group) - min(group) < 1e-9:
            continue
        datums += [rl_datum(prompt, s.tokens, s.logprobs, r - mean) for s, r in zip(out.sequences, group, strict=True)]
    n = len(rewards)
    return Scored(datums, sum(rewards) / n, sum(exact) / n, sum(numeric) / n)


# ---- training -------------------------------------------------------------------------------------


@dataclass
class History:
    """Per-step record of the samples' quality and the training calls."""

    reward: list[float] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)
    numeric: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)


@dataclass
class Config:
    """Knobs of the RL loop."""

    steps: int
    prompts: int
    group_size: int
    max_tokens: int
    lr: float
    loss: str
    seed: int
    log_every: int
    progress: bool


Sampling = tuple[list[Problem], list[APIFuture[SampleOutput]]]
Training = tuple[APIFuture[ForwardBackwardOutput], APIFuture[OptimStepResult]]


async def train(tc: AsyncTrainingClient, tokenizer: Tokenizer, cfg: Config) -> History:
    """The pipelined RL loop (see the module docstring, point 4).

    Per step k: await step k's samples, score them, then submit step k's ``forward_backward``
    and ``optim_step`` and step k+1's ``sample`` calls, and only then await step k-1's training
    results. The server runs the session's calls in submission order: the samples of step k+1
    see the weights after step k, and the server goes straight from training to sampling.
    """
    rng = random.Random(cfg.seed)
    problems = make_problems()
    eos = eos_ids(tokenizer)
    encoded = {p: tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems}
    loss_config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2} if cfg.loss == "ppo" else {}
    adam = AdamParams(learning_rate=cfg.lr, grad_clip_norm=1.0)

    def submit_sampling(step: int) -> Sampling:
        batch = rng.sample(problems, cfg.prompts)
        futures = [
            tc.sample(
                encoded[p],
                cfg.group_size,
                SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, seed=(cfg.seed * 100_003 + step) * 101 + i),
            )
            for i, p in enumerate(batch)
        ]
        return batch, futures

    history = History()

    async def record(training: Training | None) -> None:
        if training is None:  # every group's samples earned equal rewards: nothing to train on
            history.loss.append(float("nan"))
            history.grad_norm.append(float("nan"))
            return
        out, result = await training[0], await training[1]
        history.loss.append(out.loss)
        history.grad_norm.append(result.grad_norm)

    bar = tqdm(total=cfg.steps, desc="RL", unit="step", disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5)
    sampling = submit_sampling(0)
    previous: Training | None = None
    current: Training | None = None
    try:
        with logging_redirect_tqdm():
            for step in range(cfg.steps):
                batch, futures = sampling
                outputs = [await f for f in futures]
                scored = score_groups(tokenizer, batch, [encoded[p] for p in batch], outputs, eos)
                current = None
                if scored.datums:
                    current = (tc.forward_backward(scored.datums, cfg.loss, loss_config), tc.optim_step(adam))
                if step + 1 < cfg.steps:
                    sampling = submit_sampling(step + 1)
                if step > 0:  # the server is already busy with this step and the next samples
                    await record(previous)
                previous = current
                history.reward.append(scored.reward)
                history.exact.append(scored.exact)
                history.numeric.append(scored.numeric)
                bar.set_postfix(reward=f"{scored.reward:.3f}", exact=f"{scored.exact:.2f}")
                bar.update()
                if step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    log.info(
                        "step %3d/%d  mean reward %.3f  exact %.2f  answered with a number %.2f  (%d datums trained)",
                        step + 1,
                        cfg.steps,
                        scored.reward,
                        scored.exact,
                        scored.numeric,
                        len(scored.datums),
                    )
            await record(previous)
    except BaseException:
        for fut in [*sampling[1], *(previous or ()), *(current or ())]:
            fut.cancel()  # no-ops for the calls that already finished
        raise
    finally:
        bar.close()
    return history


async def greedy_accuracy(tc: AsyncTrainingClient, tokenizer: Tokenizer, max_tokens: int) -> tuple[float, float]:
    """Greedy (temperature 0) exact-match accuracy and mean reward over all 55 problems."""
    problems = make_problems()
    eos = eos_ids(tokenizer)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    futures = [tc.sample(tokenizer.encode(p.prompt, add_special_tokens=False), 1, params) for p in problems]
    outputs = [await f for f in futures]
    rewards, exact = [], []
    for p, out in zip(problems, outputs, strict=True):
        text = str(tokenizer.decode([t for t in out.sequences[0].tokens if t not in eos]))
        reward, pred = score(text, p.answer)
        rewards.append(reward)
        exact.append(pred == p.answer)
    return sum(exact) / len(exact), sum(rewards) / len(rewards)


# ---- plot ----------------------------------------------------------------------------------------


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Centred moving average; the window shrinks at the ends. Default window: ~1/10 of the run."""
    if window is None:
        window = max(3, len(values) // 10)
    half = window // 2
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def write_plot(history: History, path: Path, title: str) -> None:
    """Save mean reward per step (raw and smoothed) and the exact-answer rate as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    steps = list(range(1, len(history.reward) + 1))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, history.reward, color="tab:green", alpha=0.35, linewidth=1, label="mean reward (per step)")
    ax.plot(steps, smooth(history.reward), color="tab:green", linewidth=2, label="mean reward, smoothed")
    ax.plot(
        steps,
        smooth(history.numeric),
        color="tab:gray",
        linewidth=1.2,
        linestyle="--",
        label="answers with a number, smoothed",
    )
    ax.plot(steps, smooth(history.exact), color="tab:purple", linewidth=1.5, label="exact answer, smoothed")
    ax.set_xlabel("step (samples drawn from the weights after the previous step)")
    ax.set_ylabel("mean over the step's samples")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center right")
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
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\..*)?")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    from trainer_server import ServerConfig, TrainerServer

    started = time.monotonic()
    async with TrainerServer(ServerConfig(port=0)) as server:
        log.info("embedded server ready on %s in %.1f s", server.address, time.monotonic() - started)
        yield server.address


def window_mean(values: Sequence[float], first: bool, n: int) -> float:
    """Mean of the first or last ``n`` values."""
    part = values[:n] if first else values[-n:]
    return sum(part) / len(part)


async def run(args: argparse.Namespace) -> None:
    """The example proper (see the module docstring)."""
    mode = "full fine-tune" if args.lora_rank is None else f"LoRA rank {args.lora_rank}"
    async with server_address(args) as address, AsyncServiceClient(address) as service:
        info = await service.get_server_info()
        if args.base_model not in {m.name for m in info.models}:
            raise SystemExit(f"error: the server does not serve {args.base_model!r} (it serves {info.models!r})")
        if "sample" not in info.capabilities or args.loss not in info.loss_functions:
            raise SystemExit(f"error: the server cannot sample or has no {args.loss!r} loss ({info.loss_functions})")
        print(f"server {info.version} on {', '.join(info.devices)}; model {args.base_model}, {mode}")
        tc = await service.create_training_client(
            base_model=args.base_model,
            lora_rank=args.lora_rank,
            lora_target_modules=[m for m in args.lora_targets.split(",") if m.strip()] or None,
            seed=args.seed,
        )
        try:
            tokenizer: Tokenizer = await tc.get_tokenizer()
            before = await greedy_accuracy(tc, tokenizer, args.max_tokens)
            print(
                f"task: 55 one-digit additions, e.g. {make_problems()[23].prompt!r} -> "
                f"'{make_problems()[23].answer}'; reward max(0, 1 - |pred - answer| / 9)"
            )
            print(
                f"RL: {args.steps} steps x {args.prompts} prompts x {args.group_size} samples, loss {args.loss}, "
                f"lr {args.lr:g}; greedy accuracy before {before[0]:.0%}"
            )
            cfg = Config(
                steps=args.steps,
                prompts=args.prompts,
                group_size=args.group_size,
                max_tokens=args.max_tokens,
                lr=args.lr,
                loss=args.loss,
                seed=args.seed,
                log_every=args.log_every or max(1, args.steps // 10),
                progress=not args.no_progress,
            )
            started = time.monotonic()
            history = await train(tc, tokenizer, cfg)
            elapsed = time.monotonic() - started
            after = await greedy_accuracy(tc, tokenizer, args.max_tokens)
        finally:
            with contextlib.suppress(TrainerError, RuntimeError):
                await tc.close()

    n = max(1, min(10, len(history.reward) // 5))
    first, last = window_mean(history.reward, True, n), window_mean(history.reward, False, n)
    first_exact, last_exact = window_mean(history.exact, True, n), window_mean(history.exact, False, n)
    print(f"\n{len(history.reward)} RL steps in {elapsed:.1f} s ({len(history.reward) / elapsed:.2f} steps/s)")
    print(f"mean reward of the first {n} steps {first:.3f} -> of the last {n} steps {last:.3f}")
    print(f"exact answers {first_exact:.1%} -> {last_exact:.1%}")
    print(
        f"greedy over all 55 problems: accuracy {before[0]:.0%} -> {after[0]:.0%}, "
        f"mean reward {before[1]:.3f} -> {after[1]:.3f}"
    )
    write_plot(history, args.plot, f"{args.base_model} RL on one-digit addition, {args.loss}, {mode}")
    print(f"reward plot: {args.plot}")
    print(
        f"first_reward={first:.6f} last_reward={last:.6f} first_exact={first_exact:.6f} last_exact={last_exact:.6f} "
        f"greedy_accuracy_before={before[0]:.6f} greedy_accuracy_after={after[0]:.6f} steps={len(history.reward)} "
        f"seconds={elapsed:.1f}"
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
    parser.add_argument(
        "--lora-rank", type=int, default=None, help="train a LoRA adapter of this rank (default: full fine-tune)"
    )
    parser.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
        metavar="NAMES",
        help="with --lora-rank: comma-separated modules to adapt (default: every linear layer, lm_head included)",
    )
    parser.add_argument("--loss", choices=LOSSES, default="importance_sampling", help="built-in policy-gradient loss")
    parser.add_argument("--steps", type=int, help=f"RL steps (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a short run ({QUICK_STEPS} steps), for tests")
    parser.add_argument("--prompts", type=int, default=16, help="problems per step (default 16)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per problem (default 8)")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens sampled per answer (default 1)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"AdamW learning rate (default {DEFAULT_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="seeds the problem order, the sampler and a LoRA init")
    parser.add_argument("--plot", type=Path, default=Path("out/rl_reward.png"), help="reward plot PNG path")
    parser.add_argument("--log-every", type=int, default=0, help="log the reward every N steps (default: steps/10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the log lines remain)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in this process (default 1)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    for name in ("steps", "prompts", "group_size", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.prompts > len(make_problems()):
        parser.error(f"--prompts must be at most {len(make_problems())}")
    if args.group_size < 2:
        parser.error("--group-size must be at least 2 (advantages are relative to the group)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; return the process exit code."""
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
        log.error("rl example failed: %s: %s", type(exc).__name__, exc)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        log.error("rl example failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    log.info("done in %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
