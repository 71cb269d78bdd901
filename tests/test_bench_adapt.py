"""The pure parts of the "another microscope" benchmark (benchmarks/adapt.py, adapt_domains.py,
adapt_stats.py): the domains' noise statistics against their definitions, the exact low-dose truth, the
paired bootstrap CIs, the same-step budget of every method, the oracle's config and the tables.

No training here (the benchmark itself runs the fine-tunes; tests/test_adapt.py runs `semray adapt`).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from bench_modules import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("adapt")


def _lag1(noise: np.ndarray, axis: int) -> float:
    """Lag-1 correlation of zero-mean-ish (H, W) noise along ``axis``."""
    n = noise - noise.mean()
    a, b = (n[:, :-1], n[:, 1:]) if axis == 1 else (n[:-1], n[1:])
    return float(np.mean(a * b) / np.mean(n * n))


@pytest.mark.parametrize(("name", "sigma", "rho"), [("gauss_ar1", 0.1, 0.5), ("diag_ar1", 0.08, 0.7)])
def test_gaussian_domains_have_their_sigma_and_fast_axis_correlation(
    bench: ModuleType, name: str, sigma: float, rho: float
) -> None:
    d = bench.dom.DOMAINS[name]
    flat = np.full((256, 256), 0.5, np.float32)  # far from the clip at 0 and 1
    noise = d.scan(flat, d.levels[0], np.random.default_rng(0)) - d.truth(flat, d.levels[0])
    assert d.levels[0] == sigma
    assert noise.std() == pytest.approx(sigma, rel=0.03)
    assert _lag1(noise, axis=1) == pytest.approx(rho, abs=0.02)
    assert _lag1(noise, axis=0) == pytest.approx(0.0, abs=0.02)
    # written as 16-bit grey levels
    assert np.allclose(noise + 0.5, np.rint((noise + 0.5) * 65535) / 65535, atol=1e-6)


def test_lowdose_mean_response_is_the_exact_expectation(bench: ModuleType) -> None:
    """``E[(S / (dose eta1))**gamma]`` with S a Poisson number of unit exponentials, by Monte Carlo."""
    dom = bench.dom
    rng = np.random.default_rng(1)
    dose, g = 4.0, dom.LOWDOSE["gamma"]
    for lam in (0.0, 0.4, 2.0, 4.0):
        s = rng.gamma(rng.poisson(lam, 400_000))
        mc = np.mean((s / (dose * dom.LOWDOSE["eta1"])) ** g)
        assert float(dom.lowdose_mean_response(np.array([lam]), dose)[0]) == pytest.approx(mc, abs=3e-3)


@pytest.mark.parametrize(("dose", "tol"), [(2.0, 0.004), (5.0, 0.002)])
def test_lowdose_scans_average_to_the_truth_and_carry_its_correlation(
    bench: ModuleType, dose: float, tol: float
) -> None:
    """Averaging scans converges to the truth (up to the 8-bit ADC's clipping, largest at the lowest dose);
    the fluctuations are correlated along x, not y; a pixel's SE mean is dose * (0.1 + 0.9 c)."""
    dom = bench.dom
    d = dom.DOMAINS["lowdose"]
    levels = np.array([0.0, 0.5, 1.0], np.float32)
    field = np.repeat(levels, 64)[None, :].repeat(128, axis=0)  # three flat bands along x
    truth = d.truth(field, dose)
    scans = np.stack([d.scan(field, dose, np.random.default_rng([2, k])) for k in range(200)])
    mean = scans.mean(axis=0)
    for j in range(3):
        band = (slice(None), slice(64 * j + 8, 64 * j + 56))
        assert float(mean[band].mean()) == pytest.approx(float(truth[band].mean()), abs=tol)
    assert np.all(np.isin(np.rint(scans[0] * 255), np.arange(256)))  # 8-bit grey levels
    fluct = scans[:, :, 72:120] - truth[:, 72:120]
    assert np.mean([_lag1(f, 1) for f in fluct]) == pytest.approx(0.4, abs=0.06)
    assert abs(np.mean([_lag1(f, 0) for f in fluct])) < 0.03
    # the dark end is lifted by the black level and compressed by the response: not the training scale
    assert float(truth[0, 0]) > dom.LOWDOSE["black"] and float(truth[0, -1]) < dom.LOWDOSE["black"] + 0.4


def test_lowdose_gain_law_is_not_affine(bench: ModuleType) -> None:
    """The shipped model's training noise has variance a * I + b; this chain's is far from any such line
    through its dark and bright ends (the response stretches the dark end)."""
    d = bench.dom.DOMAINS["lowdose"]
    dose = 5.0
    levels = [0.0, 0.25, 0.5, 0.75, 1.0]
    means, variances = [], []
    for c in levels:
        flat = np.full((128, 128), c, np.float32)
        s = np.stack([d.scan(flat, dose, np.random.default_rng([3, k])) for k in range(20)])
        means.append(float(s.mean()))
        variances.append(float(s.var()))
    line = np.interp(means, [means[0], means[-1]], [variances[0], variances[-1]])
    assert max(abs(v - w) / w for v, w in zip(variances[1:-1], line[1:-1], strict=True)) > 0.15


def test_rendered_fields_carry_defects_and_rotation_changes_the_content(bench: ModuleType) -> None:
    dom = bench.dom
    plain = dom.render_fields(4, 96, seed=5)
    rotated = dom.render_fields(4, 96, seed=5, rotated=True)
    assert [f.pattern for f in plain] == ["lines", "contacts", "contacts_staggered", "tin_balls"]
    assert all(f.defect_mask.any() for f in plain)  # defect_probability 1: defect PSNR on every image
    for f in rotated:
        assert f.content.shape == f.defect_mask.shape == (96, 96) and f.content.dtype == np.float32
        assert 0.0 <= f.content.min() and f.content.max() <= 1.0
        assert 20 <= int(f.pattern.rsplit("_rot", 1)[1]) <= 70
    assert not np.allclose(plain[0].content, rotated[0].content)
    # repeatable: the same seed gives the same fields and scans
    again = dom.render_fields(1, 96, seed=5)
    assert np.array_equal(again[0].content, plain[0].content)
    d = dom.DOMAINS["gauss_ar1"]
    assert np.array_equal(dom.scans(d, again, 0.1, 5)[0], dom.scans(d, plain[:1], 0.1, 5)[0])
    assert not np.array_equal(dom.scans(d, again, 0.1, 5, scan=1)[0], dom.scans(d, plain[:1], 0.1, 5)[0])


def test_paired_ci_on_known_differences(bench: ModuleType) -> None:
    st = bench.st
    rng = np.random.default_rng(4)
    b = rng.normal(30.0, 2.0, 40)  # large image-to-image spread, removed by pairing
    a = b + 1.0 + rng.normal(0.0, 0.1, 40)
    c = st.paired_ci(a, b, n_boot=1000, seed=0)
    assert c["n"] == 40 and c["mean"] == pytest.approx(1.0, abs=0.05)
    assert c["low"] < 1.0 < c["high"] and c["high"] - c["low"] < 0.15
    assert st.paired_ci(a, b, n_boot=1000, seed=0) == c  # fixed seed: the same interval
    const = st.paired_ci([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    assert const["mean"] == const["low"] == const["high"] == pytest.approx(0.5)
    with_nan = st.paired_ci([1.0, math.nan, 3.0], [0.0, 0.0, 1.0])
    assert with_nan["n"] == 2 and with_nan["mean"] == pytest.approx(1.5)
    one = st.paired_ci([1.0], [0.0])
    assert one["mean"] == 1.0 and math.isnan(one["low"]) and math.isnan(one["high"])


def test_every_method_gets_the_same_steps_per_epoch(bench: ModuleType) -> None:
    """Pinned crops per image make the step cap bind for adapt, --frames and the oracle alike."""
    from semray.config.adapt import AdaptConfig, build_train_config
    from semray.config.base import load_config
    from semray.train.plan import epoch_steps

    cfg0 = load_config(AdaptConfig, None, ["optim.steps_per_epoch=40", "synthetic.n_train=8"])
    cfg, budget = bench.pin_steps(cfg0, n_adapt=4, size=512)
    tcfg = build_train_config(cfg, None, "u", "s", "/tmp/x")
    n_pairs = 13  # 4 images x 4 tiles of 256 px, 3 held back
    for n_train in (n_pairs, n_pairs + 8, 3 + 8):  # oracle, adapt, --frames (one field's train tiles)
        assert epoch_steps(tcfg, n_train, cfg.optim.num_workers) == 40
    assert budget["crops_per_image"] == tcfg.data.crops_per_image == math.ceil(40 * 8 * 2 / 9)
    # without the pin, adapt's 4 crops per image would cap these runs lower, differently
    plain = build_train_config(cfg0, None, "u", "s", "/tmp/x")
    assert epoch_steps(plain, n_pairs, 2) < epoch_steps(plain, n_pairs + 8, 2) < 40
    kept = load_config(AdaptConfig, None, ["train={data: {crops_per_image: 7}}"])
    assert bench.pin_steps(kept, 4, 512)[1]["crops_per_image"] == 7  # an explicit choice wins


def test_oracle_config_is_the_adapt_fine_tune_on_true_pairs(bench: ModuleType, tmp_path: Path) -> None:
    from semray.config.adapt import AdaptConfig
    from semray.config.base import load_config

    cfg = load_config(AdaptConfig, None, ["optim.epochs=2", "optim.lr=1e-4"])
    o = bench.oracle_config(cfg, tmp_path / "pairs", tmp_path / "train", side=256, scratch=False)
    assert [(s.name, s.noise) for s in o.data.sources] == [("pairs", "as_is")]
    assert o.validation.metric == "val_psnr/pairs" and o.init == "default"
    assert o.optim.freeze_batchnorm and o.optim.epochs == 2 and o.optim.lr == 1e-4
    assert "model" not in o.model_fields_set  # the architecture comes from the init model
    s = bench.oracle_config(cfg, tmp_path / "pairs", tmp_path / "train", side=256, scratch=True)
    assert s.init is None and s.model.norm == "none" and s.model.base_width == 32 and s.loss.kind == "l1"
    assert s.optim.epochs == 2 and s.optim.lr == 2e-3  # the same steps, the CARE recipe's learning rate


def test_tables_show_the_paired_differences_and_the_targets(bench: ModuleType) -> None:
    st = bench.st
    per_image = {
        "noisy": {"psnr": [20.0, 21.0], "ssim": [0.4, 0.5], "defect_psnr": [19.0, math.nan]},
        "shipped": {"psnr": [30.0, 31.0], "ssim": [0.9, 0.9], "defect_psnr": [29.0, math.nan]},
        "adapted": {"psnr": [30.5, 31.0], "ssim": [0.91, 0.9], "defect_psnr": [29.5, math.nan]},
        "oracle": {"psnr": [32.0, 32.5], "ssim": [0.95, 0.94], "defect_psnr": [31.0, math.nan]},
    }
    ds = {"domain": "lowdose", "level": 2.0, "level_unit": "e-/px", "per_image": per_image,
          "comparisons": st.comparisons(per_image, n_boot=200), "wall_s": {"fit_oracle": 12.3}}  # fmt: skip
    ds["methods"] = {
        "oracle": {"kept_init_model": False, "best_epoch": 1},
        "adapted": {"selection": {"comparison": {"verdict": "level"}}, "frames": None},
        "adapted_frames": {
            "selection": {"comparison": {"verdict": "better"}},
            "frames": {"shifts": [[0, 0], [0.1, -2.5]]},
        },
    }
    methods = st.methods_table([ds])
    assert "| lowdose | 2 e-/px | oracle | 32.25 | 0.9450 | 31.00 | 12 | epoch 1 |" in methods
    assert "| adapted | 30.75 | 0.9050 | 29.50 |  | verdict: level |" in methods
    assert st.method_note(ds["methods"]["adapted_frames"]) == (
        "verdict: better; largest registration shift 2.50 px (true: 0)"
    )
    deltas = st.deltas_table([ds])
    assert "| lowdose | 2 e-/px | adapted - oracle | 2 | -1.50 [-1.50, -1.50]" in deltas
    assert "adapted - oracle" in deltas and "missed (>= -1 dB)" in deltas
    assert "| shipped - oracle | 2 | -1.75" in deltas and "met (>= -2 dB)" in deltas
    assert "adapted - shipped" in deltas and "adapted_frames" not in deltas  # only methods that ran


def test_result_json_copy_is_strict_json(bench: ModuleType) -> None:
    """``finite`` (result.json) turns NaN/inf into null and numpy scalars into numbers."""
    import json

    out = bench.st.finite({"psnr": [np.float32(30.5), float("nan")], "ci": (float("inf"), 1.0), 2: "x"})
    assert out == {"psnr": [30.5, None], "ci": [None, 1.0], "2": "x"}
    json.dumps(out, allow_nan=False)
