"""``trainer-client``: look at a server and manage its checkpoints from the shell.

Examples::

    trainer-client --server localhost:50051 info
    trainer-client checkpoints
    trainer-client download step-100 out/step-100     # resumable, sha256-checked, progress bar
    trainer-client delete step-100

The API key comes from ``--api-key`` or ``$TRAINER_API_KEY``; ``--root-certificates`` (PEM)
or ``--tls`` turns on TLS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainer_client._errors import TrainerError
from trainer_client._sync_client import ServiceClient

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer-client", description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="localhost:50051", help="HOST:PORT (default localhost:50051)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (1 on a server error)."""
    args = _parser().parse_args(argv)
    roots = args.root_certificates.read_bytes() if args.root_certificates else None
    try:
        with ServiceClient(args.server, api_key=args.api_key, tls=args.tls, root_certificates=roots) as client:
            if args.command == "info":
                info = client.get_server_info()
                print(json.dumps({**vars(info), "models": [vars(m) for m in info.models]}, indent=2))
            elif args.command == "checkpoints":
                for c in client.list_checkpoints():
                    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created_at))
                    print(f"{c.name}\t{c.kind}\tstep {c.step}\t{c.total_bytes} bytes\t{c.dtype}\t{created}")
            elif args.command == "download":
                out = client.download_checkpoint(args.name, args.out_dir, progress=not args.quiet)
                print(f"downloaded {args.name} to {out}")
            else:
                client.delete_checkpoint(args.name)
                print(f"deleted {args.name}")
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
