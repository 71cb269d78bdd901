"""The quickstart (``semray demo`` / ``make demo``): every stage of semray on a laptop, end to end.

Stages, each recorded in ``OUT/quickstart.json`` when it finishes:

1. ``shards``: synthesise a small wafer shard set (``OUT/shards``) and its preview figure.
2. ``search``: a small loss-weight search on Ray Tune (each trial a Ray Train run) that fine-tunes the
   shipped model (``tune.base.init``), one MLflow parent run with a child per trial. The shipped weights
   are scored on the trials' validation set first; the best trial is registered
   (``models:/NAME@tuned``) only if it beats them, otherwise the shipped weights are, and the demo
   says so (:func:`search_note`).
3. ``lot``: write a synthetic production lot of noisy 16-bit TIFFs (``OUT/lots/<lot>/<wafer>/*.tif``).
4. ``denoise``: the batch job (Ray Data actor pool) denoises the lot with the registered model into
   ``OUT/denoised`` with ``manifest.parquet`` (one row per input file).
5. ``evaluate``: the searched model vs the shipped model vs BM3D on the shard set's test split:
   ``OUT/evaluation/report.html``, tables and figures, one MLflow evaluation run. The report opens with
   the search's note and compares the searched model with the shipped one (paired, per dose).

A second run is cheap: a stage whose recorded outcome is still valid (files present, the registered
model version still in the MLflow store, the same settings) is reused, and the batch job's own
resume skips verified outputs. ``force=True`` redoes every stage.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semray import logs
from semray.config.base import dump_yaml
from semray.config.quickstart import LotSection, QuickstartConfig

STATE_FILE = "quickstart.json"


def _digest(obj: Any) -> str:
    """Stable short hash of a config (a pydantic model or JSON-able value)."""
    text = dump_yaml(obj) if hasattr(obj, "model_dump") else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class QuickstartResult:
    """Where the demo's outputs are.

    Attributes:
        out_dir: the demo folder.
        state: the per-stage record written to ``out_dir/quickstart.json``.
        reused: stages skipped because their recorded outcome was still valid.
        seconds: wall time per stage (0 for reused stages).
    """

    out_dir: Path
    state: dict[str, Any]
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def where_to_look(self, tracking_uri: str) -> str:
        """Human-readable lines: the files and the MLflow command a user opens next."""
        s = self.state
        lines = ["", "done. Look at:"]
        if "shards" in s:
            lines.append(f"  preview:     {s['shards']['preview']}")
        if "search" in s:
            lines.append(
                f"  search:      {s['search']['summary_md'] or s['search']['storage']}"
                f"  (best {s['search']['best_params']})"
            )
            lines.append(f"  model:       {s['search']['model_uri']}")
            if s["search"].get("note"):
                lines.append(f"               ({s['search']['note']})")
        if "denoise" in s:
            d = s["denoise"]
            lines.append(
                f"  manifest:    {d['manifest']}  ({d['ok']} ok, {d['failed']} failed, {d['skipped']} skipped)"
            )
        if "evaluate" in s:
            lines.append(f"  report:      {s['evaluate']['report']}")
        lines += [
            "  MLflow:      mlflow ui --backend-store-uri " + tracking_uri,
            "               (then open http://127.0.0.1:5000: experiment 'semray-quickstart')",
        ]
        return "\n".join(lines)


# -------------------------------------------------------------------------------------- the lot
def write_lot(lot: LotSection, root: str | Path) -> list[Path]:
    """Write the synthetic lot ``root/LOT##/W##/img###_dose<D>.tif`` (noisy, ``lot.bit_depth``-bit).

    Each image is a freshly rendered wafer field (any of the generator's patterns, defects included)
    with the generator's SEM noise at one of ``lot.doses_e_per_px``. Existing files are kept (so a
    rerun writes nothing); the file list is returned in order.
    """
    from semray.config.noise import NoiseConfig
    from semray.config.synth import SynthConfig
    from semray.io import ImageMeta, write_image
    from semray.noise import apply_noise, image_rng, sample_params
    from semray.synth import render_wafer, sample_pattern

    root = Path(root)
    noise, synth = NoiseConfig(), SynthConfig()
    dtype = "uint16" if lot.bit_depth == 16 else "uint8"
    paths: list[Path] = []
    k = 0
    for li in range(lot.lots):
        for wi in range(lot.wafers_per_lot):
            for ii in range(lot.images_per_wafer):
                dose = lot.doses_e_per_px[k % len(lot.doses_e_per_px)]
                k += 1
                path = root / f"LOT{li + 1:02d}" / f"W{wi + 1:02d}" / f"img{ii + 1:03d}_dose{dose:g}.tif"
                paths.append(path)
                if path.is_file():
                    continue
                rng = np.random.default_rng([lot.seed, li, wi, ii])
                sample = render_wafer(sample_pattern(rng, synth), (lot.size_px, lot.size_px), rng, synth)
                key = f"lot-{lot.seed}-{li}-{wi}-{ii}"
                params = sample_params(noise, image_rng(lot.seed, key)).replace(dose_e_per_px=float(dose))
                noisy = apply_noise(sample.clean, params, image_rng(lot.seed, key, 1))
                path.parent.mkdir(parents=True, exist_ok=True)
                meta = ImageMeta(dtype=dtype, shape=noisy.shape, format="tiff")
                write_image(path, noisy, meta)
    return paths


# -------------------------------------------------------------------------------------- stages
def _model_exists(uri: str) -> bool:
    """True if ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` is in the current MLflow registry."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name_ref = uri.removeprefix("models:/")
    try:
        client = MlflowClient()
        if "@" in name_ref:
            name, alias = name_ref.split("@", 1)
            client.get_model_version_by_alias(name, alias)
        else:
            name, version = name_ref.rsplit("/", 1)
            client.get_model_version(name, version)
        return True
    except MlflowException:
        return False


def _stage_shards(cfg: QuickstartConfig, out: Path) -> dict[str, Any]:
    from semray.data import synthesize_shards
    from semray.preview import write_preview

    summary = synthesize_shards(cfg.dataset, out / "shards")
    png = write_preview(cfg.dataset, out / "shards", out / "preview.png")
    return {
        "dir": str(summary.out_dir),
        "n_files": len(summary.shards),
        "counts": summary.counts,
        "preview": str(png),
    }


def tune_config(cfg: QuickstartConfig, out: Path, name: str | None = None) -> Any:
    """The search config with the demo's shards, storage folder and run ``name`` filled in."""
    t = cfg.tune.model_copy(deep=True)
    t.base.data.shards = [str(out / "shards")]
    t.base.data.generate = None
    t.run.storage_path = str(out / "tune")
    t.run.name = name or t.run.name
    return t


def search_note(selected: str, init: str | None, best_score: float | None, init_score: float | None) -> str:
    """What the registered model is, in one sentence for the output and the report ("" without init)."""
    if init is None or init_score is None:
        return ""
    what = "the shipped model" if init == "default" else f"the init model {init!r}"
    scores = f"validation score {best_score:.4g} for the best trial vs {init_score:.4g} for {what}"
    if selected == "init":
        return f"the search found no improvement over {what} ({scores}): the registered model holds its weights unchanged"
    return f"the search improved on {what} ({scores}): the registered model is the best trial"


def _stage_search(cfg: QuickstartConfig, out: Path, name: str) -> dict[str, Any]:
    from semray.tune import run_search, write_report

    # the run name carries the settings' digest: changed settings start a fresh search, while an
    # interrupted search with the same settings is resumed from Tune's state in OUT/tune/NAME
    t = tune_config(cfg, out, name)
    result = run_search(t)
    if not (result.registered_model and result.model_version):
        raise RuntimeError("the search registered no model (no trial reported a validation score)")
    files = write_report(result.trials, list(t.space), out / "search", title=f"search {result.name}")
    return {
        "name": result.name,
        "storage": f"{result.storage_path}/{result.name}",
        "summary_md": str(next(f for f in files if f.suffix == ".md")),
        "experiment_id": result.experiment_id,
        "parent_run_id": result.parent_run_id,
        "best_trial": result.best_trial,
        "best_score": result.best_score,
        "best_params": result.best_params,
        "init_score": result.init_score,
        "selected": result.selected,
        "note": search_note(result.selected, t.base.init, result.best_score, result.init_score),
        "n_trials": len(result.trials),
        "n_stopped_early": sum(1 for r in result.trials if r.get("stopped_early")),
        "model_uri": f"models:/{result.registered_model}/{result.model_version}",
        "alias_uri": (
            f"models:/{result.registered_model}@{result.model_alias}" if result.model_alias else None
        ),
    }


def _stage_lot(cfg: QuickstartConfig, out: Path) -> dict[str, Any]:
    paths = write_lot(cfg.lot, out / "lots")
    return {"dir": str(out / "lots"), "n_files": len(paths)}


def _stage_denoise(cfg: QuickstartConfig, out: Path, model_uri: str) -> dict[str, Any]:
    from semray.batch import run_denoise_job

    infer = cfg.denoise.model_copy(update={"model": cfg.denoise.model or model_uri})
    summary = run_denoise_job(out / "lots", out / "denoised", infer)
    counts = {k: int(summary.counts.get(k, 0)) for k in ("ok", "failed", "skipped")}
    return {
        "dir": str(summary.output),
        "manifest": str(summary.manifest),
        "model": f"{summary.model_name} v{summary.model_version}",
        "megapixels": round(summary.megapixels, 2),
        "throughput_mpix_s": round(summary.throughput_mpix_s, 3),
        "mlflow_run_id": summary.run_id,
        **counts,
    }


def evaluate_config(cfg: QuickstartConfig, out: Path, model_uri: str, note: str = "") -> Any:
    """The evaluation config on the demo's test split, with the searched model added to the methods and
    the search's ``note`` at the top of the report."""
    from semray.models.resolve import ModelNotFoundError, resolve_model

    e = cfg.evaluate.model_copy(deep=True)
    e.test_set.shards = str(out / "shards")
    models = [m for m in e.methods.models if m != model_uri]
    if "default" in models:
        try:
            resolve_model(None)
        except ModelNotFoundError:
            models.remove("default")  # a checkout without the shipped model: compare what there is
            if e.report.reference_method == "default":
                e.report.reference_method = e.methods.classical[0] if e.methods.classical else None
    e.methods.models = [model_uri, *models]
    e.report.notes = [*e.report.notes, *([f"**Searched model `{model_uri}`:** {note}."] if note else [])]
    e.out_dir = str(out / "evaluation")
    return e


def _stage_evaluate(cfg: QuickstartConfig, out: Path, model_uri: str, note: str) -> dict[str, Any]:
    from semray.evaluation import run_evaluation

    e = evaluate_config(cfg, out, model_uri, note)
    res = run_evaluation(e, e.out_dir)
    return {"dir": str(res.out_dir), "report": str(Path(res.out_dir) / "report.html"), "run_id": res.run_id}


class _Stages:
    """The demo's stage records (``quickstart.json``): a stage whose inputs' digest and outputs are
    unchanged is reused, any other is run under its own terminal bar and recorded atomically."""

    def __init__(self, state_path: Path, force: bool, log: Callable[[str], None]) -> None:
        self.path, self.log = state_path, log
        fresh = force or not state_path.is_file()
        self.state: dict[str, Any] = {} if fresh else json.loads(state_path.read_text())
        self.result = QuickstartResult(state_path.parent, self.state)

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        tmp.replace(self.path)

    def run(
        self,
        key: str,
        title: str,
        digest: str,
        valid: Callable[[dict[str, Any]], bool],
        fn: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        """Stage ``key``'s record: reused when its digest matches and ``valid(record)``, else ``fn()``'s."""
        rec = self.state.get(key)
        if rec is not None and rec.get("digest") == digest and valid(rec):
            self.log(f"{title}: done in an earlier run, reused (--force redoes it)")
            self.result.reused.append(key)
            self.result.seconds[key] = 0.0
            return rec
        t0 = time.perf_counter()
        with logs.stage(title):  # one terminal bar per stage
            rec = {**fn(), "digest": digest}
        self.result.seconds[key] = round(time.perf_counter() - t0, 1)
        rec["seconds"] = self.result.seconds[key]
        self.state[key] = rec
        self._save()
        return rec


def run_quickstart(
    cfg: QuickstartConfig, force: bool = False, log: Callable[[str], None] = logs.say
) -> QuickstartResult:
    """Run (or finish) the demo in ``cfg.out_dir``; see the module docstring.

    Needs a Ray instance (:func:`semray.tune.connect_ray` starts a local one sized for the search when
    none is running) and uses the current MLflow store (:func:`semray.tracking.configure`). Each stage
    shows one bar (:func:`semray.logs.stage`); ``log`` takes the other one-line messages (default
    :func:`semray.logs.say`, the terminal).
    """
    from semray.tracking import configure
    from semray.tune import connect_ray

    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out / STATE_FILE, force, log)
    stage, result = stages.run, stages.result

    uri = configure()
    log(f"MLflow store: {uri}")
    connect_ray(cfg.tune)

    d_shards = _digest(cfg.dataset)
    n_shards = lambda r: sum(1 for _ in (out / "shards").rglob("*.parquet")) == r["n_files"]  # noqa: E731
    stage(
        "shards",
        "[1/5] synthesising the wafer shard set",
        d_shards,
        lambda r: Path(r["preview"]).is_file() and n_shards(r),
        lambda: _stage_shards(cfg, out),
    )
    d_search = _digest([d_shards, _digest(tune_config(cfg, out))])
    name = cfg.tune.run.name or f"quickstart-{d_search[:8]}"
    search = stage(
        "search",
        f"[2/5] loss search from {cfg.tune.base.init or 'scratch'} ({cfg.tune.search.num_samples} trials) + registering",
        d_search,
        lambda r: _model_exists(r["model_uri"]),
        lambda: _stage_search(cfg, out, name),
    )
    model_uri = search["model_uri"]
    if search.get("note"):
        log(f"      {search['note']}")
    d_lot = _digest(cfg.lot)
    n_tifs = lambda r: sum(1 for _ in (out / "lots").rglob("*.tif")) == r["n_files"]  # noqa: E731
    stage("lot", "[3/5] writing a synthetic wafer lot", d_lot, n_tifs, lambda: _stage_lot(cfg, out))
    d_denoise = _digest([d_lot, model_uri, _digest(cfg.denoise)])
    stage(
        "denoise",
        f"[4/5] denoising the lot with {model_uri}",
        d_denoise,
        lambda r: Path(r["manifest"]).is_file(),
        lambda: _stage_denoise(cfg, out, model_uri),
    )
    d_eval = _digest([d_shards, model_uri, _digest(cfg.evaluate)])
    stage(
        "evaluate",
        "[5/5] evaluating the searched model vs the shipped model vs BM3D",
        d_eval,
        lambda r: Path(r["report"]).is_file(),
        lambda: _stage_evaluate(cfg, out, model_uri, search.get("note", "")),
    )
    return result
