"""Synthetic shard sets and the Ray Data noise-synthesis stage.

The math lives in :mod:`semray.synth` and :mod:`semray.noise`; this module only arranges it into
Parquet shards (:func:`synthesize_shards`) and into a Ray Data pipeline that adds ``noisy`` and the
sampled noise parameters to every row (:func:`add_noise_batch`, :func:`noisy_dataset`). The batch
function is pure and is exactly what the pipeline runs, so a row's noise can be regenerated anywhere
from ``(seed, image_id, epoch)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semray.config.base import dump_yaml
from semray.config.data import DatasetConfig
from semray.config.noise import NoiseConfig, NoiseParams
from semray.io import SPLITS, list_shards, write_shard
from semray.noise import clean_target, image_rng, synthesize
from semray.synth import render_wafer, sample_pattern


@dataclass
class ShardSetSummary:
    """What :func:`synthesize_shards` wrote."""

    out_dir: Path
    shards: list[Path]
    counts: dict[str, int]
    defect_images: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "shards": [str(p.relative_to(self.out_dir)) for p in self.shards],
            "counts": self.counts,
            "defect_images": self.defect_images,
        }


def image_id(seed: int, split: str, index: int) -> str:
    """Stable id of synthetic image ``index`` of ``split`` in the set made with ``seed``."""
    return f"syn-s{seed}-{split}-{index:06d}"


def render_record(cfg: DatasetConfig, split: str, index: int) -> dict[str, Any]:
    """Render one shard row: clean image, defect-free reference, defect mask and labels."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    pattern = sample_pattern(rng, cfg.synth)
    sample = render_wafer(pattern, (cfg.height, cfg.width), rng, cfg.synth)
    return {
        "image_id": image_id(cfg.seed, split, index),
        "split": split,
        "pattern": sample.pattern,
        "clean": sample.clean,
        "reference": sample.reference,
        "defect_mask": sample.defect_mask,
        "n_defects": len(sample.defects),
        "defect_types": ",".join(sorted({d["type"] for d in sample.defects})),
        "source": "synthetic",
    }


def _write_one_shard(cfg: DatasetConfig, split: str, start: int, stop: int, path: Path) -> tuple[Path, int]:
    records = [render_record(cfg, split, i) for i in range(start, stop)]
    write_shard(records, path)
    return path, sum(1 for r in records if r["n_defects"] > 0)


def _shard_plan(cfg: DatasetConfig, out_dir: Path) -> list[tuple[str, int, int, Path]]:
    plan = []
    for split in SPLITS:
        n = getattr(cfg, f"n_{split}")
        for k in range(math.ceil(n / cfg.rows_per_shard)):
            start, stop = k * cfg.rows_per_shard, min(n, (k + 1) * cfg.rows_per_shard)
            plan.append((split, start, stop, out_dir / split / f"part-{k:05d}.parquet"))
    return plan


