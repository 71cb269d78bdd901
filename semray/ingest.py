"""Bring a user's own SEM image folders into the shard format (``semray ingest SRC --out SHARDS``).

The pure parts take arrays and return arrays, testable without Ray: :func:`~semray.databar.detect_data_bar`
(the burned-in info bar at the bottom of most SEM images, found in :mod:`semray.databar`), :func:`crop_starts` / :func:`crop_grid`
(edge-aligned training crops), :func:`split_for` (train/val/test by source image from a stable hash)
and :func:`register_pair` (sub-pixel registration of a noisy scan onto its clean partner).

:func:`process_source` turns one source (a file, or a noisy/clean pair of files) into shard rows and a
per-page report; :func:`ingest` runs it over every source, in this process or as a Ray Data ``map``
(one row per source), and writes the rows in source order into ``OUT/<split>/part-XXXXX.parquet``, so
the output is identical either way. ``OUT/summary.json`` accounts for every input file and page.

Rows follow the synthetic shard schema (``image_id``, ``clean``, ``defect_mask``, ``pattern``,
``split``, ``n_defects``, ``defect_types``, ``source``), with ``defect_mask`` all False and
``defect_mask_known`` False because nobody labelled the user's defects, plus provenance columns (see
:func:`process_source`). Pair rows also hold ``noisy``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semray.config.base import dump_yaml
from semray.config.ingest import DataBarConfig, IngestConfig
from semray.databar import detect_data_bar
from semray.io import (
    SPLITS,
    ImageMeta,
    ImageReadError,
    count_pages,
    image_format,
    list_images,
    read_image,
    sha256_file,
    write_shard,
)
from semray.registration import bounded_shift, hann_windowed

SOURCE_NAME = "ingest"
"""Value of the ``source`` column of ingested rows (synthetic rows say ``synthetic``)."""


class IngestError(ValueError):
    """The ingest as a whole cannot run (no input, output not empty); the message says why."""


class _PageError(ValueError):
    """One page (or page pair) is skipped; the message is the reason recorded in the summary."""


# --------------------------------------------------------------------------------------------------
# Pure image functions
# --------------------------------------------------------------------------------------------------


def crop_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start offsets of crops of ``size`` px every ``stride`` px along an axis of ``length`` px.

    The last crop is aligned to the far border, so every pixel is covered when ``stride <= size``.

    Returns:
        int64 (K,) ascending, unique, each in ``[0, length - size]``.

    Raises:
        ValueError: ``length < size``.
    """
    if length < size:
        raise ValueError(f"axis of {length} px is shorter than the crop size {size} px")
    starts = np.arange(0, length - size + 1, stride, dtype=np.int64)
    if starts[-1] != length - size:
        starts = np.append(starts, length - size)
    return starts


def crop_grid(
    shape: tuple[int, int], size: int | None, stride: int | None
) -> list[tuple[int, int, int, int]]:
    """``(y, x, h, w)`` of every crop of an image of ``shape`` (row-major); the whole image for None."""
    h, w = shape
    if size is None:
        return [(0, 0, h, w)]
    step = stride or size
    ys, xs = crop_starts(h, size, step), crop_starts(w, size, step)
    return [(int(y), int(x), size, size) for y in ys for x in xs]


