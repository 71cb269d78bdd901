"""``semray adapt``: one driver from a folder of the user's noisy images to an adapted, registered model
and a no-reference report (calibrate -> synthesise -> fine-tune -> choose -> register -> report; with
``user.proxy_rounds`` > 1, fine-tune -> choose is repeated on refined proxies: :mod:`semray.adapt.rounds`).

It only orchestrates: calibration is :mod:`semray.calibrate`, denoising :class:`semray.infer.Denoiser`,
synthetic patterns :func:`semray.data.synthesize_shards`, training :func:`semray.train.runner.train`
(the ``semray train --init`` path, on Ray Train), registration
:func:`semray.train.mlflow_log.log_final_model`. Everything is written into a staging folder next to
``out_dir`` and moved into place at the end, so a failed run leaves no half-written ``out_dir`` (and
its MLflow parent run is marked FAILED).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semray.adapt.inputs import (
    AdaptInputError,
    UserImage,
    average_frames,
    held_back_crops,
    noisy_records,
    read_inputs,
    split_tiles,
    user_records,
    write_user_shards,
)
from semray.adapt.rounds import Round
from semray.config.adapt import AdaptConfig, SelfSupSource, rounds_problem
from semray.config.base import ConfigError, dump_yaml, flatten
from semray.jsonsafe import json_safe

CALIB_DIR, MODEL_DIR, FIG_DIR, WORK_DIR = "calibration", "model", "figures", "work"


@dataclass
class AdaptResult:
    """Where everything went: ``out_dir`` (model/, report.html, report.json, figures/, calibration/)."""

    out_dir: Path
    model_dir: Path
    registry_uri: str | None
    parent_run_id: str
    child_run_id: str | None
    selection: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    alias_moved: bool | None = None  # False: registered, but the alias stayed (mlflow.alias_requires)

    def lines(self) -> str:
        return "\n".join(
            [
                self.verdict,
                f"  model:        {self.out_dir / MODEL_DIR}  ({self.registry_uri}"
                + (
                    "; alias not moved: the verdict is not 'better' (mlflow.alias_requires)"
                    if self.alias_moved is False
                    else ""
                )
                + ")",
                f"  report:       {self.out_dir / 'report.html'}",
                f"  MLflow:       parent run {self.parent_run_id}, training run {self.child_run_id}",
                f"  chosen epoch: {self.selection.get('chosen_epoch')} (best by synthetic-pair val_psnr: "
                f"{self.selection.get('best_synthetic_epoch')}, "
                f"{self.selection.get('gap_db_to_best_synthetic', float('nan')):.2f} dB above the chosen)",
                *(
                    f"  round {r['round']}:      proxies from {r['proxies_from']}; epochs {r['epochs']}, "
                    f"chose {r['chosen_epoch']}"
                    for r in (self.rounds if len(self.rounds) > 1 else [])
                ),
            ]
        )


@dataclass
class _Data:
    """The user's images as the run uses them: noisy inputs, clean proxies (the current round's), tiles,
    held-back crops, and without ``frames`` the init model's outputs (round 1's proxies)."""

    noisy: list[np.ndarray]
    proxies: list[np.ndarray]
    users: list[UserImage]
    tiles: list[Any]
    crops: np.ndarray
    crops2: np.ndarray | None = None
    shifts: list[list[float]] | None = None
    init_outputs: list[np.ndarray] | None = None

    @property
    def names(self) -> list[str]:
        """One name per input image (a page of a multipage file is ``file.tif[page k]``)."""
        return [u.name for u in self.users]


def _stage_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.adapt-partial-{os.getpid()}"


def _check_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise AdaptInputError(
            f"{out_dir}: output folder exists and is not empty (use --overwrite to replace it)"
        )


def run_adapt(
    inputs: Sequence[str | Path], out_dir: str | Path, cfg: AdaptConfig | None = None, overwrite: bool = False
) -> AdaptResult:
    """Adapt ``cfg.init`` to the noisy images under ``inputs``; write the model and report to ``out_dir``.

    Raises:
        AdaptInputError: unreadable / too small / mixed images (naming the files), calibration impossible
            on them, or an existing non-empty ``out_dir`` without ``overwrite``. Nothing is written then.
        ConfigError: ``user.proxy_rounds`` that cannot run (with ``frames``, or more rounds than epochs) in
            a config copied without validation.
    """
    cfg = cfg or AdaptConfig()
    if problem := rounds_problem(cfg):
        raise ConfigError(problem)
    out = Path(out_dir).expanduser().resolve()
    _check_out(out, overwrite)
    users = read_inputs(inputs, cfg.user.min_side_px, cfg.frames)
    stage = _stage_for(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    client, parent = _start_parent(cfg, users)
    try:
        result = _run(users, stage, cfg, client, parent)
        _publish(stage, out, cfg.keep_work)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        client.set_terminated(parent, status="FAILED")
        raise
    client.set_terminated(parent, status="FINISHED")
    result.out_dir, result.model_dir = out, out / MODEL_DIR
    return result


def _publish(stage: Path, out: Path, keep_work: bool) -> None:
    if not keep_work:
        shutil.rmtree(stage / WORK_DIR, ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage, out)


def _start_parent(cfg: AdaptConfig, users: Sequence[UserImage]) -> tuple[Any, str]:
    from mlflow import MlflowClient

    from semray.tracking import configure, get_or_create_experiment, log_params

    uri = configure()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = get_or_create_experiment(cfg.mlflow.experiment)
    name = "adapt-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run = client.create_run(exp, run_name=name, tags={"semray.kind": "adapt", "semray.init_model": cfg.init})
    rid = run.info.run_id
    log_params(flatten(cfg) | {"n_images": len(users)}, rid, client)
    client.log_text(rid, dump_yaml(cfg), "config/adapt.yaml")
    client.log_text(rid, "\n".join(u.name for u in users) + "\n", "inputs.txt")
    return client, rid


class _Clock:
    """Wall time of each phase (seconds), for the budget in docs/adapt.md."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.t, 2)
        self.t = now


