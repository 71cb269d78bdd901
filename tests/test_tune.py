"""Loss/architecture search: config validation, the objective, the report, and end-to-end Ray jobs
(a real Ray head on loopback, ``jobs/tune_losses.py`` submitted through the Jobs API, MLflow checked)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from semray.config.base import ConfigError, load_config
from semray.config.tune import SCORE_METRIC, Dimension, ObjectiveSection, TuneConfig, trial_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RAY_BIN = Path(sys.executable).parent / "ray"

# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["tune_tiny", "tune_laptop", "tune_cluster"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(TuneConfig, CONFIGS / f"{name}.yaml")
    assert cfg.space, "a search needs at least one dimension"
    assert cfg.scheduler.kind == "asha"
    # the default objective is not PSNR alone: defect preservation counts
    assert cfg.objective.weights.get("val_defect_recall", 0) > 0
    if name == "tune_cluster":
        assert cfg.base.scaling.use_gpu
        assert cfg.run.storage_path and not cfg.run.storage_path.startswith(("data/", "./"))
        assert {"loss.alpha", "loss.beta", "model.depth", "model.residual", "model.edge_input"} <= set(
            cfg.space
        )


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("space.loss.alpha={uniform: [-0.5, 1.0]}", "space.loss.alpha"),  # negative weight
        ("space.loss.beta.choice=[0.0, -1.0]", "space.loss.beta"),
        ("space.loss.kind={choice: [composite, perceptual]}", "space.loss.kind"),  # unknown loss kind
        ("space.loss.gamma={uniform: [0, 1]}", "loss.gamma"),  # unknown loss term
        ("base.loss.beta=-0.1", "base.loss.beta"),
        ("objective.weights={val_accuracy: 1.0}", "val_accuracy"),
        ("space.loss.alpha={uniform: [0, 1], choice: [1]}", "exactly one"),
        ("space.optim.lr={loguniform: [0, 1]}", "loguniform bounds"),
        ("scheduler.reduction_factor=1", "scheduler.reduction_factor"),
    ],
)
def test_bad_config_names_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TuneConfig, CONFIGS / "tune_tiny.yaml", [override])


def test_a_trial_uses_only_the_loss_weights_of_the_kind_it_drew() -> None:
    """A space may sample loss.kind with weights of several kinds; a trial keeps those of its own kind
    (the others never affected it), and a weight of another kind is still range-checked on that kind."""
    from semray.config.loss import CompositeLossConfig, MseSsimLossConfig

    base = load_config(TuneConfig, CONFIGS / "tune_laptop.yaml").base
    drawn = {"loss.alpha": 0.3, "loss.ssim_lambda": 0.4, "loss.defect_weight": 1.0}
    mse = trial_config(base, {"loss.kind": "mse_ssim", **drawn}).loss
    assert isinstance(mse, MseSsimLossConfig) and (mse.ssim_lambda, mse.defect_weight) == (0.4, 1.0)
    assert "alpha" not in mse.model_dump() and mse.ssim_win_size == 11  # mse_ssim's own default
    comp = trial_config(base, {"loss.kind": "composite", **drawn}).loss
    assert (
        isinstance(comp, CompositeLossConfig) and comp.alpha == 0.3 and "ssim_lambda" not in comp.model_dump()
    )
    assert comp.ms_ssim_scales == base.loss.ms_ssim_scales  # the base's composite settings are kept
    with pytest.raises(ConfigError, match=r"space\.loss\.ssim_lambda: value -1\.0 is invalid"):
        load_config(TuneConfig, CONFIGS / "tune_tiny.yaml", ["space.loss.ssim_lambda={uniform: [-1.0, 0.5]}"])


def test_nested_overrides_replace_dotted_dimensions() -> None:
    cfg = load_config(TuneConfig, CONFIGS / "tune_tiny.yaml", ["space.loss.beta.grid=[0.25, 0.75]"])
    assert cfg.space["loss.beta"] == Dimension(grid=[0.25, 0.75])
    assert cfg.space["loss.alpha"].uniform == (0.0, 1.0)  # untouched


def test_trial_config_applies_dotted_params() -> None:
    base = load_config(TuneConfig, CONFIGS / "tune_tiny.yaml").base
    cfg = trial_config(base, {"loss.alpha": 0.25, "model.residual": True, "optim.lr": 1e-3})
    assert (cfg.loss.alpha, cfg.model.residual, cfg.optim.lr) == (0.25, True, 1e-3)
    assert cfg.loss.beta == base.loss.beta and base.model.residual is False  # base not mutated
    with pytest.raises(ConfigError, match=r"model\.depth"):
        trial_config(base, {"model.depth": 0})


def test_objective_is_a_weighted_sum_with_nan_as_zero() -> None:
    obj = ObjectiveSection()
    assert obj.score({"val_psnr": 30.0, "val_defect_recall": 0.5}) == pytest.approx(35.0)
    assert obj.score({"val_psnr": 30.0, "val_defect_recall": float("nan")}) == pytest.approx(30.0)
    mixed = ObjectiveSection(weights={"val_ssim": 2.0, "val_loss": -1.0})
    assert mixed.score({"val_ssim": 0.8, "val_loss": 0.1, "val_psnr": 99.0}) == pytest.approx(1.5)


# ------------------------------------------------------------------------------------ pure helpers


def test_param_space_maps_every_dimension_kind() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    from semray.tune import param_space

    cfg = load_config(
        TuneConfig,
        CONFIGS / "tune_tiny.yaml",
        ["space.model.depth={randint: [2, 3]}", "space.loss.beta={grid: [0.0, 1.0]}"],
    )
    space = param_space(cfg)
    assert isinstance(space["loss.alpha"], Float) and isinstance(space["model.residual"], Categorical)
    assert space["loss.beta"] == {"grid_search": [0.0, 1.0]}
    depth = space["model.depth"]
    assert isinstance(depth, Integer) and (depth.lower, depth.upper) == (2, 4)  # upper made inclusive
    lr = space["optim.lr"]
    assert isinstance(lr.get_sampler(), Float._LogUniform)


def test_concurrent_trials_leave_cpus_for_ray_data() -> None:
    from semray.tune import concurrent_trials, trial_cpus

    cfg = load_config(TuneConfig, CONFIGS / "tune_tiny.yaml")
    assert trial_cpus(cfg) == pytest.approx(0.5 + 0.5 + 0.25)  # trial driver + 1 worker + 1 data task
    # 2 trials hold 2.5 CPUs and Ray Data's listing task / footer actors need a whole free CPU
    assert concurrent_trials(cfg, 4.0) == 2
    assert concurrent_trials(cfg, 3.0) == 1  # (3 - 1) / 1.25
    assert concurrent_trials(cfg, 2.0) == 0  # `ray start --head` on 2 cores: not even one trial fits
    assert concurrent_trials(cfg, 64.0) == cfg.search.max_concurrent_trials  # capped by the config


def test_worker_env_sizes_footer_readers_and_pins_the_cluster_address() -> None:
    import json

    from semray.tune import worker_env

    assert worker_env(8, {}) == {
        "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    assert worker_env(25, {})["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "3"  # 10 files per actor
    # what the user set is left alone
    assert "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in worker_env(
        8, {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "32"}
    )
    # inside a Ray job: the driver's GCS address goes to the workers unless the job's env sets one
    job = {"RAY_ADDRESS": "127.0.0.1:6379", "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})}
    assert worker_env(1, job)["RAY_ADDRESS"] == "127.0.0.1:6379"
    own = json.dumps({"runtime_env": {"env_vars": {"RAY_ADDRESS": "10.0.0.1:6379"}}})
    assert "RAY_ADDRESS" not in worker_env(1, {**job, "RAY_JOB_CONFIG_JSON_ENV_VAR": own})
    assert "RAY_ADDRESS" not in worker_env(1, {"RAY_ADDRESS": "127.0.0.1:6379"})  # not a job
    assert "RAY_ADDRESS" not in worker_env(1, {**job, "RAY_ADDRESS": "ray://head:10001"})


def test_best_epoch_stopping_and_variant_labels() -> None:
    from semray.tune import best_epoch, variant_name, was_stopped_early

    hist = [
        {"epoch": 0, SCORE_METRIC: 20.0},
        {"epoch": 1, SCORE_METRIC: float("nan")},
        {"epoch": 2, SCORE_METRIC: 22.5},
    ]
    assert best_epoch(hist)["epoch"] == 2
    assert best_epoch([{"epoch": 0, SCORE_METRIC: float("nan")}]) is None
    assert was_stopped_early(1, 3, "TERMINATED") and not was_stopped_early(3, 3, "TERMINATED")
    assert not was_stopped_early(1, 3, "ERROR")
    assert variant_name({"depth": 3, "base_width": 16, "residual": True, "edge_input": False}) == "d3-w16-res"


def test_pick_winner_keeps_the_init_weights_unless_a_trial_beats_them() -> None:
    from semray.tune_baseline import pick_winner

    assert pick_winner(25.0, None) == "trial"  # from scratch: nothing to keep
    assert pick_winner(25.01, 25.0) == "trial"
    assert pick_winner(25.0, 25.0) == "init"  # a tie keeps the weights that were already there
    assert pick_winner(24.0, 25.0) == "init"
    assert pick_winner(float("nan"), 25.0) == "init" and pick_winner(None, 25.0) == "init"


def test_a_fine_tuning_search_cannot_vary_the_architecture() -> None:
    base = {"init": "default", "data": {"shards": ["x"]}}
    ok = load_config(TuneConfig, {"base": base, "space": {"loss.alpha": {"uniform": [0, 1]}}})
    assert ok.base.init == "default"
    with pytest.raises(ConfigError, match=r"model.depth.*base.init='default'"):
        load_config(TuneConfig, {"base": base, "space": {"model.depth": {"choice": [2, 3]}}})


def test_report_writes_table_and_plot(tmp_path: Path) -> None:
    import pandas as pd
    from PIL import Image

    from semray.tune import write_report

    rows = [
        {"trial": f"t{i}", "variant": "d2-w4" if i % 2 else "d2-w4-res", "loss.alpha": 0.1 * i, "loss.beta": 0.5,
         SCORE_METRIC: 30.0 - i, "val_psnr": 25.0, "val_defect_recall": 0.5, "val_ssim": 0.8, "best_epoch": 2,
         "epochs": 3 - (i == 3) * 2, "stopped_early": i == 3, "status": "TERMINATED", "run_id": f"r{i}"}
        for i in range(4)
    ]  # fmt: skip
    files = write_report(rows, ["loss.alpha", "loss.beta"], tmp_path, "search x")
    assert [f.name for f in files] == ["summary.csv", "summary.md", "score_vs_loss_weights.png"]
    df = pd.read_csv(files[0])
    assert list(df["trial"]) == ["t0", "t1", "t2", "t3"] and df["stopped_early"].sum() == 1
    md = files[1].read_text().splitlines()
    assert md[4].startswith("| trial | variant | loss.alpha | loss.beta | tune_score")
    assert [line.split(" | ")[0] for line in md[6:]] == ["| t0", "| t1", "| t2", "| t3"]
    w, h = Image.open(files[2]).size
    assert w > 2 * h * 0.9  # two panels side by side (alpha, beta)


def test_cli_rejects_a_bad_config_before_any_ray_work(capsys: pytest.CaptureFixture[str]) -> None:
    from semray.cli import main

    t0 = time.perf_counter()
    rc = main(
        ["tune", "--config", str(CONFIGS / "tune_tiny.yaml"), "--set", "space.loss.alpha={uniform: [-1, 1]}"]
    )
    assert rc == 2
    assert "space.loss.alpha" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------- end to end (Ray jobs)


def _kill_tree_under(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (our head's temp dir): the
    raylet's workers, the job driver and the dashboard agents of the head this test started."""
    me = os.getpid()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except OSError:
                pass