def synthesize_shards(
    cfg: DatasetConfig, out_dir: str | Path, parallel: bool | None = None, progress: bool = True
) -> ShardSetSummary:
    """Render the configured shard set into ``out_dir/<split>/part-XXXXX.parquet``.

    Each shard is one unit of work; with ``parallel`` (default: whenever Ray is initialised) shards
    are rendered as Ray tasks, otherwise in this process. Output is identical either way. The full
    config is written to ``out_dir/dataset.yaml`` and a summary to ``out_dir/summary.json``.
    """
    import ray

    from semray.logs import progress_bar

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _shard_plan(cfg, out_dir)
    if parallel is None:
        parallel = ray.is_initialized()
    results: list[tuple[Path, int]] = []
    bar = progress_bar(len(plan), "shards", "shard", disable=not progress)
    if parallel:
        task = ray.remote(num_cpus=1)(_write_one_shard)
        cfg_ref = ray.put(cfg)
        pending = {task.remote(cfg_ref, s, a, b, p): p for s, a, b, p in plan}
        done_by_path: dict[Path, tuple[Path, int]] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                done_by_path[pending.pop(ref)] = ray.get(ref)
                bar.update(1)
        results = [done_by_path[p] for *_, p in plan]
    else:
        for s, a, b, p in plan:
            results.append(_write_one_shard(cfg, s, a, b, p))
            bar.update(1)
    bar.close()
    counts = {s: getattr(cfg, f"n_{s}") for s in SPLITS}
    defect_images = dict.fromkeys(SPLITS, 0)
    for (split, *_), (_, n_def) in zip(plan, results, strict=True):
        defect_images[split] += n_def
    summary = ShardSetSummary(out_dir, [p for p, _ in results], counts, defect_images)
    (out_dir / "dataset.yaml").write_text(dump_yaml(cfg))
    (out_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
    return summary


# --------------------------------------------------------------------------------------------------
# Noise synthesis stage
# --------------------------------------------------------------------------------------------------


def add_noise_batch(
    batch: Mapping[str, np.ndarray], noise: NoiseConfig | Mapping[str, Any], seed: int, epoch: int = 0
) -> dict[str, np.ndarray]:
    """Add ``noisy`` and the sampled noise parameters to a batch of shard rows.

    Args:
        batch: numpy batch with at least ``image_id`` (B,) and ``clean`` (B, H, W) float32 in [0, 1]
            (or a (B,) object array of differently sized images).
        noise: the noise config (or its dict form, as shipped to Ray workers).
        seed: run seed; row noise comes from ``image_rng(seed, image_id, epoch)``.
        epoch: epoch number, so every epoch sees fresh but reproducible noise.

    Returns:
        The batch with ``noisy`` (same layout as ``clean``, float32 [0, 1]) and one ``noise_*`` column
        per sampled parameter, plus ``noise_seed`` and ``noise_epoch``. With the ADC window
        ``quantization.adc_window: headroom``, ``clean`` (and ``reference``, if present) are replaced by
        :func:`semray.noise.clean_target` of each row, the scale of its ``noisy``; with the default
        ``clip`` they are returned untouched.
    """
    cfg = noise if isinstance(noise, NoiseConfig) else NoiseConfig.model_validate(noise)
    out = dict(batch)
    noisy: list[np.ndarray] = []
    params: list[NoiseParams] = []
    for iid, clean in zip(batch["image_id"], batch["clean"], strict=True):
        img, p = synthesize(np.asarray(clean, dtype=np.float32), cfg, image_rng(seed, str(iid), epoch))
        noisy.append(img)
        params.append(p)
    out["noisy"] = like_column(batch["clean"], noisy)
    out.update(noise_columns(batch, params, seed, epoch))
    return out


def noise_columns(
    batch: Mapping[str, Any], params: list[NoiseParams], seed: int, epoch: int
) -> dict[str, np.ndarray]:
    """The columns every noise stage adds next to its noisy images: the targets
    (:func:`target_columns`), one column per :class:`NoiseParams` field (``as_columns``), and
    ``noise_seed``/``noise_epoch`` (int64), each of length ``len(params)``."""
    out = target_columns(batch, params)
    cols = [p.as_columns() for p in params]
    for key in cols[0] if cols else []:
        out[key] = np.asarray([c[key] for c in cols])
    n = len(params)
    out["noise_seed"] = np.full(n, seed, dtype=np.int64)
    out["noise_epoch"] = np.full(n, epoch, dtype=np.int64)
    return out


def target_columns(batch: Mapping[str, Any], params: list[NoiseParams]) -> dict[str, np.ndarray]:
    """``clean`` and ``reference`` (where present) on the scale of the noisy images made with ``params``.

    Empty with the default ADC window ``clip`` (the clean images already are on that scale); with
    ``headroom``, each row's :func:`semray.noise.clean_target`. ``params``: one record per row.
    """
    if all(p.adc_window == "clip" for p in params):
        return {}
    out = {}
    for name in ("clean", "reference"):
        if name in batch and batch[name] is not None:
            col = batch[name]
            out[name] = like_column(col, [clean_target(c, p) for c, p in zip(col, params, strict=True)])
    return out


def like_column(col: Any, images: list[np.ndarray]) -> np.ndarray:
    """``images`` in the layout of the column ``col``: stacked (B, H, W) float32 (an empty batch keeps
    ``col``'s shape), or a (B,) object array."""
    if isinstance(col, np.ndarray) and col.dtype != object:
        return np.stack(images).astype(np.float32) if images else np.zeros_like(col, np.float32)
    ragged = np.empty(len(images), dtype=object)
    ragged[:] = images
    return ragged


def read_shards_dataset(shards: str | Path | Iterable[str | Path], split: str | None = None) -> Any:
    """A Ray Dataset over shard files (a folder or explicit files), optionally one split only."""
    import ray

    if isinstance(shards, (str, Path)):
        files = [str(p) for p in list_shards(shards)]
    else:
        files = [str(p) for p in shards]
    ds = ray.data.read_parquet(files)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        from ray.data.expressions import col

        ds = ds.filter(expr=col("split") == split)
    return ds


def noisy_dataset(
    shards: str | Path | Iterable[str | Path],
    noise: NoiseConfig,
    seed: int,
    epoch: int = 0,
    split: str | None = None,
    batch_size: int = 16,
) -> Any:
    """Ray Dataset of shard rows with noise synthesised on the fly (see :func:`add_noise_batch`)."""
    ds = read_shards_dataset(shards, split)
    return ds.map_batches(
        add_noise_batch,
        fn_kwargs={"noise": noise.model_dump(mode="json"), "seed": seed, "epoch": epoch},
        batch_format="numpy",
        batch_size=batch_size,
    )


def iter_noisy_records(
    records: Iterable[Mapping[str, Any]], noise: NoiseConfig, seed: int, epoch: int = 0
) -> Iterator[dict[str, Any]]:
    """The same noise stage without Ray, row by row (for small local jobs and tests)."""
    for r in records:
        batch = {"image_id": np.asarray([r["image_id"]], dtype=object), "clean": np.asarray(r["clean"])[None]}
        out = add_noise_batch(batch, noise, seed, epoch)
        row = dict(r)
        row.update({k: v[0] for k, v in out.items() if k not in ("image_id", "clean")})
        yield row
