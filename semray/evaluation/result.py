"""An evaluation's tables and output folder: :class:`EvaluationResult`, its file names, and
:func:`load_evaluation`, which reads a folder back.

Its own module so that the runner (which writes a result), the report content and MLflow logging (which
read one) all depend on it and not on each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.csv"
RUNTIME_FILE = "runtime.csv"
DELTAS_FILE = "deltas.csv"
BOUND_FILE = "recall_bound.csv"
SITES_FILE = "detection_sites.parquet"
META_FILE = "evaluation.json"
CONFIG_FILE = "config.yaml"


@dataclass
class EvaluationResult:
    """An evaluation's tables and where its files are.

    Attributes:
        out_dir: the output folder.
        results: one row per image x noise draw x method x condition x level (metrics as columns;
            ``noise_seed`` names the draw, absent from folders written before draws existed).
        summary: mean/std/CI per condition x level x method x metric (long format), over image x draw.
        deltas: paired differences of each method against the reference method, paired on (image, draw).
        runtime: seconds per megapixel per method (empty when runtime measurement was off).
        meta: setup facts (images, methods with versions, machine, MLflow run id, ...).
        recall_bound: per condition x level, the ideal observer's defect recall
            (:func:`semray.evaluation.detectability.summarise`) and, when detection was scored, its
            recall at each false-alarm rate, analytic and Monte Carlo
            (:func:`semray.evaluation.detectability.bound_at_false_alarms`); empty without defects.
        sites: one row per defect site x image x draw x method x condition x level: the method's
            matched-filter score with and without the defect (:mod:`semray.evaluation.detection`),
            plus the Monte Carlo ideal observer's rows (``mc_draw`` >= 0; -1 for methods); empty when
            detection was not scored.
    """

    out_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    deltas: pd.DataFrame
    runtime: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    recall_bound: pd.DataFrame = field(default_factory=pd.DataFrame)
    sites: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, when the evaluation was logged."""
        return (self.meta.get("mlflow") or {}).get("run_id")


def load_evaluation(path: str | Path) -> EvaluationResult:
    """Read an evaluation output folder back (for notebooks, the benchmark and comparisons)."""
    root = Path(path)
    if not (root / RESULTS_FILE).is_file():
        raise FileNotFoundError(f"{root}: not an evaluation folder (no {RESULTS_FILE})")

    def _csv(name: str) -> pd.DataFrame:
        p = root / name
        try:
            return pd.read_csv(p) if p.is_file() else pd.DataFrame()
        except pd.errors.EmptyDataError:
            return pd.DataFrame()

    meta = json.loads((root / META_FILE).read_text()) if (root / META_FILE).is_file() else {}
    return EvaluationResult(
        root,
        pd.read_parquet(root / RESULTS_FILE),
        _csv(SUMMARY_FILE),
        _csv(DELTAS_FILE),
        _csv(RUNTIME_FILE),
        meta,
        _csv(BOUND_FILE),  # absent from evaluations written before the bound existed
        pd.read_parquet(root / SITES_FILE) if (root / SITES_FILE).is_file() else pd.DataFrame(),
    )


__all__ = [
    "BOUND_FILE",
    "CONFIG_FILE",
    "DELTAS_FILE",
    "META_FILE",
    "RESULTS_FILE",
    "RUNTIME_FILE",
    "SITES_FILE",
    "SUMMARY_FILE",
    "EvaluationResult",
    "load_evaluation",
]
