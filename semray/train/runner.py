"""The driver side of a training run: data check, Ray Train trainer, MLflow run, final model.

:func:`train` is the library entry point (``semray train`` and ``jobs/train.py`` call it); Ray Tune
trials reuse :func:`prepare_data`, :func:`loop_config` and :func:`build_trainer` to build one
``TorchTrainer`` per trial.

Run folders. A run lives in ``<storage_path>/<run name>`` (Ray Train's checkpoints and its snapshot,
plus ``semray_run.json`` naming the MLflow run). Starting a run whose folder already holds a snapshot
is refused unless ``resume=True``: then Ray Train V2 restores the latest checkpoint, the loop continues
from the next epoch, and the metrics go on into the same MLflow run.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semray.config.base import ConfigError, dump_yaml
from semray.config.train import TrainConfig
from semray.train.checkpoint import MODEL_SUBDIR

RUN_INFO_FILE = "semray_run.json"
#: Training images per Ray Data block (see semray.train.pipeline.build_train_dataset).
IMAGES_PER_BLOCK = 16
RUN_CONFIG_FILE = "train.yaml"
BEST_MODEL_DIR = "best_model"
#: Ray Train V2's snapshot file; its presence means a run folder can be resumed.
_SNAPSHOT_GLOB = "checkpoint_manager_snapshot*.json"


@dataclass
class DataPlan:
    """What the driver found in the shards before starting workers."""

    files: list[str]
    n_train: int
    val_ids: list[str]
    image_shape: tuple[int, int]
    steps_per_epoch: int
    val_batch: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        run_name, run_dir: the Ray Train run and its folder (checkpoints, ``semray_run.json``).
        metric: the validation metric that scored checkpoints; best_metrics: the best epoch's metrics.
        last_metrics: the metrics of the last reported epoch.
        best_checkpoint: path of the best checkpoint; model_dir: local folder of its model
            (``model.safetensors`` + ``card.json``); export_dir: where it was also copied, if asked.
        mlflow_run_id, model_uri, registered_model, model_version, model_alias: MLflow, if enabled.
        history: the metrics of every epoch whose checkpoint is still kept (``checkpoint.keep_best``),
            by epoch; MLflow has all epochs.
    """

    run_name: str
    run_dir: str
    metric: str
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    best_checkpoint: str | None
    model_dir: str | None
    export_dir: str | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    registered_model: str | None = None
    model_version: str | None = None
    model_alias: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def best_epoch(self) -> int | None:
        e = self.best_metrics.get("epoch")
        return None if e is None else int(e)

    def summary(self) -> str:
        """Human-readable lines saying where everything is."""
        m = self.best_metrics
        lines = [
            f"run {self.run_name}: best epoch {self.best_epoch} with {self.metric} = {m.get(self.metric, float('nan')):.4f}"
            f" (val_psnr {m.get('val_psnr', float('nan')):.2f} dB, val_ssim {m.get('val_ssim', float('nan')):.4f})",
            f"  checkpoints:     {self.run_dir}",
            f"  best checkpoint: {self.best_checkpoint}",
            f"  best model dir:  {self.model_dir}",
        ]
        if self.export_dir:
            lines.append(f"  exported to:     {self.export_dir}")
        if self.mlflow_run_id:
            lines.append(f"  MLflow run id:   {self.mlflow_run_id}")
        if self.registered_model and self.model_version:
            alias = f" (alias @{self.model_alias})" if self.model_alias else ""
            lines.append(f"  registered:      models:/{self.registered_model}/{self.model_version}{alias}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _ensure_shards(cfg: TrainConfig) -> None:
    gen = cfg.data.generate
    if gen is None:
        return
    if len(cfg.data.shards) != 1:
        raise ConfigError("data.generate needs exactly one folder in data.shards to render into")
    folder = Path(cfg.data.shards[0])
    if folder.is_dir() and any(folder.rglob("*.parquet")):
        return
    from semray.data import synthesize_shards

    print(f"semray train: rendering the synthetic shard set into {folder} (data.generate)", flush=True)
    synthesize_shards(gen, folder, progress=False)


def prepare_data(cfg: TrainConfig, num_workers: int | None = None) -> DataPlan:
    """Render shards if configured, list them, count the splits and check the crop sizes.

    Raises:
        ConfigError: no shards, no train/val rows, images smaller than the crops, or fewer crops than
            one batch per worker.
    """
    from semray.io import ShardError
    from semray.train.pipeline import image_shape, load_val_batch, shard_files, split_ids

    _ensure_shards(cfg)
    try:
        files = shard_files([str(Path(s).expanduser().resolve()) for s in cfg.data.shards])
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    train_ids = split_ids(files, "train")
    val_ids = split_ids(files, "val")
    if not train_ids:
        raise ConfigError(f"data.shards: no rows with split 'train' in {cfg.data.shards}")
    if not val_ids:
        raise ConfigError(f"data.shards: no rows with split 'val' in {cfg.data.shards}")
    if cfg.data.val_max_images is not None:
        val_ids = val_ids[: cfg.data.val_max_images]
    shape = image_shape(files, "train")
    assert shape is not None
    if min(shape) < cfg.data.crop_px:
        raise ConfigError(
            f"data.crop_px={cfg.data.crop_px} is larger than the training images ({shape[0]}x{shape[1]})"
        )
    workers = num_workers or cfg.scaling.num_workers
    per_worker = len(train_ids) * cfg.data.crops_per_image // workers
    full = per_worker // cfg.data.batch_size
    if full < 1:
        raise ConfigError(
            f"{len(train_ids)} training images x {cfg.data.crops_per_image} crops over {workers} workers give "
            f"{per_worker} crops per worker, less than one batch of data.batch_size={cfg.data.batch_size}"
        )
    steps = min(full, cfg.optim.steps_per_epoch or full)
    val_batch = load_val_batch(files, val_ids, cfg.noise, cfg.data.val_noise_seed, cfg.data.val_crop_px)
    return DataPlan(files, len(train_ids), val_ids, (int(shape[0]), int(shape[1])), steps, val_batch)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


def storage_root(cfg: TrainConfig) -> str:
    """Where runs live: ``run.storage_path`` or ``$SEMRAY_HOME/train`` (absolute)."""
    from semray.tracking import semray_home

    if cfg.run.storage_path:
        sp = cfg.run.storage_path
        return sp if "://" in sp else str(Path(sp).expanduser().resolve())
    return str(semray_home() / "train")


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _has_snapshot(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.glob(_SNAPSHOT_GLOB))


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
    train_ds = build_train_dataset(
        plan.files, cfg.noise, cfg.seed, clock,
        crop_px=d.crop_px, crops_per_image=d.crops_per_image, defect_prob=d.defect_crop_prob,
        flips=d.flips, rot90=d.rot90, noise_batch_images=d.noise_batch_images, data_cpus=cfg.scaling.data_cpus,
        block_bytes=IMAGES_PER_BLOCK * plan.image_shape[0] * plan.image_shape[1] * 5,  # float32 clean + bool mask
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


def _init_state(cfg: TrainConfig) -> dict[str, Any] | None:
    if cfg.init is None:
        return None
    from semray.models.resolve import ModelNotFoundError, resolve_model

    try:
        resolved = resolve_model(cfg.init)
    except (ModelNotFoundError, ValueError) as e:
        raise ConfigError(f"init: {e}") from None
    theirs = resolved.card.get("model_config", {})
    ours = cfg.model.model_dump(mode="json")
    if theirs != ours:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ConfigError(
            f"init: model {cfg.init!r} has a different model config (fields {diff}); set model to match"
        )
    return {k: v.detach().cpu() for k, v in resolved.model.state_dict().items()}


def local_ray_cpus(cfg: TrainConfig) -> int | None:
    """Logical CPUs for a local Ray started by :func:`train`: the machine's cores, but at least the
    workers' reservation plus 2, so the Ray Data noise tasks always have CPUs to be scheduled on.

    Ray Train reserves the workers' CPUs and Ray Data only schedules into what is left; on a 2-core
    laptop two 1-CPU workers would leave nothing and the first epoch would wait forever. Logical CPUs
    are scheduling tokens, so oversubscribing them lets the OS interleave noise synthesis with training.
    Returns None (Ray's own default) when joining an existing cluster via ``RAY_ADDRESS``.
    """
    import math
    import os

    if os.environ.get("RAY_ADDRESS"):
        return None
    need = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2)
    return max(os.cpu_count() or 1, need)


def latest_run(storage_path: str) -> str | None:
    """Name of the most recently modified resumable run under a local ``storage_path``."""
    root = Path(storage_path)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if (p / RUN_INFO_FILE).is_file()]
    return max(runs, key=lambda p: (p / RUN_INFO_FILE).stat().st_mtime).name if runs else None


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run was started (or last resumed) with, from its folder."""
    from semray.config.base import load_config

    return load_config(TrainConfig, Path(run_dir) / RUN_CONFIG_FILE)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train a denoiser as configured; returns where the results are (see :class:`TrainResult`).

    Starts a local Ray if none is running (or joins ``RAY_ADDRESS``). With ``resume``, continues the
    run named ``cfg.run.name`` (or the latest run in the storage path) from its last checkpoint.

    Raises:
        ConfigError: bad data, a run name that exists without ``resume``, or nothing to resume.
        RuntimeError: training failed more often than ``checkpoint.max_failures`` allows.
    """
    import ray

    from semray.train.pipeline import start_epoch_clock

    storage = storage_root(cfg)
    run_name = cfg.run.name
    if resume and run_name is None:
        run_name = latest_run(storage) if _is_local(storage) else None
        if run_name is None:
            raise ConfigError(f"--resume: no run to resume under {storage}; give run.name")
    if run_name is None:
        run_name = "train-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(storage) / run_name if _is_local(storage) else None
    info: dict[str, Any] = {}
    if run_dir is not None:
        exists = _has_snapshot(run_dir)
        if exists and not resume:
            raise ConfigError(
                f"run {run_name!r} already exists in {storage}; pass --resume to continue it or set another run.name"
            )
        if resume and not exists:
            raise ConfigError(f"--resume: run {run_name!r} has no checkpoint snapshot in {storage}")
        if (run_dir / RUN_INFO_FILE).is_file():
            info = json.loads((run_dir / RUN_INFO_FILE).read_text())

    plan = prepare_data(cfg)
    init_state = None if resume else _init_state(cfg)
    if not ray.is_initialized():
        ray.init(num_cpus=local_ray_cpus(cfg), include_dashboard=False, log_to_driver=True)

    run_id: str | None = info.get("mlflow_run_id")
    tracking: str | None = None
    if cfg.mlflow.enabled:
        from semray.tracking import configure

        from .mlflow_log import reopen_run, start_run

        tracking = configure()
        if run_id:
            reopen_run(cfg, run_id)
        else:
            run_id = start_run(cfg, run_name, {"semray.run_dir": str(run_dir or f"{storage}/{run_name}")})
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_INFO_FILE).write_text(
            json.dumps({"run_name": run_name, "mlflow_run_id": run_id}, indent=2)
        )
        (run_dir / RUN_CONFIG_FILE).write_text(dump_yaml(cfg))

    clock = start_epoch_clock()
    config = loop_config(cfg, plan, clock, run_name, tracking, run_id, init_state)
    trainer = build_trainer(cfg, plan, clock, config, run_name, storage)
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            from .mlflow_log import finish_run

            finish_run(run_id, "FAILED")
        raise
    finally:
        ray.kill(clock)
    return _finish(cfg, result, run_name, storage, run_dir, run_id)


