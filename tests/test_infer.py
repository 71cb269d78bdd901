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
    default_overlap,
    fold_batchnorm,
    padded_index,
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


@given(st.integers(1, 200), st.one_of(st.none(), st.integers(0, 60)))
def test_blend_ramp_is_a_partition_of_unity(overlap: int, radius: int | None) -> None:
    r = blend_ramp(overlap, radius)
    assert r.shape == (overlap,)
    np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-12)
    assert np.all(np.diff(r) >= 0) and 0.0 <= r.min() and r.max() <= 1.0
    if radius is not None and overlap > 2 * radius:  # no pixel a receptive radius from the edge is kept
        assert r[:radius].max(initial=0.0) == 0.0 and r[radius] > 0.0
    elif overlap >= 8:  # best effort: the outer quarter next to a tile edge is not trusted at all
        assert r[: overlap // 4].max() == 0.0


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 2000),
    tile=st.integers(16, 300),
    frac=st.floats(0.0, 0.49),
    align=st.sampled_from([1, 2, 4, 8, 16]),
    radius=st.one_of(st.none(), st.integers(0, 40)),
)
def test_axis_plan_covers_padded_axis_exactly_and_windows_sum_to_one(
    length: int, tile: int, frac: float, align: int, radius: int | None
) -> None:
    overlap = int(frac * tile)
    padded = -(-length // align) * align
    tile_len, starts = axis_plan(length, tile, overlap, align)
    assert tile_len % align == 0 and np.all(starts % align == 0)
    assert starts[0] == 0 and starts[-1] + tile_len == padded  # never past the once-padded image
    ov = -(-overlap // align) * align
    overlaps = starts[:-1] + tile_len - starts[1:]
    if len(starts) > 1:  # at least the overlap asked for, spread evenly; no pixel in 3 tiles
        assert overlaps.min() >= ov and overlaps.max() - overlaps.min() <= align
        assert np.all(overlaps[:-1] + overlaps[1:] <= tile_len)
    acc = np.zeros(padded)
    for s, w in zip(starts, axis_windows(tile_len, starts, radius), strict=True):
        acc[s : s + tile_len] += w
    np.testing.assert_allclose(acc, 1.0, atol=1e-6)
    # balanced: no more tiles than tile-sized ones would need, none larger than the (aligned) request
    # unless the overlap forces it
    tile_max = max(tile // align * align, ov + align, 2 * ov)
    if tile_len <= tile_max and len(starts) > 1:
        assert len(starts) == -(-(padded - tile_max) // (tile_max - ov)) + 1
    if tile_len > tile_max:  # only tiles of about 2 x overlap grow (3+ tiles whose surplus cannot fit)
        assert tile_max < 3 * ov


def test_axis_plan_balances_tiles_instead_of_padding_the_last_one() -> None:
    # 512 px, tile 256 / overlap 32: three tiles are needed; 3 x 192 px covers 512 exactly, where
    # 3 x 256 px would reach 192 px past the border
    tile_len, starts = axis_plan(512, 256, 32, 8)
    assert tile_len == 192 and starts.tolist() == [0, 160, 320]
    # 5 x 232 px with overlap 32 cover 1032 px: the 8 px surplus widens the first overlap to 40
    tile_len, starts = axis_plan(1024, 256, 32, 8)
    assert tile_len == 232 and starts.tolist() == [0, 192, 392, 592, 792]
    tile_len, starts = axis_plan(256, 256, 32, 8)
    assert tile_len == 256 and starts.tolist() == [0]
    # 500 px pads to 504 (a whole pass pads 2 rows above and 2 below); the last tile ends there
    tile_len, starts = axis_plan(500, 256, 104, 8)
    assert starts[-1] + tile_len == 504


def test_padded_index_reflects_like_torch_and_replicates_short_axes() -> None:
    np.testing.assert_array_equal(padded_index(4, 2, 3, "reflect"), [2, 1, 0, 1, 2, 3, 2, 1, 0])
    np.testing.assert_array_equal(padded_index(1, 1, 2, "replicate"), [0, 0, 0, 0])
    x = torch.arange(5.0)[None, None]
    want = torch.nn.functional.pad(x, (3, 4), mode="reflect")[0, 0].long().numpy()
    np.testing.assert_array_equal(padded_index(5, 3, 4, "reflect"), want)


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


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 420),
    w=st.integers(1, 420),
    depth=st.sampled_from([1, 2, 3]),
    upsample=st.sampled_from(["transpose", "bilinear"]),
    edge_input=st.booleans(),
    extra_overlap=st.one_of(st.none(), st.integers(0, 40)),
    extra_tile=st.integers(1, 160),
    seed=st.integers(0, 3),
)
def test_tiled_equals_a_whole_image_pass_within_one_grey_level(
    h: int,
    w: int,
    depth: int,
    upsample: str,
    edge_input: bool,
    extra_overlap: int | None,
    extra_tile: int,
    seed: int,
) -> None:
    # random small U-Nets (random BatchNorm statistics too) on random shapes, border included; overlaps
    # at least the one the receptive field needs (None: the engine's default), random tiles above it
    cfg = UNetConfig(base_width=4, depth=depth, upsample=upsample, edge_input=edge_input)
    net = visible_unet(cfg, seed=seed, bn_stats=True)
    img = np.random.default_rng(seed).random((h, w), dtype=np.float32)
    needed = default_overlap(net.receptive_radius, net.multiple)
    overlap = None if extra_overlap is None else 2 * net.receptive_radius + 1 + extra_overlap
    tile = 2 * (overlap or needed) + extra_tile
    tiled = tiled_denoise(net, img, tile=tile, overlap=overlap, batch_size=2)
    assert np.abs(tiled - _whole(net, img)).max() <= 1 / 255


def test_shipped_model_tiled_equals_its_whole_image_pass() -> None:
    # the case: 500 x 700 (padded to 504 x 704 like a whole pass), tiles of at most 256 px
    d = Denoiser("unet", tile=256, device="cpu")
    assert d.overlap == 104  # 2 x 51 + 1, rounded up to the U-Net's multiple of 8
    yy, xx = np.mgrid[:500, :700]
    clean = 0.25 + 0.5 * (((xx // 14) + (yy // 40)) % 2)
    img = np.clip(np.random.default_rng(3).poisson(clean * 8.0) / 8.0, 0, 1).astype(np.float32)
    whole = _whole(d.net, img)
    assert whole.std() > 0.1
    assert np.abs(d(img) - whole).max() <= 1 / 255
    # the old default overlap (32) leaves seams: the test can tell
    assert np.abs(tiled_denoise(d.net, img, tile=256, overlap=32) - whole).max() > 1 / 255


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
    assert ServeConfig().tiling == TilingConfig(batch_size=1)  # the app's own defaults
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
    assert d.settings["tile_plan"] == "aligned-2"  # outputs of an older tile layout are not reused
    assert m.overlap == default_overlap(net.receptive_radius, net.multiple) == m.settings["overlap"]
    small = Denoiser(model=net, tile=32, device="cpu")  # the default overlap grows tiles, never fails
    assert small.overlap > 16 and small(NOISY).shape == NOISY.shape
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
