"""Batch denoising of wafer lots: in this process or on a Ray Data actor pool, a manifest, resume, and
nothing lost.

``run_denoise_job(INPUT, OUTPUT, cfg)`` denoises every image (:data:`semray.io.IMAGE_SUFFIXES`) under
``INPUT`` (``<lot>/<wafer>/<image>``, any depth) into the same relative path under ``OUTPUT`` (same
name, format, dtype, shape, channels, pages and tags; written atomically by
:func:`semray.io.write_pages`) and writes ``OUTPUT/manifest.parquet`` with exactly one row per input
file (:data:`MANIFEST_SCHEMA`). What happens to one file (pages, layout, data bar) is
:func:`semray.batchfile.process_file`, the one code path both executors run.

Executors (:func:`choose_executor`): a job of at most ``local_max_megapixels`` (all pages, read from
the file headers), a single file, or ``num_actors=0`` runs in this process, because for a small lot
Ray's start-up and actor spin-up take longer than the denoising; a larger job runs on a Ray actor pool
(on the Ray this process is attached to, else a local one). ``executor`` forces either.

Guarantees (the same for both executors):

* **Nothing lost.** Each file is processed inside its own ``try``: an unreadable, empty, truncated,
  foreign, true colour or oversized file, or one with a page that fails, becomes a ``failed`` row with
  the reason, and the job goes on. A worker process that dies (segfault, OOM kill) is restarted by Ray
  and the file retried (``actor_max_restarts`` / ``task_max_retries``); files that still have no row
  after the pass are re-queued once in a reconciliation pass, and a file that kills its worker every
  time is recorded as ``failed`` with that reason. The job checks ``rows == input files`` before
  writing the manifest; ``pages`` counts each file's pages, all of which are written back.
* **Resume.** A file is ``skipped`` when the previous manifest has it as ``ok``/``skipped`` with the
  same input sha256 and the same settings (method, model name and version, tiling, data-bar policy:
  ``settings_sha256``) and the output file still has the recorded sha256. ``force`` redoes everything.
* **Tiny images** (e.g. 7 x 5) are denoised: the engine reflect-pads them to one tile. Set
  ``min_side`` to fail implausibly small images instead. Images over ``max_pixels`` are failed.
* **Stale outputs.** When a file fails, an output left at its path by an earlier run is removed, so
  every image under ``OUTPUT`` has an ``ok``/``skipped`` row.

The model is resolved once on the driver and shipped to the actors, so every actor runs the very same
weights even if an MLflow alias moves while the job runs. One MLflow run per job records the config,
counts, throughput and the manifest (see :func:`log_job_to_mlflow`).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from semray import __version__
from semray.batchfile import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    FileOptions,
    InputFile,
    file_settings,
    lost_file_row,
    process_file,
    settings_sha256,
)
from semray.config.base import flatten
from semray.config.infer import InferConfig
from semray.infer import Denoiser
from semray.io import IMAGE_SUFFIXES, list_images, pixel_count

MANIFEST_FILE = "manifest.parquet"


class JobError(ValueError):
    """The job cannot start (bad INPUT/OUTPUT); the message says what to change."""


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: an actor exits hard (``os._exit``) when it reaches its ``nth`` file, once.

    The ``marker`` file records that the crash happened, so the restarted actor processes the file.
    """

    nth: int
    marker: str

    def maybe_crash(self, count: int) -> None:
        if count == self.nth and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"{socket.gethostname()}:{os.getpid()}\n")
            os._exit(17)


@dataclass
class PinnedModel:
    """A model resolved once on the driver and shipped to actors (what :class:`Denoiser` accepts)."""

    model: Any
    name: str
    version: str
    source: str


@dataclass
class JobSummary:
    """What a job did. ``manifest`` is the parquet path (``None`` for a single file to a file path)."""

    input: Path
    output: Path
    manifest: Path | None
    rows: pd.DataFrame
    counts: dict[str, int]
    megapixels: float
    wall_s: float
    throughput_mpix_s: float
    method: str
    model_name: str
    model_version: str
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return self.counts.get(STATUS_FAILED, 0)


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------


