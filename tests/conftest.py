"""Shared fixtures and helpers: one local Ray per test session, an isolated MLflow store per test, tiny
shards and models, free ports and a health poll (test modules import the helpers: ``from conftest import``)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Keep numerical libraries from oversubscribing the two cores the CI machine has.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with more logical CPUs than cores, so Train workers and Data tasks don't deadlock."""
    import ray

    # Ray Data's Parquet reader would start 32 footer-reader processes per dataset execution
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    for attempt in range(3):  # a heavily loaded machine can miss Ray's fixed 30 s node start-up deadline
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as e:  # Ray raises a bare Exception for its start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for one test; returns its tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session", autouse=True)
def _isolated_semray_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never touch the user's ~/.semray store: the default store points into a temp folder."""
    home = tmp_path_factory.mktemp("semray_home")
    old = os.environ.get("SEMRAY_HOME")
    os.environ["SEMRAY_HOME"] = str(home)
    yield
    if old is None:
        os.environ.pop("SEMRAY_HOME", None)
    else:
        os.environ["SEMRAY_HOME"] = old


# ------------------------------------------------------------------------ tiny inputs, shared helpers

#: A shard set that renders in about a second: 48x48 px, 8 train + 4 val images, 4 rows per shard.
TINY_DATA = ["height=48", "width=48", "n_train=8", "n_val=4", "n_test=0", "rows_per_shard=4", "seed=3"]


def make_tiny_shards(out: Path, *overrides: str) -> Path:
    """Render :data:`TINY_DATA` (``overrides`` applied on top, e.g. ``"seed=21"``) into ``out``."""
    from semray.config.base import load_config
    from semray.config.data import DatasetConfig
    from semray.data import synthesize_shards

    synthesize_shards(
        load_config(DatasetConfig, None, [*TINY_DATA, *overrides]), out, parallel=False, progress=False
    )
    return out


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`TINY_DATA` rendered once per test module."""
    return make_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))


def tiny_unet() -> Any:
    """The smallest U-Net the tests use: 4 base channels, depth 2 (a ``UNetConfig``)."""
    from semray.config.model import UNetConfig

    return UNetConfig(base_width=4, depth=2)


def save_tiny_model(folder: Path, card: dict[str, Any] | None = None, seed: int | None = None) -> Path:
    """A :func:`tiny_unet` with fresh weights (``torch.manual_seed(seed)`` first when given) saved in the
    model store format into ``folder``; returns the folder."""
    import torch

    from semray.models.store import save_model
    from semray.models.unet import build_model

    if seed is not None:
        torch.manual_seed(seed)
    cfg = tiny_unet()
    return save_model(build_model(cfg), cfg, folder, card or {})


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, timeout_s: float = 60, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``url`` with GET until it answers 2xx; ``False`` after ``timeout_s`` or once ``proc`` exits.

    Used for the Serve app's ``api/health`` and a test ``mlflow server``'s ``/health``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if 200 <= r.status < 300:
                    return True
        except OSError:  # refused while starting up, or a 5xx (HTTPError is an OSError)
            pass
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def train_config(base: dict[str, Any], **sections: Any) -> Any:
    """A ``TrainConfig`` from ``base`` with ``sections`` applied: a dict merges into that section, ``None``
    removes the section, anything else replaces it."""
    from semray.config.base import load_config
    from semray.config.train import TrainConfig

    data = dict(base)
    for key, val in sections.items():
        if val is None:
            data.pop(key, None)
        else:
            data[key] = {**data.get(key, {}), **val} if isinstance(val, dict) else val
    return load_config(TrainConfig, data)


def tiny_train_base(shards: Path, tmp: Path) -> dict[str, Any]:
    """A run that takes seconds per epoch: 4-channel depth-2 U-Net, 32-px crops, 2 steps per epoch on
    :data:`TINY_DATA`, 2 workers, runs under ``tmp/runs`` (the sections :func:`train_config` takes)."""
    return {
        "seed": 5,
        "data": {"shards": [str(shards)], "crop_px": 32, "crops_per_image": 2, "batch_size": 4,
                 "val_crop_px": 32, "shuffle_buffer": 8, "noise_batch_images": 4},
        "model": {"base_width": 4, "depth": 2},
        "loss": {"kind": "composite", "ms_ssim_scales": 2},
        "optim": {"epochs": 3, "lr": 5e-3, "warmup_fraction": 0.0},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "data_cpus": 0.5},
        "checkpoint": {"keep_best": 5, "max_failures": 2},
        "validation": {"figure_every": 0, "figure_images": 2},
        "mlflow": {"experiment": "test-train", "registered_model": "test-unet", "alias": "candidate"},
        "run": {"storage_path": str(tmp / "runs")},
    }  # fmt: skip


def tiny_train_config(shards: Path, tmp: Path, **sections: Any) -> Any:
    """:func:`tiny_train_base` with ``sections`` applied (see :func:`train_config`)."""
    return train_config(tiny_train_base(shards, tmp), **sections)
