"""Clean wafer synthesis: determinism, geometry (pitch, LER, lattices), SEM contrast, defect masks."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage

from semray.config.base import ConfigError, load_config
from semray.config.synth import _RANGE_BOUNDS, PATTERN_NAMES, Range, SynthConfig
from semray.synth import PATTERN_DEFECTS, generate, render_wafer, sample_pattern

FLAT = {"edge_amplitude": [0, 0], "blur_sigma_px": [0, 0]}  # pure material contrast: coverage readable


def _cfg(**kw) -> SynthConfig:
    return load_config(SynthConfig, kw)


def _only(pattern: str, **kw) -> SynthConfig:
    return _cfg(pattern_weights={pattern: 1.0}, **kw)


# ---------------------------------------------------------------------------------------------
# Determinism, sizes, dtype, range
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_images_regenerate_alone() -> None:
    cfg = _cfg(defect_probability=0.7)
    a, b = list(generate(6, (48, 56), 7, cfg)), list(generate(6, (48, 56), 7, cfg))
    for x, y in zip(a, b, strict=True):
        assert x.clean.tobytes() == y.clean.tobytes()
        assert x.reference.tobytes() == y.reference.tobytes()
        assert x.defect_mask.tobytes() == y.defect_mask.tobytes()
        assert x.defects == y.defects and x.params == y.params
    # Image i is a function of (seed, i) alone.
    rng = np.random.default_rng([7, 4])
    alone = render_wafer(sample_pattern(rng, cfg), (48, 56), rng, cfg)
    assert alone.clean.tobytes() == a[4].clean.tobytes()
    other = list(generate(6, (48, 56), 8, cfg))
    assert all(x.clean.tobytes() != y.clean.tobytes() for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("pattern", PATTERN_NAMES)
@pytest.mark.parametrize("shape", [(97, 131), (31, 64), (8, 9)])
def test_every_pattern_renders_at_odd_sizes(pattern: str, shape: tuple[int, int]) -> None:
    s = render_wafer(pattern, shape, np.random.default_rng(3), _cfg(defect_probability=1.0))
    for img in (s.clean, s.reference):
        assert img.shape == shape and img.dtype == np.float32
        assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
        assert img.std() > 0.01  # a pattern, not a flat field
    assert s.defect_mask.shape == shape and s.defect_mask.dtype == bool
    assert s.pattern == pattern


def test_bad_pattern_and_shape_are_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown pattern"):
        render_wafer("pillars", (32, 32), rng, SynthConfig())
    with pytest.raises(ValueError, match="at least 8"):
        render_wafer("lines", (4, 32), rng, SynthConfig())


def test_sample_pattern_follows_weights() -> None:
    cfg = _cfg(pattern_weights={"lines": 3.0, "tin_balls": 1.0})
    rng = np.random.default_rng(0)
    draws = [sample_pattern(rng, cfg) for _ in range(4000)]
    assert set(draws) == {"lines", "tin_balls"}
    assert draws.count("lines") / len(draws) == pytest.approx(0.75, abs=0.03)


# ---------------------------------------------------------------------------------------------
# Defect masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERN_NAMES)
def test_defect_mask_covers_the_defects_and_nothing_else(pattern: str) -> None:
    cfg = _only(pattern, defect_probability=0.8, max_defects_per_image=4)
    tol = cfg.mask_tolerance
    n_with = 0
    for seed in range(10):
        s = render_wafer(pattern, (72, 90), np.random.default_rng([seed, 11]), cfg)
        diff = np.abs(s.clean - s.reference)
        assert s.defect_mask.any() == bool(s.defects)
        assert (diff[~s.defect_mask] <= tol).all() and (diff[s.defect_mask] > tol).all()
        if not s.defects:
            assert s.clean.tobytes() == s.reference.tobytes()
            continue
        n_with += 1
        in_boxes = np.zeros_like(s.defect_mask)
        for d in s.defects:
            assert d["type"] in PATTERN_DEFECTS[pattern]
            y0, x0, y1, x1 = d["bbox"]
            assert 0 <= y0 < y1 <= 72 and 0 <= x0 < x1 <= 90
            # Tiny defects: a few to a few tens of pixels across.
            assert y1 - y0 <= 40 and x1 - x0 <= 40, d
            assert 0 < d["area_px"] <= (y1 - y0) * (x1 - x0)
            in_boxes[y0:y1, x0:x1] = True
        assert not (s.defect_mask & ~in_boxes).any(), "mask pixels outside every defect's bbox"
        # Every mask pixel belongs to exactly one defect.
        assert sum(d["area_px"] for d in s.defects) == s.defect_mask.sum()
        assert s.defect_mask.mean() < 0.15
    assert n_with >= 5


def test_no_defects_when_probability_zero() -> None:
    for s in generate(8, (40, 40), 1, _cfg(defect_probability=0.0)):
        assert not s.defects and not s.defect_mask.any()
        assert s.clean.tobytes() == s.reference.tobytes()


def test_invisible_defects_are_dropped_and_leave_no_trace() -> None:
    # Line contrast below the mask tolerance: bridges and opens change pixels by < 0.02 at most.
    cfg = _only(
        "lines",
        defect_probability=1.0,
        max_defects_per_image=3,
        defect_weights={"bridge": 1.0, "open": 1.0},
        line_substrate_level=[0.3, 0.3],
        line_level=[0.315, 0.315],
        **FLAT,
    )
    for seed in range(3):
        s = render_wafer("lines", (48, 64), np.random.default_rng(seed), cfg)
        assert s.defects == [] and not s.defect_mask.any()
        assert s.clean.tobytes() == s.reference.tobytes()


# (pattern, defect type, +1/-1: some mask pixel gets > 0.1 brighter/darker; 0 = not checked)
FORCED = [
    ("lines", "bridge", +1),  # line material (brighter) fills the dark space
    ("lines", "open", 0),
    ("lines", "particle", +1),
    ("contacts", "missing_contact", +1),  # the dark hole bottom becomes surface
    ("contacts_staggered", "merged_contact", 0),
    ("contacts", "merged_contact", 0),
    ("tin_balls", "missing_ball", -1),  # a bright ball becomes dark carbon
    ("tin_balls", "merged_ball", 0),
    ("tin_balls", "particle", 0),  # a particle on a bright ball rim need not be brighter
]


@pytest.mark.parametrize(("pattern", "kind", "sign"), FORCED)
def test_each_defect_type_can_be_forced(pattern: str, kind: str, sign: int) -> None:
    cfg = _only(pattern, defect_probability=1.0, max_defects_per_image=1, defect_weights={kind: 1.0})
    for seed in range(4):
        s = render_wafer(pattern, (80, 96), np.random.default_rng(seed), cfg)
        assert [d["type"] for d in s.defects] == [kind]
        assert s.defect_mask.sum() >= 3
        if sign:
            change = sign * (s.clean - s.reference)[s.defect_mask]
            assert change.max() > 0.1, (kind, change.max())


def test_defect_types_foreign_to_a_pattern_are_not_placed() -> None:
    cfg = _only("contacts", defect_probability=1.0, defect_weights={"bridge": 1.0, "open": 1.0})
    s = render_wafer("contacts", (64, 64), np.random.default_rng(0), cfg)
    assert not s.defects and not s.defect_mask.any()


def test_open_cuts_exactly_one_line() -> None:
    cfg = _only("lines", defect_probability=1.0, max_defects_per_image=1, defect_weights={"open": 1.0})
    cfg.line_horizontal_probability = 0.0
    cfg.line_pitch_px = Range(low=20, high=20)
    cfg.line_duty = Range(low=0.5, high=0.5)
    for seed in range(3):
        s = render_wafer("lines", (64, 100), np.random.default_rng(seed), cfg)
        y0, x0, y1, x1 = s.defects[0]["bbox"]
        assert x1 - x0 <= 20  # one line plus its edge bands, never the neighbours
        assert y1 - y0 <= 6 + 2 * 8  # gap length + edge/blur reach on both ends


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _fft_period(profile: np.ndarray) -> float:
    """Dominant period (px) of a 1-D profile, with parabolic interpolation of the spectral peak."""
    spec = np.abs(np.fft.rfft(profile - profile.mean()))
    k = int(np.argmax(spec[1:])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2] + 1e-12)
    k_frac = k + 0.5 * (a - c) / (a - 2 * b + c)
    return profile.size / k_frac


@pytest.mark.parametrize(("pitch", "horizontal"), [(16.0, False), (21.5, False), (12.8, True)])
def test_line_pitch_matches_config(pitch: float, horizontal: bool) -> None:
    kw = {"line_pitch_px": [pitch, pitch], "line_horizontal_probability": float(horizontal)}
    axis = 1 if horizontal else 0
    s = render_wafer("lines", (200, 256), np.random.default_rng(5), _only("lines", **kw, **FLAT))
    assert s.params["pitch_px"] == pytest.approx(pitch)
    assert s.params["orientation"] == ("horizontal" if horizontal else "vertical")
    # Material contrast alone: a square wave whose fundamental is the pitch.
    assert _fft_period(s.reference.mean(axis=axis)) == pytest.approx(pitch, rel=0.02)
    # With edge bands the strongest line of the spectrum may be a harmonic, but of this pitch.
    s = render_wafer("lines", (200, 256), np.random.default_rng(5), _only("lines", **kw))
    ratio = pitch / _fft_period(s.reference.mean(axis=axis))
    assert abs(ratio - round(ratio)) < 0.05


def _line_widths(sigma: float, corr: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row line widths (rows, lines) measured from coverage, and the image."""
    cfg = _only(
        "lines",
        line_pitch_px=[24, 24],
        line_duty=[0.5, 0.5],
        line_horizontal_probability=0.0,
        ler_sigma_px=[sigma, sigma],
        ler_correlation_px=[corr, corr],
        line_substrate_level=[0.2, 0.2],
        line_level=[0.6, 0.6],
        **FLAT,
    )
    s = render_wafer("lines", (512, 240), np.random.default_rng(seed), cfg)
    coverage = (s.reference - 0.2) / 0.4
    off = s.params["offset_px"]
    widths = []
    for c in off + 24 * np.arange(10):
        lo, hi = round(c - 12), round(c + 12)
        if lo >= 0 and hi <= 240:
            # The box-filter anti-aliasing preserves area, so a row's coverage sum is the line width.
            widths.append(coverage[:, lo:hi].sum(axis=1))
    return np.stack(widths, axis=1), s.reference