def _run(users: Sequence[UserImage], stage: Path, cfg: AdaptConfig, client: Any, parent: str) -> AdaptResult:
    from semray.adapt.rounds import round_of
    from semray.adapt.select import combine

    (stage / "adapt.yaml").write_text(dump_yaml(cfg))
    clock = _Clock()
    calib = _calibrate(users, stage / CALIB_DIR, cfg)
    clock.lap("calibrate")
    data = _prepare_data(users, cfg)
    clock.lap("proxies")
    shards = _write_shards(data, calib, stage / WORK_DIR / "shards", cfg)
    clock.lap("shards")
    rounds = _train_rounds(cfg, calib, data, shards, stage, clock, (client, parent))
    selection = rounds[0].selection if len(rounds) == 1 else combine([r.selection for r in rounds])
    final = round_of(rounds, selection.chosen_epoch)
    card_extra = _card_extra(rounds, final, selection, calib, users)
    model_dir = _export_model(selection, stage / MODEL_DIR, card_extra)
    verdict = selection.comparison.verdict
    reg = _register(
        final.tcfg, final.trained.mlflow_run_id, model_dir, data.crops[:1, None], cfg, verdict, client
    )
    clock.lap("register")
    report = _report(cfg, calib, data, model_dir, (selection, rounds), reg, stage)
    clock.lap("report")
    (stage / "timings.json").write_text(
        json.dumps(clock.laps | {"total": sum(clock.laps.values())}, indent=2)
    )
    for sub in (CALIB_DIR, FIG_DIR):
        client.log_artifacts(parent, str(stage / sub), sub)
    for f in ("report.html", "report.json", "adapt.yaml", "timings.json"):
        client.log_artifact(parent, str(stage / f))
    _log_parent_summary(client, parent, report, final.trained.mlflow_run_id, reg)
    client.log_batch(parent, metrics=[_metric(f"time_{k}_s", v) for k, v in clock.laps.items()])
    return AdaptResult(
        stage, model_dir, reg.get("registry_uri"), parent, final.trained.mlflow_run_id,
        report["selection"], report["summary"], report["verdict"], clock.laps, report["rounds"],
        reg.get("alias_moved"),
    )  # fmt: skip


