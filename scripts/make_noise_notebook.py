"""Write notebooks/noise_and_model.ipynb (without outputs) from the cells below, reproducibly.

Run ``python scripts/make_noise_notebook.py`` after editing the cells; tests/test_notebook_noise.py
executes the notebook, so it stays working.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "noise_and_model.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "md",
        """# The SEM noise model, and what a trained model does with it

This notebook walks the physical noise model of `semray.noise` on a synthetic wafer from
`semray.synth`: each noise component on its own, then the whole model across electron doses. It then
denoises a few noisy test images with the model shipped inside the package (if one is there) and
compares it with BM3D (`semray.classical`) on the metrics of `semray.metrics`.

Images are small (96 x 96 px) so it runs in seconds on a laptop; the test suite executes it
(`tests/test_notebook_noise.py`). Regenerate it with `python scripts/make_noise_notebook.py`.""",
    ),
    (
        "code",
        """import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from semray.classical import denoise_classical
from semray.config.noise import COMPONENTS, PHYSICAL_ORDER, NoiseConfig, NoiseRange
from semray.metrics import compute_metrics, psnr
from semray.noise import apply_noise, sample_params
from semray.synth import render_wafer

SIZE = (96, 96)  # (H, W) px
T0 = time.perf_counter()
pd.set_option("display.width", 160)
pd.set_option("display.precision", 3)""",
    ),
    (
        "md",
        """## A clean wafer

`render_wafer` draws one clean image (float32 in [0, 1]), the same scene without defects, and a
pixel-exact defect mask.""",
    ),
    (
        "code",
        """sample = render_wafer("contacts", SIZE, np.random.default_rng(3))
clean = sample.clean
print(f"pattern={sample.pattern}, shape={clean.shape}, dtype={clean.dtype}, range=[{clean.min():.2f}, {clean.max():.2f}]")
print("defects:", [(d["type"], d["area_px"]) for d in sample.defects] or "none")

fig, ax = plt.subplots(1, 3, figsize=(9, 3))
for a, img, title in zip(ax, (clean, sample.reference, sample.defect_mask), ("clean", "defect-free reference", "defect mask")):
    a.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    a.set_title(title)
    a.axis("off")
plt.show()""",
    ),
    (
        "md",
        """## Each noise component on its own

The parameters of one image are drawn once from `NoiseConfig` (`sample_params`); here every component
but one is switched off (`<component>_enabled=False`) so each effect can be seen alone, at a fixed dose
of 30 electrons per pixel. Components are listed in the order `apply_noise` applies them
(`PHYSICAL_ORDER`). Detector bandwidth (off by default) only correlates the pixel noise, so it is shown
with shot noise, at a fast-axis correlation of 0.6. The second row is the change each one makes (noisy -
clean, grey = 0).""",
    ),
    (
        "code",
        """cfg = NoiseConfig()
cfg.shot.dose_e_per_px = NoiseRange(low=30.0, high=30.0)
params = sample_params(cfg, np.random.default_rng(0))

