"""The driver side of a training run: data check, Ray Train trainer, MLflow run, final model.

:func:`train` is the library entry point (``semray train`` and ``jobs/train.py`` call it); Ray Tune
trials reuse :func:`prepare_data`, :func:`loop_config` and :func:`build_trainer` to build one
``TorchTrainer`` per trial.

Run folders. A run lives in ``<storage_path>/<run name>`` (Ray Train's checkpoints and its snapshot,
plus ``semray_run.json`` naming the MLflow run). Starting a run whose folder already holds a snapshot
is refused unless ``resume=True``: then Ray Train V2 restores the latest checkpoint, the loop continues
from the next epoch, and the metrics go on into the same MLflow run.

Mixes. With ``data.sources`` the driver plans every source (files, train/val ids, crops per epoch;
:func:`prepare_data`) and the train dataset interleaves them in the configured proportions
(:func:`semray.train.pipeline.build_mix_dataset`); validation is reported overall and per source.

Fine-tuning. With ``init`` (``semray train --init SPEC``) the run starts from existing weights
(:func:`resolve_init`): the architecture comes from the init model's card, a short schedule replaces
the optimiser defaults the config leaves unset, the init model's own validation metrics are measured
before training (``init_val_*``) and the MLflow run and the final model card name the parent model.
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


#: Optimiser settings of a fine-tune (``init``) where the config leaves them unset: a short, gentle
#: schedule that continues from the init weights rather than re-learning them.
FINETUNE_OPTIM: dict[str, Any] = {"epochs": 5, "lr": 2e-4}


@dataclass
class SourcePlan:
    """One source of a mix (``data.sources``), as the driver found it.

    Attributes:
        name, noise: from the config (``noise`` is ``synthesize`` or ``as_is``).
        weight: normalised share of the training crops.
        files: its shard files. train_ids, val_ids: its training ids and validation ids (sorted; the
            first ``data.val_max_images`` of them are validated on).
        crops_per_epoch: crops it contributes to every epoch (exact, over all workers).
        image_shape: (H, W) of its first training image.
    """

    name: str
    noise: str
    weight: float
    files: list[str]
    train_ids: list[str]
    val_ids: list[str]
    crops_per_epoch: int = 0
    image_shape: tuple[int, int] = (0, 0)


@dataclass
class DataPlan:
    """What the driver found in the shards before starting workers (``sources`` only for a mix)."""

    files: list[str]
    n_train: int
    val_ids: list[str]
    image_shape: tuple[int, int]
    steps_per_epoch: int
    val_batch: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    sources: list[SourcePlan] = field(default_factory=list)


@dataclass
class InitModel:
    """The model a fine-tune starts from (``init``): where it came from and its weights (CPU tensors)."""

    spec: str
    name: str
    version: str
    source: str
    location: str
    weights_sha256: str | None
    card_metrics: dict[str, float]
    state: dict[str, Any] = field(repr=False, default_factory=dict)

    def tags(self) -> dict[str, str]:
        """MLflow tags naming the parent model."""
        return {
            "semray.init_model": self.spec,
            "semray.init_model_name": self.name,
            "semray.init_model_version": self.version,
            "semray.init_model_source": self.source,
            "semray.init_model_location": self.location,
            "semray.init_weights_sha256": self.weights_sha256 or "",
        }

    def card_entry(self) -> dict[str, Any]:
        """The ``parent`` entry of the fine-tuned model's card."""
        return {
            "spec": self.spec,
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "location": self.location,
            "weights_sha256": self.weights_sha256,
            "metrics": self.card_metrics,
        }


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
        init_model: the ``init`` spec a fine-tune started from (None: from scratch).
        init_metrics: the init model's validation metrics measured before training (``val_*`` keys,
            per source too for a mix); empty when not fine-tuning or when resuming.
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
    init_model: str | None = None
    init_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def best_epoch(self) -> int | None:
        e = self.best_metrics.get("epoch")
        return None if e is None else int(e)

    def summary(self) -> str:
        """Human-readable lines saying where everything is."""
        m = self.best_metrics
        per_source = [k.split("/", 1)[1] for k in m if k.startswith("val_psnr/")]
        lines = [
            f"run {self.run_name}: best epoch {self.best_epoch} with {self.metric} = {m.get(self.metric, float('nan')):.4f}"
            f" (val_psnr {m.get('val_psnr', float('nan')):.2f} dB, val_ssim {m.get('val_ssim', float('nan')):.4f})",
            *(f"  val_psnr/{src}: {m[f'val_psnr/{src}']:.2f} dB" for src in per_source),
            f"  checkpoints:     {self.run_dir}",
            f"  best checkpoint: {self.best_checkpoint}",
            f"  best model dir:  {self.model_dir}",
        ]
        if self.init_model:
            before = self.init_metrics.get("val_psnr", float("nan"))
            lines.append(f"  fine-tuned from: {self.init_model} (val_psnr before training {before:.2f} dB)")
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
    if cfg.data.sources:
        return _prepare_mix(cfg, num_workers or cfg.scaling.num_workers)
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


