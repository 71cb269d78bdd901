"""``semray calibrate-noise IMAGES... --out noise.yaml``: fit the noise model to real noisy SEM images.

Writes the :class:`~semray.config.noise.NoiseConfig` YAML the synthesis stage uses directly, a JSON of
the raw estimates with standard errors and assumptions, and a comparison figure (real vs synthetic
noise statistics), and prints the closure verdict (:func:`semray.calibrate.closure.closure_summary`:
variance within 10 % per bin, autocorrelation within 0.05 at lags 1-3, or where it misses). Every
page of a multipage TIFF is an image of its own (``file.tif[page k]``); thumbnail pages are
refused. The work is :func:`semray.calibrate.run_calibration`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semray.cli.args import add_config_args
from semray.config.base import load_config
from semray.config.calibrate import CalibrationConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate-noise",
        help="estimate noise-model parameters from real noisy images; write a NoiseConfig YAML",
        description="Estimate shot/read noise, row offsets, line jitter, drift, fast-axis correlation, "
        "charging and quantisation from noisy images of one tool setting (no clean reference).",
    )
    p.add_argument(
        "images", nargs="+", type=Path, help="image files or folders (.tif/.png/.jpg, recursive; every page)"
    )
    p.add_argument("--out", type=Path, required=True, help="NoiseConfig YAML to write, e.g. noise.yaml")
    p.add_argument("--json", type=Path, default=None, help="raw estimates (default: OUT with .json)")
    p.add_argument("--figure", type=Path, default=None, help="comparison PNG (default: OUT with .png)")
    add_config_args(p, "CalibrationConfig YAML (assumptions; default: built-in)",
                    "assumed_detector_gain_cv=0.3", set_help="override a calibration setting")  # fmt: skip
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from semray.calibrate import closure_summary, run_calibration
    from semray.cli import UsageError
    from semray.io import ImageReadError

    cfg = load_config(CalibrationConfig, args.config, args.overrides)
    try:
        result = run_calibration(args.images, args.out, cfg, args.json, args.figure)
    except (ImageReadError, ValueError) as e:
        raise UsageError(str(e)) from e
    e = result.estimates
    on = [name for name, sub in result.noise_config if getattr(sub, "enabled", False)]
    print(f"wrote {args.out} (components on: {', '.join(on) or 'none'})")
    compared = len(result.closure.get("images", []))
    print(f"  {closure_summary(result.closure, compared, len(result.per_image))}")
    print(
        f"  dose {e['dose_e_per_px'].value:.4g} +- {e['dose_e_per_px'].stderr:.2g} e/px (given assumed "
        f"yields/cv), read noise {e['read_noise_sigma'].value:.3g}, row offset "
        f"{e['scan_line_offset_sigma'].value:.3g}, jitter {e['line_jitter_px'].value:.3g} px"
    )
    print(f"  estimates: {args.json or args.out.with_suffix('.json')}")
    print(f"  figure:    {args.figure or args.out.with_suffix('.png')}")
    for w in result.warnings:
        print(f"  note: {w}")
    return 0
