"""U-Net: every variant handles odd sizes and trains a step; parameter and FLOP counts are exact."""

from __future__ import annotations

import pytest
import torch

from semray.config.base import ConfigError, load_config
from semray.config.loss import loss_config
from semray.config.model import UNetConfig
from semray.losses import build_loss
from semray.models import UNet, build_model, count_parameters, flops_per_megapixel
from semray.models.unet import freeze_batchnorm, receptive_radius

SMALL = {"base_width": 4, "max_width": 16}  # tiny widths keep the tests fast on shared CPUs

VARIANTS = {
    "default": {},
    "residual": {"residual": True},
    "edge_input": {"edge_input": True},
    "deeper": {"depth": 4},
    "bilinear": {"upsample": "bilinear"},
    "norm_none": {"norm": "none"},
    "norm_group": {"norm": "group", "norm_groups": 2},
    "norm_instance": {"norm": "instance"},
}


def _cfg(**kw) -> UNetConfig:
    return UNetConfig(**{**SMALL, **kw})


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_variant_round_trips_odd_sizes_and_trains_one_step(variant: str):
    model = build_model(_cfg(**VARIANTS[variant]))
    x = torch.rand(2, 1, 37, 53)
    target = (x * 0.5 + 0.25).clamp(0, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    total, parts = build_loss(loss_config())(model(x), target)
    opt.zero_grad()
    total.backward()
    opt.step()
    assert torch.isfinite(total) and all(v == v for v in parts.values())
    changed = [k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert len(changed) == len(list(model.parameters())), "every parameter should receive a gradient"
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(1, 1, 37, 53))
    assert y.shape == (1, 1, 37, 53) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_large_odd_image_comes_back_the_same_size():
    model = build_model(_cfg(base_width=4, max_width=8)).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 1, 771, 1023))
    assert y.shape == (1, 1, 771, 1023)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (9, 17)])
def test_tiny_inputs_work(shape):
    model = build_model(_cfg()).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, *shape)).shape == (1, 1, *shape)


def test_odd_sizes_are_reflect_padded_centred_and_cropped_back():
    """37 x 53 -> padded to 40 x 56 (1 px top/left, 2 px bottom/right), run, cropped to the original."""
    model = build_model(_cfg(norm="none")).eval()
    x = torch.rand(1, 1, 37, 53)
    with torch.no_grad():
        direct = model(x)
        manual = model(torch.nn.functional.pad(x, (1, 2, 1, 2), mode="reflect"))[..., 1:38, 1:54]
    assert torch.allclose(direct, manual, atol=1e-6)


def test_training_output_is_unclamped_and_eval_output_clamped():
    model = build_model(_cfg(norm="none"))
    with torch.no_grad():
        model.head.bias.fill_(5.0)  # push every output far above 1
        x = torch.rand(1, 1, 16, 16)
        assert float(model.train()(x).min()) > 1.0
        assert float(model.eval()(x).max()) == 1.0


def test_residual_head_subtracts_predicted_noise():
    model = build_model(_cfg(residual=True)).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(0.1)  # the network "predicts" noise of +0.1 everywhere
        x = torch.rand(1, 1, 19, 23) * 0.8 + 0.1
        assert torch.allclose(model(x), x - 0.1, atol=1e-6)


def test_edge_input_adds_a_channel():
    plain, edged = build_model(_cfg()), build_model(_cfg(edge_input=True))
    assert plain.encoders[0][0].in_channels == 1 and edged.encoders[0][0].in_channels == 2


def test_rejects_wrong_input_shapes():
    model = build_model(_cfg())
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.rand(1, 2, 16, 16))


def test_parameter_count_matches_hand_count():
    cfg = UNetConfig(depth=1, base_width=4, max_width=8, norm="none")
    # enc0 1->4, 4->4; enc1 4->8, 8->8; 2x2 transposed 8->4; dec 8->4, 4->4; 1x1 head 4->1 (with biases)
    expected = (
        (9 * 4 + 4)
        + (9 * 16 + 4)
        + (9 * 32 + 8)
        + (9 * 64 + 8)
        + (4 * 32 + 4)
        + (9 * 32 + 4)
        + (9 * 16 + 4)
        + (4 + 1)
    )
    assert count_parameters(build_model(cfg)) == expected == 1645
    bilinear = cfg.model_copy(update={"upsample": "bilinear"})
    assert count_parameters(build_model(bilinear)) == expected - (4 * 32 + 4) + (8 * 4 + 4)


