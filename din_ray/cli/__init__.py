"""`din-ray` command line: one subcommand per stage (prepare, train, evaluate, ...).

Each stage's module owns its arguments through `register(subparsers)`, which adds a parser whose
`func(args) -> int` runs it; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "din_ray.cli.prepare",
    "din_ray.cli.train",
    "din_ray.cli.predict",
    "din_ray.cli.reproduce",
    "din_ray.cli.tune",
    "din_ray.cli.serve",
    "din_ray.cli.continual",
    "din_ray.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="din-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Input and configuration errors: one clear line, no traceback.
        print(f"din-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
