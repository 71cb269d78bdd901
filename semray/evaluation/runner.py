"""Run an evaluation: every method x every metric x every noise level on a fixed test split.

:func:`run_evaluation` is the whole job (``semray evaluate``, ``jobs/evaluate.py``, the benchmark):

1. load the clean test images and build the noise conditions (:mod:`semray.evaluation.testset`);
2. for each noise draw (seed ``cfg.seed + k``, ``k < cfg.noise_draws``) and condition, make every
   image's noisy versions, run every method over them (classical ones as Ray tasks when ``parallel``),
   and score each output with :func:`semray.metrics.compute_metrics` (also as Ray tasks); compute the
   ideal observer's defect recall at each condition and level (:mod:`semray.evaluation.detectability`),
   pooled over the draws like the measured recall; with ``detection.enabled`` every method also denoises
   each defect image's defect-free reference render under the same draw, and both outputs are scored at
   every defect site, which gives the ROC, AUC and recall at fixed false-alarm rates
   (:mod:`semray.evaluation.detection`) and the ideal observer at those rates, analytic and Monte Carlo;
3. time every method on one common image (:func:`semray.evaluation.methods.seconds_per_megapixel`);
4. write ``results.parquet``/``.csv`` (one row per image x noise draw x method x condition x level), the
   summary and paired differences (pooled over image x draw), the runtime and recall-bound tables, the
   detection site table,
   figures and ``report.md``/``report.html`` into the output folder (runtime and the visual examples
   come from the first draw);
5. log all of it as one MLflow run.

Nothing in the results depends on scheduling or wall time: two runs with the same config give the same
``results.parquet``; runtimes live in their own table.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semray.config.base import ConfigError, dump_yaml, load_config
from semray.config.data import DatasetConfig
from semray.config.evaluate import EvaluateConfig
from semray.evaluation.detectability import (
    bound_at_false_alarms,
    detectability_table,
    dprime_sites,
    monte_carlo_sites,
)
from semray.evaluation.detectability import summarise as summarise_detectability
from semray.evaluation.detection import SITE_COLUMNS, detection_summary, site_rows
from semray.evaluation.figures import Example, plot_examples, plot_metrics_vs_level, plot_roc, plot_runtime
from semray.evaluation.methods import MethodRunner, build_runners, seconds_per_megapixel
from semray.evaluation.result import (
    BOUND_FILE,
    CONFIG_FILE,
    DELTAS_FILE,
    META_FILE,
    RESULTS_FILE,
    RUNTIME_FILE,
    SITES_FILE,
    SUMMARY_FILE,
    EvaluationResult,
    load_evaluation,
)
from semray.evaluation.stats import METRICS, paired_deltas, summarize
from semray.evaluation.testset import (
    DOSE_UNIT,
    MAIN_CONDITION,
    Condition,
    TestImage,
    build_conditions,
    generator_noise,
    load_test_set,
    make_noisy,
    make_target,
)


# ------------------------------------------------------------------------------------------ parallel map
def _use_ray(parallel: bool | None) -> bool:
    if parallel is False:
        return False
    import ray

    if parallel and not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray.is_initialized()


_metrics_task: Any = None


def _metrics_many(
    items: Sequence[tuple[Any, np.ndarray, Any, Any, np.ndarray | None]], use_ray: bool
) -> list[tuple[dict[str, float], np.ndarray]]:
    """:func:`semray.evaluation.detection.score_output` ``(clean, out, mask, reference, out_reference)``
    for every item, in order (Ray tasks if asked)."""
    from semray.evaluation.detection import score_output

    if not use_ray:
        return [score_output(*item) for item in items]
    import ray

    global _metrics_task
    if _metrics_task is None:
        _metrics_task = ray.remote(num_cpus=1)(score_output)
    return ray.get([_metrics_task.remote(*item) for item in items])


# ------------------------------------------------------------------------------------------- the loop
def _pick_examples(images: Sequence[TestImage], n: int) -> list[int]:
    """Up to ``n`` image indices: defective images of distinct patterns first, then any defective, then any."""
    chosen: list[int] = []
    seen: set[str] = set()
    for rule in ("new_pattern", "defect", "any"):
        for i, im in enumerate(images):
            if len(chosen) == n:
                return chosen
            if i in chosen:
                continue
            if rule == "new_pattern" and (im.n_defects == 0 or im.pattern in seen):
                continue
            if rule == "defect" and im.n_defects == 0:
                continue
            chosen.append(i)
            seen.add(im.pattern)
    return chosen


#: Columns of the results table besides the metrics of :func:`semray.metrics.compute_metrics`.
RESULT_COLUMNS = (
    "image_id", "noise_seed", "pattern", "n_defects", "condition", "noise_kind", "out_of_generator", "level",
    "level_unit", "dose_e_per_px", "method", "method_kind", "model_version", "oracle_sigma", "sigma_true",
    "sigma_estimated",
)  # fmt: skip


def _identity(x: Any) -> Any:
    return x


def evaluate_methods(
    images: Sequence[TestImage],
    conditions: Sequence[Condition],
    runners: Sequence[MethodRunner],
    seeds: Sequence[int],
    use_ray: bool = False,
    example_level: float | None = None,
    n_examples: int = 0,
    progress: bool = True,
    sites_out: list[dict[str, Any]] | None = None,
) -> tuple[pd.DataFrame, list[Example]]:
    """Score every runner on every image at every level of every condition, under each noise seed.

    Args:
        seeds: the noise seed of each draw (:func:`~semray.evaluation.testset.make_noisy`); the visual
            examples come from the first.
        sites_out: when given, detection is scored too: every runner also denoises the defect-free
            reference render of each image with defects under the same noise draw, the results gain
            ``defect_false_alarm`` (:func:`semray.metrics.defect_false_alarm`), and one row per defect
            site (:data:`semray.evaluation.detection.SITE_COLUMNS`) is appended to ``sites_out``.

    Returns:
        ``(results, examples)``: one row per noise seed x condition x level x image x method (in that
        order) with the :data:`RESULT_COLUMNS` (``noise_seed`` = the draw's seed, ``sigma_true`` = std of
        noisy - clean, ``sigma_estimated`` = the blind estimate on the noisy image, both [0, 1] units;
        neither is shown to a non-oracle method) and the metric columns; and the visual examples of the
        main condition at ``example_level``.
    """
    from semray.logs import progress_bar

    example_idx = _pick_examples(images, n_examples) if example_level is not None else []
    examples: dict[int, Example] = {}
    rows: list[dict[str, Any]] = []
    bar = progress_bar(
        len(seeds) * len(conditions) * len(runners), "evaluate", "method", disable=not progress
    )
    put: Callable[[Any], Any] = _identity
    if use_ray:
        import ray

        put = ray.put
    # (clean, defect_mask, reference) per image, shipped to the object store once for all metric tasks
    refs = [(put(im.clean), put(im.defect_mask), put(im.reference)) for im in images]
    for draw, seed in enumerate(seeds):
        for cond in conditions:
            first_main = draw == 0 and cond.name == MAIN_CONDITION
            shown = {(example_level, ii) for ii in example_idx} if first_main else set()
            inputs = _Inputs.make(images, refs, cond, seed, sites_out is not None, use_ray)
            for k in shown.intersection(inputs.cells):
                im, i = images[k[1]], inputs.cells.index(k)
                examples[k[1]] = Example(
                    im.image_id,
                    im.pattern,
                    k[0],
                    cond.level_unit,
                    inputs.targets[i],
                    inputs.noisy[i],
                    im.defect_mask,
                    {},
                )
            for runner in runners:
                bar.set_postfix_str(f"seed {seed}, {cond.name}: {runner.label}")
                rows += _score_runner(images, cond, runner, seed, inputs, use_ray, shown, examples, sites_out)
                bar.update(1)
    bar.close()
    return pd.DataFrame(rows), [examples[i] for i in example_idx if i in examples]


@dataclass
class _Inputs:
    """The noisy inputs of one condition under one noise seed.

    ``cells[k] = (level, image index)``; ``noisy[k]`` its noisy image, ``targets[k]`` the clean image on
    its scale and ``cell_refs[k]`` the (clean, defect_mask, reference) to score against
    (:func:`_cell_targets`), ``sigma_true[k]``/``sigma_est[k]`` its true and estimated noise std;
    ``ref_cells`` the cells whose image has a reference and defects (when detection is scored),
    ``noisy_ref``/``sigma_ref`` their defect-free reference under the same noise draw.
    """

    cells: list[tuple[float, int]]
    noisy: list[np.ndarray]
    targets: list[np.ndarray]
    cell_refs: list[tuple[Any, Any, Any]]
    sigma_true: list[float]
    sigma_est: list[float]
    ref_cells: list[int]
    noisy_ref: list[np.ndarray]
    sigma_ref: list[float]

    @classmethod
    def make(
        cls,
        images: Sequence[TestImage],
        refs: Sequence[tuple[Any, Any, Any]],
        cond: Condition,
        seed: int,
        detection: bool,
        use_ray: bool,
    ) -> _Inputs:
        from semray.classical import estimate_noise_sigma

        cells = [(lv, ii) for lv in cond.levels for ii in range(len(images))]
        noisy = [make_noisy(images[ii].clean, cond, lv, seed, images[ii].image_id) for lv, ii in cells]
        cell_refs, targets = _cell_targets(images, refs, cond, cells, seed, use_ray)
        sigma_true = [_std(n, t) for n, t in zip(noisy, targets, strict=True)]
        sigma_est = [estimate_noise_sigma(n) for n in noisy]
        ref_cells = [
            k
            for k, (_, ii) in enumerate(cells)
            if detection and images[ii].reference is not None and images[ii].defect_mask.any()
        ]
        noisy_ref, sigma_ref = [], []
        for k in ref_cells:  # the same noise key as the image's own: the same draw, without the defect
            lv, im = cells[k][0], images[cells[k][1]]
            assert im.reference is not None
            noisy_ref.append(make_noisy(im.reference, cond, lv, seed, im.image_id))
            sigma_ref.append(_std(noisy_ref[-1], make_target(im.reference, cond, lv, seed, im.image_id)))
        return cls(cells, noisy, targets, cell_refs, sigma_true, sigma_est, ref_cells, noisy_ref, sigma_ref)


def _std(noisy: np.ndarray, clean: np.ndarray) -> float:
    return float(np.std(noisy - clean.astype(np.float64)))


def _score_runner(
    images: Sequence[TestImage],
    cond: Condition,
    runner: MethodRunner,
    seed: int,
    inputs: _Inputs,
    use_ray: bool,
    shown: set[tuple[float | None, int]],
    examples: dict[int, Example],
    sites_out: list[dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    """The result rows of ``runner`` on every cell of ``inputs`` (condition ``cond``, noise ``seed``).

    Outputs are scored against ``inputs.cell_refs`` (object refs under Ray). The cells
    ``(level, image index)`` in ``shown`` get ``runner``'s output in ``examples``; detection site rows
    go to ``sites_out`` (when given).
    """
    outputs = runner.run_many(inputs.noisy, inputs.sigma_true)
    out_ref: dict[int, np.ndarray] = {}
    if inputs.ref_cells:
        out_ref = dict(
            zip(inputs.ref_cells, runner.run_many(inputs.noisy_ref, inputs.sigma_ref), strict=True)
        )
    scores = _metrics_many(
        [
            (c, out, m, r, out_ref.get(k))
            for k, (out, (c, m, r)) in enumerate(zip(outputs, inputs.cell_refs, strict=True))
        ],
        use_ray,
    )
    rows: list[dict[str, Any]] = []
    for k, ((lv, ii), out, (sc, sites)) in enumerate(zip(inputs.cells, outputs, scores, strict=True)):
        im = images[ii]
        facts = (
            im.image_id, seed, im.pattern, im.n_defects, cond.name, cond.kind, cond.out_of_generator,
            float(lv), cond.level_unit, float(lv) if cond.level_unit == DOSE_UNIT else float("nan"),
            runner.label, runner.kind, runner.version, bool(runner.oracle), inputs.sigma_true[k],
            inputs.sigma_est[k],
        )  # fmt: skip
        row = dict(zip(RESULT_COLUMNS, facts, strict=True))
        rows.append({**row, **{m: float(v) for m, v in sc.items()}})
        if sites_out is not None and k in out_ref:
            keep = {c: row[c] for c in ("condition", "level", "level_unit", "image_id", "noise_seed")}
            sites_out += site_rows({**keep, "method": runner.label, "method_kind": runner.kind}, *sites)
        if (lv, ii) in shown:
            examples[ii].outputs[runner.label] = out
    return rows


def _cell_targets(
    images: Sequence[TestImage],
    refs: Sequence[tuple[Any, Any, Any]],
    cond: Condition,
    cells: Sequence[tuple[float, int]],
    seed: int,
    use_ray: bool,
) -> tuple[list[tuple[Any, Any, Any]], list[np.ndarray]]:
    """Per cell ``(level, image index)``: the (clean, defect_mask, reference) refs to score against,
    and the clean target array, both on the scale of that cell's noisy image (:func:`make_target`).

    With the default ADC window these are the images' own (shared) refs; with ``headroom`` the clean
    image and the reference are rescaled per cell and shipped (under Ray) once each.
    """
    out_refs: list[tuple[Any, Any, Any]] = []
    targets: list[np.ndarray] = []
    for lv, ii in cells:
        im = images[ii]
        target = make_target(im.clean, cond, lv, seed, im.image_id)
        targets.append(target)
        if target is im.clean:
            out_refs.append(refs[ii])
            continue
        ref = None if im.reference is None else make_target(im.reference, cond, lv, seed, im.image_id)
        if use_ray:
            import ray

            out_refs.append((ray.put(target), refs[ii][1], None if ref is None else ray.put(ref)))
        else:
            out_refs.append((target, refs[ii][1], ref))
    return out_refs, targets


def measure_runtimes(
    runners: Sequence[MethodRunner], image: np.ndarray, repeats: int, threads: int, reference: str | None
) -> pd.DataFrame:
    """Seconds per megapixel of every non-oracle, non-noisy runner on ``image`` (same machine, same image)."""
    rows = []
    for r in runners:
        if r.kind == "noisy" or r.oracle:
            continue
        spm = seconds_per_megapixel(r, image, repeats=repeats, threads=threads)
        rows.append(
            {
                "method": r.label,
                "method_kind": r.kind,
                "seconds_per_megapixel": spm,
                "megapixels_per_second": 1.0 / spm,
                "image_px": f"{image.shape[0]}x{image.shape[1]}",
                "threads": threads,
                "repeats": repeats,
            }
        )
    df = pd.DataFrame(rows)
    if not df.empty and reference in set(df["method"]):
        ref_t = float(df.loc[df["method"] == reference, "seconds_per_megapixel"].iloc[0])
        df[f"speedup_vs_{reference}"] = ref_t / df["seconds_per_megapixel"]
    return df


def _timing_image(cfg: EvaluateConfig, main: Condition) -> np.ndarray:
    """A ``size_px`` square wafer render with the generator's noise at the middle dose (first draw's seed)."""
    from semray.data import render_record

    ds = cfg.test_set.dataset
    size = cfg.runtime.size_px
    tcfg = DatasetConfig(seed=ds.seed, height=size, width=size, n_train=0, n_val=0, n_test=1, synth=ds.synth)
    clean = render_record(tcfg, "test", 0)["clean"]
    dose = main.levels[(len(main.levels) - 1) // 2]
    return make_noisy(clean, main, dose, cfg.seed, "runtime-image")


def _example_level(cfg: EvaluateConfig) -> float:
    doses = cfg.doses_e_per_px
    level = cfg.report.example_level if cfg.report.example_level is not None else doses[(len(doses) - 1) // 2]
    if level not in doses:
        raise ConfigError(f"report.example_level {level} is not one of doses_e_per_px {doses}")
    return level


def _machine() -> dict[str, Any]:
    import torch

    from semray import __version__

    return {
        "semray_version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


# ------------------------------------------------------------------------------------------ the job
def run_evaluation(
    cfg: EvaluateConfig | str | Path,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log_mlflow: bool | None = None,
) -> EvaluationResult:
    """Run the evaluation ``cfg`` describes and write its output folder (see module docstring).

    Args:
        cfg: the config, or a path to its YAML.
        out_dir: output folder (default ``cfg.out_dir``); created, existing files overwritten.
        progress: show a progress bar.
        log_mlflow: log to MLflow (default ``cfg.mlflow.enabled``).

    Returns:
        The tables and the output folder; ``result.run_id`` is the MLflow run.
    """
    if not isinstance(cfg, EvaluateConfig):
        cfg = load_config(EvaluateConfig, cfg)
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    t_start = time.perf_counter()
    example_level = _example_level(cfg)
    use_ray = _use_ray(cfg.parallel)

    runners = build_runners(cfg.methods, use_ray=use_ray)  # first: a bad model spec fails before any work
    images = load_test_set(cfg.test_set)
    conditions = build_conditions(cfg, generator_noise(cfg))
    (out / "figures").mkdir(parents=True, exist_ok=True)
    seeds = cfg.noise_seeds()
    sites: list[dict[str, Any]] | None = [] if cfg.detection.enabled else None
    results, examples = evaluate_methods(
        images, conditions, runners, seeds, use_ray, example_level, cfg.report.n_examples, progress, sites
    )
    tables = _tables(cfg, results, images, conditions, runners, seeds)
    dsites = pd.DataFrame()
    if sites is not None:
        dsites = _add_detection(cfg, tables, pd.DataFrame(sites, columns=SITE_COLUMNS), images, conditions)
    _write_tables(cfg, out, tables)
    figures = _figures(cfg, out, tables, conditions, [r.label for r in runners], examples, example_level)
    if not dsites.empty:
        for cond in conditions:
            figures[f"roc_{cond.name}"] = plot_roc(
                tables["sites"], dsites, cond.name, [r.label for r in runners],
                out / "figures" / f"roc_{cond.name}.png", f"detection ROC, {_condition_title(cond)}", cfg.report.dpi,
            )  # fmt: skip
    meta = _meta(cfg, images, conditions, runners, use_ray, example_level)
    meta["evaluation_seconds"] = round(time.perf_counter() - t_start, 2)
    meta["mlflow"] = None
    result = EvaluationResult(out, meta=meta, **tables)

    from semray.evaluation.content import report_blocks
    from semray.evaluation.report import write_report

    def _write() -> None:
        (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        write_report(report_blocks(cfg, result, conditions, figures), out, "semray evaluation")

    if log_mlflow if log_mlflow is not None else cfg.mlflow.enabled:
        from semray.evaluation.tracking import log_evaluation

        log_evaluation(cfg, result, before_artifacts=_write)
    else:
        _write()
    return result


def _tables(
    cfg: EvaluateConfig,
    results: pd.DataFrame,
    images: Sequence[TestImage],
    conditions: Sequence[Condition],
    runners: Sequence[MethodRunner],
    seeds: Sequence[int],
) -> dict[str, pd.DataFrame]:
    """The summary, paired differences, recall bound and runtime of ``results`` (keyword arguments of
    :class:`EvaluationResult`)."""
    summary = summarize(results, ci=cfg.report.ci)
    ref = cfg.report.reference_method
    deltas = paired_deltas(results, ref, ci=cfg.report.ci) if ref else paired_deltas(results.iloc[:0], "")
    # every (image, draw) is one sample, as in the summary of the measured recall
    recall_bound = summarise_detectability(
        pd.concat([detectability_table(images, conditions, s) for s in seeds], ignore_index=True)
    )
    runtime = pd.DataFrame()
    if cfg.runtime.enabled:
        runtime = measure_runtimes(
            runners, _timing_image(cfg, conditions[0]), cfg.runtime.repeats, cfg.runtime.threads, ref
        )
    return {
        "results": results,
        "summary": summary,
        "deltas": deltas,
        "runtime": runtime,
        "recall_bound": recall_bound,
    }


def _add_detection(
    cfg: EvaluateConfig,
    tables: dict[str, pd.DataFrame],
    sites: pd.DataFrame,
    images: Sequence[TestImage],
    conditions: Sequence[Condition],
) -> pd.DataFrame:
    """Add detection at fixed false-alarm rates to the tables of :func:`_tables` (in place): summary rows
    (AUC, recall at each rate), the ideal observer at those rates in the recall bound (analytic at every
    level, Monte Carlo at physical doses up to ``detection.mc_max_dose``) and the site table.

    Returns:
        The ideal observer's ``d'`` per site (:func:`~semray.evaluation.detectability.dprime_sites`).
    """
    det, seeds = cfg.detection, cfg.noise_seeds()
    pooled = detection_summary(sites, det.false_alarms, cfg.report.ci, det.bootstrap)
    tables["summary"] = pd.concat([tables["summary"], pooled], ignore_index=True)
    dsites = pd.concat([dprime_sites(images, conditions, s) for s in seeds], ignore_index=True)
    mc_parts = [
        monte_carlo_sites(images, c, lv, s, det.mc_draws)
        for s in seeds
        for c in conditions
        if c.kind != "gaussian" and det.mc_draws > 0
        for lv in c.levels
        if lv <= det.mc_max_dose
    ]
    mc = (
        pd.concat(mc_parts, ignore_index=True)
        if mc_parts
        else pd.DataFrame(columns=[*SITE_COLUMNS, "mc_draw"])
    )
    if not dsites.empty:
        at_fa = bound_at_false_alarms(dsites, mc, det.false_alarms, cfg.report.ci, det.bootstrap)
        tables["recall_bound"] = tables["recall_bound"].merge(at_fa, on=["condition", "level"], how="left")
    tables["sites"] = pd.concat([sites.assign(mc_draw=-1), mc], ignore_index=True)
    return dsites


def _write_tables(cfg: EvaluateConfig, out: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Write the tables of :func:`_tables` and the config into ``out``."""
    tables["results"].to_parquet(out / RESULTS_FILE, index=False)
    tables["results"].to_csv(out / "results.csv", index=False)
    tables["summary"].to_csv(out / SUMMARY_FILE, index=False)
    tables["deltas"].to_csv(out / DELTAS_FILE, index=False)
    tables["runtime"].to_csv(out / RUNTIME_FILE, index=False)
    tables["recall_bound"].to_csv(out / BOUND_FILE, index=False)
    if "sites" in tables:
        tables["sites"].to_parquet(out / SITES_FILE, index=False)
    (out / CONFIG_FILE).write_text(dump_yaml(cfg))