def _plan_source(cfg: TrainConfig, index: int) -> SourcePlan:
    """Check one ``data.sources`` entry against its shards (exist, pairs have ``noisy``, fit the crops)."""
    from semray.io import ShardError
    from semray.train.pipeline import has_column, image_shape, shard_files, split_ids

    src = cfg.data.sources[index]  # type: ignore[index]
    where = f"data.sources[{index}] ({src.name!r})"
    try:
        files = shard_files([str(Path(s).expanduser().resolve()) for s in src.shards])
    except ShardError as e:
        raise ConfigError(f"{where}.shards: {e}") from None
    if src.noise == "as_is" and not has_column(files, "noisy"):
        import pyarrow.parquet as pq

        bad = next(f for f in files if "noisy" not in pq.read_schema(f).names)
        raise ConfigError(
            f"{where}: noise 'as_is' uses real noisy/clean pairs, but shard {bad} has no 'noisy' column; "
            "ingest pairs with `semray ingest --mode pairs`, or set noise: synthesize for clean references"
        )
    train_ids = split_ids(files, "train")
    if not train_ids:
        raise ConfigError(f"{where}: no rows with split 'train' in {src.shards}")
    shape = image_shape(files, "train")
    assert shape is not None
    if min(shape) < cfg.data.crop_px:
        raise ConfigError(
            f"{where}: data.crop_px={cfg.data.crop_px} is larger than its training images ({shape[0]}x{shape[1]})"
        )
    val_ids = split_ids(files, "val")
    if cfg.data.val_max_images is not None:
        val_ids = val_ids[: cfg.data.val_max_images]
    weight = cfg.data.mix_weights[src.name]
    return SourcePlan(
        src.name, src.noise, weight, files, train_ids, val_ids, 0, (int(shape[0]), int(shape[1]))
    )


