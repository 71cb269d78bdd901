"""Cluster deployment configs: the Ray cluster launcher file and the KubeRay manifests.

``cluster.yaml`` is checked the way ``ray up`` checks a config before it talks to a cloud: Ray's own
JSON schema (``ray/autoscaler/ray-schema.json``) and Ray's ``prepare_config`` + ``validate_config``
(provider defaults filled in, offline). The KubeRay manifests are checked against a structural schema
of the fields semray relies on (KubeRay's CRD OpenAPI schema is not available offline), plus the
cross-file facts that make them work together: Ray version, image, MLflow Service, shared volume.
Every check has a broken-input twin showing that it rejects what it should.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY = ROOT / "deploy" / "kuberay"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCS = ROOT / "docs" / "cluster.md"
TUNE_ENTRYPOINT = "python jobs/tune_losses.py --config configs/tune_cluster.yaml"
RAY_MAJOR_MINOR = ".".join(ray.__version__.split(".")[:2])

Doc = dict[str, Any]


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def _parsed(path: Path) -> list[Doc]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def _load(path: Path) -> Doc:
    """A fresh copy of a one-document YAML file (tests mutate what they get)."""
    (doc,) = _parsed(path)
    return copy.deepcopy(doc)


def _load_all(path: Path) -> list[Doc]:
    return copy.deepcopy(_parsed(path))


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher config
# ---------------------------------------------------------------------------------------------


@cache
def _ray_schema() -> Doc:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_validate(cfg: Doc) -> Doc:
    """Ray's checks on a launcher config, offline; returns the prepared config or raises.

    The raw file must satisfy Ray's JSON schema; ``prepare_config`` then merges the AWS provider
    defaults and per-node-type worker bounds, and ``validate_config`` re-checks the schema plus the
    cross-field rules (head type defined, sum of min_workers within max_workers). No cloud calls.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cfg, _ray_schema())
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture
def cluster() -> Doc:
    return _load(CLUSTER_YAML)


def _node_types(cfg: Doc) -> dict[str, Doc]:
    return cfg["available_node_types"]


