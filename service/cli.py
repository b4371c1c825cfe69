"""The ``liptune`` command line: one entry point, one module per subcommand.

Each module under :mod:`service.commands` defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when its subcommand runs, so ``liptune --help`` stays
fast and ``liptune train`` does not load the web stack.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

COMMANDS = {
    "serve": "service.commands.serve",
    "worker": "service.commands.worker",
    "train": "service.commands.train",
    "demo": "service.commands.demo",
    "predict": "service.commands.predict",
}

HELPS = {
    "serve": "run the API, the web pages and local workers (the embedded default)",
    "worker": "run trials of every running study until stopped",
    "train": "run one trial from a YAML/JSON spec, without the service",
    "demo": "train and certify a small model on the digits data set",
    "predict": "label inputs with a registered model, with certified radii",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="liptune",
        description="Tune the accuracy / certified-robustness trade-off of 1-Lipschitz networks.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {importlib.metadata.version('liptune')}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subcommands = {
        name: subparsers.add_parser(name, help=HELPS[name], description=HELPS[name])
        for name in COMMANDS
    }
    return parser, subcommands


def main(argv: list[str] | None = None) -> int:
    parser, subcommands = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported to declare its arguments.
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    if chosen is not None:
        importlib.import_module(COMMANDS[chosen]).add_arguments(subcommands[chosen])
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
