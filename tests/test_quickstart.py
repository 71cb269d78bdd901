"""The quickstart (`semray demo`): its steps end to end on tiny settings, and its rerun reuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from semray.config.base import ConfigError, load_config
from semray.config.quickstart import LotSection, QuickstartConfig
from semray.quickstart import write_lot

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
            "data": {
                "crop_px": 32,
                "crops_per_image": 2,
                "batch_size": 4,
                "val_crop_px": 32,
                "val_max_images": 4,
                "shuffle_buffer": 8,
                "noise_batch_images": 4,
            },
            "model": {"base_width": 4, "depth": 2},
            "loss": {"kind": "composite", "ms_ssim_scales": 2},
            "optim": {"epochs": 2, "steps_per_epoch": 2, "lr": 5.0e-3, "warmup_fraction": 0.0},
            "validation": {"figure_every": 0, "figure_images": 2},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1, "data_cpus": 0.25},
            "checkpoint": {"keep_best": 2, "max_failures": 1},
        },
        "space": {"loss.alpha": {"uniform": [0.0, 1.0]}},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "search": {"num_samples": 2, "max_concurrent_trials": 2, "seed": 0},
        "resources": {"cpus": 0.5},
        "mlflow": {"experiment": "test-quickstart", "registered_model": "test-quickstart", "alias": "tuned"},
    },
    "lot": {"lots": 1, "wafers_per_lot": 2, "images_per_wafer": 1, "size_px": 64, "doses_e_per_px": [4, 64]},
    "denoise": {"num_actors": 1, "cpus_per_actor": 0.5, "tile": 64, "overlap": 16},
    "evaluate": {
        "doses_e_per_px": [8],
        "methods": {"classical": ["gaussian"], "models": [], "device": "cpu"},
        "runtime": {"enabled": False},
        "report": {"reference_method": "gaussian", "n_examples": 1, "example_level": 8},
        "mlflow": {"experiment": "test-quickstart"},
    },
}


def test_embedded_defaults_load_and_bad_overrides_name_the_field() -> None:
    cfg = QuickstartConfig()
    assert cfg.tune.mlflow.experiment == "semray-quickstart" and cfg.tune.search.num_samples == 4
    assert "bm3d" in cfg.evaluate.methods.classical and "default" in cfg.evaluate.methods.models
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
    # search: one parent run, a child per trial, the best model registered
    assert s["search"]["n_trials"] == 2
    client = mlflow.MlflowClient()
    name, version = s["search"]["model_uri"].removeprefix("models:/").split("/")
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
    assert set(models["method"]) == {"test-quickstart"} and set(models["model_version"]) == {version}
    assert "gaussian" in set(results["method"])
    assert (Path(cfg.out_dir) / "preview.png").is_file()
    text = res.where_to_look(mlflow_store)
    assert s["denoise"]["manifest"] in text and str(report) in text and "mlflow ui" in text

    # a second run reuses every stage: same model, same manifest, no new registered version
    again = run_quickstart(cfg, log=lines.append)
    assert again.reused == ["shards", "search", "lot", "denoise", "evaluate"]
    assert again.state["search"]["model_uri"] == s["search"]["model_uri"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert any("reused" in line for line in lines)
