"""Detection with false alarms counted (issue 21): ROC maths, a blob-painting denoiser, the identity, the
ideal observer at a fixed false-alarm rate (analytic vs Monte Carlo), and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from semray.config.base import load_config
from semray.config.data import DatasetConfig
from semray.config.evaluate import EvaluateConfig
from semray.config.noise import NoiseConfig
from semray.evaluation.detectability import (
    bound_at_false_alarms,
    dprime_sites,
    monte_carlo_sites,
    pooled_ideal_recall,
)
from semray.evaluation.detection import (
    auc,
    detection_summary,
    recall_at,
    roc_curve,
    score_output,
    threshold_at,
)
from semray.evaluation.testset import MAIN_CONDITION, Condition, TestImage, make_noisy
from semray.metrics import DEFECT_REGION_PX, ideal_observer_recall

DOSE = 32.0


def _images(n: int = 4, size: int = 64) -> list[TestImage]:
    """Tiny rendered test images that have defects (clean, reference, mask)."""
    from semray.data import render_record

    cfg = DatasetConfig(seed=21, height=size, width=size, n_train=0, n_val=0, n_test=8 * n)
    out = []
    for i in range(8 * n):
        r = render_record(cfg, "test", i)
        if r["defect_mask"].any() and len(out) < n:
            out.append(TestImage(str(r["image_id"]), str(r["pattern"]), r["clean"], r["reference"],
                                 r["defect_mask"], int(r["n_defects"])))  # fmt: skip
    assert len(out) == n
    return out


def _sites(images: list[TestImage], denoise, draws: int, level: float = DOSE) -> pd.DataFrame:
    """The site table of ``denoise`` over ``draws`` noise draws of every image (plus mean old metrics)."""
    cond = Condition(MAIN_CONDITION, "sem", (level,), NoiseConfig(), False)
    rows, old = [], []
    for seed in range(draws):
        for im in images:
            x1 = make_noisy(im.clean, cond, level, seed, im.image_id)
            x0 = make_noisy(im.reference, cond, level, seed, im.image_id)
            m, (s1, s0) = score_output(
                im.clean, denoise(x1, im), im.defect_mask, im.reference, denoise(x0, im)
            )
            old.append((m["defect_recall"], m["defect_false_alarm"]))
            rows += [
                {"condition": "sem", "level": level, "level_unit": "e-/px", "method": "m", "method_kind": "x",
                 "image_id": im.image_id, "noise_seed": seed, "site": k, "score_defect": a, "score_reference": b}
                for k, (a, b) in enumerate(zip(s1, s0, strict=True))
            ]  # fmt: skip
    recall, false_alarm = np.nanmean(np.array(old), axis=0)
    return pd.DataFrame(rows).assign(old_recall=recall, old_false_alarm=false_alarm)


def _smooth(x: np.ndarray, im: TestImage) -> np.ndarray:
    return ndi.gaussian_filter(x, 1.0).astype(np.float32)


def _painter(x: np.ndarray, im: TestImage) -> np.ndarray:
    """Smooths, then paints the defect at full strength at every defect site, whatever the input."""
    out = _smooth(x, im)
    support = expand_labels(ndi.label(im.defect_mask, np.ones((3, 3), bool))[0], DEFECT_REGION_PX) > 0
    out[support] = im.clean[support]
    return out


def test_roc_maths_on_known_scores() -> None:
    s1, s0 = np.array([3.0, 2.0, 1.0, 0.5]), np.array([0.0, 1.0, 2.5, -1.0])
    # pairs (defect > defect-free): 3>all 4, 2>3 of 4, 1>2 + tie with 1 (half), 0.5>2 -> 11.5 / 16
    assert auc(s1, s0) == pytest.approx(11.5 / 16)
    s0_many = np.arange(200.0)  # 1e-2 of 200 = 2 above the threshold -> threshold is the 3rd largest
    assert threshold_at(s0_many, 0.01) == 197.0
    assert recall_at(np.array([197.0, 198.0, 250.0]), s0_many, 0.01) == pytest.approx(2 / 3)
    assert np.isnan(recall_at(s1, s0, 0.01))  # 4 defect-free sites cannot resolve 1e-2
    fa, rec = roc_curve(s1, s0)
    assert fa[0] == 0.0 and rec[-1] == 1.0 and fa[-1] == 1.0 and np.all(np.diff(fa) >= 0)


def test_identity_on_clean_images_gets_auc_one() -> None:
    rows = []
    for im in _images():
        _, (s1, s0) = score_output(im.clean, im.clean, im.defect_mask, im.reference, im.reference)
        np.testing.assert_allclose(s1, 1.0)  # the whole defect signal is there
        np.testing.assert_allclose(s0, 0.0, atol=1e-12)
        rows.append((s1, s0))
    assert auc(np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])) == 1.0


def test_a_blob_painter_gets_full_recall_but_false_alarms_and_loses_at_1e2() -> None:
    images = _images()
    painter = _sites(images, _painter, draws=16)
    honest = _sites(images, _smooth, draws=16)
    assert len(painter) >= 100  # enough defect-free sites to read a 1e-2 false-alarm rate
    # the uncontrolled recall loves the painter, and never sees its false alarms
    assert painter["old_recall"].iloc[0] == 1.0
    assert painter["old_false_alarm"].iloc[0] > 0.95
    assert honest["old_false_alarm"].iloc[0] < 0.05
    # with false alarms counted, the painter cannot tell a defect from its absence
    sp, sh = (detection_summary(t, n_boot=50).set_index("metric")["mean"] for t in (painter, honest))
    assert sp["detection_auc"] == pytest.approx(0.5, abs=0.05)
    assert sp["recall_at_fa_0.01"] < 0.05
    assert sh["recall_at_fa_0.01"] > 0.5 and sh["detection_auc"] > 0.9


def test_pooled_ideal_observer_matches_the_per_site_one_for_equal_dprime() -> None:
    d = np.full(7, 2.5)
    for a in (1e-1, 1e-2, 1e-3):
        assert pooled_ideal_recall(d, a) == pytest.approx(ideal_observer_recall(d, a), abs=1e-9)
    # unequal d': pooling the threshold can only help (Neyman-Pearson)
    d = np.array([0.5, 2.0, 4.0, 6.0])
    assert pooled_ideal_recall(d, 1e-2) >= ideal_observer_recall(d, 1e-2) - 1e-12


def test_monte_carlo_and_analytic_ideal_observer_agree_at_32_e_per_px() -> None:
    images = _images(n=3)
    cond = Condition(MAIN_CONDITION, "sem", (DOSE,), NoiseConfig(), False)
    dsites = dprime_sites(images, [cond], seed=0)
    mc = monte_carlo_sites(images, cond, DOSE, seed=0, draws=60)
    assert len(mc) >= 100
    b = bound_at_false_alarms(dsites, mc, [0.01], n_boot=200).iloc[0]
    key = "recall_at_fa_0.01"
    assert b["mc_draws"] == 60 and np.isfinite(b[f"mc_{key}"])
    # the two intervals overlap
    assert b[f"mc_{key}_low"] <= b[f"ideal_{key}_high"] and b[f"ideal_{key}_low"] <= b[f"mc_{key}_high"]
    assert abs(b[f"mc_{key}"] - b[f"ideal_{key}"]) < 0.1


def test_report_shows_analytic_and_monte_carlo_bound_at_2_e_per_px(tmp_path: Path) -> None:
    from semray.evaluation import run_evaluation

    cfg = load_config(
        EvaluateConfig,
        {
            "seed": 1,
            "test_set": {"dataset": {"seed": 5, "height": 64, "width": 64, "n_test": 3}},
            "doses_e_per_px": [2.0, 32.0],
            "methods": {"classical": ["gaussian"], "models": [], "device": "cpu"},
            "runtime": {"enabled": False},
            "report": {"reference_method": "gaussian", "n_examples": 0},
            "detection": {"mc_draws": 16, "mc_max_dose": 2.0, "bootstrap": 20},
            "parallel": False,
            "out_dir": str(tmp_path / "eval"),
        },
    )
    res = run_evaluation(cfg, progress=False, log_mlflow=False)
    bound = res.recall_bound.set_index("level")
    assert np.isfinite(bound.loc[2.0, "mc_recall_at_fa_0.01"]) and np.isfinite(
        bound.loc[2.0, "ideal_recall_at_fa_0.01"]
    )
    assert np.isnan(bound.loc[32.0, "mc_recall_at_fa_0.01"])  # above mc_max_dose: analytic only
    md = (tmp_path / "eval" / "report.md").read_text()
    for kind in ("analytic", "Monte Carlo, full noise model"):
        line = next(x for x in md.splitlines() if f"at 0.01 false alarms/site ({kind})" in x)
        assert line.split("|")[2].strip()[0].isdigit()  # the 2 e-/px column holds a number
    assert {"detection_auc", "recall_at_fa_0.01", "defect_false_alarm"} <= set(res.summary["metric"])
    assert (tmp_path / "eval" / "figures" / "roc_sem.png").is_file()
    assert "recall at 1e-2 false alarms/site" in md and "defect recall (no false-alarm control)" in md
    # MLflow gets the pooled metrics and both bounds
    from semray.evaluation.tracking import summary_metrics

    keys = summary_metrics(res)
    # (the methods' recall at 1e-2 is n/a here, 16 defect-free sites per dose, and NaN is not logged)
    assert "detection_auc/sem/2/gaussian" in keys and "detection_auc/sem/32/noisy" in keys
    assert {
        "bound_ideal_recall_at_fa_0.01/sem/2/ideal_observer",
        "bound_mc_recall_at_fa_0.01/sem/2/ideal_observer",
    } <= set(keys)
