"""Several noise draws in one evaluation (``noise_draws``): draw k is seed + k, pooled over image x draw."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semray.config.base import load_config
from semray.config.evaluate import EvaluateConfig
from semray.evaluation import EvaluationResult, evaluate_methods, load_evaluation, run_evaluation
from semray.evaluation.methods import ClassicalRunner, NoisyRunner
from semray.evaluation.stats import POOLED_METRICS, paired_deltas, summarize
from semray.evaluation.testset import (
    build_conditions,
    generator_noise,
    load_test_set,
    make_noisy,
    make_target,
)

N_IMAGES, SEED = 3, 3  # dataset seed 5: image 0 has no defect, images 1 and 2 have 1 and 3


def _config(seed: int, draws: int, n_examples: int = 0) -> EvaluateConfig:
    return load_config(
        EvaluateConfig,
        {
            "seed": seed,
            "noise_draws": draws,
            "test_set": {"dataset": {"seed": 5, "height": 48, "width": 48, "n_test": N_IMAGES}},
            "doses_e_per_px": [4, 32],
            "methods": {"classical": ["gaussian", "median"], "models": []},
            "runtime": {"enabled": False},
            "report": {"reference_method": "median", "n_examples": n_examples, "example_level": 4},
            "mlflow": {"enabled": False},
            "parallel": False,
        },
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EvaluationResult]:
    """Two draws from SEED, and the single-draw runs at SEED and SEED + 1 (about a second each)."""
    root = tmp_path_factory.mktemp("draws")
    specs = {"two": (SEED, 2, 1), "first": (SEED, 1, 0), "second": (SEED + 1, 1, 0)}
    return {
        name: run_evaluation(_config(seed, draws, ex), root / name, progress=False)
        for name, (seed, draws, ex) in specs.items()
    }


def _per_image(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary rows of per-image metrics (those :func:`summarize` computes from the results)."""
    return summary[~summary["metric"].isin(POOLED_METRICS)].reset_index(drop=True)


def _draw(res: EvaluationResult, seed: int) -> pd.DataFrame:
    return res.results[res.results["noise_seed"] == seed].reset_index(drop=True)


def test_draw_k_is_the_single_draw_run_at_seed_plus_k(runs: dict[str, EvaluationResult]) -> None:
    two, first, second = runs["two"], runs["first"], runs["second"]
    assert len(two.results) == 2 * len(first.results) == 2 * N_IMAGES * 3 * 2  # 3 methods, 2 doses
    assert set(two.results["noise_seed"]) == {SEED, SEED + 1}
    assert set(first.results["noise_seed"]) == {SEED}  # the column is there with one draw too
    assert two.results["noise_seed"].dtype.kind == "i"
    pd.testing.assert_frame_equal(_draw(two, SEED), first.results)
    pd.testing.assert_frame_equal(_draw(two, SEED + 1), second.results)
    assert set(two.results["image_id"]) == set(first.results["image_id"])  # real ids, not relabelled
    assert two.meta["noise_draws"] == 2 and two.meta["noise_seeds"] == [SEED, SEED + 1]
    assert first.meta["noise_draws"] == 1 and first.meta["noise_seeds"] == [SEED]


def test_summary_and_deltas_pool_image_x_draw(runs: dict[str, EvaluationResult]) -> None:
    two = runs["two"]
    psnr = two.summary[two.summary["metric"] == "psnr"]
    assert (psnr["n"] == N_IMAGES * 2).all()
    recall = two.summary[two.summary["metric"] == "defect_recall"]
    assert (recall["n"] == (N_IMAGES - 1) * 2).all()  # the defect-free image has no recall
    both = pd.concat([runs["first"].results, runs["second"].results], ignore_index=True)
    # the per-image metrics; the pooled detection rows after them are tested in tests/test_detection.py
    pd.testing.assert_frame_equal(_per_image(two.summary), summarize(both))
    # a method against a copy of itself: every (image, draw) pairs with its own row, so the deltas are 0
    r = two.results
    twin = r[r["method"] == "gaussian"].assign(method="gaussian_twin")
    d = paired_deltas(pd.concat([r, twin], ignore_index=True), "gaussian", metrics=["psnr"])
    same = d[d["method"] == "gaussian_twin"]
    assert (same["mean_delta"] == 0).all() and (same["n"] == N_IMAGES * 2).all()
    # the stored deltas are the per-(image, draw) differences against the reference
    keys = ["condition", "level", "image_id", "noise_seed"]
    m = r[r["method"] == "gaussian"].merge(r[r["method"] == "median"], on=keys, suffixes=("", "_ref"))
    expected = (m["psnr"] - m["psnr_ref"]).groupby(m["level"]).mean()
    got = two.deltas[(two.deltas["method"] == "gaussian") & (two.deltas["metric"] == "psnr")]
    assert list(got["n"]) == [N_IMAGES * 2] * 2
    np.testing.assert_allclose(got.set_index("level")["mean_delta"], expected.loc[got["level"]])