def lot_and_wafer(rel_path: str) -> tuple[str, str]:
    """``("LOT", "WAFER")`` from ``LOT/WAFER/.../image.tif``; ``""`` for levels that are missing."""
    parts = rel_path.split("/")
    return (parts[0] if len(parts) >= 2 else ""), (parts[1] if len(parts) >= 3 else "")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def plan_inputs(input_path: str | Path, output_path: str | Path) -> tuple[list[InputFile], bool]:
    """List the input files and their output paths.

    Args:
        input_path: an image file, or a folder searched recursively for ``.tif``/``.tiff``/``.png``.
        output_path: the output folder; for a file input also a file path with an image suffix.

    Returns:
        ``(files sorted by rel_path, single)``; ``single`` is true for a file input.

    Raises:
        JobError: INPUT missing, or OUTPUT equal to INPUT (that would overwrite the inputs).
    """
    src = Path(input_path).expanduser().resolve()
    dst = Path(output_path).expanduser().resolve()
    if not src.exists():
        raise JobError(f"{src}: no such file or folder")
    if src.is_file():
        out = dst if dst.suffix.lower() in IMAGE_SUFFIXES else dst / src.name
        if out == src:
            raise JobError(f"output {out} is the input file itself; refusing to overwrite it")
        return [InputFile(str(src), src.name, str(out))], True
    if dst == src:
        raise JobError(f"OUTPUT ({dst}) must differ from INPUT; refusing to overwrite the inputs")
    files = []
    for p in list_images(src):
        if _inside(p, dst):  # OUTPUT nested in INPUT: never treat our own outputs as inputs
            continue
        rel = p.relative_to(src).as_posix()
        lot, wafer = lot_and_wafer(rel)
        files.append(InputFile(str(p), rel, str(dst / rel), lot, wafer))
    return files, False


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by a job (one row per input file)."""
    return pq.read_table(path).to_pandas()


def previous_rows(output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of ``OUTPUT/manifest.parquet`` keyed by ``rel_path`` (empty when there is none or it is unreadable)."""
    path = Path(output_dir) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path)
    except Exception as e:  # a damaged manifest only costs the resume, never the job
        print(f"semray denoise: ignoring unreadable previous manifest {path}: {e}", file=sys.stderr)
        return {}
    return {r["rel_path"]: r for r in table.to_pylist()}


# --------------------------------------------------------------------------------------------------
# the actor pool
# --------------------------------------------------------------------------------------------------


class DenoiseActor:
    """Ray Data callable class: holds one :class:`Denoiser` (model loaded once per actor).

    Each input row holds one JSON-encoded ``{"item": InputFile, "prev": previous row | None}``; each
    output row one JSON-encoded manifest row (a single string column keeps the block schema fixed
    whatever the file's fate).
    """

    def __init__(
        self,
        cfg_json: str,
        model: list[Any],
        settings_sha: str,
        fault: FaultInjection | None = None,
    ) -> None:
        import ray
        from threadpoolctl import threadpool_limits

        model = model[0]
        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)

        cfg = InferConfig.model_validate_json(cfg_json)
        # An actor owns cpus_per_actor CPUs: BLAS/OpenMP pools beyond that would fight the other actors.
        threadpool_limits(limits=cfg.torch_threads())
        self.denoiser = Denoiser.from_config(engine_config(cfg), model=model, actor=True)
        self.options = FileOptions.from_config(cfg)
        self.settings_sha = settings_sha
        self.fault = fault
        self.count = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for payload in batch["item"]:
            self.count += 1
            if self.fault is not None:
                self.fault.maybe_crash(self.count)
            task = json.loads(payload)
            row = process_file(
                InputFile(**task["item"]), self.denoiser, self.options, task["prev"], self.settings_sha
            )
            rows.append(json.dumps(row))
        return {"row": np.array(rows, dtype=object)}


