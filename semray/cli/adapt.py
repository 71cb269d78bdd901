"""``semray adapt NOISY_IMAGES... --out DIR``: adapt a denoiser to your microscope from noisy images only.

Calibrates the noise on the images, fine-tunes the model on synthetic pairs made with the fitted noise
(on semray's patterns and on your own content), picks the checkpoint without clean images, registers
it in MLflow and writes the model plus a no-reference report to DIR. The work is
:func:`semray.adapt.run_adapt`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from semray.cli.args import add_config_args, add_verbose_arg
from semray.config.base import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt the denoiser to your microscope from its noisy images (no clean references)",
        description="Calibrate the noise on your images, fine-tune on synthetic pairs with that noise "
        "(semray's patterns + your own content), choose the checkpoint without clean images, register it "
        "and write model/, report.html, report.json, figures/ and calibration/ to --out.",
    )
    p.add_argument(
        "images", nargs="+", type=Path, help="noisy image files or folders (.tif/.tiff/.png/.jpg, recursive)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (must be new or empty, see --overwrite)"
    )
    add_config_args(
        p, "AdaptConfig YAML (default: built-in)", "optim.epochs=4", set_help="override a setting"
    )
    add_verbose_arg(p)
    p.add_argument(
        "--init", default=None, metavar="MODEL", help="model to adapt (default: the shipped model)"
    )
    p.add_argument(
        "--frames",
        action="store_true",
        help="the images are repeated scans of ONE field: average them as the proxy",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--json", type=Path, default=None, help="also write the result summary as JSON here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from semray.adapt import AdaptInputError, run_adapt
    from semray.cli import UsageError
    from semray.config.adapt import AdaptConfig

    # --frames as an override, so a setting it rules out (user.proxy_rounds > 1) is a ConfigError naming it
    cfg = load_config(AdaptConfig, args.config, [*args.overrides, *(["frames=true"] if args.frames else [])])
    if args.init is not None:
        cfg.init = args.init
    from semray.logs import quiet, say, stage

    with quiet("adapt", args.verbose):
        try:
            with stage(f"adapting to {len(args.images)} input(s) ({cfg.optim.epochs} epochs)"):
                result = run_adapt(args.images, args.out, cfg, overwrite=args.overwrite)
        except AdaptInputError as e:
            raise UsageError(str(e)) from e
        say(result.lines())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {"out_dir": str(result.out_dir), "registry_uri": result.registry_uri,
                "parent_run_id": result.parent_run_id, "child_run_id": result.child_run_id,
                "selection": result.selection, "verdict": result.verdict, "timings_s": result.timings}  # fmt: skip
        args.json.write_text(json.dumps(info, indent=2, default=str))
    return 0
