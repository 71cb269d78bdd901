"""``include:`` in YAML configs (semray.config.base.read_yaml): merge order, paths, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from semray.config.base import ConfigError, load_config, read_yaml
from semray.config.evaluate import AblationConfig, EvaluateConfig

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_nested_include_is_the_base_and_own_keys_win(tmp_path: Path) -> None:
    _write(tmp_path / "shared" / "block.yaml", "a: 1\nb: {x: 1, y: 2}\nc: [1, 2]\n")
    main = _write(
        tmp_path / "main.yaml", "top: 0\nsection:\n  include: shared/block.yaml\n  b: {y: 3}\n  c: [9]\n"
    )
    assert read_yaml(main) == {"top": 0, "section": {"a": 1, "b": {"x": 1, "y": 3}, "c": [9]}}


def test_several_includes_merge_in_order_and_include_chains(tmp_path: Path) -> None:
    _write(tmp_path / "one.yaml", "v: 1\nonly_one: true\n")
    _write(tmp_path / "sub" / "inner.yaml", "deep: inner\n")
    _write(tmp_path / "sub" / "two.yaml", "include: inner.yaml\nv: 2\n")  # relative to sub/
    main = _write(tmp_path / "main.yaml", "include: [one.yaml, sub/two.yaml]\n")
    assert read_yaml(main) == {"v": 2, "only_one": True, "deep": "inner"}


def test_include_inside_a_list_item(tmp_path: Path) -> None:
    _write(tmp_path / "item.yaml", "name: from_file\nlevels: [1, 2]\n")
    main = _write(tmp_path / "main.yaml", "items:\n  - {include: item.yaml, name: mine}\n  - plain\n")
    assert read_yaml(main) == {"items": [{"name": "mine", "levels": [1, 2]}, "plain"]}


def test_paths_are_relative_to_the_including_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "cfg" / "base.yaml", "k: v\n")
    main = _write(tmp_path / "cfg" / "main.yaml", "include: base.yaml\n")
    monkeypatch.chdir(tmp_path)  # base.yaml is not in the cwd
    assert read_yaml("cfg/main.yaml") == {"k": "v"}
    assert read_yaml(main.resolve()) == {"k": "v"}


def test_missing_include_names_both_files(tmp_path: Path) -> None:
    main = _write(tmp_path / "main.yaml", "section:\n  include: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist \(included from .*main\.yaml\)"):
        read_yaml(main)


def test_include_cycle_is_an_error_naming_the_chain(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "include: b.yaml\n")
    _write(tmp_path / "b.yaml", "x: {include: a.yaml}\n")
    with pytest.raises(ConfigError, match=r"includes itself: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        read_yaml(tmp_path / "a.yaml")


def test_the_same_file_may_be_included_twice_without_a_cycle(tmp_path: Path) -> None:
    _write(tmp_path / "common.yaml", "n: 1\n")
    main = _write(tmp_path / "main.yaml", "a: {include: common.yaml}\nb: {include: common.yaml, n: 2}\n")
    assert read_yaml(main) == {"a": {"n": 1}, "b": {"n": 2}}


@pytest.mark.parametrize("spec", ["42", "[]", "[a.yaml, 3]", "''"])
def test_bad_include_value_names_the_key(tmp_path: Path, spec: str) -> None:
    main = _write(tmp_path / "main.yaml", f"outer:\n  include: {spec}\n")
    with pytest.raises(ConfigError, match=r"main\.yaml: outer\.include must be a file name or a list"):
        read_yaml(main)


def test_included_file_must_hold_a_mapping(tmp_path: Path) -> None:
    _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    main = _write(tmp_path / "main.yaml", "include: list.yaml\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping"):
        read_yaml(main)


def test_load_config_resolves_includes_and_validates_the_result(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "doses_e_per_px: [4, 16]\nseed: 3\n")
    good = _write(tmp_path / "good.yaml", "include: base.yaml\nseed: 5\n")
    cfg = load_config(EvaluateConfig, good, ["seed=7"])  # command-line overrides still come last
    assert (cfg.doses_e_per_px, cfg.seed) == ([4.0, 16.0], 7)
    bad = _write(tmp_path / "bad.yaml", "include: base.yaml\nnot_a_field: 1\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*not_a_field: unknown key"):
        load_config(EvaluateConfig, bad)


def test_the_ablation_evaluates_like_the_project_evaluation() -> None:
    """configs/ablation.yaml includes configs/evaluate.yaml: same test split, doses and out-of-generator
    noise, so the ablation's tables line up with `semray evaluate`'s."""
    ablation = load_config(AblationConfig, ROOT / "configs" / "ablation.yaml").evaluation
    project = load_config(EvaluateConfig, ROOT / "configs" / "evaluate.yaml")
    for field in ("seed", "test_set", "doses_e_per_px", "noise", "robustness", "report"):
        assert getattr(ablation, field) == getattr(project, field), field
    assert ablation.robustness, "the ablation must test out-of-generator noise"
    assert ablation.methods.classical == ["bm3d"] and ablation.methods.models == []
    assert ablation.mlflow.experiment == "semray-ablation"
