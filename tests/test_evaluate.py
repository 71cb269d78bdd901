"""Evaluation framework: tiny end-to-end runs (report, MLflow, determinism) and the pure pieces."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from semray.config.base import ConfigError, load_config
from semray.config.data import DatasetConfig
from semray.config.evaluate import EvaluateConfig
from semray.config.model import UNetConfig
from semray.data import render_record
from semray.evaluation import evaluate_methods, load_evaluation, run_evaluation
from semray.evaluation.figures import crop_box
from semray.evaluation.methods import ClassicalRunner, NoisyRunner, build_runners
from semray.evaluation.report import SECTIONS
from semray.evaluation.stats import paired_deltas, summarize, wide_table
from semray.evaluation.testset import build_conditions, generator_noise, load_test_set, make_noisy
from semray.io import write_shard
from semray.models.store import save_model
from semray.models.unet import build_model

N_IMAGES, DOSES, GAUSS = 3, [4.0, 32.0], [0.1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = UNetConfig(depth=1, base_width=4, norm="none")
    return save_model(build_model(cfg), cfg, tmp_path_factory.mktemp("models") / "tiny", {"version": "7"})


def tiny_config(model_dir: Path, out_dir: Path, seed: int = 1) -> dict:
    return {
        "seed": seed,
        "test_set": {"dataset": {"seed": 5, "height": 48, "width": 48, "n_test": N_IMAGES}},
        "doses_e_per_px": DOSES,
        "robustness": [{"name": "gaussian", "kind": "gaussian", "levels": GAUSS}],
        "methods": {
            "classical": ["gaussian", "median"],
            "models": [{"spec": str(model_dir), "label": "tiny"}],
            "oracle_sigma": True,
            "device": "cpu",
        },
        "runtime": {"size_px": 32, "repeats": 1},
        "report": {"reference_method": "median", "n_examples": 2, "crop_px": 24},
        "mlflow": {"experiment": "test-evaluate", "run_name": "tiny"},
        "parallel": False,
        "out_dir": str(out_dir),
    }


@pytest.fixture(scope="module")
def tiny_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """One tiny evaluation logged to a fresh MLflow store (shared by the tests that read it)."""
    root = tmp_path_factory.mktemp("eval")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config(EvaluateConfig, tiny_config(tiny_model, root / "out"))
        res = run_evaluation(cfg, progress=False)
        yield res, uri


# ------------------------------------------------------------------------------------------- end to end
def test_report_has_every_section_table_and_figure(tiny_run: tuple) -> None:
    res, _ = tiny_run
    out = res.out_dir
    methods = ["noisy", "tiny", "gaussian", "median", "gaussian+oracle", "median+oracle"]
    assert [m["label"] for m in res.meta["methods"]] == methods
    # one row per image x method x level, over the dose sweep and the gaussian condition
    assert len(res.results) == N_IMAGES * len(methods) * (len(DOSES) + len(GAUSS))
    assert set(res.results["condition"]) == {"sem", "gaussian"}
    assert (res.results.loc[res.results["method"] == "tiny", "model_version"] == "7").all()
    md = (out / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == list(SECTIONS)
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == [
        "examples_dose4.png",
        "metrics_vs_level_gaussian.png",
        "metrics_vs_level_sem.png",
        "roc_gaussian.png",
        "roc_sem.png",
        "runtime.png",
    ]
    for name in figs:
        assert f"](figures/{name})" in md
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the HTML is self-contained: every figure embedded, decodable, and nothing loaded from elsewhere
    page = (out / "report.html").read_text()
    blobs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(blobs) == len(figs)
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in blobs)
    assert "src='http" not in page and "src='figures/" not in page
    # every metric table lists every method at every dose, and the oracle rows are labelled as such
    for title in ("PSNR (dB)", "SSIM", "defect recall (no false-alarm control)", "defect contrast",
                  "recall at 1e-2 false alarms/site", "detection AUC"):  # fmt: skip
        block = md.split(f"*{title}*", 1)[1].split("\n\n", 2)[1]
        assert block.splitlines()[0] == "| method | 4 e-/px | 32 e-/px |"
        assert [r.split(" | ")[0].lstrip("| ") for r in block.splitlines()[2:]] == methods
    assert "true noise std measured from (noisy - clean)" in md
    assert "delta PSNR (dB) vs median" in md
    for name in ("results.parquet", "results.csv", "summary.csv", "deltas.csv", "runtime.csv", "config.yaml"):
        assert (out / name).is_file(), name
    # the ideal-observer bound on recall, for every condition and level, in the report and its file
    bound = res.recall_bound
    assert list(zip(bound["condition"], bound["level"], strict=True)) == [("sem", d) for d in DOSES] + [
        ("gaussian", g) for g in GAUSS
    ]
    assert bound["ideal_recall"].between(0, 1).all() and (bound["defects"] > 0).all()
    assert "*defect detection: ideal-observer bound*" in md and "*defect recall bound, gaussian*" in md
    assert (out / "recall_bound.csv").is_file()
    assert set(res.runtime["method"]) == {"tiny", "gaussian", "median"}  # no noisy, no oracle timing
    assert (res.runtime["seconds_per_megapixel"] > 0).all()


def test_results_make_physical_sense(tiny_run: tuple) -> None:
    r = tiny_run[0].results
    sem = r[r["condition"] == "sem"]
    noisy = sem[sem["method"] == "noisy"].groupby("level")["psnr"].mean()
    assert noisy.loc[32.0] > noisy.loc[4.0] + 3  # 8x the dose: much less noise
    # the input's noise estimate tracks the true noise (shot noise dominates: same order of magnitude)
    ratio = sem["sigma_estimated"] / sem["sigma_true"]
    assert ratio.between(0.3, 2.0).all()
    # every classical filter beats the noisy input at the low dose, on every image
    low = sem[sem["level"] == 4.0].pivot(index="image_id", columns="method", values="psnr")
    assert (low["gaussian"] > low["noisy"]).all() and (low["median"] > low["noisy"]).all()
    assert (r["defect_recall_clean"].dropna() == 1.0).all()


def test_mlflow_run_holds_params_metrics_and_artifacts(tiny_run: tuple) -> None:
    from mlflow import MlflowClient

    res, uri = tiny_run
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["semray.kind"] == "evaluation"
    assert run.data.params["seed"] == "1"
    assert run.data.params["methods.oracle_sigma"] == "True"
    expected = res.summary.query(
        "metric == 'psnr' and method == 'tiny' and condition == 'sem' and level == 4.0"
    )
    assert run.data.metrics["psnr/sem/4/tiny"] == pytest.approx(float(expected["mean"].iloc[0]))
    assert "runtime_s_per_mp/median" in run.data.metrics
    top = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"report.md", "report.html", "results.parquet", "results.csv", "summary.csv", "figures"} <= top
    figs = {a.path for a in client.list_artifacts(res.run_id, "figures")}
    assert "figures/examples_dose4.png" in figs
    # the report names the run it was logged as
    assert res.run_id in (res.out_dir / "report.md").read_text()


def test_same_seed_gives_identical_results_through_the_cli(
    tiny_run: tuple, tiny_model: Path, tmp_path: Path
) -> None:
    from semray.cli import main

    first = tiny_run[0]
    cfg_path = tmp_path / "eval.yaml"
    cfg = tiny_config(tiny_model, tmp_path / "unused")
    cfg["runtime"]["enabled"] = False
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert (
        main(
            [
                "evaluate",
                "--config",
                str(cfg_path),
                "--out",
                str(tmp_path / "again"),
                "--no-mlflow",
                "--quiet",
            ]
        )
        == 0
    )
    again = load_evaluation(tmp_path / "again")
    assert again.run_id is None
    pd.testing.assert_frame_equal(first.results, again.results)
    pd.testing.assert_frame_equal(first.summary, again.summary)
    pd.testing.assert_frame_equal(first.recall_bound, again.recall_bound)
    assert "Runtime measurement was switched off" in (tmp_path / "again" / "report.md").read_text()


def test_a_different_seed_gives_different_noise(tiny_model: Path, tmp_path: Path) -> None:
    cfg = load_config(EvaluateConfig, tiny_config(tiny_model, tmp_path, seed=2))
    images = load_test_set(cfg.test_set)[:1]
    conds = build_conditions(cfg, generator_noise(cfg))[:1]
    a, _ = evaluate_methods(images, conds, [NoisyRunner()], seeds=[1], progress=False)
    b, _ = evaluate_methods(images, conds, [NoisyRunner()], seeds=[2], progress=False)
    assert not np.allclose(a["psnr"], b["psnr"])


@pytest.mark.ray
def test_ray_tasks_give_the_same_results_as_serial(ray_local: None) -> None:
    cfg = load_config(
        EvaluateConfig,
        {"test_set": {"dataset": {"seed": 3, "height": 40, "width": 40, "n_test": 2}}, "doses_e_per_px": [8]},
    )
    images = load_test_set(cfg.test_set)
    conds = build_conditions(cfg, generator_noise(cfg))
    runners = [NoisyRunner(), ClassicalRunner("tv"), ClassicalRunner("median", oracle=True)]
    serial, _ = evaluate_methods(images, conds, runners, seeds=[0], use_ray=False, progress=False)
    for r in runners[1:]:
        r.use_ray = True
    parallel, _ = evaluate_methods(images, conds, runners, seeds=[0], use_ray=True, progress=False)
    pd.testing.assert_frame_equal(serial, parallel)


# --------------------------------------------------------------------------------------- test set + noise
def test_noise_is_keyed_by_image_condition_and_level() -> None:
    cfg = load_config(
        EvaluateConfig, {"robustness": [{"name": "poisson_only", "kind": "poisson", "levels": [4]}]}
    )
    main, poisson = build_conditions(cfg, generator_noise(cfg))
    clean = render_record(DatasetConfig(height=32, width=32), "test", 0)["clean"]
    a = make_noisy(clean, main, 8.0, 0, "img-a")
    np.testing.assert_array_equal(a, make_noisy(clean, main, 8.0, 0, "img-a"))
    assert not np.array_equal(a, make_noisy(clean, main, 8.0, 0, "img-b"))
    assert not np.array_equal(a, make_noisy(clean, poisson, 8.0, 0, "img-a"))
    # more dose, less noise: the residual std falls roughly as 1/sqrt(dose) for shot-noise-only
    res = [float(np.std(make_noisy(clean, poisson, d, 0, "img-a") - clean)) for d in (4.0, 64.0)]
    assert 2.5 < res[0] / res[1] < 5.5  # sqrt(16) = 4, blurred by clipping
    g = build_conditions(
        load_config(EvaluateConfig, {"robustness": [{"name": "g", "kind": "gaussian", "levels": [0.05]}]}),
        main.noise,
    )[1]
    flat = np.full((64, 64), 0.5, np.float32)
    assert float(np.std(make_noisy(flat, g, 0.05, 0, "x") - flat)) == pytest.approx(0.05, rel=0.05)


def test_test_set_from_shards_matches_the_in_memory_render(tmp_path: Path) -> None:
    ds = DatasetConfig(seed=9, height=32, width=32, n_test=2)
    recs = [render_record(ds, "test", 1), render_record(ds, "train", 0), render_record(ds, "test", 0)]
    write_shard(recs, tmp_path / "part-0.parquet")
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({"noise": {"shot": {"dose_e_per_px": [50, 60]}}}))
    cfg = load_config(EvaluateConfig, {"test_set": {"shards": str(tmp_path)}})
    from_shards = load_test_set(cfg.test_set)
    in_memory = load_test_set(
        load_config(EvaluateConfig, {"test_set": {"dataset": ds.model_dump()}}).test_set
    )
    assert [t.image_id for t in from_shards] == [t.image_id for t in in_memory]
    for a, b in zip(from_shards, in_memory, strict=True):
        np.testing.assert_array_equal(a.clean, b.clean)
        np.testing.assert_array_equal(a.defect_mask, b.defect_mask)
        np.testing.assert_array_equal(a.reference, b.reference)
    assert generator_noise(cfg).shot.dose_e_per_px.high == 60  # the shards' own noise model
    with pytest.raises(ConfigError, match="no rows with split 'val'"):
        load_test_set(cfg.test_set.model_copy(update={"split": "val"}))


# -------------------------------------------------------------------------------------------- statistics
def _toy_results() -> pd.DataFrame:
    rows = []
    for i, (a, b) in enumerate([(20.0, 18.0), (22.0, 19.0), (24.0, 23.0)]):
        for method, kind, v, rec in (
            ("m", "model", a, 1.0),
            ("ref", "classical", b, 0.0),
            ("noisy", "noisy", 10.0, 0.5),
        ):
            rows.append(
                {
                    "image_id": f"i{i}",
                    "condition": "sem",
                    "level": 8.0,
                    "level_unit": "e-/px",
                    "method": method,
                    "method_kind": kind,
                    "psnr": v,
                    "defect_recall": rec,
                }
            )
    return pd.DataFrame(rows)


def test_summary_mean_and_t_interval_with_clipping() -> None:
    s = summarize(_toy_results(), metrics=["psnr", "defect_recall"], ci=0.95)
    m = s[(s["method"] == "m") & (s["metric"] == "psnr")].iloc[0]
    assert m["n"] == 3 and m["mean"] == pytest.approx(22.0) and m["std"] == pytest.approx(2.0)
    half = 4.302652729911275 * 2.0 / np.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert m["ci_half"] == pytest.approx(half)
    assert (m["ci_low"], m["ci_high"]) == pytest.approx((22.0 - half, 22.0 + half))
    r = s[(s["method"] == "noisy") & (s["metric"] == "defect_recall")].iloc[0]
    assert r["std"] == 0 and r["ci_low"] == r["ci_high"] == 0.5
    recall = summarize(
        _toy_results().assign(defect_recall=[1.0, 0, 0, 0.5, 0, 0, 1.0, 0, 0]), ["defect_recall"]
    )
    mr = recall[recall["method"] == "m"].iloc[0]
    assert mr["ci_high"] == 1.0 and mr["mean"] + mr["ci_half"] > 1.0  # interval clipped to the metric range


def test_paired_deltas_and_wide_table() -> None:
    res = _toy_results()
    d = paired_deltas(res, "ref", metrics=["psnr"])
    assert list(d["method"]) == ["m"]  # the noisy input is not compared
    row = d.iloc[0]
    assert row["mean_delta"] == pytest.approx(2.0)  # deltas 2, 3, 1
    assert row["ci_low"] == pytest.approx(2.0 - 4.302652729911275 * 1.0 / np.sqrt(3))
    assert paired_deltas(res, "absent").empty
    t = wide_table(summarize(res, ["psnr"]), "psnr", "sem", ["noisy", "m", "ref"])
    assert list(t.columns) == ["8 e-/px"]
    assert t.loc["m", "8 e-/px"].startswith("**22.00 ± ")  # best, bold
    assert not t.loc["noisy", "8 e-/px"].startswith("**")
    # defect contrast: 1 is ideal, so an exaggerated defect (1.3) loses to a faithful one (0.95)
    contrast = summarize(res.assign(defect_contrast=[1.3, 0.95, 0.5] * 3), ["defect_contrast"])
    t = wide_table(contrast, "defect_contrast", "sem", ["noisy", "m", "ref"])
    assert t.loc["ref", "8 e-/px"].startswith("**") and not t.loc["m", "8 e-/px"].startswith("**")


def test_verdict_says_which_method_is_better_from_the_paired_interval() -> None:
    from semray.evaluation.content import delta_verdict, verdict_text

    assert delta_verdict(0.5, 0.1, 0.9) == "better" and delta_verdict(-0.5, -0.9, -0.1) == "worse"
    assert delta_verdict(0.1, -0.2, 0.4) == "not significantly different"
    assert (
        delta_verdict(0.0, 0.0, 0.0) == "identical"
        and delta_verdict(np.nan, np.nan, np.nan) == "not compared"
    )
    res = _toy_results()
    text = verdict_text(paired_deltas(res, "ref", metrics=["psnr"]), "ref", ["m"])
    # m - ref = 2, 3, 1 dB: the 95% interval 2 +- 2.48 spans 0
    assert text == "**m vs ref (PSNR (dB)):** not significantly different at 8 e-/px (+2.00 [-0.48, +4.48])."
    same = res.copy()
    same.loc[same["method"] == "m", "psnr"] = same.loc[same["method"] == "ref", "psnr"].to_numpy()
    assert "identical at 8 e-/px" in verdict_text(paired_deltas(same, "ref", metrics=["psnr"]), "ref", ["m"])
    assert verdict_text(paired_deltas(res, "ref", metrics=["psnr"]), "ref", ["absent"]) == ""


# -------------------------------------------------------------------------------------- config + helpers
@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"methods": {"classical": ["bm3d", "wiener"]}}, "methods.classical"),
        ({"doses_e_per_px": [8, -1]}, "doses_e_per_px"),
        ({"robustness": [{"name": "x", "kind": "sem", "levels": [8]}]}, "robustness.0"),
        ({"robustness": [{"name": "g", "kind": "gaussian", "levels": [2.0]}]}, "robustness.0"),
        ({"methods": {"classical": ["tv"], "classical_params": {"bm3d": {"vst": True}}}}, "methods"),
        ({"runtime": {"repeats": 0}}, "runtime.repeats"),
        ({"noise_draws": 0}, "noise_draws"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(EvaluateConfig, data)


def test_example_level_must_be_a_dose(tmp_path: Path) -> None:
    cfg = load_config(EvaluateConfig, {"report": {"example_level": 5}, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="example_level 5.0 is not one of"):
        run_evaluation(cfg, progress=False, log_mlflow=False)


def test_duplicate_method_labels_are_refused(tiny_model: Path) -> None:
    cfg = load_config(
        EvaluateConfig,
        {"methods": {"classical": ["tv"], "models": [{"spec": str(tiny_model), "label": "tv"}]}},
    )
    with pytest.raises(ValueError, match="share the label"):
        build_runners(cfg.methods)


def test_crop_box_centres_on_the_largest_defect() -> None:
    mask = np.zeros((100, 80), bool)
    mask[10:12, 10:12] = True  # small
    mask[60:70, 70:78] = True  # large, near the right edge
    y0, x0, y1, x1 = crop_box(mask, 20)
    assert (y1 - y0, x1 - x0) == (20, 20)
    assert abs((y0 + y1) / 2 - 64.5) <= 0.5 and x1 == 80  # centred on y; pushed inside on x
    assert crop_box(np.zeros((10, 10), bool), 32) == (0, 0, 10, 10)


# ------------------------------------------------------------------------------------------------ ablation
def test_ablation_trains_every_variant_under_one_budget_and_tabulates(tmp_path: Path) -> None:
    from semray.config.evaluate import AblationConfig
    from semray.evaluation.ablation import run_ablation

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"optim": {"epochs": 50}, "model": {"base_width": 8, "depth": 2}}))
    seen: list = []

    class FakeResult:
        mlflow_run_id = None
        best_metrics: ClassVar[dict[str, float]] = {"val_psnr": 30.0}

    def fake_train(tcfg):  # stands in for semray.train.train: same contract, no Ray
        seen.append(tcfg)
        torch.manual_seed(len(seen))
        save_model(build_model(tcfg.model), tcfg.model, tcfg.run.export_dir)
        return FakeResult()

    cfg = load_config(
        AblationConfig,
        {
            "base": str(base),
            "budget": {"optim.epochs": 2, "seed": 11},
            "variants": [
                {"name": "full", "description": "Charbonnier + MS-SSIM + edge"},
                {
                    "name": "residual",
                    "description": "predict the noise",
                    "overrides": {"model.residual": True, "optim.epochs": 99},
                },
            ],
            "evaluation": {
                "test_set": {"dataset": {"seed": 4, "height": 40, "width": 40, "n_test": 2}},
                "doses_e_per_px": [8],
                "methods": {"classical": ["gaussian"], "models": [], "device": "cpu"},
                "runtime": {"enabled": False},
                "report": {"n_examples": 0},
                "parallel": False,
            },
            "out_dir": str(tmp_path / "abl"),
        },
    )
    res = run_ablation(cfg, progress=False, log_mlflow=False, train_fn=fake_train)
    assert [c.optim.epochs for c in seen] == [2, 2]  # the shared budget wins over a variant's own setting
    assert [c.seed for c in seen] == [11, 11]
    assert [c.model.residual for c in seen] == [False, True]
    assert all(
        c.model.base_width == 8 and not c.mlflow.register_model and c.mlflow.alias is None for c in seen
    )
    assert [v.name for v in res.variants] == ["full", "residual"] and all(v.trained for v in res.variants)
    t = res.table
    assert set(t["variant"]) == {"full", "residual", "gaussian"}
    base_rows = t[t["variant"] == "full"]
    assert (base_rows["delta_vs_baseline"] == 0).all()
    r = t[(t["variant"] == "residual") & (t["metric"] == "psnr")].iloc[0]
    f = base_rows[base_rows["metric"] == "psnr"].iloc[0]
    assert r["delta_vs_baseline"] == pytest.approx(r["mean"] - f["mean"])  # paired mean = difference of means
    md = res.table_path.read_text()
    assert "| residual | predict the noise |" in md and "*PSNR (dB)*" in md
    # a second run reuses the trained models instead of training again
    seen.clear()
    again = run_ablation(cfg, progress=False, log_mlflow=False, train_fn=fake_train)
    assert seen == [] and not any(v.trained for v in again.variants)
    assert [v.train_seconds for v in again.variants] == [v.train_seconds for v in res.variants]
    assert again.variants[0].best_metrics == {"val_psnr": 30.0}
    pd.testing.assert_frame_equal(res.table, again.table)


def test_ablation_refuses_a_bad_variant_before_training(tmp_path: Path) -> None:
    from semray.config.evaluate import AblationConfig
    from semray.evaluation.ablation import run_ablation

    base = tmp_path / "base.yaml"
    base.write_text("{}")
    cfg = load_config(
        AblationConfig,
        {
            "base": str(base),
            "variants": [{"name": "ok"}, {"name": "bad", "overrides": {"model.depth": 99}}],
            "out_dir": str(tmp_path),
        },
    )

    def never(_):
        raise AssertionError("no training may start when any variant is invalid")

    with pytest.raises(ConfigError, match=r"(?s)variant 'bad'.*model\.depth"):
        run_ablation(cfg, log_mlflow=False, train_fn=never)


def test_an_unknown_model_is_a_clear_config_error(tmp_path: Path) -> None:
    from semray.cli import main

    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"methods": {"classical": ["tv"], "models": ["no-such-model"]}}))
    with pytest.raises(ConfigError, match="methods.models: cannot load 'no-such-model'"):
        build_runners(load_config(EvaluateConfig, cfg).methods)
    assert main(["evaluate", "--config", str(cfg), "--no-mlflow", "--out", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize(
    "name", ["evaluate.yaml", "evaluate_quick.yaml", "ablation.yaml", "ablation_quick.yaml"]
)
def test_shipped_configs_validate(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semray.config.evaluate import AblationConfig
    from semray.evaluation.ablation import variant_train_config

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # config paths inside the YAML are relative to the project root
    path = root / "configs" / name
    if name.startswith("evaluate"):
        cfg = load_config(EvaluateConfig, path)
        assert "bm3d" in cfg.methods.classical and cfg.methods.models
        return
    cfg = load_config(AblationConfig, path)
    assert {v.name for v in cfg.variants} >= {
        "mse_ssim",
        "charbonnier",
        "full",
        "residual",
        "deeper",
        "edge_input",
        "care_l1",
    }
    budgets = set()
    for v in cfg.variants:  # every variant's training config is valid and shares one budget
        t = variant_train_config(cfg, v, tmp_path / v.name, log_mlflow=False)
        budgets.add(
            (
                t.seed,
                t.optim.epochs,
                t.optim.steps_per_epoch,
                t.data.crop_px,
                t.data.batch_size,
                tuple(t.data.shards),
            )
        )
    assert len(budgets) == 1