def _train_rounds(
    cfg: AdaptConfig,
    calib: Any,
    data: _Data,
    shards: tuple[Path, Path, SelfSupSource | None],
    stage: Path,
    clock: _Clock,
    mlflow: tuple[Any, str],
) -> list[Round]:
    """Fine-tune and choose a checkpoint, ``user.proxy_rounds`` times (:mod:`semray.adapt.rounds`).

    From round 2 on, the proxies are the previous round's choice's outputs (user shards ``user_r<k>``,
    the same tiles), training goes on from that choice, and the laps are ``proxies_r<k>``,
    ``shards_r<k>``, ``train_r<k>``, ``select_r<k>``. Every round's checkpoints are scored on the same
    crops against the same init-model scores (computed once)."""
    from semray.adapt.rounds import refine_proxies, round_candidates, round_config, round_epochs

    client, parent = mlflow
    user_dir, synth_dir, selfsup = shards
    done: list[Round] = []
    init_scores, offset = None, 0
    for k, epochs in enumerate(round_epochs(cfg.optim.epochs, cfg.user.proxy_rounds), start=1):
        sfx, init, source = ("" if k == 1 else f"_r{k}"), cfg.init, f"the init model ({cfg.init})"
        if done:
            prev = done[-1]
            init = str(prev.chosen_model_dir)
            source = f"round {prev.number}'s choice (epoch {prev.selection.chosen_epoch})"
            data.proxies = refine_proxies(init, data.noisy)
            clock.lap(f"proxies{sfx}")
            user_dir = stage / WORK_DIR / "shards" / f"user{sfx}"
            write_user_shards(user_records(data.proxies, data.users, data.tiles), user_dir)
            clock.lap(f"shards{sfx}")
        rcfg = round_config(cfg, k, epochs, init)
        trained, tcfg = _fine_tune(rcfg, calib, data, (user_dir, synth_dir, selfsup), stage, sfx)
        clock.lap(f"train{sfx}")
        if trained.mlflow_run_id:
            client.set_tag(trained.mlflow_run_id, "mlflow.parentRunId", parent)
            client.set_tag(trained.mlflow_run_id, "semray.adapt_round", str(k))
        sel = _choose(cfg, calib, data, round_candidates(trained.run_dir, offset), init_scores)
        for row in sel.rows:
            row["round"] = float(k)
        clock.lap(f"select{sfx}")
        done.append(Round(k, source, trained, tcfg, sel))
        init_scores, offset = sel.init_crop_scores, offset + epochs
    return done


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def _calibrate(users: Sequence[UserImage], out: Path, cfg: AdaptConfig) -> Any:
    """Fit the noise model (semray.calibrate's public API); its YAML, JSON and figure go to ``out``.

    ``run_calibration`` reads every page of each file (as :func:`read_inputs` does) and checks closure on
    the first four images (``result.closure``, :mod:`semray.calibrate.closure`): the report uses that.
    """
    from semray.calibrate import run_calibration

    out.mkdir(parents=True, exist_ok=True)
    files = list(dict.fromkeys(u.path for u in users))  # the pages of one file are read by its one entry
    try:
        return run_calibration(files, out / "noise.yaml")
    except ValueError as e:
        names = ", ".join(map(str, files))
        raise AdaptInputError(f"calibration failed on {names}: {e}") from e


def _prepare_data(users: Sequence[UserImage], cfg: AdaptConfig) -> _Data:
    if cfg.frames:
        frames, mean, shifts = average_frames([u.image for u in users], cfg.frames_max_shift_px)
        tiles = split_tiles([mean.shape], cfg.user.tile_px, cfg.user.val_fraction, cfg.seed)
        s = cfg.selection
        crops = held_back_crops([frames[0]], tiles, s.crop_px, s.max_crops)
        crops2 = held_back_crops([frames[1]], tiles, s.crop_px, s.max_crops)
        # one proxy (the mean) for all frames: its provenance is the first frame, the reference of registration
        return _Data(frames, [mean], list(users), tiles, crops, crops2, shifts)
    from semray.infer import Denoiser

    den = Denoiser(model=cfg.init, device="cpu")
    proxies = [den(u.image) for u in users]
    noisy = [u.image for u in users]
    tiles = split_tiles([p.shape for p in proxies], cfg.user.tile_px, cfg.user.val_fraction, cfg.seed)
    crops = held_back_crops(noisy, tiles, cfg.selection.crop_px, cfg.selection.max_crops)
    return _Data(noisy, proxies, list(users), tiles, crops, init_outputs=proxies)


