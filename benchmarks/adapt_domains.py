"""Domains of the "another microscope" benchmark (benchmarks/adapt.py): clean content with defect masks,
the noise-free truth of each acquisition chain, and its noisy scans.

What the shipped model saw in training (semray/assets/models/default/card.json, configs/train_common.yaml,
semray.config.noise defaults): semray.synth's four families (lines, contacts, contacts_staggered,
tin_balls; lines horizontal or vertical) under semray.noise's Poisson-Gaussian chain: dose 1.5-400
e-/px, SE yield *linear* in intensity (0.1-0.3 at 0, 0.9-1.5 at 1), detector gain spread cv 0.3-0.7,
read noise 0.002-0.015, per-row offsets/gains, 8-bit ADC mapped back onto the clean scale (black level
-0.04..0, white 1-1.08), no noise correlation (``bandwidth`` off). So its noise variance is affine in
the intensity, ``a * I + b`` with ``b >= 0`` at ``I = 0``, and white.

Domains (each a truth function and a noisy-scan function of the clean content):

* ``gauss_ar1`` (kept from the first version of the benchmark): additive Gaussian noise of ``sigma``
  (the level, 0.1), AR(1)-correlated along the fast axis x (lag-1 ``rho`` 0.5), clipped to [0, 1],
  16-bit PNGs. Signal-independent noise with correlation the shipped model never saw. Truth = content.
* ``lowdose`` (levels: dose in primary e-/px, default 2 and 5): mean detected SE count
  ``dose * (0.1 + 0.9 c)`` (a few SE/px); Poisson counts; every SE's pulse height exponential (gain
  spread cv 1, a single-stage multiplier, vs 0.3-0.7 in training); a compressive detector response
  ``r = (S / dose)**0.6`` of the summed pulse height ``S`` (gamma 0.6; ``S / dose`` is 1 on average
  at intensity 1); the fluctuation of ``r`` correlated along x
  by the amplifier bandwidth (AR(1), lag-1 0.4, variance and mean kept, as semray.noise's bandwidth
  component); black-level offset 0.12 and gain 0.4; read noise 0.01; 8-bit ADC on [0, 1] (clipping).
  The variance is not affine in the mean (the gamma stretches the dark end: a pixel with no SE is
  exactly the black level) and the dark level is offset, so neither the gain law nor the correlation is
  in the training noise; only the dose range overlaps. Truth = the chain's expected output before the
  ADC, ``0.12 + 0.4 E[r]`` (about 0.17-0.47 at 2 e-/px), computed exactly (Poisson sum of
  ``Gamma(n + 0.6) / Gamma(n)``): what averaging infinitely many scans converges to, up to the ADC's
  clipping of the brightest scans (0.8 % of the pixels of a flat field at intensity 1 at 2 e-/px; the
  mean of 200 scans is within 0.002 of the truth, tests/test_bench_adapt.py).
* ``diag_ar1`` (a pattern family never seen): every semray pattern rotated by 20-70 degrees (diagonal
  line/space, rotated contact lattices; rendered larger, rotated with linear interpolation, centre-cut;
  mask recomputed from the rotated defect-free reference), Gaussian noise sigma 0.08 with strong
  fast-axis correlation (lag-1 0.7), clipped, 16-bit PNGs.

Content: semray.synth with every image holding 1-3 defects (``defect_probability`` 1, so defect-region
PSNR exists on every test image), families cycled by image index; image ``i`` of seed ``s`` is
``default_rng([s, i])``, noise scan ``k`` at level ``L`` is ``default_rng([s, i, k, round(1000 L)])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOWDOSE = {"eta0": 0.1, "eta1": 1.0, "gamma": 0.6, "black": 0.12, "gain": 0.4, "rho": 0.4, "read": 0.01}
"""The low-dose chain's constants (see the module docstring): SE yield at intensity 0 and 1 (SE/e),
response exponent, black level and gain (output units), fast-axis lag-1 correlation, read noise."""


@dataclass
class FieldContent:
    """One clean field: ``content`` float32 (H, W) in [0, 1] (semray.synth scale), ``defect_mask`` bool (H, W)."""

    content: np.ndarray
    defect_mask: np.ndarray
    pattern: str


@dataclass(frozen=True)
class Domain:
    """One microscope: how content becomes the truth and a noisy scan, at a level (sigma or dose).

    ``truth(content, level)`` and ``scan(content, level, rng)`` take/return float32 (H, W); scans are on
    the file's grey levels (``file_dtype`` uint8 or uint16) so what is scored is what a file holds.
    """

    name: str
    levels: tuple[float, ...]
    level_unit: str
    file_dtype: str
    rotated: bool
    truth: Callable[[np.ndarray, float], np.ndarray]
    scan: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def ar1_rows(white: np.ndarray, rho: float) -> np.ndarray:
    """AR(1) filter along x (axis 1) of float (H, W) white noise, keeping its variance (float32).

    ``y[:, 0] = w[:, 0]``, ``y[:, j] = rho * y[:, j-1] + sqrt(1 - rho^2) * w[:, j]``: lag-1 correlation
    ``rho`` along x (lag k: rho**k), none along y (:func:`semray.noise.bandwidth_filter`).
    """
    from semray.noise import bandwidth_filter

    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho}")
    return bandwidth_filter(np.asarray(white, dtype=np.float32), rho, 0.0)[0]


def file_levels(image: np.ndarray, dtype: str) -> np.ndarray:
    """``image`` clipped to [0, 1] and rounded to the grey levels of a ``dtype`` (uint8/uint16) file."""
    top = float(np.iinfo(dtype).max)
    return (np.rint(np.clip(image, 0.0, 1.0) * top) / top).astype(np.float32)


def _gauss_scan(sigma: float, rho: float) -> Callable[[np.ndarray, float, np.random.Generator], np.ndarray]:
    def scan(content: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
        z = content + level * ar1_rows(rng.standard_normal(content.shape), rho)
        return file_levels(z, "uint16")

    return scan


def lowdose_mean_response(lam: np.ndarray, dose: float) -> np.ndarray:
    """``E[r]``, r = (S / (dose * eta1))**gamma, S = sum of N ~ Poisson(lam) unit exponentials.

    Exact: ``sum_{n >= 1} P(n; lam) Gamma(n + gamma) / Gamma(n) / (dose * eta1)**gamma``, tabulated on
    1025 points of [0, dose * eta1] and interpolated (error < 1e-6). ``lam``: float (H, W) SE means.
    """
    from scipy.special import gammaln

    g, lmax = LOWDOSE["gamma"], dose * LOWDOSE["eta1"]
    grid = np.linspace(0.0, lmax, 1025)
    n = np.arange(1, int(np.ceil(lmax + 12 * np.sqrt(lmax) + 30)) + 1)[None, :]
    log_p = -grid[:, None] + n * np.log(np.maximum(grid[:, None], 1e-300)) - gammaln(n + 1)
    table = np.exp(log_p + gammaln(n + g) - gammaln(n)).sum(axis=1) / lmax**g
    return np.interp(lam, grid, table).astype(np.float32)


def _se_mean(content: np.ndarray, dose: float) -> np.ndarray:
    return dose * (LOWDOSE["eta0"] + (LOWDOSE["eta1"] - LOWDOSE["eta0"]) * content.astype(np.float64))


def lowdose_truth(content: np.ndarray, dose: float) -> np.ndarray:
    """Expected detector output before the ADC: ``black + gain * E[r]`` (float32 (H, W))."""
    mean = lowdose_mean_response(_se_mean(content, dose), dose)
    return (LOWDOSE["black"] + LOWDOSE["gain"] * mean).astype(np.float32)


def lowdose_scan(content: np.ndarray, dose: float, rng: np.random.Generator) -> np.ndarray:
    """One low-dose scan (see the module docstring), float32 (H, W) on 8-bit grey levels."""
    from semray.noise import bandwidth_filter

    p = LOWDOSE
    lam = _se_mean(content, dose)
    pulses = rng.gamma(rng.poisson(lam))  # sum of n unit exponentials; 0 where no SE
    r = (pulses / (dose * p["eta1"])) ** p["gamma"]
    mean = lowdose_mean_response(lam, dose)
    fluct = bandwidth_filter((r - mean).astype(np.float32), p["rho"], 0.0)[0]
    out = p["black"] + p["gain"] * (mean + fluct) + p["read"] * rng.standard_normal(content.shape)
    return file_levels(out, "uint8")


def _identity_truth(content: np.ndarray, level: float) -> np.ndarray:
    return content.astype(np.float32)


DOMAINS: dict[str, Domain] = {
    "gauss_ar1": Domain(
        "gauss_ar1", (0.1,), "sigma", "uint16", False, _identity_truth, _gauss_scan(0.1, 0.5)
    ),
    "lowdose": Domain("lowdose", (2.0, 5.0), "e-/px", "uint8", False, lowdose_truth, lowdose_scan),
    "diag_ar1": Domain("diag_ar1", (0.08,), "sigma", "uint16", True, _identity_truth, _gauss_scan(0.08, 0.7)),
}


def _rotated(pattern: str, size: int, rng: np.random.Generator, cfg: object) -> FieldContent:
    """``pattern`` rendered at ``ceil(size * sqrt 2) + 4`` px, rotated by U(20, 70) degrees, centre-cut."""
    from scipy.ndimage import rotate

    from semray.synth import render_wafer

    big = int(np.ceil(size * np.sqrt(2.0))) + 4
    s = render_wafer(pattern, (big, big), rng, cfg)  # type: ignore[arg-type]
    angle = float(rng.uniform(20.0, 70.0))
    y0 = (big - size) // 2
    cut = (slice(y0, y0 + size), slice(y0, y0 + size))
    clean = rotate(s.clean, angle, reshape=False, order=1, mode="nearest")[cut]
    ref = rotate(s.reference, angle, reshape=False, order=1, mode="nearest")[cut]
    mask = np.abs(clean - ref) > cfg.mask_tolerance  # type: ignore[attr-defined]
    return FieldContent(np.clip(clean, 0, 1).astype(np.float32), mask, f"{pattern}_rot{angle:.0f}")


def render_fields(n: int, size: int, seed: int, rotated: bool = False) -> list[FieldContent]:
    """``n`` clean fields of ``size`` x ``size`` px with 1-3 defects each (families cycled by index)."""
    from semray.config.synth import PATTERN_NAMES, SynthConfig
    from semray.synth import render_wafer

    cfg = SynthConfig(defect_probability=1.0)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        pattern = PATTERN_NAMES[i % len(PATTERN_NAMES)]
        if rotated:
            out.append(_rotated(pattern, size, rng, cfg))
        else:
            s = render_wafer(pattern, (size, size), rng, cfg)
            out.append(FieldContent(s.clean, s.defect_mask, pattern))
    return out


def scan_rng(seed: int, index: int, scan: int, level: float) -> np.random.Generator:
    """The noise stream of scan ``scan`` of field ``index`` (of content seed ``seed``) at ``level``."""
    return np.random.default_rng([seed, index, scan, round(1000 * level)])


def scans(
    domain: Domain, fields: Sequence[FieldContent], level: float, seed: int, scan: int = 0
) -> list[np.ndarray]:
    """Scan number ``scan`` of every field at ``level`` (independent noise per field and scan)."""
    return [domain.scan(f.content, level, scan_rng(seed, i, scan, level)) for i, f in enumerate(fields)]


def write_pngs(images: Sequence[np.ndarray], folder: Path, dtype: str = "uint16") -> list[Path]:
    """``img_000.png``... of float32 [0, 1] images as ``dtype`` PNGs (what a user would hand to semray adapt)."""
    from semray.io import ImageMeta, write_image

    folder.mkdir(parents=True, exist_ok=True)
    meta = ImageMeta(dtype=dtype, shape=(0, 0), format="png")
    return [write_image(folder / f"img_{i:03d}.png", im, meta) for i, im in enumerate(images)]
