"""``semray train --config CFG [--set k=v ...] [--resume [RUN] | --init MODEL]``: train a denoiser on Ray
Train, from scratch, continuing a stopped run, or fine-tuning an existing model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from semray.cli.args import add_config_args, add_verbose_arg
from semray.config.base import load_config
from semray.config.train import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a U-Net denoiser (Ray Data noise -> Ray Train DDP -> MLflow registry)",
        description=(
            "Train as the config says, on a local Ray (or the cluster in RAY_ADDRESS), tracked in MLflow "
            "(semray.tracking: MLFLOW_TRACKING_URI, else $SEMRAY_HOME/mlflow.db). Prints the MLflow run id, "
            "the registered model version and the checkpoint folder at the end."
        ),
    )
    add_config_args(p, "TrainConfig YAML (e.g. configs/stage3_full.yaml)", "optim.epochs=5")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN",
        help=(
            "continue a stopped run from its last checkpoint: RUN (a run name in run.storage_path), or "
            "run.name from the config, or the latest run; without --config the run's saved config is used"
        ),
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help=(
            "fine-tune: start from this model's weights ('default', a model folder, a training checkpoint "
            "or run folder, models:/NAME@ALIAS); the architecture comes from its card, and optimiser fields "
            "the config leaves unset get a short schedule (5 epochs at lr 2e-4). Same as --set init=MODEL"
        ),
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray started here (default: the cores, at least the workers' CPUs + 2)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result summary as JSON here")
    add_verbose_arg(p)
    p.set_defaults(handler=run)


def _resolve_config(args: argparse.Namespace) -> TrainConfig:
    from semray.cli import UsageError
    from semray.train.fit import storage_root
    from semray.train.runner import RUN_CONFIG_FILE, latest_run, load_run_config

    init = getattr(args, "init", None)
    if init is not None and args.resume is not None:
        raise UsageError("--init starts a new run from a model's weights; --resume continues a run: use one")
    if args.config is not None:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if init is not None:
            cfg.init = init  # not through --set: a spec is a plain string, never YAML
    elif args.resume is None:
        raise UsageError("--config is required (or --resume RUN to continue a run with its saved config)")
    else:
        base = load_config(TrainConfig, None, args.overrides)
        storage = storage_root(base.run.storage_path)
        name = args.resume or base.run.name or latest_run(storage)
        if not name:
            raise UsageError(f"no run to resume under {storage}")
        saved = Path(storage) / name / RUN_CONFIG_FILE
        if not saved.is_file():
            raise UsageError(f"run {name!r} has no saved config at {saved}; pass --config")
        cfg = load_run_config(saved.parent, args.overrides)
        cfg.run.name = name
    if args.resume:
        cfg.run.name = args.resume
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = _resolve_config(args)
    import ray

    from semray.logs import quiet, say, stage
    from semray.train import train

    with quiet("train", args.verbose):
        if args.num_cpus is not None and not ray.is_initialized():
            ray.init(num_cpus=args.num_cpus, include_dashboard=False)
        with stage(f"training ({cfg.optim.epochs} epochs)"):
            result = train(cfg, resume=args.resume is not None)
        say(result.summary())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=2))
    return 0