def _write_shards(
    data: _Data, calib: Any, root: Path, cfg: AdaptConfig
) -> tuple[Path, Path, SelfSupSource | None]:
    """The user-content and synthetic shard folders, and with ``user.selfsup`` the self-supervised source
    of the noisy training tiles (its shards written too)."""
    from semray.config.base import load_config
    from semray.config.data import DatasetConfig
    from semray.data import synthesize_shards

    write_user_shards(user_records(data.proxies, data.users, data.tiles), root / "user")
    selfsup = _selfsup_source(cfg, calib, root / "user_noisy")
    if selfsup is not None:
        scans = [data.noisy] if cfg.frames else [[img] for img in data.noisy]
        pairs = selfsup.objective == "n2n"
        write_user_shards(
            noisy_records(scans, data.proxies, data.users, data.tiles, pairs), Path(selfsup.shards)
        )
    s = cfg.synthetic
    dcfg = load_config(
        DatasetConfig,
        {"seed": s.seed, "height": s.size_px, "width": s.size_px, "n_train": s.n_train, "n_val": s.n_val,
         "n_test": 0, "noise": calib.noise_config.model_dump(mode="json")},
    )  # fmt: skip
    synthesize_shards(dcfg, root / "synthetic", parallel=False, progress=False)
    return root / "user", root / "synthetic", selfsup


