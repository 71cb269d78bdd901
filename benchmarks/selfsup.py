"""Training without clean references vs supervised vs BM3D, on our synthetic data (issue 12).

Trains the same U-Net under the same small budget (data, crops, steps, seed) with each objective:

* ``supervised``      the project's recipe (composite loss against clean: Charbonnier + MS-SSIM + edge);
* ``supervised_mse``  plain MSE against clean: the same per-pixel loss as the self-supervised runs, so the
                      Noise2Noise gap below compares the *target* only;
* ``n2v``             Noise2Void blind spot (single pixel);
* ``structn2v``       structured blind spot, +-2 px along the fast-scan axis x;
* ``n2n``             Noise2Noise: two independent synthetic scans of each image (same settings);

then evaluates them together with BM3D on the synthetic test split with the generator's SEM noise at
each dose (:mod:`semray.evaluation`, models by local path, via the ablation runner), and writes
``benchmarks/results/selfsup.md`` and ``.json`` (command, machine, date, budget, PSNR/SSIM per dose,
the N2N - supervised gaps, training times).

    nice -n 10 .venv/bin/python benchmarks/selfsup.py            # ~10 min on 2 idle cores
    nice -n 10 .venv/bin/python benchmarks/selfsup.py --epochs 8 --steps 24   # a larger budget

The budget is deliberately tiny (it has to run on a laptop in minutes): every network is far from
converged, so read the numbers as a comparison at equal (small) budget, not as final quality.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

VARIANTS: list[dict[str, Any]] = [
    {"name": "supervised", "description": "clean target, composite loss (the project's recipe)"},
    {
        "name": "supervised_mse",
        "overrides": {"loss.kind": "mse_ssim", "loss.ssim_lambda": 0.0},
        "description": "clean target, plain MSE (same pixel loss as the self-supervised runs)",
    },
    {"name": "n2v", "overrides": {"loss.objective": "n2v"}, "description": "Noise2Void blind spot, MSE"},
    {
        "name": "structn2v",
        "overrides": {"loss.objective": "structn2v", "loss.mask.half_length": 2, "loss.mask.axis": "x"},
        "description": "structN2V: blind segment +-2 px along x, MSE",
    },
    {
        "name": "n2n",
        "overrides": {"loss.objective": "n2n"},
        "description": "Noise2Noise, 2 synthetic scans, MSE",
    },
]


def build_config(args: argparse.Namespace) -> Any:
    from semray.config.evaluate import AblationConfig

    side = args.side
    unknown = set(args.variants.split(",")) - {v["name"] for v in VARIANTS}
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {[v['name'] for v in VARIANTS]}")
    gen = {"seed": 1, "height": side, "width": side, "n_train": args.n_train, "n_val": 4, "n_test": args.n_test,
           "rows_per_shard": 16}  # fmt: skip
    budget = {
        "seed": 0,
        "data.shards": [str(Path(args.data).resolve())],
        "data.generate": gen,
        "data.crop_px": 64,
        "data.crops_per_image": 4,
        "data.batch_size": 16,
        "data.val_max_images": 4,
        "data.val_crop_px": 64,
        "optim.epochs": args.epochs,
        "optim.steps_per_epoch": args.steps,
        "optim.lr": 2.0e-3,
        "optim.schedule": "onecycle",
        "loss.mask.fraction": 0.02,
        "validation.figure_every": 0,
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 2, "data_cpus": 0.5},
        "mlflow.experiment": "semray-selfsup",
    }
    evaluation = {
        "seed": 0,
        "test_set": {"dataset": {"seed": 1, "height": side, "width": side, "n_test": args.n_test}},
        "doses_e_per_px": [2, 8, 32, 128],
        "methods": {"classical": ["bm3d"], "models": [], "device": "cpu"},
        "runtime": {"enabled": False},
        "report": {"n_examples": 1, "example_level": 8},
        "mlflow": {"enabled": False, "experiment": "semray-selfsup"},
    }
    return AblationConfig.model_validate(
        {
            "base": str(ROOT / "configs" / "stage3_full.yaml"),
            "baseline": "supervised",
            "budget": budget,
            "variants": [v for v in VARIANTS if v["name"] in args.variants.split(",")],
            "evaluation": evaluation,
            "reuse_trained": not args.retrain,
            "out_dir": str(Path(args.out).resolve()),
        }
    )


def _machine() -> dict[str, Any]:
    import torch

    import semray

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = (float("nan"),) * 3
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "?",
        "logical_cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 1) for x in load],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "semray": getattr(semray, "__version__", "?"),
    }


def collect(result: Any) -> dict[str, Any]:
    """PSNR/SSIM means (and 95% CI half-widths) per method and dose, and the N2N gaps."""
    s = result.evaluation.summary
    s = s[(s["condition"] == "sem") & (s["metric"].isin(["psnr", "ssim"]))]
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in s.itertuples(index=False):
        table.setdefault(r.metric, {}).setdefault(r.method, {})[f"{r.level:g}"] = [
            round(float(r.mean), 4),
            round(float(r.ci_half), 4),
        ]
    psnr = table.get("psnr", {})
    gaps: dict[str, dict[str, float]] = {}
    for ref in ("supervised", "supervised_mse"):
        if "n2n" in psnr and ref in psnr:
            gaps[f"{ref} - n2n"] = {d: round(psnr[ref][d][0] - psnr["n2n"][d][0], 3) for d in psnr["n2n"]}
    if "n2v" in psnr and "structn2v" in psnr:
        gaps["structn2v - n2v"] = {
            d: round(psnr["structn2v"][d][0] - psnr["n2v"][d][0], 3) for d in psnr["n2v"]
        }
    runs = [
        {
            "name": r.name,
            "description": r.description,
            "trained_here": r.trained,
            "train_seconds": None if r.train_seconds is None else round(r.train_seconds, 1),
            "best_val_psnr": r.best_metrics.get("val_psnr"),
            "param_count": r.param_count,
        }
        for r in result.variants
    ]
    return {
        "metrics": table,
        "gaps_db": gaps,
        "variants": runs,
        "n_test_images": result.evaluation.meta["test_set"]["n_images"],
    }


def markdown(report: dict[str, Any]) -> str:
    doses = sorted({d for m in report["metrics"]["psnr"].values() for d in m}, key=float)
    order = ["noisy", "bm3d", *[v["name"] for v in VARIANTS]]  # methods not run are skipped
    lines = [
        "# Training without clean references: supervised vs blind-spot vs Noise2Noise vs BM3D",
        "",
        f"Measured {report['date']} on {report['machine']['machine']} ({report['machine']['logical_cpus']} logical "
        f"CPUs, shared; load average at the end {report['machine']['load_average_at_end']}), semray "
        f"{report['machine']['semray']}, torch {report['machine']['torch']}. Total wall time "
        f"{report['wall_seconds'] / 60:.1f} min.",
        "",
        "Reproduce with:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Budget (identical for every variant): {report['budget']}. Test: {report['n_test_images']} synthetic test "
        "images (dataset seed 1), the generator's SEM noise at each dose (`semray.evaluation`).",
        "",
        "**The budget is tiny: no network is converged, so this compares objectives at equal small budget, "
        "not final quality.**",
        "",
    ]
    for metric, digits, title in (("psnr", 2, "PSNR (dB)"), ("ssim", 3, "SSIM")):
        lines += [f"*{title}, mean over test images (+- 95% CI half-width)*", ""]
        lines += [
            "| method | " + " | ".join(f"{d} e-/px" for d in doses) + " |",
            "|---" * (len(doses) + 1) + "|",
        ]
        for m in order:
            row = report["metrics"].get(metric, {}).get(m)
            if row is None:
                continue
            cells = [f"{row[d][0]:.{digits}f} +- {row[d][1]:.{digits}f}" if d in row else "" for d in doses]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["*PSNR differences (dB, positive = first better)*", ""]
    lines += [
        "| difference | " + " | ".join(f"{d} e-/px" for d in doses) + " |",
        "|---" * (len(doses) + 1) + "|",
    ]
    for name, g in report["gaps_db"].items():
        lines.append(f"| {name} | " + " | ".join(f"{g.get(d, float('nan')):+.2f}" for d in doses) + " |")
    lines += [
        "",
        "*variants*",
        "",
        "| variant | objective | train time (s) | best val PSNR (dB) |",
        "|---|---|---|---|",
    ]
    for v in report["variants"]:
        t = "reused" if not v["trained_here"] else f"{v['train_seconds']:.0f}"
        bv = v["best_val_psnr"]
        lines.append(f"| {v['name']} | {v['description']} | {t} | {'' if bv is None else f'{bv:.2f}'} |")
    if report.get("notes"):
        lines += ["", "## Reading", "", *report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/selfsup", help="models + evaluation folder")
    p.add_argument("--data", default="data/wafers_selfsup", help="shard folder (rendered on first use)")
    p.add_argument("--results", default=str(RESULTS), help="where selfsup.md/.json go")
    p.add_argument("--side", type=int, default=128, help="image side (px)")
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-test", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per epoch (batches of 16 crops)")
    p.add_argument("--retrain", action="store_true", help="train every variant even if its model exists")
    p.add_argument(
        "--variants",
        default=",".join(v["name"] for v in VARIANTS),
        help="comma-separated subset of: " + ", ".join(v["name"] for v in VARIANTS),
    )
    args = p.parse_args(argv)

    import ray

    from semray.evaluation.ablation import run_ablation

    cfg = build_config(args)
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        result = run_ablation(cfg, progress=False, log_mlflow=False)
    finally:
        ray.shutdown()
    report: dict[str, Any] = {
        "command": "nice -n 10 .venv/bin/python benchmarks/selfsup.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "budget": (
            f"{args.n_train} training images of {args.side} px, U-Net of configs/stage3_full.yaml (width 16, depth 3), "
            f"{args.epochs} epochs x {args.steps} steps x 16 crops of 64 px, onecycle lr 2e-3, seed 0, 1 worker; "
            f"blind-spot fraction 0.02, radius 2"
        ),
        **collect(result),
        "out_dir": str(Path(args.out).resolve()),
    }
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "selfsup.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (res / "selfsup.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
