"""Config of an evaluation run (``semray evaluate``): test set, noise levels, methods, runtime, report.

One evaluation compares every method (classical denoisers and any number of models) on every metric at
every noise level of a fixed, seeded test split. The main axis is the electron dose of the generator's
own SEM noise model (``doses_e_per_px``); ``robustness`` adds noise the generator did not make (plain
Gaussian, Poisson-only, a different parameter regime) to show how methods behave off-distribution.

YAML example (every key optional)::

    seed: 7
    noise_draws: 5            # noise seeds 7..11, statistics paired over image x draw
    test_set: {dataset: {seed: 1234, n_test: 16}, max_images: 16}
    doses_e_per_px: [2, 8, 32, 128]
    robustness:
      - {name: gaussian, kind: gaussian, levels: [0.05, 0.1, 0.2]}
      - {name: poisson_only, kind: poisson, levels: [4, 32]}
    methods: {classical: [bm3d, tv], models: [default]}
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from semray.config.base import StrictModel
from semray.config.data import DatasetConfig
from semray.config.noise import NoiseConfig

#: Classical methods known to :mod:`semray.classical` (kept here so configs validate without importing it).
CLASSICAL_METHODS: tuple[str, ...] = ("bm3d", "nlm", "bilateral", "gaussian", "median", "tv")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$")


def _positive_levels(v: list[float], what: str) -> list[float]:
    if not v:
        raise ValueError(f"needs at least one {what}")
    if any(x <= 0 for x in v):
        raise ValueError(f"every {what} must be > 0, got {v}")
    if len(set(v)) != len(v):
        raise ValueError(f"{what}s must be distinct, got {v}")
    return sorted(float(x) for x in v)


def _unit_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(
            f"{v!r} is not a valid name (letters, digits and _ . @ : -, starting with a letter or digit)"
        )
    return v


class TestSetConfig(StrictModel):
    """Where the clean test images come from: a shard folder, or synthesised on the fly from a seed."""

    __test__ = False  # not a pytest test class, despite the name

    shards: str | None = Field(
        None,
        description=(
            "Folder (or single file) of Parquet shards (semray.io schema); rows of `split` are used, "
            "sorted by image_id. None: render `dataset`'s split in memory instead (nothing written)."
        ),
    )
    dataset: DatasetConfig = Field(
        default_factory=DatasetConfig,
        description=(
            "Synthetic set whose `split` is rendered in memory when `shards` is None. Image i of a split "
            "depends only on (seed, split, i), so the defaults give the test split of the project's "
            "default data set (the one `semray synth` writes with no config)."
        ),
    )
    split: Literal["train", "val", "test"] = Field("test", description="Which split to evaluate on.")
    max_images: int | None = Field(
        None, ge=1, le=100_000, description="Use only the first N images (by image_id); None = all."
    )


class RobustnessNoise(StrictModel):
    """One out-of-generator noise condition, evaluated at each of its ``levels``.

    * ``gaussian``: ``clip(clean + N(0, level**2), 0, 1)``; levels are std in [0, 1] intensity units.
    * ``poisson``: shot noise only (the generator's other components off); levels are doses, e-/px.
    * ``sem``: the physical model with a different parameter regime given in ``noise`` (e.g. strong
      scan-line offsets and charging); levels are doses, e-/px.
    """

    name: str = Field(description="Label of the condition in tables and figures (e.g. 'gaussian').")
    kind: Literal["gaussian", "poisson", "sem"] = Field(description="Noise family, see the class doc.")
    levels: list[float] = Field(description="Noise levels: std (gaussian, [0, 1] units) or dose (e-/px).")
    noise: NoiseConfig | None = Field(
        None, description="For kind 'sem': the noise regime (its dose range is replaced by `levels`)."
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return _unit_name(v)

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        return _positive_levels(v, "level")

    @model_validator(mode="after")
    def _noise_for_sem(self) -> RobustnessNoise:
        if self.kind == "sem" and self.noise is None:
            raise ValueError(
                "kind 'sem' needs a `noise` regime (a NoiseConfig) different from the generator's"
            )
        if self.kind != "sem" and self.noise is not None:
            raise ValueError(f"`noise` is only used with kind 'sem', not {self.kind!r}")
        if self.kind == "gaussian" and max(self.levels) > 1.0:
            raise ValueError(f"gaussian levels are std in [0, 1] intensity units, got {self.levels}")
        return self


class ModelEntry(StrictModel):
    """A model to evaluate: a spec for :func:`semray.models.resolve.resolve_model` and its label."""

    spec: str = Field(description="'default', a model name, a local model folder or models:/NAME@ALIAS.")
    label: str | None = Field(None, description="Name in tables/figures; None = the resolved model name.")

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str | None) -> str | None:
        return v if v is None else _unit_name(v)


class MethodsConfig(StrictModel):
    """Which denoisers to compare."""

    classical: list[str] = Field(
        default_factory=lambda: list(CLASSICAL_METHODS),
        description="Classical methods (semray.classical): bm3d, nlm, bilateral, gaussian, median, tv.",
    )
    classical_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-method parameter overrides, e.g. {bm3d: {vst: true}} (see semray.classical).",
    )
    models: list[ModelEntry | str] = Field(
        default_factory=lambda: ["default"],
        description="Models by spec ('default', name, folder, models:/...), or {spec, label} entries.",
    )
    oracle_sigma: bool = Field(
        False,
        description=(
            "Also run every classical method with the true noise std measured from (noisy - clean): an "
            "upper bound no real user has. Such rows are labelled '<method>+oracle' everywhere."
        ),
    )
    include_noisy: bool = Field(
        True, description="Add the unprocessed noisy input as method 'noisy' (the floor to beat)."
    )
    tile: int | None = Field(
        None, ge=16, le=8192, description="Tile side (px) for model inference; None = the engine default."
    )
    device: str = Field(
        "auto",
        min_length=1,
        description="Torch device for models: 'auto' (CUDA if present), 'cpu', 'cuda:0'.",
    )

    @field_validator("classical")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in CLASSICAL_METHODS]
        if bad:
            raise ValueError(f"unknown classical method(s) {bad}; valid: {', '.join(CLASSICAL_METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"classical methods listed twice: {v}")
        return v

    @model_validator(mode="after")
    def _params_for_listed(self) -> MethodsConfig:
        extra = sorted(set(self.classical_params) - set(self.classical))
        if extra:
            raise ValueError(f"classical_params given for method(s) not in `classical`: {extra}")
        return self

    def model_entries(self) -> list[ModelEntry]:
        """``models`` with plain strings turned into :class:`ModelEntry`."""
        return [m if isinstance(m, ModelEntry) else ModelEntry(spec=m) for m in self.models]


class RuntimeConfig(StrictModel):
    """Wall time per megapixel of every method, measured on the same machine and the same image."""

    enabled: bool = Field(True, description="Measure runtimes (off: the runtime table is left out).")
    size_px: int = Field(512, ge=32, le=8192, description="Side of the square timing image (px).")
    repeats: int = Field(3, ge=1, le=50, description="Timed runs per method; the median is reported.")
    threads: int = Field(
        1,
        ge=1,
        le=256,
        description="CPU threads each method may use (torch and BLAS/OpenMP); 1 compares per core.",
    )


class ReportConfig(StrictModel):
    """What the report shows."""

    reference_method: str | None = Field(
        "bm3d", description="Method every model is compared against in the delta table (None = none)."
    )
    n_examples: int = Field(3, ge=0, le=16, description="Images in the visual example grid.")
    example_level: float | None = Field(
        None, gt=0, description="Dose (e-/px) of the example grid; None = the middle of the dose sweep."
    )
    crop_px: int = Field(48, ge=8, le=512, description="Side of the zoomed defect crops (px).")
    ci: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the mean's interval (t-based).")
    dpi: int = Field(100, ge=50, le=300, description="Resolution of the PNG figures (dots per inch).")
    notes: list[str] = Field(
        default_factory=list,
        description="Paragraphs (Markdown inline) shown under the report's title, e.g. how a model was made.",
    )


class DetectionConfig(StrictModel):
    """Defect detection with false alarms counted (:mod:`semray.evaluation.detection`): every method also
    runs on the noisy defect-free reference render (same noise draw), and its output is scored at the
    same defect sites; the ideal observer at the same rates (:mod:`semray.evaluation.detectability`)."""

    enabled: bool = Field(
        True,
        description="Score at fixed false-alarm rates (doubles the denoising of images with defects).",
    )
    false_alarms: list[float] = Field(
        default_factory=lambda: [0.01, 0.001],
        description="False-alarm rates per defect site at which recall is reported (each in (0, 0.5]).",
    )
    bootstrap: int = Field(
        500, ge=0, le=100_000, description="Bootstrap resamples of (image, draw) units for the CIs (0: none)."
    )
    mc_draws: int = Field(
        64,
        ge=0,
        le=10_000,
        description="Monte Carlo noise draws per image and draw for the ideal-observer check (0: none).",
    )
    mc_max_dose: float = Field(
        8.0,
        gt=0,
        description="Monte Carlo runs at doses (e-/px) up to this, where the Gaussian approximation is weakest.",
    )

    @field_validator("false_alarms")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < a <= 0.5 for a in v):
            raise ValueError(f"false_alarms must be a non-empty list of rates in (0, 0.5], got {v}")
        return v


class MlflowConfig(StrictModel):
    """Logging the evaluation as one MLflow run (store chosen by semray.tracking)."""

    enabled: bool = Field(True, description="Log the run (params, summary metrics, artifacts).")
    experiment: str = Field("semray-evaluate", min_length=1, description="Experiment name.")
    run_name: str | None = Field(None, description="Run name; None = 'evaluate-<timestamp>'.")


class EvaluateConfig(StrictModel):
    """One evaluation run (``semray evaluate --config ...``)."""

    seed: int = Field(
        0,
        ge=0,
        description=(
            "Noise seed (of the first draw, see noise_draws): image i's noise comes from "
            "(seed, image_id, condition, level)."
        ),
    )
    noise_draws: int = Field(
        1,
        ge=1,
        le=50,
        description=(
            "Noise draws per image: draw k (0-based) uses noise seed `seed + k`, and every image is scored "
            "under each. Summaries and paired differences pool over (image, draw) pairs and treat them as "
            "independent, so the CIs are slightly narrow (the draws of one image share its content). On one "
            "draw defect recall moves in steps of one defect; several draws measure it. Runtime and the "
            "visual examples use the first draw."
        ),
    )
    test_set: TestSetConfig = Field(default_factory=TestSetConfig, description="The clean test images.")
    doses_e_per_px: list[float] = Field(
        default_factory=lambda: [2.0, 8.0, 32.0, 128.0],
        description="Dose bins of the generator's SEM noise (primary electrons per pixel, e-/px).",
    )
    noise: NoiseConfig | None = Field(
        None,
        description=(
            "The generator's noise model (other parameters drawn per image, dose fixed per bin). None: "
            "the shard folder's dataset.yaml noise if present, else test_set.dataset.noise."
        ),
    )
    robustness: list[RobustnessNoise] = Field(
        default_factory=list, description="Out-of-generator noise conditions (see RobustnessNoise)."
    )
    methods: MethodsConfig = Field(default_factory=MethodsConfig, description="Denoisers to compare.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Runtime measurement.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Report contents.")
    detection: DetectionConfig = Field(
        default_factory=DetectionConfig, description="Detection at fixed false-alarm rates."
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="MLflow logging.")
    parallel: bool | None = Field(
        None,
        description="Run classical methods and metrics as Ray tasks; None = whenever Ray is initialised.",
    )
    out_dir: str = Field("outputs/evaluate", min_length=1, description="Output folder of the evaluation.")

    @field_validator("doses_e_per_px")
    @classmethod
    def _doses(cls, v: list[float]) -> list[float]:
        return _positive_levels(v, "dose")

    def noise_seeds(self) -> list[int]:
        """The noise seed of each draw: ``[seed, seed + 1, ..., seed + noise_draws - 1]``."""
        return list(range(self.seed, self.seed + self.noise_draws))

    @model_validator(mode="after")
    def _unique_conditions(self) -> EvaluateConfig:
        names = [r.name for r in self.robustness]
        if "sem" in names or len(set(names)) != len(names):
            raise ValueError(f"robustness names must be unique and not 'sem' (the main sweep), got {names}")
        return self


class AblationVariant(StrictModel):
    """One training recipe of the ablation: a TrainConfig YAML plus dotted overrides."""

    name: str = Field(description="Label of the variant in the table (also its model folder name).")
    description: str = Field("", description="One line saying what this variant changes.")
    config: str | None = Field(
        None, description="TrainConfig YAML the variant starts from; None = the ablation's `base`."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted TrainConfig fields set for this variant, e.g. {'model.residual': true}.",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", v):
            raise ValueError(f"{v!r}: variant names are folder names (letters, digits, _ . -)")
        return v


class AblationConfig(StrictModel):
    """The write-up's ablation: train every variant under the same budget, evaluate them in one table."""

    base: str = Field(
        "configs/stage3_full.yaml", description="TrainConfig YAML of variants that do not name their own."
    )
    budget: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Dotted TrainConfig fields applied to EVERY variant after its own settings (epochs, steps, "
            "data, seed, workers), so all variants train under exactly the same budget."
        ),
    )
    variants: list[AblationVariant] = Field(min_length=1, description="The recipes compared.")
    baseline: str | None = Field(
        None, description="Variant every other is compared with in the table (None = the first)."
    )
    evaluation: EvaluateConfig = Field(
        default_factory=lambda: EvaluateConfig(
            methods=MethodsConfig(classical=["bm3d"], models=[]), report=ReportConfig(reference_method=None)
        ),
        description="How variants are evaluated; its methods.models is replaced by the trained variants.",
    )
    reuse_trained: bool = Field(
        True,
        description="Skip training a variant whose model folder already exists in out_dir (resumable runs).",
    )
    out_dir: str = Field(
        "outputs/ablation", min_length=1, description="Models, evaluation and table go here."
    )

    @model_validator(mode="after")
    def _names(self) -> AblationConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants {names}")
        clash = set(names) & set(self.evaluation.methods.classical)
        if clash:
            raise ValueError(f"variant names {sorted(clash)} clash with classical method names")
        return self
