"""'Another microscope' benchmark of ``semray adapt`` (issue 20): domains the shipped model never saw,
and how close each way of adapting to them gets to an oracle trained on the domain's clean pairs.

Domains (benchmarks/adapt_domains.py, where each is documented against the shipped model's training
noise): ``gauss_ar1`` (Gaussian sigma 0.1, AR(1) along x 0.5), ``lowdose`` (Poisson SEs at 2 and 5
e-/px, exponential gain spread, gamma-0.6 response, black-level offset, AR(1) 0.4, 8 bit) and
``diag_ar1`` (semray patterns rotated 20-70 degrees, Gaussian sigma 0.08, AR(1) 0.7). Every level of a
domain (a dose of ``lowdose``) is a data set of its own: the methods are fitted on it and scored on it.

Methods, each starting from the shipped model with the same fine-tune budget (AdaptConfig.optim:
epochs, steps per epoch, crop, batch, learning rate; BatchNorm frozen):

* ``shipped``: the shipped model, zero-shot.
* ``adapted``: ``semray adapt`` (semray.adapt.run_adapt) on the ``--n-adapt`` noisy images only.
* ``adapted_frames``: ``semray adapt --frames`` on ``--n-frames`` independent scans of ONE field (the
  first adapt field: --frames takes repeated scans of one field, not pairs of many fields). The scans
  are exact (unshifted); its registration still runs and its shifts are recorded.
* ``oracle``: a supervised fine-tune on the domain's true (noisy, clean) pairs of the same ``--n-adapt``
  fields: semray.train.runner.train (the ``semray train --init default`` path) on one ``noise: as_is``
  shard source, the same TrainConfig as the adapt fine-tune otherwise (semray.config.adapt.
  build_train_config), tiles split as adapt splits them, the best epoch by PSNR on the held-out pair
  tiles, and the shipped model kept if no epoch beats it there. It is a same-budget CARE-style
  fine-tune, not a CARE network trained to convergence from scratch (hours on this CPU).
* ``care_scratch`` (extra, not the oracle; only when asked for): configs/care_l1.yaml's network and L1
  loss trained from scratch on the same pairs with the same step budget (its recipe's lr, 2e-3).

Scored on ``--n-test`` held-out fields (content seed 2; adapt fields seed 1): PSNR, SSIM and
defect-region PSNR against the truth, per image, and paired differences (adapted - oracle, shipped -
oracle, adapted - shipped, ...) with percentile bootstrap 95 % CIs over test images.

    python benchmarks/adapt.py --out /tmp/adapt_bench --size 512 --n-adapt 4 --n-test 8 \\
        --set optim.epochs=2 --set optim.steps_per_epoch=16

``--out`` gets result.json (every per-image value, settings, wall times per phase, the adapt verdicts)
and table.md (the Markdown for benchmarks/results/adapt.md). Adapted models are registered under
``semray-bench-adapted`` (MLflow experiment ``semray-bench-adapt``) unless ``--set`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below

import adapt_domains as dom
import adapt_stats as st
from adapt_domains import ar1_rows, write_pngs  # noqa: F401  (tests/test_adapt.py uses them)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("shipped", "adapted", "adapted_frames", "oracle")
EXTRA_METHODS = ("care_scratch",)
BENCH_MLFLOW = ["mlflow.experiment=semray-bench-adapt", "mlflow.registered_model=semray-bench-adapted"]
ADAPT_SEED, TEST_SEED = 1, 2
PAIRS = "pairs"


@dataclass
class DataSet:
    """One (domain, level): adapt fields (noisy scan 0 + truth), frames of field 0, test fields."""

    domain: dom.Domain
    level: float
    adapt_fields: list[dom.FieldContent]
    adapt_noisy: list[np.ndarray]
    adapt_truth: list[np.ndarray]
    frames: list[np.ndarray]
    test_fields: list[dom.FieldContent]
    test_noisy: list[np.ndarray]
    test_truth: list[np.ndarray]
    work: Path


def build_dataset(domain: dom.Domain, level: float, a: argparse.Namespace, work: Path) -> DataSet:
    """Render the fields and scan them (see adapt_domains for seeds); float32 (size, size) images."""
    adapt = dom.render_fields(a.n_adapt, a.size, ADAPT_SEED, domain.rotated)
    test = dom.render_fields(a.n_test, a.size, TEST_SEED, domain.rotated)
    frames = [dom.scans(domain, adapt[:1], level, ADAPT_SEED, scan=k)[0] for k in range(a.n_frames)]
    return DataSet(
        domain, level, adapt, dom.scans(domain, adapt, level, ADAPT_SEED),
        [domain.truth(f.content, level) for f in adapt], frames, test,
        dom.scans(domain, test, level, TEST_SEED), [domain.truth(f.content, level) for f in test], work,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Methods: each returns (model spec for semray.infer.Denoiser, facts for result.json)
# --------------------------------------------------------------------------------------------------


def fit_shipped(ds: DataSet, cfg: Any) -> tuple[str, dict[str, Any]]:
    """Nothing to fit: the init model (``cfg.init``, the shipped one) as it is."""
    return cfg.init, {}


def _adapt(inputs: list[Path], out: Path, cfg: Any) -> tuple[str, dict[str, Any]]:
    """``semray adapt`` on the image files; its verdict, choice, phase times and calibration for the record."""
    from semray.adapt import run_adapt

    res = run_adapt(inputs, out, cfg, overwrite=True)
    report = json.loads((res.out_dir / "report.json").read_text())
    info = {"verdict": res.verdict, "selection": res.selection, "timings_s": res.timings,
            "summary": res.summary, "frames": report.get("frames"), "rounds": report.get("rounds"),
            "calibration": report.get("calibration_summary", {}).get("estimates")}  # fmt: skip
    return str(res.model_dir), info


def fit_adapted(ds: DataSet, cfg: Any) -> tuple[str, dict[str, Any]]:
    """``semray adapt`` on the noisy adapt fields (one scan each), as files of the domain's dtype."""
    inputs = write_pngs(ds.adapt_noisy, ds.work / "inputs_noisy", ds.domain.file_dtype)
    return _adapt(inputs, ds.work / "adapted", cfg)