def test_cluster_yaml_passes_rays_schema_and_validation(cluster: Doc) -> None:
    prepared = ray_validate(cluster)
    # prepare_config really merged the provider defaults and bounded the head at zero extra workers.
    assert "cluster_synced_files" in prepared
    assert prepared["available_node_types"][cluster["head_node_type"]]["max_workers"] == 0
    # The per-type ceilings are what the global ceiling promises.
    workers = [t for n, t in _node_types(cluster).items() if n != cluster["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) == cluster["max_workers"]


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    *parents, leaf = path.split(".")

    def mutate(cfg: Doc) -> None:
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value

    return mutate


def _delete(path: str) -> Callable[[Doc], None]:
    *parents, leaf = path.split(".")

    def mutate(cfg: Doc) -> None:
        node = cfg
        for key in parents:
            node = node[key]
        del node[leaf]

    return mutate


BROKEN_LAUNCHER_CONFIGS = {
    "misspelled top-level key": (_set("head_node_typ", "head"), "Additional properties"),
    "no provider": (_delete("provider"), "'provider' is a required property"),
    "node type without resources": (
        _delete("available_node_types.gpu_l4.resources"),
        "'resources' is a required property",
    ),
    "negative GPU count": (_set("available_node_types.gpu_l4.resources.GPU", -1), "less than the minimum"),
    "fractional GPU count": (
        _set("available_node_types.gpu_l4.resources.GPU", 0.5),
        "is not of type 'integer'",
    ),
    "min_workers as a string": (
        _set("available_node_types.gpu_l4.min_workers", "0"),
        "is not of type 'integer'",
    ),
    "unknown docker option": (_set("docker.gpus", "all"), "Additional properties"),
    "setup command not a list": (_set("setup_commands", "pip install -e ."), "is not of type 'array'"),
    "head type not a node type": (
        _set("head_node_type", "gpu_head"),
        "must be one of `available_node_types`",
    ),
    "min_workers above max_workers": (
        _set("available_node_types.gpu_l4.min_workers", 99),
        "smaller than the sum of `min_workers`",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_LAUNCHER_CONFIGS))
def test_rays_validation_rejects_broken_cluster_config(cluster: Doc, case: str) -> None:
    mutate, message = BROKEN_LAUNCHER_CONFIGS[case]
    mutate(cluster)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        ray_validate(cluster)


def test_cluster_image_is_the_installed_ray_release(cluster: Doc) -> None:
    repo, tag = cluster["docker"]["image"].split(":")
    assert repo == "rayproject/ray"
    # Same Ray on the cluster as on the machine running `ray up` / `ray job submit`.
    assert tag.startswith(f"{ray.__version__}-"), tag
    assert tag.endswith("-gpu") or "-cu" in tag, f"not a CUDA build: {tag}"


def test_head_only_coordinates_and_gpu_types_scale_from_zero(cluster: Doc) -> None:
    types = _node_types(cluster)
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values()), "idle clusters must cost only the head"
    gpu_counts = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert 1 in gpu_counts and 8 in gpu_counts, gpu_counts


def test_gpu_node_types_fit_semray_train_workers(cluster: Doc) -> None:
    """A GPU node of every type can run one Train worker per GPU and still feed it with data tasks."""
    from semray.config.train import ScalingSection

    scaling = ScalingSection(use_gpu=True)
    for name, node in _node_types(cluster).items():
        gpus = node["resources"].get("GPU", 0)
        if not gpus:
            continue
        cpus = node["resources"]["CPU"]
        # One {CPU: cpus_per_worker, GPU: 1} bundle per GPU (semray.train.runner) plus a data task.
        assert cpus >= gpus * scaling.cpus_per_worker + scaling.data_cpus, name


def _start_command(commands: list[str]) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    return starts[0]


def _mlflow_server_port(cluster: Doc) -> int:
    server = [c for c in cluster["head_setup_commands"] if "mlflow server" in c]
    assert len(server) == 1, "the head must start exactly one MLflow server"
    match = re.search(r"--port[ =](\d+)", server[0])
    assert match and "--host 0.0.0.0" in server[0], server[0]
    return int(match.group(1))


def test_every_node_starts_ray_with_token_auth_and_the_tracking_uri(cluster: Doc) -> None:
    port = _mlflow_server_port(cluster)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmd = _start_command(cluster[key])
        before_start = cmd[: cmd.index("ray start")]
        # Set in the same shell before `ray start`, so the raylet and every worker process inherit it.
        assert "RAY_AUTH_MODE=token" in before_start, key
        uri = re.search(r'MLFLOW_TRACKING_URI="(http://[^"]+)"', before_start)
        assert uri, key
        assert uri.group(1).endswith(f":{port}"), (key, uri.group(1))
    # Workers address the head by the IP the autoscaler substitutes, never by localhost.
    assert "$RAY_HEAD_IP:" in _start_command(cluster["worker_start_ray_commands"])


def test_project_is_mounted_and_installed_after_cuda_torch(cluster: Doc) -> None:
    mounts = cluster["file_mounts"]
    project = [remote for remote, local in mounts.items() if local == "."]
    assert len(project) == 1, mounts
    setup = cluster["setup_commands"]
    install = [i for i, c in enumerate(setup) if re.search(rf"pip install .*-e {re.escape(project[0])}\b", c)]
    torch = [i for i, c in enumerate(setup) if "torch" in c and "download.pytorch.org/whl/cu" in c]
    assert install and torch and torch[0] < install[0], setup


def test_auth_token_is_mounted_from_the_users_home(cluster: Doc) -> None:
    token_mounts = {r: loc for r, loc in cluster["file_mounts"].items() if r.endswith("/.ray/auth_token")}
    assert list(token_mounts.values()) == ["~/.ray/auth_token"], token_mounts


def _launcher_commands(cfg: Doc) -> list[str]:
    keys = ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in cfg.get(k, [])]


def _bash_parses(cmd: str) -> bool:
    return subprocess.run(["bash", "-n", "-c", cmd], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")
def test_launcher_shell_commands_parse(cluster: Doc) -> None:
    assert not _bash_parses("echo 'unterminated")  # `bash -n` does catch a quoting mistake
    commands = _launcher_commands(cluster)
    assert len(commands) >= 6
    assert [c for c in commands if not _bash_parses(c)] == []


# ---------------------------------------------------------------------------------------------
# KubeRay manifests: structural schema of what semray relies on
# ---------------------------------------------------------------------------------------------

_QUANTITY = {"type": ["string", "integer"]}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "image": {"type": "string", "pattern": r"^[\w.\-/:]+:[\w.\-]+$"},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
            },
        },
        "resources": {
            "type": "object",
            "required": ["limits"],
            "properties": {
                "limits": {
                    "type": "object",
                    "required": ["cpu", "memory"],
                    "additionalProperties": _QUANTITY,
                },
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
            },
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
# Field names from KubeRay's ray.io/v1 Go API types; unknown names are typos here.
_HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "rayStartParams": _START_PARAMS,
        "template": _POD_TEMPLATE,
        "serviceType": {"type": "string"},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "resources": {"type": "object"},
        "labels": {"type": "object"},
    },
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "rayStartParams": _START_PARAMS,
        "template": _POD_TEMPLATE,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "resources": {"type": "object"},
        "labels": {"type": "object"},
    },
}


