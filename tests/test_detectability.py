"""The ideal-observer bound on defect recall: known values, its detection law, the SEM noise variance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr, ndtri

from semray.config.noise import NoiseConfig
from semray.evaluation.detectability import ROSE_DPRIME, detectability_table, noise_variance, summarise
from semray.evaluation.testset import Condition, TestImage, make_noisy, noise_params
from semray.metrics import defect_detectability, defect_recall, ideal_observer_recall
from semray.noise import apply_noise, image_rng, poisson_gaussian_coefficients

H = W = 64


def _scene(amplitudes: list[float], background: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat background with one 5x5 square defect per amplitude, side by side: (clean, reference, mask)."""
    ref = np.full((H, W), background, np.float32)
    clean = ref.copy()
    mask = np.zeros((H, W), bool)
    for i, amp in enumerate(amplitudes):
        y, x = 10, 8 + 16 * i
        clean[y : y + 5, x : x + 5] += amp
        mask[y : y + 5, x : x + 5] = True
    return clean, ref, mask


def test_dprime_of_a_square_defect_in_white_noise_is_known() -> None:
    clean, ref, mask = _scene([0.2])
    # 25 px of signal 0.2 in noise of std 0.1: d' = 0.2 * sqrt(25) / 0.1 = 10
    assert defect_detectability(clean, ref, mask, 0.01) == pytest.approx([10.0], rel=1e-6)
    # a per-pixel variance map gives the same; d' scales as 1 / sigma
    assert defect_detectability(clean, ref, mask, np.full((H, W), 0.04)) == pytest.approx([5.0], rel=1e-6)


def test_same_instances_as_defect_recall_in_label_order() -> None:
    # the middle defect is fainter than MIN_DEFECT_SIGNATURE: recall skips it, so does the bound
    clean, ref, mask = _scene([0.2, 0.005, 0.4])
    d = defect_detectability(clean, ref, mask, 0.01)
    assert d == pytest.approx([10.0, 20.0], rel=1e-6)
    # defect_recall on a copy with only the first defect kept scores 2 instances -> 0.5
    kept = clean.copy()
    kept[:, 40:] = ref[:, 40:]
    assert defect_recall(clean, kept, mask, ref) == pytest.approx(0.5)
    assert defect_detectability(ref, ref, np.zeros((H, W), bool), 0.01).size == 0


def test_bad_inputs_are_refused() -> None:
    clean, ref, mask = _scene([0.2])
    with pytest.raises(ValueError, match="positive and finite"):
        defect_detectability(clean, ref, mask, 0.0)
    with pytest.raises(ValueError, match="reference shape"):
        defect_detectability(clean, ref[:10], mask, 0.01)
    with pytest.raises(ValueError, match="false_alarm"):
        ideal_observer_recall(np.array([1.0]), 0.0)


def test_ideal_observer_recall_known_values() -> None:
    t = float(ndtri(1 - 1e-3))  # 3.090 sigma
    assert ideal_observer_recall(np.array([t])) == pytest.approx(0.5)
    assert ideal_observer_recall(np.array([0.0])) == pytest.approx(1e-3)  # only false alarms
    assert ideal_observer_recall(np.array([30.0, t])) == pytest.approx(0.75)
    assert ideal_observer_recall(np.array([t + 1.0]), 1e-3) == pytest.approx(float(ndtr(1.0)))
    assert np.isnan(ideal_observer_recall(np.array([])))


def test_the_matched_filter_detects_as_often_as_the_bound_predicts() -> None:
    """Monte Carlo: the prewhitened matched filter on real noise draws finds the defect with
    probability Phi(d' - t), which is what ideal_observer_recall reports."""
    clean, ref, mask = _scene([0.05])
    var = 0.005 + 0.02 * ref.astype(np.float64)  # signal-dependent variance, as in the SEM model
    d = defect_detectability(clean, ref, mask, var)[0]
    s = (clean - ref).astype(np.float64)
    rng = np.random.default_rng(0)
    t = float(ndtri(1 - 1e-3))
    hits = 0
    n = 4000
    for _ in range(n):
        x = s + rng.standard_normal((H, W)) * np.sqrt(var)  # the image minus the reference
        stat = float(np.sum(s * x / var)) / d  # N(d', 1) with the defect, N(0, 1) without
        hits += stat > t
    expected = ideal_observer_recall(np.array([d]))
    assert 0.2 < expected < 0.95, "pick a defect the test can resolve"
    assert hits / n == pytest.approx(expected, abs=0.03)


