"""The figures the golden test pins (shared by ``tests/test_golden.py`` and ``scripts/make_golden.py``)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SHARD_SETTINGS = {
    "seed": 11,
    "height": 64,
    "width": 80,
    "n_train": 3,
    "n_val": 2,
    "n_test": 2,
    "rows_per_shard": 2,
}
NOISE_SEED, DENOISE_SHAPE = 3, (200, 184)
EVAL_METRICS = (
    "psnr",
    "ssim",
    "ms_ssim",
    "edge_preservation",
    "gradient_correlation",
    "defect_psnr",
    "defect_contrast",
    "defect_recall",
)


def _digest(a: Any) -> str:
    """sha256 of an array's dtype, shape and bytes (or of a list of strings / objects)."""
    h = hashlib.sha256()
    arr = np.asarray(a)
    if arr.dtype == object:
        for x in arr.ravel():
            x = np.asarray(x)
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(x.tobytes() if x.dtype != object else repr(x.tolist()).encode())
    else:
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def shard_figures(tmp: Path) -> dict[str, Any]:
    """Synthesise a tiny shard set in process and hash every column of every shard, then the noise stage."""
    from semray.config.data import DatasetConfig
    from semray.config.noise import NoiseConfig
    from semray.data import add_noise_batch, synthesize_shards
    from semray.io import read_shard

    summary = synthesize_shards(
        DatasetConfig(**SHARD_SETTINGS), tmp / "shards", parallel=False, progress=False
    )
    out: dict[str, Any] = {}
    for path in summary.shards:
        cols = read_shard(path)
        key = str(Path(path).relative_to(tmp / "shards"))
        out[key] = {c: _digest(v) for c, v in sorted(cols.items())}
        noisy = add_noise_batch(cols, NoiseConfig(), seed=NOISE_SEED, epoch=1)
        out[key + ":noise"] = {c: _digest(v) for c, v in sorted(noisy.items()) if c not in cols}
    return out


def denoise_figures() -> dict[str, Any]:
    """The shipped model's output on one fixed noisy image smaller than a tile (1 torch thread)."""
    import torch

    from semray.infer import Denoiser

    torch.set_num_threads(1)
    rng = np.random.default_rng(7)
    _, xx = np.mgrid[: DENOISE_SHAPE[0], : DENOISE_SHAPE[1]]
    clean = (0.3 + 0.4 * ((xx // 12) % 2)).astype(np.float32)
    noisy = np.clip(rng.poisson(clean * 16.0) / 16.0 + rng.normal(0, 0.02, clean.shape), 0, 1).astype(
        np.float32
    )
    out = Denoiser("unet", device="cpu")(noisy)
    return {"shape": list(out.shape), "dtype": str(out.dtype), "sha256": _digest(out)}


def evaluation_figures(tmp: Path) -> dict[str, Any]:
    """Per (method, condition, level, metric): the mean over images and draws of a tiny evaluation."""
    from semray.config.base import load_config
    from semray.config.evaluate import EvaluateConfig
    from semray.evaluation import run_evaluation

    cfg = load_config(
        EvaluateConfig,
        {
            "seed": 2,
            "noise_draws": 2,
            "test_set": {"dataset": {"seed": 5, "height": 64, "width": 64, "n_test": 3}},
            "doses_e_per_px": [4.0, 32.0],
            "robustness": [{"name": "gaussian", "kind": "gaussian", "levels": [0.1]}],
            "methods": {
                "classical": ["gaussian"],
                "models": [{"spec": "default", "label": "shipped"}],
                "device": "cpu",
            },
            "runtime": {"size_px": 32, "repeats": 1},
            "report": {"reference_method": "gaussian", "n_examples": 1, "crop_px": 24},
            "parallel": False,
            "out_dir": str(tmp / "eval"),
        },
    )
    res = run_evaluation(cfg, progress=False, log_mlflow=False)
    df = res.results
    keys = ["method", "condition", "level"]
    cols = list(EVAL_METRICS)
    means = df.groupby(keys)[cols].mean().reset_index().sort_values(keys)
    return {
        "rows": len(df),
        "means": [
            {
                **{k: (float(r[k]) if k == "level" else str(r[k])) for k in keys},
                **{c: float(r[c]) for c in cols},
            }
            for _, r in means.iterrows()
        ],
    }


def compute_golden(tmp: Path | None = None) -> dict[str, Any]:
    """Every golden figure; ``tmp`` is a scratch folder (a temporary one if None)."""
    if tmp is None:
        with tempfile.TemporaryDirectory() as d:
            return compute_golden(Path(d))
    return {"shards": shard_figures(tmp), "denoise": denoise_figures(), "evaluation": evaluation_figures(tmp)}
