"""The quickstart (`semray demo`): its steps end to end on tiny settings, its rerun reuse, and its
guarantee that the registered `@tuned` model is the shipped model unless a fine-tuned trial beat it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from semray.config.base import ConfigError, load_config
from semray.config.quickstart import LotSection, QuickstartConfig
from semray.quickstart import write_lot

#: The demo on tiny settings. The search fine-tunes the shipped model (``init: default``) at a learning
#: rate that wrecks its weights within a step (Adam moves every weight by ~lr per step), so no trial can
#: beat the shipped weights on validation: the guarantee must register them unchanged.
TINY: dict[str, Any] = {
    "dataset": {
        "seed": 3,
        "height": 48,
        "width": 48,
        "n_train": 8,
        "n_val": 4,
        "n_test": 2,
        "rows_per_shard": 4,
    },
    "tune": {
        "base": {
            "seed": 5,
            "init": "default",
            "data": {
                "crop_px": 32,
                "crops_per_image": 2,
                "batch_size": 4,
                "val_crop_px": 32,
                "val_max_images": 4,
                "shuffle_buffer": 8,
                "noise_batch_images": 4,
            },
            "loss": {"kind": "composite", "alpha": 0.0, "ms_ssim_scales": 2},
            "optim": {"epochs": 2, "steps_per_epoch": 2, "lr": 5.0e-2, "warmup_fraction": 0.0},
            "validation": {"figure_every": 0, "figure_images": 2},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1, "data_cpus": 0.25},
            "checkpoint": {"keep_best": 2, "max_failures": 1},
        },
        "space": {"loss.beta": {"uniform": [0.0, 1.0]}},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "search": {"num_samples": 2, "max_concurrent_trials": 2, "seed": 0},
        "resources": {"cpus": 0.5},
        "mlflow": {"experiment": "test-quickstart", "registered_model": "test-quickstart", "alias": "tuned"},
    },
    "lot": {"lots": 1, "wafers_per_lot": 2, "images_per_wafer": 1, "size_px": 64, "doses_e_per_px": [4, 64]},
    "denoise": {"num_actors": 1, "cpus_per_actor": 0.5, "tiling": {"tile": 64, "overlap": 16}},
    "evaluate": {
        "doses_e_per_px": [8],
        "methods": {"classical": ["gaussian"], "models": ["default"], "device": "cpu"},
        "runtime": {"enabled": False},
        "report": {"reference_method": "default", "n_examples": 1, "example_level": 8},
        "mlflow": {"experiment": "test-quickstart"},
    },
}


def test_embedded_defaults_load_and_bad_overrides_name_the_field() -> None:
    cfg = QuickstartConfig()
    assert cfg.tune.mlflow.experiment == "semray-quickstart" and cfg.tune.search.num_samples == 4
    assert "bm3d" in cfg.evaluate.methods.classical and "default" in cfg.evaluate.methods.models
    # the search fine-tunes the shipped model over loss weights only, and the report compares with it
    assert cfg.tune.base.init == "default" and cfg.tune.base.optim.lr <= 5e-4
    assert cfg.tune.space and all(k.startswith("loss.") for k in cfg.tune.space)
    assert cfg.evaluate.report.reference_method == "default"
    with pytest.raises(ConfigError, match="lot.size_px"):
        load_config(QuickstartConfig, None, ["lot.size_px=0"])
    with pytest.raises(ConfigError, match="doses_e_per_px"):
        load_config(QuickstartConfig, None, ["lot.doses_e_per_px=[4, -1]"])


def test_write_lot_is_a_lot_tree_of_16_bit_tiffs_and_keeps_existing_files(tmp_path: Path) -> None:
    lot = LotSection(lots=2, wafers_per_lot=1, images_per_wafer=2, size_px=40, doses_e_per_px=[2, 200])
    paths = write_lot(lot, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "LOT01/W01/img001_dose2.tif",
        "LOT01/W01/img002_dose200.tif",
        "LOT02/W01/img001_dose2.tif",
        "LOT02/W01/img002_dose200.tif",
    ]
    imgs = [tifffile.imread(p) for p in paths]
    assert all(im.dtype == np.uint16 and im.shape == (40, 40) for im in imgs)
    # low dose is visibly noisier: the pixel-to-pixel differences are larger
    rough = [float(np.std(np.diff(im.astype(np.float64) / 65535, axis=1))) for im in imgs]
    assert rough[0] > 1.5 * rough[1] and rough[2] > 1.5 * rough[3]
    before = [p.stat().st_mtime_ns for p in paths]
    assert write_lot(lot, tmp_path) == paths
    assert [p.stat().st_mtime_ns for p in paths] == before  # nothing rewritten


def test_search_note_says_plainly_what_was_registered() -> None:
    from semray.quickstart import search_note

    kept = search_note("init", "default", 30.5, 31.25)
    assert "no improvement over the shipped model" in kept and "30.5" in kept and "31.25" in kept
    better = search_note("trial", "default", 31.5, 31.25)
    assert "improved on the shipped model" in better and "no improvement" not in better
    assert search_note("trial", None, 31.5, None) == ""  # a search from scratch has nothing to compare


def test_evaluate_config_puts_the_note_on_the_report_and_both_models_in_it(tmp_path: Path) -> None:
    from semray.quickstart import evaluate_config

    cfg = QuickstartConfig()
    e = evaluate_config(cfg, tmp_path, "models:/semray-quickstart/3", "the search found no improvement")
    assert e.methods.models == ["models:/semray-quickstart/3", "default"]
    assert e.report.reference_method == "default"
    assert e.report.notes == [
        "**Searched model `models:/semray-quickstart/3`:** the search found no improvement."
    ]
    assert evaluate_config(cfg, tmp_path, "models:/x/1").report.notes == []


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_end_to_end_on_tiny_settings_then_reuses_everything(
    ray_local: Any, mlflow_store: str, tmp_path: Path
) -> None:
    import mlflow
    import pandas as pd

    from semray.quickstart import run_quickstart

    cfg = load_config(QuickstartConfig, {**TINY, "out_dir": str(tmp_path / "demo")})
    lines: list[str] = []
    res = run_quickstart(cfg, log=lines.append)
    s = res.state
    assert list(s) == ["shards", "search", "lot", "denoise", "evaluate"] and res.reused == []
    # search: one parent run, a child per trial, the better of (best trial, shipped weights) registered
    assert s["search"]["n_trials"] == 2
    client = mlflow.MlflowClient()
    name, version = s["search"]["model_uri"].removeprefix("models:/").split("/")
    _check_the_registered_model_is_at_least_the_shipped_one(s["search"], lines)
    assert client.get_model_version(name, version).name == "test-quickstart"
    assert str(client.get_model_version_by_alias(name, "tuned").version) == version
    children = client.search_runs(
        [s["search"]["experiment_id"]], f"tags.mlflow.parentRunId = '{s['search']['parent_run_id']}'"
    )
    assert len(children) == 2
    # the lot: every file denoised with the registered model, accounted for in the manifest
    man = pd.read_parquet(s["denoise"]["manifest"])
    assert len(man) == 2 and set(man["status"]) == {"ok"}
    assert s["denoise"]["ok"] == 2 and s["denoise"]["failed"] == 0
    for row in man.itertuples():
        out = tifffile.imread(Path(s["denoise"]["dir"]) / row.rel_path)
        assert out.dtype == np.uint16 and out.shape == (64, 64)
    # the evaluation: the searched model and the reference method in one report
    report = Path(s["evaluate"]["report"])
    assert report.is_file()
    results = pd.read_parquet(report.parent / "results.parquet")
    models = results[results["method_kind"] == "model"]
    assert set(models["method"]) == {"test-quickstart", "default"}
    assert set(models[models["method"] == "test-quickstart"]["model_version"]) == {version}
    assert "gaussian" in set(results["method"])
    # both rows, the search's note, and which model is better (the same weights: identical outputs)
    md = (report.parent / "report.md").read_text()
    assert s["search"]["note"] in md and "| test-quickstart |" in md and "| default |" in md
    tuned = models[models["method"] == "test-quickstart"].sort_values("image_id")["psnr"].to_numpy()
    shipped = models[models["method"] == "default"].sort_values("image_id")["psnr"].to_numpy()
    assert np.array_equal(tuned, shipped)
    assert "**test-quickstart vs default (PSNR (dB)):** identical at 8 e-/px" in md
    assert (Path(cfg.out_dir) / "preview.png").is_file()
    text = res.where_to_look(mlflow_store)
    assert s["denoise"]["manifest"] in text and str(report) in text and "mlflow ui" in text

    # a second run reuses every stage: same model, same manifest, no new registered version
    again = run_quickstart(cfg, log=lines.append)
    assert again.reused == ["shards", "search", "lot", "denoise", "evaluate"]
    assert again.state["search"]["model_uri"] == s["search"]["model_uri"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert any("reused" in line for line in lines)


def _check_the_registered_model_is_at_least_the_shipped_one(rec: dict[str, Any], lines: list[str]) -> None:
    """The guarantee: the shipped weights, scored with the trials' own validation, are registered
    unchanged unless the best trial scored strictly higher; the output says which."""
    import torch

    from semray.models.resolve import resolve_model
    from semray.tune_baseline import pick_winner

    assert np.isfinite(rec["init_score"]) and rec["selected"] == pick_winner(
        rec["best_score"], rec["init_score"]
    )
    # this config's learning rate wrecks the weights: the shipped ones must win
    assert rec["selected"] == "init" and rec["best_score"] < rec["init_score"]
    assert "no improvement over the shipped model" in rec["note"] and rec["note"] in "\n".join(lines)
    registered = resolve_model(rec["model_uri"]).model.state_dict()
    shipped = resolve_model(None).model.state_dict()
    assert registered.keys() == shipped.keys()
    assert all(torch.equal(registered[k], shipped[k]) for k in shipped)
