"""Clean wafer SEM images with defects: line/space gratings, contact-hole arrays, tin balls on carbon.

Rendering model (lengths in pixels, grey levels in ``[0, 1]``; pixel ``(i, j)`` has its centre at
``y = i, x = j``):

1. **Geometry** is a signed distance field ``sd`` (px, negative inside a feature: a line, a hole, a
   sphere). Coverage ``clip(0.5 - sd, 0, 1)`` anti-aliases every edge without supersampling.
2. **SEM contrast**: material levels mixed by coverage; the secondary-electron *edge effect* as a
   bright band ``edge_amplitude * exp(-sd**2 / (2 edge_width**2))`` along every edge (electrons escape
   through the sidewall near an edge); spheres add the secant-law brightening of their tilted flanks
   (``1 - cos(tilt)``) and a side-detector shading term. Spheres are composited with a height buffer.
3. **Beam blur**: a Gaussian point-spread function, then clipping to ``[0, 1]``.

Defects are local edits of the *same* scene (the same random geometry, roughness and contrast), so the
defect-free ``reference`` differs from ``clean`` only where a defect is, and
``defect_mask = |clean - reference| > mask_tolerance`` is pixel-exact. A sampled defect that ends up
invisible (below the tolerance everywhere, e.g. hidden by saturation) is dropped and the image is
re-rendered without it, so the mask is non-empty exactly when ``defects`` is.

Everything is a deterministic function of the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from semray.config.synth import PATTERN_NAMES, SynthConfig

F32 = np.float32
_FAR = F32(1e4)  # "no feature near here" distance, px; finite so exp() and arithmetic stay clean
_SMOOTH_PX = 1.0  # fillet radius of bridge/open/neck junctions, px (real defects have no sharp corners)
_BLUR_TRUNCATE = 4.0  # Gaussian PSF support in sigmas; defect influence windows rely on it

PATTERN_DEFECTS: dict[str, tuple[str, ...]] = {
    "lines": ("bridge", "open", "particle"),
    "contacts": ("missing_contact", "merged_contact", "particle"),
    "contacts_staggered": ("missing_contact", "merged_contact", "particle"),
    "tin_balls": ("missing_ball", "merged_ball", "particle"),
}
"""Defect types each pattern can carry; ``SynthConfig.defect_weights`` picks among them."""


@dataclass
class SynthSample:
    """One rendered wafer image.

    Attributes:
        clean: float32 (H, W) in [0, 1], the defective noise-free image.
        reference: float32 (H, W) in [0, 1], the same scene rendered without any defect.
        defect_mask: bool (H, W), pixels where ``|clean - reference| > mask_tolerance``.
        pattern: pattern family name (one of ``PATTERN_NAMES``).
        defects: one dict per defect: ``type`` (str), ``bbox`` (y0, x0, y1, x1) ints, half-open,
            the tight box of the defect's mask pixels, ``area_px`` (int, its mask pixels) and
            ``center`` (y, x) floats, px.
        params: the per-image values drawn from the config (pitch, levels, blur, ...) for tracing.
    """

    clean: np.ndarray
    reference: np.ndarray
    defect_mask: np.ndarray
    pattern: str
    defects: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Contrast:
    """SEM contrast settings drawn once per image."""

    edge_amp: float
    edge_w: float
    blur: float
    tilt: float
    shade: float
    shade_dir: tuple[float, float]  # unit (y, x) vector towards the side detector
    particle_level: float

    @classmethod
    def sample(cls, rng: np.random.Generator, cfg: SynthConfig) -> _Contrast:
        edge_amp, edge_w = cfg.edge_amplitude.sample(rng), cfg.edge_width_px.sample(rng)
        blur, tilt = cfg.blur_sigma_px.sample(rng), cfg.sphere_tilt_gain.sample(rng)
        shade, particle = cfg.detector_shading.sample(rng), cfg.particle_level.sample(rng)
        phi = rng.uniform(0.0, 2.0 * math.pi)
        return cls(edge_amp, edge_w, blur, tilt, shade, (math.sin(phi), math.cos(phi)), particle)

    def as_params(self) -> dict[str, Any]:
        return {
            "edge_amplitude": self.edge_amp,
            "edge_width_px": self.edge_w,
            "blur_sigma_px": self.blur,
            "sphere_tilt_gain": self.tilt,
            "detector_shading": self.shade,
            "particle_level": self.particle_level,
        }

    @property
    def edit_pad(self) -> float:
        """Distance (px) beyond a defect's geometry where its pre-blur effect is still above ~1e-3."""
        return _SMOOTH_PX + 4.0 * self.edge_w + 2.0

    @property
    def blur_pad(self) -> int:
        return int(_BLUR_TRUNCATE * self.blur + 0.5) + 1 if self.blur > 0 else 0


@dataclass
class _Defect:
    """A defect in a scene's canonical frame: ``box`` = (y0, x0, y1, x1) geometric extent, float px."""

    type: str
    box: tuple[float, float, float, float]
    data: dict[str, Any]
    reach: float = 0.0  # px beyond ``box`` + edit pad the edit may touch (a removed hole's Voronoi cell)


