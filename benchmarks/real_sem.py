"""Real SEM images (issue 20): calibration closure on each, and shipped vs adapted vs BM3D on a real
four-frame stack, scored against the registered average of the other three frames.

Data (``--data``, default ``../shared/data/real-sem``, see its README): ``resist_lines_frame{1..4}.jpg``,
four 8-bit JPEG scans of one resist-line field (2048 x 2048 above a 120-row data bar, drift 1-12 px),
and ``low_dose_sem_crop.tif`` (float32 600 x 600, a very noisy single image).

1. Calibration (:func:`semray.calibrate.run_calibration`, estimates + closure) on each frame's centre
   ``--crop`` (data bar excluded by :func:`semray.databar.detect_data_bar`, written as a lossless 8-bit
   PNG of the decoded JPEG pixels) and on the low-dose TIFF as it is. A failure is recorded with its
   traceback and makes the exit status 1; nothing is retried or loosened.
2. For each held-out frame ``k`` (``--heldout``): the other three full frames (bar excluded) are
   registered onto frame ``k`` (:func:`semray.adapt.inputs.average_frames`: sub-pixel cross-correlation
   and a cubic-spline shift, trimmed to the common overlap) and averaged: the reference. Frame ``k``'s
   centre crop is denoised by the shipped model, by a model adapted with ``semray adapt`` to that crop
   alone (noisy only, ``--adapt-for``; ``--set`` goes to its AdaptConfig) and by BM3D (``--bm3d-for``,
   sigma from ``--bm3d-sigma``), and scored by affine-fitted PSNR (:func:`semray.metrics.affine_psnr`)
   on the crop minus ``--margin`` px, inside the overlap.
3. The reference is noisy: its noise variance is the frames' (:func:`semray.metrics.
   frame_pair_noise_variance` of the three registered frames) over 3, which bounds the PSNR any
   denoiser can get against it (:func:`semray.metrics.noisy_reference_psnr_bound`); the table also
   gives the clean-image PSNR that each score implies (:func:`semray.metrics.clean_psnr_estimate`).

    python benchmarks/real_sem.py --out /tmp/real_sem --crop 1024 --heldout all --bm3d-sigma calib,frames \
        --set optim.epochs=2 --set optim.steps_per_epoch=15

(the recorded run, benchmarks/results/real_sem.md; ``--crop 256`` and ``--set optim.steps_per_epoch=4`` for
a quick try) writes ``OUT/result.json`` and ``OUT/result.md`` (plus the calibrations, inputs and adapt runs);
``--render-only`` rewrites ``OUT/result.md`` from ``OUT/result.json``.
MLflow goes to ``OUT/semray_home`` unless ``SEMRAY_HOME`` or ``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from semray.jsonsafe import json_safe

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-sem"
FRAMES_GLOB, LOW_DOSE = "resist_lines_frame*.jpg", "low_dose_sem_crop.tif"
DN = 255.0  # 8-bit grey levels per unit intensity (the frames are 8-bit)
SIGMA_SOURCES = ("calib", "frames", "wavelet")


def read_frames(data: Path) -> tuple[list[Path], list[np.ndarray], list[int]]:
    """The resist frames with their data bars cut off: ``(files, float32 (H, W) [0, 1] images, bar rows)``."""
    from semray.databar import detect_data_bar
    from semray.io import read_image

    files = sorted(data.glob(FRAMES_GLOB))
    if len(files) < 2:
        raise FileNotFoundError(f"{data}: need at least two {FRAMES_GLOB} frames, found {len(files)}")
    images, bars = [], []
    for f in files:
        img, _ = read_image(f)
        bar = detect_data_bar(img)
        images.append(img[: img.shape[0] - bar])
        bars.append(bar)
    return files, images, bars


def centre_window(shape: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    """``(y0, x0, h, w)`` of the centred ``crop`` x ``crop`` window (the whole image for 0 or a larger crop)."""
    h, w = min(crop or shape[0], shape[0]), min(crop or shape[1], shape[1])
    return (shape[0] - h) // 2, (shape[1] - w) // 2, h, w


def calibrate_file(path: Path, out: Path) -> dict[str, Any]:
    """:func:`run_calibration` on one file: estimates, closure and warnings, or the error with its traceback."""
    from semray.calibrate import run_calibration

    t0 = time.time()
    try:
        res = run_calibration([path], out / "noise.yaml")
    except Exception as e:  # recorded as the result of this image (and exit status 1), never hidden
        return {"file": str(path), "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    js = res.to_json()
    keep = ("poisson_a", "poisson_b", "dose_e_per_px", "read_noise_sigma", "fast_axis_noise_corr",
            "slow_axis_noise_corr", "scan_line_offset_sigma", "line_jitter_px", "quant_step")  # fmt: skip
    return {
        "file": str(path),
        "seconds": round(time.time() - t0, 1),
        "estimates": {k: v for k, v in js["estimates"].items() if k in keep},
        "closure": js["closure"],
        "warnings": js["warnings"],
    }


def noise_sigma_at(cal: dict[str, Any], intensity: float) -> float:
    """Noise std of the calibrated model ``var = a * I + b`` at ``intensity`` (NaN without a calibration)."""
    e = cal.get("estimates")
    if not e:
        return float("nan")
    return math.sqrt(max(e["poisson_a"]["value"] * intensity + e["poisson_b"]["value"], 0.0))


def loo_reference(frames: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], Any]:
    """Frame ``k`` and the registered average of the others, on the common overlap (full-frame coordinates
    shifted by the trim ``m``): ``(frame k, reference, registered others, (shifts, m))``."""
    from semray.adapt.inputs import average_frames

    others = [f for i, f in enumerate(frames) if i != k]
    moved, _, shifts = average_frames([frames[k], *others])
    m = (frames[k].shape[0] - moved[0].shape[0]) // 2
    ref = np.mean(np.stack(moved[1:]).astype(np.float64), axis=0)
    return moved[0], ref, moved[1:], (shifts[1:], m)


def score_window(
    shape: tuple[int, int], win: tuple[int, int, int, int], m: int, margin: int
) -> tuple[slice, slice, slice, slice]:
    """Slices of the scored region: in the crop ``win`` and in the trimmed (registered) frames.

    The region is the crop less ``margin`` px on each side, intersected with the overlap ``[m, H - m)``.
    """
    y0, x0, h, w = win
    ys, ye = max(y0 + margin, m), min(y0 + h - margin, shape[0] - m)
    xs, xe = max(x0 + margin, m), min(x0 + w - margin, shape[1] - m)
    if ye - ys < 16 or xe - xs < 16:
        raise ValueError(f"scored region {ye - ys} x {xe - xs} px is too small (crop {win}, trim {m})")
    return slice(ys - y0, ye - y0), slice(xs - x0, xe - x0), slice(ys - m, ye - m), slice(xs - m, xe - m)


def bounds(frame_k: np.ndarray, others: list[np.ndarray]) -> dict[str, float]:
    """Noise of the frames (from registered differences) and what it means for scores against the reference.

    ``frame_noise_var``: per-frame variance of the registered (interpolated) reference frames;
    ``heldout_noise_var``: frame k's own, from ``var(f_k - g_j) = s_k^2 + s_g^2``; the reference's is
    ``frame_noise_var / len(others)``.
    """
    from semray.metrics import frame_pair_noise_variance, noisy_reference_psnr_bound

    var_g = frame_pair_noise_variance(others)
    var_k = float(np.mean([2 * frame_pair_noise_variance([frame_k, g]) for g in others])) - var_g
    n = len(others)
    var_ref = var_g / n
    return {
        "frame_noise_var": var_g,
        "frame_noise_std_dn": math.sqrt(var_g) * DN,
        "heldout_noise_std_dn": math.sqrt(max(var_k, 0.0)) * DN,
        "frame_diff_std_dn": math.sqrt(2 * var_g) * DN,
        "reference_noise_var": var_ref,
        "reference_noise_std_dn": math.sqrt(var_ref) * DN,
        "perfect_denoiser_psnr": noisy_reference_psnr_bound(var_g, n),
        "noisy_frame_psnr_expected": 10 * math.log10(1.0 / (max(var_k, 0.0) + var_ref)),
    }


def method_scores(ref: np.ndarray, out: np.ndarray, ref_noise_var: float) -> dict[str, float]:
    """Affine-fitted and plain PSNR of ``out`` against ``ref``, and the clean-image PSNR they imply."""
    from semray.metrics import affine_psnr, clean_psnr_estimate, psnr

    p, a, b = affine_psnr(ref, out)
    return {
        "affine_psnr": p,
        "gain": a,
        "offset": b,
        "plain_psnr": psnr(ref, out),
        "clean_psnr_estimate": clean_psnr_estimate(p, ref_noise_var),
    }


def adapt_model(crop_png: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    """``semray adapt`` on one noisy crop (no other frame, no reference): the model folder and its report."""
    from semray.adapt import run_adapt
    from semray.config.adapt import AdaptConfig
    from semray.config.base import load_config

    t0 = time.time()
    res = run_adapt([crop_png], out, load_config(AdaptConfig, None, overrides), overwrite=True)
    return {
        "model_dir": str(res.model_dir),
        "wall_s": round(time.time() - t0, 1),
        "timings": res.timings,
        "verdict": res.verdict,
        "selection": res.selection,
    }


def bm3d_sigmas(crop: np.ndarray, cal: dict[str, Any], bnd: dict[str, float]) -> dict[str, float]:
    """Noise std for BM3D from each source: the calibration of this crop at its mean intensity, the
    registered frame differences (frame k's own noise), and the wavelet estimate of the crop alone."""
    from semray.classical import estimate_noise_sigma

    return {
        "calib": noise_sigma_at(cal, float(crop.mean())),
        "frames": bnd["heldout_noise_std_dn"] / DN,
        "wavelet": estimate_noise_sigma(crop),
    }


def denoise_heldout(
    crop: np.ndarray, k: int, plan: dict[str, Any], sigmas: dict[str, float]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every method's output for frame ``k``'s crop (float32, crop shape) and facts about each run."""
    from semray.infer import Denoiser

    outs: dict[str, np.ndarray] = {"noisy": crop}
    info: dict[str, Any] = {}
    t0 = time.time()
    outs["shipped"] = plan["shipped"](crop)
    info["shipped"] = {"model": f"{plan['shipped'].name} v{plan['shipped'].version}", "s": time.time() - t0}
    if k in plan["adapt_for"]:
        ad = adapt_model(plan["crop_files"][k], plan["out"] / "adapt" / f"frame{k + 1}", plan["overrides"])
        t0 = time.time()
        outs["adapted"] = Denoiser(model=ad["model_dir"], device="cpu")(crop)
        info["adapted"] = ad | {"s": time.time() - t0}
    if k in plan["bm3d_for"]:
        for src in plan["bm3d_sigma"]:
            s = sigmas[src]
            if not math.isfinite(s):
                info[f"bm3d[{src}]"] = {"skipped": f"no {src} sigma (calibration failed?)"}
                continue
            t0 = time.time()
            outs[f"bm3d[{src}]"] = Denoiser("bm3d", device="cpu", classical_params={"sigma": s})(crop)
            info[f"bm3d[{src}]"] = {"sigma": s, "sigma_dn": s * DN, "s": time.time() - t0}
    return outs, info


def run_heldout(
    frames: list[np.ndarray], k: int, plan: dict[str, Any], cal: dict[str, Any]
) -> dict[str, Any]:
    """Leave-one-out for frame ``k``: reference, bounds, every method's scores on the scored region."""
    t0 = time.time()
    frame_k, ref, others, (shifts, m) = loo_reference(frames, k)
    reg_s = time.time() - t0
    win = centre_window(frames[k].shape, plan["crop"])
    cy, cx, ry, rx = score_window(frames[k].shape, win, m, plan["margin"])
    crop = frames[k][win[0] : win[0] + win[2], win[1] : win[1] + win[3]]
    if not np.array_equal(crop[cy, cx], frame_k[ry, rx]):
        raise AssertionError("the crop and the registered frame k disagree on the scored region")
    bnd = bounds(frame_k[ry, rx], [g[ry, rx] for g in others])
    sigmas = bm3d_sigmas(crop, cal, bnd)
    outs, info = denoise_heldout(crop, k, plan, sigmas)
    scores = {
        name: method_scores(ref[ry, rx], o[cy, cx], bnd["reference_noise_var"]) for name, o in outs.items()
    }
    return {
        "heldout": k + 1,
        "shifts_onto_heldout": shifts,
        "trim_px": m,
        "registration_s": round(reg_s, 1),
        "scored_region": [cy.stop - cy.start, cx.stop - cx.start],
        "bounds": bnd,
        "sigma_sources": {s: v * DN for s, v in sigmas.items()},
        "scores": scores,
        "runs": info,
    }


def _f(v: Any, fmt: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _acf_errors(c: dict[str, Any]) -> str:
    """Synthetic minus real noise autocorrelation at lags 1-3, along x then y."""
    parts = []
    for axis in ("x", "y"):
        pairs = zip(c[f"acf_{axis}_real"], c[f"acf_{axis}_synthetic"], strict=True)
        diffs = [None if r is None or s is None else s - r for r, s in pairs]
        parts.append(f"{axis} " + "/".join(_f(d) for d in diffs))
    return "; ".join(parts)


def _est(e: dict[str, Any], fmt: str = ".2f") -> str:
    """An estimate's value, marked ``(n.d.)`` when it was not detected (then it is not in the config)."""
    return _f(e["value"], fmt) + ("" if e["detected"] else " (n.d.)")


def calibration_table(cals: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: headline estimates and closure residuals per image (the error where one failed)."""
    rows = [
        "| image | a (var/I) | b | sigma at mean (range 1) | lag-1 corr x / y | var rel. error per bin (%) | max | "
        "ACF error lags 1-3 (synth - real) | max | within targets (var / ACF) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cals.items():
        if "error" in c:
            rows.append(f"| {name} | **calibration failed**: {c['error']} | | | | | | | | |")
            continue
        e, cl = c["estimates"], c["closure"]
        bins = " ".join(_f(None if v is None else 100 * v, ".0f") for v in cl["mv_rel_error"])
        corr = f"{_est(e['fast_axis_noise_corr'])} / {_est(e['slow_axis_noise_corr'])}"
        rows.append(
            f"| {name} | {_est(e['poisson_a'], '.2e')} | {_est(e['poisson_b'], '.2e')} | "
            f"{_f(c['sigma_at_mean'], '.4f')} | {corr} | {bins} | {_f(100 * cl['mv_rel_error_max'], '.0f')} | "
            f"{_acf_errors(cl)} | {_f(cl['acf_abs_error_max'])} | "
            f"{'yes' if cl['mv_within_target'] else 'no'} / {'yes' if cl['acf_within_target'] else 'no'} |"
        )
    return rows


def _implied(psnr_db: float, ref_var: float) -> str:
    """Implied clean PSNR, with its range if the reference's noise variance were 10 % lower / higher."""
    from semray.metrics import clean_psnr_estimate

    mid, lo, hi = (clean_psnr_estimate(psnr_db, f * ref_var) for f in (1.0, 0.9, 1.1))
    return f"{_f(mid)} ({_f(lo)} to {_f(hi) if math.isfinite(hi) else 'unbounded'})"


def scores_table(r: dict[str, Any]) -> list[str]:
    """Markdown for one held-out frame: the bounds line and one row per method."""
    b = r["bounds"]
    rows = [
        f"Held-out frame {r['heldout']} (scored {r['scored_region'][0]} x {r['scored_region'][1]} px; shifts of "
        f"the others onto it {r['shifts_onto_heldout']}): frame noise std {b['frame_noise_std_dn']:.2f} DN "
        f"(held-out frame {b['heldout_noise_std_dn']:.2f} DN), reference noise std "
        f"{b['reference_noise_std_dn']:.2f} DN; a perfect denoiser scores **{b['perfect_denoiser_psnr']:.2f} dB** "
        f"against this reference, the noisy frame is expected at {b['noisy_frame_psnr_expected']:.2f} dB.",
        "",
        "| method | affine-fitted PSNR (dB) | gain a | offset b | plain PSNR (dB) | implied clean PSNR (dB; "
        "reference noise variance -10 % to +10 %) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in r["scores"].items():
        rows.append(
            f"| {name} | {s['affine_psnr']:.2f} | {s['gain']:.3f} | {s['offset']:.4f} | {s['plain_psnr']:.2f} | "
            f"{_implied(s['affine_psnr'], b['reference_noise_var'])} |"
        )
    return rows


def _frame_list(spec: str, n: int, default: list[int]) -> list[int]:
    """0-based frame indices from ``1,3`` / ``all`` / ``none`` (``default`` for an empty spec)."""
    if spec == "":
        return default
    if spec in ("all", "none"):
        return list(range(n)) if spec == "all" else []
    ks = [int(s) - 1 for s in spec.split(",")]
    if any(not 0 <= k < n for k in ks):
        raise SystemExit(f"frame numbers must be in 1..{n}, got {spec!r}")
    return ks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder of the real images")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--crop", type=int, default=1024, help="centre crop side of each frame (0: whole frame)")
    ap.add_argument("--margin", type=int, default=16, help="px left out of the score at each crop edge")
    ap.add_argument("--heldout", default="all", help="frames held out in turn: 1,2 / all")
    ap.add_argument(
        "--adapt-for", default="", help="held-out frames with an adapted model (default: the first; none)"
    )
    ap.add_argument(
        "--bm3d-for", default="", help="held-out frames scored with BM3D (default: the first; none)"
    )
    ap.add_argument("--bm3d-sigma", default="calib", help=f"comma list of {'/'.join(SIGMA_SOURCES)}")
    ap.add_argument("--no-low-dose", action="store_true", help="skip the low-dose crop's calibration")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="AdaptConfig override")
    ap.add_argument("--render-only", action="store_true", help="rewrite OUT/result.md from OUT/result.json")
    a = ap.parse_args(argv)
    a.bm3d_sigma = a.bm3d_sigma.split(",")
    if bad := sorted(set(a.bm3d_sigma) - set(SIGMA_SOURCES)):
        ap.error(f"--bm3d-sigma: unknown source(s) {bad}; valid: {', '.join(SIGMA_SOURCES)}")
    return a


def write_crops(frames: list[np.ndarray], crop: int, folder: Path) -> list[Path]:
    """Each frame's centre crop as a lossless 8-bit PNG (the decoded JPEG's own grey levels)."""
    from semray.io import write_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(frames):
        y0, x0, h, w = centre_window(f.shape, crop)
        paths.append(write_image(folder / f"frame{i + 1}.png", f[y0 : y0 + h, x0 : x0 + w]))
    return paths


def calibrate_all(crop_files: list[Path], low_dose: Path | None, out: Path) -> dict[str, dict[str, Any]]:
    """:func:`calibrate_file` on every frame crop and the low-dose image, with the model's sigma at the mean."""
    from semray.io import read_image

    todo = {f"frame{i + 1} crop": p for i, p in enumerate(crop_files)}
    if low_dose is not None:
        todo["low-dose crop"] = low_dose
    cals = {}
    for name, path in todo.items():
        c = calibrate_file(path, out / "calibration" / name.replace(" ", "_"))
        c["sigma_at_mean"] = noise_sigma_at(c, float(read_image(path)[0].mean()))
        cals[name] = c
        print(f"calibrated {name}: {c.get('error') or 'ok'} ({c.get('seconds', '-')} s)", flush=True)
    return cals


def write_report(out: Path, result: dict[str, Any]) -> None:
    """``result.json`` and ``result.md`` (the calibration table and one score table per held-out frame)."""
    (out / "result.json").write_text(json.dumps(json_safe(result), indent=2))
    md = ["## Calibration and closure", "", *calibration_table(result["calibration"]), ""]
    for name, c in result["calibration"].items():
        if c.get("warnings"):
            md.append(f"- {name} warnings: " + " | ".join(c["warnings"]))
    md += ["", "## Leave-one-out scores against the registered average of the other frames", ""]
    for r in result["heldout"]:
        md += [*scores_table(r), ""]
    (out / "result.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = a.out.resolve()
    if a.render_only:
        write_report(out, json.loads((out / "result.json").read_text()))
        print((out / "result.md").read_text())
        return 0
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SEMRAY_HOME", str(out / "semray_home"))
    from semray.infer import Denoiser

    t0 = time.time()
    files, frames, bars = read_frames(a.data)
    heldout = _frame_list(a.heldout, len(frames), list(range(len(frames))))
    crop_files = write_crops(frames, a.crop, out / "inputs")
    cals = calibrate_all(crop_files, None if a.no_low_dose else a.data / LOW_DOSE, out)
    plan = {
        "out": out, "crop": a.crop, "margin": a.margin, "crop_files": crop_files, "overrides": a.overrides,
        "shipped": Denoiser(model="default", device="cpu"), "bm3d_sigma": a.bm3d_sigma,
        "adapt_for": _frame_list(a.adapt_for, len(frames), heldout[:1]),
        "bm3d_for": _frame_list(a.bm3d_for, len(frames), heldout[:1]),
    }  # fmt: skip
    results = []
    for k in heldout:
        results.append(run_heldout(frames, k, plan, cals[f"frame{k + 1} crop"]))
        print("\n".join(scores_table(results[-1])), flush=True)
    result = {
        "frames": [str(f) for f in files],
        "data_bar_rows": bars,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "calibration": cals,
        "heldout": results,
        "wall_s": round(time.time() - t0, 1),
        "load_average": os.getloadavg(),
    }
    write_report(out, result)
    print((out / "result.md").read_text())
    failed = [name for name, c in cals.items() if "error" in c]
    if failed:
        print(f"calibration FAILED on {failed}: see result.json (error and traceback)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
