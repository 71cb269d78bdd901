"""The fixed test images and the noise conditions they are evaluated under (pure numpy, no Ray).

Noise for image ``image_id`` under condition ``c`` at level ``l`` is a deterministic function of
``(seed, image_id, c, l)`` only (via :func:`semray.noise.image_rng`), so adding a method, a dose or an
image never changes the noise any other row saw, and two runs with the same seed see the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semray.config.base import ConfigError, load_config
from semray.config.data import DatasetConfig
from semray.config.evaluate import EvaluateConfig, TestSetConfig
from semray.config.noise import NoiseConfig, NoiseParams
from semray.data import render_record
from semray.io import list_shards, read_shard
from semray.noise import apply_noise, clean_target, image_rng, sample_params

#: Name of the main condition: the generator's own SEM noise model, swept over dose.
MAIN_CONDITION = "sem"
DOSE_UNIT = "e-/px"
STD_UNIT = "std"


@dataclass
class TestImage:
    """One clean test image and what the defect metrics need.

    Attributes:
        image_id: stable id (from the shard or :func:`semray.data.image_id`).
        pattern: pattern family ("lines", "contacts", ...).
        clean: float32 (H, W) in [0, 1].
        reference: float32 (H, W) in [0, 1], the defect-free render of the same field, or None.
        defect_mask: bool (H, W).
        n_defects: number of defects the generator placed (0 for defect-free images).
    """

    __test__ = False  # not a pytest class

    image_id: str
    pattern: str
    clean: np.ndarray
    reference: np.ndarray | None
    defect_mask: np.ndarray
    n_defects: int


@dataclass(frozen=True)
class Condition:
    """A noise family evaluated at several levels.

    Attributes:
        name: label ("sem" for the generator's model, else the robustness entry's name).
        kind: "sem" (physical model), "poisson" (shot noise only) or "gaussian".
        levels: sorted levels: doses in e-/px, or Gaussian std in [0, 1] units.
        noise: the physical noise config for kinds "sem"/"poisson" (dose replaced per level).
        out_of_generator: True for noise the training generator did not make.
    """

    name: str
    kind: str
    levels: tuple[float, ...]
    noise: NoiseConfig | None
    out_of_generator: bool

    @property
    def level_unit(self) -> str:
        """``"e-/px"`` for dose levels, ``"std"`` for Gaussian std levels."""
        return STD_UNIT if self.kind == "gaussian" else DOSE_UNIT


def load_test_set(cfg: TestSetConfig) -> list[TestImage]:
    """The test images, sorted by image_id and cut to ``cfg.max_images``.

    From ``cfg.shards`` (rows whose ``split`` column is ``cfg.split``; shards without a ``reference``
    column give ``reference=None`` and the defect metrics fall back to their no-reference form), or
    rendered in memory from ``cfg.dataset`` exactly as :func:`semray.data.synthesize_shards` would.

    Raises:
        ConfigError: the shard folder has no rows of the split, or the dataset has no images in it.
    """
    if cfg.shards is None:
        n = getattr(cfg.dataset, f"n_{cfg.split}")
        if cfg.max_images is not None:
            n = min(n, cfg.max_images)
        if n == 0:
            raise ConfigError(f"test_set.dataset.n_{cfg.split} is 0: there are no images to evaluate")
        out = []
        for i in range(n):
            r = render_record(cfg.dataset, cfg.split, i)
            out.append(
                TestImage(
                    str(r["image_id"]),
                    str(r["pattern"]),
                    r["clean"],
                    r["reference"],
                    r["defect_mask"],
                    int(r["n_defects"]),
                )
            )
        return out
    images: list[TestImage] = []
    for path in list_shards(cfg.shards):
        shard = read_shard(path)
        for k in np.flatnonzero(np.asarray(shard["split"]) == cfg.split):
            ref = shard["reference"][k] if "reference" in shard else None
            mask = np.asarray(shard["defect_mask"][k], dtype=bool)
            n_def = int(shard["n_defects"][k]) if "n_defects" in shard else int(mask.any())
            images.append(
                TestImage(
                    str(shard["image_id"][k]),
                    str(shard["pattern"][k]),
                    np.asarray(shard["clean"][k], dtype=np.float32),
                    None if ref is None else np.asarray(ref, dtype=np.float32),
                    mask,
                    n_def,
                )
            )
    if not images:
        raise ConfigError(f"test_set.shards {cfg.shards}: no rows with split {cfg.split!r}")
    images.sort(key=lambda t: t.image_id)
    return images[: cfg.max_images] if cfg.max_images is not None else images


def generator_noise(cfg: EvaluateConfig) -> NoiseConfig:
    """The noise model the training data came from: ``cfg.noise``, else the shard folder's
    ``dataset.yaml`` noise (written by ``semray synth``), else ``cfg.test_set.dataset.noise``."""
    if cfg.noise is not None:
        return cfg.noise
    if cfg.test_set.shards is not None:
        root = Path(cfg.test_set.shards)
        for cand in (root / "dataset.yaml", root.parent / "dataset.yaml"):
            if cand.is_file():
                return load_config(DatasetConfig, cand).noise
    return cfg.test_set.dataset.noise


def build_conditions(cfg: EvaluateConfig, noise: NoiseConfig) -> list[Condition]:
    """The main dose sweep of the generator's noise, then each robustness condition, in config order."""
    out = [Condition(MAIN_CONDITION, "sem", tuple(cfg.doses_e_per_px), noise, False)]
    for r in cfg.robustness:
        if r.kind == "poisson":
            regime: NoiseConfig | None = NoiseConfig().only("shot")
        else:
            regime = r.noise
        out.append(Condition(r.name, r.kind, tuple(r.levels), regime, True))
    return out


