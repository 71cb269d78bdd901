"""Config of inference: the tiled engine, the denoising method, and the batch job over wafer lots."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from semray.config.base import StrictModel
from semray.config.ingest import DataBarConfig
from semray.io import DEFAULT_MAX_PIXELS

#: ``unet`` plus the classical methods of :data:`semray.classical.METHODS` (kept equal by a test).
MethodName = Literal["unet", "bm3d", "nlm", "bilateral", "gaussian", "median", "tv"]


#: Default largest tile side (pixels), CPU and GPU alike. With the overlap the shipped model's receptive
#: field needs (104 px), 768 px tiles run 1.21-1.35x an image's pixels through the network (1024^2 to
#: 8192^2, from axis_plan; 512 px: 1.46-1.56x; 1024 px: 1.0 at 1024^2, 1.15-1.23x above). Per network
#: pixel, larger tiles cost more on this x86 CPU (cache), so on one 1024^2 frame 2 x 2 tiles of 568 px
#: took 0.94x the CPU time of a whole-image pass and 0.92x that of 512 px tiles, 1.02x the old inexact
#: 256/32 tiling (benchmarks/results/tiles.md: 1 thread, interleaved repeats).
DEFAULT_TILE = 768

#: Keys that moved from the top level of the infer and serve configs into their ``tiling:`` section.
TILING_KEYS = ("tile", "overlap", "batch_size")


class TilingConfig(StrictModel):
    """How the engine tiles an image (the ``tiling:`` section of the infer and serve configs).

    The engine pads an image once as a whole pass would, cuts it into tiles of at most ``tile`` x
    ``tile`` pixels overlapping by ``overlap`` pixels, runs them through the network ``batch_size`` at a
    time and blends them with a raised-cosine window, so memory stays bounded for any image size. With
    the default overlap (from the model's receptive field) the result equals a whole-image pass.
    """

    tile: int = Field(
        DEFAULT_TILE,
        ge=16,
        le=8192,
        description=(
            "Largest tile side (pixels); rounded down to a multiple of the model's 2**depth, grown to "
            "2 x overlap if smaller."
        ),
    )
    overlap: int | None = Field(
        None,
        ge=0,
        le=4095,
        description=(
            "Least overlap of neighbouring tiles (pixels), < tile/2. None = 2 x the model's receptive-field "
            "radius + 1, rounded up to its 2**depth (104 for the shipped model): tiled output then equals a "
            "whole-image pass. A smaller one is faster but leaves seams (0.037 at 32: shipped model, 500x700)."
        ),
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Tiles per forward pass (tiles); default 1 on CPU (10-20 % faster here), 4 on GPUs.",
    )

    @model_validator(mode="after")
    def _check_overlap(self) -> TilingConfig:
        if self.overlap is not None and 2 * self.overlap >= self.tile:
            raise ValueError(f"overlap ({self.overlap}) must be less than tile/2 ({self.tile / 2:g})")
        return self


def reject_moved_tiling_keys(data: Any) -> Any:
    """Validator body for the configs with a ``tiling:`` section: old top-level tiling keys get an error
    saying where they moved (a plain "unknown key" would not say); anything else passes unchanged."""
    if isinstance(data, dict):
        moved = [k for k in TILING_KEYS if k in data]
        if moved:
            where = ", ".join(f"{k!r} -> 'tiling.{k}'" for k in moved)
            raise ValueError(
                f"tiling keys moved into the 'tiling:' section: {where} (e.g. tiling: {{tile: 512}} "
                f"or --set tiling.{moved[0]}=...)"
            )
    return data


class InferConfig(StrictModel):
    """How images are denoised (``semray denoise``, ``jobs/denoise_lots.py``, the app).

    The engine tiles images as ``tiling`` says (see :class:`TilingConfig`); the batch job runs
    ``num_actors`` Ray actors, each holding one copy of the model.
    """

    method: MethodName = Field(
        "unet", description="Denoiser: 'unet' (a semray model) or a classical method from semray.classical."
    )
    model: str | None = Field(
        None,
        description=(
            "Model spec for method 'unet': None/'default' (shipped model), a name in models_dir, a model "
            "folder path, or an MLflow URI models:/NAME@ALIAS or models:/NAME/VERSION."
        ),
    )
    models_dir: str | None = Field(
        None, description="Extra folder of named model folders searched before the shipped models."
    )
    classical_params: dict[str, float | int | bool | str] = Field(
        default_factory=dict,
        description="Overrides of a classical method's parameters (e.g. {'h': 0.05} for nlm); sigma is estimated.",
    )
    tiling: TilingConfig = Field(
        default_factory=TilingConfig, description="Tile size, overlap and tiles per pass (see TilingConfig)."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="Torch device: 'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:N', 'mps'.",
    )
    amp: bool = Field(
        False, description="Mixed precision (bfloat16/float16 autocast); meant for GPUs, slow on most CPUs."
    )
    channels_last: bool = Field(
        True,
        description="NHWC memory layout: faster convolutions on GPUs, and 1.5x on this project's x86 CPU "
        "(1024^2 image, 1 thread, shipped model; same output to 4e-7).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Torch intra-op threads per process/actor (threads); None = floor(cpus_per_actor).",
    )
    keep_bottom_rows: int | Literal["auto"] = Field(
        "auto",
        description=(
            "Burned-in data bar at the image bottom, copied through untouched and never denoised: 'auto' "
            "finds it on each page with the detector `semray ingest` uses (see databar), an int keeps that "
            "many rows (pixel rows), 0 keeps none."
        ),
    )
    databar: DataBarConfig = Field(
        default_factory=DataBarConfig,
        description="Data-bar detector thresholds for keep_bottom_rows='auto' (crop_rows and mode unused).",
    )
    min_side: int = Field(
        1,
        ge=1,
        le=65535,
        description=(
            "Images with a side shorter than this (pixels) are failed as implausible; 1 denoises any "
            "size (tiny images are padded by the engine)."
        ),
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Images with more pixels than this (pixels) are failed instead of risking node memory.",
    )
    noise_estimate: bool = Field(
        True, description="Record the no-reference noise estimate before and after in the manifest."
    )
    num_actors: int | None = Field(
        None,
        ge=0,
        le=4096,
        description=(
            "Ray actors in the denoising pool (actors); None = cluster CPUs // cpus_per_actor (at most "
            "one per file); 0 = no Ray, files processed one by one in this process."
        ),
    )
    executor: Literal["auto", "local", "ray"] = Field(
        "auto",
        description=(
            "Where a folder job runs: 'local' (this process, files one by one), 'ray' (an actor pool) or "
            "'auto': local when the job's pixels are at most local_max_megapixels, else Ray."
        ),
    )
    local_max_megapixels: float = Field(
        64.0,
        ge=0,
        description=(
            "Largest job (megapixels, all pages of all files, from the headers) that executor 'auto' runs "
            "in this process, where small lots skip Ray's start-up and actor spin-up (a compromise "
            "setting, see docs/image_files.md; tune it for your machine)."
        ),
    )
    cpus_per_actor: float = Field(
        1.0, gt=0, le=256, description="CPUs reserved per actor (CPUs; fractional allowed)."
    )
    gpus_per_actor: float = Field(
        0.0, ge=0, le=16, description="GPUs reserved per actor (GPUs; fractional allowed, e.g. 0.25)."
    )
    actor_max_restarts: int = Field(
        3, ge=0, le=100, description="Times Ray restarts an actor that died (crash, OOM kill)."
    )
    task_max_retries: int = Field(
        3, ge=0, le=100, description="Times Ray retries a file whose actor died while processing it."
    )
    force: bool = Field(False, description="Redo files whose verified output already exists (no resume).")
    track: bool | None = Field(
        None,
        description="Log one MLflow run per job; None = yes for folder inputs, no for a single file.",
    )
    experiment: str = Field(
        "semray-denoise", min_length=1, description="MLflow experiment the job's run goes to."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_tiling_keys(cls, data: Any) -> Any:
        return reject_moved_tiling_keys(data)

    def torch_threads(self) -> int:
        """Torch threads one actor/process uses: ``threads`` or ``floor(cpus_per_actor)`` (at least 1)."""
        return self.threads or max(1, int(self.cpus_per_actor))
