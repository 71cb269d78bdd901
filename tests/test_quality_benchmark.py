"""benchmarks/quality.py on a tiny run: the record holds the targets, the per-dose table and the recall bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_modules import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def test_quality_benchmark_pools_noise_seeds_and_records_targets_and_the_recall_bound(
    quality, tmp_path: Path
) -> None:
    args = [
        "--config", str(ROOT / "configs" / "evaluate_quick.yaml"),
        "--out", str(tmp_path / "eval"),
        "--results", str(tmp_path / "results"),
        "--no-mlflow",
        "--set", "noise_draws=2",
        "--set", "test_set.dataset.n_test=4",
        "--set", "doses_e_per_px=[2, 128]",
        "--set", "robustness=[]",
        "--set", "methods.classical=[bm3d]",
        "--set", "runtime.size_px=128",
        "--set", "runtime.repeats=1",
        "--set", "report.n_examples=1",
    ]  # fmt: skip
    assert quality.main(args) == 0
    md = (tmp_path / "results" / "quality.md").read_text()
    for heading in ("## Targets", "## Per dose", "## Defect recall against the ideal-observer bound"):
        assert heading in md
    assert "benchmarks/quality.py --config" in md  # the command that reproduces it
    rec = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert set(rec["verdict"]["pass"]) == {
        "psnr_gain_every_dose",
        "ssim_gain_every_dose",
        "defect_recall_every_dose",
        "speedup",
    }
    # two noise draws pooled in one evaluation: every image counted once per draw, paired over (image, seed)
    assert rec["noise_seeds"] == [0, 1] and rec["noise_draws"] == 2
    assert "noise seeds 0, 1" in md
    psnr = [
        r
        for r in rec["summary"]
        if r["metric"] == "psnr" and r["method"] == "bm3d" and r["condition"] == "sem"
    ]
    assert {r["n"] for r in psnr} == {8}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("eval")] == ["eval"]
    bound = {r["dose_e_per_px"]: r for r in rec["recall_bound"]}
    assert sorted(bound) == [2.0, 128.0]
    assert all(0.0 <= r["ideal_observer_recall"] <= 1.0 for r in bound.values())
    # more electrons, more visible defects
    assert bound[128.0]["ideal_observer_recall"] >= bound[2.0]["ideal_observer_recall"]
    assert bound[128.0]["ideal_observer_recall"] > 0.99
    assert bound[2.0]["defects"] == bound[128.0]["defects"] > 0
