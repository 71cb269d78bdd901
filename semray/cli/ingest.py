"""``semray ingest SRC --out SHARDS``: bring your own SEM image folders into the shard format.

Examples::

    semray ingest my_refs/ --out shards/real                        # clean references
    semray ingest scans/ --out shards/pairs --mode pairs \\
        --noisy fast --clean slow --register                         # two folders, same relative paths
    semray ingest scans/ --out shards/pairs --mode pairs             # one folder: x_noisy.tif + x_clean.tif
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from semray.cli.args import add_config_args
from semray.config.base import load_config
from semray.config.ingest import IngestConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="ingest your own SEM images (PNG/TIFF folders) into Parquet shards")
    p.add_argument("src", type=Path, nargs="?", default=None,
                   help="folder searched recursively for .tif/.tiff/.png/.jpg/.jpeg, or one file "
                        "(pairs mode with --noisy/--clean: the folder they are relative to; default '.')")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder for shards and summary.json")
    add_config_args(p, "IngestConfig YAML (default: built-in defaults)", "databar.tolerance=0.02")
    p.add_argument("--mode", choices=["clean", "pairs"], default=None,
                   help="clean references only, or matched noisy/clean pairs (implied by --noisy/--clean)")  # fmt: skip
    p.add_argument("--noisy", dest="noisy_dir", default=None, help="pairs: folder of noisy images")
    p.add_argument("--clean", dest="clean_dir", default=None, help="pairs: folder of clean images")
    p.add_argument("--pair-regex", default=None,
                   help="pairs in one folder: regex with groups key and role on the path without suffix")  # fmt: skip
    p.add_argument("--register", action="store_true", default=None,
                   help="pairs: sub-pixel registration of noisy onto clean")  # fmt: skip
    p.add_argument("--crop-bottom", type=int, default=None, metavar="N",
                   help="crop N bottom rows of every image (data bar) instead of detecting it")  # fmt: skip
    p.add_argument("--no-databar", action="store_true", help="do not detect and crop SEM data bars")
    p.add_argument("--crop-size", type=int, default=None, metavar="PX",
                   help="square crop side in px (0 = keep whole images)")  # fmt: skip
    p.add_argument("--stride", type=int, default=None, metavar="PX", help="step between crops in px")
    p.add_argument("--label", default=None, help="value of the pattern column (default 'real')")
    p.add_argument("--seed", type=int, default=None, help="split seed")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction of source images in val")
    p.add_argument("--test-fraction", type=float, default=None, help="fraction of source images in test")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--ray", action="store_true", help="read and crop files as a Ray Data pipeline")
    p.set_defaults(handler=run)


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags the user gave, as ``key=value`` overrides applied on top of the YAML."""
    given: dict[str, Any] = {
        k: v
        for k, v in {
            "mode": args.mode,
            "noisy_dir": args.noisy_dir,
            "clean_dir": args.clean_dir,
            "pair_regex": args.pair_regex,
            "registration": args.register,
            "databar.crop_rows": args.crop_bottom,
            "databar.mode": "off" if args.no_databar else None,
            "stride": args.stride,
            "label": args.label,
            "seed": args.seed,
            "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction,
        }.items()
        if v is not None
    }
    if "mode" not in given and (args.noisy_dir or args.clean_dir):
        given["mode"] = "pairs"  # two folders can only mean pairs
    if args.crop_size is not None:
        given["crop_size"] = args.crop_size or None  # 0 = whole images
    # load_config parses override values as YAML; JSON is valid YAML and keeps a regex a plain string.
    return [f"{k}={json.dumps(v)}" for k, v in given.items()]


def run(args: argparse.Namespace) -> int:
    from semray.cli import UsageError
    from semray.ingest import IngestError, ingest

    cfg = load_config(IngestConfig, args.config, [*_flag_overrides(args), *args.overrides])
    src = args.src
    if src is None:
        if cfg.noisy_dir is None:
            raise UsageError("SRC is required (it may be left out only with --noisy and --clean)")
        src = Path(".")
    if args.ray:
        import ray

        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        summary = ingest(cfg, src, args.out, parallel=True if args.ray else None, overwrite=args.overwrite)
    except IngestError as e:
        raise UsageError(str(e)) from None
    print(summary.format())
    print(f"  summary: {args.out / 'summary.json'}")
    # Nothing usable came out: say so with the exit status too, so scripts notice.
    return 0 if sum(summary.crops.values()) > 0 else 1
