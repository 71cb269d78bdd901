"""Distributed training on Ray Train: the Ray Data noise pipeline, the DDP loop, checkpoints, MLflow.

Public entry points::

    from semray.train import train
    result = train(load_config(TrainConfig, "configs/stage3_full.yaml"))   # -> TrainResult
    print(result.summary())

Ray Tune runs one fit per trial through the same helper as ``semray train``:
:func:`~semray.train.fit.fit_run` (epoch clock, :func:`loop_config`, :func:`build_trainer`, ``fit()``,
failed-run marking) over a :func:`prepare_data` plan and the per-worker :func:`train_loop_per_worker`.

Modules: ``crops`` (pure crop/augmentation maths, :class:`~semray.train.crops.CropSpec`), ``mix`` (pure
mix allocation), ``shards`` (shard queries, the validation set), ``pipeline`` (Ray Data: epoch clock,
one branch per source), ``plan`` (the driver's data plan), ``fit`` (one Ray Train fit), ``loop``
(per-worker loop), ``validate`` (per-epoch metrics and figures), ``checkpoint`` (what a checkpoint
holds), ``schedule`` (lr curves), ``mlflow_log`` (run, metrics, registry), ``runner`` (driver).
"""

from semray.train.fit import build_trainer, fit_run, loop_config, storage_root
from semray.train.loop import train_loop_per_worker
from semray.train.pipeline import start_epoch_clock
from semray.train.plan import DataPlan, prepare_data
from semray.train.runner import TrainResult, train

__all__ = [
    "DataPlan",
    "TrainResult",
    "build_trainer",
    "fit_run",
    "loop_config",
    "prepare_data",
    "start_epoch_clock",
    "storage_root",
    "train",
    "train_loop_per_worker",
]
