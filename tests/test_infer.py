"""Tiled inference engine: partition of unity, seamless blending, bounded memory, the Denoiser facade."""

from __future__ import annotations

import argparse
import tracemalloc
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from semray.classical import METHODS, denoise_classical
from semray.cli.denoise import _FLAG_FIELDS, build_config
from semray.config.base import ConfigError, load_config
from semray.config.infer import InferConfig, MethodName, TilingConfig
from semray.config.model import UNetConfig
from semray.infer import (
    Denoiser,
    axis_plan,
    axis_windows,
    blend_ramp,
    default_batch_size,
    fold_batchnorm,
    reflect_index,
    tiled_denoise,
    weights_fingerprint,
)
from semray.models.store import save_model
from semray.models.unet import build_model

torch.set_num_threads(1)


def visible_unet(cfg: UNetConfig, seed: int = 0, bn_stats: bool = False) -> nn.Module:
    """A random U-Net whose eval output is spread over [0, 1] (std ~0.15 around 0.5), not clamped flat.

    A freshly initialised network maps everything to a near-constant (often clamped to 0), which would
    make any tiling comparison pass trivially; rescaling the 1x1 head fixes that.
    """
    torch.manual_seed(seed)
    net = build_model(cfg).eval()
    if bn_stats:  # BatchNorms with non-trivial running statistics and affine parameters
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                    m.weight.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    seen: dict[str, torch.Tensor] = {}
    hook = net.head.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        net(torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(seed)))
        hook.remove()
        o = seen["o"]
        k = 0.15 / float(o.std())
        net.head.weight.mul_(k)
        net.head.bias.mul_(k).add_(0.5 - float(o.mean()) * k)
    return net


class Identity(nn.Module):
    """Returns its input; records the largest batch it was given."""

    multiple = 1

    def __init__(self) -> None:
        super().__init__()
        self.max_batch = 0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.max_batch = max(self.max_batch, x.shape[0])
        self.calls += 1
        return x.clone()


def _whole(net: nn.Module, img: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(img)[None, None]).numpy()[0, 0]


NOISY = np.clip(0.5 + 0.2 * np.random.default_rng(0).standard_normal((200, 168)), 0, 1).astype(np.float32)


# ---- pure tiling maths ----


