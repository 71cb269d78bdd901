"""MLflow side of a training run: the run itself, params, per-epoch metrics, figures, the final model.

The driver creates (or, on resume, reopens) the run and passes its id and the tracking URI to the
workers, which log through an explicit :class:`~mlflow.MlflowClient` (a worker's environment is fixed
when Ray starts it, so MLflow's global state there cannot be trusted to point at the right store).
The final model is logged with ``mlflow.pytorch.log_model`` (signature with free spatial sizes, an
input example) and registered; semray's own model folder (``model.safetensors`` + ``card.json``) travels
inside it as extra files, which is what :func:`semray.models.resolve.resolve_model` loads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semray.config.base import dump_yaml, flatten
from semray.config.train import TrainConfig
from semray.tracking import log_params


@dataclass
class RegisteredModel:
    """Where the final model went: MLflow model URI, registry name/version/alias (None when not registered)."""

    model_uri: str
    name: str | None
    version: str | None
    alias: str | None

    @property
    def registry_uri(self) -> str | None:
        """``models:/NAME/VERSION`` of the registered version, if any."""
        return f"models:/{self.name}/{self.version}" if self.name and self.version else None


def _client(tracking_uri: str | None = None) -> Any:
    from mlflow import MlflowClient

    from semray.tracking import configure

    uri = tracking_uri or configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(cfg: TrainConfig, run_name: str, tags: dict[str, str]) -> str:
    """Create the MLflow run of a new training run, log the full config as params and YAML; returns its id."""
    from semray.tracking import configure, get_or_create_experiment

    configure()
    exp_id = get_or_create_experiment(cfg.mlflow.experiment)
    client = _client()
    run = client.create_run(exp_id, run_name=run_name, tags={"semray.kind": "train", **tags})
    run_id = run.info.run_id
    log_params(flatten(cfg), run_id, client)
    client.log_text(run_id, dump_yaml(cfg), "config/train.yaml")
    return run_id


def reopen_run(cfg: TrainConfig, run_id: str) -> None:
    """Mark a stopped run as running again and record the (possibly changed) config of the resumption."""
    client = _client()
    client.update_run(run_id, status="RUNNING")
    log_params(flatten(cfg), run_id, client, resumed=True)  # changed values become resumed.* tags
    client.log_text(run_id, dump_yaml(cfg), f"config/train-resumed-{int(time.time())}.yaml")


def finish_run(
    run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None, tracking_uri: str | None = None
) -> None:
    """Set final tags and the run status (``FINISHED``, ``FAILED`` or ``KILLED``) in the store at
    ``tracking_uri`` (None: semray's configured store)."""
    client = _client(tracking_uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status=status)


class EpochLogger:
    """Rank 0's per-epoch logging into an existing run (used inside Ray Train workers)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.run_id = run_id
        self.client = _client(tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step`` (non-finite values, e.g. NaN defect metrics, are skipped)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), ts, int(step))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def log_final_model(
    cfg: TrainConfig, run_id: str, model_dir: str | Path, example: np.ndarray
) -> RegisteredModel:
    """Log the model in ``model_dir`` (semray store format) to the run, register it, set the alias.

    Args:
        cfg: the run config (registry name, alias, whether to register).
        run_id: the training run.
        model_dir: folder with ``model.safetensors`` + ``card.json``.
        example: input example, float32 (N, 1, H, W) in [0, 1].
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from semray import __version__
    from semray.models.store import CARD_FILE, WEIGHTS_FILE, load_model
    from semray.tracking import configure

    configure()
    model_dir = Path(model_dir)
    model, _card = load_model(model_dir)
    # The network is fully convolutional: batch, height and width are all free.
    spec = TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))
    signature = ModelSignature(inputs=Schema([spec]), outputs=Schema([spec]))
    name = cfg.mlflow.registered_model if cfg.mlflow.register_model else None
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        "kornia",
        "pytorch-msssim",
        f"semray=={__version__}",
    ]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(model_dir), artifact_path="semray_model")
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=np.ascontiguousarray(example, dtype=np.float32),
            extra_files=[str(model_dir / WEIGHTS_FILE), str(model_dir / CARD_FILE)],
            registered_model_name=name,
            pip_requirements=requirements,
            # MLflow 3 defaults to torch.export ("pt2"), which fixes the input size to the example's
            # and gives a module without train()/eval(); the network is fully convolutional, so keep
            # the plain pickled nn.Module (semray itself only ever loads the safetensors copy).
            serialization_format="pickle",
        )
    version = None if info.registered_model_version is None else str(info.registered_model_version)
    alias = cfg.mlflow.alias if (name and version) else None
    if alias:
        _client().set_registered_model_alias(name, alias, version)
    return RegisteredModel(model_uri=info.model_uri, name=name, version=version, alias=alias)