fig, ax = plt.subplots(2, len(PHYSICAL_ORDER), figsize=(2.2 * len(PHYSICAL_ORDER), 4.6))
rows = []
for j, comp in enumerate(PHYSICAL_ORDER):
    on = {comp, "shot"} if comp == "bandwidth" else {comp}
    alone = params.replace(**{f"{c}_enabled": c in on for c in COMPONENTS}, fast_axis_corr=0.6)
    noisy = apply_noise(clean, alone, np.random.default_rng(1))
    diff = noisy - clean
    rows.append({"component": comp, "psnr_db": psnr(clean, noisy), "rms_change": float(np.sqrt(np.mean(diff**2)))})
    ax[0, j].imshow(noisy, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax[0, j].set_title(comp, fontsize=9)
    ax[1, j].imshow(diff, cmap="gray", vmin=-0.3, vmax=0.3, interpolation="nearest")
    for a in ax[:, j]:
        a.axis("off")
plt.tight_layout()
plt.show()
pd.DataFrame(rows).set_index("component")""",
    ),
    (
        "md",
        """## The whole model across doses

All components on, only the dose changes: fewer primary electrons per pixel mean fewer secondary
electrons and more shot noise, which is what a fast scan costs.""",
    ),
    (
        "code",
        """doses = [2.0, 8.0, 32.0, 128.0, 512.0]
fig, ax = plt.subplots(1, len(doses), figsize=(2.4 * len(doses), 2.8))
rows = []
for a, dose in zip(ax, doses):
    noisy = apply_noise(clean, params.replace(dose_e_per_px=dose), np.random.default_rng(2))
    rows.append({"dose_e_per_px": dose, "psnr_db": psnr(clean, noisy)})
    a.imshow(noisy, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    a.set_title(f"{dose:g} e/px: {rows[-1]['psnr_db']:.1f} dB", fontsize=9)
    a.axis("off")
plt.show()
by_dose = pd.DataFrame(rows).set_index("dose_e_per_px")
assert by_dose["psnr_db"].is_monotonic_increasing, "more dose should mean less noise"
by_dose""",
    ),
    (
        "md",
        """## A trained model on noisy test images

The shipped default model (`semray.models.resolve.resolve_model(None)`) denoises a few noisy test
images (all components on, 20 e/px). Each row shows noisy | denoised | clean | |denoised - clean|;
the table compares the model with BM3D and with doing nothing. When the package ships no model yet,
only BM3D is shown.""",
    ),
    (
        "code",
        """from semray.infer import tiled_denoise
from semray.models.resolve import SHIPPED_MODELS_DIR, resolve_model

net = None
if (SHIPPED_MODELS_DIR / "default").is_dir():
    resolved = resolve_model(None)
    net = resolved.model
    print(f"model: {resolved.name} v{resolved.version} ({resolved.source}, {resolved.location})")
else:
    print(f"no shipped default model under {SHIPPED_MODELS_DIR}: comparing BM3D with the noisy input only")

patterns = ["lines", "contacts", "tin_balls"]
tests = [render_wafer(p, SIZE, np.random.default_rng([100, i])) for i, p in enumerate(patterns)]
test_params = params.replace(dose_e_per_px=20.0)
results, panels = [], []
for i, s in enumerate(tests):
    noisy = apply_noise(s.clean, test_params, np.random.default_rng([200, i]))
    outputs = {"noisy": noisy, "bm3d": denoise_classical(noisy, "bm3d")}
    if net is not None:
        outputs["model"] = tiled_denoise(net, noisy, tile=128, overlap=16)
    for method, out in outputs.items():
        m = compute_metrics(s.clean, out, defect_mask=s.defect_mask, reference=s.reference)
        results.append({"image": i, "pattern": s.pattern, "method": method, **m})
    best = outputs.get("model", outputs["bm3d"])
    panels.append((noisy, best, s.clean, np.abs(best - s.clean)))

label = "model" if net is not None else "bm3d"
fig, ax = plt.subplots(len(panels), 4, figsize=(9, 2.3 * len(panels)))
for r, imgs in enumerate(panels):
    for c, (img, title) in enumerate(zip(imgs, ("noisy", f"denoised ({label})", "clean", "|diff|"))):
        ax[r, c].imshow(img, cmap="gray" if c < 3 else "magma", vmin=0, vmax=1 if c < 3 else 0.3, interpolation="nearest")
        ax[r, c].set_title(title if r == 0 else "", fontsize=9)
        ax[r, c].set_xticks([])
        ax[r, c].set_yticks([])
    ax[r, 0].set_ylabel(tests[r].pattern)
plt.tight_layout()
plt.show()

table = pd.DataFrame(results)
cols = ["psnr", "ssim", "ms_ssim", "edge_preservation", "gradient_correlation", "defect_recall"]
summary = table.groupby("method", sort=False)[cols].mean()
print(summary.to_string())
assert summary.loc["bm3d", "psnr"] > summary.loc["noisy", "psnr"], "BM3D should beat the noisy input"
print(f"notebook ran in {time.perf_counter() - T0:.1f} s")""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook object: the cells above, no outputs, a python3 kernelspec, stable cell ids."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(CELLS):
        cell = new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        cell["id"] = f"cell-{i:02d}"  # fixed ids so regenerating gives the same file
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> int:
    NOTEBOOK.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(build(), NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
