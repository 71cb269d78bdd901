"""Config of the interactive denoising app (:mod:`semray.serve`): HTTP, replicas, model cache, limits.

YAML example (every key optional)::

    host: 0.0.0.0
    port: 8000
    models_dir: /data/semray/models
    autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}
    num_cpus_per_replica: 1.0
    max_request_mib: 128
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from semray.config.base import StrictModel
from semray.config.infer import InferConfig, TilingConfig, reject_moved_tiling_keys


class AutoscalingSettings(StrictModel):
    """Ray Serve ``autoscaling_config`` of the app's one deployment (replica counts and load target)."""

    min_replicas: int = Field(1, ge=0, le=64, description="Fewest replicas kept running (replicas).")
    initial_replicas: int | None = Field(
        None, ge=0, le=64, description="Replicas started with the app (replicas); default: min_replicas."
    )
    max_replicas: int = Field(2, ge=1, le=256, description="Most replicas Serve may scale up to (replicas).")
    target_ongoing_requests: float = Field(
        2.0,
        gt=0,
        le=100,
        description="Ongoing requests per replica Serve aims for; above it, it adds replicas (requests).",
    )
    upscale_delay_s: float = Field(
        5.0, ge=0, le=600, description="Load must stay above target this long before scaling up (s)."
    )
    downscale_delay_s: float = Field(
        120.0, ge=0, le=3600, description="Load must stay below target this long before scaling down (s)."
    )

    @model_validator(mode="after")
    def _check_order(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class ServeConfig(StrictModel):
    """Everything ``semray serve`` needs; validated before Ray or Serve is started."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=255,
        description="Interface the HTTP proxy binds (host name or IP); 0.0.0.0 exposes it to the network.",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the HTTP proxy.")
    app_name: str = Field(
        "semray", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Ray Serve application name."
    )
    models_dir: Path | None = Field(
        None,
        description=(
            "Folder of model directories (model.safetensors + card.json) offered by name, besides the "
            "shipped default. Requests can only name models inside it, never paths."
        ),
    )
    include_mlflow: bool = Field(
        True, description="Also offer models registered in MLflow (models:/NAME/VERSION and @ALIAS)."
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow store the replicas read the registry from; default: semray.tracking's rules.",
    )
    autoscaling: AutoscalingSettings = Field(
        default_factory=AutoscalingSettings, description="Replica autoscaling (see AutoscalingSettings)."
    )
    num_cpus_per_replica: float = Field(
        0.5, gt=0, le=64, description="Logical Ray CPUs reserved per replica (fractions allowed)."
    )
    torch_threads: int = Field(
        1, ge=1, le=64, description="torch intra-op threads per replica (threads); 1 avoids oversubscription."
    )
    max_ongoing_requests: int = Field(
        4, ge=1, le=256, description="Requests one replica works on at once before Serve queues (requests)."
    )
    max_cached_models: int = Field(
        3, ge=1, le=32, description="Models each replica keeps loaded (LRU via Serve multiplexing) (models)."
    )
    max_request_mib: float = Field(
        64.0, gt=0, le=4096, description="Largest accepted request body, uploads included (MiB)."
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=64,
        le=16384 * 16384,
        description="Largest accepted image, checked from the file header before decoding (pixels, H*W).",
    )
    preview_max_side: int = Field(
        2048,
        ge=64,
        le=16384,
        description="Previews returned to the page are down-sampled to at most this side (px).",
    )
    # One tile per pass keeps a request's memory small (also on a GPU, where the engine would take 4).
    tiling: TilingConfig = Field(
        default_factory=lambda: TilingConfig(batch_size=1),
        description="Tiling of the U-Net's inference (see TilingConfig); default batch_size 1.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="HTTP proxy time limit for one request (s)."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_tiling_keys(cls, data: Any) -> Any:
        return reject_moved_tiling_keys(data)

    @property
    def max_request_bytes(self) -> int:
        """``max_request_mib`` in bytes."""
        return int(self.max_request_mib * 1024 * 1024)

    def infer_config(self, method: str = "unet") -> InferConfig:
        """The engine settings of a replica for ``method``: this config's tiling, on CPU, with
        ``torch_threads`` threads (the model itself is resolved by the app, never from a path)."""
        return InferConfig(
            method=method,
            tiling=self.tiling,
            device="cpu",
            threads=self.torch_threads,
        )

    def serve_autoscaling_config(self) -> dict[str, Any]:
        """The ``autoscaling_config`` dict for ``Deployment.options``."""
        a = self.autoscaling
        out: dict[str, Any] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
        if a.initial_replicas is not None:
            out["initial_replicas"] = a.initial_replicas
        return out