def _prepare_mix(cfg: TrainConfig, workers: int) -> DataPlan:
    """:func:`prepare_data` for ``data.sources``: plan every source, size the epoch, split it by weight.

    An epoch is ``crops_per_image`` crops per training image of all sources together (capped by
    ``optim.steps_per_epoch``), rounded down to whole batches on every worker, so the workers consume
    every crop and each source's share holds exactly. ``data.val_max_images`` applies per source.
    """
    from semray.train.pipeline import load_val_batch, mix_totals

    objective = getattr(cfg.loss, "objective", "supervised")
    if objective != "supervised":
        raise ConfigError(
            f"data.sources: a mix trains supervised only (pairs as they are, clean references with synthetic "
            f"noise); loss.objective={objective!r} needs data.shards"
        )
    plans = [_plan_source(cfg, i) for i in range(len(cfg.data.sources or []))]
    n_train = sum(len(p.train_ids) for p in plans)
    per_worker = n_train * cfg.data.crops_per_image // workers
    full = per_worker // cfg.data.batch_size
    if full < 1:
        raise ConfigError(
            f"{n_train} training images x {cfg.data.crops_per_image} crops over {workers} workers give "
            f"{per_worker} crops per worker, less than one batch of data.batch_size={cfg.data.batch_size}"
        )
    steps = min(full, cfg.optim.steps_per_epoch or full)
    total = steps * cfg.data.batch_size * workers
    for plan, n in zip(plans, mix_totals([p.weight for p in plans], total), strict=True):
        if n == 0:
            raise ConfigError(
                f"data.sources: {plan.name!r} (weight {plan.weight:.3g}) would get none of the {total} crops "
                "of an epoch; raise its weight or the epoch size (data.crops_per_image, optim.steps_per_epoch)"
            )
        plan.crops_per_epoch = n
    parts = []
    for plan in plans:
        if not plan.val_ids:
            print(f"semray train: source {plan.name!r} has no 'val' rows; it is trained on but not validated")
            continue
        parts.append(
            load_val_batch(
                plan.files, plan.val_ids, cfg.noise, cfg.data.val_noise_seed, cfg.data.val_crop_px,
                source=plan.name, noise_mode=plan.noise,
            )
        )  # fmt: skip
    if not parts:
        raise ConfigError(f"data.sources: no rows with split 'val' in any source ({[p.name for p in plans]})")
    val_batch = _concat_val_parts(parts)
    _check_metric_source(cfg, val_batch)
    files: list[str] = []
    for plan in plans:
        files.extend(f for f in plan.files if f not in files)
    shape = max((p.image_shape for p in plans), key=lambda hw: hw[0] * hw[1])
    val_ids = [i for p in plans for i in p.val_ids]
    return DataPlan(files, n_train, val_ids, shape, steps, val_batch, plans)


def _check_metric_source(cfg: TrainConfig, val_batch: dict[str, np.ndarray]) -> None:
    """A per-source ``validation.metric`` (``val_psnr/<source>``) needs that source's validation crops,
    and for a defect metric some with labelled defects; otherwise every epoch would score NaN."""
    source = cfg.validation.source
    if source is None:
        return
    mine = np.asarray([str(s) == source for s in val_batch["source"]], dtype=bool)
    if not mine.any():
        raise ConfigError(
            f"validation.metric={cfg.validation.metric!r}: source {source!r} has no rows with split 'val', "
            "so it cannot score checkpoints; give it validation images or choose another metric"
        )
    known = np.asarray(val_batch["defect_mask_known"], dtype=bool)[mine]
    if cfg.validation.base_metric.startswith("val_defect_") and not known.any():
        raise ConfigError(
            f"validation.metric={cfg.validation.metric!r}: source {source!r} has no labelled defect masks "
            "(defect metrics are not measured on it); choose a non-defect metric such as "
            f"'val_psnr/{source}'"
        )


