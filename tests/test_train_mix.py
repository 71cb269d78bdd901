"""Training on a mix of shard sources (``data.sources``) and fine-tuning from an existing model (``init``).

The data are what a user would have: real clean references and real noisy/clean pairs brought in with
``semray ingest`` (here rendered wafers written as 16-bit TIFFs), plus synthetic wafer shards.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from conftest import make_tiny_shards, train_config

from semray.config.base import ConfigError, dump_yaml, load_config
from semray.config.ingest import IngestConfig
from semray.config.noise import NoiseConfig
from semray.config.train import TrainConfig
from semray.data import add_noise_batch
from semray.ingest import ingest
from semray.io import read_shard
from semray.noise import synthesize
from semray.synth import render_wafer
from semray.train.crops import CropSpec
from semray.train.mix import allocate_crops, mix_totals
from semray.train.pipeline import source_crop_batch

WEIGHTS = {"real_clean": 7.0, "real_pairs": 2.0, "synthetic": 1.0}
SRC_PX, CROP_PX = 96, 48  # source images are cut by ingest into 2 x 2 crops of 48 px


def _u16(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0, 1) * 65535).astype(np.uint16)


def _ingest_cfg(**kw: Any) -> IngestConfig:
    base = {"crop_size": CROP_PX, "databar": {"mode": "off"}, "val_fraction": 0.3, "test_fraction": 0.0,
            "rows_per_shard": 8, "seed": 1}  # fmt: skip
    return load_config(IngestConfig, {**base, **kw})


@pytest.fixture(scope="module")
def mix_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three shard folders: ingested clean references, ingested noisy/clean pairs, synthetic wafers."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(11)
    patterns = ["lines", "contacts", "contacts_staggered", "tin_balls"]
    clean_src = root / "src_clean"
    clean_src.mkdir()
    for i in range(8):
        img = render_wafer(patterns[i % 4], (SRC_PX, SRC_PX), rng).clean
        tifffile.imwrite(clean_src / f"ref_{i}.tif", _u16(img))
    pair_src = root / "src_pairs"
    (pair_src / "noisy").mkdir(parents=True)
    (pair_src / "clean").mkdir(parents=True)
    for i in range(6):
        clean = render_wafer(patterns[i % 4], (SRC_PX, SRC_PX), rng).clean
        noisy, _ = synthesize(clean, NoiseConfig(), rng)
        tifffile.imwrite(pair_src / "clean" / f"site_{i}.tif", _u16(clean))
        tifffile.imwrite(pair_src / "noisy" / f"site_{i}.tif", _u16(noisy))
    out = {
        "real_clean": root / "real_clean",
        "real_pairs": root / "real_pairs",
        "synthetic": root / "synthetic",
    }
    ingest(_ingest_cfg(), clean_src, out["real_clean"], parallel=False, progress=False)
    pairs_cfg = _ingest_cfg(mode="pairs", noisy_dir="noisy", clean_dir="clean", label="pairs")
    ingest(pairs_cfg, pair_src, out["real_pairs"], parallel=False, progress=False)
    make_tiny_shards(out["synthetic"], "n_val=2")
    for name, folder in out.items():  # the test needs train and val rows in every source
        splits = Counter(
            s for p in folder.rglob("*.parquet") for s in read_shard(p, columns=["split"])["split"]
        )
        assert splits["train"] > 0 and splits["val"] > 0, (name, splits)
    return out


def _sources(data: dict[str, Path], weights: dict[str, float] = WEIGHTS) -> list[dict[str, Any]]:
    return [
        {"name": name, "shards": str(data[name]), "weight": w,
         "noise": "as_is" if name == "real_pairs" else "synthesize"}
        for name, w in weights.items()
    ]  # fmt: skip


def mix_config(folders: dict[str, Path], tmp: Path, **sections: Any) -> TrainConfig:
    """A tiny mixed run: 4-channel depth-2 U-Net, 32-px crops, 5 steps of 4 crops per epoch, 1 worker."""
    base: dict[str, Any] = {
        "seed": 5,
        "data": {"sources": _sources(folders), "crop_px": 32, "batch_size": 4, "val_crop_px": 32,
                 "val_max_images": 4, "shuffle_buffer": 8, "noise_batch_images": 4},
        "model": {"base_width": 4, "depth": 2},
        "loss": {"kind": "composite", "ms_ssim_scales": 2},
        "optim": {"epochs": 2, "lr": 5e-3, "warmup_fraction": 0.0, "steps_per_epoch": 5},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "data_cpus": 0.5},
        "checkpoint": {"keep_best": 5, "max_failures": 0},
        "validation": {"figure_every": 0, "figure_images": 3},
        "mlflow": {"experiment": "test-mix", "registered_model": "mix-unet", "alias": "candidate"},
        "run": {"storage_path": str(tmp / "runs")},
    }  # fmt: skip
    return train_config(base, **sections)


def _source_of_ids(data: dict[str, Path]) -> dict[str, str]:
    return {
        str(i): name
        for name, folder in data.items()
        for p in folder.rglob("*.parquet")
        for i in read_shard(p, columns=["image_id"])["image_id"]
    }


# -------------------------------------------------------------------------------------------- config


def test_sources_config_is_validated_with_clear_errors(tmp_path: Path) -> None:
    srcs = [{"name": "a", "shards": "x", "weight": 7}, {"name": "b", "shards": ["y", "x"], "noise": "as_is"}]
    cfg = load_config(TrainConfig, {"data": {"sources": srcs}})
    assert cfg.data.shards == ["x", "y"]  # filled in: every folder of the mix
    assert cfg.data.mix_weights == pytest.approx({"a": 7 / 8, "b": 1 / 8})
    assert load_config(TrainConfig, {"data": {"shards": "one"}}).data.sources is None  # the old form
    again = load_config(TrainConfig, __import__("yaml").safe_load(dump_yaml(cfg)))  # a saved run config
    assert again.data == cfg.data
    bad = {
        "names must be unique": [{"name": "a", "shards": "x"}, {"name": "a", "shards": "y"}],
        r"data.sources.0.weight": [{"name": "a", "shards": "x", "weight": 0}],
        r"data.sources.0.name": [{"name": "a b", "shards": "x"}],
        r"data.sources.0.noise": [{"name": "a", "shards": "x", "noise": "real"}],
        "data.sources is empty": [],
    }
    for match, sources in bad.items():
        with pytest.raises(ConfigError, match=match):
            load_config(TrainConfig, {"data": {"sources": sources}})
    with pytest.raises(ConfigError, match="either data.shards .* or data.sources"):
        load_config(TrainConfig, {"data": {"shards": ["z"], "sources": srcs}})
    with pytest.raises(ConfigError, match="data.generate"):
        load_config(TrainConfig, {"data": {"sources": srcs, "generate": {"n_train": 2}}})


def test_prepare_data_checks_every_source(mix_data: dict[str, Path], tmp_path: Path) -> None:
    from semray.train import prepare_data

    plan = prepare_data(mix_config(mix_data, tmp_path))
    assert [p.name for p in plan.sources] == list(WEIGHTS)
    total = 5 * 4  # steps_per_epoch x batch_size x 1 worker
    assert (
        [p.crops_per_epoch for p in plan.sources] == mix_totals(list(WEIGHTS.values()), total) == [14, 4, 2]
    )
    assert plan.steps_per_epoch == 5 and plan.n_train == sum(len(p.train_ids) for p in plan.sources)
    by_source = Counter(str(s) for s in plan.val_batch["source"])
    assert set(by_source) == set(WEIGHTS) and max(by_source.values()) <= 4  # val_max_images per source
    known = dict(zip(plan.val_batch["source"], plan.val_batch["defect_mask_known"], strict=True))
    assert known == {"real_clean": False, "real_pairs": False, "synthetic": True}
    # real pairs validate on their own noisy scans: no dose, noisy != clean
    pairs = [i for i, s in enumerate(plan.val_batch["source"]) if s == "real_pairs"]
    assert np.isnan(plan.val_batch["noise_dose_e_per_px"][pairs]).all()
    # errors name the source at fault
    clean_as_pairs = _sources(mix_data)
    clean_as_pairs[0]["noise"] = "as_is"
    with pytest.raises(
        ConfigError, match=r"data.sources\[0\] \('real_clean'\): noise 'as_is' .* no 'noisy' column"
    ):
        prepare_data(mix_config(mix_data, tmp_path, data={"sources": clean_as_pairs}))
    missing = _sources(mix_data)
    missing[2]["shards"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data.sources\[2\] \('synthetic'\).shards"):
        prepare_data(mix_config(mix_data, tmp_path, data={"sources": missing}))
    tiny = _sources(mix_data, {"real_clean": 1000.0, "real_pairs": 1.0, "synthetic": 1.0})
    with pytest.raises(ConfigError, match="'real_pairs' .* would get none of the 20 crops"):
        prepare_data(mix_config(mix_data, tmp_path, data={"sources": tiny}))


# ------------------------------------------------------------------------------------- pure mixing


def test_mix_totals_split_exactly_by_weight() -> None:
    assert mix_totals([0.7, 0.2, 0.1], 100) == [70, 20, 10]
    assert mix_totals([1, 1, 1], 10) == [4, 3, 3]  # largest remainder, ties to the earlier source
    assert mix_totals([7, 2, 1], 33) == [23, 7, 3]
    for total in range(0, 50):
        got = mix_totals([5, 3, 1.5], total)
        assert sum(got) == total
        assert all(abs(g - total * w / 9.5) < 1 for g, w in zip(got, [5, 3, 1.5], strict=True))
    with pytest.raises(ValueError, match="finite and > 0"):
        mix_totals([1, 0], 10)


def test_crop_allocation_is_even_exact_and_reshuffled_per_epoch() -> None:
    ids = [f"img-{i}" for i in range(10)]
    for total in (3, 10, 27):
        counts = allocate_crops(ids, total, seed=1, epoch=0, source="s")
        assert counts.sum() == total and set(counts.tolist()) <= {total // 10, -(-total // 10)}
    a = allocate_crops(ids, 4, 1, 0, "s")
    b = allocate_crops(ids, 4, 1, 1, "s")
    assert not np.array_equal(a, b)  # a different subset each epoch
    np.testing.assert_array_equal(a, allocate_crops(ids, 4, 1, 0, "s"))  # reproducible
    rev = allocate_crops(ids[::-1], 4, 1, 0, "s")[::-1]
    np.testing.assert_array_equal(a, rev)  # independent of the order the ids come in
    # over many epochs every image is drawn about equally often
    seen = sum(allocate_crops(ids, 3, 1, e, "s") for e in range(200))
    assert seen.min() >= 40 and seen.max() <= 80


def test_mix_crops_use_pairs_as_is_and_noise_clean_references() -> None:
    clean = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (40, 1))[None].repeat(3, axis=0)
    batch = {
        "image_id": np.asarray(["p0", "p1", "p2"], dtype=object),
        "clean": clean,
        "noisy": clean + 2.0,  # marker: an as-is crop keeps noisy - clean == 2 exactly
        "defect_mask": np.zeros((3, 40, 40), dtype=bool),
    }
    out = source_crop_batch(batch, [2, 0, 1], source="pairs", noise_mode="as_is", noise=NoiseConfig(), seed=3,
                            epoch=4, crop=CropSpec(16))  # fmt: skip
    assert out["noisy"].shape == (3, 16, 16) and list(out["source"]) == ["pairs"] * 3
    assert sorted(out["image_id"]) == ["p0", "p0", "p2"]
    np.testing.assert_allclose(out["noisy"] - out["clean"], 2.0, atol=1e-6)
    assert np.isnan(out["noise_dose_e_per_px"]).all() and (out["noise_epoch"] == 4).all()
    synth = source_crop_batch({k: v for k, v in batch.items() if k != "noisy"}, [1, 1, 0], source="refs",
                              noise_mode="synthesize", noise=NoiseConfig(), seed=3, epoch=4,
                              crop=CropSpec(40, flips=False))  # fmt: skip
    expect = add_noise_batch({"image_id": batch["image_id"][:2], "clean": clean[:2]}, NoiseConfig(), 3, 4)
    np.testing.assert_array_equal(synth["noisy"], expect["noisy"])  # the same noise as unmixed training
    assert np.isfinite(synth["noise_dose_e_per_px"]).all()
    empty = source_crop_batch(batch, [0, 0, 0], source="pairs", noise_mode="as_is", noise=NoiseConfig(), seed=3,
                              epoch=0, crop=CropSpec(16))  # fmt: skip
    assert empty["noisy"].shape == (0, 16, 16) and len(empty["source"]) == 0


def test_validation_metrics_per_source_skip_unknown_defect_masks() -> None:
    from semray.train.validate import ValItem, finalize, metric_sums, sums_to_tensor, val_keys

    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), dtype=bool)
    mask[6:9, 6:9] = True

    def item(iid: str, source: str, known: bool, noise: float) -> ValItem:
        clean = np.full((16, 16), 0.3, np.float32)
        clean[mask] = 0.9
        noisy = np.clip(clean + noise * rng.standard_normal((16, 16)), 0, 1).astype(np.float32)
        return ValItem(iid, noisy, clean, mask.copy(), None, 10.0, source=source, defect_known=known)

    items = [item("a0", "a", True, 0.05), item("a1", "a", True, 0.05), item("b0", "b", False, 0.2)]
    den = [it.noisy for it in items]  # identity "denoiser": PSNR is the noisy PSNR
    keys = val_keys(items)
    assert keys[:8] == val_keys([])  # overall keys first, then per source in name order
    assert "val_psnr/a" in keys and "val_psnr/b" in keys
    # two "workers" holding different sources sum to the same as one worker holding all
    split = finalize(sums_to_tensor(metric_sums(items[:2], den[:2]), keys) + sums_to_tensor(
        metric_sums(items[2:], den[2:]), keys), keys)  # fmt: skip
    whole = finalize(sums_to_tensor(metric_sums(items, den), keys), keys)
    for k in keys:
        np.testing.assert_allclose(split[k], whole[k], rtol=1e-9, equal_nan=True)
    from semray.metrics import psnr

    assert whole["val_psnr/b"] == pytest.approx(psnr(items[2].clean, items[2].noisy))
    assert whole["val_psnr"] == pytest.approx(np.mean([psnr(it.clean, it.noisy) for it in items]))
    assert whole["val_psnr/a"] > whole["val_psnr/b"]
    # the unlabelled source has a defect-looking mask but no defect metric: only source a counts
    assert np.isfinite(whole["val_defect_contrast/a"]) and np.isnan(whole["val_defect_contrast/b"])


# ------------------------------------------------------------------------------- Ray Data: the mix


@pytest.mark.ray
def test_mix_pipeline_draws_every_source_in_proportion(
    mix_data: dict[str, Path], tmp_path: Path, ray_local: None
) -> None:
    import ray

    from semray.train import prepare_data
    from semray.train.pipeline import build_train_dataset, start_epoch_clock

    # a bigger epoch than the training test: 3 crops per image, no step cap
    cfg = mix_config(
        mix_data,
        tmp_path,
        data={"crops_per_image": 3, "noise_batch_images": 16},
        optim={"steps_per_epoch": None},
    )
    plan = prepare_data(cfg)
    totals = [p.crops_per_epoch for p in plan.sources]
    clock = start_epoch_clock()
    ds = build_train_dataset(
        plan.streams(cfg.data.crops_per_image), cfg.noise, cfg.seed, clock, CropSpec(32, 0.5, True, False),
        noise_batch_images=cfg.data.noise_batch_images, data_cpus=0.5,
    )  # fmt: skip
    owner = _source_of_ids(mix_data)
    try:
        for epoch in (0, 1):
            ray.get(clock.set.remote(epoch))
            rows = ds.take_all()
            got = Counter(str(r["source"]) for r in rows)
            assert [got[p.name] for p in plan.sources] == totals  # exactly the configured shares
            assert all(owner[str(r["image_id"])] == str(r["source"]) for r in rows)
            assert {int(r["noise_epoch"]) for r in rows} == {epoch}
            for p in plan.sources:  # and within a source, exactly the planned crops per image
                per_image = Counter(str(r["image_id"]) for r in rows if r["source"] == p.name)
                expect = allocate_crops(p.train_ids, p.crops_per_epoch, cfg.seed, epoch, p.name)
                assert [per_image[i] for i in p.train_ids] == expect.tolist()
            dose = {str(r["source"]): np.isnan(r["noise_dose_e_per_px"]) for r in rows}
            assert dose == {"real_clean": False, "real_pairs": True, "synthetic": False}
        n = sum(totals)
        shares = {p.name: p.crops_per_epoch / n for p in plan.sources}
        print(f"mix of {n} crops per epoch: {shares}")
        for name, w in WEIGHTS.items():
            assert abs(shares[name] - w / sum(WEIGHTS.values())) <= 1 / n
    finally:
        ray.kill(clock)


# ------------------------------------------------------------------------------- Ray Train end to end


@pytest.fixture(scope="module")
def mix_run(mix_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, ray_local: None):
    """A 2-epoch mixed run from scratch on one worker (shared by the tests below)."""
    from semray.train import train

    tmp = tmp_path_factory.mktemp("mixrun")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = mix_config(mix_data, tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = train(cfg)
        yield {"cfg": cfg, "result": result, "tmp": tmp, "uri": uri}


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_mixed_run_trains_on_every_source_and_reports_them(
    mix_run: dict[str, Any], mix_data: dict[str, Path]
) -> None:
    from semray.models.store import read_card
    from semray.train.checkpoint import read_data_records

    result = mix_run["result"]
    assert result.last_metrics["epoch"] == 1 and result.last_metrics["step"] == 10
    # what the worker actually trained on, per epoch: exactly 14 / 4 / 2 crops of the three sources
    owner = _source_of_ids(mix_data)
    ckpts = sorted(Path(result.run_dir).glob("epoch-*"))
    assert len(ckpts) == 2
    for d in ckpts:
        crops = Counter()
        for rec in read_data_records(d):
            for iid, n in rec.image_crops.items():
                crops[owner[iid]] += n
        assert dict(crops) == {"real_clean": 14, "real_pairs": 4, "synthetic": 2}
    # per-source validation metrics next to the overall ones, in the result and in MLflow
    for name in WEIGHTS:
        assert np.isfinite(result.best_metrics[f"val_psnr/{name}"])
        assert np.isfinite(result.best_metrics[f"val_psnr_gain/{name}"])
    assert "val_defect_recall/real_pairs" not in result.best_metrics or np.isnan(
        result.best_metrics["val_defect_recall/real_pairs"]
    )
    client = _client(mix_run["uri"])
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["semray.data_sources"] == "real_clean,real_pairs,synthetic"
    for name in WEIGHTS:
        assert len(client.get_metric_history(result.mlflow_run_id, f"val_psnr/{name}")) == 2
    assert "val_defect_recall/real_clean" not in run.data.metrics  # unknown masks: no defect metrics
    card = read_card(result.model_dir)
    assert [s["name"] for s in card["data_sources"]] == list(WEIGHTS)
    assert [s["crops_per_epoch"] for s in card["data_sources"]] == [14, 4, 2]


def _pretrained_model(data: dict[str, Path], out: Path, steps: int = 150) -> Path:
    """A tiny U-Net trained in-process (plain torch, no Ray) on the synthetic and clean-reference
    shards, saved with the model store: the "existing model" a user fine-tunes."""
    from semray.config.model import UNetConfig
    from semray.models.store import save_model
    from semray.models.unet import build_model

    torch.manual_seed(0)
    cfg = UNetConfig(base_width=4, depth=2)
    net = build_model(cfg)
    clean = np.concatenate([
        np.stack(read_shard(p, columns=["clean"])["clean"])
        for name in ("synthetic", "real_clean") for p in sorted((data[name] / "train").glob("*.parquet"))
    ]).astype(np.float32)  # fmt: skip
    ids = np.asarray([f"pre-{i}" for i in range(len(clean))], dtype=object)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    rng = np.random.default_rng(0)
    for step in range(steps):
        pick = rng.choice(len(clean), 8)
        noisy = add_noise_batch({"image_id": ids[pick], "clean": clean[pick]}, NoiseConfig(), 1, step)[
            "noisy"
        ]
        y0, x0 = rng.integers(0, clean.shape[1] - 32 + 1, 2)
        x = torch.from_numpy(noisy[:, None, y0 : y0 + 32, x0 : x0 + 32])
        t = torch.from_numpy(clean[pick][:, None, y0 : y0 + 32, x0 : x0 + 32])
        loss = torch.nn.functional.l1_loss(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(net.eval(), cfg, out, card={"name": "pretrained", "version": "7"})


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_finetune_starts_from_the_init_model_and_keeps_its_quality(
    mix_run: dict[str, Any], mix_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semray.metrics import psnr
    from semray.models.store import load_model, read_card
    from semray.train import prepare_data, train
    from semray.train.validate import collect_val_items, denoise_images

    init_dir = _pretrained_model(mix_data, tmp_path / "pretrained")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mix_run["uri"])
    # no model section: the architecture comes from the init model's card; a gentle schedule
    cfg = mix_config(mix_data, tmp_path, model=None, init=str(init_dir),
                     optim={"lr": 5e-4, "epochs": 2})  # fmt: skip
    result = train(cfg)

    # "before": the init model's own validation PSNR on the run's fixed val set, measured independently
    net, _ = load_model(init_dir)
    items = collect_val_items([prepare_data(cfg).val_batch])
    den = denoise_images(net, [it.noisy for it in items])
    before = float(np.mean([psnr(it.clean, d) for it, d in zip(items, den, strict=True)]))
    assert result.init_model == str(init_dir)
    assert result.init_metrics["val_psnr"] == pytest.approx(before, abs=1e-4)
    scratch = _client(mix_run["uri"]).get_metric_history(mix_run["result"].mlflow_run_id, "val_psnr")
    scratch_epoch0 = next(m.value for m in scratch if m.step == 0)
    tuned = _client(mix_run["uri"]).get_metric_history(result.mlflow_run_id, "val_psnr")
    tuned_epoch0 = next(m.value for m in tuned if m.step == 0)
    print(f"val_psnr: init {before:.2f} dB, fine-tune epoch 0 {tuned_epoch0:.2f} dB, "
          f"scratch epoch 0 {scratch_epoch0:.2f} dB, fine-tune best {result.best_metrics['val_psnr']:.2f} dB")  # fmt: skip
    assert tuned_epoch0 > scratch_epoch0 + 2.0  # it did not start from scratch
    assert tuned_epoch0 > before - 0.5  # it started where the init model is
    # and improved or held it. The Ray Data pipeline's block order depends on task timing, so two runs
    # differ: measured best 24.85 dB on a quiet machine and 24.51 dB under load, against 24.64 dB before
    # (scratch: 7.7 dB after one epoch), hence a 0.3 dB allowance rather than an exact "no worse"
    assert result.best_metrics["val_psnr"] >= before - 0.3
    # the parent model is on record: MLflow tags + init metrics, and the new model's card
    run = _client(mix_run["uri"]).get_run(result.mlflow_run_id)
    assert run.data.tags["semray.init_model"] == str(init_dir)
    assert run.data.tags["semray.init_model_version"] == "7"
    assert run.data.tags["semray.init_weights_sha256"] == read_card(init_dir)["weights_sha256"]
    assert run.data.params["init"] == str(init_dir)
    assert run.data.metrics["init_val_psnr"] == pytest.approx(before, abs=1e-4)
    assert "init_val_psnr/real_pairs" in run.data.metrics
    card = read_card(result.model_dir)
    assert (
        card["parent"]["spec"] == str(init_dir)
        and card["model_config"] == read_card(init_dir)["model_config"]
    )


def test_init_takes_the_architecture_from_the_card_and_refuses_contradictions(
    mix_data: dict[str, Path], tmp_path: Path
) -> None:
    from semray.config.model import UNetConfig
    from semray.models.store import save_model
    from semray.models.unet import build_model
    from semray.train.runner import FINETUNE_OPTIM, resolve_init

    arch = UNetConfig(base_width=4, depth=2, residual=False)
    model_dir = save_model(build_model(arch), arch, tmp_path / "m")
    cfg, init = resolve_init(mix_config(mix_data, tmp_path, model=None, optim=None, init=str(model_dir)))
    assert init is not None and cfg.model == arch
    assert cfg.optim.epochs == FINETUNE_OPTIM["epochs"] and cfg.optim.lr == FINETUNE_OPTIM["lr"]
    kept, _ = resolve_init(mix_config(mix_data, tmp_path, model=None, init=str(model_dir)))
    assert kept.optim.epochs == 2 and kept.optim.lr == 5e-3  # what the config sets wins
    same, _ = resolve_init(mix_config(mix_data, tmp_path, model={"residual": False}, init=str(model_dir)))
    assert same.model == arch
    with pytest.raises(ConfigError, match=r"model.base_width=8 \(the model has 4\)"):
        resolve_init(mix_config(mix_data, tmp_path, model={"base_width": 8}, init=str(model_dir)))
    with pytest.raises(ConfigError, match="init: unknown model 'no-such-model'"):
        resolve_init(mix_config(mix_data, tmp_path, init="no-such-model"))
    # a training checkpoint folder (model/ inside) is accepted too
    save_model(build_model(arch), arch, tmp_path / "epoch-00003" / "model")
    _, from_ckpt = resolve_init(
        mix_config(mix_data, tmp_path, model=None, init=str(tmp_path / "epoch-00003"))
    )
    assert from_ckpt is not None and from_ckpt.location.endswith("model")


def test_cli_init_sets_the_spec_and_excludes_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from semray.cli import main
    from semray.cli.train import _resolve_config

    path = tmp_path / "ft.yaml"
    path.write_text("data: {sources: [{name: a, shards: x}]}\n")
    args = argparse.Namespace(config=path, overrides=[], resume=None, init="models:/semray-unet@prod")
    assert _resolve_config(args).init == "models:/semray-unet@prod"
    assert main(["train", "--config", str(path), "--init", "default", "--resume"]) == 2
    assert "--init starts a new run" in capsys.readouterr().err
