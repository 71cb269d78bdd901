"""Losses: minimum at identity, hand-computed values, differentiability, small-crop MS-SSIM, config."""

from __future__ import annotations

import math

import pytest
import pytorch_msssim
import torch

from semray.config.base import ConfigError, load_config
from semray.config.loss import MS_SSIM_WEIGHTS, MseSsimLossConfig, loss_config
from semray.config.train import TrainConfig
from semray.losses import (
    CharbonnierLoss,
    CompositeLoss,
    DefectWeightedLoss,
    L1Loss,
    MSESSIMLoss,
    MSSSIMLoss,
    SobelEdgeLoss,
    build_loss,
    charbonnier_loss,
    defect_charbonnier_loss,
    grow_mask,
    l1_loss,
    ms_ssim_loss,
    mse_ssim_loss,
    sobel_edge_loss,
)

C1 = (0.01 * 1.0) ** 2  # SSIM luminance constant for data range 1


def _pattern(h: int, w: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A smooth line pattern with some texture, (1, 1, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(w, dtype=torch.float64)
    y = torch.arange(h, dtype=torch.float64)[:, None]
    img = (
        0.5
        + 0.3 * torch.sin(x / 3.0) * torch.cos(y / 5.0)
        + 0.05 * torch.rand(h, w, generator=g, dtype=torch.float64)
    )
    return img.clamp(0, 1).to(dtype)[None, None]


def _noisy(t: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (t + sigma * torch.randn(t.shape, generator=g, dtype=t.dtype)).clamp(0, 1)


# --------------------------------------------------------------------------------- Charbonnier
def test_charbonnier_minimum_is_eps_and_positive_excess_otherwise():
    t = _pattern(16, 16)
    assert charbonnier_loss(t, t, eps=1e-3).item() == pytest.approx(1e-3, rel=1e-6)
    assert charbonnier_loss(_noisy(t, 0.05), t, eps=1e-3).item() > 1e-3 + 0.01


def test_charbonnier_hand_value():
    pred = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    target = torch.tensor([[[[0.3, 0.0], [0.0, 0.4]]]], dtype=torch.float64)
    eps = 0.1
    expected = (math.sqrt(0.09 + 0.01) + 2 * 0.1 + math.sqrt(0.16 + 0.01)) / 4
    assert charbonnier_loss(pred, target, eps).item() == pytest.approx(expected, rel=1e-12)


def test_charbonnier_is_l1_for_large_errors_and_l2_for_small():
    eps = 1e-3
    target = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    # large errors: value and gradient those of L1
    big = torch.full_like(target, 0.4).requires_grad_()
    v = charbonnier_loss(big, target, eps)
    v.backward()
    assert v.item() == pytest.approx(0.4, rel=1e-5)
    assert torch.allclose(big.grad, torch.full_like(target, 1 / 16), rtol=1e-5)
    # small errors: eps + d^2 / (2 eps), gradient d / eps (per pixel, before the mean)
    d = 1e-5
    small = torch.full_like(target, d).requires_grad_()
    v = charbonnier_loss(small, target, eps)
    v.backward()
    assert (v.item() - eps) == pytest.approx(d**2 / (2 * eps), rel=1e-3)
    assert torch.allclose(small.grad, torch.full_like(target, d / eps / 16), rtol=1e-3)
    # and the L2 regime is where MSE-like averaging happens: the gradient grows with the error
    assert small.grad[0, 0, 0, 0] < big.grad[0, 0, 0, 0] / 50


def test_l1_hand_value():
    pred = torch.tensor([[[[0.1, 0.5], [0.9, 0.2]]]])
    target = torch.tensor([[[[0.2, 0.5], [0.6, 0.0]]]])
    assert l1_loss(pred, target).item() == pytest.approx((0.1 + 0.0 + 0.3 + 0.2) / 4, rel=1e-6)
    assert l1_loss(target, target).item() == 0.0


# ------------------------------------------------------------------------------------- MS-SSIM
@pytest.mark.parametrize("size", [64, 128])
def test_ms_ssim_default_works_on_training_crops(size: int):
    loss = build_loss(loss_config(alpha=1.0, beta=0.0))
    clean = _pattern(size, size).repeat(4, 1, 1, 1)
    pred = _noisy(clean, 0.1).requires_grad_()
    total, parts = loss(pred, clean)
    total.backward()
    assert 0.0 < parts["ms_ssim"] < 1.0
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert loss(clean, clean)[1]["ms_ssim"] == pytest.approx(0.0, abs=1e-6)


def test_ms_ssim_too_small_crop_is_a_clear_error():
    t = _pattern(24, 40)
    with pytest.raises(ValueError, match="at least 25 px"):
        ms_ssim_loss(t, t)  # 3 scales, 7-px window need 25 px


def test_ms_ssim_constant_images_hand_value():
    # flat images: every contrast-structure term is exactly 1, so MS-SSIM = luminance ** w_last
    a, b = 0.2, 0.6
    pred = torch.full((1, 1, 32, 32), a, dtype=torch.float64)
    target = torch.full((1, 1, 32, 32), b, dtype=torch.float64)
    weights = MS_SSIM_WEIGHTS[:3]
    w_last = weights[-1] / sum(weights)
    lum = (2 * a * b + C1) / (a * a + b * b + C1)
    assert ms_ssim_loss(pred, target, weights).item() == pytest.approx(1 - lum**w_last, rel=1e-9)


def test_ms_ssim_matches_pytorch_msssim_where_it_applies():
    clean = _pattern(176, 176, dtype=torch.float64)
    pred = _noisy(clean, 0.05)
    weights = [w / sum(MS_SSIM_WEIGHTS) for w in MS_SSIM_WEIGHTS]  # the standard ones sum to 1.0001
    ours = 1 - ms_ssim_loss(pred, clean, weights, win_size=11)
    ref = pytorch_msssim.ms_ssim(pred, clean, data_range=1.0, win_size=11, weights=weights)
    # pytorch_msssim's float32-built window differs from ours in the 8th digit
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_ms_ssim_gradient_stays_finite_for_anticorrelated_images():
    # negative contrast-structure terms are where relu(x) ** w gives NaN gradients
    clean = _pattern(64, 64, dtype=torch.float64)
    pred = (1 - clean).clone().requires_grad_()
    loss = ms_ssim_loss(pred, clean)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    # and not zero: the smooth floor still pushes a negative term back up (a hard clamp gave 0 here)
    assert pred.grad.abs().max() > 0


def test_smooth_floor_has_a_finite_bounded_nonzero_gradient():
    from semray.metrics import smooth_floor

    floor = 1e-3
    x = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64, requires_grad=True)
    w = 0.0448  # the smallest standard MS-SSIM weight: f(x) ** w is where the old clamp blew up
    y = smooth_floor(x, floor)
    (g,) = torch.autograd.grad((y**w).sum(), x)
    assert torch.isfinite(g).all() and bool((g > 0).all())  # increasing everywhere, never flat
    # bounded: at most w * floor ** (w - 1) (f >= floor, f' <= 1); clamp_min(1e-6) reached ~2.4e4
    assert g.max().item() <= w * floor ** (w - 1) and g.max().item() < 50
    assert bool((y >= floor).all())
    hi = x.detach() >= 2 * floor  # exactly the identity where MS-SSIM terms normally live
    assert torch.equal(y.detach()[hi], x.detach()[hi])
    # continuous in value and slope at the switch
    edge = torch.tensor([2 * floor - 1e-9, 2 * floor], dtype=torch.float64, requires_grad=True)
    fe = smooth_floor(edge, floor)
    (ge,) = torch.autograd.grad(fe.sum(), edge)
    assert (fe[1] - fe[0]).abs().item() < 2e-9 and ge[0].item() == pytest.approx(ge[1].item(), abs=1e-5)


# ------------------------------------------------------------------------------------ Sobel edge
def test_sobel_edge_hand_value_on_a_step():
    h, w, k, step, eps = 6, 10, 5, 0.8, 1e-3
    target = torch.zeros(1, 1, h, w, dtype=torch.float64)
    target[..., k:] = step
    pred = torch.zeros_like(target)
    # normalised Sobel: step/2 in x on the two columns either side of the step, 0 elsewhere
    expected = (2 * h * math.sqrt((step / 2) ** 2 + eps**2) + (h * w - 2 * h) * eps) / (h * w)
    assert sobel_edge_loss(pred, target, eps).item() == pytest.approx(expected, rel=1e-12)
    assert sobel_edge_loss(target, target, eps).item() == pytest.approx(eps, rel=1e-9)


def test_sobel_edge_penalises_smeared_and_shifted_edges():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 8:] = 1.0
    smeared = torch.zeros_like(target)
    smeared[..., 6:11] = torch.linspace(0.0, 1.0, 7)[1:6]
    smeared[..., 11:] = 1.0
    shifted = torch.roll(target, 2, dims=-1)
    shifted[..., :2] = 0.0
    base = sobel_edge_loss(target, target).item()
    assert sobel_edge_loss(smeared, target).item() > base + 0.02
    assert sobel_edge_loss(shifted, target).item() > base + 0.05


# -------------------------------------------------------------------------------- MSE + SSIM
def test_mse_ssim_constant_images_hand_value():
    a, b, lam = 0.3, 0.5, 0.7
    pred = torch.full((2, 1, 16, 16), a, dtype=torch.float64)
    target = torch.full((2, 1, 16, 16), b, dtype=torch.float64)
    ssim_val = (2 * a * b + C1) / (a * a + b * b + C1)
    expected = (a - b) ** 2 + lam * (1 - ssim_val)
    assert mse_ssim_loss(pred, target, lam).item() == pytest.approx(expected, rel=1e-9)
    _, parts = MSESSIMLoss(lam)(pred, target)
    assert parts["mse"] == pytest.approx((a - b) ** 2) and parts["total"] == pytest.approx(expected)


# --------------------------------------------------------------------------------- composite
def test_composite_is_the_weighted_sum_and_minimal_at_identity():
    loss = CompositeLoss(eps=1e-3, alpha=0.7, beta=0.3)
    clean = _pattern(64, 64).repeat(2, 1, 1, 1)
    total, parts = loss(_noisy(clean, 0.08), clean)
    assert set(parts) == {"charbonnier", "ms_ssim", "edge", "total"}
    expected = parts["charbonnier"] + 0.7 * parts["ms_ssim"] + 0.3 * parts["edge"]
    assert total.item() == pytest.approx(expected, rel=1e-6) and parts["total"] == pytest.approx(
        expected, rel=1e-6
    )
    t0, p0 = loss(clean, clean)
    assert t0.item() == pytest.approx(1.3e-3, rel=1e-3) and p0["ms_ssim"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() > 10 * t0.item()


def test_composite_with_zero_weights_is_plain_charbonnier_and_skips_terms():
    loss = build_loss(loss_config(alpha=0.0, beta=0.0))
    t = _pattern(8, 8)  # too small for MS-SSIM, fine since it is not computed
    total, parts = loss(_noisy(t, 0.1), t)
    assert set(parts) == {"charbonnier", "total"}
    assert total.item() == pytest.approx(charbonnier_loss(_noisy(t, 0.1), t).item())


def _tiny_ms_ssim(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ms_ssim_loss(p, t, weights=(0.5, 0.5), win_size=3)


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, t: charbonnier_loss(p, t, 1e-2),
        lambda p, t: l1_loss(p, t),
        _tiny_ms_ssim,
        lambda p, t: sobel_edge_loss(p, t, 1e-2),
        lambda p, t: mse_ssim_loss(p, t, 0.5, win_size=3),
        lambda p, t: CompositeLoss(1e-2, 0.5, 0.5, ms_ssim_weights=(0.5, 0.5), ms_ssim_win_size=3)(p, t)[0],
    ],
    ids=["charbonnier", "l1", "ms_ssim", "edge", "mse_ssim", "composite"],
)
def test_losses_pass_gradcheck(fn):
    g = torch.Generator().manual_seed(3)
    target = torch.rand(2, 1, 8, 9, generator=g, dtype=torch.float64)
    pred = (target + 0.2 * torch.rand(2, 1, 8, 9, generator=g, dtype=torch.float64) - 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: fn(p, target), (pred,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "module", [CharbonnierLoss(), L1Loss(), MSSSIMLoss(), SobelEdgeLoss(), MSESSIMLoss()]
)
def test_every_module_returns_total_and_float_parts(module):
    clean = _pattern(32, 32)
    total, parts = module(_noisy(clean, 0.1), clean)
    assert total.ndim == 0 and total.item() > 0
    assert all(isinstance(v, float) for v in parts.values()) and parts["total"] == pytest.approx(total.item())


def test_inputs_are_checked_up_front():
    t = _pattern(16, 16)
    with pytest.raises(ValueError, match="shapes differ"):
        charbonnier_loss(t, t[..., :15])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        sobel_edge_loss(t[0], t[0])
    with pytest.raises(ValueError, match="dtype"):
        l1_loss(t, t.double())
    with pytest.raises(TypeError):
        charbonnier_loss(t.numpy(), t)


# ------------------------------------------------------------------------------------ config
def test_build_loss_kinds():
    assert isinstance(build_loss(loss_config()), CompositeLoss)
    assert isinstance(build_loss(loss_config(kind="mse_ssim")), MSESSIMLoss)
    assert isinstance(build_loss(loss_config(kind="l1")), L1Loss)
    custom = build_loss(loss_config(ms_ssim_scales=2, ms_ssim_weights=[1.0, 3.0]))
    assert custom.ms_ssim.weights == [0.25, 0.75]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"beta": -1}, "beta"),
        ({"charbonnier_eps": 0}, "charbonnier_eps"),
        ({"ms_ssim_win_size": 8}, "ms_ssim_win_size"),
        ({"kind": "mse"}, "kind"),
        ({"kind": "mse_ssim", "ssim_win_size": 8}, "ssim_win_size"),
        ({"ms_ssim_scales": 3, "ms_ssim_weights": [1.0, 1.0]}, "ms_ssim_weights"),
        ({"gamma": 1.0}, "gamma"),
    ],
)
def test_loss_config_rejects_bad_values_naming_the_field(override, field):
    # the field's YAML path (no union tag in it), or for a bad kind the section naming the tag field
    match = "ms_ssim_weights has" if field == "ms_ssim_weights" else rf"  loss\.{field}: |  loss: .*'{field}'"
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, {"loss": override})


