"""Loss and architecture search on Ray Tune: one Ray Train run per trial, ASHA early stopping, MLflow.

:func:`run_search` is the library entry point (``semray tune`` and ``jobs/tune_losses.py`` call it)::

    from semray.config.base import load_config
    from semray.config.tune import TuneConfig
    result = run_search(load_config(TuneConfig, "configs/tune_laptop.yaml"))
    print(result.summary())

How it fits together:

* Each Tune trial (:func:`trial_fn`) applies its sampled values to the base training config, fits it
  with :func:`semray.train.fit_run` (so trials train exactly as ``semray train`` does) and forwards
  every epoch's metrics to Tune through :class:`ScoreReportCallback`, which adds the objective
  (:data:`~semray.config.tune.SCORE_METRIC`) that ASHA stops on.
* MLflow: one parent run per search (tag ``semray.kind=tune-search``), one child run per trial (tag
  ``mlflow.parentRunId``) into which the training loop logs per-epoch metrics; the trial adds the
  score per epoch, its final metrics and its best model. After the search the best trial's model is
  registered and tagged with the parent run id; a summary table (CSV, Markdown) and a plot of the
  score against the loss weights become artifacts of the parent run.
* Restart: a search whose experiment folder exists is restored with ``Tuner.restore`` (finished
  trials are kept, unfinished ones continue from their last Train checkpoint) and keeps logging into
  the same MLflow runs, which are found again by their tags.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from semray.config.base import ConfigError, dump_yaml, flatten
from semray.config.train import TrainConfig
from semray.config.tune import SCORE_METRIC, ObjectiveSection, TuneConfig, trial_config
from semray.rayenv import worker_env
from semray.tune_baseline import InitBaseline, pick_winner, score_init, write_init_model

TAG_KIND = "semray.kind"
TAG_SEARCH = "semray.search_name"
TAG_TRIAL = "semray.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_STOPPED = "semray.stopped_early"
TAG_VARIANT = "semray.variant"
TAG_SELECTED = "semray.selected"
MODEL_ARTIFACT = "semray_model"


@dataclass
class SearchResult:
    """Outcome of :func:`run_search`.

    Attributes:
        name, storage_path: the Tune experiment and where it lives.
        experiment_id, parent_run_id: the MLflow experiment and the search's parent run.
        best_trial, best_run_id, best_score, best_params: the winning trial, its child run, its score
            and its sampled values (dotted training-config fields).
        best_config: the full training config of the best trial (JSON-able dict).
        registered_model, model_version, model_alias: the registered best model (None if not registered).
        trials: one summary row per trial (see :func:`summary_rows`).
        resumed: True if an interrupted search was restored.
        tracking_uri: the MLflow store the runs are in (``mlflow ui --backend-store-uri`` it).
        init_score: a fine-tuning search's (``base.init``) score of the init weights, measured on the
            trials' validation set before any trial (None without ``base.init``).
        selected: what was registered: ``"trial"`` (the best trial) or ``"init"`` (no trial beat the
            init weights, which are registered unchanged; see :func:`pick_winner`).
    """

    name: str
    storage_path: str
    experiment_id: str
    parent_run_id: str
    best_trial: str | None
    best_run_id: str | None
    best_score: float | None
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    registered_model: str | None = None
    model_version: str | None = None
    model_alias: str | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False
    tracking_uri: str | None = None
    init_score: float | None = None
    selected: str = "trial"

    def summary(self) -> str:
        """Human-readable lines saying where everything is."""
        n_stopped = sum(1 for t in self.trials if t.get("stopped_early"))
        lines = [
            f"search {self.name}: {len(self.trials)} trials ({n_stopped} stopped early by the scheduler)"
            + (" [resumed]" if self.resumed else ""),
            f"  MLflow tracking URI: {self.tracking_uri}",
            f"  MLflow experiment id: {self.experiment_id}",
            f"  MLflow parent run id: {self.parent_run_id}",
            f"  best trial:           {self.best_trial} (run {self.best_run_id}, {SCORE_METRIC} = {self.best_score})",
            f"  best params:          {self.best_params}",
            f"  Tune experiment:      {self.storage_path}/{self.name}",
        ]
        if self.init_score is not None:
            lines.append(f"  init weights:         {SCORE_METRIC} = {self.init_score}")
            lines.append(f"  registered:           {self.verdict()}")
        if self.registered_model and self.model_version:
            alias = f" (alias @{self.model_alias})" if self.model_alias else ""
            lines.append(
                f"  registered model:     models:/{self.registered_model}/{self.model_version}{alias}"
            )
        return "\n".join(lines)

    def verdict(self) -> str:
        """One sentence: what a fine-tuning search registered, and why (empty without ``base.init``)."""
        if self.init_score is None:
            return ""
        score = f"{SCORE_METRIC} {_fmt(self.best_score)} vs init {_fmt(self.init_score)} on validation"
        if self.selected == "init":
            return f"the search found no improvement over the init model ({score}): its weights are registered unchanged"
        return f"best trial {self.best_trial} improves on the init model ({score}) and is registered"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def variant_name(model: dict[str, Any]) -> str:
    """Short label of an architecture variant, e.g. ``d3-w16-res-edge`` (for plots and tables)."""
    parts = [f"d{model.get('depth')}", f"w{model.get('base_width')}"]
    if model.get("residual"):
        parts.append("res")
    if model.get("edge_input"):
        parts.append("edge")
    return "-".join(parts)


def param_space(cfg: TuneConfig) -> dict[str, Any]:
    """Tune's ``param_space``: dotted field -> ``tune.choice`` / ``grid_search`` / ``uniform`` / ..."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, d in cfg.space.items():
        if d.choice is not None:
            space[key] = tune.choice(d.choice)
        elif d.grid is not None:
            space[key] = tune.grid_search(d.grid)
        elif d.uniform is not None:
            space[key] = tune.uniform(*d.uniform)
        elif d.loguniform is not None:
            space[key] = tune.loguniform(*d.loguniform)
        elif d.randint is not None:
            # tune.randint excludes the upper bound; ours includes it
            space[key] = tune.randint(d.randint[0], d.randint[1] + 1)
    return space


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch with the highest finite score in a trial's reported history (None if none)."""
    scored = [m for m in history if math.isfinite(float(m.get(SCORE_METRIC, float("nan"))))]
    return max(scored, key=lambda m: float(m[SCORE_METRIC])) if scored else None


