"""``trainer-server``: serve local Hugging Face causal LMs for service-mode training.

Examples::

    trainer-server                                   # the built-in tiny model, port 50051
    trainer-server --model llama=/models/llama-3.2-1b --model qwen=/models/qwen2.5-0.5b
    trainer-server --port 0 --device cuda --dtype bfloat16
    accelerate launch --num_processes 4 -m trainer_server --model llama=/models/llama --dtype bfloat16

SIGTERM and SIGINT stop it gracefully: no new calls, in-flight calls get the grace period,
then every open session is saved and is restored at the next start with the same
``--checkpoint-dir`` (its client reattaches by id). After a SIGKILL the next start names the
sessions that were lost; they resume from their last STATE checkpoint.
Under ``accelerate launch`` (or ``torchrun``) rank 0 serves gRPC and the other ranks run
every training operation on their shard of each batch (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path

from trainer_server._cluster import Cluster, ClusterFailure, init_cluster
from trainer_server._config import Limits, ServerConfig
from trainer_server._server import TrainerServer, run_worker
from trainer_server.core.errors import ServiceError
from trainer_server.frontends.grpc_auth import load_api_keys

__all__ = ["default_torch_threads", "main", "parse_args"]


def _model_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{p} is not a Hugging Face model directory (no config.json)")
    return name, p


def default_torch_threads(device_type: str, cpus: int, processes_per_node: int = 1) -> int | None:
    """Torch CPU threads when ``--torch-threads`` (and ``OMP_NUM_THREADS``) is not given; None leaves torch's choice.

    On a CPU device torch's choice is one OpenMP thread per core, and OpenMP threads busy-wait
    at every barrier. The server's event loop needs a core too, most of all when a client
    pipelines (it decodes call k+1 while call k computes): with every core taken by a spinning
    team, a step ran 2-3x slower, and a pipelined loop 1.3-2.3x slower than an awaited one
    (docs/PERFORMANCE.md, section 4). So leave one core of this process's share free.

    Args:
        device_type: the model device's type ("cpu", "cuda", ...).
        cpus: cores this process may run on (``os.sched_getaffinity``).
        processes_per_node: server processes sharing those cores (``LOCAL_WORLD_SIZE``).
    """
    if device_type != "cpu":
        return None
    return max(1, cpus // max(1, processes_per_node) - 1)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Parse the command line into a :class:`ServerConfig`."""
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[ServerConfig, int | None]:
    """The config, and ``--torch-threads`` (None when not given)."""
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
    for limit in dataclasses.fields(Limits):  # every limit, as --max-tokens-per-call etc.
        parser.add_argument(
            f"--{limit.name.replace('_', '-')}",
            type=int,
            default=limit.default,
            metavar="N",
            help=f"limit (default {limit.default}; see GetServerInfo)",
        )
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
        "--tinker-port",
        type=int,
        default=None,
        help="also serve the Tinker HTTP API (the official tinker SDK) on this port (0 picks one; see docs/TINKER.md)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch CPU threads (default on a CPU device: one fewer than the cores this process may use, at "
        "least 1, so the event loop keeps a core, unless OMP_NUM_THREADS is set; on a GPU: torch's choice). "
        "See docs/PERFORMANCE.md",
    )
    parser.add_argument(
        "--cluster-timeout",
        type=float,
        default=ServerConfig.cluster_timeout_s,
        metavar="SECONDS",
        help="multi-process only: how long a rank waits for a slow or lost peer before the server gives up",
    )
    parser.add_argument(
        "--keep-allocator-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds alone (by default they are raised so streamed tensors' "
        "buffers are reused instead of page-faulted in again: see trainer_proto.alloc)",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=ServerConfig.session_ttl_s,
        metavar="SECONDS",
        help="close a session after this long without a call or a client heartbeat (default %(default)s)",
    )
    parser.add_argument(
        "--held-graph-timeout",
        type=float,
        default=ServerConfig.held_graph_timeout_s,
        metavar="SECONDS",
        help="fail a custom-loss call whose gradient has not arrived after this long, freeing its graph "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-held-graph-bytes",
        type=int,
        default=ServerConfig.max_held_graph_bytes,
        metavar="N",
        help="server-wide budget for forward graphs held for a gradient (default %(default)s)",
    )
    parser.add_argument(
        "--session-save-timeout",
        type=float,
        default=ServerConfig.session_save_timeout_s,
        metavar="SECONDS",
        help="at SIGTERM, how long saving the open sessions may take (restored at the next start with the "
        "same --checkpoint-dir; 0 saves none; default %(default)s)",
    )
    parser.add_argument(
        "--no-restore-sessions",
        action="store_true",
        help="do not restore the sessions saved at the last graceful stop",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.cluster_timeout <= 0:
        parser.error("--cluster-timeout must be positive")
    rank = os.environ.get("RANK", "")
    where = f" [rank {rank}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")
    # A server's log is for people: no per-file progress bars from transformers.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        parser.error(f"model names must be unique, got {names}")
    try:
        config = ServerConfig(
            models=dict(args.model),
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            checkpoint_dir=args.checkpoint_dir,
            api_keys=load_api_keys(args.api_key_file),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            limits=Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}),
            cluster_timeout_s=args.cluster_timeout,
            heartbeat_s=min(ServerConfig.heartbeat_s, args.cluster_timeout / 3),
            tune_allocator=not args.keep_allocator_defaults,
            session_ttl_s=args.session_ttl,
            held_graph_timeout_s=args.held_graph_timeout,
            max_held_graph_bytes=args.max_held_graph_bytes,
            session_save_timeout_s=args.session_save_timeout,
            restore_sessions=not args.no_restore_sessions,
            tinker_port=args.tinker_port,
        )
    except ValueError as exc:  # a limit or setting out of range
        parser.error(str(exc))
    return config, args.torch_threads


def _set_torch_threads(explicit: int | None, device_type: str) -> None:
    import torch

    threads = explicit
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):  # an explicit OpenMP setting is the user's
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = default_torch_threads(device_type, _usable_cpus(), processes)
    if threads is not None:
        torch.set_num_threads(threads)
    logging.getLogger("trainer_server").info(
        "torch CPU threads: %d%s", torch.get_num_threads(), "" if explicit else " (default; --torch-threads to change)"
    )


async def serve(config: ServerConfig, cluster: Cluster | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then stop it gracefully."""
    server = TrainerServer(config, cluster=cluster)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except ServiceError as exc:  # e.g. another rank failed while the models loaded
        raise SystemExit(f"trainer-server: cannot start: {exc.message}") from None
    except OSError as exc:  # e.g. the port is taken
        raise SystemExit(f"trainer-server: cannot start: {exc}") from None
    print(f"trainer-server ready on {server.address}", flush=True)
    await stop.wait()
    await server.stop(save_sessions=True)  # restored at the next start with the same --checkpoint-dir


def main(argv: list[str] | None = None) -> None:
    """Console entry point: serve (rank 0, or a single process), or work for rank 0."""
    config, threads = _parse(argv)
    try:
        cluster = init_cluster(config.device, config.cluster_timeout_s)
    except ValueError as exc:
        raise SystemExit(f"trainer-server: {exc}") from None
    _set_torch_threads(threads, cluster.device.type)
    if cluster.rank == 0:
        asyncio.run(serve(config, cluster))
        return
    try:
        run_worker(config, cluster)
    except ClusterFailure as exc:
        logging.getLogger("trainer_server").error("rank %d stops: %s", cluster.rank, exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