def _pool_size(cfg: InferConfig, n_files: int) -> int:
    import ray

    if cfg.num_actors:
        return max(1, min(cfg.num_actors, n_files))
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // cfg.cpus_per_actor)
    if cfg.gpus_per_actor > 0:
        n = min(n, int(res.get("GPU", 0) // cfg.gpus_per_actor))
    return max(1, min(n, n_files))


def _restart_args(cfg: InferConfig) -> dict[str, Any]:
    """Bounded actor restarts / task retries for ``map_batches``.

    Ray Data's default is to restart and retry forever, which turns a file that crashes its worker
    every time into a job that never ends. Ray 2.60 takes these as (deprecated) extra remote args and
    has no named parameter yet; if a later Ray drops ``**ray_remote_args`` the defaults apply.
    """
    import ray

    params = inspect.signature(ray.data.Dataset.map_batches).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {}
    return {"max_restarts": cfg.actor_max_restarts, "max_task_retries": cfg.task_max_retries}


def _ray_pass(
    items: list[InputFile],
    prev: dict[str, dict[str, Any]],
    cfg: InferConfig,
    pinned: PinnedModel | None,
    settings_sha: str,
    fault: FaultInjection | None,
    on_row: Callable[[dict[str, Any]], None],
) -> str | None:
    """Run ``items`` through a fresh actor pool; rows go to ``on_row``. Returns the error that ended the
    pass early (``None`` when it ran to the end); the caller reconciles what is missing."""
    import ray

    if not ray.is_initialized():  # RAY_ADDRESS (set inside `ray job submit`) attaches to a cluster
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.print_on_execution_start)
    # A block whose actor died past its retries is dropped, not fatal: reconciliation re-queues it.
    ctx.max_errored_blocks = -1
    ctx.enable_progress_bars = False  # our own bar counts files and megapixels
    ctx.print_on_execution_start = False
    try:
        payloads = [{"item": json.dumps({"item": asdict(i), "prev": prev.get(i.rel_path)})} for i in items]
        # One file per block: load balances across actors and an actor death costs one file's retry.
        ds = ray.data.from_items(payloads, override_num_blocks=min(len(payloads), 20_000))
        # The model goes to the object store once; the ref (held here until the pass ends) keeps it
        # alive for actor restarts, and every actor gets these exact weights.
        model_ref = ray.put(pinned) if pinned is not None else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(
                DenoiseActor,
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=_pool_size(cfg, len(items))),
                num_cpus=cfg.cpus_per_actor,
                num_gpus=cfg.gpus_per_actor or None,
                fn_constructor_kwargs={
                    "cfg_json": cfg.model_dump_json(),
                    "model": [model_ref],  # in a list so Ray passes the ref itself, resolved in the actor
                    "settings_sha": settings_sha,
                    "fault": fault,
                },
                **_restart_args(cfg),
            )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for s in batch["row"]:
                on_row(json.loads(s))
        return None
    except Exception as e:  # the pass broke off; whatever has no row is retried or reported
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


# --------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------


class _Progress:
    """Files done / total and MP/s on the terminal (:func:`semray.logs.progress_bar`), one manifest row at a time."""

    def __init__(self, total: int, enabled: bool) -> None:
        from semray.logs import progress_bar

        self.t0 = time.perf_counter()
        self.mpix = 0.0
        self.bar = progress_bar(total, "denoise", "file", disable=not enabled)

    def update(self, row: dict[str, Any]) -> None:
        if row["status"] == STATUS_OK:
            self.mpix += row["megapixels"] or 0.0
        rate = self.mpix / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.3g} MP/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def engine_config(cfg: InferConfig) -> InferConfig:
    """``cfg`` for building the job's :class:`Denoiser`: it keeps no bar rows, since the per-file work
    decides them page by page (:func:`semray.batchfile.bar_rows`) and feeds it only the rows above."""
    return cfg.model_copy(update={"keep_bottom_rows": 0})


def _pin_model(cfg: InferConfig, model: Any) -> tuple[Denoiser, PinnedModel | None]:
    """Resolve the model once on this process (on CPU, this process's thread count untouched)."""
    cfg = engine_config(cfg)
    local = cfg.model_copy(update={"device": "cpu", "channels_last": False, "threads": None})
    d = Denoiser.from_config(local, model)
    pinned = PinnedModel(d.net, d.name, d.version, d.source) if d.net is not None else None
    return d, pinned