def test_recall_bound_pools_the_per_draw_bounds(runs: dict[str, EvaluationResult]) -> None:
    two, first, second = runs["two"], runs["first"], runs["second"]
    assert not two.recall_bound.empty
    f, s = first.recall_bound, second.recall_bound
    assert list(two.recall_bound[["condition", "level"]].itertuples(index=False)) == list(
        f[["condition", "level"]].itertuples(index=False)
    )
    # every (image, draw) counts once; the Rose fraction is pooled over all defects of both draws
    np.testing.assert_array_equal(two.recall_bound["images"], f["images"] + s["images"])
    np.testing.assert_array_equal(two.recall_bound["defects"], f["defects"] + s["defects"])
    np.testing.assert_allclose(
        two.recall_bound["rose_fraction"],
        (f["rose_fraction"] * f["defects"] + s["rose_fraction"] * s["defects"])
        / (f["defects"] + s["defects"]),
    )
    # the same images in every draw: the pooled bound is the plain mean of the per-draw bounds
    np.testing.assert_allclose(
        two.recall_bound["ideal_recall"],
        (first.recall_bound["ideal_recall"] + second.recall_bound["ideal_recall"]) / 2,
    )
    assert (two.recall_bound["defects"] == 2 * first.recall_bound["defects"]).all()


def test_report_states_the_draws(runs: dict[str, EvaluationResult]) -> None:
    md = (runs["two"].out_dir / "report.md").read_text()
    assert "2 noise draws per image (noise seeds 3 to 4)" in md and "paired on (image, draw)" in md
    assert "Paired per-(image, draw) differences" in md
    assert "first noise draw (seed 3)" in md  # the example grid
    single = (runs["first"].out_dir / "report.md").read_text()
    assert "noise seed 3." in single and "noise draws per image" not in single
    assert "Paired per-image differences" in single and "on 3 test images." in single


def test_examples_come_from_the_first_draw() -> None:
    cfg = _config(SEED, 2)
    images = load_test_set(cfg.test_set)
    conds = build_conditions(cfg, generator_noise(cfg))
    runners = [NoisyRunner(), ClassicalRunner("gaussian")]
    _, examples = evaluate_methods(
        images, conds, runners, seeds=[SEED, SEED + 1], example_level=4.0, n_examples=1, progress=False
    )
    (ex,) = examples
    im = next(i for i in images if i.image_id == ex.image_id)
    np.testing.assert_array_equal(ex.noisy, make_noisy(im.clean, conds[0], 4.0, SEED, im.image_id))
    np.testing.assert_array_equal(ex.outputs["noisy"], ex.noisy)


def test_load_evaluation_round_trips_draws_and_reads_old_folders(
    runs: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    two = runs["two"]
    again = load_evaluation(two.out_dir)
    pd.testing.assert_frame_equal(again.results, two.results)
    pd.testing.assert_frame_equal(again.deltas, two.deltas, check_exact=False)
    assert again.meta["noise_seeds"] == [SEED, SEED + 1]
    # a folder written before noise draws existed: no noise_seed column, pairing on the image alone
    old = tmp_path / "old"
    shutil.copytree(runs["first"].out_dir, old)
    results = runs["first"].results.drop(columns=["noise_seed"])
    results.to_parquet(old / "results.parquet", index=False)
    loaded = load_evaluation(old)
    assert "noise_seed" not in loaded.results.columns
    pd.testing.assert_frame_equal(paired_deltas(loaded.results, "median"), runs["first"].deltas)
    pd.testing.assert_frame_equal(summarize(loaded.results), _per_image(runs["first"].summary))


def test_headroom_adc_window_is_scored_against_the_clean_image_on_its_scale() -> None:
    cfg = _config(SEED, 1)
    images = load_test_set(cfg.test_set)
    noise = generator_noise(cfg).model_copy(deep=True)
    noise.quantization.adc_window = "headroom"
    cond = build_conditions(cfg, noise)[0]
    rows, examples = evaluate_methods(
        images, [cond], [NoisyRunner()], seeds=[SEED], example_level=4.0, n_examples=1, progress=False
    )
    for row in rows.itertuples():
        im = next(i for i in images if i.image_id == row.image_id)
        target = make_target(im.clean, cond, row.level, SEED, im.image_id)
        noisy = make_noisy(im.clean, cond, row.level, SEED, im.image_id)
        assert target.max() < 0.9 * im.clean.max()  # the window is wider than [0, 1]
        assert row.sigma_true == pytest.approx(float(np.std(noisy - target.astype(np.float64))), rel=1e-6)
        # on the noisy image's scale (up to charging and drift), which the clean image is not
        assert abs(float(noisy.mean() - target.mean())) < 0.3 * abs(float(noisy.mean() - im.clean.mean()))
    (ex,) = examples
    im = next(i for i in images if i.image_id == ex.image_id)
    np.testing.assert_array_equal(ex.clean, make_target(im.clean, cond, 4.0, SEED, im.image_id))
    clip = build_conditions(cfg, generator_noise(cfg))[0]
    assert make_target(im.clean, clip, 4.0, SEED, im.image_id) is im.clean
