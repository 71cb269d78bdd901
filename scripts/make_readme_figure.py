"""The README's first picture: what the shipped model does to a noisy SEM field (``docs/before_after.png``).

A synthetic wafer field (contact holes, a defect) at a low electron dose, the shipped model's output
and the clean reference, with PSNR against it. Deterministic: fixed seed, the shipped weights on the CPU.
The figure is saved as 8-bit grey (about a quarter of the size of matplotlib's RGBA PNG).

Why not a real micrograph: the one real low-dose image at hand (``../shared/data/real-sem/
low_dose_sem_crop.tif``, a biological specimen) is outside what the shipped model was trained on, and its
output shows blocky artefacts; it has no clean reference either, so no number could go with it.

Run: ``python scripts/make_readme_figure.py [--out docs/before_after.png]``; it prints the PSNR line the
README quotes.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from semray.config.base import load_config
from semray.config.noise import NoiseConfig
from semray.infer import Denoiser
from semray.metrics import psnr
from semray.noise import synthesize
from semray.synth import render_wafer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "before_after.png"
SEED = 20261206
DOSE = 16.0  # electrons per pixel: a fast, low-dose scan
SIDE = 192  # pixels per panel, drawn 1:1 (keeps the PNG small and unresampled)


def synthetic_field() -> tuple[np.ndarray, np.ndarray]:
    """``(clean, noisy)`` float32 (SIDE, SIDE) in [0, 1]: the first seeded contact field with a defect."""
    noise = load_config(NoiseConfig, {"shot": {"dose_e_per_px": {"low": DOSE, "high": DOSE}}})
    for attempt in range(64):
        rng = np.random.default_rng([SEED, attempt])
        wafer = render_wafer("contacts", (SIDE, SIDE), rng)
        if wafer.defects:
            break
    noisy, _ = synthesize(wafer.clean, noise, rng)
    return wafer.clean, noisy


def make_figure(out: Path = OUT) -> str:
    """Write the figure to ``out``; returns the one-line result (PSNR of input and output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    den = Denoiser("unet", None, device="cpu")  # the shipped model
    clean, noisy = synthetic_field()
    out_syn = den(noisy)
    p_in, p_out = psnr(clean, noisy), psnr(clean, out_syn)
    panels = [
        (noisy, f"noisy, {DOSE:g} e-/px: {p_in:.1f} dB"),
        (out_syn, f"semray: {p_out:.1f} dB"),
        (clean, "clean reference"),
    ]
    # 100 dpi and 2.4 in per panel: each panel is drawn at about its own pixel size, not resampled
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.7))
    for ax, (img, title) in zip(axes, panels, strict=True):
        ax.set_axis_off()
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"shipped model ({den.name} v{den.version}) on the CPU", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    plt.close(fig)
    Image.open(buf).convert("L").save(out, optimize=True)
    return f"synthetic contact field at {DOSE:g} e-/px: PSNR {p_in:.1f} dB noisy -> {p_out:.1f} dB denoised"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    line = make_figure(args.out)
    print(f"{line}\nwrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
