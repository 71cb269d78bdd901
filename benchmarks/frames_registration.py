"""How often does ``semray adapt --frames``' registration pick a wrong shift? (issue 20)

Repeated scans of one field: semray's clean wafer content (every family of
:data:`semray.config.synth.PATTERN_NAMES`, 1-3 defects per field, benchmarks/adapt_domains.render_fields)
is rendered ``2 * PAD`` px larger than the scan, moved by a known shift ``t`` (cubic spline, exact for
whole pixels) and cut to the scan window; scan 0 of the unmoved field and scan 1 of the moved one get
independent noise of the ``lowdose`` chain (benchmarks/adapt_domains.lowdose_scan) at each dose. Then
:func:`semray.ingest.register_pair` (``max_shift_px`` as ``semray adapt``'s ``frames_max_shift_px``)
estimates the shift that moves scan 1 onto scan 0, which is ``-t``; the error is the Euclidean distance
from ``-t``.

Prints, per family and dose, the fraction of pairs off by > 1 px and > 2 px and the median error, and
the median / 90th-percentile error of the pairs within 1 px (sub-pixel precision). Whatever ``semray``
is importable is measured, so the before/after table is two runs::

    PYTHONPATH=$PWD python benchmarks/frames_registration.py --out /tmp/after.json
    git archive main semray | tar -x -C /tmp/semray_main
    PYTHONPATH=/tmp/semray_main python benchmarks/frames_registration.py --out /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapt_domains as dom

PAD = 16
SHIFTS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (0.0, 0.0), (0.4, -0.3), (1.5, 2.25), (-3.0, 4.0), (6.6, -2.7), (-9.0, 7.5),
)  # fmt: skip
"""True shifts (rows, columns) in px; zero twice, as exact scans are the common case."""


def make_pair(
    content: np.ndarray, shift: tuple[float, float], dose: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scan 0 of the centre ``size`` px of ``content`` (float32 (size + 2 PAD, size + 2 PAD)) and scan 1
    of the same window of ``content`` moved by ``shift``; float32 (size, size) on 8-bit grey levels."""
    from scipy import ndimage

    cut = (slice(PAD, PAD + size), slice(PAD, PAD + size))
    moved = ndimage.shift(content.astype(np.float64), shift, order=3, mode="nearest")
    moved = np.clip(moved, 0.0, 1.0).astype(np.float32)
    return dom.lowdose_scan(content[cut], dose, rng), dom.lowdose_scan(moved[cut], dose, rng)


def run_grid(size: int, doses: list[float], seeds: int, max_shift: float) -> list[dict[str, object]]:
    """One row per (seed, family, dose, shift): the estimate and its error in px."""
    from semray.ingest import register_pair

    rows = []
    for seed in range(seeds):
        for field in dom.render_fields(4, size + 2 * PAD, seed=100 + seed):
            for dose in doses:
                for k, t in enumerate(SHIFTS):
                    rng = dom.scan_rng(100 + seed, k, 0, dose)
                    ref, mov = make_pair(field.content, t, dose, size, rng)
                    _, (dy, dx) = register_pair(mov, ref, max_shift_px=max_shift)
                    err = float(np.hypot(dy + t[0], dx + t[1]))
                    rows.append({"seed": seed, "pattern": field.pattern, "dose": dose, "shift": list(t),
                                 "estimate": [dy, dx], "error_px": err})  # fmt: skip
    return rows


def summary(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per (pattern, dose) and overall: n, fraction > 1 px and > 2 px, median error, sub-pixel
    precision (median and 90th percentile of the errors <= 1 px)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        for key in ((str(r["pattern"]), f"{r['dose']:g}"), ("all", f"{r['dose']:g}"), ("all", "all")):
            groups.setdefault(key, []).append(float(r["error_px"]))  # type: ignore[arg-type]
    out = []
    for (pattern, dose), errs in sorted(groups.items()):
        e = np.asarray(errs)
        ok = e[e <= 1.0]
        out.append({
            "pattern": pattern, "dose": dose, "n": int(e.size), "gt1": float(np.mean(e > 1.0)),
            "gt2": float(np.mean(e > 2.0)), "median": float(np.median(e)),
            "sub_median": float(np.median(ok)) if ok.size else float("nan"),
            "sub_p90": float(np.percentile(ok, 90)) if ok.size else float("nan"),
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="scan side, px")
    ap.add_argument("--doses", default="2,5,20", help="comma list of doses, primary e-/px")
    ap.add_argument("--seeds", type=int, default=4, help="content seeds (4 families each)")
    ap.add_argument("--max-shift", type=float, default=16.0, help="frames_max_shift_px")
    ap.add_argument("--out", type=Path, default=None, help="write rows + summary as JSON here")
    a = ap.parse_args(argv)
    import semray.ingest

    t0 = time.time()
    rows = run_grid(a.size, [float(d) for d in a.doses.split(",")], a.seeds, a.max_shift)
    table = summary(rows)
    print(f"semray from {Path(semray.ingest.__file__).parent}; {len(rows)} pairs of {a.size}^2, "
          f"max_shift {a.max_shift:g} px; {time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(
        f"{'pattern':<20}{'dose':>5}{'n':>5}{'>1px':>7}{'>2px':>7}{'median':>8}{'sub med':>9}{'sub p90':>9}"
    )
    for s in table:
        print(f"{s['pattern']:<20}{s['dose']:>5}{s['n']:>5}{s['gt1']:>7.2f}{s['gt2']:>7.2f}"
              f"{s['median']:>8.2f}{s['sub_median']:>9.3f}{s['sub_p90']:>9.3f}")  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "summary": table,
                                     "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