def _at(path: str, schema: Doc) -> Doc:
    """A schema applying ``schema`` at a dotted object path: ``a.b`` -> properties.a.properties.b."""
    for key in reversed(path.split(".")):
        schema = {"properties": {key: schema}}
    return schema


# A worker group whose pod has a container with a GPU limit.
_GPU_GROUP = _at(
    "template.spec.containers", {"contains": _at("resources.limits", {"required": ["nvidia.com/gpu"]})}
)
_RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "authOptions": {
            "type": "object",
            "properties": {"mode": {"enum": ["token", "disabled"]}},
        },
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": {"type": "object"},
        "suspend": {"type": "boolean"},
        "headGroupSpec": _HEAD_GROUP,
        # semray trains on GPUs: at least one worker group must ask Kubernetes for them.
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": _WORKER_GROUP, "contains": _GPU_GROUP},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
KUBERAY_SCHEMAS: dict[str, Doc] = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayCluster"},
            "metadata": _METADATA,
            "spec": _RAY_CLUSTER_SPEC,
        },
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec"],
                "additionalProperties": False,
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "runtimeEnvYAML": {"type": "string"},
                    "rayClusterSpec": _RAY_CLUSTER_SPEC,
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "submitterConfig": {"type": "object"},
                    "submitterPodTemplate": _POD_TEMPLATE,
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "entrypointNumCpus": {"type": "number", "minimum": 0},
                    "entrypointNumGpus": {"type": "number", "minimum": 0},
                    "metadata": {"type": "object"},
                    "jobId": {"type": "string"},
                    "suspend": {"type": "boolean"},
                },
            },
        },
    },
}


def _cluster_spec(doc: Doc) -> Doc:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_containers(doc: Doc) -> list[Doc]:
    spec = _cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def kuberay_problems(doc: Doc) -> list[str]:
    """Everything wrong with a RayCluster/RayJob manifest for semray, empty when it is fine."""
    schema = KUBERAY_SCHEMAS.get(doc.get("kind"))  # type: ignore[arg-type]
    if schema is None:
        return [f"kind {doc.get('kind')!r} is not RayCluster or RayJob"]
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    if errors:
        return errors
    problems = []
    spec = _cluster_spec(doc)
    version = spec["rayVersion"]
    if ".".join(version.split(".")[:2]) != RAY_MAJOR_MINOR:
        problems.append(f"rayVersion {version} is not the installed Ray {ray.__version__}")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("Ray token authentication (authOptions.mode: token) is off")
    for c in _ray_containers(doc):
        repo, tag = c["image"].rsplit(":", 1)
        stock = repo == "rayproject/ray" and tag.startswith(f"{RAY_MAJOR_MINOR}.")
        if not stock and f"ray{RAY_MAJOR_MINOR}." not in tag:
            problems.append(f"{c['name']}: image {c['image']} is not built on Ray {RAY_MAJOR_MINOR}")
        if not _env(c).get("MLFLOW_TRACKING_URI", "").startswith("http"):
            problems.append(f"{c['name']}: MLFLOW_TRACKING_URI is not a tracking server URL")
    if doc["kind"] == "RayJob" and doc["spec"]["entrypoint"].strip() != TUNE_ENTRYPOINT:
        problems.append(f"entrypoint is {doc['spec']['entrypoint']!r}, expected {TUNE_ENTRYPOINT!r}")
    return problems


def _kuberay_docs() -> dict[str, Doc]:
    return {p: _load(KUBERAY / p) for p in ("raycluster.yaml", "rayjob-tune.yaml")}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-tune.yaml"])
def test_kuberay_manifest_is_sound(name: str) -> None:
    assert kuberay_problems(_kuberay_docs()[name]) == []


