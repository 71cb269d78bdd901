"""Shared fixtures: one local Ray per test session, an isolated MLflow store per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep numerical libraries from oversubscribing the two cores the CI machine has.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with more logical CPUs than cores, so Train workers and Data tasks don't deadlock."""
    import ray

    # Ray Data's Parquet reader would start 32 footer-reader processes per dataset execution
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    for attempt in range(3):  # a heavily loaded machine can miss Ray's fixed 30 s node start-up deadline
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as e:  # Ray raises a bare Exception for its start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for one test; returns its tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session", autouse=True)
def _isolated_semray_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never touch the user's ~/.semray store: the default store points into a temp folder."""
    home = tmp_path_factory.mktemp("semray_home")
    old = os.environ.get("SEMRAY_HOME")
    os.environ["SEMRAY_HOME"] = str(home)
    yield
    if old is None:
        os.environ.pop("SEMRAY_HOME", None)
    else:
        os.environ["SEMRAY_HOME"] = old