def _test_image() -> TestImage:
    clean, ref, mask = _scene([0.15, -0.1])
    return TestImage("img-0", "flat", clean, ref, mask, 2)


def test_noise_variance_is_what_make_noisy_draws() -> None:
    """The variance the bound uses matches the empirical variance of the evaluation's noisy images."""
    im = _test_image()
    flat = TestImage(
        "flat",
        "flat",
        np.full((128, 128), 0.5, np.float32),
        np.full((128, 128), 0.5, np.float32),
        np.zeros((128, 128), bool),
        0,
    )
    # doses high enough that the [0, 1] output range clips nothing (clipping only removes information)
    cond = Condition("poisson_only", "poisson", (128.0, 512.0), NoiseConfig().only("shot"), True)
    for dose in cond.levels:
        noisy = make_noisy(flat.clean, cond, dose, seed=3, image_id=flat.image_id)
        var = noise_variance(flat, cond, dose, seed=3)
        assert float(np.var(noisy)) == pytest.approx(float(np.mean(var)), rel=0.06)
    # and make_noisy is apply_noise with exactly those parameters
    p = noise_params(cond, 4.0, 3, im.image_id)
    np.testing.assert_array_equal(
        make_noisy(im.clean, cond, 4.0, 3, im.image_id),
        apply_noise(im.clean, p, image_rng(3, "img-0|poisson_only|4")),
    )
    a, b = poisson_gaussian_coefficients(p)
    assert a > 0 and b >= 0
    with pytest.raises(ValueError, match="no physical noise"):
        noise_params(Condition("g", "gaussian", (0.1,), None, True), 0.1, 0, "x")


def test_table_shot_noise_dprime_grows_as_sqrt_dose_and_gaussian_as_one_over_sigma() -> None:
    im = _test_image()
    shot = Condition("poisson_only", "poisson", (2.0, 8.0, 32.0), NoiseConfig().only("shot"), True)
    gauss = Condition("gaussian", "gaussian", (0.05, 0.1), None, True)
    tab = detectability_table([im], [shot, gauss], seed=0)
    assert list(tab["n_defects"]) == [2] * 5
    d = tab.set_index(["condition", "level"])["dprime_median"]
    # var = (a I + b) with a, b both proportional to 1 / dose when only shot noise is on
    assert d[("poisson_only", 8.0)] / d[("poisson_only", 2.0)] == pytest.approx(2.0, rel=1e-6)
    assert d[("poisson_only", 32.0)] / d[("poisson_only", 8.0)] == pytest.approx(2.0, rel=1e-6)
    assert d[("gaussian", 0.05)] / d[("gaussian", 0.1)] == pytest.approx(2.0, rel=1e-6)
    recall = tab.set_index(["condition", "level"])["ideal_recall"]
    assert recall[("poisson_only", 2.0)] < recall[("poisson_only", 8.0)] <= recall[("poisson_only", 32.0)]
    s = summarise(tab)
    assert list(s.columns) == ["condition", "level", "images", "defects", "ideal_recall", "rose_fraction"]
    assert (s["defects"] == 2).all() and s["rose_fraction"].between(0, 1).all()
    assert ROSE_DPRIME == 5.0


def test_table_skips_images_without_reference_or_defects() -> None:
    im = _test_image()
    no_ref = TestImage("b", "flat", im.clean, None, im.defect_mask, 2)
    no_def = TestImage("c", "flat", im.reference, im.reference, np.zeros_like(im.defect_mask), 0)
    gauss = Condition("gaussian", "gaussian", (0.1,), None, True)
    tab = detectability_table([no_ref, no_def], [gauss], seed=0)
    assert tab.empty and summarise(tab).empty
    assert list(detectability_table([im, no_ref], [gauss], seed=0)["image_id"]) == ["img-0"]


def test_summarising_several_draws_counts_each_image_and_draw_once() -> None:
    """Rows of several noise draws summarised together: each (image, draw) row is one sample."""
    one = _test_image()
    two = TestImage("img-1", "flat", *_scene([0.3])[:2], _scene([0.3])[2], 1)
    shot = Condition("poisson_only", "poisson", (2.0, 8.0), NoiseConfig().only("shot"), True)
    draws = [detectability_table([one, two], [shot], seed=s) for s in (0, 1, 2)]
    union = summarise(pd.concat(draws, ignore_index=True))
    assert (union["images"] == 6).all()