def _fine_tune(
    cfg: AdaptConfig,
    calib: Any,
    data: _Data,
    shards: tuple[Path, Path, SelfSupSource | None],
    stage: Path,
    suffix: str = "",
) -> tuple[Any, Any]:
    """Train on the mix of ``shards`` (user content, synthetic, optional self-supervised source); run
    ``adapt-train<suffix>``, its config in ``train<suffix>.yaml``."""
    from semray.config.adapt import build_train_config
    from semray.train.runner import train

    user, synth, selfsup = shards
    side = min([min(t.size_y, t.size_x) for t in data.tiles] + [cfg.synthetic.size_px])
    crop = max(16, min(cfg.optim.crop_px, side) // 8 * 8)
    tcfg = build_train_config(
        cfg, calib.noise_config, str(user), str(synth), str(stage / WORK_DIR / "train"),
        run_name=f"adapt-train{suffix.replace('_', '-')}", crop_px=crop, val_crop_px=max(16, min(128, side) // 8 * 8), selfsup=selfsup,
    )  # fmt: skip
    (stage / f"train{suffix}.yaml").write_text(dump_yaml(tcfg))
    return train(tcfg), tcfg


def _selfsup_source(cfg: AdaptConfig, calib: Any, folder: Path) -> SelfSupSource | None:
    """``user.selfsup`` resolved (None when off): ``auto`` is n2n with ``frames``, else structn2v with the
    blind segment of the checkpoint score (:func:`_half_length`), or n2v when no fast-axis correlation
    was detected (half-length 0)."""
    s = cfg.user.selfsup
    if not s.enabled:
        return None
    half = _half_length(cfg, calib)
    objective = s.objective
    if objective == "auto":
        objective = "n2n" if cfg.frames else ("structn2v" if half > 0 else "n2v")
    return SelfSupSource(str(folder), objective, max(1, half))


def _half_length(cfg: AdaptConfig, calib: Any) -> int:
    """structN2V blind segment: the configured one, else twice the fitted fast-axis correlation length."""
    if cfg.selection.half_length is not None:
        return cfg.selection.half_length
    corr = calib.estimates.get("fast_axis_noise_corr")
    length = calib.estimates.get("fast_axis_corr_length_px")
    if corr is None or not corr.detected or length is None or not math.isfinite(length.value):
        return 0
    return int(min(8, max(1, math.ceil(2 * length.value))))


def _choose(
    cfg: AdaptConfig, calib: Any, data: _Data, candidates: list[Any], init_scores: np.ndarray | None = None
) -> Any:
    """Per-crop scores of the init model (``init_scores`` when already computed) and every candidate;
    choose on half the crops, compare on the other half (:func:`semray.adapt.select.select`)."""
    from semray.adapt.select import make_masks, n2n_score, select, structn2v_score
    from semray.models.resolve import resolve_model

    if data.crops2 is not None:
        second = data.crops2

        def score(net: Any) -> np.ndarray:
            return n2n_score(net, data.crops, second)

        criterion = "n2n"
    else:
        s = cfg.selection
        masks = make_masks(data.crops, s.fraction, s.repeats, _half_length(cfg, calib), s.seed)

        def score(net: Any) -> np.ndarray:
            return structn2v_score(net, data.crops, masks)

        criterion = "structn2v"
    if init_scores is None:
        init_scores = score(resolve_model(cfg.init).model)
    return select(candidates, init_scores, score, criterion)


def _card_extra(
    rounds: Sequence[Round], final: Round, selection: Any, calib: Any, users: Sequence[UserImage]
) -> dict[str, Any]:
    """The adapt facts for the model card: the parent is round 1's init model (the one adapted), the data
    sources those of the round that trained the chosen checkpoint."""
    from semray.models.store import read_card

    def card(r: Round) -> dict[str, Any]:
        return read_card(r.trained.model_dir) if r.trained.model_dir else {}

    extra = {k: v for k, v in card(rounds[0]).items() if k == "parent"}
    extra.update({k: v for k, v in card(final).items() if k == "data_sources"})
    extra["adapt"] = {
        "selection": selection.as_dict(),
        "rounds": [r.as_dict() for r in rounds],
        "noise_config": calib.noise_config.model_dump(mode="json"),
        "images": [u.name for u in users],
    }
    return extra


def _export_model(selection: Any, out: Path, extra: dict[str, Any]) -> Path:
    """Copy the chosen checkpoint's model (safetensors + card) to ``out`` and add the adapt facts to its card."""
    from semray.models.store import CARD_FILE

    src = selection.model_dirs[selection.chosen_epoch]
    shutil.copytree(src, out)
    card = json.loads((out / CARD_FILE).read_text())
    card.update(json_safe(extra))  # NaN (e.g. an SE from one crop) is not JSON
    card["description"] = f"semray adapt: {card.get('description', '')} (chosen without clean images)"
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return out


def alias_allowed(verdict: str, requires: str) -> bool:
    """Whether the registered alias may move to the adapted model: always with ``requires='any'``, else
    only on the no-reference verdict ``'better'`` (not on level, worse or undetermined)."""
    return requires == "any" or verdict == "better"


def _register(
    tcfg: Any,
    run_id: str | None,
    model_dir: Path,
    example: np.ndarray,
    cfg: AdaptConfig,
    verdict: str,
    client: Any,
) -> dict[str, Any]:
    """Log the chosen model to the training (child) run and register it under ``cfg.mlflow``; its alias is
    set only when :func:`alias_allowed` (the version is tagged ``semray.verdict`` either way)."""
    if run_id is None:
        return {"registry_uri": None}
    from semray.train.mlflow_log import log_final_model

    reg_cfg = tcfg.model_copy(deep=True)
    reg_cfg.mlflow.register_model = True
    reg_cfg.mlflow.registered_model = cfg.mlflow.registered_model
    moved = alias_allowed(verdict, cfg.mlflow.alias_requires)
    reg_cfg.mlflow.alias = cfg.mlflow.alias if moved else None
    reg = log_final_model(reg_cfg, run_id, model_dir, example.astype(np.float32))
    if reg.name and reg.version:
        client.set_model_version_tag(reg.name, str(reg.version), "semray.verdict", verdict)
    alias_uri = f"models:/{reg.name}@{reg.alias}" if reg.alias else reg.registry_uri
    return {
        "registry_uri": alias_uri, "version": reg.version, "model_uri": reg.model_uri, "name": reg.name,
        "alias_moved": moved, "alias": cfg.mlflow.alias,
    }  # fmt: skip


def _report(
    cfg: AdaptConfig,
    calib: Any,
    data: _Data,
    model_dir: Path,
    choice: tuple[Any, Sequence[Round]],
    reg: dict[str, Any],
    stage: Path,
) -> dict[str, Any]:
    """Shipped vs adapted on the user's images without clean references: report.json, report.html, figures/.

    ``choice`` is the final selection (among every round's checkpoints) and the rounds.

    The closure section is the calibration's own (``calib.closure``, :mod:`semray.calibrate.closure`:
    real images and look-alikes synthesised from the fit, measured alike on flat patches).
    """
    from semray.adapt import report as rp
    from semray.calibrate.closure import closure_warnings

    selection, rounds = choice
    per_image, shown = _per_image_stats(cfg, data, model_dir)
    summary = rp.summarise(per_image)
    sel = selection.as_dict()
    figs = stage / FIG_DIR
    figs.mkdir(parents=True, exist_ok=True)
    noise_acf = _fitted_noise_acf(calib, data, cfg)
    figures = {
        "side-by-side crops": _crops_figure(shown, cfg.report.crop_px, figs / "crops.png"),
        "residual autocorrelation": rp.acf_figure(summary, noise_acf, figs / "residual_acf.png"),
        "checkpoint choice": rp.selection_figure(sel, figs / "selection.png"),
    }
    calib_png = stage / CALIB_DIR / "noise.png"
    if calib_png.is_file():
        figures["calibration closure (real vs synthetic from the fit)"] = calib_png
    report = {
        "images": data.names[: len(per_image)],
        "per_image": per_image,
        "summary": summary,
        "selection": sel,
        "rounds": [r.as_dict() for r in rounds],
        "verdict": _verdict(selection),
        "closure": dict(calib.closure),
        "closure_warnings": closure_warnings(calib.closure),
        "calibration_summary": _calibration_summary(calib),
        "model": {k: reg.get(k) for k in ("registry_uri", "version", "alias", "alias_moved")}
        | {"dir": MODEL_DIR},
        "frames": {"n": len(data.noisy), "shifts": data.shifts} if data.shifts is not None else None,
    }
    (stage / "report.json").write_text(json.dumps(json_safe(report), indent=2))
    rp.write_html(
        report, {k: str(Path(v).relative_to(stage)) for k, v in figures.items()}, stage / "report.html"
    )
    return report


def _fitted_noise_acf(calib: Any, data: _Data, cfg: AdaptConfig) -> dict[str, list[float]]:
    """Autocorrelation of the fitted noise alone (synthesised on the first proxy, minus the proxy), at lags
    1..``report.max_lag``, measured like the models' residuals: what a denoiser that removes exactly the
    fitted noise would leave. A reference for the residual figure, not a closure (that is the calibration's)."""
    from semray.adapt import report as rp
    from semray.noise import synthesize

    proxy = data.proxies[0]
    synth, _ = synthesize(proxy, calib.noise_config, np.random.default_rng([cfg.seed, 5]))
    return rp.residual_acf(np.asarray(synth, np.float64) - proxy, cfg.report.max_lag)


def _per_image_stats(
    cfg: AdaptConfig, data: _Data, model_dir: Path
) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, ...]]]:
    """Denoise the first ``report.max_images`` inputs with both models: statistics, and crops of three."""
    from semray.adapt import report as rp
    from semray.infer import Denoiser

    shipped = Denoiser(model=cfg.init, device="cpu")
    adapted = Denoiser(model=str(model_dir), device="cpu")
    rows, shown = [], []
    for i, noisy in enumerate(data.noisy[: cfg.report.max_images]):
        # without --frames round 1's proxies *are* the shipped model's outputs: no need to denoise again
        d_s = shipped(noisy) if data.init_outputs is None else data.init_outputs[i]
        d_a = adapted(noisy)
        rows.append(
            {
                "image": data.names[min(i, len(data.names) - 1)],
                "noise_sigma_input": rp.noise_sigma(noisy),
                "shipped": rp.image_stats(noisy, d_s, cfg.report.max_lag),
                "adapted": rp.image_stats(noisy, d_a, cfg.report.max_lag),
            }
        )
        if len(shown) < 3:
            shown.append((noisy, d_s, d_a))
    return rows, shown


