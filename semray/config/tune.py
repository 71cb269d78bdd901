"""Config of a loss/architecture search (``semray tune``, ``jobs/tune_losses.py``) on Ray Tune.

A search is a base :class:`~semray.config.train.TrainConfig` (data, noise, optimiser, workers) plus a
search space over dotted fields of it, an objective, an early-stopping scheduler, a budget and the
MLflow names. YAML example (every key optional)::

    base: {data: {shards: [data/wafers]}, optim: {epochs: 8}, scaling: {num_workers: 1}}
    space:
      loss.alpha: {uniform: [0.0, 1.0]}
      loss.beta: {choice: [0.0, 0.25, 0.5, 1.0]}
      model.residual: {choice: [false, true]}
    objective: {weights: {val_psnr: 1.0, val_defect_recall: 10.0}}
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    search: {num_samples: 8, max_concurrent_trials: 2}

Every value a dimension can take is checked against the base config when the config is loaded, so a
negative loss weight or an unknown field fails at once, naming ``space.<field>``, before any Ray work.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from semray.config.base import StrictModel, read_yaml
from semray.config.loss import KIND_FIELDS, drop_fields_of_other_kinds
from semray.config.train import VALIDATION_METRICS, TrainConfig

#: Fields of the training config a search may vary (loss weights and architecture variants, plus the
#: learning rate, which interacts with both and would otherwise bias the comparison).
SEARCHABLE_FIELDS: tuple[str, ...] = (
    "loss.kind",
    "loss.alpha",
    "loss.beta",
    "loss.charbonnier_eps",
    "loss.ssim_lambda",
    "loss.ms_ssim_scales",
    "loss.defect_weight",
    "model.depth",
    "model.base_width",
    "model.residual",
    "model.edge_input",
    "model.norm",
    "model.upsample",
    "optim.lr",
    "optim.weight_decay",
)

_DIMENSION_KINDS = {"choice", "grid", "uniform", "loguniform", "randint"}

#: Name of the objective reported to Tune (and logged to MLflow per epoch).
SCORE_METRIC = "tune_score"


class Dimension(StrictModel):
    """One axis of the search space: exactly one of ``choice``, ``grid``, ``uniform``, ``loguniform``,
    ``randint``.

    ``grid`` values are all tried (each ``search.num_samples`` times); ``choice`` samples one
    uniformly; ``uniform``/``loguniform`` sample a float in ``[low, high]``; ``randint`` an integer in
    ``[low, high]`` (both ends included).
    """

    choice: list[Any] | None = Field(None, min_length=1, description="Values sampled uniformly.")
    grid: list[Any] | None = Field(None, min_length=1, description="Values all tried (grid search).")
    uniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly.")
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high] (both > 0) sampled uniformly in log space."
    )
    randint: tuple[int, int] | None = Field(None, description="[low, high] integers, both included.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [
            k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of choice, grid, uniform, loguniform, randint (got {given or 'none'})"
            )
        rng = self.uniform or self.loguniform or self.randint
        if rng is not None and rng[0] > rng[1]:
            raise ValueError(f"range [{rng[0]}, {rng[1]}] has low > high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be > 0")
        return self

    def extremes(self) -> list[Any]:
        """Every value this dimension can produce that validation must accept (lists, or range ends)."""
        if self.choice is not None:
            return list(self.choice)
        if self.grid is not None:
            return list(self.grid)
        lo, hi = self.uniform or self.loguniform or self.randint  # type: ignore[misc]
        return [lo, hi]


class ObjectiveSection(StrictModel):
    """The score Tune maximises and ASHA stops on: ``sum(weight * metric)`` over validation metrics.

    The default rewards image quality and defect preservation together: PSNR in dB plus 10 x defect
    recall (so 0.1 more recall is worth 1 dB), because a denoiser that smooths away a bridge or a
    missing contact is useless however high its PSNR. Use a negative weight for a metric where lower
    is better (``val_loss``). A metric that is NaN for an epoch (e.g. defect recall when no validation
    crop holds a measurable defect; the same for every trial, since the validation set is fixed)
    contributes 0.
    """

    weights: dict[str, float] = Field(
        default_factory=lambda: {"val_psnr": 1.0, "val_defect_recall": 10.0},
        min_length=1,
        description=f"Validation metric -> weight (dimensionless per metric unit); metrics: {sorted(VALIDATION_METRICS)}.",
    )

    @field_validator("weights")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(set(v) - set(VALIDATION_METRICS))
        if bad:
            raise ValueError(f"unknown validation metric(s) {bad}; known: {sorted(VALIDATION_METRICS)}")
        if not any(w != 0 for w in v.values()):
            raise ValueError("at least one weight must be non-zero")
        return v

    def score(self, metrics: dict[str, Any]) -> float:
        """The weighted sum for one epoch's reported metrics (NaN or missing metrics count 0)."""
        total = 0.0
        for k, w in self.weights.items():
            v = metrics.get(k)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                total += w * float(v)
        return total


