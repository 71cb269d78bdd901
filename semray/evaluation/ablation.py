"""The write-up's ablation: train every recipe under one budget, evaluate them together, one table.

    semray evaluate --ablation configs/ablation.yaml

For each variant: its TrainConfig is the variant's YAML (or the ablation's ``base``) + the variant's
overrides + the shared ``budget`` (applied last, so epochs, steps, data and seed are identical for all),
trained with :func:`semray.train.train`; the best model is exported to ``out_dir/models/<variant>``.
Every config is validated before the first training starts. Then one evaluation (see
:mod:`semray.evaluation.runner`) runs all trained variants and the configured classical methods on the
same images, and ``ablation.md``/``ablation.csv`` put them side by side with paired differences against
the baseline variant. Ablation models are never registered in the MLflow model registry.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from semray.config.base import ConfigError, load_config, read_yaml, set_dotted
from semray.config.evaluate import AblationConfig, AblationVariant, ModelEntry
from semray.evaluation.report import Heading, Para, Table
from semray.evaluation.result import EvaluationResult
from semray.evaluation.runner import run_evaluation
from semray.evaluation.stats import METRICS

TABLE_METRICS = ("psnr", "ssim", "defect_psnr", "defect_recall", "defect_contrast", "gradient_correlation")
VARIANTS_FILE = "variants.json"
#: Written next to each trained variant's model, so a resumed ablation still reports its training.
TRAIN_INFO_FILE = "ablation_train.json"


@dataclass
class VariantRun:
    """One trained variant."""

    name: str
    description: str
    model_dir: Path
    trained: bool  # False when an existing model folder was reused
    train_seconds: float | None
    param_count: int | None
    best_metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)


@dataclass
class AblationResult:
    """The trained variants, their evaluation and the ablation table (long format) with its files."""

    variants: list[VariantRun]
    evaluation: EvaluationResult
    table: pd.DataFrame
    table_path: Path


def variant_train_config(
    cfg: AblationConfig, variant: AblationVariant, model_dir: Path, log_mlflow: bool
) -> Any:
    """The validated TrainConfig of ``variant``: its YAML + its overrides + the shared budget + the
    ablation's fixed settings (export to ``model_dir``, no registry).

    Raises:
        ConfigError: a YAML is missing or a field is invalid; the message names the variant.
    """
    from semray.config.train import TrainConfig

    src = Path(variant.config or cfg.base)
    if not src.is_file():
        raise ConfigError(f"ablation variant {variant.name!r}: training config {src} does not exist")
    data = read_yaml(src)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    fixed = {
        "run.name": f"ablation-{variant.name}-{stamp}",
        "run.export_dir": str(model_dir),
        "mlflow.enabled": bool(log_mlflow) and bool(data.get("mlflow", {}).get("enabled", True)),
        f"mlflow.{_register_field(TrainConfig)}": False,
        "mlflow.alias": None,
    }
    for key, value in [*variant.overrides.items(), *cfg.budget.items(), *fixed.items()]:
        set_dotted(data, key, value)
    try:
        return load_config(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"ablation variant {variant.name!r} ({src}): {e}") from None


def _register_field(train_config_cls: Any) -> str:
    """Name of the TrainConfig switch that registers the final model (``register_model``, formerly
    ``register``): ablation variants must never land in the model registry."""
    fields = train_config_cls.model_fields["mlflow"].annotation.model_fields
    return next(f for f in ("register_model", "register") if f in fields)


def _card(model_dir: Path) -> dict[str, Any]:
    p = model_dir / "card.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def run_ablation(
    cfg: AblationConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log_mlflow: bool | None = None,
    train_fn: Callable[[Any], Any] | None = None,
) -> AblationResult:
    """Train (or reuse) every variant, evaluate them together, write the ablation table.

    Args:
        cfg: the ablation.
        out_dir: output folder (default ``cfg.out_dir``): ``models/<variant>/``, ``evaluation/``,
            ``ablation.md``, ``ablation.csv``, ``variants.json``.
        progress: progress bars.
        log_mlflow: training runs and the evaluation run go to MLflow (default: the evaluation
            config's ``mlflow.enabled``).
        train_fn: the training function (default :func:`semray.train.train`); ``TrainConfig -> result``
            with ``mlflow_run_id`` and ``best_metrics`` attributes, writing the model to
            ``run.export_dir``.
    """
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    log = cfg.evaluation.mlflow.enabled if log_mlflow is None else log_mlflow
    model_root = out / "models"
    plans = [(v, variant_train_config(cfg, v, (model_root / v.name).resolve(), log)) for v in cfg.variants]
    if train_fn is None:
        from semray.train import train as train_fn
    runs = [
        _train_or_reuse(cfg, v, tcfg, model_root / v.name, f"{i}/{len(plans)}", train_fn)
        for i, (v, tcfg) in enumerate(plans, 1)
    ]
    (out / VARIANTS_FILE).write_text(json.dumps([_run_json(r) for r in runs], indent=2, default=str))

    baseline = cfg.baseline or cfg.variants[0].name
    ecfg = cfg.evaluation.model_copy(deep=True)
    ecfg.methods.models = [ModelEntry(spec=str(r.model_dir.resolve()), label=r.name) for r in runs]
    ecfg.report.reference_method = baseline
    if ecfg.mlflow.run_name is None:
        ecfg.mlflow.run_name = "ablation-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    evaluation = run_evaluation(ecfg, out / "evaluation", progress=progress, log_mlflow=log)
    table = ablation_table(evaluation, runs, baseline)
    table.to_csv(out / "ablation.csv", index=False)
    md = out / "ablation.md"
    md.write_text(ablation_markdown(evaluation, runs, baseline, table))
    if evaluation.run_id:
        from mlflow import MlflowClient

        client = MlflowClient()
        client.set_tag(evaluation.run_id, "semray.kind", "ablation")
        for name in ("ablation.md", "ablation.csv", VARIANTS_FILE):
            client.log_artifact(evaluation.run_id, str(out / name), "ablation")
    return AblationResult(runs, evaluation, table, md)


def _train_or_reuse(
    cfg: AblationConfig,
    v: AblationVariant,
    tcfg: Any,
    mdir: Path,
    counter: str,
    train_fn: Callable[[Any], Any],
) -> VariantRun:
    """Train variant ``v`` with ``tcfg`` into ``mdir`` (or reuse the model there when the ablation
    allows it) and describe the run; ``counter`` ("i/n") is for the progress line."""
    reuse = cfg.reuse_trained and (mdir / "model.safetensors").is_file()
    secs, best, run_id = None, {}, None
    if reuse:
        print(f"[ablation {counter}] {v.name}: reusing the trained model in {mdir}", flush=True)
        if (mdir / TRAIN_INFO_FILE).is_file():  # what the run that trained it measured
            info = json.loads((mdir / TRAIN_INFO_FILE).read_text())
            secs, best, run_id = (
                info.get("train_seconds"),
                info.get("best_metrics", {}),
                info.get("mlflow_run_id"),
            )
    else:
        print(f"[ablation {counter}] training {v.name}: {v.description}", flush=True)
        t0 = time.perf_counter()
        res = train_fn(tcfg)
        secs = time.perf_counter() - t0
        best, run_id = dict(getattr(res, "best_metrics", {}) or {}), getattr(res, "mlflow_run_id", None)
        if not (mdir / "model.safetensors").is_file():
            raise RuntimeError(f"ablation variant {v.name!r}: training wrote no model to {mdir}")
        info = {"train_seconds": secs, "best_metrics": best, "mlflow_run_id": run_id}
        (mdir / TRAIN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    card = _card(mdir)
    return VariantRun(
        v.name,
        v.description,
        mdir,
        not reuse,
        secs,
        card.get("param_count"),
        best,
        run_id,
        {**v.overrides, "config": v.config or cfg.base},
    )


def _run_json(r: VariantRun) -> dict[str, Any]:
    return {
        "name": r.name,
        "description": r.description,
        "model_dir": str(r.model_dir),
        "trained": r.trained,
        "train_seconds": r.train_seconds,
        "param_count": r.param_count,
        "best_metrics": r.best_metrics,
        "mlflow_run_id": r.mlflow_run_id,
        "changes": r.changes,
    }


def ablation_table(evaluation: EvaluationResult, runs: list[VariantRun], baseline: str) -> pd.DataFrame:
    """Long table: variant/method x dose x metric with mean, CI half-width and paired delta vs baseline."""
    s = evaluation.summary
    s = s[(s["condition"] == "sem") & (s["metric"].isin(TABLE_METRICS))]
    d = evaluation.deltas
    d = d[(d["condition"] == "sem")] if not d.empty else d
    rows = []
    names = {r.name for r in runs}
    for r in s.itertuples(index=False):
        if r.method == "noisy":
            continue
        row = {
            "variant": r.method,
            "is_variant": r.method in names,
            "dose_e_per_px": r.level,
            "metric": r.metric,
            "mean": r.mean,
            "ci_half": r.ci_half,
            "delta_vs_baseline": float("nan"),
            "delta_ci_low": float("nan"),
            "delta_ci_high": float("nan"),
        }
        if not d.empty:
            hit = d[(d["method"] == r.method) & (d["metric"] == r.metric) & (d["level"] == r.level)]
            if not hit.empty:
                row.update(
                    delta_vs_baseline=hit["mean_delta"].iloc[0],
                    delta_ci_low=hit["ci_low"].iloc[0],
                    delta_ci_high=hit["ci_high"].iloc[0],
                )
        if r.method == baseline:
            row.update(delta_vs_baseline=0.0, delta_ci_low=0.0, delta_ci_high=0.0)
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_markdown(
    evaluation: EvaluationResult, runs: list[VariantRun], baseline: str, table: pd.DataFrame
) -> str:
    """The ablation write-up: what each variant is, then one metric per table (rows = variants)."""
    from semray.evaluation.report import to_markdown

    ts = evaluation.meta["test_set"]
    draws = evaluation.meta.get("noise_draws", 1)
    samples = "images" if draws == 1 else f"images x {draws} noise draws"
    info = pd.DataFrame(
        [
            {
                "variant": r.name,
                "what it changes": r.description,
                "params (M)": f"{r.param_count / 1e6:.2f}" if r.param_count else "?",
                "train time (min)": f"{r.train_seconds / 60:.1f}" if r.train_seconds else "reused",
                "best val": ", ".join(
                    f"{k}={v:.4g}"
                    for k, v in r.best_metrics.items()
                    if k.startswith("val_psnr") or k == "val_defect_recall"
                ),
            }
            for r in runs
        ]
    ).set_index("variant")
    blocks = [
        Heading("semray ablation", 1),
        Para(
            f"{len(runs)} variants trained under the same budget (same data, epochs, steps, seed), evaluated on "
            f"{ts['n_images']} test images ({ts['source']}) with the generator's noise at each dose. Cells: mean "
            f"over {samples}; in brackets the paired difference from the baseline `{baseline}` with its 95% CI. "
            f"Full report: `evaluation/report.html`."
        ),
        Table(info, "variants"),
    ]
    for metric in TABLE_METRICS:
        t = table[table["metric"] == metric]
        if t.empty:
            continue
        wide = pd.DataFrame(index=list(dict.fromkeys(t["variant"])))
        for dose in sorted(t["dose_e_per_px"].unique()):
            col = t[t["dose_e_per_px"] == dose].set_index("variant")
            digits = 2 if metric == "psnr" else 3
            wide[f"{dose:g} e-/px"] = [
                f"{col.loc[v, 'mean']:.{digits}f}"
                + (
                    ""
                    if v == baseline or pd.isna(col.loc[v, "delta_vs_baseline"])
                    else f" ({col.loc[v, 'delta_vs_baseline']:+.{digits}f} [{col.loc[v, 'delta_ci_low']:+.{digits}f}, "
                    f"{col.loc[v, 'delta_ci_high']:+.{digits}f}])"
                )
                for v in wide.index
            ]
        wide.index.name = "variant"
        blocks.append(Table(wide, METRICS[metric]))
    return to_markdown(blocks, Path("."))


__all__ = [
    "AblationResult",
    "VariantRun",
    "ablation_table",
    "run_ablation",
    "variant_train_config",
]
