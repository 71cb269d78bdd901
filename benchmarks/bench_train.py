"""Training throughput on Ray Train: samples/s and megapixels/s for 1 vs 2 CPU workers, in one run.

Each configuration is a real :func:`semray.train.train` run (Ray Data noise synthesis on the fly,
TorchTrainer, DDP over gloo for 2 workers, validation and checkpoints every epoch; MLflow off) on the
same synthetic shard set and the model of ``configs/default_model.yaml``. Epoch 0 warms up Ray's
worker processes and is excluded; the result is the median over the remaining epochs of

* ``samples_per_s``: training crops per second over all workers (slowest worker's epoch time),
* ``megapixels_per_s``: the same in crop pixels,
* ``compute_only_samples_per_s``: the same model, loss and optimiser in a plain loop in this process
  (no Ray, random tensors) with the same thread count, i.e. the ceiling the pipeline is measured against.

The machine's load average is recorded before and after each configuration: on a shared machine
numbers move with other people's work, so compare only rows measured side by side.

Usage::

    python benchmarks/bench_train.py [--epochs 3] [--steps 12] [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import datetime as dt
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train.json"
#: (label, num_workers, cpus_per_worker, torch_threads)
CONFIGS = [
    ("1 worker x 1 thread", 1, 1.0, 1),
    ("1 worker x 2 threads", 1, 1.0, 2),
    ("2 workers x 1 thread (DDP)", 2, 0.75, 1),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compute_only(cfg, threads: int, steps: int) -> float:
    """Samples/s of forward + loss + backward + AdamW on random crops in this process."""
    import torch

    from semray.losses import build_loss
    from semray.models.unet import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    loss_fn = build_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bs, c = cfg.data.batch_size, cfg.data.crop_px
    x, y = torch.rand(bs, 1, c, c), torch.rand(bs, 1, c, c)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        total, _ = loss_fn(model(x), y)
        opt.zero_grad()
        total.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return bs / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per configuration (the first is warm-up)")
    ap.add_argument("--steps", type=int, default=12, help="optimiser steps per worker per epoch")
    ap.add_argument("--images", type=int, default=96, help="training images in the synthetic shard set")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    import ray
    import torch

    from semray.config.base import load_config
    from semray.config.data import DatasetConfig
    from semray.config.train import TrainConfig
    from semray.data import synthesize_shards
    from semray.train import train

    work = Path(tempfile.mkdtemp(prefix="semray-bench-train-"))
    os.environ["SEMRAY_HOME"] = str(work / "home")
    shards = work / "shards"
    ds = load_config(
        DatasetConfig, None, [f"n_train={args.images}", "n_val=4", "n_test=0", "height=128", "width=128"]
    )
    synthesize_shards(ds, shards, parallel=False, progress=False)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    rows = []
    for label, workers, cpus, threads in CONFIGS:
        cfg = load_config(
            TrainConfig,
            ROOT / "configs" / "default_model.yaml",
            [
                f"data.shards=[{shards}]", "data.generate=null", "data.val_crop_px=64", "data.val_max_images=4",
                f"optim.epochs={args.epochs}", f"optim.steps_per_epoch={args.steps}",
                f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}",
                f"scaling.torch_threads={threads}", "scaling.data_cpus=0.25", "mlflow.enabled=false",
                "validation.figure_every=0", f"run.storage_path={work / 'runs'}", "run.export_dir=null",
                f"checkpoint.keep_best={args.epochs}",
            ],
        )  # fmt: skip
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
        history = result.history
        steady = [h for h in history if h["epoch"] >= 1] or history
        sps = statistics.median(h["samples_per_s"] for h in steady)
        mps = statistics.median(h["megapixels_per_s"] for h in steady)
        ceiling = compute_only(cfg, threads, steps=8) * (workers if workers > 1 else 1)
        rows.append(
            {
                "config": label,
                "num_workers": workers,
                "cpus_per_worker": cpus,
                "torch_threads": threads,
                "samples_per_s": round(sps, 2),
                "megapixels_per_s": round(mps, 4),
                "compute_only_samples_per_s": round(ceiling, 2),
                "pipeline_efficiency": round(sps / ceiling, 3),
                "epochs_measured": [int(h["epoch"]) for h in steady],
                "wall_s": round(wall, 1),
                "load_avg_before": round(load_before, 2),
                "load_avg_after": round(os.getloadavg()[0], 2),
            }
        )
        print(
            f"{label:28s} {sps:8.2f} samples/s {mps:8.4f} MP/s  (compute-only ceiling {ceiling:.2f})",
            flush=True,
        )

    record = {
        "benchmark": "train_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "device": "cpu",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "setup": {
            "model": cfg.model.model_dump(mode="json"),
            "loss": cfg.loss.kind,
            "crop_px": cfg.data.crop_px,
            "batch_size_per_worker": cfg.data.batch_size,
            "steps_per_epoch": args.steps,
            "epochs": args.epochs,
            "image_px": [ds.height, ds.width],
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
