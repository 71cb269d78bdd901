"""``semray denoise INPUT OUTPUT [--model SPEC] [--method M] ...``: denoise a file or a lot tree.

INPUT is an image file or a folder searched recursively for .tif/.tiff/.png/.jpg/.jpeg; OUTPUT mirrors
it (same relative paths, names, formats, dtypes, shapes, channels, pages and tags; JPEG is written back
as JPEG with the input's own quantisation) and, for folders, holds ``manifest.parquet``. A burned-in
data bar is found on each page and copied through untouched (``--keep-bottom-rows``). A small job (at
most ``local_max_megapixels``, default 64 MP) or a single file runs in this process; a larger folder
runs on a Ray actor pool (local Ray, or the cluster in ``RAY_ADDRESS``); ``--executor`` forces either. Exit status: 0 when every file is ok or skipped, 1 when some failed (see the manifest),
2 for a usage error (bad flag, missing INPUT, unknown model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from semray.cli.args import add_config_args, add_verbose_arg
from semray.config.base import load_config, set_dotted

#: CLI flag (argparse dest) -> InferConfig field (dotted for sections); unset flags keep the file's value.
_FLAG_FIELDS = {
    "model": "model",
    "models_dir": "models_dir",
    "method": "method",
    "actors": "num_actors",
    "executor": "executor",
    "cpus_per_actor": "cpus_per_actor",
    "gpus_per_actor": "gpus_per_actor",
    "keep_bottom_rows": "keep_bottom_rows",
    "tile": "tiling.tile",
    "overlap": "tiling.overlap",
    "batch_size": "tiling.batch_size",
    "device": "device",
    "threads": "threads",
    "min_side": "min_side",
    "experiment": "experiment",
    "track": "track",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "denoise",
        help="denoise an image or a lot tree (TIFF/PNG/JPEG), mirroring it into OUTPUT with a manifest",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="image file or folder (<lot>/<wafer>/<image>)")
    p.add_argument("output", type=Path, metavar="OUTPUT", help="output folder (or output file for one file)")
    p.add_argument("--model", help="NAME, model folder PATH, or models:/NAME@ALIAS | models:/NAME/VERSION "
                   "(default: the shipped model)")  # fmt: skip
    p.add_argument("--models-dir", help="extra folder of named models")
    p.add_argument("--method", choices=["unet", "bm3d", "nlm", "bilateral", "gaussian", "median", "tv"],
                   help="denoiser (default unet)")  # fmt: skip
    add_config_args(p, "InferConfig YAML; flags override it", "classical_params.h=0.05")
    p.add_argument("--force", action="store_true", help="redo files whose verified output exists")
    p.add_argument("--actors", type=int, help="Ray actors (default: one per CPU; 0 = no Ray, in-process)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (fractional allowed)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (fractional allowed)")
    p.add_argument("--keep-bottom-rows", type=_bar_rows, metavar="auto|N",
                   help="data bar copied through untouched: 'auto' detects it on each page (default), "
                   "N keeps N bottom rows, 0 none")  # fmt: skip
    p.add_argument("--executor", choices=["auto", "local", "ray"],
                   help="where a folder runs: 'auto' (in process up to local_max_megapixels, else Ray; "
                   "default), 'local' or 'ray'")  # fmt: skip
    p.add_argument("--tile", type=int, help="largest tile side in pixels (default 768)")
    p.add_argument("--overlap", type=int, help="tile overlap in pixels (default: from the model's "
                   "receptive field, 104 for the shipped model; tiled == whole-image output)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default 1 on CPU, 4 on GPU)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch threads per actor/process")
    p.add_argument("--min-side", type=int, help="fail images with a side shorter than this (pixels)")
    p.add_argument("--experiment", help="MLflow experiment name")
    track = p.add_mutually_exclusive_group()
    track.add_argument("--track", dest="track", action="store_const", const=True,
                       help="log an MLflow run (default for folders)")  # fmt: skip
    track.add_argument("--no-track", dest="track", action="store_const", const=False,
                       help="do not log an MLflow run")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_arg(p)
    p.set_defaults(handler=run, track=None)


def _bar_rows(value: str) -> int | str:
    """``--keep-bottom-rows`` value: ``auto`` or a non-negative int."""
    if value == "auto":
        return value
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if rows < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of rows >= 0, got {value!r}")
    return rows


def build_config(args: argparse.Namespace) -> Any:
    """The validated :class:`InferConfig`: YAML file, then ``--set``, then explicit flags."""
    from semray.config.infer import InferConfig

    cfg = load_config(InferConfig, args.config, args.overrides)
    data = cfg.model_dump()
    for dest, field in _FLAG_FIELDS.items():
        if getattr(args, dest) is not None:
            set_dotted(data, field, getattr(args, dest))
    if args.force:
        data["force"] = True
    return load_config(InferConfig, data)


def run(args: argparse.Namespace) -> int:
    from semray.batch import JobError, run_denoise_job
    from semray.cli import UsageError
    from semray.logs import quiet
    from semray.models.resolve import ModelNotFoundError
    from semray.models.store import ModelStoreError

    cfg = build_config(args)
    try:
        with quiet("denoise", args.verbose):
            s = run_denoise_job(args.input, args.output, cfg, progress=not args.no_progress)
    except (JobError, ModelNotFoundError, ModelStoreError) as e:
        raise UsageError(str(e)) from None
    c = s.counts
    print(
        f"{len(s.rows)} files: {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped in {s.wall_s:.1f} s "
        f"({s.throughput_mpix_s:.2f} MP/s) with {s.method} {s.model_name} {s.model_version}"
    )
    if s.manifest is not None:
        print(f"  manifest: {s.manifest}")
    if s.run_id:
        print(f"  MLflow run: {s.run_id}")
    failed = s.rows[s.rows["status"] == "failed"]
    for _, r in failed.head(10).iterrows():
        print(f"  failed: {r['rel_path']}: {r['error']}", file=sys.stderr)
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more failed (see the manifest)", file=sys.stderr)
    return 1 if len(failed) else 0