def write_manifest(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write manifest rows (sorted by ``rel_path``) atomically as Parquet with :data:`MANIFEST_SCHEMA`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: r["rel_path"])
    table = pa.Table.from_pylist([{c: r.get(c) for c in MANIFEST_COLUMNS} for r in ordered], MANIFEST_SCHEMA)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _run_on_ray(
    items: list[InputFile],
    prev: dict[str, dict[str, Any]],
    cfg: InferConfig,
    denoiser: Denoiser,
    pinned: PinnedModel | None,
    settings_sha: str,
    fault: FaultInjection | None,
    rows: dict[str, dict[str, Any]],
    on_row: Callable[[dict[str, Any]], None],
) -> list[str]:
    """The main pass, one reconciliation pass for files with no row, then a ``failed`` row for each
    file still missing (its worker died on every attempt). Returns the errors that ended passes early."""
    errors: list[str] = []
    for attempt in range(2):
        todo = [i for i in items if i.rel_path not in rows]
        if not todo:
            break
        err = _ray_pass(todo, prev, cfg, pinned, settings_sha, fault if attempt == 0 else None, on_row)
        if err:
            errors.append(err)
    for item in items:
        if item.rel_path not in rows:
            reason = (
                f"WorkerDied: the worker process died on every attempt at this file (Ray restarts "
                f"{cfg.actor_max_restarts}, retries {cfg.task_max_retries}, plus one reconciliation "
                f"pass): {'; '.join(errors) or 'no result came back'}"
            )
            on_row(lost_file_row(item, denoiser, settings_sha, reason))
    return errors