def _start_head(
    tmp: Path, env: dict[str, str], log: Any, attempts: int = 4
) -> tuple[subprocess.Popen[bytes], str]:
    """``ray start --head --block`` on loopback; returns the process and the dashboard (Jobs API) URL.

    Every port is given, none left to Ray's fixed defaults (8265, 52365, 10001, ...), which would clash
    with any other Ray on the machine. The raylet aborts if the dashboard agent has not written its
    port files within a fixed ~15 s of starting, which a loaded 2-core machine can miss; so a failed
    start is retried, on fresh ports, up to ``attempts`` times."""
    from ray.job_submission import JobSubmissionClient

    for attempt in range(attempts):
        ports = [free_port() for _ in range(7)]
        log.flush()
        start = len((tmp / "head.log").read_text(errors="replace"))
        proc = subprocess.Popen(
            [str(RAY_BIN), "start", "--head", "--block", f"--port={ports[0]}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}", "--num-cpus=4", "--include-dashboard=true",
             f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
             f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
             f"--ray-client-server-port={ports[6]}", f"--temp-dir={tmp}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        address = f"http://127.0.0.1:{ports[1]}"
        deadline = time.monotonic() + 240
        # the dashboard answers before the raylet is up: wait for `ray start` to say the node started
        while proc.poll() is None and time.monotonic() < deadline:
            if "Ray runtime started" in (tmp / "head.log").read_text(errors="replace")[start:]:
                try:
                    JobSubmissionClient(address).list_jobs()
                    return proc, address
                except Exception:
                    pass
            time.sleep(3)
        if attempt == attempts - 1:
            break
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        _kill_tree_under(str(tmp))  # leftovers of the failed try (GCS, agents)
    raise RuntimeError(f"ray start --head failed {attempts} times: {(tmp / 'head.log').read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A Ray head on loopback with its own temp dir, separate from the session's in-process Ray.

    Started with ``--block`` in a new session, so teardown ends exactly these processes (by process
    group and by the temp dir in their command lines) instead of ``ray stop``, which would stop every
    Ray on the machine."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # jobs run `python ...` from the PATH ray start was given: the one with semray installed
    env["PATH"] = f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}"
    # raylet waits this long for its agents; the default is too short on a loaded CI machine
    env.setdefault("RAY_agent_register_timeout_ms", "180000")
    # Ray 2.60 token auth: the head uses ~/.ray/auth_token (created if missing); the Jobs client below
    # sends it only in token mode, like `RAY_AUTH_MODE=token ray job submit` does
    env["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_MODE"] = "token"
    log = open(tmp / "head.log", "wb")
    proc = None
    try:
        proc, address = _start_head(tmp, env, log)
        yield {"address": address, "tmp": str(tmp)}
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _kill_tree_under(str(tmp))
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(head: dict[str, str], args: list[str], env_vars: dict[str, str]) -> tuple[Any, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"])
    job_id = client.submit_job(
        entrypoint=" ".join(["python", "jobs/tune_losses.py", *args]),
        runtime_env={
            "working_dir": str(ROOT),
            "excludes": [
                ".venv",
                "data",
                "mlruns",
                "test-artifacts",
                ".git",
                "*.db",
                "notebooks",
                "benchmarks",
            ],
            "env_vars": {"OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", **env_vars},
        },
    )
    return client, job_id


def _wait(client: Any, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status.value)
        time.sleep(2)
    client.stop_job(job_id)
    raise TimeoutError(
        f"job {job_id} still running after {timeout_s} s:\n{client.get_job_logs(job_id)[-4000:]}"
    )


@pytest.mark.slow
@pytest.mark.tune_e2e
@pytest.mark.timeout(3000)
def test_job_runs_search_and_mlflow_holds_parent_children_and_model(
    ray_head: dict[str, str], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client_ml = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # created here so artifacts land in tmp_path, not in the job's temporary copy of the project
    exp_id = client_ml.create_experiment("tune-e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    args = ["--config", "configs/tune_tiny.yaml", "--set", f"base.data.shards={tmp_path / 'shards'}",
            "--set", "mlflow.experiment=tune-e2e", "--set", "run.name=e2e",
            "--set", f"run.storage_path={tmp_path / 'tune'}", "--set", "mlflow.registered_model=tune-e2e-unet"]  # fmt: skip
    client, job_id = _submit(
        ray_head, args, {"MLFLOW_TRACKING_URI": uri, "SEMRAY_HOME": str(tmp_path / "home")}
    )
    # a few minutes on an idle 2-core machine; the margin is for a machine shared with other work
    status = _wait(client, job_id, timeout_s=2400)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    # the job says where the results are
    assert f"MLflow tracking URI: {uri}" in logs and f"MLflow experiment id: {exp_id}" in logs
    assert "MLflow parent run id" in logs and "registered model:     models:/tune-e2e-unet/1" in logs
    assert "best config:" in logs
    epochs = load_config(TuneConfig, CONFIGS / "tune_tiny.yaml").base.optim.epochs

    parents = client_ml.search_runs([exp_id], "tags.`semray.kind` = 'tune-search'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "e2e"
    children = client_ml.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4  # one per trial (search.num_samples)
    assert {c.data.tags["semray.kind"] for c in children} == {"tune-trial"}
    assert len({c.data.tags["semray.trial_id"] for c in children}) == 4
    for c in children:
        assert c.info.status == "FINISHED"
        assert "loss.alpha" in c.data.params and "model.residual" in c.data.params
        psnr = client_ml.get_metric_history(c.info.run_id, "val_psnr")
        scores = client_ml.get_metric_history(c.info.run_id, SCORE_METRIC)
        # a trial ASHA stops may still finish (and log) the epoch it was in when the stop arrived
        assert len(psnr) >= len(scores) >= 1
        assert all(math.isfinite(m.value) for m in psnr)
        if c.data.tags.get("semray.stopped_early") == "false":
            assert len(psnr) == len(scores) == epochs
    stopped = [c for c in children if c.data.tags.get("semray.stopped_early") == "true"]
    complete = [c for c in children if c.data.tags.get("semray.stopped_early") == "false"]
    assert stopped, "ASHA stopped no trial"
    assert all(c.data.metrics["epochs_done"] < epochs for c in stopped)
    assert complete and all(
        len(client_ml.get_metric_history(c.info.run_id, "val_psnr")) == epochs for c in complete
    )
    assert all("best_tune_score" in c.data.metrics for c in complete)

    # the best trial is a complete one with the highest score; its model is registered and tagged
    best = max(complete, key=lambda c: c.data.metrics["best_tune_score"])
    assert parent.data.tags["semray.best_run_id"] == best.info.run_id
    assert parent.data.metrics[f"best_{SCORE_METRIC}"] == pytest.approx(best.data.metrics["best_tune_score"])
    mv = client_ml.get_model_version("tune-e2e-unet", "1")
    assert mv.run_id == best.info.run_id
    assert mv.tags["semray.search_run_id"] == parent.info.run_id
    assert str(client_ml.get_model_version_by_alias("tune-e2e-unet", "tuned").version) == "1"
    arts = {a.path for a in client_ml.list_artifacts(parent.info.run_id, "summary")}
    assert arts == {"summary/summary.csv", "summary/summary.md", "summary/score_vs_loss_weights.png"}


@pytest.mark.slow
@pytest.mark.tune_e2e
def test_job_with_bad_config_fails_at_once(ray_head: dict[str, str], tmp_path: Path) -> None:
    args = ["--config", "configs/tune_tiny.yaml", "--set", "'space.loss.alpha={uniform: [-1.0, 1.0]}'"]
    client, job_id = _submit(ray_head, args, {"SEMRAY_HOME": str(tmp_path / "home")})
    t0 = time.monotonic()
    status = _wait(client, job_id, timeout_s=120)
    logs = client.get_job_logs(job_id)
    assert status == "FAILED", logs[-3000:]
    assert "space.loss.alpha" in logs and "greater than or equal to 0" in logs
    assert "Traceback" not in logs
    assert time.monotonic() - t0 < 60  # the driver fails on its config, not after trials start
    assert not (tmp_path / "home" / "tune").exists()
