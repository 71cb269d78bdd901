"""Model store: safetensors + card round trip, and clear errors on every kind of broken directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semray.config.model import UNetConfig
from semray.models import (
    ModelStoreError,
    UNet,
    build_model,
    count_parameters,
    load_model,
    read_card,
    save_model,
)
from semray.models.unet import receptive_radius

CFG = UNetConfig(base_width=4, max_width=16, depth=2)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model(CFG)
    # one training step so BatchNorm running statistics are not their defaults
    model.train()
    model(torch.rand(4, 1, 24, 24)).mean().backward()
    out = save_model(
        model,
        CFG,
        tmp_path / "m1",
        card={"name": "tiny", "version": "3", "metrics": {"psnr": 31.5}, "training": {"epochs": 1}},
    )
    return model, out


def test_round_trip_gives_identical_outputs(saved):
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "model.safetensors"]
    loaded, card = load_model(out)
    assert not loaded.training
    x = torch.rand(2, 1, 29, 31)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert card["name"] == "tiny" and card["version"] == "3" and card["metrics"] == {"psnr": 31.5}
    assert card["training"] == {"epochs": 1} and card["param_count"] == count_parameters(model)
    assert UNetConfig.model_validate(card["model_config"]) == CFG
    assert len(card["weights_sha256"]) == 64 and card["semray_version"] and card["created"]


def test_load_accepts_a_file_inside_the_directory(saved):
    _, out = saved
    _, card = load_model(out / "model.safetensors")
    assert card["name"] == "tiny"
    assert read_card(out)["param_count"] == card["param_count"]


def test_computed_card_keys_cannot_be_overridden(tmp_path: Path):
    model = build_model(CFG)
    out = save_model(model, CFG, tmp_path / "m", card={"param_count": 1, "weights_sha256": "x"})
    card = read_card(out)
    assert card["param_count"] == count_parameters(model) and card["weights_sha256"] != "x"
    assert card["name"] == "m"  # defaults to the directory name


def test_corrupt_weights_are_refused_with_the_file_named(saved):
    _, out = saved
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match=r"model\.safetensors: sha256 does not match"):
        load_model(out)


def test_truncated_weights_without_a_checksum_are_refused(saved):
    _, out = saved
    card = json.loads((out / "card.json").read_text())
    del card["weights_sha256"]
    (out / "card.json").write_text(json.dumps(card))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelStoreError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(out)


def test_pickle_weights_are_not_loaded(saved):
    """A torch.save (pickle) file in place of the safetensors file is refused, never unpickled."""
    model, out = saved
    card = json.loads((out / "card.json").read_text())
    del card["weights_sha256"]
    (out / "card.json").write_text(json.dumps(card))
    torch.save(model.state_dict(), out / "model.safetensors")
    with pytest.raises(ModelStoreError, match="not a readable safetensors file"):
        load_model(out)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "card.json").unlink(), r"card\.json: model card missing"),
        (lambda d: (d / "card.json").write_text("{not json"), r"card\.json: not valid JSON"),
        (lambda d: (d / "card.json").write_text("[1, 2]"), r"card\.json: not a semray model card"),
        (lambda d: (d / "model.safetensors").unlink(), r"model\.safetensors: weights file missing"),
    ],
    ids=["no-card", "bad-json", "not-a-card", "no-weights"],
)
def test_broken_directories_give_clear_errors(saved, breakage, message):
    _, out = saved
    breakage(out)
    with pytest.raises(ModelStoreError, match=message):
        load_model(out)


def test_invalid_model_config_names_the_card_and_field(saved):
    _, out = saved
    card = json.loads((out / "card.json").read_text())
    card["model_config"]["depth"] = 99
    (out / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelStoreError, match=r"card\.json: invalid model_config(.|\n)*depth"):
        load_model(out)


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    _, out = saved
    card = json.loads((out / "card.json").read_text())
    card["model_config"]["base_width"] = 8
    (out / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelStoreError, match="weights do not fit the model"):
        load_model(out)


def test_missing_directory(tmp_path: Path):
    with pytest.raises(ModelStoreError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_card_records_the_receptive_field_and_checks_it(saved):
    _, out = saved
    card = json.loads((out / "card.json").read_text())
    assert card["receptive_radius_px"] == receptive_radius(CFG) == UNet(CFG).receptive_radius
    del card["receptive_radius_px"]  # a card written before the field existed: filled in on load
    (out / "card.json").write_text(json.dumps(card))
    assert load_model(out)[1]["receptive_radius_px"] == receptive_radius(CFG)
    card["receptive_radius_px"] = 7
    (out / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelStoreError, match=r"card\.json: receptive_radius_px 7 does not match"):
        load_model(out)


def test_shipped_card_records_its_receptive_field():
    from semray.models.resolve import SHIPPED_MODELS_DIR

    card = read_card(SHIPPED_MODELS_DIR / "default")
    assert (
        card["receptive_radius_px"] == receptive_radius(UNetConfig.model_validate(card["model_config"])) == 51
    )
