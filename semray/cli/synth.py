"""``semray synth --config CFG --out DIR``: render a synthetic shard set and its preview figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from semray.cli.args import add_config_args
from semray.config.base import load_config
from semray.config.data import DatasetConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="render synthetic wafer shards (Parquet) and a preview PNG")
    add_config_args(p, "DatasetConfig YAML (default: built-in defaults)", "n_train=32")
    p.add_argument("--out", type=Path, required=True, help="output folder for shards and preview.png")
    p.add_argument("--ray", action="store_true", help="render shards as Ray tasks on a local/attached Ray")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from semray.data import synthesize_shards
    from semray.preview import write_preview

    cfg = load_config(DatasetConfig, args.config, args.overrides)
    if args.ray:
        import ray

        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    summary = synthesize_shards(cfg, args.out)
    png = write_preview(cfg, args.out, args.out / "preview.png")
    total = sum(summary.counts.values())
    print(f"wrote {total} images in {len(summary.shards)} shards under {args.out}")
    print(f"  per split: {summary.counts}; with defects: {summary.defect_images}")
    print(f"  preview: {png}")
    return 0