def test_loss_fields_live_on_their_kind_and_old_configs_name_the_moved_key() -> None:
    """A weight of another kind (accepted and ignored before the loss became per kind) is an error that
    names it and its kind; without ``kind`` the loss is composite."""
    with pytest.raises(
        ConfigError, match=r"loss kind 'l1' has no loss\.alpha \(a field of kind 'composite'\)"
    ):
        load_config(TrainConfig, {"loss": {"kind": "l1", "alpha": 0.5}})
    with pytest.raises(ConfigError, match=r"loss\.ssim_lambda \(a field of kind 'mse_ssim'\)"):
        load_config(TrainConfig, {"loss": {"alpha": 0.5, "ssim_lambda": 0.2}})
    with pytest.raises(ConfigError, match=r"loss\.ms_ssim_scales .*loss\.ms_ssim_win_size"):
        load_config(
            TrainConfig, None, ["loss.kind=mse_ssim", "loss.ms_ssim_scales=2", "loss.ms_ssim_win_size=5"]
        )
    cfg = load_config(TrainConfig, {"loss": {"kind": "mse_ssim", "ssim_lambda": 0.3, "defect_weight": 1.0}})
    assert isinstance(cfg.loss, MseSsimLossConfig) and cfg.loss.ssim_lambda == 0.3
    assert "alpha" not in cfg.loss.model_dump() and cfg.loss.charbonnier_eps == 1e-3  # common field
    assert load_config(TrainConfig, {"loss": {"defect_weight": 1.0}}).loss.kind == "composite"
    assert load_config(TrainConfig, cfg.model_dump(mode="json")) == cfg  # a dump loads back


