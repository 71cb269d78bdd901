"""Proxy refinement rounds of ``semray adapt`` (``user.proxy_rounds``): the config and its checks, the
epoch split, one selection over every round's checkpoints, and two rounds end to end on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_adapt import TINY, _pngs, _selection

from semray.adapt.rounds import round_config, round_epochs
from semray.adapt.select import combine
from semray.cli import main
from semray.config.adapt import AdaptConfig
from semray.config.base import ConfigError, load_config


def test_one_round_is_the_default_and_rounds_are_checked_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert AdaptConfig().user.proxy_rounds == 1
    assert load_config(AdaptConfig, None, ["user.proxy_rounds=2"]).user.proxy_rounds == 2
    with pytest.raises(ConfigError, match=r"proxy_rounds"):
        load_config(AdaptConfig, None, ["user.proxy_rounds=0"])
    with pytest.raises(ConfigError, match=r"proxy_rounds 3 needs at least as many optim.epochs \(got 2\)"):
        load_config(AdaptConfig, None, ["user.proxy_rounds=3", "optim.epochs=2"])
    with pytest.raises(ConfigError, match=r"proxy_rounds 2 does not apply with frames"):
        load_config(AdaptConfig, None, ["user.proxy_rounds=2", "frames=true"])
    # --frames on the command line is checked the same way: one line naming the setting, nothing written
    out = tmp_path / "out"
    assert main(["adapt", str(tmp_path), "--out", str(out), "--frames", "--set=user.proxy_rounds=2"]) == 2
    assert "user.proxy_rounds 2 does not apply with frames" in capsys.readouterr().err
    assert not out.exists()


def test_a_copied_config_that_bypassed_validation_is_refused_before_any_work(tmp_path: Path) -> None:
    from semray.adapt import run_adapt

    cfg = load_config(AdaptConfig, None, ["user.proxy_rounds=2"]).model_copy(update={"frames": True})
    with pytest.raises(ConfigError, match="does not apply with frames"):
        run_adapt(_pngs(tmp_path / "in", n=2), tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.adapt-partial-*"))


def test_epochs_are_split_between_rounds_with_the_remainder_last() -> None:
    assert round_epochs(8, 1) == [8]
    assert round_epochs(8, 2) == [4, 4]
    assert round_epochs(3, 2) == [1, 2]
    assert round_epochs(8, 3) == [2, 3, 3] and sum(round_epochs(11, 4)) == 11
    with pytest.raises(ValueError, match="cannot split 2 epochs between 3 rounds"):
        round_epochs(2, 3)


def test_round_config_is_the_config_itself_with_one_round_and_a_share_with_more() -> None:
    one = load_config(AdaptConfig, None, ["seed=5"])
    assert round_config(one, 1, one.optim.epochs, one.init) is one
    two = load_config(AdaptConfig, None, ["seed=5", "user.proxy_rounds=2", "optim.epochs=6"])
    r2 = round_config(two, 2, 3, "/somewhere/model")
    assert (r2.optim.epochs, r2.init, r2.seed) == (3, "/somewhere/model", 6)
    assert (two.optim.epochs, two.init, two.seed) == (6, "default", 5)  # the run's config is untouched
    assert r2.optim.steps_per_epoch == two.optim.steps_per_epoch and r2.user == two.user


def test_combined_selection_chooses_among_every_round_against_the_same_init_scores() -> None:
    rng = np.random.default_rng(3)
    init = 0.01 + 0.002 * rng.standard_normal(16)
    first = _selection(init, np.stack([init - 1e-4, init - 2e-4]))  # epochs 0, 1
    late = _selection(init, np.stack([init + 1e-4, init - 9e-4]))
    second = type(late)(late.criterion, late.init_crop_scores, late.choose_idx, late.verdict_idx)
    for row in late.rows:  # renumbered on from round 1, as the driver does
        e = int(row["epoch"])
        second.rows.append({**row, "epoch": float(e + 2)})
        second.crop_scores[e + 2] = late.crop_scores[e]
    both = combine([first, second])
    assert first.chosen_epoch == 1 and both.chosen_epoch == 3
    assert [r["epoch"] for r in both.rows] == [0, 1, 2, 3]
    assert both.comparison.improvement == pytest.approx(9e-4) and both.comparison.verdict == "better"
    assert combine([first]).chosen_epoch == first.chosen_epoch
    with pytest.raises(ValueError, match=r"epochs \[0, 1\] are in more than one"):
        combine([first, first])
    other = _selection(init + 1e-3, np.stack([init]))
    with pytest.raises(ValueError, match="same crops"):
        combine([first, other])


def _user_tiles(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """``image_id -> (split, clean)`` of every row of a user-content shard folder."""
    from semray.io import read_shard

    out = {}
    for f in sorted(folder.rglob("*.parquet")):
        rows = read_shard(f, columns=["image_id", "split", "clean"])
        for i, s, c in zip(rows["image_id"], rows["split"], rows["clean"], strict=True):
            out[str(i)] = (str(s), np.asarray(c, np.float32))
    return out


def test_two_rounds_refine_the_proxies_with_round_one_choice_and_choose_among_both(
    tmp_path: Path, ray_local: None, mlflow_store: str
) -> None:
    from mlflow import MlflowClient

    from semray.adapt import run_adapt
    from semray.adapt.inputs import read_inputs
    from semray.adapt.select import checkpoint_candidates
    from semray.infer import Denoiser
    from semray.models.store import load_model

    inputs = _pngs(tmp_path / "in")
    cfg = load_config(AdaptConfig, None, [*TINY, "user.proxy_rounds=2", "keep_work=true"])
    res = run_adapt(inputs, tmp_path / "out", cfg)
    out = res.out_dir
    report = json.loads((out / "report.json").read_text())
    r1, r2 = report["rounds"]
    assert (r1["epochs"], r2["epochs"]) == ([0], [1])  # TINY's 2 epochs, one per round
    assert (
        r1["proxies_from"] == "the init model (default)"
        and r2["proxies_from"] == "round 1's choice (epoch 0)"
    )
    sel = report["selection"]
    assert [(r["epoch"], r["round"]) for r in sel["rows"]] == [(0, 1), (1, 2)]
    assert sel["chosen_score"] == min(r["score"] for r in sel["rows"])
    assert r1["init_score"] == r2["init_score"] == sel["init_score"]  # one set of init-model scores

    # the same tiles, the same ones held back; every proxy tile changed
    one, two = _user_tiles(out / "work" / "shards" / "user"), _user_tiles(out / "work" / "shards" / "user_r2")
    assert one.keys() == two.keys() and all(one[k][0] == two[k][0] for k in one)
    assert {s for s, _ in two.values()} == {"train", "val"}
    assert min(float(np.abs(one[k][1] - two[k][1]).mean()) for k in one) > 1e-4
    # round 2's proxies are round 1's chosen checkpoint's outputs
    (ckpt,) = checkpoint_candidates(out / "work" / "train" / "adapt-train")
    image0 = read_inputs(inputs[:1], 64, frames=False)[0].image
    proxy0 = Denoiser(model=str(ckpt.model_dir), device="cpu")(image0)
    tile = two["user/0000/y0x0"][1]
    np.testing.assert_allclose(tile, proxy0[: tile.shape[0], : tile.shape[1]], atol=1e-5)
    assert "adapt-train/" in (out / "train_r2.yaml").read_text()  # round 2 trains on from round 1's choice

    timings = json.loads((out / "timings.json").read_text())
    assert {
        "proxies",
        "train",
        "select",
        "proxies_r2",
        "shards_r2",
        "train_r2",
        "select_r2",
    } <= timings.keys()
    _, card = load_model(res.model_dir)
    assert card["parent"]["spec"] == "default" and len(card["adapt"]["rounds"]) == 2
    client = MlflowClient(mlflow_store)
    children = [client.get_run(r["mlflow_run_id"]) for r in (r1, r2)]
    assert [c.data.tags["semray.adapt_round"] for c in children] == ["1", "2"]
    assert all(c.data.tags["mlflow.parentRunId"] == res.parent_run_id for c in children)
    assert res.child_run_id == (r1 if sel["chosen_epoch"] == 0 else r2)["mlflow_run_id"]
    hist = client.get_metric_history(res.parent_run_id, "round_chosen_epoch")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.0), (2, 1.0)]
    assert "2 proxy rounds" in (out / "report.html").read_text()
