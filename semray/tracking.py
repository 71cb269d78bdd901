"""Where MLflow runs and registered models live, pinned once for the CLI, jobs, notebooks and tests.

Resolution order (first that is set wins):

1. ``MLFLOW_TRACKING_URI``: any MLflow URI; on a multi-node Ray cluster this must be a tracking server
   (``http://host:5000``) that every node can reach, since workers on other nodes cannot see a local file.
2. ``SEMRAY_HOME``: a folder; the store is ``sqlite:///$SEMRAY_HOME/mlflow.db`` with artifacts in
   ``$SEMRAY_HOME/mlartifacts``.
3. ``~/.semray``, used the same way.

MLflow's own default (``mlflow.db`` in whatever folder a process starts in) is never used, because a
job submitted with ``ray job submit --working-dir .`` starts in a temporary copy of the project and its
runs would vanish with it.
"""

from __future__ import annotations

import os
from pathlib import Path


def semray_home() -> Path:
    """The local folder for semray's MLflow store and artifacts (created on first use)."""
    home = Path(os.environ.get("SEMRAY_HOME") or Path.home() / ".semray").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tracking_uri() -> str:
    """The MLflow tracking URI semray uses (see module docstring for the order)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{semray_home() / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Artifact location for new experiments; ``None`` when a tracking server decides.

    For a SQLite store (ours or one named by ``MLFLOW_TRACKING_URI``) artifacts go into
    ``mlartifacts/`` beside the database file, never into ``./mlruns`` of whatever folder the process
    happens to start in (a submitted job starts in a temporary copy of the project).
    """
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent / "mlartifacts").as_uri()
    return None


def configure() -> str:
    """Point MLflow at semray's store (also for child processes and Ray workers); returns the URI."""
    import mlflow

    uri = tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def get_or_create_experiment(name: str) -> str:
    """Experiment id for ``name``, created with semray's artifact root when it does not exist yet."""
    import mlflow

    configure()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=_experiment_artifacts(name))


def _experiment_artifacts(name: str) -> str | None:
    root = artifact_root()
    if root is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{root}/{safe}"


def ui_command() -> str:
    """The command a user runs to browse the runs of this store."""
    return f"mlflow ui --backend-store-uri {tracking_uri()}"