# ----------------------------------------------------------------------------------------------
# Distance-field and shading primitives (all broadcast over arrays of pixel coordinates)
# ----------------------------------------------------------------------------------------------


def _coverage(sd: np.ndarray) -> np.ndarray:
    """Area fraction of a pixel inside a feature, from its signed distance (box-filter anti-aliasing)."""
    return np.clip(F32(0.5) - sd, F32(0.0), F32(1.0))


def _band(sd: np.ndarray, width: float) -> np.ndarray:
    """SE edge-effect profile across an edge: 1 on the edge, Gaussian fall-off of sigma ``width``."""
    t = sd * F32(1.0 / width)
    return np.exp(F32(-0.5) * t * t)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two distance fields with a fillet of radius ~``k`` px (polynomial smooth minimum)."""
    h = np.clip(F32(0.5) + F32(0.5 / k) * (b - a), F32(0.0), F32(1.0))
    return b + (a - b) * h - F32(k) * h * (F32(1.0) - h)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    return -_smin(-a, -b, k)


def _box_sd(yy: np.ndarray, xx: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Signed distance (px) to the axis-aligned rectangle ``box`` = (y0, x0, y1, x1)."""
    y0, x0, y1, x1 = box
    qy = np.abs(yy - F32((y0 + y1) / 2)) - F32((y1 - y0) / 2)
    qx = np.abs(xx - F32((x0 + x1) / 2)) - F32((x1 - x0) / 2)
    outside = np.hypot(np.maximum(qy, F32(0)), np.maximum(qx, F32(0)))
    return outside + np.minimum(np.maximum(qy, qx), F32(0))