def split_for(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of a source image from a stable hash of ``(seed, key)``; ``key`` is its relative path.

    The hash (SHA-256, not Python's salted ``hash``) gives the same answer on every machine and run,
    and adding files never moves an existing file to another split.
    """
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def register_pair(
    noisy: np.ndarray, clean: np.ndarray, upsample_factor: int = 20, max_shift_px: float | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Shift ``noisy`` onto ``clean`` with sub-pixel precision.

    Plain cross-correlation (not phase normalisation, which whitens the spectrum and lets shot noise
    dominate) of the mean-free, Hann-windowed images, located to ``1/upsample_factor`` px, then a
    cubic-spline shift. The window matters: the correlation is circular, and without it the jump
    between opposite borders of a non-periodic micrograph pulls the estimate towards zero shift.

    Args:
        noisy, clean: float32 (H, W) in [0, 1], same shape.
        upsample_factor: precision of the estimate is ``1 / upsample_factor`` px.
        max_shift_px: when given, only shifts with ``|dy|, |dx| <= max_shift_px`` are searched, and
            among the correlation's peaks there the smallest shift that the measured noise cannot tell
            from the highest wins (:func:`semray.registration.bounded_shift`): a periodic pattern (a
            line array) correlates almost equally at every multiple of its period, noise picks one,
            and repeated scans of one field drift little. None: the highest peak anywhere.

    Returns:
        ``(registered, (dy, dx))``: ``noisy`` shifted by ``(dy, dx)`` px (rows, columns), float32 (H, W)
        in [0, 1]; border pixels are extrapolated (edge values), so callers trim ``ceil(|shift|)`` px.
    """
    from scipy import ndimage
    from skimage.registration import phase_cross_correlation

    if max_shift_px is None:
        ref, mov = hann_windowed(clean), hann_windowed(noisy)
        shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=upsample_factor, normalization=None)
        dy, dx = float(shift[0]), float(shift[1])
    else:
        dy, dx = bounded_shift(clean, noisy, max_shift_px, upsample_factor)
    moved = ndimage.shift(noisy.astype(np.float64), (dy, dx), order=3, mode="nearest")
    return np.clip(moved, 0.0, 1.0).astype(np.float32), (dy, dx)


def _tag_text(value: Any) -> Any:
    """A TIFF tag value as JSON: text where the bytes decode as text, else ``base64:...``, else numbers."""
    if isinstance(value, bytes):
        raw = value.rstrip(b"\0")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        printable = sum(c.isprintable() or c in "\r\n\t" for c in text)
        if printable >= 0.95 * max(len(text), 1):
            return text.replace("\0", "")
        import base64

        return "base64:" + base64.b64encode(raw).decode("ascii")
    if isinstance(value, str):
        return value.rstrip("\0")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_tag_text(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (int, float)):
        return value
    return str(value)


def decode_tiff_tags(meta: ImageMeta) -> dict[str, dict[str, Any]]:
    """Non-structural TIFF tags of ``meta`` as ``{code: {"name": ..., "value": ...}}`` (JSON-ready).

    Vendor blobs (FEI/Thermo 34680/34682 INI text, Zeiss CZ_SEM 34118) come out as text where they are
    text; the raw values stay with :class:`~semray.io.ImageMeta` for writing files back.
    """
    import tifffile

    out: dict[str, dict[str, Any]] = {}
    for code, _dtype, _count, value, _once in meta.extratags:
        out[str(code)] = {"name": tifffile.TIFF.TAGS.get(code) or str(code), "value": _tag_text(value)}
    return out


# --------------------------------------------------------------------------------------------------
# Sources: what to read, found on disk
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One unit of ingest: a clean file, or a noisy/clean pair.

    ``key`` is the clean file's path relative to SRC (POSIX); it names the source in every row
    (``source_path``) and decides its split, so all crops and pages of one file share a split.
    """

    key: str
    path: str
    noisy_key: str | None = None
    noisy_path: str | None = None


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _stem_key(rel: str) -> str:
    """Relative path without its image suffix, so ``a/b.tif`` pairs with ``a/b.png``."""
    return rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel


def _pair_up(
    noisy: Mapping[str, list[Path]], clean: Mapping[str, list[Path]], src: Path, why: str
) -> tuple[list[Source], list[dict[str, Any]]]:
    """Match noisy and clean files by key; everything unmatched or ambiguous becomes a skip record."""
    sources, skipped = [], []
    for key in sorted(set(noisy) | set(clean)):
        n, c = noisy.get(key, []), clean.get(key, [])
        if len(n) == 1 and len(c) == 1:
            sources.append(Source(_rel(c[0], src), str(c[0]), _rel(n[0], src), str(n[0])))
            continue
        if len(n) > 1 or len(c) > 1:
            names = ", ".join(_rel(p, src) for p in [*n, *c])
            reason = f"ambiguous pair {key!r}: several files share this name ({names})"
        else:
            missing = "clean" if n else "noisy"
            reason = f"no matching {missing} image for {key!r} ({why})"
        skipped += [{"path": _rel(p, src), "page": None, "reason": reason} for p in [*n, *c]]
    return sources, skipped


def discover_sources(src: str | Path, cfg: IngestConfig) -> tuple[list[Source], list[dict[str, Any]], int]:
    """Find the sources under ``src`` for ``cfg.mode``.

    Returns:
        ``(sources, skipped, files_seen)``: sources sorted by key; one skip record
        ``{"path", "page": None, "reason"}`` per image file that cannot form a source (pairs mode:
        unmatched, ambiguous or not following the naming rule); the number of image files found.

    Raises:
        FileNotFoundError: ``src`` (or a pair folder) does not exist.
    """
    src = Path(src)
    if cfg.mode == "clean":
        files = list_images(src)
        root = src.parent if src.is_file() else src
        return [Source(_rel(p, root), str(p)) for p in files], [], len(files)
    if cfg.noisy_dir is not None and cfg.clean_dir is not None:
        groups: dict[str, dict[str, list[Path]]] = {"noisy": {}, "clean": {}}
        n_files = 0
        for role, sub in (("noisy", cfg.noisy_dir), ("clean", cfg.clean_dir)):
            folder = src / sub
            for p in list_images(folder):
                groups[role].setdefault(_stem_key(_rel(p, folder)), []).append(p)
                n_files += 1
        why = f"matched by relative path between {cfg.noisy_dir!r} and {cfg.clean_dir!r}"
        sources, skipped = _pair_up(groups["noisy"], groups["clean"], src, why)
        return sources, skipped, n_files
    rx = re.compile(cfg.pair_regex)
    files = list_images(src)
    noisy: dict[str, list[Path]] = {}
    clean: dict[str, list[Path]] = {}
    skipped = []
    for p in files:
        rel = _rel(p, src)
        m = rx.fullmatch(_stem_key(rel))
        role = m.group("role") if m else None
        if m is None or role not in (cfg.noisy_role, cfg.clean_role):
            roles = f"{cfg.noisy_role!r}/{cfg.clean_role!r}"
            reason = f"name does not follow pair_regex {cfg.pair_regex!r} with roles {roles}"
            skipped.append({"path": rel, "page": None, "reason": reason})
            continue
        (noisy if role == cfg.noisy_role else clean).setdefault(m.group("key"), []).append(p)
    sources, more = _pair_up(noisy, clean, src, f"naming rule {cfg.pair_regex!r}")
    return sources, skipped + more, len(files)


# --------------------------------------------------------------------------------------------------
# One source -> rows
# --------------------------------------------------------------------------------------------------


@dataclass
class SourceResult:
    """What :func:`process_source` made of one source.

    Attributes:
        records: shard rows (crops), in page then row-major crop order.
        pages: one report per page (``status`` "ok" or "skipped" with a ``reason``).
        error: why the whole source was skipped (unreadable file, page-count mismatch), else None.
        split: the source's split.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    pages: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    split: str = "train"


def _bar_rows(images: Sequence[np.ndarray], cfg: DataBarConfig) -> int:
    if cfg.crop_rows > 0:
        return cfg.crop_rows
    if cfg.mode == "off":
        return 0
    # Both scans of a pair carry the same rendered bar; the larger finding is cropped from both.
    return max(detect_data_bar(img, cfg) for img in images)


def _match_float_range(noisy: np.ndarray, n_meta: ImageMeta, c_meta: ImageMeta) -> np.ndarray:
    """Put a float noisy image on its clean partner's grey scale.

    :func:`~semray.io.read_image` maps a float image outside [0, 1] by its own min/max, which for a
    noisy scan is set by noise outliers; a pair must share one scale or the model learns a contrast
    change.
    """
    if n_meta.float_range is None or c_meta.float_range is None or n_meta.float_range == c_meta.float_range:
        return noisy
    (nlo, nhi), (clo, chi) = n_meta.float_range, c_meta.float_range
    raw = noisy.astype(np.float64) * (nhi - nlo) + nlo
    return np.clip((raw - clo) / (chi - clo), 0.0, 1.0).astype(np.float32)


def _registered(
    source: Source, clean: np.ndarray, noisy: np.ndarray, cfg: IngestConfig
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], int]:
    """Register ``noisy`` onto ``clean`` (both float32 (H, W)); returns both cropped by the border the
    sub-pixel shift extrapolated, the shift (y, x) in px and that border's width."""
    noisy, shift = register_pair(noisy, clean, cfg.upsample_factor)
    largest = max(abs(shift[0]), abs(shift[1]))
    if largest > cfg.max_shift_px:
        raise _PageError(
            f"registration shift ({shift[0]:.2f}, {shift[1]:.2f}) px exceeds max_shift_px="
            f"{cfg.max_shift_px}: {source.noisy_key} and {source.key} do not show the same field"
        )
    # The spline shift extrapolates the border; those pixels are not data.
    margin = math.ceil(largest)
    if margin:
        clean = clean[margin:-margin, margin:-margin]
        noisy = noisy[margin:-margin, margin:-margin]
    return clean, noisy, shift, margin


