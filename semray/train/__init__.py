"""Distributed training on Ray Train: the Ray Data noise pipeline, the DDP loop, checkpoints, MLflow.

Public entry points::

    from semray.train import train
    result = train(load_config(TrainConfig, "configs/stage3_full.yaml"))   # -> TrainResult
    print(result.summary())

Ray Tune builds one trainer per trial from the same pieces: :func:`prepare_data`,
:func:`~semray.train.pipeline.start_epoch_clock`, :func:`loop_config`, :func:`build_trainer`, and the
per-worker function :func:`train_loop_per_worker`.

Modules: ``pipeline`` (Ray Data: epoch-aware noise, crops), ``loop`` (per-worker loop), ``validate``
(per-epoch metrics and figures), ``checkpoint`` (what a checkpoint holds), ``schedule`` (lr curves),
``mlflow_log`` (run, metrics, registry), ``runner`` (driver).
"""

from semray.train.loop import train_loop_per_worker
from semray.train.pipeline import start_epoch_clock
from semray.train.runner import DataPlan, TrainResult, build_trainer, loop_config, prepare_data, train

__all__ = [
    "DataPlan",
    "TrainResult",
    "build_trainer",
    "loop_config",
    "prepare_data",
    "start_epoch_clock",
    "train",
    "train_loop_per_worker",
]