def test_zero_ler_gives_straight_edges() -> None:
    widths, img = _line_widths(0.0, 5.0, 0)
    assert np.ptp(img, axis=0).max() < 1e-6  # every row identical
    assert widths.std() < 1e-4 and widths.mean() == pytest.approx(12.0, abs=0.01)


def test_ler_sigma_and_correlation_are_measured_back() -> None:
    sigma, corr = 1.0, 6.0
    widths, _ = _line_widths(sigma, corr, 1)
    assert widths.mean() == pytest.approx(12.0, abs=0.3)
    # Two independent edges: width variance is twice the edge variance.
    assert widths.std() / np.sqrt(2) == pytest.approx(sigma, rel=0.2)
    w = widths - widths.mean(axis=0)
    lag = round(corr)
    rho = (w[:-lag] * w[lag:]).mean() / (w * w).mean()
    assert rho == pytest.approx(np.exp(-1.0), abs=0.15)  # autocorrelation exp(-(lag/xi)^2) at lag xi
    rho_far = (w[:-30] * w[30:]).mean() / (w * w).mean()
    assert abs(rho_far) < 0.2


@pytest.mark.parametrize("staggered", [False, True])
def test_contact_lattice_regular_and_staggered(staggered: bool) -> None:
    pattern = "contacts_staggered" if staggered else "contacts"
    cfg = _only(
        pattern,
        contact_pitch_px=[20, 20],
        contact_pitch_ratio_y=[1, 1],
        contact_radius_px=[5, 5],
        contact_radius_jitter_px=0.0,
        contact_position_jitter_px=0.0,
    )
    s = render_wafer(pattern, (160, 200), np.random.default_rng(2), cfg)
    surface, hole = s.params["substrate_level"], s.params["feature_level"]
    labels, n = ndimage.label(s.reference < (surface + hole) / 2)
    cy, cx = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, range(1, n + 1))).T
    inner = (cy > 10) & (cy < 150) & (cx > 10) & (cx < 190)
    cy, cx = cy[inner], cx[inner]
    rows = np.round((cy - cy.min()) / 20).astype(int)
    phase = np.mod(cx - cx[rows == 0][0], 20.0)
    phase = np.minimum(phase, 20 - phase)  # distance to the row-0 column lattice, px
    expected = np.where(rows % 2 == 1, 10.0, 0.0) if staggered else np.zeros_like(phase)
    assert np.abs(phase - expected).max() < 0.5
    assert n == pytest.approx(160 * 200 / 400, rel=0.2)
    # Dark hole bottoms, bright rims around them.
    assert s.reference[labels > 0].min() < hole + 0.05
    assert s.reference.max() > surface + 0.1