def _figures(
    cfg: EvaluateConfig,
    out: Path,
    tables: dict[str, pd.DataFrame],
    conditions: Sequence[Condition],
    methods: Sequence[str],
    examples: Sequence[Example],
    example_level: float,
) -> dict[str, Path]:
    """Draw the figures into ``out/figures``: name -> PNG path (keys read by the report content)."""
    figures: dict[str, Path] = {}
    for cond in conditions:
        figures[f"curves_{cond.name}"] = plot_metrics_vs_level(
            tables["summary"],
            cond.name,
            methods,
            out / "figures" / f"metrics_vs_level_{cond.name}.png",
            title=_condition_title(cond),
            dpi=cfg.report.dpi,
            recall_bound=tables["recall_bound"],
        )
    if examples:
        figures["examples"] = plot_examples(
            examples,
            out / "figures" / f"examples_dose{example_level:g}.png",
            cfg.report.crop_px,
            cfg.report.dpi,
        )
    if not tables["runtime"].empty:
        figures["runtime"] = plot_runtime(tables["runtime"], out / "figures" / "runtime.png", cfg.report.dpi)
    return figures


def _meta(
    cfg: EvaluateConfig,
    images: Sequence[TestImage],
    conditions: Sequence[Condition],
    runners: Sequence[MethodRunner],
    use_ray: bool,
    example_level: float,
) -> dict[str, Any]:
    """The setup facts of ``evaluation.json`` (the caller adds the run time and the MLflow run)."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": _machine(),
        "seed": cfg.seed,
        "noise_draws": cfg.noise_draws,
        "noise_seeds": cfg.noise_seeds(),
        "test_set": _test_set_facts(cfg, images),
        "conditions": [
            {
                "name": c.name,
                "kind": c.kind,
                "levels": list(c.levels),
                "unit": c.level_unit,
                "out_of_generator": c.out_of_generator,
            }
            for c in conditions
        ],
        "methods": [
            {
                "label": r.label,
                "kind": r.kind,
                "version": r.version,
                "oracle_sigma": bool(r.oracle),
                "spec": getattr(r, "spec", None),
                "params": getattr(r, "params", None),
                "device": getattr(r, "device", "cpu"),
            }
            for r in runners
        ],
        "example_level": example_level,
        "parallel": use_ray,
    }


def _condition_title(cond: Condition) -> str:
    if cond.name == MAIN_CONDITION:
        return "generator SEM noise, by dose"
    return f"out-of-generator noise: {cond.name} ({cond.kind})"


def _test_set_facts(cfg: EvaluateConfig, images: Sequence[TestImage]) -> dict[str, Any]:
    shapes = sorted({f"{im.clean.shape[0]}x{im.clean.shape[1]}" for im in images})
    patterns: dict[str, int] = {}
    for im in images:
        patterns[im.pattern] = patterns.get(im.pattern, 0) + 1
    ts = cfg.test_set
    return {
        "source": f"shards {ts.shards}" if ts.shards else f"synthesised (dataset seed {ts.dataset.seed})",
        "split": ts.split,
        "n_images": len(images),
        "shapes": shapes,
        "patterns": patterns,
        "images_with_defects": sum(im.n_defects > 0 for im in images),
        "defects": int(sum(im.n_defects for im in images)),
        "with_reference": all(im.reference is not None for im in images),
    }


__all__ = [
    "METRICS",
    "EvaluationResult",
    "evaluate_methods",
    "load_evaluation",
    "measure_runtimes",
    "run_evaluation",
]
