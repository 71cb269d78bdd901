"""Turn a model spec into a loaded model: the shipped default, a named or local model dir, or MLflow.

Specs (``semray denoise --model SPEC``, the app's model picker, evaluation configs):

- ``None`` or ``"default"``: the model shipped inside the package (no training, no network).
- ``NAME``: a model folder ``NAME`` in ``models_dir`` (e.g. the app's checkpoint folder) or among the
  shipped models.
- ``PATH``: a local model folder (``model.safetensors`` + ``card.json``), when ``allow_paths``.
- ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/NAME/latest``: a model registered in
  MLflow by :mod:`semray.train`; its safetensors weights and card travel with the MLflow model, so
  nothing is unpickled.

Weights are only ever read from safetensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from semray.models.store import CARD_FILE, WEIGHTS_FILE, load_model

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
DEFAULT_MODEL = "default"
#: Model names the app accepts: no separators, no leading dot, so a name can never leave its folder.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MLFLOW_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))$")


class ModelNotFoundError(LookupError):
    """A model spec names nothing that exists (or something that is not allowed)."""


@dataclass
class ResolvedModel:
    """A loaded model and where it came from.

    Attributes:
        model: the network in eval mode on CPU; input/output (N, 1, H, W) float32 in [0, 1].
        card: the model card (config, training summary, metrics).
        name: model name (folder or registered name).
        version: version string (card version, or the MLflow registry version).
        source: ``"shipped"``, ``"local"`` or ``"mlflow"``.
        location: folder or URI it was loaded from.
    """

    model: torch.nn.Module
    card: dict[str, Any]
    name: str
    version: str
    source: str
    location: str


def _is_model_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / CARD_FILE).is_file()


def _named_dir(name: str, models_dir: Path | None) -> tuple[Path, str] | None:
    if not MODEL_NAME_RE.match(name):
        return None
    for root, source in ((models_dir, "local"), (SHIPPED_MODELS_DIR, "shipped")):
        if root is None:
            continue
        cand = (Path(root) / name).resolve()
        # Defence in depth: the regex already forbids separators, but never leave the folder.
        if cand.parent == Path(root).resolve() and _is_model_dir(cand):
            return cand, source
    return None


def _from_dir(path: Path, source: str, name: str | None = None) -> ResolvedModel:
    model, card = load_model(path)
    return ResolvedModel(
        model=model,
        card=card,
        name=name or str(card.get("name") or path.name),
        version=str(card.get("version", "0")),
        source=source,
        location=str(path),
    )


def _from_mlflow(spec: str) -> ResolvedModel:
    import mlflow
    from mlflow import MlflowClient

    from semray.tracking import configure

    m = _MLFLOW_RE.match(spec)
    if not m:
        raise ModelNotFoundError(
            f"{spec!r} is not a model URI of the form models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest"
        )
    configure()
    client = MlflowClient()
    name = m["name"]
    try:
        if m["alias"]:
            version = client.get_model_version_by_alias(name, m["alias"]).version
        elif m["version"] == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ModelNotFoundError(f"registered model {name!r} has no versions")
            version = max(int(v.version) for v in versions)
        else:
            version = m["version"]
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    except ModelNotFoundError:
        raise
    except Exception as e:
        raise ModelNotFoundError(f"cannot load {spec!r} from MLflow ({type(e).__name__}: {e})") from e
    found = [p.parent for p in local.rglob(WEIGHTS_FILE) if _is_model_dir(p.parent)]
    if not found:
        raise ModelNotFoundError(
            f"{spec!r} has no semray weights ({WEIGHTS_FILE} + {CARD_FILE}); was it logged by semray.train?"
        )
    resolved = _from_dir(found[0], "mlflow", name=name)
    resolved.version = str(version)
    resolved.location = spec
    return resolved


def resolve_model(
    spec: str | Path | None = None, *, models_dir: str | Path | None = None, allow_paths: bool = True
) -> ResolvedModel:
    """Load the model a spec names (see module docstring).

    Args:
        spec: model spec; ``None`` means the shipped default.
        models_dir: extra folder of named model dirs (searched before the shipped models).
        allow_paths: accept filesystem paths; the web app passes ``False`` so user input can only name
            models inside the configured folders.

    Raises:
        ModelNotFoundError: nothing matches, or a path was given where paths are not allowed. The
            message lists the names that are available.
    """
    spec_s = DEFAULT_MODEL if spec is None else str(spec)
    if spec_s.startswith("models:/"):
        return _from_mlflow(spec_s)
    mdir = Path(models_dir) if models_dir is not None else None
    hit = _named_dir(spec_s, mdir)
    if hit is not None:
        return _from_dir(hit[0], hit[1], name=spec_s)
    if allow_paths:
        path = Path(spec_s).expanduser()
        if _is_model_dir(path):
            return _from_dir(path.resolve(), "local")
        if path.exists() or not MODEL_NAME_RE.match(spec_s):
            raise ModelNotFoundError(f"{path}: not a model folder (needs {WEIGHTS_FILE} and {CARD_FILE})")
    names = sorted(m["name"] for m in _local_models(mdir))
    raise ModelNotFoundError(f"unknown model {spec_s!r}; available: {', '.join(names) or 'none'}")


def _card_summary(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": card.get("description", ""),
        "model_config": card.get("model_config", {}),
        "loss": (card.get("training") or {}).get("loss", card.get("loss")),
        "metrics": card.get("metrics", {}),
        "params": card.get("param_count"),
        "created": card.get("created"),
    }


def _local_models(models_dir: Path | None) -> list[dict[str, Any]]:
    import json

    out = []
    seen = set()
    for root, source in ((models_dir, "local"), (SHIPPED_MODELS_DIR, "shipped")):
        if root is None or not Path(root).is_dir():
            continue
        for d in sorted(Path(root).iterdir()):
            if d.name in seen or not MODEL_NAME_RE.match(d.name) or not _is_model_dir(d):
                continue
            seen.add(d.name)
            try:
                card = json.loads((d / CARD_FILE).read_text())
            except (OSError, ValueError):
                continue
            out.append(
                {
                    "name": d.name,
                    "version": str(card.get("version", "0")),
                    "source": source,
                    "card": _card_summary(card),
                }
            )
    return out


def list_models(models_dir: str | Path | None = None, include_mlflow: bool = True) -> list[dict[str, Any]]:
    """Models a user can pick: shipped, local folder, and registered MLflow versions/aliases.

    Returns:
        One dict per model: ``name`` (the spec to pass to :func:`resolve_model`), ``version``,
        ``source`` and ``card`` (a summary: config, loss, metrics). MLflow entries are named
        ``models:/NAME@ALIAS`` per alias and ``models:/NAME/VERSION`` per version.
    """
    out = _local_models(Path(models_dir) if models_dir is not None else None)
    if include_mlflow:
        out.extend(_mlflow_models())
    return out


def _mlflow_models() -> list[dict[str, Any]]:
    try:
        from mlflow import MlflowClient

        from semray.tracking import configure

        configure()
        client = MlflowClient()
        out = []
        for rm in client.search_registered_models():
            for mv in client.search_model_versions(f"name='{rm.name}'"):
                card = {"metrics": {}, "description": mv.description or "", "run_id": mv.run_id}
                out.append(
                    {
                        "name": f"models:/{rm.name}/{mv.version}",
                        "version": str(mv.version),
                        "source": "mlflow",
                        "card": card,
                    }
                )
            for alias, version in (rm.aliases or {}).items():
                out.append(
                    {
                        "name": f"models:/{rm.name}@{alias}",
                        "version": str(version),
                        "source": "mlflow",
                        "card": {},
                    }
                )
        return out
    except Exception:  # an unreachable tracking server must not break listing local models
        return []