class SchedulerSection(StrictModel):
    """Early stopping of poor trials (Tune's asynchronous successive halving, ASHA)."""

    kind: Literal["asha", "fifo"] = Field(
        "asha",
        description="asha: stop trials below the top 1/reduction_factor at each rung; fifo: never stop.",
    )
    grace_period: int = Field(
        1, ge=1, le=100_000, description="Epochs every trial runs before it can be stopped."
    )
    reduction_factor: float = Field(
        2.0, gt=1.0, le=100, description="Keep the top 1/reduction_factor of trials at each rung."
    )


class SearchSection(StrictModel):
    """Budget and search algorithm."""

    num_samples: int = Field(
        8, ge=1, le=100_000, description="Trials sampled from the space (times the grid size if any grid)."
    )
    max_concurrent_trials: int = Field(
        2,
        ge=1,
        le=10_000,
        description=(
            "Trials running at once. Each trial's Ray Train workers ask Ray for their own resources, which "
            "Tune does not reserve, so this cap is what keeps trials from starving each other's workers."
        ),
    )
    seed: int | None = Field(0, ge=0, description="Seed of the random sampler (None = random).")


class TrialResources(StrictModel):
    """Resources of the trial process itself (it only drives a TorchTrainer; workers are in base.scaling)."""

    cpus: float = Field(0.5, gt=0, le=64, description="CPUs reserved per trial driver (fractional OK).")


class TuneMlflowSection(StrictModel):
    """Where the search is tracked and the best model registered (store chosen by semray.tracking)."""

    experiment: str = Field("semray-tune", min_length=1, description="MLflow experiment of the search.")
    registered_model: str = Field(
        "semray-unet-tuned",
        min_length=1,
        description="Registry name the best trial's model is registered under.",
    )
    register_model: bool = Field(True, description="Register the best trial's model.")
    alias: str | None = Field(
        "tuned",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="Alias set on the registered version (models:/NAME@ALIAS); None = none.",
    )


