"""Seconds per megapixel of the shipped model against the tile size, and of BM3D, on one CPU thread.

Every tile size runs the exact tiling (default overlap from the model's receptive field, so the output
equals a whole-image pass) unless given as ``T/O`` with an explicit overlap; ``whole`` is one tile covering the image (the whole pass itself). All
configurations and BM3D run in ONE process, interleaved round by round in a rotating order, so a busy
shared machine slows them alike and the ratios stay comparable (absolute times are load-dependent).
The image is the quality benchmark's timing image (a wafer render with the generator's noise at the
middle dose), rendered at each size. ``work`` is the pixels the tiles run through the network divided
by the image's pixels (from :func:`semray.infer.axis_plan`).

    python benchmarks/bench_tiles.py --out benchmarks/results/tiles.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WHOLE = 8192  # a tile at least the padded image: one tile, i.e. the whole-image pass


def timing_image(size: int) -> np.ndarray:
    """The quality benchmark's timing image at ``size`` x ``size`` (float32 [0, 1])."""
    from semray.config.evaluate import EvaluateConfig
    from semray.evaluation.runner import _timing_image, generator_noise
    from semray.evaluation.testset import build_conditions

    cfg = EvaluateConfig.model_validate({"runtime": {"size_px": size}})
    return _timing_image(cfg, build_conditions(cfg, generator_noise(cfg))[0]).astype(np.float32)


def work_factor(size: int, tile: int, overlap: int, align: int) -> float:
    """Network pixels / image pixels for a square image (tiles per axis x tile length, squared)."""
    from semray.infer import axis_plan

    t, starts = axis_plan(size, tile, overlap, align)
    return (len(starts) * t / size) ** 2


def timed(fn: Any, image: np.ndarray) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn(image)``. On an oversubscribed machine a 1-thread run's CPU time
    counts the work done, not the time spent waiting for a core, so it is far less noisy than wall."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(image)
    return time.perf_counter() - t0, time.process_time() - c0


def run(sizes: list[int], tiles: list[str], repeats: int, bm3d_repeats: int) -> dict[str, Any]:
    """Interleaved rounds; returns raw times, medians (s/MP) and ratios."""
    from semray.classical import denoise_classical
    from semray.evaluation.methods import limited_threads
    from semray.infer import Denoiser

    dens = {t: Denoiser("unet", tile=int(t.split("/")[0]), overlap=_overlap(t), device="cpu") for t in tiles}
    align = int(next(iter(dens.values())).net.multiple)
    images = {s: timing_image(s) for s in sizes}
    configs = [(s, t) for s in sizes for t in tiles]
    times: dict[str, list[tuple[float, float]]] = {f"{s}/{t}": [] for s, t in configs}
    bm3d: list[tuple[float, float]] = []
    bm3d_img = images[min(sizes)]
    with limited_threads(1):
        for t in tiles:  # warm-up: first-call allocation and kernel selection per configuration
            dens[t](images[min(sizes)][:256, :256])
        if bm3d_repeats:  # and BM3D's one-off costs (imports, FFT plans), as the quality benchmark does
            denoise_classical(bm3d_img[:128, :128], "bm3d")
        for r in range(repeats):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for s, t in order:
                times[f"{s}/{t}"].append(timed(dens[t], images[s]))
                print(f"round {r} size {s} tile {t}: {times[f'{s}/{t}'][-1]} s", flush=True)
            if r < bm3d_repeats:
                bm3d.append(timed(lambda im: denoise_classical(im, "bm3d"), bm3d_img))
                print(f"round {r} bm3d {bm3d_img.shape}: {bm3d[-1]} s", flush=True)
    bm3d_spm = _spm(bm3d, bm3d_img.size) if bm3d else None
    rows = []
    for s, t in configs:
        spm = _spm(times[f"{s}/{t}"], s * s)
        rows.append(
            {
                "size_px": s,
                "tile": "whole" if dens[t].tile >= WHOLE else dens[t].tile,
                "overlap": dens[t].overlap,
                "exact": _overlap(t) is None,  # the default overlap: tiled == whole-image pass
                "work": round(work_factor(s, dens[t].tile, dens[t].overlap, align), 3),
                "wall_s": [round(x[0], 3) for x in times[f"{s}/{t}"]],
                "cpu_s": [round(x[1], 3) for x in times[f"{s}/{t}"]],
                **spm,
                **(_speedup(bm3d_spm, spm) if bm3d_spm else {}),
            }
        )
    return {
        "bm3d": {
            "size_px": int(bm3d_img.shape[0]),
            "wall_s": [round(x[0], 2) for x in bm3d],
            "cpu_s": [round(x[1], 2) for x in bm3d],
            **(bm3d_spm or {}),
        },
        "rows": rows,
    }


def _overlap(spec: str) -> int | None:
    """``"T/O"`` -> O (an explicit overlap: not exact, e.g. the old ``256/32``); ``"T"`` -> None."""
    return int(spec.split("/")[1]) if "/" in spec else None


def _speedup(bm3d: dict[str, float], model: dict[str, float]) -> dict[str, float]:
    """BM3D's s/MP over the model's, by wall and by CPU time."""
    return {
        f"speedup_vs_bm3d_{k}": round(bm3d[f"s_per_mp_{k}"] / model[f"s_per_mp_{k}"], 2)
        for k in ("wall", "cpu")
    }


def _spm(times: list[tuple[float, float]], pixels: int) -> dict[str, float]:
    """Median wall and CPU seconds per megapixel, keyed for the speed-up ratio (named alike)."""
    mp = pixels / 1e6
    wall, cpu = (statistics.median(x[i] for x in times) / mp for i in (0, 1))
    return {"s_per_mp_wall": round(wall, 4), "s_per_mp_cpu": round(cpu, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image sides (px)")
    p.add_argument("--tiles", nargs="+", default=["512", "768", "1024", str(WHOLE)],
                   help="tile sides (px); T/O for an explicit overlap O (old default: 256/32)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--bm3d-repeats", type=int, default=2, help="BM3D runs (first rounds, smallest size)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tiles.json")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    t0 = time.time()
    res = run(a.sizes, a.tiles, a.repeats, a.bm3d_repeats)
    res.update(
        measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        wall_s=round(time.time() - t0, 1),
        threads=1,
        cpus=os.cpu_count(),
        load_average_before=[round(x, 1) for x in load_before],
        load_average_after=[round(x, 1) for x in os.getloadavg()],
    )
    print(json.dumps(res, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