def fit_adapted_frames(ds: DataSet, cfg: Any) -> tuple[str, dict[str, Any]]:
    """``semray adapt --frames`` on the exact scans of the first adapt field (one proxy round: the proxy is
    the scans' average, so ``--set user.proxy_rounds=R`` applies to ``adapted`` only)."""
    inputs = write_pngs(ds.frames, ds.work / "inputs_frames", ds.domain.file_dtype)
    user = cfg.user.model_copy(update={"proxy_rounds": 1})
    return _adapt(inputs, ds.work / "adapted_frames", cfg.model_copy(update={"frames": True, "user": user}))


def pair_rows(ds: DataSet, tiles: Sequence[Any]) -> list[dict[str, Any]]:
    """Shard rows (semray.io schema) of every tile of the adapt fields: scan 0 as ``noisy``, the truth as
    ``clean``, the defect mask (known)."""
    from scipy.ndimage import label

    rows = []
    for t in tiles:
        f = ds.adapt_fields[t.index]
        mask = t.of(f.defect_mask)
        n_defects = int(label(mask)[1])
        rows.append(
            {"image_id": f"{PAIRS}/{t.index:04d}/y{t.y}x{t.x}", "split": t.split, "pattern": f.pattern,
             "clean": np.ascontiguousarray(t.of(ds.adapt_truth[t.index])),
             "noisy": np.ascontiguousarray(t.of(ds.adapt_noisy[t.index])),
             "defect_mask": np.ascontiguousarray(mask), "defect_mask_known": True,
             "n_defects": n_defects, "defect_types": "", "source": PAIRS, "crop_y": t.y, "crop_x": t.x}
        )  # fmt: skip
    return rows


