"""The ``semray`` command line: thin wrappers that parse, load a config and call the library.

Each sub-command lives in its own module exposing ``register(subparsers)``; that module's handler
returns a process exit code. Errors the user can fix (bad config, unreadable input) are printed as
one clear message and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from semray.config.base import ConfigError

#: Sub-command modules, in the order ``semray --help`` lists them.
COMMANDS = ("synth", "demo", "ingest", "evaluate", "denoise", "serve", "train", "tune", "calibrate", "adapt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semray", description="Denoise SEM images of semiconductor wafers at fab scale on Ray."
    )
    from semray import __version__

    parser.add_argument("--version", action="version", version=f"semray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"semray.cli.{name}").register(sub)
    return parser


class UsageError(Exception):
    """A problem with the user's input that deserves one line, not a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, UsageError, FileNotFoundError) as e:
        print(f"semray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