def test_flops_per_megapixel_matches_hand_count():
    cfg = UNetConfig(depth=1, base_width=4, max_width=8, norm="none")
    full_res = 9 * (1 * 4 + 4 * 4 + 8 * 4 + 4 * 4) + 4  # MACs/px: enc0, dec0, head
    half_res = 9 * (4 * 8 + 8 * 8) / 4  # enc1 at a quarter of the pixels
    transpose = 8 * 4  # each output pixel gets one tap of the 2x2 stride-2 kernel per channel pair
    assert flops_per_megapixel(cfg) == pytest.approx(2 * 1e6 * (full_res + half_res + transpose))
    assert flops_per_megapixel(cfg, size=64) == pytest.approx(flops_per_megapixel(build_model(cfg)))


def test_default_model_is_small():
    model = build_model(UNetConfig())
    assert isinstance(model, UNet)
    n = count_parameters(model)
    assert n * 4 < 6e6, "default model should stay a few MB as float32"
    deeper = count_parameters(build_model(UNetConfig(depth=4)))
    assert deeper > n and flops_per_megapixel(UNetConfig(depth=4)) > flops_per_megapixel(UNetConfig())


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"depth": 0}, "depth"),
        ({"norm": "layer"}, "norm"),
        ({"upsample": "nearest"}, "upsample"),
        ({"base_width": 64, "max_width": 32}, "max_width"),
        ({"architecture": "resnet"}, "architecture"),
        ({"width": 32}, "width"),
    ],
)
def test_model_config_rejects_bad_values_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        load_config(UNetConfig, data)


def test_widths_double_then_cap():
    assert UNetConfig(depth=4, base_width=16, max_width=64).widths() == [16, 32, 64, 64, 64]


@pytest.mark.parametrize(
    "kw, radius",
    [
        ({"depth": 1}, 9),
        ({"depth": 2, "upsample": "bilinear"}, 26),
        ({"depth": 3}, 51),  # the shipped model's architecture
        ({"depth": 3, "edge_input": True}, 52),
    ],
)
def test_receptive_radius_is_the_exact_reach_of_an_output_pixel(kw, radius):
    cfg = UNetConfig(base_width=4, norm="none", **kw)
    # depth 1 by hand, output pixel 0: decoder block [-2, 2], transposed conv to level 1 [-1, 1],
    # bottleneck block [-3, 3], max pool back to level 0 [-6, 7], encoder block [-8, 9]: 9 px
    assert receptive_radius(cfg) == radius
    torch.manual_seed(0)
    net = UNet(cfg).train()  # train mode: no output clamp, so every dependency has a gradient
    with torch.no_grad():  # positive biases keep ReLUs open, so no dependency hides behind a zero
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) and m.bias is not None:
                m.bias.uniform_(0.1, 0.2)
    reach = 0
    for p in range(net.multiple):  # every position on the down-sampling grid
        x = torch.rand(1, 1, 256, 256, requires_grad=True)
        c = 128 + p
        net(x)[0, 0, c, c].backward()
        rows = torch.nonzero(x.grad[0, 0].abs().sum(1) > 0)[:, 0]
        reach = max(reach, c - int(rows.min()), int(rows.max()) - c)
    # the computed radius is never exceeded (sound) and is reached at some grid position (tight)
    assert reach == radius


def _bn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_batchnorm_keeps_its_statistics_through_training_steps(freeze: bool):
    model = build_model(_cfg(norm="batch"))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if freeze:
        assert freeze_batchnorm(model) == len(bns) > 0
    stats = _bn_state(model)
    affine = [p.detach().clone() for m in bns for p in (m.weight, m.bias)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model.train()  # what the loop does every epoch: must not unfreeze
        x = torch.rand(4, 1, 32, 32) * 3.0 + 1.0  # far from the fresh statistics (mean 0, var 1)
        total, _ = build_loss(loss_config())(model(x), (x / 4.0).clamp(0, 1))
        opt.zero_grad()
        total.backward()
        opt.step()
    after = _bn_state(model)
    unchanged = [k for k in stats if torch.equal(stats[k], after[k])]
    assert len(unchanged) == (len(stats) if freeze else 0)
    # frozen or not, the layers' affine scale and shift still train
    now = [p.detach() for m in bns for p in (m.weight, m.bias)]
    assert not any(torch.equal(a, b) for a, b in zip(affine, now, strict=True))


def test_freeze_batchnorm_without_batchnorm_changes_nothing():
    model = build_model(_cfg(norm="group"))
    assert freeze_batchnorm(model) == 0
    assert not any(m._forward_pre_hooks for m in model.modules())