def _crops_figure(shown: Sequence[tuple[np.ndarray, ...]], crop_px: int, out_png: Path) -> Path:
    from semray.figures import image_grid

    rows = []
    for noisy, d_s, d_a in shown:
        h, w = noisy.shape
        s = min(crop_px, h, w)
        y, x = (h - s) // 2, (w - s) // 2
        c = [a[y : y + s, x : x + s] for a in (noisy, d_s, d_a)]
        rows.append([c[0], c[1], c[2], c[0] - c[1], c[0] - c[2]])
    cols = ["noisy", "shipped", "adapted", "noisy - shipped", "noisy - adapted"]
    cmaps = ["gray", "gray", "gray", "RdBu", "RdBu"]
    return image_grid(rows, cols, out_png, title="centre crops: shipped vs adapted", cmaps=cmaps)


def _calibration_summary(calib: Any) -> dict[str, Any]:
    """The headline estimates and the calibration's warnings (its closure is the report's ``closure``)."""
    keep = ("dose_e_per_px", "read_noise_sigma", "scan_line_offset_sigma", "fast_axis_noise_corr",
            "slow_axis_noise_corr", "line_jitter_px")  # fmt: skip
    est = {
        k: {"value": v.value, "stderr": v.stderr, "detected": v.detected}
        for k, v in calib.estimates.items()
        if k in keep
    }
    return {"estimates": est, "warnings": list(calib.warnings)}


