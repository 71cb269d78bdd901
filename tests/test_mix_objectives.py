"""Per-source objectives in a training mix (``data.sources[*].objective``): a self-supervised source of
acquired noisy frames (no clean images) trained alongside supervised sources, each crop scored by its
own source's objective (:mod:`semray.train.objectives`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_tiny_shards, train_config

from semray.config.base import ConfigError, load_config
from semray.config.loss import loss_config
from semray.config.model import UNetConfig
from semray.config.noise import NoiseConfig
from semray.config.train import TrainConfig
from semray.io import records_to_table
from semray.losses import build_loss
from semray.models.unet import build_model
from semray.selfsup import SelfSupervisedObjective, masked_loss
from semray.train.crops import CropSpec
from semray.train.objectives import BatchObjective, BatchPart, PreparedBatch
from semray.train.pipeline import source_crop_batch

LOSS = {"kind": "l1"}


def _objective(*objectives: str, **loss: Any) -> BatchObjective:
    cfg = loss_config({**LOSS, "mask": {"fraction": 0.05, "half_length": 2}, **loss})
    return BatchObjective(cfg, objectives, build_loss(cfg))


def _batch(objectives: list[str], seed: int = 0, px: int = 32) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    clean = torch.from_numpy(rng.random((len(objectives), 1, px, px), dtype=np.float32))
    noisy = (clean + 0.1 * torch.from_numpy(rng.standard_normal(clean.shape).astype(np.float32))).clamp(0, 1)
    return {"noisy": noisy, "clean": clean, "objective": objectives}


# ------------------------------------------------------------------------------------- the batch loss


def test_mixed_batch_loss_is_the_share_weighted_sum_and_selfsup_sees_only_masked_pixels() -> None:
    torch.manual_seed(0)
    net = build_model(UNetConfig(base_width=4, depth=2))
    objs = ["supervised", "structn2v", "supervised", "supervised", "structn2v", "supervised"]
    batch = _batch(objs)
    bo = _objective("structn2v")
    prep = bo.prepare(batch, batch["noisy"], batch["clean"], np.random.default_rng(3))
    assert [(p.objective, p.share) for p in prep.parts] == [("structn2v", 2 / 6), ("supervised", 4 / 6)]
    ss_rows, sup_rows = (p.rows.tolist() for p in prep.parts)  # type: ignore[union-attr]
    assert ss_rows == [1, 4] and sup_rows == [0, 2, 3, 5]
    # supervised crops go in as they are; blind-spot crops are altered, and their target is the noisy crop
    assert torch.equal(prep.inputs[sup_rows], batch["noisy"][sup_rows])
    assert not torch.equal(prep.inputs[ss_rows], batch["noisy"][ss_rows])
    assert torch.equal(prep.targets[0], batch["noisy"][ss_rows])
    assert torch.equal(prep.targets[1], batch["clean"][sup_rows]) and prep.masks[1] is None
    mask = prep.masks[0]
    assert mask is not None and int(mask.sum()) == 2 * round(0.05 * 32 * 32)

    pred = net(prep.inputs)
    pred.retain_grad()
    total, parts = bo.loss(pred, prep)
    want = 4 / 6 * (pred[sup_rows] - batch["clean"][sup_rows]).abs().mean() + 2 / 6 * masked_loss(
        pred[ss_rows], batch["noisy"][ss_rows], mask
    )
    assert torch.isfinite(total) and float(total.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert parts["total"] == pytest.approx(float(total.detach()))
    assert parts["structn2v_mse"] == pytest.approx(
        2 / 6 * float(masked_loss(pred[ss_rows], prep.targets[0], mask).detach())
    )
    total.backward()
    g = pred.grad
    assert g is not None
    # the self-supervised crops get gradient at their blind pixels and nowhere else
    assert torch.equal(g[ss_rows] != 0, mask)
    assert (g[sup_rows] != 0).float().mean() > 0.9  # L1: every pixel of the supervised crops
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads if gr is not None)


def test_a_known_mask_decides_what_the_selfsup_part_scores() -> None:
    bo = _objective("n2v")
    pred = torch.full((3, 1, 8, 8), 0.5, requires_grad=True)
    target = torch.zeros(1, 1, 8, 8)
    clean = torch.full((2, 1, 8, 8), 0.5)  # the supervised crops are predicted exactly: loss 0
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 2, 3] = mask[0, 0, 5, 6] = True
    parts = [BatchPart("n2v", torch.tensor([1]), 1 / 3), BatchPart("supervised", torch.tensor([0, 2]), 2 / 3)]
    prep = PreparedBatch(pred.detach(), parts, [target, clean], [mask, None])
    total, _ = bo.loss(pred, prep)
    assert float(total.detach()) == pytest.approx(1 / 3 * 0.25)  # (0.5 - 0)^2 at the two masked pixels
    # changing the prediction off the mask changes nothing; on the mask it does
    off = pred.detach().clone()
    off[1, 0, 0, 0] = 0.9
    assert float(bo.loss(off, prep)[0]) == pytest.approx(float(total.detach()))
    on = pred.detach().clone()
    on[1, 0, 2, 3] = 0.0
    assert float(bo.loss(on, prep)[0]) == pytest.approx(1 / 3 * 0.125)
    total.backward()
    assert pred.grad is not None and torch.equal(pred.grad[1] != 0, mask[0])


def test_a_batch_of_one_objective_is_that_objectives_loss_exactly() -> None:
    torch.manual_seed(1)
    net = build_model(UNetConfig(base_width=4, depth=2))
    sup = _batch(["supervised"] * 4)
    bo = _objective("supervised")
    prep = bo.prepare(sup, sup["noisy"], sup["clean"], np.random.default_rng(0))
    assert prep.inputs is sup["noisy"] and prep.parts[0].rows is None
    got, parts = bo.loss(net(prep.inputs), prep)
    want, want_parts = build_loss(loss_config(LOSS))(net(sup["noisy"]), sup["clean"])
    assert torch.equal(got, want) and parts == want_parts
    # a structn2v-only batch: the same masks and loss as the single-objective SelfSupervisedObjective
    ss = {k: v for k, v in _batch(["structn2v"] * 4).items() if k != "objective"}
    bo = _objective(objective="structn2v")
    prep = bo.prepare(ss, ss["noisy"], ss["clean"], np.random.default_rng(7))
    cfg = loss_config({**LOSS, "objective": "structn2v", "mask": {"fraction": 0.05, "half_length": 2}})
    inp, target, mask = SelfSupervisedObjective(cfg).prepare(ss["noisy"], None, np.random.default_rng(7))
    assert torch.equal(prep.inputs, inp) and torch.equal(prep.masks[0], mask)  # type: ignore[arg-type]
    assert torch.equal(
        bo.loss(net(inp), prep)[0], SelfSupervisedObjective(cfg).loss(net(inp), target, mask)[0]
    )
    with pytest.raises(ValueError, match=r"objective\(s\) \['n2n'\]"):
        bo.split(["n2n"], 1, torch.device("cpu"))


# ------------------------------------------------------------------------------------------- config


def _rows(n: int, split: str, px: int = 40, seed: int = 0, frames: int = 1) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        clean = rng.random((px, px), dtype=np.float32)
        row = {"image_id": f"{split}-{i}", "split": split, "pattern": "user", "clean": clean,
               "defect_mask": np.zeros((px, px), bool),
               "noisy": np.clip(clean + 0.1 * rng.standard_normal((px, px)), 0, 1).astype(np.float32)}  # fmt: skip
        if frames == 2:
            row["noisy2"] = np.clip(clean + 0.1 * rng.standard_normal((px, px)), 0, 1).astype(np.float32)
        out.append(row)
    return out


def write_noisy_only(folder: Path, frames: int = 1) -> Path:
    """Shards of acquired noisy frames without a ``clean`` column (as another tool might write them)."""
    folder.mkdir(parents=True)
    for split, n in (("train", 6), ("val", 2)):
        table = records_to_table(_rows(n, split, seed=len(split), frames=frames)).drop_columns(["clean"])
        pq.write_table(table, folder / f"{split}.parquet")
    return folder


def test_source_objective_is_validated_and_defaults_to_the_loss_objective() -> None:
    srcs = [{"name": "a", "shards": "x"}, {"name": "b", "shards": "y", "objective": "structn2v"}]
    cfg = load_config(TrainConfig, {"data": {"sources": srcs}})
    a, b = cfg.data.sources  # type: ignore[misc]
    assert cfg.data.source_objective(a, cfg.loss.objective) == "supervised"
    assert cfg.data.source_objective(b, cfg.loss.objective) == "structn2v"
    with pytest.raises(ConfigError, match=r"data.sources.1.objective"):
        load_config(TrainConfig, {"data": {"sources": [srcs[0], {**srcs[1], "objective": "n2s"}]}})
    only_selfsup = {"data": {"sources": [srcs[1]]}, "loss": {"defect_weight": 1.0}}
    with pytest.raises(ConfigError, match="every source of data.sources trains self-supervised"):
        load_config(TrainConfig, only_selfsup)


def _mix(tmp: Path, sources: list[dict[str, Any]]) -> TrainConfig:
    base = {
        "seed": 2,
        "data": {"sources": sources, "crop_px": 32, "batch_size": 4, "val_crop_px": 32, "shuffle_buffer": 8,
                 "noise_batch_images": 4},
        "model": {"base_width": 4, "depth": 2},
        "loss": {"kind": "l1", "mask": {"fraction": 0.02, "half_length": 3}},
        "optim": {"epochs": 1, "steps_per_epoch": 4},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "data_cpus": 0.5},
        "mlflow": {"enabled": False},
        "run": {"storage_path": str(tmp / "runs")},
    }  # fmt: skip
    return train_config(base)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("objectives")
    return {
        "synthetic": make_tiny_shards(root / "synthetic"),
        "noisy": write_noisy_only(root / "noisy"),
        "scans": write_noisy_only(root / "scans", frames=2),
    }


def test_plan_accepts_selfsup_sources_without_clean_and_names_a_supervised_one(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from semray.train import prepare_data

    synth = {"name": "synthetic", "shards": str(folders["synthetic"])}
    noisy = {"name": "mine", "shards": str(folders["noisy"]), "noise": "as_is", "objective": "structn2v"}
    plan = prepare_data(_mix(tmp_path, [synth, noisy]))
    mine = plan.sources[1]
    assert mine.objective == "structn2v" and "clean" not in mine.columns and "noisy" in mine.columns
    assert mine.val_ids == [] and plan.sources[0].objective == "supervised" and plan.sources[0].val_ids
    assert (
        "'mine' (structn2v) is trained on but not validated: its shards have no clean"
        in capsys.readouterr().out
    )
    assert set(plan.val_batch["source"]) == {"synthetic"}
    errors = {
        r"data.sources\[1\] \('mine'\): a supervised source trains against clean images, but shard .*"
        r"noisy/train.parquet has no 'clean' column": {**noisy, "objective": "supervised"},
        r"data.sources\[1\] \('mine'\): noise 'synthesize' adds noise to clean images": {**noisy, "noise": "synthesize"},
        r"data.sources\[1\] \('mine'\): objective n2n with noise 'as_is' .* no 'noisy2'": {**noisy, "objective": "n2n"},
    }  # fmt: skip
    for match, bad in errors.items():
        with pytest.raises(ConfigError, match=match):
            prepare_data(_mix(tmp_path, [synth, bad]))
    pairs = {"name": "pairs", "shards": str(folders["scans"]), "noise": "as_is", "objective": "n2n"}
    plan = prepare_data(_mix(tmp_path, [synth, pairs]))
    assert "noisy2" in plan.sources[1].columns


def test_selfsup_crops_of_acquired_frames_without_clean() -> None:
    rows = _rows(2, "train")
    batch = {k: np.stack([r[k] for r in rows]) if k in ("noisy", "defect_mask") else np.asarray(
        [r[k] for r in rows], dtype=object) for k in ("image_id", "noisy", "defect_mask")}  # fmt: skip
    out = source_crop_batch(batch, [2, 1], source="mine", noise_mode="as_is", noise=NoiseConfig(), seed=1,
                            epoch=3, crop=CropSpec(16), objective="structn2v", pad_noisy2=True)  # fmt: skip
    assert out["noisy"].shape == (3, 16, 16) and np.isnan(out["clean"]).all()
    assert np.isnan(out["noisy2"]).all() and list(out["objective"]) == ["structn2v"] * 3
    assert np.isnan(out["noise_dose_e_per_px"]).all() and (out["noise_epoch"] == 3).all()
    # the crops are the acquired frames' own pixels
    flat = batch["noisy"].reshape(-1)
    assert np.isin(out["noisy"].reshape(-1), flat).all()


# ------------------------------------------------------------------------------- Ray Data and Train


@pytest.mark.ray
def test_mixed_objective_pipeline_and_a_tiny_run(
    folders: dict[str, Path], tmp_path: Path, ray_local: None
) -> None:
    import ray

    from semray.train import prepare_data
    from semray.train.loop import _Collate
    from semray.train.pipeline import build_train_dataset, start_epoch_clock
    from semray.train.runner import train

    sources = [
        {"name": "synthetic", "shards": str(folders["synthetic"]), "weight": 2.0},
        {"name": "mine", "shards": str(folders["noisy"]), "noise": "as_is", "objective": "structn2v"},
        {"name": "scans", "shards": str(folders["scans"]), "noise": "as_is", "objective": "n2n"},
    ]
    cfg = _mix(tmp_path, sources)
    plan = prepare_data(cfg)
    clock = start_epoch_clock()
    ds = build_train_dataset(plan.streams(1), cfg.noise, cfg.seed, clock, CropSpec(32), noise_batch_images=4,
                             data_cpus=0.5, block_bytes=plan.block_bytes())  # fmt: skip
    try:
        ray.get(clock.set.remote(0))
        batches = list(ds.iter_torch_batches(batch_size=16, collate_fn=_Collate()))
    finally:
        ray.kill(clock)
    got: Counter[str] = Counter(o for b in batches for o in b["objective"])
    assert [got[o] for o in ("supervised", "structn2v", "n2n")] == [p.crops_per_epoch for p in plan.sources]
    for b in batches:
        is_sup = torch.tensor([o == "supervised" for o in b["objective"]])
        is_n2n = torch.tensor([o == "n2n" for o in b["objective"]])
        assert torch.isfinite(b["clean"][is_sup]).all() and torch.isnan(b["clean"][~is_sup]).all()
        assert torch.isfinite(b["noisy2"][is_n2n]).all() and torch.isnan(b["noisy2"][~is_n2n]).all()
    result = train(cfg)
    assert np.isfinite(result.last_metrics["train_loss"])
    assert {"train_structn2v_mse", "train_n2n_mse", "train_l1"} <= set(result.last_metrics)
    assert "val_psnr/synthetic" in result.last_metrics and "val_psnr/mine" not in result.last_metrics
