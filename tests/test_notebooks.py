"""The notebooks run top to bottom (nbclient, the venv's python3 kernel) on tiny inputs, so they never rot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from semray.config.base import load_config
from semray.config.evaluate import EvaluateConfig
from semray.evaluation import run_evaluation

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def tiny_evaluation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classical-only evaluation of two 40 x 40 images at two doses (a few seconds, no MLflow)."""
    out = tmp_path_factory.mktemp("nb_eval")
    cfg = load_config(
        EvaluateConfig,
        {
            "test_set": {"dataset": {"seed": 2, "height": 40, "width": 40, "n_test": 2}},
            "doses_e_per_px": [4, 32],
            "methods": {"classical": ["gaussian", "tv"], "models": []},
            "runtime": {"size_px": 32, "repeats": 1},
            "report": {"reference_method": "gaussian", "n_examples": 1},
            "parallel": False,
        },
    )
    run_evaluation(cfg, out, progress=False, log_mlflow=False)
    return out


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", ""))
            parts.append(str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def tiny_tune_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow store holding a two-trial search in experiment 'tiny-tune' (one store for the module:
    creating a SQLite store runs MLflow's schema migrations, which take seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('nb_mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        _add_tune_runs("tiny-tune")
    yield uri


def _add_tune_runs(experiment: str) -> None:
    import mlflow

    from semray.tracking import get_or_create_experiment

    exp = get_or_create_experiment(experiment)
    with mlflow.start_run(experiment_id=exp, run_name="search") as parent:
        for alpha, psnr in ((0.2, 24.0), (0.8, 25.5)):
            with mlflow.start_run(experiment_id=exp, run_name=f"trial-{alpha}", nested=True):
                mlflow.log_params({"loss.alpha": alpha, "loss.beta": 0.5})
                mlflow.log_metric("val_psnr", psnr)
    assert parent.info.run_id


def test_compare_notebook_without_tune_runs(
    tiny_evaluation: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEMRAY_EVAL_DIR", str(tiny_evaluation))
    monkeypatch.setenv("SEMRAY_TUNE_EXPERIMENT", "no-such-tune")
    text = _text(_execute("compare.ipynb", NOTEBOOKS))
    assert "2 test images" in text
    assert f"no MLflow store at {mlflow_store} yet: no tune runs to compare" in text
    assert "nothing to compare yet" in text
    assert "gaussian" in text and "tv" in text  # the comparison tables were displayed
    assert not Path(mlflow_store.removeprefix("sqlite:///")).exists()  # reading created no store


def test_compare_notebook_with_tune_runs(
    tiny_evaluation: Path, tiny_tune_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEMRAY_EVAL_DIR", str(tiny_evaluation))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_tune_store)
    monkeypatch.setenv("SEMRAY_TUNE_EXPERIMENT", "tiny-tune")
    text = _text(_execute("compare.ipynb", NOTEBOOKS))
    assert "3 runs in 'tiny-tune'" in text
    assert "25.5" in text  # the best trial's metric is in the displayed table