def _crop_row(
    source: Source, page: int, crop: tuple[int, int, int, int], margin: int, clean: np.ndarray, c_meta: ImageMeta,
    orig: tuple[int, int, int], shared: Mapping[str, Any], cfg: IngestConfig,
) -> dict[str, Any]:  # fmt: skip
    """One clean crop's shard row; ``orig`` is (height, width, bar rows) of the page as read."""
    y, x, ch, cw = crop
    y0, x0 = y + margin, x + margin  # in source-image coordinates
    return {
        "image_id": f"{SOURCE_NAME}/{source.key}/p{page}/y{y0}x{x0}",
        "split": shared["split"],
        "pattern": cfg.label,
        "clean": np.ascontiguousarray(clean[y : y + ch, x : x + cw]),
        "defect_mask": np.zeros((ch, cw), dtype=bool),
        "defect_mask_known": False,
        "n_defects": -1,  # unknown, not zero: nobody labelled real images
        "defect_types": "",
        "source": SOURCE_NAME,
        "source_path": source.key,
        "page": page,
        "source_sha256": shared["sha256"],
        "crop_y": y0,
        "crop_x": x0,
        "cropped_bottom_rows": orig[2],
        "orig_height": orig[0],
        "orig_width": orig[1],
        "orig_dtype": c_meta.dtype,
        "tiff_description": c_meta.description or "",
        "tiff_tags": json.dumps(decode_tiff_tags(c_meta), sort_keys=True),
    }


