"""The `zeroconv` command. Each subcommand lives with the code it drives; this file only dispatches."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (subcommand module, relative to this package). Each module defines register_cli(subparsers).
_SUBCOMMAND_MODULES = (
    ".demo.cli",
    ".training.cli",
    ".annotators.cli",
    ".workflow_runner.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroconv", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name, __package__).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        print(f"zeroconv {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