def _finish(
    cfg: TrainConfig, result: Any, run_name: str, storage: str, run_dir: Path | None, run_id: str | None
) -> TrainResult:
    """Pick the best checkpoint, copy its model out, log + register it, close the MLflow run."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if "checkpoint_score" in m]
    if not scored:
        raise RuntimeError(f"run {run_name} finished without a single checkpoint")
    best_ckpt, best = max(scored, key=lambda cm: cm[1]["checkpoint_score"])
    last = dict(result.metrics or {})
    local_root = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix=f"semray-{run_name}-"))
    model_dir = local_root / BEST_MODEL_DIR
    with tempfile.TemporaryDirectory(prefix="semray-best-") as tmp:
        best_ckpt.to_directory(tmp)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(Path(tmp) / MODEL_SUBDIR, model_dir)
    export_dir = None
    if cfg.run.export_dir:
        export_dir = Path(cfg.run.export_dir).expanduser().resolve()
        export_dir.mkdir(parents=True, exist_ok=True)
        for f in model_dir.iterdir():
            shutil.copy2(f, export_dir / f.name)
    out = TrainResult(
        run_name=run_name,
        run_dir=str(run_dir or f"{storage}/{run_name}"),
        metric=cfg.validation.metric,
        best_metrics=_numeric(best),
        last_metrics=_numeric(last),
        best_checkpoint=str(best_ckpt.path),
        model_dir=str(model_dir),
        export_dir=None if export_dir is None else str(export_dir),
        mlflow_run_id=run_id,
        history=sorted((_numeric(m) for _, m in scored), key=lambda m: m.get("epoch", -1)),
    )
    if run_id:
        from .mlflow_log import finish_run, log_final_model

        if cfg.mlflow.register_model:
            example = _input_example(model_dir)
            reg = log_final_model(cfg, run_id, model_dir, example)
            out.model_uri, out.registered_model = reg.model_uri, reg.name
            out.model_version, out.model_alias = reg.version, reg.alias
        finish_run(
            run_id,
            "FINISHED",
            tags={
                "semray.best_checkpoint": out.best_checkpoint or "",
                "semray.best_epoch": str(out.best_epoch),
            },
        )
    return out


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _input_example(model_dir: Path) -> np.ndarray:
    """A small deterministic input example (1, 1, 32, 32) float32 in [0, 1] for the MLflow model."""
    rng = np.random.default_rng(0)
    _yy, xx = np.mgrid[0:32, 0:32]
    stripes = 0.2 + 0.6 * ((xx // 4) % 2)
    return np.clip(stripes + 0.05 * rng.standard_normal((32, 32)), 0, 1).astype(np.float32)[None, None]
