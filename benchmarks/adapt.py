"""'Another microscope' benchmark of ``semray adapt`` (issue 20), first domain only: shipped (zero-shot)
vs adapted from noisy images only, scored against the clean truth on held-out images.

Domain ``gauss_ar1``: semray's clean wafers with additive Gaussian noise of ``sigma`` whose samples are
correlated along the fast axis x by a one-pole filter (AR(1), lag-1 correlation ``rho``), clipped to
[0, 1]. The shipped model never saw this noise (its training noise is Poisson-Gaussian with at most weak
fast-axis structure). The adaptation sees only the noisy ``--n-adapt`` images; PSNR is measured on
``--n-test`` other images of the same domain.

    python benchmarks/adapt.py --n-adapt 8 --n-test 4 --size 256 --out /tmp/adapt_bench --set optim.epochs=4

Not yet here (see the report of the session that wrote it): the CARE-style oracle, a second (low-dose)
domain, adapted-with-pairs, SSIM/defect PSNR per dose with paired CIs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def ar1_rows(white: np.ndarray, rho: float) -> np.ndarray:
    """AR(1) filter along x (axis 1) of float (H, W) white noise, scaled to keep its variance.

    ``y[:, 0] = w[:, 0]``, ``y[:, j] = rho * y[:, j-1] + sqrt(1 - rho^2) * w[:, j]``: unit lag-1
    correlation ``rho`` and the same variance as ``white``.
    """
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho}")
    out = np.empty_like(white, dtype=np.float64)
    out[:, 0] = white[:, 0]
    g = np.sqrt(1.0 - rho * rho)
    for j in range(1, white.shape[1]):
        out[:, j] = rho * out[:, j - 1] + g * white[:, j]
    return out


def domain_images(
    n: int, size: int, sigma: float, rho: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` (clean, noisy) wafers of ``size`` px: float32 (size, size) in [0, 1] each, noise as above."""
    from semray.synth import PATTERN_NAMES, render_wafer

    clean, noisy = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        c = render_wafer(PATTERN_NAMES[i % len(PATTERN_NAMES)], (size, size), rng).clean
        z = c + sigma * ar1_rows(rng.standard_normal(c.shape), rho)
        clean.append(c.astype(np.float32))
        noisy.append(np.clip(z, 0.0, 1.0).astype(np.float32))
    return clean, noisy


def write_pngs(images: list[np.ndarray], folder: Path) -> list[Path]:
    """16-bit PNGs ``img_000.png``... of float32 [0, 1] images (what a user would hand to semray adapt)."""
    from semray.io import ImageMeta, write_image

    folder.mkdir(parents=True, exist_ok=True)
    meta = ImageMeta(dtype="uint16", shape=(0, 0), format="png")
    return [write_image(folder / f"img_{i:03d}.png", im, meta) for i, im in enumerate(images)]


def main(argv: list[str] | None = None) -> int:
    from semray.adapt import run_adapt
    from semray.config.adapt import AdaptConfig
    from semray.config.base import load_config
    from semray.infer import Denoiser
    from semray.metrics import psnr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-adapt", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    _, noisy = domain_images(a.n_adapt, a.size, a.sigma, a.rho, seed=1)
    clean_t, noisy_t = domain_images(a.n_test, a.size, a.sigma, a.rho, seed=2)
    inputs = write_pngs(noisy, a.out / "inputs")
    t0 = time.time()
    res = run_adapt(inputs, a.out / "adapted", load_config(AdaptConfig, None, a.overrides), overwrite=True)
    wall = time.time() - t0
    scores = {}
    for label, spec in (("shipped", "default"), ("adapted", str(res.model_dir))):
        den = Denoiser(model=spec, device="cpu")
        scores[label] = [psnr(c, den(z)) for c, z in zip(clean_t, noisy_t, strict=True)]
    scores["noisy"] = [psnr(c, z) for c, z in zip(clean_t, noisy_t, strict=True)]
    out = {
        "domain": {"kind": "gauss_ar1", "sigma": a.sigma, "rho": a.rho, "size": a.size},
        "n_adapt": a.n_adapt,
        "n_test": a.n_test,
        "overrides": a.overrides,
        "adapt_wall_s": wall,
        "psnr_mean": {k: float(np.mean(v)) for k, v in scores.items()},
        "psnr_per_image": scores,
        "selection": res.selection,
    }
    (a.out / "result.json").write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps({k: out[k] for k in ("adapt_wall_s", "psnr_mean")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
