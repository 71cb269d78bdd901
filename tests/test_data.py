"""Synthetic shard sets and the Ray Data noise stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semray.config.base import load_config
from semray.config.data import DatasetConfig
from semray.config.noise import NoiseConfig
from semray.data import add_noise_batch, iter_noisy_records, noisy_dataset, synthesize_shards
from semray.io import read_shard
from semray.noise import clean_target, image_rng, synthesize

SMALL = ["height=48", "width=40", "n_train=5", "n_val=2", "n_test=3", "rows_per_shard=2"]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetConfig, Path]:
    cfg = load_config(DatasetConfig, None, SMALL)
    out = tmp_path_factory.mktemp("shards")
    synthesize_shards(cfg, out, parallel=False, progress=False)
    return cfg, out


def test_shard_layout_counts_and_schema(shard_set: tuple[DatasetConfig, Path]) -> None:
    cfg, out = shard_set
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert files == [
        "test/part-00000.parquet",
        "test/part-00001.parquet",
        "train/part-00000.parquet",
        "train/part-00001.parquet",
        "train/part-00002.parquet",
        "val/part-00000.parquet",
    ]
    rows = [read_shard(p) for p in sorted((out / "train").glob("*.parquet"))]
    ids = [i for r in rows for i in r["image_id"]]
    assert len(ids) == len(set(ids)) == cfg.n_train
    first = rows[0]
    for col in ("image_id", "clean", "reference", "defect_mask", "pattern", "split"):
        assert col in first
    assert first["clean"].shape[1:] == (48, 40) and first["clean"].dtype == np.float32
    assert first["defect_mask"].dtype == bool
    assert set(first["split"]) == {"train"}
    assert (out / "dataset.yaml").is_file() and (out / "summary.json").is_file()


def test_synthesis_is_deterministic_and_parallel_matches_serial(
    shard_set: tuple[DatasetConfig, Path], tmp_path: Path, ray_local: None
) -> None:
    cfg, out = shard_set
    synthesize_shards(cfg, tmp_path, parallel=True, progress=False)
    for p in sorted(out.rglob("*.parquet")):
        a, b = read_shard(p), read_shard(tmp_path / p.relative_to(out))
        np.testing.assert_array_equal(a["clean"], b["clean"])
        np.testing.assert_array_equal(a["defect_mask"], b["defect_mask"])
        assert list(a["image_id"]) == list(b["image_id"])


def test_noise_batch_equals_pure_function_and_records_params(shard_set: tuple[DatasetConfig, Path]) -> None:
    cfg, out = shard_set
    shard = read_shard(out / "val" / "part-00000.parquet")
    batch = add_noise_batch(
        {"image_id": shard["image_id"], "clean": shard["clean"]}, cfg.noise, seed=7, epoch=3
    )
    for i, iid in enumerate(shard["image_id"]):
        expect, params = synthesize(shard["clean"][i], cfg.noise, image_rng(7, iid, 3))
        np.testing.assert_array_equal(batch["noisy"][i], expect)
        for k, v in params.as_columns().items():
            assert batch[k][i] == v
    assert batch["noisy"].dtype == np.float32 and batch["noisy"].shape == shard["clean"].shape
    other_epoch = add_noise_batch({"image_id": shard["image_id"], "clean": shard["clean"]}, cfg.noise, 7, 4)
    assert not np.array_equal(other_epoch["noisy"], batch["noisy"])


def test_ray_data_noise_stage_matches_pure_function(
    shard_set: tuple[DatasetConfig, Path], ray_local: None
) -> None:
    cfg, out = shard_set
    rows = noisy_dataset(out, cfg.noise, seed=11, epoch=1, split="train", batch_size=2).take_all()
    assert len(rows) == cfg.n_train
    assert {r["split"] for r in rows} == {"train"}
    for r in rows:
        expect, params = synthesize(np.asarray(r["clean"]), cfg.noise, image_rng(11, r["image_id"], 1))
        np.testing.assert_array_equal(r["noisy"], expect)
        assert r["noise_seed"] == 11 and r["noise_epoch"] == 1
        for k, v in params.as_columns().items():
            assert r[k] == pytest.approx(v)


def test_iter_noisy_records_without_ray(shard_set: tuple[DatasetConfig, Path]) -> None:
    cfg, out = shard_set
    shard = read_shard(out / "test" / "part-00000.parquet")
    recs = [{"image_id": i, "clean": c} for i, c in zip(shard["image_id"], shard["clean"], strict=True)]
    got = list(iter_noisy_records(recs, cfg.noise, seed=1))
    assert len(got) == len(recs)
    assert got[0]["noisy"].shape == (48, 40)
    assert not np.allclose(got[0]["noisy"], got[0]["clean"])


def test_headroom_adc_window_puts_clean_on_the_noisy_scale() -> None:
    clean = np.stack([np.full((40, 48), v, np.float32) for v in (0.1, 0.5, 0.9)])
    batch = {"image_id": np.array(["a", "b", "c"]), "clean": clean, "reference": clean.copy()}
    noise = load_config(NoiseConfig, {"quantization": {"adc_window": "headroom"}}).only(
        "shot", "detector_gain", "read_noise", "quantization"
    )
    out = add_noise_batch(batch, noise, seed=1, epoch=2)
    for i, iid in enumerate(batch["image_id"]):
        noisy, params = synthesize(clean[i], noise, image_rng(1, iid, 2))
        np.testing.assert_array_equal(out["noisy"][i], noisy)
        np.testing.assert_array_equal(out["clean"][i], clean_target(clean[i], params))
        np.testing.assert_array_equal(out["reference"][i], out["clean"][i])
        # unbiased: noise std <= ~0.1 on this scale (dose >= 10 e-/px), so over 1920 pixels the mean's
        # standard error is <= 0.0023 and 0.01 is over 4 of them
        assert abs(float(noisy.mean() - out["clean"][i].mean())) < 0.01
    assert out["noise_adc_window"].tolist() == ["headroom"] * 3
    plain = add_noise_batch(batch, NoiseConfig(), seed=1, epoch=2)
    assert plain["clean"] is clean  # default 'clip': the clean column is passed through untouched


def test_noise_stage_on_an_empty_batch_keeps_the_layout() -> None:
    """Ray Data can hand a stage an empty batch: both noise stages answer with empty columns of the
    clean column's layout instead of failing in ``np.stack``."""
    from semray.selfsup import add_noise_pair_batch

    batch = {"image_id": np.asarray([], dtype=object), "clean": np.zeros((0, 8, 6), np.float32)}
    noise = NoiseConfig().model_dump(mode="json")
    for out in (add_noise_batch(batch, noise, seed=3), add_noise_pair_batch(batch, noise, seed=3)):
        assert out["noisy"].shape == (0, 8, 6) and out["noisy"].dtype == np.float32
        assert out["noise_seed"].shape == (0,) and out["noise_epoch"].dtype == np.int64