def oracle_config(cfg: Any, shards: Path, storage: Path, side: int, scratch: bool) -> Any:
    """The adapt fine-tune's TrainConfig with one ``as_is`` source of true pairs, chosen by its val PSNR;
    with ``scratch``, configs/care_l1.yaml's network, loss and learning rate instead of the shipped model."""
    from semray.config.adapt import build_train_config
    from semray.config.base import load_config
    from semray.config.train import TrainConfig

    crop = max(16, min(cfg.optim.crop_px, side) // 8 * 8)
    base = build_train_config(cfg, None, str(shards), str(shards), str(storage), run_name="oracle",
                              crop_px=crop, val_crop_px=max(16, min(128, side) // 8 * 8))  # fmt: skip
    d = base.model_dump(mode="json")
    d["data"]["sources"] = [{"name": PAIRS, "shards": [str(shards)], "weight": 1.0, "noise": "as_is"}]
    d["data"]["shards"] = [str(shards)]
    d["validation"]["metric"] = f"val_psnr/{PAIRS}"
    del d[
        "model"
    ]  # a fine-tune takes the architecture from its init model (semray.train.runner.resolve_init)
    if scratch:
        care = load_config(TrainConfig, ROOT / "configs" / "care_l1.yaml")
        d["init"], d["run"]["name"] = None, "care_scratch"
        d["model"], d["loss"] = care.model.model_dump(mode="json"), care.loss.model_dump(mode="json")
        d["optim"].update(
            lr=care.optim.lr, schedule=care.optim.schedule, warmup_fraction=care.optim.warmup_fraction
        )
    return load_config(TrainConfig, d)


def _fit_pairs(ds: DataSet, cfg: Any, scratch: bool) -> tuple[str, dict[str, Any]]:
    """Tile the pairs as adapt tiles its inputs, write them as shards, train, keep the better of init/best."""
    from semray.adapt.inputs import split_tiles, write_user_shards
    from semray.train.runner import train

    name = "care_scratch" if scratch else "oracle"
    tiles = split_tiles([t.shape for t in ds.adapt_truth], cfg.user.tile_px, cfg.user.val_fraction, cfg.seed)
    shards = ds.work / name / "shards"
    write_user_shards(pair_rows(ds, tiles), shards)
    side = min(min(t.size_y, t.size_x) for t in tiles)
    res = train(oracle_config(cfg, shards, ds.work / name / "train", side, scratch))
    key = f"val_psnr/{PAIRS}"
    init_v, best_v = res.init_metrics.get(key), res.best_metrics.get(key)
    keep_init = not scratch and init_v is not None and best_v is not None and best_v < init_v
    info = {"val_psnr_init": init_v, "val_psnr_best": best_v, "best_epoch": res.best_epoch,
            "kept_init_model": keep_init, "n_tiles": len(tiles), "steps_per_worker": res.last_metrics.get("step")}  # fmt: skip
    return (cfg.init if keep_init else str(res.model_dir)), info


def fit_oracle(ds: DataSet, cfg: Any) -> tuple[str, dict[str, Any]]:
    """The supervised fine-tune of the shipped model on the true pairs (see :func:`oracle_config`)."""
    return _fit_pairs(ds, cfg, scratch=False)


def fit_care_scratch(ds: DataSet, cfg: Any) -> tuple[str, dict[str, Any]]:
    """configs/care_l1.yaml's network trained from scratch on the true pairs, same steps (extra row)."""
    return _fit_pairs(ds, cfg, scratch=True)


FITTERS: dict[str, Callable[[DataSet, Any], tuple[str, dict[str, Any]]]] = {
    "shipped": fit_shipped,
    "adapted": fit_adapted,
    "adapted_frames": fit_adapted_frames,
    "oracle": fit_oracle,
    "care_scratch": fit_care_scratch,
}


# --------------------------------------------------------------------------------------------------
# One data set, the whole run
# --------------------------------------------------------------------------------------------------


def run_dataset(ds: DataSet, methods: Sequence[str], cfg: Any, n_boot: int) -> dict[str, Any]:
    """Fit every method, denoise the test fields with each, score; wall times per phase (s)."""
    from semray.infer import Denoiser

    masks = [f.defect_mask for f in ds.test_fields]
    per_image = {"noisy": st.score_images(ds.test_truth, ds.test_noisy, masks)}
    wall: dict[str, float] = {}
    infos: dict[str, Any] = {}
    for m in methods:
        t0 = time.perf_counter()
        spec, infos[m] = FITTERS[m](ds, cfg)
        t1 = time.perf_counter()
        den = Denoiser(model=spec, device="cpu")
        outputs = [den(z) for z in ds.test_noisy]
        per_image[m] = st.score_images(ds.test_truth, outputs, masks)
        wall[f"fit_{m}"], wall[f"denoise_score_{m}"] = round(t1 - t0, 2), round(time.perf_counter() - t1, 2)
        infos[m]["model"] = spec
        print(f"  {ds.domain.name} @ {ds.level:g}: {m} PSNR {st.nanmean(per_image[m]['psnr']):.2f} dB "
              f"(fit {wall[f'fit_{m}']:.0f} s)", flush=True)  # fmt: skip
    return {
        "domain": ds.domain.name, "level": ds.level, "level_unit": ds.domain.level_unit,
        "patterns_adapt": [f.pattern for f in ds.adapt_fields], "patterns_test": [f.pattern for f in ds.test_fields],
        "per_image": per_image, "comparisons": st.comparisons(per_image, n_boot), "methods": infos, "wall_s": wall,
    }  # fmt: skip


def pin_steps(cfg: Any, n_adapt: int, size: int) -> tuple[Any, dict[str, Any]]:
    """The config with ``train.data.crops_per_image`` large enough that every method's fine-tune runs exactly
    ``optim.steps_per_epoch`` steps per epoch (unless ``--set train.data.crops_per_image=...`` says otherwise).

    A fine-tune's epoch is ``crops_per_image`` crops per training image of all its sources, capped by
    ``steps_per_epoch`` (semray.train.plan.epoch_steps); the sources differ (adapt: the user's tiles plus
    ``synthetic.n_train`` images; --frames: one field's tiles plus those; the oracle: the pair tiles
    only), so with adapt's 4 crops per image they would run different numbers of steps.
    """
    from semray.adapt.inputs import split_tiles
    from semray.config.adapt import AdaptConfig
    from semray.config.base import deep_merge, load_config

    o = cfg.optim
    tiles = split_tiles([(size, size)] * n_adapt, cfg.user.tile_px, cfg.user.val_fraction, cfg.seed)
    n_min = min(sum(t.split == "train" for t in tiles), cfg.synthetic.n_train + 1)
    k = -(-o.steps_per_epoch * o.batch_size * o.num_workers // n_min)
    if "crops_per_image" in cfg.train.get("data", {}):
        k = cfg.train["data"]["crops_per_image"]
    elif k > 256:
        raise SystemExit(f"cannot pin {o.steps_per_epoch} steps per epoch: {k} crops per image > 256")
    else:
        cfg = load_config(
            AdaptConfig, deep_merge(cfg.model_dump(mode="json"), {"train": {"data": {"crops_per_image": k}}})
        )
    return cfg, {"crops_per_image": k, "fewest_training_images": n_min, "steps_per_epoch": o.steps_per_epoch}


def _parse_levels(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    out = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in dom.DOMAINS:
            raise SystemExit(f"--levels {item!r}: expected DOMAIN=V1,V2 with DOMAIN in {list(dom.DOMAINS)}")
        out[name] = tuple(float(v) for v in values.split(","))
    return out


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--domains", default="gauss_ar1,lowdose", help=f"comma list of {list(dom.DOMAINS)}")
    ap.add_argument(
        "--levels",
        action="append",
        default=[],
        metavar="DOMAIN=V1,V2",
        help="levels of a domain instead of its defaults (lowdose: doses e-/px; others: sigma)",
    )
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma list of {[*METHODS, *EXTRA_METHODS]}"
    )
    ap.add_argument(
        "--n-adapt", type=int, default=4, help="noisy fields to adapt to (and the oracle's pairs)"
    )
    ap.add_argument(
        "--n-frames", type=int, default=None, help="scans of one field for --frames (default n-adapt)"
    )
    ap.add_argument("--n-test", type=int, default=8, help="held-out test fields")
    ap.add_argument("--size", type=int, default=512, help="image side (px)")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the paired CIs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="AdaptConfig override")
    a = ap.parse_args(argv)
    a.n_frames = a.n_frames or a.n_adapt
    a.domains = [d for d in a.domains.split(",") if d]
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [d for d in a.domains if d not in dom.DOMAINS] + [m for m in a.methods if m not in FITTERS]
    if bad or a.n_frames < 2 or min(a.n_adapt, a.n_test) < 1:
        ap.error(f"unknown domains/methods {bad}, or --n-frames < 2, or --n-adapt/--n-test < 1")
    a.level_map = _parse_levels(a.levels)
    return a


def main(argv: list[str] | None = None) -> int:
    from semray.config.adapt import AdaptConfig
    from semray.config.base import dump_yaml, load_config

    a = _args(argv)
    cfg, budget = pin_steps(load_config(AdaptConfig, None, [*BENCH_MLFLOW, *a.overrides]), a.n_adapt, a.size)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start, load0 = time.perf_counter(), os.getloadavg()
    datasets = []
    for name in a.domains:
        domain = dom.DOMAINS[name]
        for level in a.level_map.get(name, domain.levels):
            t0 = time.perf_counter()
            ds = build_dataset(domain, level, a, a.out / f"{name}_{level:g}")
            t_data = round(time.perf_counter() - t0, 2)
            datasets.append(run_dataset(ds, a.methods, cfg, a.n_boot))
            datasets[-1]["wall_s"]["data"] = t_data
    command = "python benchmarks/adapt.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command, "overrides": a.overrides, "adapt_config": dump_yaml(cfg), "budget": budget,
        "settings": {k: getattr(a, k) for k in ("domains", "methods", "n_adapt", "n_frames", "n_test", "size", "n_boot")},
        "levels": {d: list(a.level_map.get(d, dom.DOMAINS[d].levels)) for d in a.domains},
        "lowdose_constants": dom.LOWDOSE, "datasets": datasets,
        "total_wall_s": round(time.perf_counter() - t_start, 1), "load_average": {"start": load0, "end": os.getloadavg()},
    }  # fmt: skip
    (a.out / "result.json").write_text(json.dumps(st.finite(result), indent=2, default=str))
    table = f"    {command}\n\n{st.methods_table(datasets)}\n\n{st.deltas_table(datasets)}\n"
    (a.out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