class TuneRunSection(StrictModel):
    """Name and location of the Tune experiment (trial folders, Train checkpoints, Tune's state)."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description=(
            "Search name (folder under storage_path, MLflow parent run name); None = 'tune-<UTC timestamp>'. "
            "Starting a search whose folder exists resumes it."
        ),
    )
    storage_path: str | None = Field(
        None,
        description=(
            "Where searches live: a local folder, or shared storage (s3://bucket/semray/tune, a shared "
            "mount) on a multi-node cluster; None = $SEMRAY_HOME/tune."
        ),
    )


class TuneConfig(StrictModel):
    """A loss/architecture search (``semray tune --config ...``)."""

    base: TrainConfig = Field(
        default_factory=TrainConfig,
        description="The training run every trial starts from: inline, or the path of a TrainConfig YAML.",
    )
    space: dict[str, Dimension] = Field(
        default_factory=lambda: {
            "loss.alpha": Dimension(uniform=(0.0, 1.0)),
            "loss.beta": Dimension(uniform=(0.0, 1.0)),
            "model.residual": Dimension(choice=[False, True]),
        },
        description=f"Dotted training-config field -> dimension; fields: {list(SEARCHABLE_FIELDS)}.",
    )
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection, description="Score to maximise.")
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection, description="Early stopping.")
    search: SearchSection = Field(default_factory=SearchSection, description="Budget and sampler.")
    resources: TrialResources = Field(default_factory=TrialResources, description="Per-trial resources.")
    mlflow: TuneMlflowSection = Field(default_factory=TuneMlflowSection, description="Tracking and registry.")
    run: TuneRunSection = Field(default_factory=TuneRunSection, description="Search name and storage.")

    @field_validator("base", mode="before")
    @classmethod
    def _base_from_file(cls, v: object) -> object:
        """``base: configs/stage3_full.yaml`` loads that training config (path relative to the cwd)."""
        if isinstance(v, str):
            from pathlib import Path

            path = Path(v)
            if not path.is_file():
                raise ValueError(f"base config file {v} does not exist")
            return read_yaml(path)
        return v

    @field_validator("space", mode="before")
    @classmethod
    def _flatten_nested(cls, v: object) -> object:
        """Accept ``{loss: {alpha: {...}}}`` as well as ``{"loss.alpha": {...}}``, so command-line
        overrides (``--set space.loss.alpha.uniform=[0,2]``, which nest at every dot) work; a nested
        entry given after a dotted one for the same field replaces it."""
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for k, val in node.items():
                key = f"{prefix}{k}"
                if isinstance(val, dict) and val and not (set(val) & _DIMENSION_KINDS):
                    walk(f"{key}.", val)
                else:
                    out.pop(key, None)
                    out[key] = val

        walk("", v)
        return out

    @field_validator("space")
    @classmethod
    def _known_fields(cls, v: dict[str, Dimension]) -> dict[str, Dimension]:
        bad = sorted(set(v) - set(SEARCHABLE_FIELDS))
        if bad:
            raise ValueError(f"unknown search field(s) {bad}; searchable: {list(SEARCHABLE_FIELDS)}")
        return v

    @model_validator(mode="after")
    def _fine_tune_keeps_the_architecture(self) -> TuneConfig:
        """A search from ``base.init`` fine-tunes those weights: every trial must load them, so the
        architecture is the init model's and the space cannot vary it."""
        varied = sorted(k for k in self.space if k.startswith("model."))
        if self.base.init is not None and varied:
            raise ValueError(
                f"space: {varied} vary the architecture, but base.init={self.base.init!r} fine-tunes "
                "existing weights, which only load into the init model's own architecture; remove them "
                "from the space (search the loss weights or optim.lr instead)"
            )
        return self

    @model_validator(mode="after")
    def _every_value_is_valid(self) -> TuneConfig:
        """Each value of each dimension must give a valid training config (the others at their base)."""
        from semray.config.base import ConfigError

        base = self.base.model_dump(mode="json")
        for key, dim in self.space.items():
            # a weight of another loss kind is checked on that kind (it only applies to trials of it)
            owner = KIND_FIELDS.get(key.removeprefix("loss.")) if key.startswith("loss.") else None
            other_kind = {"loss.kind": owner} if owner and owner != base["loss"]["kind"] else {}
            for value in dim.extremes():
                try:
                    trial_config(base, {**other_kind, key: value})
                except ConfigError as e:
                    detail = str(e).split("\n", 1)[-1].strip()
                    raise ValueError(f"space.{key}: value {value!r} is invalid: {detail}") from None
        return self


def trial_config(base: TrainConfig | dict[str, Any], params: dict[str, Any]) -> TrainConfig:
    """The training config of one trial: ``base`` with the sampled dotted ``params`` applied.

    Raises:
        ConfigError: a sampled value is out of range (names the field).
    """
    import copy

    from semray.config.base import load_config, set_dotted

    data = copy.deepcopy(base.model_dump(mode="json") if isinstance(base, TrainConfig) else base)
    for key, value in params.items():
        set_dotted(data, key, value)
    if any(k.startswith("loss.") for k in params):
        # a space may sample loss.kind with weights of several kinds (loss.alpha for composite,
        # loss.ssim_lambda for mse_ssim): a trial uses those of the kind it drew, the others have no
        # effect on it (Tune still records every drawn value with the trial)
        drop_fields_of_other_kinds(data.setdefault("loss", {}))
    return load_config(TrainConfig, data)
