"""docs/configuration.md is generated from the config models and must match them exactly."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from semray.config.base import StrictModel
from semray.config.reference import (
    config_models,
    field_constraints,
    field_default,
    field_description,
    iter_rows,
    render_reference,
    run_configs,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGEN = "run `python scripts/gen_config_reference.py` to regenerate"


@pytest.fixture(scope="module")
def reference() -> str:
    return render_reference()


def _reachable(roots: list[type[BaseModel]]) -> dict[type[BaseModel], None]:
    """Every model reachable from ``roots`` through field annotations, found independently of the module."""
    seen: dict[type[BaseModel], None] = {}
    stack = list(roots)
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen[cls] = None
        for field in cls.model_fields.values():
            stack.extend(_models_in_repr(field.annotation))
    return seen


def _models_in_repr(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in_repr(a)]


def test_doc_matches_models(reference: str) -> None:
    assert DOC.is_file(), f"{DOC} is missing: {REGEN}"
    assert DOC.read_text() == reference, f"{DOC} is out of date with semray/config: {REGEN}"


def test_render_is_deterministic(reference: str) -> None:
    assert render_reference() == reference


def test_core_sections_present() -> None:
    names = [cls.__name__ for _, cls in run_configs()]
    for required in (
        "DatasetConfig",
        "TrainConfig",
        "NoiseConfig",
        "SynthConfig",
        "UNetConfig",
        "CompositeLossConfig",
        "MseSsimLossConfig",
        "L1LossConfig",
    ):
        assert required in names


def test_every_config_model_is_documented(reference: str) -> None:
    """A new StrictModel in semray/config must be reachable from a registered section (RUN_CONFIGS)."""
    reachable = _reachable([cls for _, cls in run_configs()])
    missing = [f"{c.__module__}.{c.__name__}" for c in config_models() if c not in reachable]
    assert not missing, (
        f"config models not reachable from RUN_CONFIGS in semray/config/reference.py: {missing}"
    )


def test_every_field_of_every_model_has_a_row(reference: str) -> None:
    reachable = _reachable([cls for _, cls in run_configs()])
    rows = {(r.owner, r.name): r for r in iter_rows()}
    missing = [
        f"{cls.__name__}.{name}" for cls in reachable for name in cls.model_fields if (cls, name) not in rows
    ]
    assert not missing, f"fields without a row in the reference: {missing}"
    for r in rows.values():
        assert f"| `{r.path}` |" in reference, f"row {r.path} not rendered: {REGEN}"


def test_every_field_has_a_description() -> None:
    offenders = sorted(
        {f"{r.owner.__module__}.{r.owner.__name__}.{r.name}" for r in iter_rows() if not r.description}
    )
    assert not offenders, "config fields without a description (use Field(description=...)): " + ", ".join(
        offenders
    )


class _Inner(StrictModel):
    x: int = Field(3, ge=1, lt=10)
    """Docstring under the attribute."""


class _Toy(StrictModel):
    kind: Literal["a", "b"] | None = Field(None, description="  which\n  kind  ")
    inner: _Inner = Field(default_factory=lambda: _Inner(x=5), description="nested")
    weights: dict[Literal["p", "q"], float] = Field(default_factory=lambda: {"p": 1.0})
    name: str = Field(pattern=r"^[a-z]+$", min_length=1)


def test_field_helpers_on_a_toy_model() -> None:
    assert field_description(_Toy, "kind") == "which kind"  # whitespace normalised
    assert field_description(_Inner, "x") == "Docstring under the attribute."
    assert field_description(_Toy, "weights") == ""
    assert field_constraints(_Inner, "x") == ">= 1; < 10"
    assert field_constraints(_Toy, "kind") == "one of `a`, `b`"
    assert field_constraints(_Toy, "weights") == "keys one of `p`, `q`"
    assert "matches `^[a-z]+$`" in field_constraints(_Toy, "name")
    assert "min length 1" in field_constraints(_Toy, "name")
    assert field_default(_Toy.model_fields["kind"]) == "`null`"
    assert field_default(_Toy.model_fields["inner"]) == "`{x: 5}`"  # only what differs from _Inner()
    assert field_default(_Toy.model_fields["weights"]) == "`{p: 1.0}`"
    assert field_default(_Toy.model_fields["name"]) == "required"


def test_known_values_in_reference(reference: str) -> None:
    # spot checks against the models, so a renderer bug cannot hide behind the equality test
    assert "| `optim.lr` | `float` | `0.002` | > 0; <= 1.0 |" in reference
    assert "| `data.crop_px` | `int` | `64` | >= 16; <= 2048 |" in reference
    assert "one of `cosine`, `onecycle`, `constant`" in reference
    assert "| `height` | `int` | `256` | >= 16; <= 8192 | Image height in pixels" in reference