def _gpu_limits(doc: Doc) -> Doc:
    groups = _cluster_spec(doc)["workerGroupSpecs"]
    gpu = [g for g in groups if "gpu" in g["groupName"]]
    return gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]


Mutation = Callable[[Doc], Any]

# Each broken variant and a fragment of the problem it must be reported as.
BROKEN_MANIFESTS: dict[str, tuple[Mutation, str]] = {
    "old apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "'ray.io/v1' was expected"),
    "misspelled workerGroupSpecs": (
        lambda d: _cluster_spec(d).update(workerGroupSpec=_cluster_spec(d).pop("workerGroupSpecs")),
        "'workerGroupSpecs' is a required property",
    ),
    "no GPU limit on any group": (
        lambda d: _gpu_limits(d).pop("nvidia.com/gpu"),
        "are valid under the given schema",
    ),
    "container without image": (
        lambda d: _ray_containers(d)[0].pop("image"),
        "'image' is a required property",
    ),
    "container without resources": (
        lambda d: _ray_containers(d)[-1].pop("resources"),
        "'resources' is a required property",
    ),
    "rayVersion as a number": (lambda d: _cluster_spec(d).update(rayVersion=2.6), "is not of type 'string'"),
    "rayVersion of another Ray": (
        lambda d: _cluster_spec(d).update(rayVersion="2.9.3"),
        "is not the installed Ray",
    ),
    "negative minReplicas": (
        lambda d: _cluster_spec(d)["workerGroupSpecs"][0].update(minReplicas=-1),
        "less than the minimum of 0",
    ),
    "non-string rayStartParams": (
        lambda d: _cluster_spec(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "num-cpus: 0 is not of type 'string'",
    ),
    "image of another Ray": (
        lambda d: _ray_containers(d)[0].update(image="rayproject/ray:2.9.3-py311-gpu"),
        "is not built on Ray",
    ),
    "worker without MLflow URI": (lambda d: _ray_containers(d)[-1].pop("env"), "MLFLOW_TRACKING_URI"),
    "token auth off": (lambda d: _cluster_spec(d).pop("authOptions"), "token authentication"),
    "no metadata.name": (lambda d: d["metadata"].pop("name"), "'name' is a required property"),
}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-tune.yaml"])
@pytest.mark.parametrize("case", sorted(BROKEN_MANIFESTS))
def test_kuberay_checks_reject_broken_manifest(name: str, case: str) -> None:
    mutate, fragment = BROKEN_MANIFESTS[case]
    doc = _kuberay_docs()[name]
    mutate(doc)
    problems = kuberay_problems(doc)
    assert any(fragment in p for p in problems), problems


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["spec"].pop("entrypoint"), "'entrypoint' is a required property"),
        (lambda d: d["spec"].update(entrypoint="python jobs/tune_losses.py"), "expected"),
        (lambda d: d["spec"].update(entrypoints=d["spec"]["entrypoint"]), "Additional properties"),
    ],
    ids=["missing", "without the cluster config", "misspelled key"],
)
def test_kuberay_checks_reject_broken_rayjob_entrypoint(mutate: Mutation, fragment: str) -> None:
    doc = _kuberay_docs()["rayjob-tune.yaml"]
    mutate(doc)
    problems = kuberay_problems(doc)
    assert any(fragment in p for p in problems), problems


def _mlflow_objects() -> dict[str, Doc]:
    return {d["kind"]: d for d in _load_all(KUBERAY / "mlflow.yaml")}


def _mlflow_server_args() -> dict[str, str]:
    container = _mlflow_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["mlflow", "server"]
    return dict(a.removeprefix("--").split("=", 1) for a in container["command"][2:])


def test_ray_pods_point_at_the_mlflow_service() -> None:
    service = _mlflow_objects()["Service"]
    port = service["spec"]["ports"][0]["port"]
    assert int(_mlflow_server_args()["port"]) == port
    for doc in _kuberay_docs().values():
        for c in _ray_containers(doc):
            url = urlsplit(_env(c)["MLFLOW_TRACKING_URI"])
            assert (url.hostname, url.port) == (service["metadata"]["name"], port), c["name"]


def test_mlflow_image_is_the_installed_mlflow_release() -> None:
    import importlib.metadata

    container = _mlflow_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{importlib.metadata.version('mlflow')}"


