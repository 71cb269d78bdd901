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
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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


#: MLflow refuses a param value longer than this (``MAX_PARAM_VAL_LENGTH`` in MLflow 2.x and 3.x).
MAX_PARAM_CHARS = 6000
#: MLflow accepts at most this many params per ``log_batch`` request.
_PARAMS_PER_REQUEST = 100
_CUT_MARK = "..."


def param_value(value: Any) -> str:
    """The one way semray turns a value into an MLflow param: ``str(value)`` (so ``None`` is ``"None"``,
    as ``mlflow.log_params`` writes it), and a value longer than :data:`MAX_PARAM_CHARS` (a long YAML list)
    is cut to that length ending in ``"..."``, so a cut value is visibly cut, never silently shortened."""
    text = str(value)
    if len(text) <= MAX_PARAM_CHARS:
        return text
    return text[: MAX_PARAM_CHARS - len(_CUT_MARK)] + _CUT_MARK


def log_params(
    params: Mapping[str, Any], run_id: str | None = None, client: Any = None, *, resumed: bool = False
) -> None:
    """Log ``params`` to a run: every params write in semray goes through here (see :func:`param_value`).

    Args:
        params: flat ``{key: value}`` (e.g. :func:`semray.config.base.flatten` of a config).
        run_id: the run; default the active run of ``mlflow.start_run``.
        client: an ``MlflowClient`` (Ray workers pass their own); default one on the configured store.
        resumed: the run already has params (a resumed run). MLflow forbids changing a param, so keys
            it has are not logged again, and values that changed are recorded as ``resumed.<key>`` tags.
    """
    import mlflow
    from mlflow.entities import Param, RunTag

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_params: no run_id given and no active MLflow run")
        run_id = active.info.run_id
    client = client if client is not None else mlflow.MlflowClient()
    flat = {k: param_value(v) for k, v in params.items()}
    existing = client.get_run(run_id).data.params if resumed else {}
    new = [Param(k, v) for k, v in flat.items() if k not in existing]
    changed = [RunTag(f"resumed.{k}", v) for k, v in flat.items() if k in existing and existing[k] != v]
    for i in range(0, len(new), _PARAMS_PER_REQUEST):
        client.log_batch(run_id, params=new[i : i + _PARAMS_PER_REQUEST])
    if changed:
        client.log_batch(run_id, tags=changed)