def test_tin_balls_are_bright_shaded_spheres_on_dark_carbon() -> None:
    cfg = _only("tin_balls", blur_sigma_px=[0, 0], tin_substrate_level=[0.15, 0.15])
    s = render_wafer("tin_balls", (128, 128), np.random.default_rng(4), cfg)
    balls = s.reference > 0.3
    assert 0.2 < balls.mean() < 0.8
    assert np.median(s.reference[~balls]) == pytest.approx(0.15, abs=1e-6)
    labels, n = ndimage.label(balls)
    assert n >= 10
    # Rims brighter than centres: the brightest pixel of each big ball lies on its boundary.
    sizes = ndimage.sum_labels(balls, labels, range(1, n + 1))
    big = int(np.argmax(sizes)) + 1
    ball = labels == big
    edge = ball & ~ndimage.binary_erosion(ball, iterations=2)
    assert s.reference[edge].max() > s.reference[ball & ~edge].mean() + 0.1
    empty = render_wafer(
        "tin_balls",
        (64, 64),
        np.random.default_rng(4),
        _only("tin_balls", tin_ball_density=0.0, tin_ball_filler_density=0.0),
    )
    assert np.ptp(empty.reference) < 1e-6


def test_beam_blur_softens_edges() -> None:
    def max_step(blur: float) -> float:
        cfg = _only("lines", blur_sigma_px=[blur, blur], line_horizontal_probability=0.0)
        img = render_wafer("lines", (32, 128), np.random.default_rng(0), cfg).reference
        return float(np.abs(np.diff(img, axis=1)).max())

    assert max_step(0.0) > 1.5 * max_step(1.5)


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"blur_sigma_px": {"low": -0.5, "high": 1.0}}, "blur_sigma_px"),
        ({"line_pitch_px": [20, 10]}, "line_pitch_px"),
        ({"line_pitch_px": [5]}, "line_pitch_px"),
        ({"bogus_knob": 3}, "bogus_knob"),
        ({"line_pitch_px": {"low": 10, "high": 20, "mid": 15}}, "line_pitch_px.mid"),
        ({"pattern_weights": {"lines": 0.0}}, "pattern_weights"),
        ({"pattern_weights": {"lines": -1.0}}, "pattern_weights.lines"),
        ({"pattern_weights": {"pillars": 1.0}}, "pattern_weights.pillars"),
        ({"defect_weights": {"scratch": 1.0}}, "defect_weights.scratch"),
        ({"defect_probability": 1.5}, "defect_probability"),
        ({"max_defects_per_image": 0}, "max_defects_per_image"),
        ({"line_duty": [0.5, 0.95]}, "line_duty"),
    ],
)
def test_config_errors_name_the_field(data: dict, field: str) -> None:
    # The message lists each bad field on its own line as "  <dotted.path>: <why>".
    with pytest.raises(ConfigError, match=r"\n  " + re.escape(field) + r"[.:]"):
        load_config(SynthConfig, data)


def test_every_range_field_has_bounds_and_defaults_validate() -> None:
    range_fields = {n for n, f in SynthConfig.model_fields.items() if f.annotation in (Range, "Range")}
    assert range_fields == set(_RANGE_BOUNDS)
    cfg = load_config(SynthConfig, {"edge_width_px": [1.0, 1.0]})
    assert cfg.edge_width_px == Range(low=1.0, high=1.0)
    with pytest.raises(ValueError, match="blur_sigma_px"):
        cfg.blur_sigma_px = Range(low=-1.0, high=0.0)  # validate_assignment
