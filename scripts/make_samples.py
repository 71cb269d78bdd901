"""Render the small synthetic sample images shipped with the web app (``semray/assets/samples/``).

Each sample is a noisy/clean pair of one synthetic wafer field, written in a different file flavour so
the app's "same format and dtype out as in" path is exercised by the samples too:

    lines      256 x 256  8-bit PNG   (line/space grating, low dose)
    contacts   256 x 256  16-bit PNG  (contact-hole array)
    tin_balls  256 x 256  16-bit TIFF (tin balls on carbon, the resolution-test specimen)

plus ``samples.json``, the index the app serves at ``GET /api/samples``. Everything is a deterministic
function of ``SEED``: rerunning the script rewrites byte-identical images (PNG/TIFF writers add no
timestamps), so the files in git can be checked against it.

Run: ``python scripts/make_samples.py [--out semray/assets/samples]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from semray.config.base import load_config
from semray.config.noise import NoiseConfig
from semray.io import ImageMeta, write_image
from semray.noise import synthesize
from semray.synth import render_wafer

SEED = 20240801
SHAPE = (256, 256)
OUT = Path(__file__).resolve().parent.parent / "semray" / "assets" / "samples"

#: name -> (pattern, file dtype, file format, primary dose in e-/px, what the user sees)
SAMPLES: dict[str, tuple[str, str, str, float, str]] = {
    "lines": ("lines", "uint8", "png", 20.0, "Line/space grating, fast scan (8-bit PNG)"),
    "contacts": ("contacts", "uint16", "png", 30.0, "Contact-hole array (16-bit PNG)"),
    "tin_balls": ("tin_balls", "uint16", "tiff", 25.0, "Tin balls on carbon (16-bit TIFF)"),
}


def _noise_config(dose: float) -> NoiseConfig:
    # Dose pinned so each sample is noisy enough to show what denoising does; the other components keep
    # their default ranges (drawn from the seeded generator).
    return load_config(NoiseConfig, {"shot": {"dose_e_per_px": {"low": dose, "high": dose}}})


def render_sample(name: str, seed: int = SEED) -> dict[str, object]:
    """Render one sample: clean (H, W) float32 [0, 1], noisy likewise, and its index record."""
    pattern, dtype, fmt, dose, description = SAMPLES[name]
    index = list(SAMPLES).index(name)
    # Try successive sub-seeds until the field carries a defect: samples should show one.
    for attempt in range(64):
        rng = np.random.default_rng([seed, index, attempt])
        wafer = render_wafer(pattern, SHAPE, rng)
        if wafer.defects:
            break
    noisy, params = synthesize(wafer.clean, _noise_config(dose), rng)
    return {
        "clean": wafer.clean,
        "noisy": noisy,
        "record": {
            "name": name,
            "description": description,
            "pattern": pattern,
            "dtype": dtype,
            "format": fmt,
            "shape": list(SHAPE),
            "dose_e_per_px": dose,
            "defects": [d["type"] for d in wafer.defects],
            "seed": [seed, index, attempt],
        },
        "meta": ImageMeta(dtype=dtype, shape=SHAPE, format=fmt),
        "params": params,
    }


def write_samples(out: Path = OUT, seed: int = SEED) -> list[dict[str, object]]:
    """Write every sample pair and ``samples.json`` into ``out``; returns the index records."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in SAMPLES:
        s = render_sample(name, seed)
        rec = dict(s["record"])  # type: ignore[arg-type]
        suffix = ".png" if rec["format"] == "png" else ".tif"
        for kind in ("noisy", "clean"):
            fname = f"{name}_{kind}{suffix}"
            path = write_image(out / fname, s[kind], s["meta"])  # type: ignore[arg-type]
            path.chmod(0o644)  # write_image's temp file is 0600; package data must be world-readable
            rec[f"{kind}_file"] = fname
        records.append(rec)
    (out / "samples.json").write_text(json.dumps({"seed": seed, "samples": records}, indent=2) + "\n")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    args = parser.parse_args()
    for rec in write_samples(args.out, args.seed):
        print(f"{rec['name']:10s} {rec['format']:4s} {rec['dtype']:6s} defects={rec['defects']}")


if __name__ == "__main__":
    main()
