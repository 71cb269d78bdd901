"""Small lots: wall time of ``semray denoise FOLDER OUT`` in this process vs on Ray actors.

    .venv/bin/python benchmarks/bench_small_lots.py                       # 1, 20, 200 files of 256 x 256
    .venv/bin/python benchmarks/bench_small_lots.py --files 1 20 --size 128 --executors local

Each run is the command a user types (``semray denoise LOT OUT --executor E --no-progress``, plus
``--no-track`` unless ``--track``), timed from the outside as a subprocess, so Python start-up, model
loading, Ray start-up and actor spin-up all count. ``compute_s`` is the sum of the manifest's per-file
``runtime_s`` (read, denoise, write, hash, noise estimates); ``overhead_s = wall_s - compute_s`` for
the in-process executor is what the issue's target bounds (20 files of 256 x 256 within 5 s of their
compute). On Ray the files run on several actors at once, so there ``compute_s`` can exceed the wall.
``cpu_s`` is the user + system CPU time of the command and the processes it waited for (for Ray, the
processes of the local Ray it started, as far as they were reaped before it exited): on a shared,
oversubscribed machine wall times stretch with the load, CPU time much less.
The lot is uint16 TIFFs of random noise (speed does not depend on content) under ``LOT/L<k>/W<k>/``.

Appends one session (machine, command, load average before and after, figures) to
``benchmarks/results/small_lots.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_infer import machine  # noqa: E402  (one machine description for every speed record)


def make_lot(root: Path, n: int, size: int) -> None:
    """``n`` uint16 TIFFs of ``size`` x ``size`` under ``root/L<i%4>/W<i%3>/``."""
    import tifffile

    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / f"L{i % 4}" / f"W{i % 3}" / f"img{i:04d}.tif"
        p.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(p, rng.integers(0, 65535, (size, size), dtype=np.uint16))


def run_cli(lot: Path, out: Path, executor: str, track: bool) -> dict[str, Any]:
    """One ``semray denoise`` subprocess; wall time and the manifest's figures."""
    import pyarrow.parquet as pq

    semray = str(Path(sys.executable).parent / "semray")  # the console script a user runs
    cmd = [semray, "denoise", str(lot), str(out), "--executor", executor]
    cmd += ["--no-progress", "--force"] + ([] if track else ["--no-track"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{out.parent / 'mlflow.db'}"  # one store, made before timing
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    rows = pq.read_table(out / "manifest.parquet").to_pandas()
    compute = float(rows["runtime_s"].sum())
    return {
        "executor": executor,
        "track": track,
        "files": len(rows),
        "ok": int((rows["status"] == "ok").sum()),
        "wall_s": round(wall, 2),
        "compute_s": round(compute, 2),
        "overhead_s": round(wall - compute, 2),
        "cpu_s": round(cpu, 2),
        "summary_line": next((ln for ln in res.stdout.splitlines() if " files: " in ln), ""),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, nargs="+", default=[1, 20, 200], help="lot sizes (files)")
    p.add_argument("--size", type=int, default=256, help="image side (px)")
    p.add_argument("--executors", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    p.add_argument("--track", action="store_true", help="also time the in-process runs with MLflow tracking")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "small_lots.json")
    args = p.parse_args(argv)
    runs = []
    started = machine()  # load average before the runs
    with tempfile.TemporaryDirectory(prefix="semray-small-lots-") as tmp:
        if args.track:  # a user's store exists after the first run: create it (schema migrations) untimed
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
            mlflow.search_experiments()
        for n in args.files:
            lot = Path(tmp) / f"lot{n}"
            make_lot(lot, n, args.size)
            for executor in args.executors:
                for track in [False, True] if (args.track and executor == "local") else [False]:
                    r = run_cli(lot, Path(tmp) / f"out{n}-{executor}-{int(track)}", executor, track)
                    r["megapixels"] = n * args.size * args.size / 1e6
                    print(json.dumps(r), flush=True)
                    runs.append(r)
    record = {
        "command": "python " + shlex.join(["benchmarks/bench_small_lots.py", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": started,
        "image": f"{args.size}x{args.size} uint16 TIFF, shipped default model, OMP_NUM_THREADS=1",
        "note": "each run is a fresh `semray denoise` subprocess; the machine was shared with other jobs",
        "runs": runs,
    }
    record["machine"]["load_average_after"] = list(os.getloadavg())
    # Each invocation is one session, appended: on a shared machine one session's load says little.
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    sessions = old.get("sessions", [old] if old else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sessions": [*sessions, record]}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
