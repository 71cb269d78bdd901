"""``semray demo --out DIR``: the main job on the embedded defaults, end to end, no network.

Today: a small synthetic shard set and its preview figure. It grows with the pipeline (training,
search, batch denoising, evaluation) as those stages land.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semray.config.base import load_config
from semray.config.data import DatasetConfig

DEMO_OVERRIDES = ["n_train=24", "n_val=8", "n_test=8", "rows_per_shard=16"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded defaults")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from semray.data import synthesize_shards
    from semray.preview import write_preview

    out: Path = args.out
    cfg = load_config(DatasetConfig, None, DEMO_OVERRIDES)
    shards = out / "shards"
    print(f"[1/2] synthesising {cfg.n_train + cfg.n_val + cfg.n_test} wafer images into {shards}")
    summary = synthesize_shards(cfg, shards)
    print(f"[2/2] writing the preview figure (clean | noisy at {cfg.preview.doses_e_per_px} e-/px | defects)")
    png = write_preview(cfg, shards, out / "preview.png")
    print("\ndone. Look at:")
    print(f"  shards:  {summary.out_dir}  ({len(summary.shards)} Parquet files)")
    print(f"  preview: {png}")
    return 0