def was_stopped_early(epochs_done: int, max_epochs: int, status: str) -> bool:
    """A trial that ended without error before its last epoch was stopped by the scheduler."""
    return status != "ERROR" and 0 < epochs_done < max_epochs


# --------------------------------------------------------------------------------------------------
# Inside a trial
# --------------------------------------------------------------------------------------------------


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _find_run(client: Any, experiment_id: str, tags: dict[str, str]) -> str | None:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs(
        [experiment_id], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


class ScoreReportCallback(TuneReportCallback):
    """Forwards each epoch's metrics from the Ray Train controller to Tune, with the objective added.

    ``TuneReportCallback`` is the Ray 2.60 / Train V2 way to report a ``TorchTrainer`` inside a Tune
    trial; this subclass adds :data:`~semray.config.tune.SCORE_METRIC` (what ASHA stops on) and logs
    it to the trial's MLflow child run, beside the metrics the training loop logs there.
    """

    def __init__(self, objective: ObjectiveSection, tracking_uri: str | None, run_id: str | None) -> None:
        super().__init__()
        self.objective, self.tracking_uri, self.run_id = objective, tracking_uri, run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = metrics[0]
        m[SCORE_METRIC] = self.objective.score(m)
        if self.tracking_uri and self.run_id:
            _client(self.tracking_uri).log_metric(
                self.run_id, SCORE_METRIC, m[SCORE_METRIC], step=int(m.get("epoch", 0))
            )
        super().after_report(run_context, metrics, checkpoint)


def _trial_run(
    cfg: TrainConfig, params: dict[str, Any], ctx: dict[str, Any], trial_id: str, trial_name: str
) -> str | None:
    """Find (on restore) or create the trial's MLflow child run; returns its id."""
    if not ctx.get("tracking_uri"):
        return None
    from semray.tracking import log_params

    client = _client(ctx["tracking_uri"])
    tags = {TAG_PARENT: ctx["parent_run_id"], TAG_TRIAL: trial_id}
    run_id = _find_run(client, ctx["experiment_id"], tags)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        ctx["experiment_id"],
        run_name=f"{ctx['search_name']}-{trial_name}",
        tags={
            **tags,
            TAG_KIND: "tune-trial",
            TAG_SEARCH: ctx["search_name"],
            TAG_VARIANT: variant_name(cfg.model.model_dump()),
        },
    )
    log_params(flatten(cfg), run.info.run_id, client)
    for k, v in params.items():
        client.set_tag(run.info.run_id, f"tune.{k}", str(v))
    client.log_text(run.info.run_id, dump_yaml(cfg), "config/train.yaml")
    return run.info.run_id