def _noisy_columns(
    source: Source, crop: tuple[int, int, int, int], noisy: np.ndarray, n_meta: ImageMeta,
    shift: tuple[float, float], shared: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The noisy partner's columns of one crop's row."""
    y, x, ch, cw = crop
    return {
        "noisy": np.ascontiguousarray(noisy[y : y + ch, x : x + cw]),
        "noisy_source_path": source.noisy_key,
        "noisy_source_sha256": shared["noisy_sha256"],
        "noisy_orig_dtype": n_meta.dtype,
        "noisy_tiff_description": n_meta.description or "",
        "noisy_tiff_tags": json.dumps(decode_tiff_tags(n_meta), sort_keys=True),
        "shift_y": shift[0],
        "shift_x": shift[1],
    }


def _page_rows(
    source: Source,
    page: int,
    clean: np.ndarray,
    c_meta: ImageMeta,
    noisy: np.ndarray | None,
    n_meta: ImageMeta | None,
    shared: Mapping[str, Any],
    cfg: IngestConfig,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Bar removal, registration and cropping of one page (pair); returns rows and the page report."""
    h, w = clean.shape
    if noisy is not None and noisy.shape != clean.shape:
        raise _PageError(
            f"pair shape mismatch: noisy {source.noisy_key} is {noisy.shape[0]}x{noisy.shape[1]} px but "
            f"clean {source.key} is {h}x{w} px"
        )
    bar = _bar_rows([clean] if noisy is None else [clean, noisy], cfg.databar)
    if bar >= h:
        raise _PageError(f"cropping {bar} bottom rows leaves nothing of a {h}-row image")
    clean = clean[: h - bar]
    shift = (0.0, 0.0)
    margin = 0
    if noisy is not None:
        noisy = _match_float_range(noisy[: h - bar], n_meta, c_meta)  # type: ignore[arg-type]
        if cfg.registration:
            clean, noisy, shift, margin = _registered(source, clean, noisy, cfg)
    size = cfg.crop_size
    if size is not None and min(clean.shape) < size:
        raise _PageError(
            f"image of {clean.shape[0]}x{clean.shape[1]} px (after removing {bar} bar rows and a "
            f"{margin} px registration border) is smaller than crop_size={size}"
        )
    rows = []
    for crop in crop_grid(clean.shape, size, cfg.effective_stride):
        row = _crop_row(source, page, crop, margin, clean, c_meta, (h, w, bar), shared, cfg)
        if noisy is not None and n_meta is not None:
            row.update(_noisy_columns(source, crop, noisy, n_meta, shift, shared))
        rows.append(row)
    report = {
        "shape": [h, w],
        "dtype": c_meta.dtype,
        "cropped_bottom_rows": bar,
        "crops": len(rows),
        "shift": list(shift) if noisy is not None else None,
    }
    return rows, report


def _preview_pages(path: str) -> set[int]:
    """Pages of a TIFF flagged as reduced-resolution copies (NewSubfileType bit 0): thumbnails."""
    if image_format(path) != "tiff":
        return set()
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return {i for i, p in enumerate(tf.pages) if int(getattr(p, "subfiletype", 0) or 0) & 1}


def process_source(source: Source, cfg: IngestConfig) -> SourceResult:
    """Read every page of ``source`` and cut it into shard rows.

    Row columns: ``image_id`` (``ingest/<source_path>/p<page>/y<crop_y>x<crop_x>``), ``split``,
    ``pattern`` (``cfg.label``), ``clean`` float32 (h, w) [0, 1], ``defect_mask`` bool (h, w) all False,
    ``defect_mask_known`` False, ``n_defects`` -1 (unknown), ``defect_types`` "", ``source`` "ingest",
    ``source_path`` (relative to SRC), ``page``, ``source_sha256``, ``crop_y``/``crop_x`` (top-left in
    source pixels), ``cropped_bottom_rows``, ``orig_height``/``orig_width``/``orig_dtype``,
    ``tiff_description`` and ``tiff_tags`` (JSON, see :func:`decode_tiff_tags`). Pairs add ``noisy``,
    ``noisy_source_path``, ``noisy_source_sha256``, ``noisy_orig_dtype``, ``noisy_tiff_description``,
    ``noisy_tiff_tags`` and the registration ``shift_y``/``shift_x`` (px, 0 when not registered).

    A file that cannot be read sets ``error``; a page that cannot be used (unreadable, thumbnail,
    smaller than a crop, pair of unequal shape, implausible registration shift) is reported and skipped.
    """
    split = split_for(source.key, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    result = SourceResult(split=split)
    try:
        # Page 0 first: read_image gives the precise reason (empty, not a TIFF, RGB) for a bad file.
        first = read_image(source.path, 0, cfg.max_pixels)
        n_pages = count_pages(source.path)
        previews = _preview_pages(source.path)
        n_first = n_n_pages = None
        if source.noisy_path is not None:
            n_first = read_image(source.noisy_path, 0, cfg.max_pixels)
            n_n_pages = count_pages(source.noisy_path)
            if n_n_pages != n_pages:
                raise ImageReadError(
                    f"page count mismatch: noisy {source.noisy_key} has {n_n_pages} pages but clean "
                    f"{source.key} has {n_pages}"
                )
        shared = {
            "split": split,
            "sha256": sha256_file(source.path),
            "noisy_sha256": sha256_file(source.noisy_path) if source.noisy_path else None,
        }
    except (ImageReadError, OSError) as e:
        result.error = str(e)
        return result
    except Exception as e:  # a foreign file can make tifffile raise anything; it is still one bad file
        result.error = f"{source.key}: cannot be read ({type(e).__name__}: {e})"
        return result
    for page in range(n_pages):
        report: dict[str, Any] = {"source_path": source.key, "page": page, "split": split}
        if source.noisy_key is not None:
            report["noisy_source_path"] = source.noisy_key
        try:
            if page in previews:
                raise _PageError(f"{source.key} page {page}: reduced-resolution preview (thumbnail)")
            if page == 0:
                (clean, c_meta), n_read = first, n_first
            else:
                clean, c_meta = read_image(source.path, page, cfg.max_pixels)
                n_read = read_image(source.noisy_path, page, cfg.max_pixels) if source.noisy_path else None
            noisy, n_meta = n_read if n_read is not None else (None, None)
            rows, details = _page_rows(source, page, clean, c_meta, noisy, n_meta, shared, cfg)
        except (ImageReadError, _PageError) as e:
            report.update(status="skipped", reason=str(e))
        except Exception as e:  # one odd page must not end a run over thousands of files
            report.update(status="skipped", reason=f"{source.key} page {page}: {type(e).__name__}: {e}")
        else:
            result.records.extend(rows)
            report.update(status="ok", **details)
        result.pages.append(report)
    return result


# --------------------------------------------------------------------------------------------------
# Many sources -> shards
# --------------------------------------------------------------------------------------------------


class _ShardWriter:
    """Buffers rows per split and writes ``rows_per_shard`` of them at a time, in arrival order."""

    def __init__(self, out_dir: Path, rows_per_shard: int) -> None:
        self.out_dir = out_dir
        self.rows_per_shard = rows_per_shard
        self.buffers: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.written: list[Path] = []
        self._next = dict.fromkeys(SPLITS, 0)

    def add(self, row: dict[str, Any]) -> None:
        buf = self.buffers[row["split"]]
        buf.append(row)
        if len(buf) >= self.rows_per_shard:
            self._flush(row["split"])

    def _flush(self, split: str) -> None:
        buf = self.buffers[split]
        if buf:
            path = self.out_dir / split / f"part-{self._next[split]:05d}.parquet"
            self.written.append(write_shard(buf, path))
            self._next[split] += 1
            self.buffers[split] = []

    def close(self) -> list[Path]:
        for split in SPLITS:
            self._flush(split)
        return self.written


@dataclass
class IngestSummary:
    """Accounting of one ingest: every input file and page is either ok or skipped with a reason.

    ``files_seen == files_ok + files_skipped`` and ``pages_seen == pages_ok + pages_skipped``; in pairs
    mode a file counts once and a page is a page pair. A file is ok when at least one of its pages is.
    """

    src: str
    out_dir: str
    mode: str
    files_seen: int = 0
    files_ok: int = 0
    files_skipped: int = 0
    pages_seen: int = 0
    pages_ok: int = 0
    pages_skipped: int = 0
    crops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    source_images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    databar: dict[str, Any] = field(default_factory=lambda: {"pages_cropped": 0, "rows": {}})
    skipped: list[dict[str, Any]] = field(default_factory=list)
    pages: list[dict[str, Any]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """Human-readable summary for the terminal."""
        lines = [
            f"ingested {self.src} ({self.mode} mode) -> {self.out_dir}",
            f"  files: {self.files_seen} seen, {self.files_ok} ok, {self.files_skipped} skipped",
            f"  pages: {self.pages_seen} seen, {self.pages_ok} ok, {self.pages_skipped} skipped",
            f"  crops per split: {self.crops}; source images per split: {self.source_images}",
            f"  data bar cropped on {self.databar['pages_cropped']} page(s)",
        ]
        for s in self.skipped:
            page = "" if s["page"] is None else f" page {s['page']}"
            lines.append(f"  skipped {s['path']}{page}: {s['reason']}")
        return "\n".join(lines)


def _iter_local(sources: Sequence[Source], cfg: IngestConfig) -> Iterator[SourceResult]:
    for s in sources:
        yield process_source(s, cfg)


def _process_row(row: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Data ``map`` body: one source in, its pickled :class:`SourceResult` out (with its index)."""
    source = Source(row["key"], row["path"], row.get("noisy_key"), row.get("noisy_path"))
    result = process_source(source, IngestConfig.model_validate(cfg))
    return {"index": row["index"], "payload": pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)}


def _iter_ray(sources: Sequence[Source], cfg: IngestConfig) -> Iterator[SourceResult]:
    """Process sources as a Ray Data ``map`` and yield the results back in source order.

    One row per source keeps a file's crops and its report together; the reorder buffer lets the
    driver write shards in the same order as the local loop whatever order tasks finish in.
    """
    import ray

    items = [{"index": i, **asdict(s)} for i, s in enumerate(sources)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
    ds = ds.map(_process_row, fn_kwargs={"cfg": cfg.model_dump(mode="json")}, num_cpus=1)
    pending: dict[int, SourceResult] = {}
    next_index = 0
    for row in ds.iter_rows():
        pending[int(row["index"])] = pickle.loads(row["payload"])
        while next_index in pending:
            yield pending.pop(next_index)
            next_index += 1
    if pending or next_index != len(sources):  # pragma: no cover - would be a Ray Data bug
        raise RuntimeError(f"Ray Data returned {next_index} of {len(sources)} sources")


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    old = [p for s in SPLITS for p in (out_dir / s).glob("part-*.parquet")]
    if old and not overwrite:
        raise IngestError(
            f"{out_dir} already holds {len(old)} shard(s); choose an empty folder or pass overwrite"
        )
    for s in SPLITS:
        if (out_dir / s).is_dir() and overwrite:
            shutil.rmtree(out_dir / s)
    out_dir.mkdir(parents=True, exist_ok=True)


def ingest(
    cfg: IngestConfig,
    src: str | Path,
    out_dir: str | Path,
    parallel: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> IngestSummary:
    """Ingest the images under ``src`` into shards under ``out_dir``.

    Args:
        cfg: the ingest config.
        src: a folder (searched recursively for .tif/.tiff/.png/.jpg/.jpeg) or one file. In pairs mode with
            ``noisy_dir``/``clean_dir`` those folders are relative to ``src``.
        out_dir: receives ``<split>/part-XXXXX.parquet``, ``ingest.yaml`` and ``summary.json``.
        parallel: process sources as a Ray Data pipeline (default: whenever Ray is initialised); the
            output is identical either way. Workers read the files by path, so on a cluster ``src``
            must be on storage every node sees.
        overwrite: replace shards already in ``out_dir`` (otherwise that is an error).
        progress: show a progress bar.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        IngestError: no image files were found, or ``out_dir`` already holds shards.
    """
    import ray

    from semray.logs import progress_bar

    src, out_dir = Path(src), Path(out_dir)
    sources, skipped, files_seen = discover_sources(src, cfg)
    if files_seen == 0:
        raise IngestError(f"{src}: no .tif/.tiff/.png/.jpg/.jpeg files found")
    _prepare_out(out_dir, overwrite)
    if parallel is None:
        parallel = ray.is_initialized()
    summary = IngestSummary(src=str(src), out_dir=str(out_dir), mode=cfg.mode, files_seen=files_seen)
    summary.skipped.extend(skipped)
    summary.files_skipped = len(skipped)
    writer = _ShardWriter(out_dir, cfg.rows_per_shard)
    results = _iter_ray(sources, cfg) if parallel and sources else _iter_local(sources, cfg)
    bar = progress_bar(len(sources), "sources", "file", disable=not progress)
    for source, result in zip(sources, results, strict=True):
        _account(summary, source, result)
        for row in result.records:
            writer.add(row)
        bar.update(1)
    bar.close()
    summary.shards = [p.relative_to(out_dir).as_posix() for p in writer.close()]
    (out_dir / "ingest.yaml").write_text(dump_yaml(cfg))
    (out_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
    return summary


def _account(summary: IngestSummary, source: Source, result: SourceResult) -> None:
    """Add one source's outcome to the summary."""
    files = [source.key] if source.noisy_key is None else [source.noisy_key, source.key]
    if result.error is not None:
        summary.files_skipped += len(files)
        summary.skipped.extend({"path": f, "page": None, "reason": result.error} for f in files)
        return
    ok_pages = [p for p in result.pages if p["status"] == "ok"]
    summary.pages_seen += len(result.pages)
    summary.pages_ok += len(ok_pages)
    summary.pages_skipped += len(result.pages) - len(ok_pages)
    summary.pages.extend(result.pages)
    for p in result.pages:
        if p["status"] != "ok":
            summary.skipped.append({"path": source.key, "page": p["page"], "reason": p["reason"]})
        elif p["cropped_bottom_rows"] > 0:
            summary.databar["pages_cropped"] += 1
            summary.databar["rows"][f"{source.key}#p{p['page']}"] = p["cropped_bottom_rows"]
    if ok_pages:
        summary.files_ok += len(files)
        summary.source_images[result.split] += 1
        summary.crops[result.split] += len(result.records)
    else:
        summary.files_skipped += len(files)
