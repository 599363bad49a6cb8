"""``trainer-client``: look at a server and manage its checkpoints from the shell.

Examples::

    trainer-client --server localhost:50051 info
    trainer-client checkpoints
    trainer-client download step-100 out/step-100     # resumable, sha256-checked, progress bar
    trainer-client delete step-100
    trainer-client sessions                           # this API key's open sessions
    trainer-client sessions close s-1f0c...           # close one a crashed client left open

The API key comes from ``--api-key`` or ``$TRAINER_API_KEY``; ``--root-certificates`` (PEM)
or ``--tls`` turns on TLS. The server address may also be ``HOST`` (port 50051) or
``http(s)://HOST:PORT``. Commands answer in well under a second: nothing on their path
imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainer_client._errors import TrainerError, UnavailableError
from trainer_client._sync_client import ServiceClient
from trainer_client._types import CheckpointInfo, SessionInfo

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer-client", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        default=None,
        help="HOST:PORT, HOST or http(s)://HOST:PORT (default: $TRAINER_SERVER, else localhost:50051)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the server to come up (e.g. right after starting it)",
    )
    parser.add_argument("--api-key", default=None, help="API key (default: $TRAINER_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    parser.add_argument("--root-certificates", type=Path, default=None, help="PEM roots for TLS")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the server's version, models, devices and limits (JSON)")
    sub.add_parser("checkpoints", help="list checkpoints")
    download = sub.add_parser("download", help="download a checkpoint (resumes an interrupted download)")
    download.add_argument("name")
    download.add_argument("out_dir", type=Path)
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    delete = sub.add_parser("delete", help="delete a checkpoint")
    delete.add_argument("name")
    sessions = sub.add_parser("sessions", help="list this API key's open sessions, or close one")
    sessions.add_argument("action", nargs="?", choices=["list", "close"], default="list")
    sessions.add_argument("session_id", nargs="?", help="the session to close")
    return parser


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _checkpoint_table(checkpoints: list[CheckpointInfo]) -> str:
    """An aligned table with a header row, or a sentence when there is nothing to list."""
    if not checkpoints:
        return "no checkpoints"
    rows = [("NAME", "KIND", "STEP", "SIZE", "DTYPE", "BASE", "CREATED")]
    for c in checkpoints:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created_at))
        rows.append((c.name, c.kind, str(c.step), _size(c.total_bytes), c.dtype, c.base_checkpoint or "-", created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _session_table(sessions: list[SessionInfo]) -> str:
    """An aligned table of open sessions with a header row, or a sentence when there are none."""
    if not sessions:
        return "no open sessions"
    rows = [("SESSION", "MODEL", "MODE", "STEP", "NEXT SEQ", "IN FLIGHT", "IDLE", "CREATED")]
    now = time.time()
    for s in sessions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at))
        mode = "full" if s.lora_rank is None else f"lora r{s.lora_rank}"
        idle = f"{max(0.0, now - s.last_active_at):.0f}s"
        rows.append(
            (s.session_id, s.base_model, mode, str(s.step), str(s.next_seq), str(s.calls_in_flight), idle, created)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _wait_for_server(client: ServiceClient, wait_s: float) -> None:
    """Poll until the server answers with its models loaded, for up to ``wait_s`` seconds.

    A starting server listens (and answers GetServerInfo with no models) before its models are
    loaded, so an answer alone is not enough.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if client.get_server_info().models:
                return
        except UnavailableError:
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise UnavailableError(f"the server at {client.target} answers but has loaded no model after {wait_s} s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (1 on a server error)."""
    args = _parser().parse_args(argv)
    roots = args.root_certificates.read_bytes() if args.root_certificates else None
    try:
        with ServiceClient(args.server, api_key=args.api_key, tls=args.tls, root_certificates=roots) as client:
            if args.wait > 0:
                _wait_for_server(client, args.wait)
            if args.command == "info":
                info = client.get_server_info()
                print(json.dumps({**vars(info), "models": [vars(m) for m in info.models]}, indent=2))
            elif args.command == "checkpoints":
                print(_checkpoint_table(client.list_checkpoints()))
            elif args.command == "download":
                out = client.download_checkpoint(args.name, args.out_dir, progress=not args.quiet)
                print(f"downloaded {args.name} to {out}")
            elif args.command == "sessions":
                if args.action == "close":
                    if not args.session_id:
                        raise ValueError("sessions close needs the session's id (see: trainer-client sessions)")
                    client.end_session(args.session_id)
                    print(f"closed {args.session_id}")
                else:
                    print(_session_table(client.list_sessions()))
            else:
                client.delete_checkpoint(args.name)
                print(f"deleted {args.name}")
    except (TrainerError, ValueError, OSError) as exc:  # ValueError: a bad --server address
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