def trial_fn(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: a full Ray Train run of the base config with ``params`` applied.

    Args:
        params: sampled dotted training-config fields (Tune's ``config``).
        ctx: search-wide context from :func:`run_search`: base config (JSON), objective (JSON), data
            plan, MLflow tracking URI / experiment / parent run, and where trials keep their runs.
    """
    import ray.tune

    from semray.train import fit_run
    from semray.train.checkpoint import MODEL_SUBDIR

    cfg = trial_config(ctx["base"], params)
    # every epoch's checkpoint is kept so the best one by the search's own score can be picked
    cfg.checkpoint.keep_best = max(cfg.checkpoint.keep_best, cfg.optim.epochs)
    objective = ObjectiveSection.model_validate(ctx["objective"])
    tctx = ray.tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    run_name = f"train-{trial_id}"
    run_id = _trial_run(cfg, params, ctx, trial_id, trial_name)
    result = fit_run(
        cfg, ctx["plan"], run_name, ctx["train_storage"], tracking_uri=ctx.get("tracking_uri"),
        mlflow_run_id=run_id, init_state=ctx.get("init_state"),
        callbacks=[ScoreReportCallback(objective, ctx.get("tracking_uri"), run_id)],
    )  # fmt: skip

    # only trials that ran all their epochs get here: ASHA stops the others by ending this process
    scored = [(c, {**m, SCORE_METRIC: objective.score(m)}) for c, m in (result.best_checkpoints or [])]
    if not run_id or not scored:
        return
    best_ckpt, best = max(scored, key=lambda cm: cm[1][SCORE_METRIC])
    client = _client(ctx["tracking_uri"])
    final = {f"final_{k}": float(v) for k, v in (result.metrics or {}).items() if _finite(v)}
    final.update(
        {f"best_{k}": float(v) for k, v in best.items() if _finite(v) and k.startswith(("val_", "tune_"))}
    )
    final["best_epoch"] = float(best.get("epoch", -1))
    final["epochs_done"] = float(len(scored))
    for k, v in final.items():
        client.log_metric(run_id, k, v)
    with tempfile.TemporaryDirectory(prefix="semray-trial-") as tmp:
        best_ckpt.to_directory(tmp)
        client.log_artifacts(run_id, str(Path(tmp) / MODEL_SUBDIR), MODEL_ARTIFACT)
    client.set_tag(run_id, TAG_STOPPED, "false")
    client.set_terminated(run_id, status="FINISHED")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def trial_cpus(cfg: TuneConfig) -> float:
    """Logical CPUs one running trial holds: its driver, its Train workers and one Ray Data task."""
    s = cfg.base.scaling
    return cfg.resources.cpus + s.num_workers * s.cpus_per_worker + s.data_cpus


def concurrent_trials(cfg: TuneConfig, cluster_cpus: float) -> int:
    """How many trials can run at once on ``cluster_cpus`` logical CPUs without starving each other.

    Tune reserves only each trial's driver (``resources.cpus``); the trial's Train workers and Ray Data
    tasks ask Ray for CPUs afterwards. If the concurrent trials' workers take every CPU, no data task
    can be scheduled and every trial waits forever. One whole CPU is kept free besides, because Ray
    places an actor (such as Ray Data's Parquet footer readers) only where a whole CPU is free.

    Returns:
        ``min(search.max_concurrent_trials, floor((cluster_cpus - 1) / trial_cpus))``, at least 0.
    """
    fit = math.floor((cluster_cpus - 1.0) / trial_cpus(cfg) + 1e-9)
    return max(0, min(cfg.search.max_concurrent_trials, fit))


def connect_ray(cfg: TuneConfig, n_files: int = 1) -> int:
    """Join the cluster this process runs in (a Ray job, or ``RAY_ADDRESS``), else start a local Ray.

    A local Ray gets enough logical CPUs for ``search.max_concurrent_trials`` trials (see
    :func:`concurrent_trials`), at least the machine's cores: logical CPUs are scheduling tokens, so
    oversubscribing them on a 2-core laptop lets the OS interleave the trials. Workers get
    :func:`worker_env`.

    Returns:
        The number of trials to run at once: ``search.max_concurrent_trials``, lowered (at least 1,
        with a warning) when a single-node CPU cluster is too small for that many.
    """
    import ray

    if not ray.is_initialized():
        runtime_env = {"env_vars": worker_env(n_files)}
        # a `ray job submit` driver has RAY_ADDRESS (and a job id) set by the job supervisor
        if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_SUBMISSION_ID"):
            ray.init(address="auto", log_to_driver=True, runtime_env=runtime_env)
        else:
            need = math.ceil(cfg.search.max_concurrent_trials * trial_cpus(cfg) + 1)
            ray.init(
                num_cpus=max(os.cpu_count() or 1, need),
                include_dashboard=False,
                log_to_driver=True,
                runtime_env=runtime_env,
            )
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    want, fit = cfg.search.max_concurrent_trials, concurrent_trials(cfg, cpus)
    if fit >= want:
        return want
    # a CPU search on one machine cannot grow: run fewer trials at once rather than deadlock. A cluster
    # that may still add nodes (several nodes, or GPU trials an autoscaler provides for) keeps the cap.
    single = sum(1 for n in ray.nodes() if n.get("Alive")) <= 1 and not cfg.base.scaling.use_gpu
    n = max(1, fit) if single else want
    print(
        f"semray tune: WARNING the Ray cluster has {cpus:g} CPUs; a trial holds {trial_cpus(cfg):g} "
        f"(resources.cpus + base.scaling workers + data_cpus) and Ray Data needs 1 more free, so "
        f"{fit} of search.max_concurrent_trials={want} fit; running {n} at a time"
        + ("" if fit >= 1 else " (start Ray with more logical CPUs, e.g. `ray start --head --num-cpus 4`)"),
        flush=True,
    )
    return n


def _parent_run(cfg: TuneConfig, name: str, storage: str, resumed: bool) -> tuple[str, str, str]:
    """(tracking URI, experiment id, parent run id): the existing parent run of ``name`` or a new one."""
    from semray.tracking import configure, get_or_create_experiment, log_params

    uri = configure()
    exp_id = get_or_create_experiment(cfg.mlflow.experiment)
    client = _client(uri)
    run_id = _find_run(client, exp_id, {TAG_KIND: "tune-search", TAG_SEARCH: name})
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "semray.resumed", "true" if resumed else "false")
        return uri, exp_id, run_id
    run = client.create_run(
        exp_id,
        run_name=name,
        tags={TAG_KIND: "tune-search", TAG_SEARCH: name, "semray.tune_dir": f"{storage}/{name}"},
    )
    rid = run.info.run_id
    params = {
        f"search.{k}": v for k, v in flatten(cfg.model_dump(mode="json", exclude={"base", "space"})).items()
    }
    params.update({f"space.{k}": str(d.model_dump(exclude_none=True)) for k, d in cfg.space.items()})
    log_params(params, rid, client)
    client.log_text(rid, dump_yaml(cfg), "config/tune.yaml")
    return uri, exp_id, rid


def _build_tuner(
    cfg: TuneConfig, name: str, storage: str, ctx: dict[str, Any], restore: bool, max_concurrent: int
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), {"CPU": cfg.resources.cpus})
    path = f"{storage}/{name}"
    if restore:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    if cfg.scheduler.kind == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.base.optim.epochs,
            grace_period=min(cfg.scheduler.grace_period, cfg.base.optim.epochs),
            reduction_factor=cfg.scheduler.reduction_factor,
            # the default (True) stops a trial at its last report, which kills it before trial_fn logs
            # its best model: a trial that reaches max_t must end on its own
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if cfg.search.seed is not None:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # an explicit generator ignores TuneConfig.max_concurrent_trials: give it the cap itself
        search_alg = BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=max_concurrent)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=SCORE_METRIC,
            mode="max",
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=cfg.search.num_samples,
            max_concurrent_trials=None if search_alg is not None else max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[_trial_bar_callback(cfg.search.num_samples)],
        ),
    )


def _trial_bar_callback(total: int) -> Any:
    """A Tune callback (run on the driver) that counts finished trials on :func:`semray.logs.progress_bar`."""
    from ray import tune

    from semray.logs import progress_bar

    class TrialBar(tune.Callback):
        def setup(self, **info: Any) -> None:
            self.bar = progress_bar(total, "search", "trial")  # here, not in __init__: Tune pickles callbacks

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.bar.update(1)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.bar.update(1)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.bar.close()

    return TrialBar()


def run_search(cfg: TuneConfig, resume: bool | None = None) -> SearchResult:
    """Run (or resume) a loss/architecture search as configured; returns where the results are.

    Args:
        cfg: the validated search config.
        resume: True: the search ``cfg.run.name`` must exist and is restored; False: it must not exist;
            None (default): restore it if it exists, else start it.

    Raises:
        ConfigError: bad data, nothing to resume, or a name clash with ``resume=False``.
        RuntimeError: every trial failed.
    """
    from ray import tune

    from semray.train import prepare_data, storage_root
    from semray.train.runner import resolve_init

    storage = storage_root(cfg.run.storage_path, "tune")
    name = cfg.run.name or "tune-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = f"{storage}/{name}"
    exists = tune.Tuner.can_restore(path)
    if resume is True and not exists:
        raise ConfigError(f"--resume: no search {name!r} to resume under {storage} (set run.name)")
    if resume is False and exists:
        raise ConfigError(
            f"search {name!r} already exists under {storage}; resume it or set another run.name"
        )
    restore = exists and resume is not False
    # a fine-tune (base.init): the init model's architecture and weights, loaded once here
    base, init = resolve_init(cfg.base)
    cfg = cfg.model_copy(update={"base": base})
    # data problems (missing shards, crops too large) surface here, before any trial starts
    plan = prepare_data(cfg.base)
    max_concurrent = connect_ray(cfg, n_files=len(plan.files))
    uri, exp_id, parent = _parent_run(cfg, name, storage, restore)
    baseline = None if init is None else score_init(cfg, plan, init)
    ctx = {
        "base": cfg.base.model_dump(mode="json"),
        "init_state": None if init is None else init.state,
        "objective": cfg.objective.model_dump(mode="json"),
        "plan": plan,
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "parent_run_id": parent,
        "search_name": name,
        "train_storage": f"{path}/train_runs",
    }
    if restore:
        print(f"semray tune: resuming search {name} from {path}", flush=True)
    try:
        grid = _build_tuner(cfg, name, storage, ctx, restore, max_concurrent).fit()
        return _finish(cfg, grid, name, storage, uri, exp_id, parent, restore, baseline)
    except BaseException:
        _client(uri).set_terminated(parent, status="FAILED")
        raise


def summary_rows(cfg: TuneConfig, grid: Any, uri: str, exp_id: str, parent: str) -> list[dict[str, Any]]:
    """One row per trial: id, status, stopped early, epochs, sampled params, best score and metrics, run id."""
    client = _client(uri)
    max_epochs = cfg.base.optim.epochs
    rows = []
    for res in grid:
        history = (
            [m for m in res.metrics_dataframe.to_dict("records")] if res.metrics_dataframe is not None else []
        )
        trial_id = (res.metrics or {}).get("trial_id") or Path(res.path).name
        status = "ERROR" if res.error else "TERMINATED"
        epochs_done = len(history)
        best = best_epoch(history) or {}
        params = {k: res.config.get(k) for k in cfg.space}
        model = trial_config(cfg.base, params).model.model_dump()
        run_id = _find_run(client, exp_id, {TAG_PARENT: parent, TAG_TRIAL: str(trial_id)})
        row: dict[str, Any] = {
            "trial": str(trial_id),
            "status": status,
            "stopped_early": was_stopped_early(epochs_done, max_epochs, status),
            "epochs": epochs_done,
            "variant": variant_name(model),
            **params,
            SCORE_METRIC: best.get(SCORE_METRIC, float("nan")),
            "best_epoch": best.get("epoch", float("nan")),
            **{
                k: best.get(k, float("nan"))
                for k in ("val_psnr", "val_ssim", "val_defect_recall", "val_edge_preservation")
            },
            "run_id": run_id,
        }
        rows.append(row)
    return sorted(rows, key=lambda r: -r[SCORE_METRIC] if _finite(r[SCORE_METRIC]) else math.inf)


def _close_trial_runs(client: Any, rows: list[dict[str, Any]]) -> None:
    """Trials ASHA stopped never reach the end of :func:`trial_fn`: tag and close their runs here."""
    for r in rows:
        if not r["run_id"]:
            continue
        if r["stopped_early"]:
            client.set_tag(r["run_id"], TAG_STOPPED, "true")
            client.log_metric(r["run_id"], "epochs_done", float(r["epochs"]))
            client.set_terminated(r["run_id"], status="FINISHED")
        elif r["status"] == "ERROR":
            client.set_terminated(r["run_id"], status="FAILED")


def _register(cfg: TuneConfig, run_id: str, model_dir: str, tags: dict[str, str]) -> tuple[str, str]:
    """Log the model folder ``model_dir`` to ``run_id``, register it under the search's name and alias
    and tag the version with ``tags``."""
    from semray.train.mlflow_log import log_final_model
    from semray.train.runner import _input_example

    reg_cfg = cfg.base.model_copy(deep=True)
    reg_cfg.mlflow.registered_model = cfg.mlflow.registered_model
    reg_cfg.mlflow.register_model = True
    reg_cfg.mlflow.alias = cfg.mlflow.alias
    reg = log_final_model(reg_cfg, run_id, model_dir, _input_example(Path(model_dir)))
    assert reg.name is not None and reg.version is not None
    client = _client(_tracking())
    for k, v in tags.items():
        client.set_model_version_tag(reg.name, reg.version, k, v)
    return reg.name, reg.version


def _register_best(cfg: TuneConfig, best_run: str, parent: str, name: str, trial: str) -> tuple[str, str]:
    """Register the best trial's model (logged by :func:`trial_fn`) and tag it with the search."""
    with tempfile.TemporaryDirectory(prefix="semray-best-") as tmp:
        local = _client(_tracking()).download_artifacts(best_run, MODEL_ARTIFACT, tmp)
        tags = {"semray.search_run_id": parent, TAG_SEARCH: name, TAG_TRIAL: trial, TAG_SELECTED: "trial"}
        return _register(cfg, best_run, local, tags)


def _register_init(cfg: TuneConfig, baseline: InitBaseline, parent: str, name: str) -> tuple[str, str]:
    """Register the init weights unchanged (no trial beat them), logged to the search's parent run."""
    with tempfile.TemporaryDirectory(prefix="semray-init-") as tmp:
        write_init_model(cfg, baseline, tmp, name)
        tags = {"semray.search_run_id": parent, TAG_SEARCH: name, TAG_SELECTED: "init"}
        return _register(cfg, parent, tmp, tags)


def _tracking() -> str:
    from semray.tracking import tracking_uri

    return tracking_uri()


def _register_winner(
    cfg: TuneConfig, out: SearchResult, baseline: InitBaseline | None, parent: str, client: Any
) -> None:
    """The one selection step: the best trial, or the init weights when no trial beat them
    (:func:`pick_winner`); registers the winner (if ``mlflow.register_model``) and records the choice."""
    out.init_score = None if baseline is None else baseline.score
    out.selected = pick_winner(out.best_score, out.init_score)
    if baseline is not None:
        client.log_metric(parent, f"init_{SCORE_METRIC}", baseline.score)
        client.set_tag(parent, TAG_SELECTED, out.selected)
        print(f"semray tune: {out.verdict()}", flush=True)
    if not cfg.mlflow.register_model or (out.selected == "trial" and not out.best_run_id):
        return
    if baseline is not None and out.selected == "init":
        out.registered_model, out.model_version = _register_init(cfg, baseline, parent, out.name)
    else:
        reg = _register_best(cfg, str(out.best_run_id), parent, out.name, str(out.best_trial))
        out.registered_model, out.model_version = reg
    out.model_alias = cfg.mlflow.alias
    client.set_tag(parent, "semray.registered_model", f"models:/{out.registered_model}/{out.model_version}")


def _finish(
    cfg: TuneConfig,
    grid: Any,
    name: str,
    storage: str,
    uri: str,
    exp_id: str,
    parent: str,
    resumed: bool,
    baseline: InitBaseline | None = None,
) -> SearchResult:
    client = _client(uri)
    rows = summary_rows(cfg, grid, uri, exp_id, parent)
    _close_trial_runs(client, rows)
    # the winner must have run all its epochs: only those trials logged their best model
    complete = [
        r for r in rows if not r["stopped_early"] and r["status"] != "ERROR" and _finite(r[SCORE_METRIC])
    ]
    if not complete:
        raise RuntimeError(f"search {name}: no trial finished (see the trial errors in {storage}/{name})")
    best = complete[0]
    best_params = {k: best[k] for k in cfg.space}
    out = SearchResult(
        name=name,
        storage_path=storage,
        experiment_id=exp_id,
        parent_run_id=parent,
        best_trial=best["trial"],
        best_run_id=best["run_id"],
        best_score=float(best[SCORE_METRIC]),
        best_params=best_params,
        best_config=trial_config(cfg.base, best_params).model_dump(mode="json"),
        trials=rows,
        resumed=resumed,
        tracking_uri=uri,
    )
    with tempfile.TemporaryDirectory(prefix="semray-tune-report-") as tmp:
        for f in write_report(rows, list(cfg.space), Path(tmp), title=f"search {name}"):
            client.log_artifact(parent, str(f), "summary")
    client.log_text(parent, dump_yaml(TrainConfig.model_validate(out.best_config)), "best/train.yaml")
    client.log_metric(parent, f"best_{SCORE_METRIC}", out.best_score)
    client.log_metric(parent, "n_trials", float(len(rows)))
    client.log_metric(parent, "n_stopped_early", float(sum(r["stopped_early"] for r in rows)))
    for k, v in best_params.items():
        client.set_tag(parent, f"best.{k}", str(v))
    client.set_tag(parent, "semray.best_run_id", str(best["run_id"]))
    _register_winner(cfg, out, baseline, parent, client)
    client.set_terminated(parent, status="FINISHED")
    return out


# --------------------------------------------------------------------------------------------------
# Report (parent-run artifacts)
# --------------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (floats to 4 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict[str, Any]], space_keys: list[str], out_dir: Path, title: str) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and ``score_vs_loss_weights.png`` into ``out_dir``.

    The plot has one panel per loss weight (``loss.alpha``, ``loss.beta``, or whatever numeric loss
    fields the space varies), the score on the y axis, one colour per architecture variant; trials the
    scheduler stopped are hollow markers (their score is from fewer epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["trial", "variant", *space_keys, SCORE_METRIC, "val_psnr", "val_defect_recall", "val_ssim",
               "best_epoch", "epochs", "stopped_early", "status", "run_id"]  # fmt: skip
    df = pd.DataFrame(rows, columns=columns)
    csv, md, png = out_dir / "summary.csv", out_dir / "summary.md", out_dir / "score_vs_loss_weights.png"
    df.to_csv(csv, index=False)
    md.write_text(
        f"# {title}\n\nSorted by {SCORE_METRIC} (higher is better).\n\n" + markdown_table(rows, columns)
    )

    weights = [k for k in space_keys if k.startswith("loss.") and pd.api.types.is_numeric_dtype(df[k])]
    weights = weights or ["epochs"]
    fig, axes = plt.subplots(1, len(weights), figsize=(4.2 * len(weights), 3.6), squeeze=False)
    variants = sorted(df["variant"].unique())
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    for ax, key in zip(axes[0], weights, strict=True):
        for v in variants:
            for stopped, face in ((False, None), (True, "none")):
                sel = df[(df["variant"] == v) & (df["stopped_early"] == stopped)]
                if sel.empty:
                    continue
                ax.scatter(sel[key], sel[SCORE_METRIC], edgecolors=[colours[v]], facecolors=face or [colours[v]],
                           label=f"{v}{' (stopped)' if stopped else ''}", s=36)  # fmt: skip
        ax.set_xlabel(key)
        ax.set_ylabel(SCORE_METRIC)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [csv, md, png]
