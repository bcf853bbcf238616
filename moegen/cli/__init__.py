"""`moegen` command line: one module per command, registered in COMMANDS.

Each module defines add_subparser(subparsers) and keeps its heavy imports inside the command
function, so `moegen --help` stays fast. A MoegenError is one line and its exit_status: 2 for a
user's mistake, 1 for a MachineFault (disk full, I/O error); `moegen --debug CMD` shows the traceback.
"""
import argparse
import importlib
import sys

from moegen.errors import InputError, MoegenError

COMMANDS = ["moegen.cli.fixture", "moegen.cli.generate", "moegen.cli.ops", "moegen.cli.plan", "moegen.cli.bench",
            "moegen.cli.eval", "moegen.cli.lm_eval", "moegen.cli.results", "moegen.cli.quantize",
            "moegen.cli.peers"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moegen", description="High-throughput offline MoE inference.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its line")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        try:
            importlib.import_module(module).add_subparser(sub)
        except ModuleNotFoundError as e:    # a harness-only dependency (sqlalchemy, prefect): the rest still runs
            if (e.name or "moegen").startswith("moegen"):
                raise
            _unavailable(sub, module.rsplit(".", 1)[-1].replace("_", "-"), e.name)
    return parser


def _unavailable(sub, command: str, missing: str) -> None:
    """A command whose module needs a package this machine lacks: it says so when run."""
    def fail(args):
        raise InputError(f"this command needs the package {missing!r}, which is not installed here")
    sub.add_parser(command, help=f"(unavailable: needs {missing})", add_help=False).set_defaults(func=fail)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoegenError as e:
        if args.debug:
            raise
        print(f"moegen {args.command}: error: {e}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