def _segment_offset(
    yy: np.ndarray, xx: np.ndarray, p: tuple[float, float], q: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Offset (dy, dx) of each pixel from its closest point on the segment p-q (px)."""
    by, bx = q[0] - p[0], q[1] - p[1]
    py, px = yy - F32(p[0]), xx - F32(p[1])
    t = np.clip((py * F32(by) + px * F32(bx)) / F32(by * by + bx * bx), F32(0), F32(1))
    return py - t * F32(by), px - t * F32(bx)


def _sphere(
    dy: np.ndarray, dx: np.ndarray, r: np.ndarray | float, level: float, c: _Contrast
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage, grey level and height of spheres of radius ``r`` seen from above.

    ``dy, dx`` are pixel offsets from each sphere's centre (px). The flank at tilt ``t`` emits more
    secondary electrons (secant law, written as ``tilt * (1 - cos t)`` to stay finite at the rim), the
    rim carries the edge band, and flanks facing the side detector are brighter.
    Returns (alpha in [0, 1], grey level, height in px), each broadcast to the inputs' shape.
    """
    r = np.asarray(r, dtype=F32)
    d = np.hypot(dy, dx)
    sd = d - r
    u = np.minimum(d / r, F32(1.0))
    cos_t = np.sqrt(F32(1.0) - u * u)
    inv_d = F32(1.0) / np.maximum(d, F32(1e-6))
    facing = (dy * F32(c.shade_dir[0]) + dx * F32(c.shade_dir[1])) * inv_d * u
    grey = (
        F32(level)
        + F32(c.tilt) * (F32(1.0) - cos_t)
        + F32(c.edge_amp) * _band(sd, c.edge_w)
        + F32(c.shade) * facing
    )
    return _coverage(sd), grey, r * cos_t


def _composite(
    img: np.ndarray,
    zbuf: np.ndarray,
    alpha: np.ndarray,
    grey: np.ndarray,
    height: np.ndarray,
    always_front: bool = False,
) -> None:
    """Draw an object over ``img`` (in place) where it is not hidden behind a taller one in ``zbuf``."""
    if not always_front:
        alpha = np.where(height >= zbuf, alpha, F32(0))
    img += alpha * (grey - img)
    np.maximum(zbuf, height, out=zbuf)


def _window(
    box: tuple[float, float, float, float], pad: float, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Pixel window around ``box`` grown by ``pad`` px and clipped to the image, with its coordinates."""
    y0, y1 = max(math.floor(box[0] - pad), 0), min(math.ceil(box[2] + pad) + 1, shape[0])
    x0, x1 = max(math.floor(box[1] - pad), 0), min(math.ceil(box[3] + pad) + 1, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    yy = np.arange(y0, y1, dtype=F32)[:, None]
    xx = np.arange(x0, x1, dtype=F32)[None, :]
    return (slice(y0, y1), slice(x0, x1)), yy, xx


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, int], corr: float) -> np.ndarray:
    """Unit-variance Gaussian noise along the last axis with autocorrelation ``exp(-(lag/corr)**2)``.

    Periodic along the axis; ``corr`` (px) <= 0 gives white noise. Shape ``shape``, float64.
    """
    white = rng.standard_normal(shape)
    if corr <= 0:
        return white
    # The autocorrelation is the kernel convolved with itself, a Gaussian of variance 2 s**2; that
    # equals exp(-(lag/corr)**2) for s = corr / 2.
    s = corr / 2.0
    out = gaussian_filter1d(white, s, axis=-1, mode="wrap", truncate=4.0)
    # Exact variance of periodic filtering: fold the kernel onto the period, sum its squared weights.
    radius = int(4.0 * s + 0.5)
    t = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (t / s) ** 2)
    k /= k.sum()
    folded = np.bincount(t % shape[-1], weights=k, minlength=shape[-1])
    return out / math.sqrt(float(np.sum(folded**2)))


# ----------------------------------------------------------------------------------------------
# Scenes: one class per pattern family; random geometry drawn in __init__, defects are edits
# ----------------------------------------------------------------------------------------------


class _Scene:
    """Base of a pattern's scene, drawn in a canonical frame of shape ``self.shape``."""

    shape: tuple[int, int]
    transpose: bool = False  # the canonical frame is the output transposed (horizontal gratings)
    params: dict[str, Any]

    def __init__(self, cfg: SynthConfig, c: _Contrast) -> None:
        self.cfg, self.c = cfg, c
        self._base: tuple[np.ndarray, np.ndarray] | None = None

    def _draw(self, sy: slice, sx: slice, defects: list[_Defect]) -> tuple[np.ndarray, np.ndarray]:
        """Pre-blur grey level and height (float32) of the pixel block ``[sy, sx]`` with ``defects``.

        Must be pointwise: a pixel's value depends only on its coordinates and the defects, and a
        defect acts on exactly the pixels of its :meth:`edit_window`. That lets :meth:`render` redraw
        only the defects' windows on top of the cached defect-free image.
        """
        raise NotImplementedError

    def edit_window(self, d: _Defect) -> tuple[slice, slice] | None:
        """Canonical-frame pixels a (non-particle) defect's edit may change before blur."""
        win = _window(d.box, self.c.edit_pad + d.reach, self.shape)
        return None if win is None else win[0]

    def _clip(
        self, d: _Defect, sy: slice, sx: slice
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """Part of ``d``'s edit window inside block ``[sy, sx]``: block-local slices and coordinates."""
        win = self.edit_window(d)
        if win is None:
            return None
        y0, y1 = max(win[0].start, sy.start), min(win[0].stop, sy.stop)
        x0, x1 = max(win[1].start, sx.start), min(win[1].stop, sx.stop)
        if y0 >= y1 or x0 >= x1:
            return None
        local = (slice(y0 - sy.start, y1 - sy.start), slice(x0 - sx.start, x1 - sx.start))
        return local, np.arange(y0, y1, dtype=F32)[:, None], np.arange(x0, x1, dtype=F32)[None, :]

    def render(self, defects: list[_Defect]) -> tuple[np.ndarray, np.ndarray]:
        """Pre-blur grey image and height buffer (float32, canonical shape) with ``defects`` applied.

        Particles are not part of the scene (see :func:`_draw_particle`) and are ignored here.
        """
        if self._base is None:
            self._base = self._draw(slice(0, self.shape[0]), slice(0, self.shape[1]), [])
        img, zbuf = self._base[0].copy(), self._base[1].copy()
        edits = [d for d in defects if d.type != "particle"]
        for d in edits:
            win = self.edit_window(d)
            if win is not None:
                img[win], zbuf[win] = self._draw(*win, edits)
        return img, zbuf

    def sample_defect(self, kind: str, rng: np.random.Generator, used: set[Any]) -> _Defect | None:
        """Place one defect of ``kind`` (not ``particle``), or None where the image has no room for it."""
        raise NotImplementedError


class _Lines(_Scene):
    """Line/space grating with line-edge roughness; vertical lines in the canonical frame."""

    def __init__(self, shape: tuple[int, int], rng: np.random.Generator, cfg: SynthConfig, c: _Contrast):
        super().__init__(cfg, c)
        self.transpose = bool(rng.random() < cfg.line_horizontal_probability)
        h, w = (shape[1], shape[0]) if self.transpose else shape
        self.shape = (h, w)
        pitch = cfg.line_pitch_px.sample(rng)
        duty = cfg.line_duty.sample(rng)
        cd = min(max(duty * pitch, 2.0), pitch - 2.0)
        offset = rng.uniform(0.0, pitch)
        ler_sigma, ler_corr = cfg.ler_sigma_px.sample(rng), cfg.ler_correlation_px.sample(rng)
        self.substrate, self.line = cfg.line_substrate_level.sample(rng), cfg.line_level.sample(rng)
        n = math.ceil(w / pitch) + 3
        # Line k is centred at offset + (k - 1) * pitch, so lines 0 and n-1 lie just off the image.
        self.centers = offset + (np.arange(n) - 1) * pitch
        # Clipping keeps every line and space open whatever the roughness draw.
        lim = 0.45 * min(cd, pitch - cd)
        rough = np.clip(ler_sigma * _correlated_noise(rng, (2 * n, h), ler_corr), -lim, lim)
        self.left_t = (self.centers[:, None] - cd / 2 + rough[:n]).T.astype(F32)  # (h, n) edge x
        self.right_t = (self.centers[:, None] + cd / 2 + rough[n:]).T.astype(F32)
        self.pitch, self.cd, self.offset = pitch, cd, offset
        self.params = {
            "orientation": "horizontal" if self.transpose else "vertical",
            "pitch_px": pitch,
            "cd_px": cd,
            "offset_px": offset,  # x of the first line centre at or right of 0 (canonical frame)
            "ler_sigma_px": ler_sigma,
            "ler_correlation_px": ler_corr,
            "substrate_level": self.substrate,
            "feature_level": self.line,
        }

    def _draw(self, sy: slice, sx: slice, defects: list[_Defect]) -> tuple[np.ndarray, np.ndarray]:
        x = np.arange(sx.start, sx.stop, dtype=F32)
        k0 = np.floor((x - self.offset) / self.pitch).astype(np.intp) + 1
        left, right = self.left_t[sy], self.right_t[sy]
        # The nearest edge of any pixel belongs to one of the two lines whose centres bracket it.
        sd_a = np.maximum(left[:, k0] - x, x - right[:, k0])
        sd_b = np.maximum(left[:, k0 + 1] - x, x - right[:, k0 + 1])
        for d in defects:
            part = self._clip(d, sy, sx) if d.type == "open" else None
            if part is None:
                continue
            (ly, lx), yy, xx = part
            cut = -_box_sd(yy, xx, d.box)
            # Cut only line j, so the gap never bites into a neighbour.
            for sd, k in ((sd_a, k0), (sd_b, k0 + 1)):
                sd[ly, lx] = np.where(k[lx] == d.data["line"], _smax(sd[ly, lx], cut, _SMOOTH_PX), sd[ly, lx])
        sd = np.minimum(sd_a, sd_b)
        for d in defects:
            part = self._clip(d, sy, sx) if d.type == "bridge" else None
            if part is not None:
                (ly, lx), yy, xx = part
                sd[ly, lx] = _smin(sd[ly, lx], _box_sd(yy, xx, d.box), _SMOOTH_PX)
        img = F32(self.substrate) + F32(self.line - self.substrate) * _coverage(sd)
        img += F32(self.c.edge_amp) * _band(sd, self.c.edge_w)
        return img, np.zeros_like(img)

    def sample_defect(self, kind: str, rng: np.random.Generator, used: set[Any]) -> _Defect | None:
        h, w = self.shape
        c = self.centers
        inside = np.flatnonzero((c >= 0) & (c <= w - 1))
        if kind == "bridge":
            inside = inside[np.isin(inside + 1, inside)]
            size = self.cfg.bridge_width_px.sample(rng)
        else:
            size = self.cfg.open_length_px.sample(rng)
        if inside.size == 0 or h < size + 3:
            return None
        j = int(rng.choice(inside))
        y0 = float(rng.uniform(1.0, h - 2.0 - size))
        if kind == "bridge":
            # The box spans centre to centre so it overlaps both lines whatever their roughness.
            return _Defect("bridge", (y0, float(c[j]), y0 + size, float(c[j + 1])), {"line": j})
        half = self.pitch / 2
        return _Defect("open", (y0, float(c[j] - half), y0 + size, float(c[j] + half)), {"line": j})


class _Contacts(_Scene):
    """Contact-hole array on a rectangular or staggered (every other row shifted half a pitch) lattice."""

    def __init__(
        self,
        shape: tuple[int, int],
        rng: np.random.Generator,
        cfg: SynthConfig,
        c: _Contrast,
        staggered: bool,
    ):
        super().__init__(cfg, c)
        self.shape = h, w = shape
        self.staggered = staggered
        px = cfg.contact_pitch_px.sample(rng)
        py = px * cfg.contact_pitch_ratio_y.sample(rng)
        r_nom = cfg.contact_radius_px.sample(rng)
        self.surface, self.hole = cfg.contact_surface_level.sample(rng), cfg.contact_hole_level.sample(rng)
        s_r, s_p = cfg.contact_radius_jitter_px, cfg.contact_position_jitter_px
        nearest = min(px, math.hypot(px / 2, py)) if staggered else min(px, py)
        # Keep a >= 3 px wall between neighbours even with 2-sigma jitter in size and placement.
        r_nom = max(1.0, min(r_nom, nearest / 2 - 1.5 - 2 * s_r - 2 * math.sqrt(2) * s_p))
        oy, ox = rng.uniform(0.0, py), rng.uniform(0.0, px)
        ny, nx = math.ceil(h / py) + 3, math.ceil(w / px) + 5
        rows = np.arange(ny)[:, None]
        self.row_shift = np.where(staggered & (rows % 2 == 1), px / 2, 0.0)  # (ny, 1)
        jit = np.clip(rng.standard_normal((3, ny, nx)), -2.0, 2.0)
        self.cy = (oy + (rows - 1) * py + s_p * jit[0]).astype(F32)
        self.cx = (ox + (np.arange(nx)[None, :] - 2) * px + self.row_shift + s_p * jit[1]).astype(F32)
        self.r = np.maximum(r_nom + s_r * jit[2], 1.0).astype(F32)
        self.px, self.py, self.oy, self.ox = px, py, oy, ox
        self.params = {
            "staggered": staggered,
            "pitch_x_px": px,
            "pitch_y_px": py,
            "radius_px": r_nom,
            "substrate_level": self.surface,
            "feature_level": self.hole,
        }

    def _draw(self, sy: slice, sx: slice, defects: list[_Defect]) -> tuple[np.ndarray, np.ndarray]:
        r = self.r
        missing = [d.data["hole"] for d in defects if d.type == "missing_contact"]
        if missing:
            r = r.copy()
            r[tuple(np.array(missing).T)] = -_FAR  # an absent hole is infinitely far from every pixel
        yv = np.arange(sy.start, sy.stop, dtype=F32)[:, None]
        xv = np.arange(sx.start, sx.stop, dtype=F32)[None, :]
        iy0 = np.floor((yv - self.oy) / self.py).astype(np.intp) + 1  # (h, 1)
        sd = np.full((yv.size, xv.size), _FAR, dtype=F32)
        # The nearest hole is one of the two bracketing holes in each of the two bracketing rows.
        for iy in (iy0, iy0 + 1):
            ix0 = np.floor((xv - self.ox - self.row_shift[iy, 0]) / self.px).astype(np.intp) + 2
            for ix in (ix0, ix0 + 1):
                dist = np.hypot(yv - self.cy[iy, ix], xv - self.cx[iy, ix]) - r[iy, ix]
                np.minimum(sd, dist, out=sd)
        for d in defects:
            part = self._clip(d, sy, sx) if d.type == "merged_contact" else None
            if part is not None:
                (ly, lx), yy, xx = part
                oy_, ox_ = _segment_offset(yy, xx, d.data["p"], d.data["q"])
                neck = np.hypot(oy_, ox_) - F32(d.data["neck"])
                sd[ly, lx] = _smin(sd[ly, lx], neck, _SMOOTH_PX)
        img = F32(self.surface) + F32(self.hole - self.surface) * _coverage(sd)
        img += F32(self.c.edge_amp) * _band(sd, self.c.edge_w)
        return img, np.zeros_like(img)

    def _holes_inside(self, used: set[Any]) -> list[tuple[int, int]]:
        h, w = self.shape
        m = (self.cy >= 0) & (self.cy <= h - 1) & (self.cx >= 0) & (self.cx <= w - 1)
        return [(int(a), int(b)) for a, b in zip(*np.nonzero(m), strict=True) if (a, b) not in used]

    def sample_defect(self, kind: str, rng: np.random.Generator, used: set[Any]) -> _Defect | None:
        holes = self._holes_inside(used)
        if kind == "missing_contact":
            if not holes:
                return None
            a = holes[int(rng.integers(len(holes)))]
            used.add(a)
            y, x, r = float(self.cy[a]), float(self.cx[a]), float(self.r[a])
            # Removing a hole changes the distance field over its Voronoi cell, up to a pitch away.
            reach = max(self.px, self.py)
            return _Defect("missing_contact", (y - r, x - r, y + r, x + r), {"hole": a}, reach)
        hole_set = set(holes)
        # Neighbours: the next hole in the row, and on a staggered lattice the diagonal one below.
        steps = [(0, 1)] + ([(1, 0), (1, -1)] if self.staggered else [])
        pairs = []
        for a in holes:
            for dy, dx in steps:
                dx_ = dx + (1 if self.staggered and dy and a[0] % 2 == 1 else 0)
                b = (a[0] + dy, a[1] + dx_)
                if b in hole_set:
                    pairs.append((a, b))
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        used.update((a, b))
        p, q = (float(self.cy[a]), float(self.cx[a])), (float(self.cy[b]), float(self.cx[b]))
        r = max(float(self.r[a]), float(self.r[b]))
        neck = self.cfg.merged_neck_fraction.sample(rng) * min(float(self.r[a]), float(self.r[b]))
        box = (min(p[0], q[0]) - r, min(p[1], q[1]) - r, max(p[0], q[0]) + r, max(p[1], q[1]) + r)
        return _Defect("merged_contact", box, {"p": p, "q": q, "neck": neck})


class _SphereGrid:
    """Non-overlapping spheres on a jittered grid: each sphere lies wholly inside its own cell."""

    def __init__(
        self,
        shape: tuple[int, int],
        rng: np.random.Generator,
        r_lo: float,
        r_hi: float,
        density: float,
        gap: float,
    ):
        self.cell = cell = 2.0 * r_hi + gap
        self.oy, self.ox = rng.uniform(0.0, cell, size=2)
        ny, nx = math.ceil((shape[0] + cell) / cell) + 1, math.ceil((shape[1] + cell) / cell) + 1
        self.present = rng.random((ny, nx)) < density
        # Log-uniform radii: many small spheres, fewer large ones, as in tin-on-carbon samples.
        self.r = np.exp(rng.uniform(math.log(r_lo), math.log(r_hi), (ny, nx))).astype(F32)
        room = cell - 2.0 * self.r - gap
        u = rng.random((2, ny, nx))
        base_y = np.arange(ny)[:, None] * cell - self.oy
        base_x = np.arange(nx)[None, :] * cell - self.ox
        self.cy = (base_y + gap / 2 + self.r + u[0] * room).astype(F32)
        self.cx = (base_x + gap / 2 + self.r + u[1] * room).astype(F32)

    def cell_of(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        iy = np.clip(np.floor((y + self.oy) / self.cell).astype(np.intp), 0, self.r.shape[0] - 1)
        ix = np.clip(np.floor((x + self.ox) / self.cell).astype(np.intp), 0, self.r.shape[1] - 1)
        return iy, ix

    def draw(
        self,
        img: np.ndarray,
        zbuf: np.ndarray,
        yv: np.ndarray,
        xv: np.ndarray,
        level: float,
        c: _Contrast,
        present: np.ndarray,
    ) -> None:
        """Composite the present spheres into the block ``img``/``zbuf`` at pixel coordinates yv, xv."""
        iy, ix = self.cell_of(yv, xv)
        alpha, grey, height = _sphere(yv - self.cy[iy, ix], xv - self.cx[iy, ix], self.r[iy, ix], level, c)
        on = present[iy, ix]
        _composite(img, zbuf, np.where(on, alpha, F32(0)), grey, np.where(on, height, F32(0)))


class _TinBalls(_Scene):
    """Tin spheres of widely varying size on a dark carbon substrate (the SEM resolution sample)."""

    def __init__(self, shape: tuple[int, int], rng: np.random.Generator, cfg: SynthConfig, c: _Contrast):
        super().__init__(cfg, c)
        self.shape = shape
        gap = cfg.tin_ball_gap_px
        self.substrate, self.ball = cfg.tin_substrate_level.sample(rng), cfg.tin_ball_level.sample(rng)
        big, small = cfg.tin_ball_radius_px, cfg.tin_ball_filler_radius_px
        self.big = _SphereGrid(shape, rng, big.low, big.high, cfg.tin_ball_density, gap)
        self.small = _SphereGrid(shape, rng, small.low, small.high, cfg.tin_ball_filler_density, gap)
        # Drop small spheres that would touch a large one: check the 3x3 large cells around each.
        b, s = self.big, self.small
        iy, ix = b.cell_of(s.cy, s.cx)
        clash = np.zeros(s.present.shape, dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                jy = np.clip(iy + dy, 0, b.r.shape[0] - 1)
                jx = np.clip(ix + dx, 0, b.r.shape[1] - 1)
                dist = np.hypot(s.cy - b.cy[jy, jx], s.cx - b.cx[jy, jx])
                clash |= b.present[jy, jx] & (dist < b.r[jy, jx] + s.r + gap)
        s.present &= ~clash
        self.params = {
            "ball_radius_px_low": big.low,
            "ball_radius_px_high": big.high,
            "substrate_level": self.substrate,
            "feature_level": self.ball,
        }

    def _draw(self, sy: slice, sx: slice, defects: list[_Defect]) -> tuple[np.ndarray, np.ndarray]:
        yv = np.arange(sy.start, sy.stop, dtype=F32)[:, None]
        xv = np.arange(sx.start, sx.stop, dtype=F32)[None, :]
        img = np.full((yv.size, xv.size), self.substrate, dtype=F32)
        zbuf = np.zeros_like(img)
        present = self.big.present
        missing = [d.data["ball"] for d in defects if d.type == "missing_ball"]
        if missing:
            present = present.copy()
            present[tuple(np.array(missing).T)] = False
        self.small.draw(img, zbuf, yv, xv, self.ball, self.c, self.small.present)
        self.big.draw(img, zbuf, yv, xv, self.ball, self.c, present)
        for d in defects:
            part = self._clip(d, sy, sx) if d.type == "merged_ball" else None
            if part is not None:
                (ly, lx), yy, xx = part
                # A cylinder-like neck between the two centres; the balls hide all but the joint.
                oy_, ox_ = _segment_offset(yy, xx, d.data["p"], d.data["q"])
                alpha, grey, height = _sphere(oy_, ox_, d.data["neck"], self.ball, self.c)
                _composite(img[ly, lx], zbuf[ly, lx], alpha, grey, height)
        return img, zbuf

    def _balls_inside(self, used: set[Any]) -> list[tuple[int, int]]:
        b, (h, w) = self.big, self.shape
        m = b.present & (b.cy >= 0) & (b.cy <= h - 1) & (b.cx >= 0) & (b.cx <= w - 1)
        return [(int(a), int(c)) for a, c in zip(*np.nonzero(m), strict=True) if (a, c) not in used]

    def _gap(self, a: tuple[int, int], c: tuple[int, int]) -> float:
        """Free space between large balls ``a`` and ``c``, px."""
        b = self.big
        return float(np.hypot(b.cy[a] - b.cy[c], b.cx[a] - b.cx[c]) - b.r[a] - b.r[c])

    def sample_defect(self, kind: str, rng: np.random.Generator, used: set[Any]) -> _Defect | None:
        b = self.big
        balls = self._balls_inside(used)
        if kind == "missing_ball":
            if not balls:
                return None
            a = balls[int(rng.integers(len(balls)))]
            used.add(a)
            y, x, r = float(b.cy[a]), float(b.cx[a]), float(b.r[a])
            return _Defect("missing_ball", (y - r, x - r, y + r, x + r), {"ball": a})
        ball_set = set(balls)
        pairs = [(a, (a[0], a[1] + 1)) for a in balls if (a[0], a[1] + 1) in ball_set]
        pairs += [(a, (a[0] + 1, a[1])) for a in balls if (a[0] + 1, a[1]) in ball_set]
        if not pairs:
            return None
        # Only near neighbours fuse; a long neck would be a dumbbell, not a merged pair.
        gaps = np.array([self._gap(a, c) for a, c in pairs])
        close = np.flatnonzero(gaps <= max(3.0, float(gaps.min())))
        a, c = pairs[int(close[rng.integers(close.size)])]
        used.update((a, c))
        p, q = (float(b.cy[a]), float(b.cx[a])), (float(b.cy[c]), float(b.cx[c]))
        neck = self.cfg.merged_neck_fraction.sample(rng) * float(min(b.r[a], b.r[c]))
        box = (min(p[0], q[0]), min(p[1], q[1]), max(p[0], q[0]), max(p[1], q[1]))
        return _Defect("merged_ball", box, {"p": p, "q": q, "neck": neck})


# ----------------------------------------------------------------------------------------------
# Particles (any pattern), defect sampling, final image
# ----------------------------------------------------------------------------------------------


def _sample_particle(shape: tuple[int, int], rng: np.random.Generator, cfg: SynthConfig) -> _Defect:
    r = cfg.particle_radius_px.sample(rng)
    cy, cx = rng.uniform(0.0, shape[0] - 1.0), rng.uniform(0.0, shape[1] - 1.0)
    # Lobes (2nd and 3rd angular harmonics) make particles irregular blobs rather than discs.
    amps = rng.uniform(-1.0, 1.0, 2) * cfg.particle_irregularity / 2
    phases = rng.uniform(0.0, 2.0 * math.pi, 2)
    reach = r * (1.0 + float(np.abs(amps).sum()))
    box = (cy - reach, cx - reach, cy + reach, cx + reach)
    return _Defect("particle", box, {"c": (cy, cx), "r": r, "amps": amps, "phases": phases})


def _draw_particle(img: np.ndarray, zbuf: np.ndarray, d: _Defect, c: _Contrast) -> None:
    win = _window(d.box, 1.0, img.shape)
    if win is None:
        return
    (sy, sx), yy, xx = win
    dy, dx = yy - F32(d.data["c"][0]), xx - F32(d.data["c"][1])
    theta = np.arctan2(dy, dx)
    (a2, a3), (p2, p3) = d.data["amps"], d.data["phases"]
    lobes = a2 * np.cos(2 * theta + p2) + a3 * np.cos(3 * theta + p3)
    r = (d.data["r"] * (1.0 + lobes)).astype(F32)
    alpha, grey, height = _sphere(dy, dx, r, c.particle_level, c)
    # Particles lie on top of the pattern, so they are never hidden.
    _composite(img[sy, sx], zbuf[sy, sx], alpha, grey, height, always_front=True)


def _sample_defects(pattern: str, scene: _Scene, rng: np.random.Generator, cfg: SynthConfig) -> list[_Defect]:
    if rng.random() >= cfg.defect_probability:
        return []
    kinds = [k for k in PATTERN_DEFECTS[pattern] if cfg.defect_weights.get(k, 0.0) > 0]  # type: ignore[call-overload]
    if not kinds:
        return []
    weights = np.array([cfg.defect_weights[k] for k in kinds])  # type: ignore[index]
    n = int(rng.integers(1, cfg.max_defects_per_image + 1))
    used: set[Any] = set()
    out = []
    for _ in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        d = (
            _sample_particle(scene.shape, rng, cfg)
            if kind == "particle"
            else scene.sample_defect(kind, rng, used)
        )
        if d is not None:
            out.append(d)
    return out


def _finish(scene: _Scene, defects: list[_Defect]) -> np.ndarray:
    """Render, add particles, blur with the beam PSF, clip; float32 (H, W) in the output frame."""
    img, zbuf = scene.render(defects)
    for d in defects:
        if d.type == "particle":
            _draw_particle(img, zbuf, d, scene.c)
    if scene.c.blur > 0:
        img = gaussian_filter(img, scene.c.blur, mode="reflect", truncate=_BLUR_TRUNCATE)
    img = np.clip(img, 0.0, 1.0).astype(F32, copy=False)
    return np.ascontiguousarray(img.T) if scene.transpose else img


def _attribute(
    scene: _Scene, defects: list[_Defect], mask: np.ndarray
) -> tuple[list[dict[str, Any]], list[_Defect]]:
    """Split ``mask`` (output frame) among the defects; returns their records and the invisible ones.

    A defect can only change pixels within its edit window grown by the PSF support; a mask pixel
    inside several such windows goes to the defect whose geometry is nearest.
    """
    best = np.full(mask.shape, np.inf, dtype=F32)
    owner = np.full(mask.shape, -1, dtype=np.int32)
    wins: list[tuple[slice, slice] | None] = []
    for i, d in enumerate(defects):
        reach = 1.0 if d.type == "particle" else scene.c.edit_pad + d.reach
        win = _window(d.box, reach + scene.c.blur_pad, scene.shape)
        if win is None:
            wins.append(None)
            continue
        (sy, sx), yy, xx = win
        dist = _box_sd(yy, xx, d.box)
        if scene.transpose:
            sy, sx, dist = sx, sy, dist.T
        closer = dist < best[sy, sx]
        best[sy, sx] = np.where(closer, dist, best[sy, sx])
        owner[sy, sx] = np.where(closer, i, owner[sy, sx])
        wins.append((sy, sx))
    records, hidden = [], []
    for i, (d, win) in enumerate(zip(defects, wins, strict=True)):
        part = None if win is None else mask[win] & (owner[win] == i)
        if part is None or not part.any():
            hidden.append(d)
            continue
        ys, xs = np.nonzero(part)
        y0, x0 = win[0].start + int(ys.min()), win[1].start + int(xs.min())
        y1, x1 = win[0].start + int(ys.max()) + 1, win[1].start + int(xs.max()) + 1
        records.append(
            {
                "type": d.type,
                "bbox": (y0, x0, y1, x1),
                "area_px": int(part.sum()),
                "center": ((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2),
            }
        )
    return records, hidden


def sample_pattern(rng: np.random.Generator, cfg: SynthConfig) -> str:
    """Draw a pattern family name with probability proportional to ``cfg.pattern_weights``."""
    names = [n for n in PATTERN_NAMES if cfg.pattern_weights.get(n, 0.0) > 0]  # type: ignore[call-overload]
    w = np.array([cfg.pattern_weights[n] for n in names], dtype=float)  # type: ignore[index]
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _make_scene(pattern: str, shape: tuple[int, int], rng: np.random.Generator, cfg: SynthConfig) -> _Scene:
    c = _Contrast.sample(rng, cfg)
    if pattern == "lines":
        return _Lines(shape, rng, cfg, c)
    if pattern in ("contacts", "contacts_staggered"):
        return _Contacts(shape, rng, cfg, c, staggered=pattern == "contacts_staggered")
    if pattern == "tin_balls":
        return _TinBalls(shape, rng, cfg, c)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERN_NAMES}")


def render_wafer(
    pattern: str, shape: tuple[int, int], rng: np.random.Generator, cfg: SynthConfig | None = None
) -> SynthSample:
    """Render one clean wafer SEM image of ``pattern``, its defect-free reference and defect mask.

    Args:
        pattern: one of ``PATTERN_NAMES`` ("lines", "contacts", "contacts_staggered", "tin_balls").
        shape: (H, W) in pixels, each >= 8; any size.
        rng: the only source of randomness; the same generator state gives the same bytes.
        cfg: synthesis settings (defaults when None).

    Returns:
        A :class:`SynthSample` (float32 images in [0, 1], bool mask, defect records).
    """
    cfg = cfg or SynthConfig()
    h, w = (int(s) for s in shape)
    if h < 8 or w < 8:
        raise ValueError(f"shape must be at least 8 x 8 pixels, got {tuple(shape)}")
    scene = _make_scene(pattern, (h, w), rng, cfg)
    defects = _sample_defects(pattern, scene, rng, cfg)
    reference = _finish(scene, [])
    while True:
        clean = _finish(scene, defects) if defects else reference.copy()
        mask = np.abs(clean - reference) > F32(cfg.mask_tolerance)
        records, hidden = _attribute(scene, defects, mask)
        if not hidden:
            break
        # An invisible defect is not a defect: render again without it so clean, mask and list agree.
        defects = [d for d in defects if all(d is not x for x in hidden)]
    params = {"pattern": pattern, **scene.params, **scene.c.as_params()}
    return SynthSample(clean, reference, mask, pattern, records, params)


def generate(
    n: int, shape: tuple[int, int], seed: int, cfg: SynthConfig | None = None
) -> Iterator[SynthSample]:
    """Yield ``n`` samples; image ``i`` uses ``np.random.default_rng([seed, i])`` (regenerable alone)."""
    cfg = cfg or SynthConfig()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        yield render_wafer(sample_pattern(rng, cfg), shape, rng, cfg)
