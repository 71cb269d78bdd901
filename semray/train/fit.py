"""One fit of a Ray Train run, shared by ``semray train`` (:func:`semray.train.runner.train`) and every
Ray Tune trial (:func:`semray.tune.trial_fn`): the epoch clock, the loop config, the ``TorchTrainer``,
``fit()`` and, when it fails, the MLflow run marked ``FAILED``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semray.config.train import TrainConfig
from semray.train.crops import CropSpec
from semray.train.plan import DataPlan


def storage_root(storage_path: str | None, kind: str = "train") -> str:
    """Where runs live: ``storage_path`` (absolute for a local folder; a URI as is) or
    ``$SEMRAY_HOME/<kind>`` (``train`` for training runs, ``tune`` for searches)."""
    from semray.tracking import semray_home

    if storage_path:
        return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())
    return str(semray_home() / kind)


def loop_config(
    cfg: TrainConfig,
    plan: DataPlan,
    clock: Any,
    run_name: str,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    init_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``train_loop_config`` dict :func:`semray.train.loop.train_loop_per_worker` expects.

    Needs a running Ray: the validation set goes into the object store once, not into every copy of
    the config."""
    import ray

    return {
        "cfg": cfg.model_dump(mode="json"),
        "clock": clock,
        "steps_per_epoch": plan.steps_per_epoch,
        "run_name": run_name,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": mlflow_run_id,
        "init_state": init_state,
        "val_batch": ray.put(plan.val_batch),
    }


def build_trainer(
    cfg: TrainConfig,
    plan: DataPlan,
    clock: Any,
    train_loop_config: dict[str, Any],
    run_name: str,
    storage_path: str,
) -> Any:
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` over the pipeline's datasets."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from semray.train.loop import train_loop_per_worker
    from semray.train.pipeline import build_train_dataset

    d = cfg.data
    crop = CropSpec(d.crop_px, d.defect_crop_prob, d.flips, d.rot90)
    train_ds = build_train_dataset(
        plan.streams(d.crops_per_image), cfg.noise, cfg.seed, clock, crop,
        noise_batch_images=d.noise_batch_images, data_cpus=cfg.scaling.data_cpus,
        block_bytes=plan.block_bytes(), objective=cfg.loss.objective,
    )  # fmt: skip
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep_best,
                checkpoint_score_attribute="checkpoint_score",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
        ),
        datasets={"train": train_ds},
    )


def fit_run(
    cfg: TrainConfig,
    plan: DataPlan,
    run_name: str,
    storage_path: str,
    *,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    init_state: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Run one training fit: start the epoch clock, build the trainer (plus Ray Train ``callbacks``),
    ``fit()`` it and stop the clock. Needs a running Ray.

    Returns:
        Ray Train's ``Result``.

    Raises:
        Whatever ``fit()`` raises, after marking the MLflow run ``mlflow_run_id`` (if any) ``FAILED``.
    """
    import ray

    from semray.train.pipeline import start_epoch_clock

    clock = start_epoch_clock()
    try:
        config = loop_config(cfg, plan, clock, run_name, tracking_uri, mlflow_run_id, init_state)
        trainer = build_trainer(cfg, plan, clock, config, run_name, storage_path)
        if callbacks:
            # build_trainer has no callbacks argument; Train V2 reads run_config.callbacks at fit() time
            trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), *callbacks]
        return trainer.fit()
    except Exception:
        if mlflow_run_id:
            from semray.train.mlflow_log import finish_run

            finish_run(mlflow_run_id, "FAILED", tracking_uri=tracking_uri)
        raise
    finally:
        ray.kill(clock)
