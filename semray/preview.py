"""The preview figure of a shard set: clean | noisy at several electron doses | defect mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semray.config.data import DatasetConfig
from semray.figures import image_grid
from semray.io import list_shards, read_shard
from semray.noise import apply_noise, image_rng, sample_params


def write_preview(cfg: DatasetConfig, shards_dir: str | Path, out_png: str | Path) -> Path:
    """Render the preview grid for the first ``cfg.preview.n_images`` training images.

    Each row is one image: the clean render, the same field with the configured noise at each dose in
    ``cfg.preview.doses_e_per_px`` (other noise parameters drawn once per image and held fixed, so only
    the dose changes along the row), and the defect mask.
    """
    files = (
        list_shards(Path(shards_dir) / "train")
        if (Path(shards_dir) / "train").is_dir()
        else list_shards(shards_dir)
    )
    rows: list[list[np.ndarray]] = []
    titles: list[str] = []
    for f in files:
        shard = read_shard(f, columns=["image_id", "clean", "defect_mask", "pattern"])
        for iid, clean, mask, pattern in zip(
            shard["image_id"], shard["clean"], shard["defect_mask"], shard["pattern"], strict=True
        ):
            base = sample_params(cfg.noise, image_rng(cfg.seed, str(iid), 0))
            row = [clean]
            for k, dose in enumerate(cfg.preview.doses_e_per_px):
                row.append(
                    apply_noise(clean, base.replace(dose_e_per_px=dose), image_rng(cfg.seed, str(iid), k))
                )
            row.append(mask.astype(np.float32))
            rows.append(row)
            titles.append(f"{pattern}")
            if len(rows) == cfg.preview.n_images:
                break
        if len(rows) == cfg.preview.n_images:
            break
    cols = ["clean", *(f"{d:g} e-/px" for d in cfg.preview.doses_e_per_px), "defect mask"]
    cmaps = ["gray"] * (len(cols) - 1) + ["magma"]
    return image_grid(rows, cols, out_png, row_titles=titles, title="semray synthetic wafers", cmaps=cmaps)
