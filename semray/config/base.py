"""Shared machinery for every config model: strict pydantic base, YAML loading, clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for all semray configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Interval(StrictModel):
    """A closed interval ``[low, high]`` (``low <= high``; ``low == high`` pins the value).

    YAML accepts the mapping form ``{low: 2, high: 5}`` or the short list form ``[2, 5]``. Subclasses
    say how a value is drawn from it.
    """

    low: float = Field(allow_inf_nan=False, description="lower bound (units of the field using it)")
    high: float = Field(allow_inf_nan=False, description="upper bound (same units), >= low")

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            if len(data) != 2:
                raise ValueError(f"a range needs exactly two numbers [low, high], got {len(data)}")
            return {"low": data[0], "high": data[1]}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Interval:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class ConfigError(ValueError):
    """A config could not be loaded or validated; the message names the source and each bad field."""


#: Fields holding a union discriminated by a tag (``loss`` by ``kind``), with their tags: pydantic puts
#: the tag into an error's location (``loss.composite.alpha``), which is not a key of the YAML.
UNION_TAGS: dict[str, frozenset[str]] = {}


def _yaml_path(loc: tuple[Any, ...]) -> str:
    """An error location as the dotted YAML path, without the tags of discriminated unions."""
    parts = [p for i, p in enumerate(loc) if not (i and p in UNION_TAGS.get(str(loc[i - 1]), ()))]
    return ".".join(str(p) for p in parts)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = _yaml_path(tuple(e["loc"])) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this config)"
        got = e.get("input")
        got_s = "" if isinstance(got, Mapping) or got is None else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b']['c'] = value`` for ``dotted='a.b.c'``, creating dicts on the way."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ``["train.epochs=3", "loss.alpha=0.5"]`` into a nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


#: A mapping key (at any depth of a YAML config file) naming other YAML files that fill in that mapping.
INCLUDE_KEY = "include"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, resolving ``include:`` keys.

    Any mapping in the file, at any depth (list items included), may hold ``include: other.yaml`` (or a
    list of files). The included files' mappings are deep-merged in order (later files win), then the
    mapping's own keys on top, so a config can share a block with another and override a few fields::

        evaluation:
          include: evaluate.yaml        # the project's evaluation settings...
          methods: {models: []}         # ...except these

    Include paths are relative to the folder of the file that names them (or absolute); included files
    may include others. Lists are replaced, not concatenated (:func:`deep_merge`).

    Raises:
        ConfigError: a file is missing, is not YAML, does not hold a mapping, or includes itself
            (directly or through others); the message names the file and the key path.
    """
    return _read_yaml(Path(path), ())


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        via = f" (included from {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{via}")
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain, key))
        raise ConfigError(f"config file {path} includes itself: {cycle}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(loaded).__name__}")
    return _resolve_includes(dict(loaded), path, (*chain, key), "")


def _resolve_includes(
    node: dict[str, Any], path: Path, chain: tuple[Path, ...], where: str
) -> dict[str, Any]:
    """``node`` with every nested ``include:`` replaced by the files it names (see :func:`read_yaml`)."""
    out: dict[str, Any] = {}
    if INCLUDE_KEY in node:
        spec = node[INCLUDE_KEY]
        names = [spec] if isinstance(spec, str) else spec
        here = where + INCLUDE_KEY  # where is "" at top level, else "a.b."
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"config file {path}: {here} must be a file name or a list of file names, got {spec!r}"
            )
        for name in names:
            inc = Path(name) if Path(name).is_absolute() else path.parent / name
            out = deep_merge(out, _read_yaml(inc, chain))
    own = {k: _resolve_value(v, path, chain, f"{where}{k}") for k, v in node.items() if k != INCLUDE_KEY}
    return deep_merge(out, own)


def _resolve_value(value: Any, path: Path, chain: tuple[Path, ...], where: str) -> Any:
    if isinstance(value, Mapping):
        return _resolve_includes(dict(value), path, chain, f"{where}.")
    if isinstance(value, list):
        return [_resolve_value(v, path, chain, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load_config(
    cls: type[T],
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> T:
    """Load and validate a config of type ``cls``.

    Args:
        cls: the pydantic model to build.
        source: a YAML file path (its ``include:`` keys resolved, see :func:`read_yaml`), an
            already-parsed mapping, or ``None`` for the model's defaults.
        overrides: ``key.path=value`` strings applied on top (values parsed as YAML).

    Raises:
        ConfigError: the file is missing or not YAML, or a field is unknown or out of range; the
            message names the file and every offending field with the value it got.
    """
    name = "<defaults>"
    data: dict[str, Any] = {}
    if isinstance(source, (str, Path)):
        name = str(source)
        data = read_yaml(source)
    elif isinstance(source, Mapping):
        name = "<mapping>"
        data = dict(source)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, name)) from None


def dump_yaml(model: BaseModel) -> str:
    """The full config (defaults included) as YAML, for logging and reproduction."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def flatten(model: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config into ``{"a.b.c": value}`` (lists become their YAML text), for MLflow params."""
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else dict(model)
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix=f"{key}."))
        elif isinstance(v, list):
            out[key] = yaml.safe_dump(v, default_flow_style=True).strip()
        else:
            out[key] = v
    return out
