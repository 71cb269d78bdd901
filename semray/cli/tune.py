"""``semray tune --config CFG [--set k=v ...] [--resume]``: loss/architecture search on Ray Tune."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from semray.cli.args import add_config_args, add_verbose_arg
from semray.config.base import load_config
from semray.config.train import TrainConfig
from semray.config.tune import TuneConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="search loss weights and U-Net variants (Ray Tune + Ray Train, ASHA, MLflow parent/child runs)",
        description=(
            "Run the search the config describes on a local Ray (or the cluster this runs in: a Ray job or "
            "RAY_ADDRESS), tracked in MLflow (semray.tracking). Prints the MLflow experiment and parent run "
            "ids, the best trial's config and the registered model version. A search whose folder exists "
            "(same run.name) is resumed."
        ),
    )
    add_config_args(p, "TuneConfig YAML (e.g. configs/tune_laptop.yaml)", "search.num_samples=4")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="resume the interrupted search NAME (or run.name from the config); fails if there is none",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result summary as JSON here")
    add_verbose_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # validate everything before importing Ray Tune or touching a cluster: a bad config fails at once
    cfg = load_config(TuneConfig, args.config, args.overrides)
    if args.resume:
        cfg.run.name = args.resume
    print(
        f"semray tune: config OK ({len(cfg.space)} searched fields, {cfg.search.num_samples} samples)",
        flush=True,
    )
    from semray.config.base import dump_yaml
    from semray.logs import quiet, say, stage
    from semray.tune import run_search

    with quiet("tune", args.verbose), stage(f"search ({cfg.search.num_samples} trials)"):
        result = run_search(cfg, resume=True if args.resume is not None else None)
    say(result.summary())
    say("best config:")
    say(dump_yaml(TrainConfig.model_validate(result.best_config)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=2, default=str))
    return 0
