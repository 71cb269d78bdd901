"""Latency of the denoising app: one 512 x 512 image, CPU, 1 and 4 concurrent clients on loopback.

    .venv/bin/python benchmarks/bench_serve.py                            # writes the record
    .venv/bin/python benchmarks/bench_serve.py --requests 20 --time-limit 30 --concurrency 1 2 4

Starts a local Ray and the app (:func:`semray.serve.start`) on 127.0.0.1 with a free port and a fixed
number of replicas (``--replicas``, autoscaling pinned so the replica count cannot change mid-run),
then for each concurrency level ``c`` runs ``c`` client threads that POST the same 8-bit PNG to
``/api/denoise`` (the JSON endpoint the web page uses: previews and the base64 result included, no
reference so no metrics) back to back, until ``--requests`` requests have completed or
``--time-limit`` seconds have passed, whichever comes first. Two warm-up requests per level (model
load, first-call imports) are not counted.

Reports client-side latency (request sent -> full response parsed) p50/p95/mean/max in ms, throughput
in requests/s, and the server's own ``denoise_ms`` and ``total_ms`` medians, so queueing (client p50
minus server total) is visible, plus ``denoise_cpu_ms`` (CPU time of the denoising thread), which stays
meaningful when other jobs share the machine and stretch the wall-clock figures.

Model: the shipped default if the package has one, else the default ``UNetConfig`` with random weights
saved to a temporary models folder (the record says which; latency depends on the architecture, not
the weights). Records machine, command, load average and figures in ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image(size: int) -> bytes:
    """A synthetic noisy line/space SEM image, ``size`` x ``size``, as 8-bit PNG bytes."""
    from PIL import Image

    from semray.config.base import load_config
    from semray.config.noise import NoiseConfig
    from semray.noise import synthesize
    from semray.synth import render_wafer

    rng = np.random.default_rng(0)
    clean = render_wafer("lines", (size, size), rng).clean
    noisy, _ = synthesize(clean, load_config(NoiseConfig, {"shot": {"dose_e_per_px": [20, 20]}}), rng)
    buf = io.BytesIO()
    Image.fromarray(np.rint(noisy * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pick_model(tmp: Path) -> tuple[str, Path | None, str]:
    """``(model name for the app, models_dir or None, description)``."""
    import torch

    from semray.config.model import UNetConfig
    from semray.models.resolve import ModelNotFoundError, resolve_model
    from semray.models.store import save_model
    from semray.models.unet import build_model, count_parameters

    try:
        r = resolve_model(None)
        return (
            "default",
            None,
            f"shipped default model {r.name} v{r.version} ({count_parameters(r.model)} params)",
        )
    except ModelNotFoundError:
        torch.manual_seed(0)
        cfg = UNetConfig()
        net = build_model(cfg)
        save_model(net, cfg, tmp / "bench_unet", {"name": "bench_unet"})
        desc = f"default UNetConfig, random weights ({count_parameters(net)} params; no shipped model yet)"
        return "bench_unet", tmp, desc


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_level(
    url: str, image: bytes, model: str, concurrency: int, n_requests: int, time_limit: float
) -> dict[str, Any]:
    """``concurrency`` clients posting back to back until ``n_requests`` are done or time is up."""
    import requests

    lock = threading.Lock()
    started = 0
    latencies: list[float] = []
    server_total: list[float] = []
    server_denoise: list[float] = []
    server_cpu: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit

    def client() -> None:
        nonlocal started
        session = requests.Session()
        while True:
            with lock:
                if started >= n_requests or time.monotonic() >= deadline:
                    return
                started += 1
            t0 = time.perf_counter()
            r = session.post(
                url,
                files={"image": ("bench.png", image, "image/png")},
                data={"model": model},
                headers={"serve_multiplexed_model_id": f"unet:{model}"},
                timeout=max(time_limit, 60),
            )
            body = r.json()
            dt_ms = (time.perf_counter() - t0) * 1e3
            with lock:
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {body.get('detail')}")
                    continue
                latencies.append(dt_ms)
                server_total.append(body["timing_ms"]["total_ms"])
                server_denoise.append(body["timing_ms"]["denoise_ms"])
                server_cpu.append(body["timing_ms"]["denoise_cpu_ms"])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not latencies:
        return {"concurrency": concurrency, "completed": 0, "errors": errors}
    return {
        "concurrency": concurrency,
        "completed": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 3),
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 1),
            "p95": round(percentile(latencies, 95), 1),
            "mean": round(statistics.fmean(latencies), 1),
            "max": round(max(latencies), 1),
        },
        "server_denoise_ms_p50": round(percentile(server_denoise, 50), 1),
        "server_total_ms_p50": round(percentile(server_total, 50), 1),
        "server_denoise_cpu_ms_p50": round(percentile(server_cpu, 50), 1),
    }


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="image side (px)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="client counts to run")
    p.add_argument("--requests", type=int, default=40, help="requests per level (upper bound)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level (upper bound)")
    p.add_argument("--replicas", type=int, default=1, help="app replicas (fixed for the run)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = p.parse_args(argv)

    import ray
    import requests
    from ray import serve

    from semray.config.serve import ServeConfig
    from semray.serve import start

    record: dict[str, Any] = {
        "benchmark": "serve_latency",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="semray-bench-serve-") as tmp:
        model, models_dir, desc = pick_model(Path(tmp))
        image = test_image(args.size)
        ray.init(num_cpus=max(4, int(np.ceil(args.replicas * args.cpus_per_replica))), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
        cfg = ServeConfig(
            port=free_port(),
            models_dir=models_dir,
            include_mlflow=False,
            autoscaling={"min_replicas": args.replicas, "max_replicas": args.replicas},
            num_cpus_per_replica=args.cpus_per_replica,
        )
        t0 = time.perf_counter()
        url = start(cfg) + "api/denoise"
        startup_s = time.perf_counter() - t0
        print(f"app up in {startup_s:.1f} s; model: {desc}")
        levels = []
        try:
            for c in args.concurrency:
                for _ in range(2):  # warm-up: model load and first-call imports on the replica(s)
                    requests.post(url, files={"image": ("w.png", image)}, data={"model": model}, timeout=300)
                res = run_level(url, image, model, c, args.requests, args.time_limit)
                levels.append(res)
                lat = res.get("latency_ms", {})
                print(
                    f"clients={c}: n={res['completed']} p50={lat.get('p50')} ms p95={lat.get('p95')} ms "
                    f"throughput={res.get('throughput_rps')} req/s server denoise p50={res.get('server_denoise_ms_p50')} ms "
                    f"(CPU {res.get('server_denoise_cpu_ms_p50')} ms)"
                )
        finally:
            serve.shutdown()
            ray.shutdown()
    record.update(
        {
            "image": {"size": [args.size, args.size], "format": "png", "dtype": "uint8", "bytes": len(image)},
            "endpoint": "POST /api/denoise (JSON, previews + base64 result, no reference)",
            "model": desc,
            "replicas": args.replicas,
            "cpus_per_replica": args.cpus_per_replica,
            "torch_threads_per_replica": cfg.torch_threads,
            "tile": cfg.tiling.tile,
            "overlap": cfg.tiling.overlap,  # None: from the model's receptive field (104 px, shipped)
            "startup_s": round(startup_s, 1),
            "bounds": {"requests_per_level": args.requests, "time_limit_s_per_level": args.time_limit},
            "levels": levels,
        }
    )
    record["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
