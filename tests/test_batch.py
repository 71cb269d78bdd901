"""Batch denoising of lot trees: dtype round trips, bad files, resume, a killed actor, manifest, MLflow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from conftest import save_tiny_model
from PIL import Image

from semray import batch
from semray.batch import (
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    FaultInjection,
    JobError,
    lot_and_wafer,
    plan_inputs,
    read_manifest,
    run_denoise_job,
)
from semray.cli import main
from semray.config.infer import InferConfig
from semray.io import sha256_file

TAG = 65000  # a private TIFF tag standing in for vendor metadata

GOOD = {  # rel path -> (dtype, shape)
    "L1/W01/a.tif": ("uint16", (64, 80)),
    "L1/W01/b.png": ("uint8", (48, 40)),
    "L1/W02/c.png": ("uint16", (40, 56)),
    "L1/W02/d.tif": ("float32", (33, 47)),
    "L2/W01/deeper/e.tiff": ("uint8", (50, 50)),
    "top.png": ("uint8", (24, 24)),
}
BAD = {  # rel path -> expected fragment of the error
    "L2/W01/zero.tif": "empty",
    "L2/W01/trunc.tif": "cannot be read as TIFF",
    "L2/W01/text.tif": "not a TIFF",
    "L2/W02/rgb.png": "true colour",
}
TINY = "L2/W02/tiny.png"  # 7 x 5: denoised (the engine pads it), not failed


def _pixels(rng: np.random.Generator, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    clean = np.linspace(0.2, 0.8, shape[1])[None, :] * np.ones(shape)
    noisy = np.clip(clean + 0.1 * rng.standard_normal(shape), 0, 1)
    if dtype == "uint8":
        return np.rint(noisy * 255).astype(np.uint8)
    if dtype == "uint16":
        return np.rint(noisy * 65535).astype(np.uint16)
    return (noisy * 500.0 - 100.0).astype(np.float32)  # a float TIFF outside [0, 1]


def make_lot_tree(root: Path, bad: bool = True) -> dict[str, np.ndarray]:
    """Write the GOOD (and BAD, TINY) files under ``root``; returns the good files' pixels."""
    rng = np.random.default_rng(0)
    data = {}
    for rel, (dtype, shape) in GOOD.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data[rel] = _pixels(rng, dtype, shape)
        if p.suffix == ".png":
            Image.fromarray(data[rel]).save(p)
        else:
            tifffile.imwrite(p, data[rel], description="SEM HV=1kV", extratags=[(TAG, "s", 0, "FEI", True)])
    (root / "L1" / "notes.txt").write_text("not an image: ignored")
    if bad:
        (root / "L2/W01").mkdir(parents=True, exist_ok=True)
        (root / "L2/W02").mkdir(parents=True, exist_ok=True)
        (root / "L2/W01/zero.tif").write_bytes(b"")
        tifffile.imwrite(root / "L2/W01/full.tif.tmp", rng.integers(0, 65535, (64, 80), dtype=np.uint16))
        blob = (root / "L2/W01/full.tif.tmp").read_bytes()
        (root / "L2/W01/full.tif.tmp").unlink()
        (root / "L2/W01/trunc.tif").write_bytes(blob[: len(blob) // 2])
        (root / "L2/W01/text.tif").write_text("this is a text file, not a TIFF\n")
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "L2/W02/rgb.png")
        Image.fromarray(rng.integers(0, 255, (7, 5), dtype=np.uint8)).save(root / TINY)
    return data


def _read_raw(path: Path) -> np.ndarray:
    return tifffile.imread(path) if path.suffix != ".png" else np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", {"version": "3"}, seed=0)


def _cli(*args: Any) -> int:
    return main(["denoise", *[str(a) for a in args], "--no-progress"])


# ---- planning ----


def test_lot_and_wafer_from_relative_paths() -> None:
    assert lot_and_wafer("L1/W01/x.tif") == ("L1", "W01")
    assert lot_and_wafer("L1/W01/a/b/x.tif") == ("L1", "W01")
    assert lot_and_wafer("L1/x.tif") == ("L1", "")
    assert lot_and_wafer("x.tif") == ("", "")


def test_plan_mirrors_tree_and_never_reads_its_own_outputs(tmp_path: Path) -> None:
    make_lot_tree(tmp_path / "lots", bad=False)
    out = tmp_path / "lots" / "denoised"  # OUTPUT inside INPUT
    (out / "L1").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(out / "L1" / "old.png")
    files, single = plan_inputs(tmp_path / "lots", out)
    assert not single and [f.rel_path for f in files] == sorted(GOOD)
    assert all(f.out_path == str((out / f.rel_path).resolve()) for f in files)
    with pytest.raises(JobError, match="differ"):
        plan_inputs(tmp_path / "lots", tmp_path / "lots")
    with pytest.raises(JobError, match="no such"):
        plan_inputs(tmp_path / "nope", out)


# ---- the CLI, in-process (no Ray): formats, resume, force, exit codes ----


def test_cli_round_trips_dtype_shape_format_and_tags(tmp_path: Path, model_dir: Path) -> None:
    data = make_lot_tree(tmp_path / "in", bad=False)
    assert _cli(tmp_path / "in", tmp_path / "out", "--model", model_dir, "--actors", 0, "--no-track") == 0
    for rel, src in data.items():
        out = _read_raw(tmp_path / "out" / rel)
        assert out.dtype == src.dtype and out.shape == src.shape, rel
        assert not np.array_equal(out, src), f"{rel} came back unchanged"
    with tifffile.TiffFile(tmp_path / "out" / "L1/W01/a.tif") as tf:
        assert tf.pages[0].description == "SEM HV=1kV" and tf.pages[0].tags[TAG].value == "FEI"
    d = tifffile.imread(tmp_path / "out" / "L1/W02/d.tif")
    assert d.min() >= -100.01 and d.max() <= 400.01  # float data mapped back to its own range
    rows = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    assert list(rows.columns) == list(MANIFEST_COLUMNS) and (rows["status"] == "ok").all()
    assert [list(s) for s in rows["shape"]] == [list(GOOD[r][1]) for r in rows["rel_path"]]
    assert list(rows["dtype"]) == [GOOD[r][0] for r in rows["rel_path"]]
    assert (rows["model_name"] == "tiny").all() and (rows["model_version"] == "3").all()


def test_single_file_to_file_and_to_folder(tmp_path: Path) -> None:
    img = _pixels(np.random.default_rng(1), "uint16", (40, 30))
    tifffile.imwrite(tmp_path / "one.tif", img)
    assert _cli(tmp_path / "one.tif", tmp_path / "res.tif", "--method", "gaussian") == 0
    assert _read_raw(tmp_path / "res.tif").dtype == np.uint16
    assert not (tmp_path / MANIFEST_FILE).exists()  # a file output gets no manifest beside it
    assert _cli(tmp_path / "one.tif", tmp_path / "dir", "--method", "median") == 0
    assert _read_raw(tmp_path / "dir" / "one.tif").shape == (40, 30)
    assert len(read_manifest(tmp_path / "dir" / MANIFEST_FILE)) == 1


def test_keep_bottom_rows_leaves_data_bar_bytes_identical(tmp_path: Path) -> None:
    img = _pixels(np.random.default_rng(2), "uint16", (64, 48))
    img[-10:] = 60000
    tifffile.imwrite(tmp_path / "bar.tif", img)
    assert (
        _cli(tmp_path / "bar.tif", tmp_path / "o.tif", "--method", "gaussian", "--keep-bottom-rows", 10) == 0
    )
    out = _read_raw(tmp_path / "o.tif")
    np.testing.assert_array_equal(out[-10:], img[-10:])
    assert not np.array_equal(out[:-10], img[:-10])


def test_resume_skips_verified_outputs_and_redoes_changed_ones(tmp_path: Path) -> None:
    make_lot_tree(tmp_path / "in", bad=False)
    cfg = InferConfig(method="gaussian", num_actors=0, track=False)
    first = run_denoise_job(tmp_path / "in", tmp_path / "out", cfg, progress=False)
    assert first.counts == {"ok": len(GOOD), "failed": 0, "skipped": 0}
    mtimes = {r: (tmp_path / "out" / r).stat().st_mtime_ns for r in GOOD}

    again = run_denoise_job(tmp_path / "in", tmp_path / "out", cfg, progress=False)
    assert again.counts == {"ok": 0, "failed": 0, "skipped": len(GOOD)}
    assert {r: (tmp_path / "out" / r).stat().st_mtime_ns for r in GOOD} == mtimes
    # a skipped row keeps what the file is, so the manifest stays complete run after run
    cols = ["rel_path", "output_sha256", "shape", "dtype", "noise_sigma_in", "noise_sigma_out"]
    assert again.rows[cols].astype(str).equals(first.rows[cols].astype(str))

    # tampered output, changed input, changed settings: each is redone, nothing else is
    (tmp_path / "out" / "L1/W01/b.png").write_bytes(b"garbage")
    Image.fromarray(_pixels(np.random.default_rng(9), "uint8", (48, 40))).save(tmp_path / "in/top.png")
    third = run_denoise_job(tmp_path / "in", tmp_path / "out", cfg, progress=False)
    redone = set(third.rows.loc[third.rows["status"] == "ok", "rel_path"])
    assert redone == {"L1/W01/b.png", "top.png"} and third.counts["skipped"] == len(GOOD) - 2
    out_b = tmp_path / "out" / "L1/W01/b.png"
    assert sha256_file(out_b) == third.rows.set_index("rel_path").loc["L1/W01/b.png", "output_sha256"]
    other = run_denoise_job(tmp_path / "in", tmp_path / "out", cfg.model_copy(update={"method": "median"}))
    assert other.counts["ok"] == len(GOOD)

    # --force redoes everything
    assert _cli(tmp_path / "in", tmp_path / "out", "--method", "median", "--actors", 0, "--no-track") == 0
    assert (read_manifest(tmp_path / "out" / MANIFEST_FILE)["status"] == "skipped").all()
    assert (
        _cli(tmp_path / "in", tmp_path / "out", "--method", "median", "--actors", 0, "--no-track", "--force")
        == 0
    )
    assert (read_manifest(tmp_path / "out" / MANIFEST_FILE)["status"] == "ok").all()


def test_failed_file_removes_stale_output_and_sets_exit_status(tmp_path: Path) -> None:
    make_lot_tree(tmp_path / "in", bad=False)
    assert _cli(tmp_path / "in", tmp_path / "out", "--method", "gaussian", "--actors", 0, "--no-track") == 0
    (tmp_path / "in/top.png").write_bytes(b"\x89PNG broken")
    assert _cli(tmp_path / "in", tmp_path / "out", "--method", "gaussian", "--actors", 0, "--no-track") == 1
    rows = read_manifest(tmp_path / "out" / MANIFEST_FILE).set_index("rel_path")
    assert (
        rows.loc["top.png", "status"] == "failed" and "cannot be read as PNG" in rows.loc["top.png", "error"]
    )
    assert not (tmp_path / "out/top.png").exists()


def test_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(tmp_path / "missing", tmp_path / "out") == 2
    (tmp_path / "in").mkdir()
    assert _cli(tmp_path / "in", tmp_path / "in") == 2
    assert _cli(tmp_path / "in", tmp_path / "out", "--tile", 64, "--overlap", 32) == 2
    assert "overlap" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in/x.png")
    assert _cli(tmp_path / "in/x.png", tmp_path / "o.png", "--model", "no-such-model") == 2
    assert "no-such-model" in capsys.readouterr().err


def test_min_side_fails_implausibly_small_images(tmp_path: Path) -> None:
    make_lot_tree(tmp_path / "in")
    cfg = InferConfig(method="gaussian", num_actors=0, track=False, min_side=8)
    rows = run_denoise_job(tmp_path / "in", tmp_path / "out", cfg, progress=False).rows.set_index("rel_path")
    assert rows.loc[TINY, "status"] == "failed" and "min_side=8" in rows.loc[TINY, "error"]


def test_files_whose_worker_always_dies_are_reported_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_lot_tree(tmp_path / "in", bad=False)
    calls = []

    def flaky_pass(items, prev, cfg, pinned, settings_sha, fault, on_row):  # type: ignore[no-untyped-def]
        """Stands in for the actor pool: a.tif's worker dies on every attempt, the rest succeed."""
        calls.append([i.rel_path for i in items])
        d = batch.Denoiser("gaussian")
        for item in items:
            if item.rel_path != "L1/W01/a.tif":
                on_row(batch.process_file(item, d, batch.FileOptions(), None, settings_sha))
        return "RayTaskError: actor died"

    monkeypatch.setattr(batch, "_ray_pass", flaky_pass)
    s = run_denoise_job(
        tmp_path / "in",
        tmp_path / "out",
        InferConfig(method="gaussian", track=False, executor="ray"),
        progress=False,
    )
    assert calls[1] == ["L1/W01/a.tif"]  # the reconciliation pass re-queues only what had no row
    rows = s.rows.set_index("rel_path")
    assert len(rows) == len(GOOD) and rows.loc["L1/W01/a.tif", "status"] == "failed"
    assert "WorkerDied" in rows.loc["L1/W01/a.tif", "error"] and s.counts["ok"] == len(GOOD) - 1


# ---- the Ray job: actor pool, bad files, a killed actor, MLflow, resume ----


@pytest.fixture(scope="module")
def ray_job(ray_local: None, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One Ray job over a lot tree with bad files; one actor os._exit()s on its 2nd file, once."""
    root = tmp_path_factory.mktemp("rayjob")
    data = make_lot_tree(root / "lots")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        cfg = InferConfig(
            model=str(model_dir),
            num_actors=2,
            executor="ray",
            tiling={"tile": 32, "overlap": 8},
            experiment="lots-test",
        )
        fault = FaultInjection(nth=2, marker=str(root / "crashed"))
        summary = run_denoise_job(root / "lots", root / "out", cfg, progress=False, fault=fault)
        yield {"root": root, "data": data, "summary": summary, "cfg": cfg, "marker": root / "crashed"}


@pytest.mark.ray
def test_ray_job_accounts_for_every_file_despite_bad_files_and_a_killed_actor(ray_job: dict) -> None:
    s, root = ray_job["summary"], ray_job["root"]
    assert ray_job["marker"].exists(), "the fault hook never fired: the test did not kill an actor"
    rows = read_manifest(root / "out" / MANIFEST_FILE)
    expected = sorted([*GOOD, *BAD, TINY])
    assert list(rows["rel_path"]) == expected  # one row per input file, none lost, none extra
    assert list(rows.columns) == list(MANIFEST_COLUMNS)
    by = rows.set_index("rel_path")
    for rel, why in BAD.items():
        assert by.loc[rel, "status"] == "failed" and why in by.loc[rel, "error"], (rel, by.loc[rel, "error"])
        assert not (root / "out" / rel).exists()
    ok = [*GOOD, TINY]
    assert (by.loc[ok, "status"] == "ok").all()
    assert list(by.loc[TINY, "shape"]) == [7, 5]
    for rel in ok:
        assert sha256_file(root / "out" / rel) == by.loc[rel, "output_sha256"]
        assert sha256_file(root / "lots" / rel) == by.loc[rel, "input_sha256"]
    assert (by.loc[[*GOOD], "noise_sigma_in"] > 0.02).all()
    assert (by.loc[ok, "runtime_s"] > 0).all() and by.loc[ok, "worker"].nunique() >= 2
    assert set(by.loc["L1/W01/a.tif", ["lot", "wafer"]]) == {"L1", "W01"}
    assert (by["model_name"] == "tiny").all() and (by["model_source"] == "local").all()
    assert s.counts == {"ok": len(ok), "failed": len(BAD), "skipped": 0}


@pytest.mark.ray
def test_ray_job_logs_one_mlflow_run(ray_job: dict) -> None:
    import mlflow

    root, s = ray_job["root"], ray_job["summary"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(s.run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "lots-test"
    m, p = run.data.metrics, run.data.params
    assert m["files_total"] == len(GOOD) + len(BAD) + 1
    assert (m["files_ok"], m["files_failed"], m["files_skipped"]) == (len(GOOD) + 1, len(BAD), 0)
    assert m["throughput_mpix_s"] > 0 and m["megapixels"] == pytest.approx(s.megapixels)
    assert p["num_actors"] == "2" and p["model_version"] == "3" and p["method"] == "unet"
    artifacts = [a.path for a in client.list_artifacts(s.run_id)]
    assert MANIFEST_FILE in artifacts
    local = client.download_artifacts(s.run_id, MANIFEST_FILE, str(root / "dl"))
    assert pq.read_table(local).num_rows == m["files_total"]


@pytest.mark.ray
def test_ray_job_resume_skips_finished_files(ray_job: dict) -> None:
    root, cfg = ray_job["root"], ray_job["cfg"]
    mtimes = {r: os.stat(root / "out" / r).st_mtime_ns for r in GOOD}
    s = run_denoise_job(root / "lots", root / "out", cfg.model_copy(update={"track": False}), progress=False)
    assert s.counts == {"ok": 0, "failed": len(BAD), "skipped": len(GOOD) + 1}  # failed ones are retried
    assert {r: os.stat(root / "out" / r).st_mtime_ns for r in GOOD} == mtimes