def make_noisy(clean: np.ndarray, cond: Condition, level: float, seed: int, image_id: str) -> np.ndarray:
    """The noisy observation of ``clean`` under ``cond`` at ``level``: float32 (H, W) in [0, 1].

    Score it against :func:`make_target` (``clean`` itself unless the noise uses the ``headroom`` ADC
    window, whose output is on another scale).

    For the physical kinds, the non-dose parameters are drawn once per (image, condition) and held
    fixed across levels, so along a dose sweep only the dose changes; the noise realisation itself is
    drawn from a stream keyed by the level too.
    """
    key = f"{image_id}|{cond.name}|{level:g}"
    if cond.kind == "gaussian":
        rng = image_rng(seed, key)
        noisy = clean + np.float32(level) * rng.standard_normal(clean.shape, dtype=np.float32)
        return np.clip(noisy, 0.0, 1.0).astype(np.float32, copy=False)
    return apply_noise(clean, noise_params(cond, level, seed, image_id), image_rng(seed, key))


def make_target(clean: np.ndarray, cond: Condition, level: float, seed: int, image_id: str) -> np.ndarray:
    """``clean`` on the scale of :func:`make_noisy`'s output for the same arguments: float32 (H, W).

    ``clean`` itself (the same array) unless ``cond``'s noise uses the ``headroom`` ADC window, where
    it is :func:`semray.noise.clean_target` with the parameters :func:`make_noisy` used.
    """
    if cond.kind == "gaussian" or cond.noise is None or cond.noise.quantization.adc_window == "clip":
        return clean
    return clean_target(clean, noise_params(cond, level, seed, image_id))


def noise_params(cond: Condition, level: float, seed: int, image_id: str) -> NoiseParams:
    """The physical noise parameters :func:`make_noisy` uses for ``image_id`` under ``cond`` at dose
    ``level`` (kinds "sem" and "poisson"; a Gaussian condition has none)."""
    if cond.noise is None or cond.kind == "gaussian":
        raise ValueError(f"condition {cond.name!r} ({cond.kind}) has no physical noise parameters")
    param_key = image_id if cond.name == MAIN_CONDITION else f"{image_id}|{cond.name}"
    return sample_params(cond.noise, image_rng(seed, param_key)).replace(dose_e_per_px=float(level))
