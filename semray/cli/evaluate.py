"""``semray evaluate``: compare denoisers on the test split (or run the write-up's ablation).

semray evaluate --config configs/evaluate.yaml [--out DIR] [--set key=value ...] [--ray]
semray evaluate --ablation configs/ablation.yaml [--out DIR] [--set key=value ...] [--ray]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from semray.cli.args import add_config_args
from semray.config.base import load_config

if TYPE_CHECKING:
    from semray.evaluation import EvaluationResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare classical denoisers and models on the test split: tables, figures, report, MLflow",
    )
    what = p.add_mutually_exclusive_group()
    add_config_args(
        p,
        "EvaluateConfig YAML (default: built-in defaults)",
        "methods.classical=[bm3d,tv]",
        config_group=what,
    )
    what.add_argument(
        "--ablation",
        type=Path,
        default=None,
        help="AblationConfig YAML: train every variant under one budget, then evaluate them",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: out_dir of the config)")
    p.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray (a local one, or the cluster in RAY_ADDRESS / a `ray job`)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _init_ray() -> None:
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)


def run(args: argparse.Namespace) -> int:
    if args.ray:
        _init_ray()
    if args.ablation is not None:
        return _run_ablation(args)
    from semray.config.evaluate import EvaluateConfig
    from semray.evaluation import run_evaluation

    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    if args.ray:
        cfg.parallel = True
    res = run_evaluation(cfg, args.out, progress=not args.quiet, log_mlflow=False if args.no_mlflow else None)
    _print_summary(res)
    return 0


def _print_summary(res: EvaluationResult) -> None:
    from semray.evaluation.stats import wide_table

    methods = [m["label"] for m in res.meta["methods"]]
    print(wide_table(res.summary, "psnr", "sem", methods).to_string())
    print(f"\nwrote {res.out_dir}/report.html (and report.md, results.parquet, figures/)")
    if res.run_id:
        print(f"MLflow run {res.run_id} in experiment {res.meta['mlflow']['experiment']!r}")


def _run_ablation(args: argparse.Namespace) -> int:
    from semray.config.evaluate import AblationConfig
    from semray.evaluation.ablation import run_ablation

    cfg = load_config(AblationConfig, args.ablation, args.overrides)
    res = run_ablation(cfg, args.out, progress=not args.quiet, log_mlflow=False if args.no_mlflow else None)
    _print_summary(res.evaluation)
    print(f"ablation table: {res.table_path}")
    return 0
