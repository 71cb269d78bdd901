"""Argument blocks that several ``semray`` sub-commands share, written once.

Every command that takes a config takes it the same way: ``--config FILE`` (YAML, validated by one
pydantic model) and repeatable ``--set key.path=value`` overrides applied on top of it (see
:func:`semray.config.base.load_config`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_config_args(
    p: argparse.ArgumentParser,
    config_help: str,
    set_example: str,
    *,
    set_help: str = "override a config field",
    config_group: Any = None,
) -> None:
    """Add ``--config`` (to ``config_group`` when given, e.g. a mutually exclusive group) and ``--set``.

    Args:
        p: the sub-command's parser.
        config_help: help of ``--config``, e.g. ``"TrainConfig YAML (e.g. configs/stage3_full.yaml)"``.
        set_example: one override shown in the help of ``--set``, e.g. ``"optim.epochs=5"``.
        set_help: the start of the help of ``--set``.
        config_group: where ``--config`` goes (default ``p``).
    """
    (config_group or p).add_argument("--config", type=Path, default=None, help=config_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{set_help}, e.g. --set {set_example} (repeatable)",
    )


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    """``--verbose``: show Ray's and other libraries' output on the terminal instead of the log file
    (see :mod:`semray.logs`)."""
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's worker output and library warnings here instead of only in the log file",
    )
