"""``trainer-server``: serve local Hugging Face causal LMs for service-mode training.

Examples::

    trainer-server                                   # the built-in tiny model, port 50051
    trainer-server --model llama=/models/llama-3.2-1b --model qwen=/models/qwen2.5-0.5b
    trainer-server --port 0 --device cuda --dtype bfloat16

SIGTERM and SIGINT stop it gracefully: no new calls, in-flight calls get the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from trainer_server._auth import load_api_keys
from trainer_server._config import Limits, ServerConfig
from trainer_server._server import TrainerServer

__all__ = ["main", "parse_args"]


def _model_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{p} is not a Hugging Face model directory (no config.json)")
    return name, p


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Parse the command line into a :class:`ServerConfig`."""
    parser = argparse.ArgumentParser(prog="trainer-server", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        default=[],
        metavar="NAME=PATH",
        help="serve the Hugging Face model in PATH as NAME (repeatable; default: the built-in tiny-llama)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=50051, help="port (0 picks a free one; default 50051)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where checkpoints are written (default: $TRAINER_HOME/checkpoints)",
    )
    parser.add_argument("--max-sessions", type=int, default=Limits.max_sessions)
    parser.add_argument("--max-tokens-per-call", type=int, default=Limits.max_tokens_per_call)
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="file of accepted API keys, one per line (TRAINER_API_KEYS, comma-separated, adds more); "
        "no keys means auth is off",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is often fastest on a busy CPU-only machine",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            parser.error("--torch-threads must be at least 1")
        import torch

        torch.set_num_threads(args.torch_threads)
    # A server's log is for people: no per-file progress bars from transformers.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        parser.error(f"model names must be unique, got {names}")
    return ServerConfig(
        models=dict(args.model),
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        checkpoint_dir=args.checkpoint_dir,
        api_keys=load_api_keys(args.api_key_file),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        limits=Limits(max_sessions=args.max_sessions, max_tokens_per_call=args.max_tokens_per_call),
    )


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then stop it gracefully."""
    server = TrainerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"trainer-server ready on {server.address}", flush=True)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