def test_grow_mask_dilates_a_pixel_to_a_square() -> None:
    m = torch.zeros(1, 1, 11, 11)
    m[0, 0, 5, 5] = 1
    assert grow_mask(m, 0) is m
    g = grow_mask(m, 2)
    assert g.sum() == 25 and g[0, 0, 3:8, 3:8].min() == 1


def test_defect_charbonnier_averages_over_the_region_only() -> None:
    target = torch.zeros(2, 1, 8, 8)
    pred = target.clone()
    region = torch.zeros_like(target)
    region[0, 0, :2, :2] = 1  # 4 pixels
    pred[0, 0, :2, :2] = 0.1  # error 0.1 inside
    pred[1] = 0.5  # large error outside the region: must not count
    eps = 1e-3
    got = defect_charbonnier_loss(pred, target, region, eps)
    assert got.item() == pytest.approx(math.sqrt(0.01 + eps**2), rel=1e-6)
    assert defect_charbonnier_loss(pred, target, torch.zeros_like(region), eps).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        defect_charbonnier_loss(pred, target, region[:1], eps)


def test_defect_weighted_loss_adds_the_term_and_steers_the_gradient_to_defects() -> None:
    target = _pattern(32, 32)
    pred = (target + 0.05).clamp(0, 1).requires_grad_(True)
    defect = torch.zeros_like(target)
    defect[..., 10, 10] = 1
    base = CompositeLoss()
    loss = DefectWeightedLoss(base, weight=4.0, grow_px=1)
    b_total, _ = base(pred, target)
    total, parts = loss(pred, target, defect)
    region = grow_mask(defect, 1)
    expect = b_total + 4.0 * defect_charbonnier_loss(pred, target, region)
    assert total.item() == pytest.approx(expect.item(), rel=1e-6)
    assert parts["defect"] > 0 and parts["total"] == pytest.approx(total.item(), rel=1e-6)
    # no mask (validation) or an empty mask: exactly the base loss
    assert loss(pred, target)[0].item() == pytest.approx(b_total.item(), rel=1e-7)
    assert loss(pred, target, torch.zeros_like(defect))[0].item() == pytest.approx(b_total.item(), rel=1e-7)
    # the gradient on the 3 x 3 defect region grows with the weight; elsewhere it is the base's
    (g_base,) = torch.autograd.grad(base(pred, target)[0], pred)
    (g_w,) = torch.autograd.grad(total, pred)
    inside = region.bool()
    assert (g_w[inside].abs().mean() > 5 * g_base[inside].abs().mean()).item()
    torch.testing.assert_close(g_w[~inside], g_base[~inside])


def test_build_loss_wraps_only_when_defect_weight_is_set() -> None:
    assert isinstance(build_loss(loss_config(defect_weight=2.0)), DefectWeightedLoss)
    assert isinstance(build_loss(loss_config()), CompositeLoss)
    with pytest.raises(ValueError, match="defect_weight needs clean targets"):
        loss_config(defect_weight=1.0, objective="n2v")
