"""Log an evaluation as ONE MLflow run: params = config, metrics = summary, artifacts = the output folder."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable

import numpy as np

from semray.config.base import flatten
from semray.config.evaluate import EvaluateConfig
from semray.evaluation.result import EvaluationResult

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(metric: str, condition: str, level: float, method: str) -> str:
    """``"<metric>/<condition>/<level>/<method>"`` with characters MLflow refuses replaced by ``_``."""
    return _KEY_BAD.sub("_", f"{metric}/{condition}/{level:g}/{method}")


def summary_metrics(result: EvaluationResult) -> dict[str, float]:
    """Every finite summary mean (detection AUC and recall at fixed false-alarm rates included), every
    paired delta, every runtime and the ideal observer's recall at each false-alarm rate, as flat MLflow
    metrics."""
    out: dict[str, float] = {}
    for r in result.summary.itertuples(index=False):
        if np.isfinite(r.mean):
            out[metric_key(r.metric, r.condition, r.level, r.method)] = float(r.mean)
    for r in result.deltas.itertuples(index=False):
        if np.isfinite(r.mean_delta):
            out[metric_key(f"delta_{r.metric}", r.condition, r.level, r.method)] = float(r.mean_delta)
    for r in result.runtime.itertuples(index=False):
        out[_KEY_BAD.sub("_", f"runtime_s_per_mp/{r.method}")] = float(r.seconds_per_megapixel)
    # the ideal observer at fixed false-alarm rates (analytic and Monte Carlo, with CI bounds)
    for r in result.recall_bound.to_dict(orient="records"):
        for col, v in r.items():
            if str(col).startswith(("ideal_recall_at_fa_", "mc_recall_at_fa_")) and np.isfinite(v):
                out[metric_key(f"bound_{col}", r["condition"], r["level"], "ideal_observer")] = float(v)
    return out


def log_evaluation(
    cfg: EvaluateConfig, result: EvaluationResult, before_artifacts: Callable[[], None] | None = None
) -> str:
    """Create the run, log params/metrics/tags, call ``before_artifacts`` (which writes the report, now
    that the run id is known and stored in ``result.meta["mlflow"]``), then upload the output folder.

    Returns:
        The MLflow run id.
    """
    import mlflow

    from semray.tracking import get_or_create_experiment, log_params, tracking_uri

    exp_id = get_or_create_experiment(cfg.mlflow.experiment)
    name = cfg.mlflow.run_name or "evaluate-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with mlflow.start_run(experiment_id=exp_id, run_name=name) as run:
        result.meta["mlflow"] = {
            "run_id": run.info.run_id,
            "experiment": cfg.mlflow.experiment,
            "experiment_id": exp_id,
            "tracking_uri": tracking_uri(),
        }
        log_params(flatten(cfg), run.info.run_id)
        tags = {
            "semray.kind": "evaluation",
            "semray.methods": ",".join(m["label"] for m in result.meta["methods"]),
            "semray.n_images": str(result.meta["test_set"]["n_images"]),
            "semray.oracle_sigma": str(cfg.methods.oracle_sigma).lower(),
        }
        for m in result.meta["methods"]:
            if m["kind"] == "model":
                tags[f"semray.model.{_KEY_BAD.sub('_', m['label'])}"] = (
                    f"{m['spec']} (version {m['version']})"
                )
        mlflow.set_tags(tags)
        mlflow.log_metrics(summary_metrics(result))
        if before_artifacts is not None:
            before_artifacts()
        mlflow.log_artifacts(str(result.out_dir))
    return run.info.run_id
