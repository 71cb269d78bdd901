"""Environment for semray's Ray workers: settings that make Ray Data fit small machines.

Pure (no Ray import): :func:`worker_env` returns the variables to pass as a job's
``runtime_env={"env_vars": ...}`` (or to set before a local ``ray.init``), used by training, the
search and the tests.
"""

from __future__ import annotations

import math
import os

#: Files one Ray Data ``FooterReader`` actor reads per call (Ray 2.60's Parquet reader batches 10).
_FOOTER_FILES_PER_ACTOR = 10


def worker_env(n_files: int = 1, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables the search's Ray workers get (through the job's runtime env).

    * ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``: Ray 2.60's Parquet reader starts a pool of 32
      ``FooterReader`` actors (a new Python process each, placed only where a whole CPU is free) every
      time a dataset is executed, i.e. every epoch of every trial. A shard set of ``n_files`` files needs
      ``ceil(n_files / 10)`` of them; the rest only cost process start-ups, which on a 2-core machine
      stalled the trials' data pipelines for minutes.
    * ``RAY_DATA_DISABLE_PROGRESS_BARS=1``: the trials' Ray Data progress bars, interleaved, would
      drown the search's own output in the job log.
    * ``RAY_ADDRESS`` (inside a Ray job only, a ``host:port`` GCS address): Ray Train's placement-group
      cleaner looks the cluster up by address; without it, a second Ray on the same machine (another
      ``ray start`` with its own temp dir) makes that lookup fail and its thread die.

    Values the job's own runtime env or the environment already set are left alone.

    Args:
        n_files: Parquet files of the training data.
        environ: the environment to read (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in env:
        # every trial's dataset would redraw its bars into the one job log, every epoch
        out["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in env:
        out["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(max(1, math.ceil(n_files / _FOOTER_FILES_PER_ACTOR)))
    addr = env.get("RAY_ADDRESS", "")
    if env.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and ":" in addr and "://" not in addr:
        import json

        job_env = (json.loads(env["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env") or {}).get(
            "env_vars"
        ) or {}
        if "RAY_ADDRESS" not in job_env:
            out["RAY_ADDRESS"] = addr
    return out