def _concat_val_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-source validation batches; a column some lack (``reference``) is None there."""
    keys = list(dict.fromkeys(k for p in parts for k in p))
    out: dict[str, np.ndarray] = {}
    for k in keys:
        cols = []
        for p in parts:
            if k in p:
                cols.append(p[k])
            else:
                filler = np.empty(len(p["image_id"]), dtype=object)
                filler[:] = None
                cols.append(filler)
        out[k] = np.concatenate(cols)
    return out


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
    from semray.train.pipeline import build_mix_dataset, build_train_dataset

    d = cfg.data
    if plan.sources:  # data.sources: a weighted mix (see pipeline.build_mix_dataset)
        train_ds = build_mix_dataset(
            plan.sources, [p.crops_per_epoch for p in plan.sources], cfg.noise, cfg.seed, clock,
            crop_px=d.crop_px, defect_prob=d.defect_crop_prob, flips=d.flips, rot90=d.rot90,
            noise_batch_images=d.noise_batch_images, data_cpus=cfg.scaling.data_cpus,
            block_bytes=IMAGES_PER_BLOCK * plan.image_shape[0] * plan.image_shape[1] * 9,  # + float32 noisy
        )  # fmt: skip
    else:
        train_ds = build_train_dataset(
            plan.files, cfg.noise, cfg.seed, clock,
            crop_px=d.crop_px, crops_per_image=d.crops_per_image, defect_prob=d.defect_crop_prob,
            flips=d.flips, rot90=d.rot90, noise_batch_images=d.noise_batch_images, data_cpus=cfg.scaling.data_cpus,
            block_bytes=IMAGES_PER_BLOCK * plan.image_shape[0] * plan.image_shape[1] * 5,  # float32 clean + bool mask
            objective=cfg.loss.objective,
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


def _init_dir(spec: str) -> str:
    """A training checkpoint (``.../epoch-00003``) or run folder (with ``best_model/``) names its model."""
    path = Path(spec).expanduser()
    for sub in (MODEL_SUBDIR, BEST_MODEL_DIR):
        if "://" not in spec and (path / sub / "card.json").is_file():
            return str(path / sub)
    return spec


def resolve_init(cfg: TrainConfig) -> tuple[TrainConfig, InitModel | None]:
    """Load the ``init`` model of a fine-tune and fit the config to it.

    ``init`` is anything :func:`semray.models.resolve.resolve_model` takes ('default', a model name or
    folder, ``models:/NAME@ALIAS``), or a training checkpoint / run folder (its model is used). The
    architecture is the init model's: model fields the config leaves unset are taken from its card,
    and a field the config sets to something else is an error. Optimiser fields the config leaves
    unset get :data:`FINETUNE_OPTIM` (a short schedule at a tenth of the default learning rate).

    Returns:
        ``(config to train with, the init model)``; ``(cfg, None)`` when ``init`` is not set.

    Raises:
        ConfigError: the model cannot be found or loaded, or the config's model section contradicts it.
    """
    if cfg.init is None:
        return cfg, None
    from semray.config.model import UNetConfig
    from semray.models.resolve import ModelNotFoundError, resolve_model
    from semray.models.store import ModelStoreError

    try:
        resolved = resolve_model(_init_dir(cfg.init))
    except (ModelNotFoundError, ModelStoreError, ValueError) as e:
        raise ConfigError(f"init: {e}") from None
    theirs = resolved.card.get("model_config", {})
    ours = cfg.model.model_dump(mode="json")
    explicit = cfg.model.model_fields_set if "model" in cfg.model_fields_set else set()
    clash = sorted(k for k in explicit if ours.get(k) != theirs.get(k))
    if clash:
        detail = ", ".join(f"model.{k}={ours.get(k)!r} (the model has {theirs.get(k)!r})" for k in clash)
        raise ConfigError(
            f"init: model {cfg.init!r} has a different architecture than the config sets: {detail}; "
            "remove these model fields to take the architecture from the init model, or match them"
        )
    try:
        model_cfg = UNetConfig.model_validate(theirs)
    except Exception as e:
        raise ConfigError(
            f"init: model {cfg.init!r} has an unreadable model_config in its card ({e})"
        ) from None
    optim_set = cfg.optim.model_fields_set if "optim" in cfg.model_fields_set else set()
    finetune = {k: v for k, v in FINETUNE_OPTIM.items() if k not in optim_set}
    if finetune:
        print(
            f"semray train: fine-tuning from {cfg.init!r}: "
            + ", ".join(f"optim.{k}={v}" for k, v in finetune.items())
            + " (fine-tune defaults; set them in the config to override)",
            flush=True,
        )
    data = cfg.model_dump(mode="json")
    data["model"] = model_cfg.model_dump(mode="json")
    data["optim"] = {**data["optim"], **finetune}
    new_cfg = TrainConfig.model_validate(data)
    init = InitModel(
        spec=cfg.init,
        name=resolved.name,
        version=resolved.version,
        source=resolved.source,
        location=resolved.location,
        weights_sha256=resolved.card.get("weights_sha256"),
        card_metrics={
            k: float(v)
            for k, v in (resolved.card.get("metrics") or {}).items()
            if isinstance(v, (int, float))
        },
        state={k: v.detach().cpu() for k, v in resolved.model.state_dict().items()},
    )
    return new_cfg, init


def _init_state(cfg: TrainConfig) -> dict[str, Any] | None:
    """The ``init`` model's weights (None without ``init``); see :func:`resolve_init`."""
    _, init = resolve_init(cfg)
    return None if init is None else init.state