def _run_local(
    items: list[InputFile],
    prev: dict[str, dict[str, Any]],
    cfg: InferConfig,
    model: Any,
    settings_sha: str,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """The in-process executor: the same :func:`process_file` the actors run, one file after another.
    torch keeps its own thread count here unless ``cfg.threads`` says otherwise."""
    denoiser = Denoiser.from_config(engine_config(cfg), model=model)
    options = FileOptions.from_config(cfg)
    for item in items:
        on_row(process_file(item, denoiser, options, prev.get(item.rel_path), settings_sha))


def _check_complete(rows: dict[str, dict[str, Any]], items: list[InputFile]) -> None:
    """The promise of the job: never more, never fewer manifest rows than input files."""
    expected = {i.rel_path for i in items}
    if set(rows) != expected:
        raise RuntimeError(
            f"manifest would have {len(rows)} rows for {len(expected)} input files "
            f"(missing {sorted(expected - set(rows))[:5]}, extra {sorted(set(rows) - expected)[:5]})"
        )


def choose_executor(cfg: InferConfig, items: list[InputFile], single: bool) -> str:
    """``"local"`` (this process) or ``"ray"`` (an actor pool) for a job over ``items``.

    ``executor="auto"`` runs in this process when the job's pixels (all pages, from the file headers)
    are at most ``local_max_megapixels``: below that Ray's start-up and actor spin-up cost more than
    the parallelism wins. A single file, ``num_actors=0`` or ``executor="local"`` always run here.
    Above the threshold the pool runs on the Ray this process is attached to (``RAY_ADDRESS`` or an
    initialised Ray), else on a local Ray it starts.
    """
    if single or cfg.num_actors == 0 or cfg.executor == "local":
        return "local"
    if cfg.executor == "ray":
        return "ray"
    budget = cfg.local_max_megapixels * 1e6
    total = 0
    for item in items:  # stops reading headers as soon as the job is known to be large
        total += pixel_count(item.path)
        if total > budget:
            return "ray"
    return "local"


def run_denoise_job(
    input_path: str | Path,
    output_path: str | Path,
    cfg: InferConfig | None = None,
    *,
    model: Any = None,
    progress: bool = True,
    fault: FaultInjection | None = None,
) -> JobSummary:
    """Denoise a file or a lot tree (see module docstring).

    Args:
        input_path: image file or folder (``<lot>/<wafer>/<image>``, any depth).
        output_path: output folder (mirrors INPUT and holds ``manifest.parquet``); for a file input it
            may also be the output file's path (then no manifest is written).
        cfg: inference and job settings (defaults: shipped model, one actor per CPU).
        model: a model object or spec overriding ``cfg.model`` (e.g. an ``nn.Module`` in benchmarks).
        progress: show a files/MP/s progress bar on stderr.
        fault: test hook that kills an actor once (see :class:`FaultInjection`).

    Returns:
        A :class:`JobSummary`; ``rows`` has exactly one row per input file.

    Raises:
        JobError: INPUT missing or OUTPUT == INPUT.
        semray.models.resolve.ModelNotFoundError: the model spec names no model.
    """
    cfg = cfg or InferConfig()
    items, single = plan_inputs(input_path, output_path)
    out_root = Path(output_path).expanduser().resolve()
    manifest_path = (
        None if (single and out_root.suffix.lower() in IMAGE_SUFFIXES) else out_root / MANIFEST_FILE
    )
    prev = {} if manifest_path is None else previous_rows(out_root)
    denoiser, pinned = _pin_model(cfg, model)
    settings_sha = settings_sha256(file_settings(denoiser, FileOptions.from_config(cfg)))
    rows: dict[str, dict[str, Any]] = {}
    bar = _Progress(len(items), progress)

    def on_row(row: dict[str, Any]) -> None:
        if row["rel_path"] not in rows:  # count each file once should a retry ever report it twice
            bar.update(row)
        rows[row["rel_path"]] = row

    t0 = time.perf_counter()
    executor = choose_executor(cfg, items, single)
    direct = executor == "local"
    pass_errors: list[str] = []
    if direct:
        _run_local(items, prev, cfg, pinned or model, settings_sha, on_row)
    elif items:
        pass_errors = _run_on_ray(items, prev, cfg, denoiser, pinned, settings_sha, fault, rows, on_row)
    wall = time.perf_counter() - t0
    bar.close()
    _check_complete(rows, items)
    if manifest_path is not None:
        write_manifest(rows.values(), manifest_path)
    df = pd.DataFrame(sorted(rows.values(), key=lambda r: r["rel_path"]), columns=list(MANIFEST_COLUMNS))
    counts = {s: int((df["status"] == s).sum()) for s in (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)}
    mpix = float(df.loc[df["status"] == STATUS_OK, "megapixels"].fillna(0).sum())
    summary = JobSummary(
        input=Path(input_path).expanduser().resolve(),
        output=out_root,
        manifest=manifest_path,
        rows=df,
        counts=counts,
        megapixels=mpix,
        wall_s=wall,
        throughput_mpix_s=mpix / wall if wall > 0 else 0.0,
        method=denoiser.method,
        model_name=denoiser.name,
        model_version=denoiser.version,
        extra={
            "model_source": denoiser.source,
            "pass_errors": pass_errors,
            "direct": direct,
            "executor": executor,
            "pages": int(df["pages"].fillna(0).sum()),
        },
    )
    track = cfg.track if cfg.track is not None else not single
    if track:
        summary.run_id = log_job_to_mlflow(summary, cfg)
    return summary


def log_job_to_mlflow(summary: JobSummary, cfg: InferConfig) -> str:
    """One MLflow run for the job: config and model as params, counts and throughput as metrics, the
    manifest as artifact. Uses semray's tracking store (``MLFLOW_TRACKING_URI`` when set)."""
    import mlflow

    from semray.tracking import get_or_create_experiment, log_params

    exp_id = get_or_create_experiment(cfg.experiment)
    params = flatten(cfg)
    params.update(
        input=str(summary.input),
        output=str(summary.output),
        model_name=summary.model_name,
        model_version=summary.model_version,
        model_source=summary.extra.get("model_source", ""),
        semray_version=__version__,
    )
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=f"denoise-{summary.input.name}",
        nested=mlflow.active_run() is not None,
    ) as run:
        mlflow.set_tags({"semray.job": "denoise", "semray.method": summary.method})
        log_params(params, run.info.run_id)
        mlflow.log_metrics(
            {
                "files_total": float(len(summary.rows)),
                "files_ok": float(summary.counts[STATUS_OK]),
                "files_failed": float(summary.counts[STATUS_FAILED]),
                "files_skipped": float(summary.counts[STATUS_SKIPPED]),
                "megapixels": summary.megapixels,
                "wall_s": summary.wall_s,
                "throughput_mpix_s": summary.throughput_mpix_s,
            }
        )
        if summary.manifest is not None:
            mlflow.log_artifact(str(summary.manifest))
        return run.info.run_id
