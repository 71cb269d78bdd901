"""The methods an evaluation compares, behind one small interface, and how their runtime is measured.

Every runner maps float32 ``(H, W)`` images in [0, 1] to images of the same shape:

* :class:`NoisyRunner` returns the input (the floor every denoiser must beat);
* :class:`ClassicalRunner` wraps :mod:`semray.classical` (blind: its noise level is estimated from the
  noisy image; with ``oracle=True`` it is given the true std, and its label says so);
* :class:`ModelRunner` wraps the tiled inference engine :class:`semray.infer.Denoiser` (which also
  runs single classical images, so timings go through the same interface for every method).

Classical methods run over many images with :func:`semray.classical.denoise_many` (Ray tasks when
asked); each output depends on its input only, so the result is the same whatever the scheduling.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from semray.config.base import ConfigError
from semray.config.evaluate import MethodsConfig, ModelEntry

ORACLE_SUFFIX = "+oracle"


class MethodRunner(Protocol):
    """What the evaluation needs from a method."""

    label: str
    kind: str  # "noisy" | "classical" | "model"
    version: str
    oracle: bool

    def run_many(self, images: Sequence[np.ndarray], true_sigmas: Sequence[float]) -> list[np.ndarray]:
        """Denoise ``images`` (``true_sigmas`` is only read by oracle runners)."""
        ...

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Denoise one image the way a user would (used for timing)."""
        ...


@dataclass
class NoisyRunner:
    """The identity: the noisy input itself, as a method row."""

    label: str = "noisy"
    kind: str = "noisy"
    version: str = ""
    oracle: bool = False

    def run_many(self, images: Sequence[np.ndarray], true_sigmas: Sequence[float]) -> list[np.ndarray]:
        return [np.asarray(im, dtype=np.float32) for im in images]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(image, dtype=np.float32)


@dataclass
class ClassicalRunner:
    """A method of :mod:`semray.classical` with fixed parameter overrides."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    oracle: bool = False
    use_ray: bool | None = None
    kind: str = "classical"
    version: str = ""
    _single: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.method + (ORACLE_SUFFIX if self.oracle else "")

    def run_many(self, images: Sequence[np.ndarray], true_sigmas: Sequence[float]) -> list[np.ndarray]:
        from semray.classical import denoise_many

        sigma = [float(s) for s in true_sigmas] if self.oracle else None
        return denoise_many(list(images), self.method, sigma=sigma, use_ray=self.use_ray, **self.params)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self._single is None:
            from semray.infer import Denoiser

            self._single = Denoiser(method=self.method, classical_params=self.params)
        return self._single(image)


class ModelRunner:
    """A trained model run through the tiled inference engine."""

    kind = "model"
    oracle = False

    def __init__(self, entry: ModelEntry, tile: int | None = None, device: str = "auto") -> None:
        from semray.config.infer import InferConfig
        from semray.infer import Denoiser

        tiling = {"tiling": {"tile": tile}} if tile is not None else {}
        self.denoiser = Denoiser.from_config(InferConfig(model=entry.spec, device=device, **tiling))
        self.device = str(self.denoiser.device)
        self.spec = entry.spec
        self.name = str(self.denoiser.name)
        self.version = str(self.denoiser.version)
        self.label = entry.label or self.name

    def run_many(self, images: Sequence[np.ndarray], true_sigmas: Sequence[float]) -> list[np.ndarray]:
        return [self(im) for im in images]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self.denoiser(np.asarray(image, dtype=np.float32)), dtype=np.float32)


def build_runners(cfg: MethodsConfig, use_ray: bool | None = None) -> list[MethodRunner]:
    """Runners in report order: noisy, models (config order), classical (config order), oracles.

    Raises:
        ConfigError: a model spec names nothing loadable (the message says which and why).
        ValueError: two methods end up with the same label (give models distinct ``label`` values).
    """
    runners: list[MethodRunner] = [NoisyRunner()] if cfg.include_noisy else []
    for entry in cfg.model_entries():
        try:
            runners.append(ModelRunner(entry, cfg.tile, cfg.device))
        except (LookupError, ValueError, OSError) as e:  # ModelNotFoundError, ModelStoreError, I/O
            raise ConfigError(f"methods.models: cannot load {entry.spec!r}: {e}") from e
    for m in cfg.classical:
        runners.append(ClassicalRunner(m, dict(cfg.classical_params.get(m, {})), False, use_ray))
    if cfg.oracle_sigma:
        for m in cfg.classical:
            runners.append(ClassicalRunner(m, dict(cfg.classical_params.get(m, {})), True, use_ray))
    labels = [r.label for r in runners]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"methods share the label(s) {dup}; give models a distinct `label`")
    return runners


@contextmanager
def limited_threads(threads: int) -> Any:
    """Limit torch and BLAS/OpenMP to ``threads`` threads inside the block (restored afterwards)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def seconds_per_megapixel(
    fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, repeats: int = 3, threads: int = 1
) -> float:
    """Median wall time of ``fn(image)`` over ``repeats`` runs after one untimed warm-up, in s/MP.

    The warm-up absorbs one-off costs (lazy imports, first-call allocation, kernel selection) that a
    long-running service pays once. Every method is timed by this same function on the same image.
    """
    mpix = np.asarray(image).size / 1e6
    with limited_threads(threads):
        fn(image)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(image)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / mpix