@pytest.mark.slow
def test_mlflow_server_accepts_the_ray_pods_host_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 answers 403 to Host headers outside --allowed-hosts; the Service name must pass."""
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header

    # `mlflow server --allowed-hosts X` hands X to the server through this variable.
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", _mlflow_server_args()["allowed-hosts"])
    allowed = get_allowed_hosts_from_env()
    assert allowed
    uri = _env(_ray_containers(_kuberay_docs()["raycluster.yaml"])[0])["MLFLOW_TRACKING_URI"]
    host = urlsplit(uri).netloc
    assert is_allowed_host_header(allowed, host)
    assert is_allowed_host_header(allowed, "mlflow.semray.svc.cluster.local:5000")
    assert is_allowed_host_header(allowed, "localhost:5000")  # kubectl port-forward
    assert not is_allowed_host_header(allowed, "attacker.example.com:5000")


def test_shared_volume_is_defined_and_read_write_many() -> None:
    claims = {d["metadata"]["name"]: d for d in _load_all(KUBERAY / "storage.yaml")}
    for doc in _kuberay_docs().values():
        spec = _cluster_spec(doc)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                home = _env(c)["SEMRAY_HOME"]
                mount = [m for m in c["volumeMounts"] if m["mountPath"] == home]
                assert mount, (c["name"], home)
                claim = volumes[mount[0]["name"]]["persistentVolumeClaim"]["claimName"]
                assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]


def _dockerfile() -> tuple[str, str, str]:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M)
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)
    copy_to = re.search(r"^COPY (?:--\S+ )*\. (\S+)$", text, re.M)
    assert base and workdir and copy_to, "Dockerfile layout changed"
    return base.group(1), workdir.group(1), copy_to.group(1)


def test_image_is_built_on_the_installed_ray_and_runs_the_job_from_its_copy() -> None:
    base, workdir, copied_to = _dockerfile()
    assert base.startswith(f"rayproject/ray:{ray.__version__}-"), base
    assert workdir == copied_to
    rayjob = _kuberay_docs()["rayjob-tune.yaml"]
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env == {"working_dir": copied_to}


def test_rayjob_entrypoint_files_exist() -> None:
    argv = shlex.split(TUNE_ENTRYPOINT)
    for rel in (argv[1], argv[argv.index("--config") + 1]):
        assert (ROOT / rel).is_file(), f"{rel} (referenced by the RayJob and docs/cluster.md) is missing"


# ---------------------------------------------------------------------------------------------
# Nothing secret is committed; the docs point at files that exist
# ---------------------------------------------------------------------------------------------

_TOKEN_PATTERNS = [
    re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?(?!\$)[A-Za-z0-9+/_\-]{8,}"),
    re.compile(r"\b[0-9a-f]{32,}\b"),  # ray get-auth-token writes a 32-hex-digit token
    re.compile(r"--from-literal=auth_token=(?!\$)\S+"),
]


def committed_secrets(text: str) -> list[str]:
    return [m.group(0) for p in _TOKEN_PATTERNS for m in p.finditer(text)]


def _deploy_files() -> list[Path]:
    return [CLUSTER_YAML, DOCS, *sorted((ROOT / "deploy").rglob("*"))]


def test_no_token_is_committed() -> None:
    files = [p for p in _deploy_files() if p.is_file()]
    assert len(files) >= 7
    for path in files:
        assert committed_secrets(path.read_text()) == [], path
    assert not [p for p in files if p.name == "auth_token"]


@pytest.mark.parametrize(
    "leak",
    [
        "export RAY_AUTH_TOKEN=3f6c2a1b9e8d7c6b5a4f3e2d1c0b9a8f",
        "kubectl create secret generic semray --from-literal=auth_token=hunter2hunter2",
        "token: 0123456789abcdef0123456789abcdef",
    ],
)
def test_secret_scan_catches_a_leaked_token(leak: str) -> None:
    assert committed_secrets(f"# docs\n{leak}\n")


def test_docs_reference_existing_deploy_files() -> None:
    text = DOCS.read_text()
    referenced = set(
        re.findall(r"(?<![\w/.])((?:deploy/[\w/.\-]+|cluster)\.(?:yaml|md)|deploy/docker/\w+)", text)
    )
    assert {"cluster.yaml", "deploy/kuberay/raycluster.yaml", "deploy/kuberay/rayjob-tune.yaml"} <= referenced
    missing = sorted(r for r in referenced if not (ROOT / r).exists())
    assert missing == []
    assert TUNE_ENTRYPOINT in text
