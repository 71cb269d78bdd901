"""Config of the quickstart (``semray demo``, ``make demo``): every stage of semray, end to end, small.

The defaults are the embedded demo (no file needed): a small synthetic shard set, a four-trial
loss-weight search that fine-tunes the shipped model and registers a trial only if it beats the shipped
weights on validation (``semray/assets/quickstart/tune.yaml``), a synthetic wafer lot of 16-bit TIFFs
denoised with the registered model, and an evaluation of that model against the shipped model and BM3D
(``semray/assets/quickstart/evaluate.yaml``). Any field can be overridden from YAML or ``--set``, e.g.
``semray demo --set tune.search.num_samples=8 --set lot.size_px=1024``.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

from pydantic import Field, field_validator

from semray.config.base import StrictModel, load_config
from semray.config.data import DatasetConfig, check_doses
from semray.config.evaluate import EvaluateConfig
from semray.config.infer import InferConfig
from semray.config.tune import TuneConfig


def _asset(name: str) -> str:
    return str(resources.files("semray") / "assets" / "quickstart" / name)


def default_tune() -> TuneConfig:
    """The quickstart's search (``semray/assets/quickstart/tune.yaml``)."""
    return load_config(TuneConfig, _asset("tune.yaml"))


def default_evaluate() -> EvaluateConfig:
    """The quickstart's evaluation (``semray/assets/quickstart/evaluate.yaml``)."""
    return load_config(EvaluateConfig, _asset("evaluate.yaml"))


def default_dataset() -> DatasetConfig:
    """128 x 128 px wafers: 32 train, 8 val, 8 test (rendered in seconds)."""
    return DatasetConfig(seed=1, height=128, width=128, n_train=32, n_val=8, n_test=8, rows_per_shard=16)


class LotSection(StrictModel):
    """The synthetic production lot the demo denoises: ``<lot>/<wafer>/<image>.tif``."""

    lots: int = Field(1, ge=1, le=100, description="Number of lots.")
    wafers_per_lot: int = Field(2, ge=1, le=100, description="Wafers per lot.")
    images_per_wafer: int = Field(3, ge=1, le=1000, description="Images per wafer.")
    size_px: int = Field(512, ge=16, le=8192, description="Image side (px); images are square.")
    doses_e_per_px: list[float] = Field(
        default_factory=lambda: [4.0, 16.0, 64.0],
        description="Electron doses the images are taken at, cycled over the images (low = noisier).",
    )
    bit_depth: Literal[8, 16] = Field(16, description="TIFF sample depth (SEM tools write 8 or 16 bit).")
    seed: int = Field(7, ge=0, description="Seed of the lot's patterns and noise.")

    _positive = field_validator("doses_e_per_px")(check_doses)


class QuickstartConfig(StrictModel):
    """``semray demo``: synthesise -> search -> register -> denoise a lot -> evaluate, in ``out_dir``.

    Each stage records its outcome in ``out_dir/quickstart.json``; a second run reuses what is done
    and still valid (the shards, the registered model, the denoised files, the report) unless
    ``--force`` is given.
    """

    out_dir: str = Field("outputs/demo", description="Folder for every output of the demo.")
    dataset: DatasetConfig = Field(
        default_factory=default_dataset, description="Synthetic shard set the search trains on."
    )
    tune: TuneConfig = Field(
        default_factory=default_tune,
        description=(
            "The search: fine-tunes the shipped model over loss weights; the shipped weights are registered "
            "unless a trial beats them on validation (base.data.shards and run.* are set by the demo)."
        ),
    )
    lot: LotSection = Field(default_factory=LotSection, description="The synthetic lot to denoise.")
    denoise: InferConfig = Field(
        default_factory=InferConfig,
        description="Batch denoising settings; model None = the model the search registered.",
    )
    evaluate: EvaluateConfig = Field(
        default_factory=default_evaluate,
        description="Evaluation of the searched model vs the shipped model and BM3D (test split of `dataset`).",
    )