def _verdict(selection: Any) -> str:
    """One sentence: better / level / worse from the paired comparison, with the difference and its SE."""
    from semray.adapt.select import VERDICT_SE

    c = selection.comparison
    rel = c.improvement / c.init_score if c.init_score else float("nan")
    lo, hi = c.improvement - VERDICT_SE * c.se, c.improvement + VERDICT_SE * c.se
    crops = (
        f"{c.n_crops} held-back crops not used to choose the epoch"
        if c.independent
        else f"the same {c.n_crops} held-back crop(s) that chose the epoch (too few to split; biased in the "
        "adapted model's favour)"
    )
    numbers = (
        f"{selection.criterion} score {c.chosen_score:.5g} vs {c.init_score:.5g} for the init model, "
        f"improvement {c.improvement:.3g} +- {c.se:.2g} (SE; {100 * rel:+.1f} % of the init score; "
        f"+-{VERDICT_SE:g} SE: [{lo:.3g}, {hi:.3g}]) on {crops}"
    )
    if c.verdict == "better":
        return f"adapted model estimated better on your images: {numbers}"
    if c.verdict == "level":
        return (
            f"adapted and init model level (within noise): {numbers}; no measurable gain, so keep the init "
            "model for these images"
        )
    if c.verdict == "worse":
        return f"adapted model estimated WORSE than the init model: {numbers}; keep the init model for these images"
    return f"cannot tell whether adaptation helped (no standard error from {c.n_crops} crop): {numbers}"


def _log_parent_summary(
    client: Any, parent: str, report: dict[str, Any], child: str | None, reg: dict[str, Any]
) -> None:
    s, sel = report["summary"], report["selection"]
    metrics = {
        "noise_sigma_input": s["noise_sigma_input"],
        "selfsup_score_init": sel["init_score"],
        "selfsup_score_adapted": sel["chosen_score"],
        "chosen_epoch": sel["chosen_epoch"],
        "gap_db_to_best_synthetic": sel["gap_db_to_best_synthetic"],
        "selfsup_improvement": sel["comparison"]["improvement"],
        "selfsup_improvement_se": sel["comparison"]["improvement_se"],
    }
    for m in ("shipped", "adapted"):
        metrics[f"noise_sigma_left_{m}"] = s[m]["noise_sigma_left"]
        metrics[f"signal_leak_{m}"] = s[m]["signal_leak"]
    for k, v in metrics.items():
        if v is not None and math.isfinite(float(v)):
            client.log_metric(parent, k, float(v))
    for r in report["rounds"]:
        for key in ("chosen_epoch", "chosen_score"):
            if r[key] is not None and math.isfinite(float(r[key])):
                client.log_metric(parent, f"round_{key}", float(r[key]), step=r["round"])
    client.set_tag(parent, "semray.child_run_id", child or "")
    client.set_tag(parent, "semray.verdict", sel["comparison"]["verdict"])
    client.set_tag(parent, "semray.registered_model", reg.get("registry_uri") or "")