@given(st.integers(1, 200))
def test_blend_ramp_is_a_partition_of_unity(overlap: int) -> None:
    r = blend_ramp(overlap)
    assert r.shape == (overlap,)
    np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-12)
    assert np.all(np.diff(r) >= 0) and 0.0 <= r.min() and r.max() <= 1.0
    if overlap >= 8:  # the outer quarter next to a tile edge is not trusted at all
        assert r[: overlap // 4].max() == 0.0


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 2000),
    tile=st.integers(16, 300),
    frac=st.floats(0.0, 0.49),
    align=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_axis_plan_covers_axis_and_windows_sum_to_one(
    length: int, tile: int, frac: float, align: int
) -> None:
    overlap = int(frac * tile)
    tile_len, starts = axis_plan(length, tile, overlap, align)
    assert tile_len % align == 0 and np.all(starts % align == 0)
    assert starts[0] == 0 and starts[-1] + tile_len >= length
    if len(starts) > 1:
        stride = starts[1] - starts[0]
        assert np.all(np.diff(starts) == stride) and tile_len - stride >= overlap
        assert starts[-1] < length  # no tile lies wholly in the padding
    acc = np.zeros(starts[-1] + tile_len)
    for s, w in zip(starts, axis_windows(tile_len, starts), strict=True):
        acc[s : s + tile_len] += w
    np.testing.assert_allclose(acc[:length], 1.0, atol=1e-6)
    # balanced: no more tiles than tile-sized ones would need, none larger than the (aligned) request
    # unless the overlap forces it, and at most `align` px of padding per tile past the border (unless
    # the tiles already are as small as twice the overlap allows)
    ov = -(-overlap // align) * align
    tile_max = max(tile // align * align, ov + align, 2 * ov)
    assert tile_len <= max(tile_max, -(-length // align) * align)
    if len(starts) > 1:
        assert len(starts) == -(-(length - tile_max) // (tile_max - ov)) + 1
        if tile_len > max(ov + align, 2 * ov):  # tiles not held up by the 2 x overlap floor
            assert starts[-1] + tile_len - length < len(starts) * align


def test_axis_plan_balances_tiles_instead_of_padding_the_last_one() -> None:
    # 512 px, tile 256 / overlap 32: three tiles are needed; 3 x 192 px covers 512 exactly, where
    # 3 x 256 px would reach 192 px past the border
    tile_len, starts = axis_plan(512, 256, 32, 8)
    assert tile_len == 192 and starts.tolist() == [0, 160, 320]
    tile_len, starts = axis_plan(1024, 256, 32, 8)
    assert tile_len == 232 and starts.tolist() == [0, 200, 400, 600, 800]
    tile_len, starts = axis_plan(256, 256, 32, 8)
    assert tile_len == 256 and starts.tolist() == [0]


def test_reflect_index_mirrors_without_repeating_the_edge() -> None:
    np.testing.assert_array_equal(reflect_index(9, 4), [0, 1, 2, 3, 2, 1, 0, 1, 2])
    np.testing.assert_array_equal(reflect_index(3, 1), [0, 0, 0])


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), tile=st.sampled_from([16, 24, 40]))
def test_identity_network_reproduces_the_image_exactly(h: int, w: int, tile: int) -> None:
    img = np.random.default_rng(h * 100 + w).random((h, w), dtype=np.float32)
    out = tiled_denoise(Identity(), img, tile=tile, overlap=tile // 4, batch_size=3)
    assert out.shape == (h, w) and out.dtype == np.float32
    np.testing.assert_allclose(out, img, atol=2e-6)


# ---- seamless blending with a real U-Net ----


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_tiled_output_matches_whole_image_away_from_borders(norm: str) -> None:
    net = visible_unet(UNetConfig(base_width=4, depth=2, norm=norm))
    whole = _whole(net, NOISY)
    assert whole[24:-24, 24:-24].std() > 0.05  # the comparison below is not against a flat image
    inner = (slice(24, -24), slice(24, -24))
    tiled = tiled_denoise(net, NOISY, tile=64, overlap=24, batch_size=3)
    assert np.abs(tiled - whole)[inner].max() < 1e-3
    # the same comparison does catch naive tiling: no overlap leaves the zero-padded tile edges in
    naive = tiled_denoise(net, NOISY, tile=64, overlap=0, batch_size=3)
    assert np.abs(naive - whole)[inner].max() > 0.05


def test_constant_image_shows_no_seam_at_tile_boundaries() -> None:
    # bilinear up-sampling: the network's own response to a constant is constant (no 2x2 checkerboard)
    net = visible_unet(UNetConfig(base_width=4, depth=2, norm="batch", upsample="bilinear"))
    flat = np.full((200, 168), 0.4, np.float32)
    assert np.ptp(_whole(net, flat)[20:-20, 20:-20]) < 1e-5

    def worst_seam(overlap: int) -> float:
        out = tiled_denoise(net, flat, tile=64, overlap=overlap)
        _, ys = axis_plan(200, 64, overlap, net.multiple)
        _, xs = axis_plan(168, 64, overlap, net.multiple)
        d2y = np.abs(np.diff(out, 2, axis=0))  # d2y[i] is centred on row i + 1
        d2x = np.abs(np.diff(out, 2, axis=1))
        rows = [r - 1 for s in ys[1:] for r in range(s - 2, s + overlap + 2)]
        cols = [c - 1 for s in xs[1:] for c in range(s - 2, s + overlap + 2)]
        return max(d2y[rows, 20:-20].max(), d2x[20:-20, cols].max())

    assert worst_seam(16) < 1e-3
    assert worst_seam(0) > 1e-2  # a seam is what this measure sees when blending is missing


def test_any_size_and_tiny_images() -> None:
    net = visible_unet(UNetConfig(base_width=4, depth=2))
    for shape in [(7, 5), (1, 1), (131, 77), (3, 300)]:
        img = np.random.default_rng(1).random(shape, dtype=np.float32)
        out = tiled_denoise(net, img, tile=64, overlap=16)
        assert out.shape == shape and out.dtype == np.float32
        assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


def test_batches_never_exceed_batch_size_and_memory_stays_bounded() -> None:
    img = np.random.default_rng(2).random((1024, 1536), dtype=np.float32)
    net = Identity()
    tracemalloc.start()
    try:
        out = tiled_denoise(net, img, tile=128, overlap=16, batch_size=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n_tiles = len(axis_plan(1024, 128, 16)[1]) * len(axis_plan(1536, 128, 16)[1])
    assert net.max_batch == 5 and net.calls == -(-n_tiles // 5)
    # the output image plus a few batches of tiles; a padded copy or a 2-D weight map would add 1x each
    assert peak < 1.3 * img.nbytes, f"peak {peak / 2**20:.1f} MiB for a {img.nbytes / 2**20:.1f} MiB image"
    np.testing.assert_allclose(out, img, atol=2e-6)


def test_keep_bottom_rows_leaves_the_data_bar_untouched_and_out_of_the_network() -> None:
    net = visible_unet(UNetConfig(base_width=4, depth=2))
    img = NOISY.copy()
    img[-24:] = 1.0  # a bright burned-in data bar
    img[-16:-8, 10:100] = 0.0  # its "text"
    out = tiled_denoise(net, img, tile=64, overlap=16, keep_bottom_rows=24)
    np.testing.assert_array_equal(out[-24:], img[-24:])
    np.testing.assert_array_equal(out[:-24], tiled_denoise(net, img[:-24], tile=64, overlap=16))
    with pytest.raises(ValueError, match="keep_bottom_rows"):
        tiled_denoise(net, img[:10], keep_bottom_rows=10)


def test_channels_last_and_train_mode_restored() -> None:
    net = visible_unet(UNetConfig(base_width=4, depth=2)).train()
    a = tiled_denoise(net, NOISY[:96, :96], tile=64, overlap=16, channels_last=False)
    assert net.training  # eval only for the call
    b = tiled_denoise(net, NOISY[:96, :96], tile=64, overlap=16)  # channels_last by default
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_fold_batchnorm_keeps_the_output_and_leaves_the_model_alone() -> None:
    net = visible_unet(UNetConfig(base_width=4, depth=2), bn_stats=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert n_bn > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training
    x = torch.from_numpy(NOISY[:96, :96].copy())[None, None]
    with torch.no_grad():
        ref, out = net.eval()(x), folded(x)
    assert float(ref.std()) > 0.05  # a visible output, not one clamped flat (where any fold would agree)
    assert float((ref - out).abs().max()) < 1e-5
    for k, v in net.state_dict().items():  # the original still has its BatchNorms and weights
        assert torch.equal(v, before[k]), k
    again = fold_batchnorm(folded)  # idempotent: nothing left to fold
    with torch.no_grad():
        assert torch.equal(again(x), out)


# ---- Denoiser ----


def test_method_names_match_the_classical_module() -> None:
    assert set(typing.get_args(MethodName)) == {"unet", *METHODS}


def test_infer_config_rejects_overlap_of_half_a_tile() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        load_config(InferConfig, {"tiling": {"tile": 64, "overlap": 32}})
    with pytest.raises(ConfigError, match="method"):
        load_config(InferConfig, {"method": "wiener"})
    assert InferConfig(cpus_per_actor=2.5).torch_threads() == 2
    assert InferConfig(cpus_per_actor=0.5).torch_threads() == 1


def test_tiling_section_is_shared_and_old_flat_keys_name_their_new_place() -> None:
    from semray.config.serve import ServeConfig

    assert load_config(InferConfig, {"tiling": {"tile": 128}}).tiling == TilingConfig(tile=128)
    assert ServeConfig().tiling == TilingConfig(tile=512, batch_size=1)  # the app's own defaults
    for cls in (InferConfig, ServeConfig):
        with pytest.raises(ConfigError, match=r"'overlap' -> 'tiling.overlap'"):
            load_config(cls, {"overlap": 16})
        with pytest.raises(ConfigError, match="overlap"):  # the check is the section's, for both
            load_config(cls, {"tiling": {"tile": 64, "overlap": 32}})
    # the CLI flags still work: they now set the section's fields
    args = argparse.Namespace(config=None, overrides=["tiling.batch_size=2"], force=False)
    args.__dict__.update(dict.fromkeys(_FLAG_FIELDS))
    args.tile, args.overlap = 128, 16
    assert build_config(args).tiling == TilingConfig(tile=128, overlap=16, batch_size=2)


def test_denoiser_from_saved_model_and_from_module(tmp_path: Path) -> None:
    cfg = UNetConfig(base_width=4, depth=2)
    net = visible_unet(cfg)
    save_model(net, cfg, tmp_path / "tiny", {"name": "tiny", "version": "7"})
    d = Denoiser(model=str(tmp_path / "tiny"), tile=64, overlap=16, device="cpu")
    assert (d.method, d.name, d.version, d.source) == ("unet", "tiny", "7", "local")
    np.testing.assert_allclose(d(NOISY), tiled_denoise(net, NOISY, tile=64, overlap=16), atol=1e-6)
    m = Denoiser(model=net, device="cpu")
    assert m.name == "custom" and m.version == weights_fingerprint(net)
    assert m.version != weights_fingerprint(visible_unet(cfg, seed=1))
    assert d.settings != Denoiser(model=net, tile=128, overlap=16, device="cpu").settings
    assert d.settings["tile_plan"] == "balanced-1"  # outputs of an older tile layout are not reused
    assert d.batch_size == default_batch_size(torch.device("cpu")) == 1
    assert Denoiser(model=net, batch_size=3, device="cpu").batch_size == 3
    assert default_batch_size(torch.device("cuda")) == 4


def test_denoiser_folds_batchnorm_without_changing_the_output() -> None:
    net = visible_unet(UNetConfig(base_width=4, depth=2), seed=2, bn_stats=True)
    d = Denoiser(model=net, tile=64, overlap=16, device="cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.net.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert d.version == weights_fingerprint(net)  # versioned by the weights the user gave
    ref = tiled_denoise(net, NOISY, tile=64, overlap=16)
    np.testing.assert_allclose(d(NOISY), ref, atol=1e-5)


def test_denoiser_classical_and_threads() -> None:
    before = torch.get_num_threads()
    try:
        d = Denoiser("gaussian", threads=1, keep_bottom_rows=8)
        assert torch.get_num_threads() == 1
        assert (d.name, d.method, d.source) == ("gaussian", "gaussian", "classical")
        out = d(NOISY)
        np.testing.assert_array_equal(out[-8:], NOISY[-8:])
        np.testing.assert_allclose(out[:-8], denoise_classical(NOISY[:-8], "gaussian"), atol=1e-7)
        assert out[:-8].std() < NOISY[:-8].std()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="unknown method"):
        Denoiser("wiener")
