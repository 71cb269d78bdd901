"""The driver side of a training run: run folder, fine-tune start, MLflow run, final model.

:func:`train` is the library entry point (``semray train`` and ``jobs/train.py`` call it). The data
plan is :func:`semray.train.plan.prepare_data`; the fit itself (epoch clock, trainer, failed-run
marking) is :func:`semray.train.fit.fit_run`, which Ray Tune trials share.

Run folders. A run lives in ``<storage_path>/<run name>`` (Ray Train's checkpoints and its snapshot,
plus ``semray_run.json`` naming the MLflow run). Starting a run whose folder already holds a snapshot
is refused unless ``resume=True``: then Ray Train V2 restores the latest checkpoint, the loop continues
from the next epoch, and the metrics go on into the same MLflow run.

Mixes. With ``data.sources`` the driver plans every source (files, train/val ids, crops per epoch;
:func:`~semray.train.plan.prepare_data`) and the train dataset interleaves them in the configured
proportions (:func:`semray.train.pipeline.build_train_dataset`); validation is reported overall and per source.

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
from semray.train.fit import fit_run, storage_root
from semray.train.plan import DataPlan, prepare_data

RUN_INFO_FILE = "semray_run.json"
RUN_CONFIG_FILE = "train.yaml"
BEST_MODEL_DIR = "best_model"
#: Ray Train V2's snapshot file; its presence means a run folder can be resumed.
_SNAPSHOT_GLOB = "checkpoint_manager_snapshot*.json"


#: Optimiser settings of a fine-tune (``init``) where the config leaves them unset: a short, gentle
#: schedule that continues from the init weights rather than re-learning them.
FINETUNE_OPTIM: dict[str, Any] = {"epochs": 5, "lr": 2e-4}


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
# Run folders
# --------------------------------------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _has_snapshot(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.glob(_SNAPSHOT_GLOB))


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


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config a run was started (or last resumed) with, from its folder, with ``overrides``.

    A config saved before the loss became per kind holds every kind's weights; those of other kinds
    (which had no effect) are dropped, and a line says which."""
    from semray.config.base import load_config, read_yaml
    from semray.config.loss import drop_fields_of_other_kinds

    path = Path(run_dir) / RUN_CONFIG_FILE
    data = read_yaml(path)
    loss = data.get("loss")
    dropped = drop_fields_of_other_kinds(loss) if isinstance(loss, dict) else []
    if dropped:
        print(
            f"semray train: {path} was saved before the loss config was per kind; ignoring "
            + ", ".join(f"loss.{k}" for k in dropped)
            + f" (not fields of loss kind {loss.get('kind', 'composite')!r}, they had no effect)",
            flush=True,
        )
        return load_config(TrainConfig, data, overrides)
    return load_config(TrainConfig, path, overrides)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _run_folder(cfg: TrainConfig, storage: str, resume: bool) -> tuple[str, Path | None, dict[str, Any]]:
    """``(run name, local run folder or None, its semray_run.json)``; checks a new run does not exist
    yet and a resumed one does."""
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
    return run_name, run_dir, info


def _start_ray(cfg: TrainConfig, plan: DataPlan) -> None:
    """Start a local Ray (or join ``RAY_ADDRESS``) unless one is running."""
    import ray

    if ray.is_initialized():
        return
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


def _open_mlflow(
    cfg: TrainConfig, run_name: str, run_tag: str, run_id: str | None, plan: DataPlan,
    init: InitModel | None, init_metrics: dict[str, float],
) -> tuple[str | None, str | None]:  # fmt: skip
    """``(tracking URI, MLflow run id)``: the run reopened on resume, else started (tagged with its
    folder, the parent model and the sources) with the init model's metrics; (None, run_id) when off."""
    if not cfg.mlflow.enabled:
        return None, run_id
    from semray.tracking import configure

    from .mlflow_log import EpochLogger, reopen_run, start_run

    tracking = configure()
    if run_id:
        reopen_run(cfg, run_id)
        return tracking, run_id
    tags = {"semray.run_dir": run_tag}
    if init is not None:
        tags.update(init.tags())
    if plan.sources:
        tags["semray.data_sources"] = ",".join(p.name for p in plan.sources)
    run_id = start_run(cfg, run_name, tags)
    if init_metrics:
        EpochLogger(tracking, run_id).log_metrics({f"init_{k}": v for k, v in init_metrics.items()}, 0)
    return tracking, run_id


def _card_extra(init: InitModel | None, plan: DataPlan) -> dict[str, Any]:
    """What the final model card adds: the parent model of a fine-tune, the sources of a mix."""
    extra: dict[str, Any] = {}
    if init is not None:
        extra["parent"] = init.card_entry()
    if plan.sources:
        extra["data_sources"] = [
            {"name": p.name, "noise": p.noise, "objective": p.objective, "weight": p.weight,
             "crops_per_epoch": p.crops_per_epoch, "n_train": len(p.train_ids), "shards": list(p.files)}
            for p in plan.sources
        ]  # fmt: skip
    return extra


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train a denoiser as configured; returns where the results are (see :class:`TrainResult`).

    Starts a local Ray if none is running (or joins ``RAY_ADDRESS``). With ``resume``, continues the
    run named ``cfg.run.name`` (or the latest run in the storage path) from its last checkpoint.

    Raises:
        ConfigError: bad data, a run name that exists without ``resume``, or nothing to resume.
        RuntimeError: training failed more often than ``checkpoint.max_failures`` allows.
    """
    storage = storage_root(cfg.run.storage_path)
    run_name, run_dir, info = _run_folder(cfg, storage, resume)
    init = None
    if not resume:
        cfg, init = resolve_init(cfg)
    plan = prepare_data(cfg)
    init_metrics = {} if init is None else evaluate_init(cfg, plan, init.state)
    if init is not None:
        print(
            f"semray train: {cfg.init!r} before training: val_psnr {init_metrics['val_psnr']:.2f} dB",
            flush=True,
        )
    _start_ray(cfg, plan)
    run_tag = str(run_dir or f"{storage}/{run_name}")
    tracking, run_id = _open_mlflow(
        cfg, run_name, run_tag, info.get("mlflow_run_id"), plan, init, init_metrics
    )
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_INFO_FILE).write_text(
            json.dumps({"run_name": run_name, "mlflow_run_id": run_id}, indent=2)
        )
        (run_dir / RUN_CONFIG_FILE).write_text(dump_yaml(cfg))
    result = fit_run(
        cfg, plan, run_name, storage, tracking_uri=tracking, mlflow_run_id=run_id,
        init_state=None if init is None else init.state,
    )  # fmt: skip
    out = _finish(cfg, result, run_name, storage, run_dir, run_id, _card_extra(init, plan))
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
