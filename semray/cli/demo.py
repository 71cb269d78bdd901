"""``semray demo``: the main job on the embedded defaults, end to end, no network (``make demo``).

semray demo [--out DIR] [--config quickstart.yaml] [--set key=value ...] [--force]

Synthesises wafer shards, runs a small loss/architecture search on a local Ray (or the cluster in
RAY_ADDRESS), registers the best model in MLflow, denoises a synthetic lot with it and evaluates it
against the shipped model and BM3D (see :mod:`semray.quickstart`). A rerun reuses finished stages.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semray.cli.args import add_config_args, add_verbose_arg
from semray.config.base import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the main job end to end: synth -> search -> register -> denoise a lot -> evaluate"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/demo)")
    add_config_args(p, "QuickstartConfig YAML (default: the embedded demo)", "tune.search.num_samples=8")
    p.add_argument("--force", action="store_true", help="redo every stage, even those done in an earlier run")
    add_verbose_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from semray.config.quickstart import QuickstartConfig
    from semray.logs import quiet, say
    from semray.quickstart import run_quickstart
    from semray.tracking import tracking_uri

    cfg = load_config(QuickstartConfig, args.config, args.overrides)
    if args.out is not None:
        cfg.out_dir = str(args.out)
    with quiet("demo", args.verbose):
        result = run_quickstart(cfg, force=args.force)
        took = sum(result.seconds.values())
        say(
            f"\nstages took {took:.0f} s"
            + (f" (reused: {', '.join(result.reused)})" if result.reused else "")
        )
        say(result.where_to_look(tracking_uri()))
    return 0
