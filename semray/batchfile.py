"""One file of a batch job: every page read, its data bar kept, denoised, written back; its manifest row.

:func:`process_file` is the whole per-file contract, and both executors of :mod:`semray.batch` (in
process and on Ray actors) call it, so the manifest, resume and nothing-lost rules are the same
either way:

* **Pages.** Every page of a multipage TIFF is denoised and written back as the same pages (same
  count, order, per-page tags; :func:`semray.io.write_pages`); a page that fails fails the file with
  the page number, and no partial output is left.
* **Layout.** Grey saved as RGB/RGBA or with a grey palette comes back in that layout
  (:mod:`semray.greyscale`); true colour fails with a reason that says so.
* **Data bar.** ``keep_bottom_rows="auto"`` finds the burned-in bar of each page with
  :func:`semray.databar.detect_data_bar` (the detector ``semray ingest`` uses); an int keeps that many
  rows; 0 keeps none. Kept rows are copied through untouched and never reach the denoiser; the
  manifest records them per page (``bar_rows``).
* **Isolation.** Any error is this file's ``failed`` row with the reason; the job goes on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from semray.config.infer import InferConfig
from semray.config.ingest import DataBarConfig
from semray.infer import Denoiser
from semray.io import ImageMeta, ImageReadError, iter_pages, sha256_file, write_pages

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"

#: One row per input file. Strings are "" rather than null where a value does not apply.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("lot", pa.string()),  # first folder under INPUT ("" for files at the top level)
        pa.field("wafer", pa.string()),  # second folder ("" when the file sits directly in a lot)
        pa.field("rel_path", pa.string()),  # path relative to INPUT (and OUTPUT), POSIX separators
        pa.field("status", pa.string()),  # ok | failed | skipped
        pa.field("error", pa.string()),  # why a file failed ("" otherwise)
        pa.field("input_sha256", pa.string()),
        pa.field("output_sha256", pa.string()),
        pa.field("shape", pa.list_(pa.int64())),  # [H, W] of the first page in pixels; null when unreadable
        pa.field("dtype", pa.string()),  # uint8 | uint16 | float32 | float64 (input = output)
        pa.field("format", pa.string()),  # png | tiff | jpeg
        pa.field("megapixels", pa.float64()),  # sum over pages of H * W / 1e6
        pa.field("pages", pa.int64()),  # pages in the file (= pages written); null when unreadable
        pa.field("layout", pa.string()),  # grey | rgb | grey+alpha | palette (how the file holds grey)
        pa.field("bar_rows", pa.list_(pa.int64())),  # data-bar rows kept untouched, one entry per page
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("model_source", pa.string()),  # shipped | local | mlflow | object | classical
        pa.field("method", pa.string()),  # unet | bm3d | nlm | bilateral | gaussian | median | tv
        pa.field("settings_sha256", pa.string()),  # hash of everything that shapes the output
        pa.field("runtime_s", pa.float64()),  # wall seconds spent on this file (read to hashed output)
        pa.field("noise_sigma_in", pa.float64()),  # estimate_noise_sigma of the input, [0, 1], page mean
        pa.field("noise_sigma_out", pa.float64()),  # same for the output
        pa.field("worker", pa.string()),  # host:pid that produced the row
        pa.field("finished_at", pa.string()),  # UTC ISO 8601, milliseconds
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
#: Columns a ``skipped`` row copies from the verified previous row (what the file is).
_DESCRIBE_COLUMNS = (
    "output_sha256", "shape", "dtype", "format", "megapixels", "pages", "layout", "bar_rows",
    "noise_sigma_in", "noise_sigma_out",
)  # fmt: skip


@dataclass(frozen=True)
class InputFile:
    """One input image and where its output goes (absolute paths, POSIX ``rel_path``)."""

    path: str
    rel_path: str
    out_path: str
    lot: str = ""
    wafer: str = ""


@dataclass(frozen=True)
class FileOptions:
    """Per-file policy shared by the in-process and the Ray executor.

    ``keep_bottom_rows``: ``"auto"`` (detect each page's data bar with ``databar``), or that many rows.
    """

    min_side: int = 1
    max_pixels: int = 16384 * 16384
    noise_estimate: bool = True
    force: bool = False
    keep_bottom_rows: int | str = "auto"
    databar: DataBarConfig = field(default_factory=DataBarConfig)

    @classmethod
    def from_config(cls, cfg: InferConfig) -> FileOptions:
        return cls(
            cfg.min_side, cfg.max_pixels, cfg.noise_estimate, cfg.force, cfg.keep_bottom_rows, cfg.databar
        )


def file_settings(denoiser: Denoiser, options: FileOptions) -> dict[str, Any]:
    """Everything that shapes an output file: the denoiser's settings and the data-bar policy."""
    s = dict(denoiser.settings)
    s["keep_bottom_rows"] = options.keep_bottom_rows
    if options.keep_bottom_rows == "auto":
        s["databar"] = options.databar.model_dump(mode="json")
    return s


def settings_sha256(settings: dict[str, Any]) -> str:
    """Hash of the settings that determine an output (key for resume)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _now(timespec: str = "milliseconds") -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)


def _empty_row(item: InputFile, denoiser: Denoiser, settings_sha: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(
        lot=item.lot,
        wafer=item.wafer,
        rel_path=item.rel_path,
        status=STATUS_FAILED,
        error="",
        input_sha256="",
        output_sha256="",
        dtype="",
        format="",
        layout="",
        model_name=denoiser.name,
        model_version=denoiser.version,
        model_source=denoiser.source,
        method=denoiser.method,
        settings_sha256=settings_sha,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        finished_at="",
    )
    return row


#: Side of the crops the noise of a large image is estimated on (pixels), and how many at most.
_NOISE_CROP, _NOISE_CROPS = 1024, 4


def noise_estimate(image: np.ndarray) -> float | None:
    """No-reference noise std of float32 (H, W) [0, 1] ``image`` ([0, 1] units), or ``None`` if too small.

    Images larger than 1024 x 1024 are measured on up to 4 crops of 1024 x 1024 spread along the
    diagonal (median of the crops' estimates): the wavelet estimator works in float64 with a copy per
    subband, which for 8192 x 8192 would cost over 1 GB, while ~4 M coefficients already pin the median
    down far below the noise levels that matter.
    """
    from semray.classical import estimate_noise_sigma

    h, w = image.shape
    try:
        if h * w <= _NOISE_CROP * _NOISE_CROP:
            return float(estimate_noise_sigma(image))
        ch, cw = min(h, _NOISE_CROP), min(w, _NOISE_CROP)
        n = min(_NOISE_CROPS, max(h // ch, w // cw))
        ys = np.linspace(0, h - ch, n).astype(int)
        xs = np.linspace(0, w - cw, n).astype(int)
        return float(
            np.median(
                [estimate_noise_sigma(image[y : y + ch, x : x + cw]) for y, x in zip(ys, xs, strict=True)]
            )
        )
    except Exception:  # too small to estimate: the manifest says null rather than failing the file
        return None


def bar_rows(image: np.ndarray, options: FileOptions) -> int:
    """Bottom rows of float32 (H, W) [0, 1] ``image`` to keep untouched under ``options``' bar policy."""
    if options.keep_bottom_rows == "auto":
        from semray.databar import detect_data_bar

        return detect_data_bar(image, options.databar)
    return int(options.keep_bottom_rows)


def _denoised_pages(
    item: InputFile, denoiser: Denoiser, options: FileOptions, row: dict[str, Any]
) -> Iterator[tuple[np.ndarray, ImageMeta]]:
    """Read, denoise and yield each page of ``item`` in order, filling ``row``'s description as it goes.

    Raises ``ValueError`` naming the page for a page that fails (reading errors name it already).
    """
    sigmas: dict[str, list[float]] = {"noise_sigma_in": [], "noise_sigma_out": []}
    row.update(megapixels=0.0, bar_rows=[])
    for image, meta in iter_pages(item.path, options.max_pixels):
        h, w = meta.shape
        if meta.page == 0:
            row.update(
                shape=[h, w], dtype=meta.dtype, format=meta.format, layout=meta.layout, pages=meta.pages
            )
        where = f"{item.path} page {meta.page} of {meta.pages} (from 0)" if meta.pages > 1 else item.path
        try:
            if min(h, w) < options.min_side:
                raise ImageReadError(
                    f"image of {h}x{w} px is smaller than min_side={options.min_side} px "
                    "(too small to be an SEM frame; lower min_side to denoise it anyway)"
                )
            rows = bar_rows(image, options)
            if options.noise_estimate:
                sigmas["noise_sigma_in"].append(noise_estimate(image[: h - rows]))
            out = denoiser(image, keep_bottom_rows=rows)  # the bar never reaches the network
            if options.noise_estimate:
                sigmas["noise_sigma_out"].append(noise_estimate(out[: h - rows]))
        except Exception as e:
            raise ValueError(f"{where}: {type(e).__name__}: {e}") from e
        del image  # an 8192 x 8192 page is 256 MB of float32; the write needs that room
        row["megapixels"] += h * w / 1e6
        row["bar_rows"].append(rows)
        yield out, meta
    for key, values in sigmas.items():
        known = [v for v in values if v is not None]
        row[key] = float(np.mean(known)) if known else None


def _verified_previous(prev: dict[str, Any] | None, row: dict[str, Any], out_path: Path) -> bool:
    """The previous run's output for this exact input and settings is on disk, byte for byte."""
    return bool(
        prev
        and prev.get("status") in (STATUS_OK, STATUS_SKIPPED)
        and prev.get("input_sha256") == row["input_sha256"]
        and prev.get("settings_sha256") == row["settings_sha256"]
        and prev.get("output_sha256")
        and out_path.is_file()
        and sha256_file(out_path) == prev["output_sha256"]
    )


def process_file(
    item: InputFile,
    denoiser: Denoiser,
    options: FileOptions,
    prev: dict[str, Any] | None = None,
    settings_sha: str | None = None,
) -> dict[str, Any]:
    """Denoise every page of one file into its output path; never raises for a bad file.

    ``denoiser`` must keep no bar rows itself (``keep_bottom_rows=0``): ``options`` decides them.

    Returns:
        The manifest row (a dict with :data:`MANIFEST_COLUMNS`): ``ok``, ``skipped`` (the previous
        run's output for the same input sha256 and settings is on disk with its recorded sha256) or
        ``failed`` with ``error`` set (naming the page of a multipage file).
    """
    t0 = time.perf_counter()
    settings_sha = settings_sha or settings_sha256(file_settings(denoiser, options))
    row = _empty_row(item, denoiser, settings_sha)
    out_path = Path(item.out_path)
    try:
        row["input_sha256"] = sha256_file(item.path)
        if not options.force and _verified_previous(prev, row, out_path):
            assert prev is not None
            row.update({k: prev.get(k) for k in _DESCRIBE_COLUMNS})
            row["status"] = STATUS_SKIPPED
        else:
            write_pages(out_path, _denoised_pages(item, denoiser, options, row))
            row["output_sha256"] = sha256_file(out_path)
            row["status"] = STATUS_OK
    except Exception as e:  # per-file isolation: any error is this file's failure, not the job's
        row["status"] = STATUS_FAILED
        row["error"] = f"{type(e).__name__}: {e}"
        row["output_sha256"] = ""
        try:
            out_path.unlink(missing_ok=True)  # no stale output from an earlier run for a failed input
        except OSError:
            pass
    row["runtime_s"] = time.perf_counter() - t0
    row["finished_at"] = _now()
    return row


def lost_file_row(item: InputFile, denoiser: Denoiser, settings_sha: str, reason: str) -> dict[str, Any]:
    """The ``failed`` row of a file whose worker died on every attempt."""
    row = _empty_row(item, denoiser, settings_sha)
    row.update(error=reason, worker="", finished_at=_now("seconds"))
    return row