def evaluate_init(cfg: TrainConfig, plan: DataPlan, state: dict[str, Any]) -> dict[str, float]:
    """Validation metrics of the starting weights on the run's fixed validation set, on the driver
    (CPU), exactly as the loop measures an epoch: the "before" of a fine-tune."""
    import torch

    from semray.losses import build_loss
    from semray.models.unet import build_model
    from semray.train.validate import (
        collect_val_items,
        denoise_images,
        finalize,
        metric_sums,
        sums_to_tensor,
        val_keys,
    )

    net = build_model(cfg.model)
    net.load_state_dict(state)
    items = collect_val_items([plan.val_batch])
    den = denoise_images(net, [it.noisy for it in items], "cpu")
    keys = val_keys(items)
    with torch.no_grad():
        sums = metric_sums(items, den, build_loss(cfg.loss))
    return finalize(sums_to_tensor(sums, keys), keys)


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

    init = None
    if not resume:
        cfg, init = resolve_init(cfg)
    plan = prepare_data(cfg)
    init_state = None if init is None else init.state
    init_metrics = {} if init is None else evaluate_init(cfg, plan, init.state)
    if init is not None:
        print(
            f"semray train: {cfg.init!r} before training: val_psnr {init_metrics['val_psnr']:.2f} dB",
            flush=True,
        )
    if not ray.is_initialized():
        from semray.rayenv import worker_env

        # one Parquet footer reader per 10 shard files instead of Ray Data's 32 per epoch (see rayenv)
        n_files = len(plan.files) or sum(len(s.files) for s in plan.sources or [])
        env = {k: v for k, v in worker_env(n_files).items() if k != "RAY_DATA_DISABLE_PROGRESS_BARS"}
        ray.init(
            num_cpus=local_ray_cpus(cfg),
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": env},
        )

    run_id: str | None = info.get("mlflow_run_id")
    tracking: str | None = None
    if cfg.mlflow.enabled:
        from semray.tracking import configure

        from .mlflow_log import reopen_run, start_run

        tracking = configure()
        if run_id:
            reopen_run(cfg, run_id)
        else:
            tags = {"semray.run_dir": str(run_dir or f"{storage}/{run_name}")}
            if init is not None:
                tags.update(init.tags())
            if plan.sources:
                tags["semray.data_sources"] = ",".join(p.name for p in plan.sources)
            run_id = start_run(cfg, run_name, tags)
            if init_metrics:
                from .mlflow_log import EpochLogger

                EpochLogger(tracking, run_id).log_metrics(
                    {f"init_{k}": v for k, v in init_metrics.items()}, 0
                )
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
    card_extra: dict[str, Any] = {}
    if init is not None:
        card_extra["parent"] = init.card_entry()
    if plan.sources:
        card_extra["data_sources"] = [
            {"name": p.name, "noise": p.noise, "weight": p.weight, "crops_per_epoch": p.crops_per_epoch,
             "n_train": len(p.train_ids), "shards": list(p.files)}
            for p in plan.sources
        ]  # fmt: skip
    out = _finish(cfg, result, run_name, storage, run_dir, run_id, card_extra)
    if init is not None:
        out.init_model, out.init_metrics = cfg.init, init_metrics
    return out


def _finish(
    cfg: TrainConfig,
    result: Any,
    run_name: str,
    storage: str,
    run_dir: Path | None,
    run_id: str | None,
    card_extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Pick the best checkpoint, copy its model out (its card plus ``card_extra``: the parent model of
    a fine-tune, the sources of a mix), log + register it, close the MLflow run."""
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
    if card_extra:
        from semray.models.store import CARD_FILE

        card = json.loads((model_dir / CARD_FILE).read_text())
        card.update(card_extra)
        (model_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
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
