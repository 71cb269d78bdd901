"""Interactive denoising app: a Ray Serve deployment with a FastAPI ingress and a static web page.

Endpoints (JSON errors are always ``{"detail": "..."}`` with a 4xx status)::

    GET  /                        the web page (semray/web/index.html; its JS and CSS under /static/)
    GET  /api/health              replica status, cached models, load count, limits
    GET  /api/models              models (shipped, local folder, MLflow registry) with cards + methods
    GET  /api/samples             shipped sample images (noisy + clean pairs)
    GET  /api/samples/{name}      one sample file (?kind=noisy|clean), as PNG or TIFF
    POST /api/denoise             multipart: image, [reference], [model], [method] -> JSON with previews,
                                  timing, metrics (with a reference) and the full result (base64)
    POST /api/denoise/file        same input, answers with the denoised file itself (same format/dtype)

Both denoise endpoints run the same engine as batch jobs (:class:`semray.infer.Denoiser`), so a model
behaves the same in the browser and over a lot. Models are loaded on first use and kept in a per-replica
LRU through Serve model multiplexing; a client may send the ``serve_multiplexed_model_id`` header
(the page does) so Serve routes it to a replica that already holds that model.

Safety: the request body is read with a byte limit (413 past it), the image size is checked from the
file header before any pixel is decoded (413), the format is sniffed from the bytes rather than trusted
from the file name (415), multi-channel or unsupported-dtype images are refused (422), and model names
must match a strict pattern and are resolved with ``allow_paths=False`` (400/404), so no request can
make the server read a file outside the configured model folders. Weights are safetensors only.

Upload decoding, result encoding and previews live in :mod:`semray.webimage`; the helpers above the
deployment class are plain functions (no Ray) too, and both are tested directly.
"""

# No `from __future__ import annotations`: Serve ships the ingress class by value, and FastAPI must
# resolve the `Request` annotations of its methods without the module globals.
import asyncio
import base64
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve

from semray import __version__
from semray.config.serve import ServeConfig
from semray.io import ImageMeta, read_image
from semray.jsonsafe import json_safe
from semray.webimage import (
    RequestError,
    decode_image,
    difference_map,
    display_name,
    downsample,
    encode_image,
    png_data_uri,
    result_filename,
    to_uint8,
)

PACKAGE_DIR = Path(__file__).resolve().parent
WEB_DIR = PACKAGE_DIR / "web"
SAMPLES_DIR = PACKAGE_DIR / "assets" / "samples"

#: Files the page may load from /static/; anything else is a 404 (no directory serving at all).
STATIC_FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# The page needs nothing from elsewhere; the policy makes that a browser-enforced fact.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
MEDIA_TYPES = {"png": "image/png", "tiff": "image/tiff"}
MODEL_ID_HEADER = "serve_multiplexed_model_id"

#: A local/shipped model name: one path component, no leading dot (same rule as semray.models.resolve).
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SAFE_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
#: A registered MLflow model: models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS.
MLFLOW_SPEC_RE = re.compile(
    rf"^models:/(?P<name>{_SAFE_PART})(?:/(?P<version>\d{{1,9}}|latest)|@(?P<alias>{_SAFE_PART}))$"
)
SAMPLE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

METHOD_DESCRIPTIONS: dict[str, str] = {
    "bm3d": "BM3D: block matching and 3-D collaborative filtering",
    "nlm": "Non-local means",
    "bilateral": "Bilateral filter",
    "gaussian": "Gaussian blur",
    "median": "Median filter",
    "tv": "Total-variation denoising (Chambolle)",
}
#: Metrics shown next to a result; the defect-aware ones need a defect mask the app does not have.
SHOWN_METRICS = ("psnr", "ssim", "ms_ssim", "edge_preservation", "gradient_correlation")


def finite_metrics(values: dict[str, float]) -> dict[str, float]:
    """The :data:`SHOWN_METRICS` entries of ``values`` that are finite (JSON has no NaN)."""
    return {k: float(values[k]) for k in SHOWN_METRICS if k in values and math.isfinite(values[k])}


# ------------------------------------------------------------------------------------------ models
def validate_model_spec(spec: str) -> str:
    """Return ``spec`` if it is a model name or MLflow model URI the app accepts; else 400.

    Accepted: ``NAME`` (letters, digits, ``_.-``, no leading dot, max 128 chars) or
    ``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/NAME@ALIAS``. Anything with a path
    separator, ``..``, a drive letter or a control character is refused here, before any lookup.
    """
    if not isinstance(spec, str) or not spec:
        raise RequestError(400, "model name is empty")
    if ".." in spec or "\\" in spec or "\x00" in spec:
        raise RequestError(400, f"invalid model name {spec[:80]!r}: path components are not allowed")
    if MODEL_NAME_RE.match(spec) or MLFLOW_SPEC_RE.match(spec):
        return spec
    raise RequestError(
        400,
        f"invalid model name {spec[:80]!r}: expected NAME ([A-Za-z0-9_.-]) or models:/NAME/VERSION, "
        "models:/NAME/latest, models:/NAME@ALIAS",
    )


def parse_choice(model: str | None, method: str | None, default_model: str = "default") -> tuple[str, str]:
    """``(method, model_spec)`` from the form fields; ``model_spec`` is ``""`` for classical methods.

    ``method`` defaults to ``"unet"``; with a classical method ``model`` is ignored.
    """
    from semray.classical import METHODS

    method = (method or "unet").strip().lower()
    if method in METHODS:
        return method, ""
    if method != "unet":
        raise RequestError(
            400, f"unknown method {method[:40]!r}; choose unet or one of: {', '.join(METHODS)}"
        )
    return "unet", validate_model_spec((model or default_model).strip())


def list_methods() -> list[dict[str, str]]:
    """The classical methods with one-line descriptions."""
    from semray.classical import METHODS

    return [{"name": m, "description": METHOD_DESCRIPTIONS.get(m, m)} for m in METHODS]


# ----------------------------------------------------------------------------------------- samples
@lru_cache(maxsize=1)
def samples_index() -> dict[str, dict[str, Any]]:
    """Shipped samples by name, from ``assets/samples/samples.json`` (empty if none are shipped)."""
    index_file = SAMPLES_DIR / "samples.json"
    if not index_file.is_file():
        return {}
    records = json.loads(index_file.read_text())["samples"]
    return {r["name"]: r for r in records if SAMPLE_NAME_RE.match(r["name"])}


def sample_file(name: str, kind: str) -> Path:
    """Path of a shipped sample's ``noisy`` or ``clean`` file; 400/404 for bad or unknown names."""
    if not SAMPLE_NAME_RE.match(name or ""):
        raise RequestError(400, f"invalid sample name {name[:80]!r}")
    if kind not in ("noisy", "clean"):
        raise RequestError(400, f"kind must be 'noisy', 'clean' or 'preview', got {kind[:20]!r}")
    rec = samples_index().get(name)
    if rec is None:
        raise RequestError(404, f"unknown sample {name!r}; available: {', '.join(samples_index())}")
    # the file name comes from the shipped index, never from the request
    return SAMPLES_DIR / Path(rec[f"{kind}_file"]).name


def sample_preview_png(name: str, side: int = 160) -> bytes:
    """8-bit PNG thumbnail (at most ``side`` px) of a sample's noisy image; browsers cannot show TIFF."""
    from PIL import Image

    image, _ = read_image(sample_file(name, "noisy"))
    buf = io.BytesIO()
    Image.fromarray(downsample(to_uint8(image), side)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ HTTP bodies
async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length")
    limit_mib = max_bytes / 2**20
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "invalid Content-Length header")
        if int(declared) > max_bytes:
            raise RequestError(
                413, f"request of {int(declared) / 2**20:.1f} MiB exceeds the {limit_mib:g} MiB limit"
            )
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:  # chunked uploads have no Content-Length: count as they arrive
            raise RequestError(413, f"request exceeds the {limit_mib:g} MiB limit")
    return bytes(buf)


@dataclass
class Upload:
    """The parsed fields of a denoise request."""

    image: bytes
    filename: str
    reference: bytes | None = None
    reference_name: str = ""
    model: str | None = None
    method: str | None = None


async def parse_upload(request: Request, max_bytes: int) -> Upload:
    """Read and parse a ``multipart/form-data`` denoise request (fields: image, reference, model, method)."""
    from starlette.datastructures import UploadFile

    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError(415, "expected a multipart/form-data upload with an 'image' file field")
    body = await read_body(request, max_bytes)
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=8)
    except Exception as e:  # malformed multipart: starlette raises its own exception types
        raise RequestError(400, f"malformed multipart body ({getattr(e, 'detail', e)})") from None
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise RequestError(400, "missing 'image' file field")
    up = Upload(image=await image.read(), filename=image.filename or "image")
    ref = form.get("reference")
    if isinstance(ref, UploadFile):
        data = await ref.read()
        if data:  # browsers send an empty part for an unused file input
            up.reference, up.reference_name = data, ref.filename or "reference"
    for key in ("model", "method"):
        value = form.get(key)
        if isinstance(value, str) and value.strip():
            setattr(up, key, value)
    await form.close()
    return up


# ------------------------------------------------------------------------------------------ engine
@dataclass(eq=False)
class Engine:
    """A ready denoiser plus what the page shows about it.

    ``denoise`` maps float32 (H, W) [0, 1] to the same; ``loaded_at`` is ``time.monotonic()`` when it
    finished loading, so a request can tell whether it paid the load.
    """

    denoise: Any
    method: str
    name: str
    version: str
    source: str
    card: dict[str, Any] = field(default_factory=dict)
    load_ms: float = 0.0
    loaded_at: float = 0.0


def make_engine(method: str, spec: str, cfg: ServeConfig) -> Engine:
    """Build the engine for a choice (blocking: loads weights for ``method == "unet"``).

    Raises:
        RequestError: 404 when ``spec`` names no model in the configured folders or registry.
    """
    from semray.infer import Denoiser
    from semray.models.resolve import ModelNotFoundError, resolve_model

    t0 = time.perf_counter()
    if method != "unet":
        den = Denoiser.from_config(cfg.infer_config(method))
        return Engine(
            den, method, method, "-", "classical", {"description": METHOD_DESCRIPTIONS.get(method, "")}
        )
    try:
        resolved = resolve_model(spec, models_dir=cfg.models_dir, allow_paths=False)
    except ModelNotFoundError as e:
        raise RequestError(404, str(e)) from None
    den = Denoiser.from_config(cfg.infer_config("unet"), resolved)
    return Engine(
        den,
        "unet",
        resolved.name if not spec.startswith("models:/") else spec,
        str(resolved.version),
        resolved.source,
        resolved.card,
        load_ms=(time.perf_counter() - t0) * 1e3,
        loaded_at=time.monotonic(),
    )


@dataclass
class Decoded:
    """A request's images in the library convention: float32 (H, W) in [0, 1]."""

    noisy: np.ndarray
    meta: ImageMeta
    filename: str
    clean: np.ndarray | None
    decode_ms: float


def decode_upload(upload: Upload, cfg: ServeConfig) -> Decoded:
    """Decode the image and optional reference (blocking); 4xx for anything unusable."""
    t = time.perf_counter()
    noisy, meta = decode_image(upload.image, upload.filename, cfg.max_image_pixels)
    clean = None
    if upload.reference is not None:
        clean, _ = decode_image(upload.reference, upload.reference_name, cfg.max_image_pixels)
        if clean.shape != noisy.shape:
            raise RequestError(
                422,
                f"reference is {clean.shape[0]}x{clean.shape[1]} px but the image is "
                f"{noisy.shape[0]}x{noisy.shape[1]} px",
            )
    return Decoded(noisy, meta, upload.filename, clean, (time.perf_counter() - t) * 1e3)


def run_denoise(
    engine: Engine, decoded: Decoded, cfg: ServeConfig, *, previews: bool = True
) -> tuple[dict[str, Any], bytes, ImageMeta]:
    """Denoise, score and encode one decoded request (blocking; runs in a worker thread).

    Returns:
        ``(report, result_file_bytes, meta)``: ``report`` holds timing (ms), input description,
        metrics (with a reference) and, with ``previews``, the PNG previews as data URIs.
    """
    noisy, meta, clean = decoded.noisy, decoded.meta, decoded.clean
    timing: dict[str, float] = {"decode_ms": decoded.decode_ms}
    t, cpu = time.perf_counter(), time.thread_time()
    denoised = np.asarray(engine.denoise(noisy), dtype=np.float32)
    timing["denoise_ms"] = (time.perf_counter() - t) * 1e3
    # CPU time of this thread (torch runs single-threaded in it): robust to other load on the node
    timing["denoise_cpu_ms"] = (time.thread_time() - cpu) * 1e3

    report: dict[str, Any] = {
        "input": {
            "filename": display_name(decoded.filename),
            "format": meta.format,
            "dtype": meta.dtype,
            "shape": list(meta.shape),
        },
        "metrics": None,
    }
    if clean is not None:
        from semray.metrics import compute_metrics

        t = time.perf_counter()
        report["metrics"] = {
            "noisy": finite_metrics(compute_metrics(clean, noisy)),
            "denoised": finite_metrics(compute_metrics(clean, denoised)),
        }
        timing["metrics_ms"] = (time.perf_counter() - t) * 1e3

    t = time.perf_counter()
    result = encode_image(denoised, meta)
    if previews:
        side = cfg.preview_max_side
        diff_rgb, scale = difference_map(noisy, denoised)
        report["previews"] = {
            "noisy": png_data_uri(downsample(to_uint8(noisy), side)),
            "denoised": png_data_uri(downsample(to_uint8(denoised), side)),
            "difference": png_data_uri(downsample(diff_rgb, side)),
        }
        if clean is not None:
            report["previews"]["clean"] = png_data_uri(downsample(to_uint8(clean), side))
        report["difference"] = {
            "scale": scale,
            "mean_abs": float(np.mean(np.abs(denoised - noisy))),
        }
    timing["encode_ms"] = (time.perf_counter() - t) * 1e3
    report["timing_ms"] = timing
    return report, result, meta


def engine_summary(engine: Engine) -> dict[str, Any]:
    """What the page shows about the engine that produced a result."""
    return {"method": engine.method, "name": engine.name, "version": engine.version, "source": engine.source}


def _page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def _limits(cfg: ServeConfig) -> dict[str, Any]:
    return {"max_request_mib": cfg.max_request_mib, "max_image_pixels": cfg.max_image_pixels}


# ------------------------------------------------------------------------------------ the service
app = FastAPI(
    title="semray",
    version=__version__,
    description="Denoise SEM images of semiconductor wafers with a trained U-Net or a classical method.",
    # FastAPI's /docs and /redoc pages load their JS from a CDN; the app must work offline, so only the
    # schema itself (/openapi.json) is served.
    docs_url=None,
    redoc_url=None,
)


@app.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


@app.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    # Still JSON with a detail, so the page can show it; the traceback goes to the replica's log.
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}): {exc}"[:500]}, status_code=500)


_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG/TIFF, 8/16-bit or float",
                        },
                        "reference": {
                            "type": "string",
                            "format": "binary",
                            "description": "clean image, same size",
                        },
                        "model": {
                            "type": "string",
                            "description": "model name (see /api/models); default 'default'",
                        },
                        "method": {"type": "string", "description": "unet (default) or a classical method"},
                    },
                }
            }
        },
    }
}


@serve.deployment(name="SemrayApp")
@serve.ingress(app)
class SemrayApp:
    """The app's one deployment: every replica serves the page, the API and its own model cache."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.cfg = ServeConfig.model_validate(config or {})
        if self.cfg.mlflow_tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.cfg.mlflow_tracking_uri
        import torch

        # fractional-CPU replicas share cores: one intra-op thread each avoids oversubscription
        torch.set_num_threads(self.cfg.torch_threads)
        self.model_loads = 0
        self.requests = 0
        self.started = time.time()

        cfg = self.cfg

        @serve.multiplexed(max_num_models_per_replica=cfg.max_cached_models)
        async def _cached(model_id: str) -> Engine:
            method, _, spec = model_id.partition(":")
            engine = await asyncio.to_thread(make_engine, method, spec, cfg)
            self.model_loads += 1
            return engine

        self._cached_engine = _cached

    async def _engine(self, method: str, spec: str) -> Engine:
        if method != "unet":  # classical filters have nothing to load; keep the cache for networks
            return make_engine(method, "", self.cfg)
        return await self._cached_engine(f"unet:{spec}")

    def _cached_ids(self) -> list[str]:
        # Serve keeps its LRU on the undecorated function; read-only peek, empty if that ever changes
        target = getattr(self._cached_engine, "__wrapped__", self._cached_engine)
        wrapper = getattr(target, "__serve_multiplex_wrapper", None)
        return [k.partition(":")[2] for k in getattr(wrapper, "models", {})]

    # ------------------------------------------------------------------ page
    @app.get("/", include_in_schema=False)
    async def index(self) -> HTMLResponse:
        html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers=_page_headers())

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        media = STATIC_FILES.get(name)
        if media is None:
            raise RequestError(404, f"no static file {name[:80]!r}")
        return FileResponse(WEB_DIR / name, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------- API
    @app.get("/api/health")
    async def health(self) -> dict[str, Any]:
        """Liveness plus this replica's model cache."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (direct tests)
            replica = "local"
        return {
            "status": "ok",
            "version": __version__,
            "replica": replica,
            "uptime_s": round(time.time() - self.started, 1),
            "requests": self.requests,
            "model_loads": self.model_loads,
            "cached_models": self._cached_ids(),
            "limits": _limits(self.cfg),
        }

    @app.get("/api/models")
    async def models(self) -> dict[str, Any]:
        """Models (shipped, local folder, MLflow registry) with card summaries, and classical methods."""
        from semray.models.resolve import list_models

        found = await asyncio.to_thread(list_models, self.cfg.models_dir, self.cfg.include_mlflow)
        usable = [m for m in found if MODEL_NAME_RE.match(m["name"]) or MLFLOW_SPEC_RE.match(m["name"])]
        names = [m["name"] for m in usable]
        default = (
            {"method": "unet", "model": "default"}
            if "default" in names
            else ({"method": "unet", "model": names[0]} if names else {"method": "gaussian", "model": None})
        )
        return {
            "default": default,
            "models": json_safe(usable),
            "methods": list_methods(),
            "limits": _limits(self.cfg),
        }

    @app.get("/api/samples")
    async def samples(self) -> dict[str, Any]:
        """Shipped synthetic samples (noisy + clean pairs) with their URLs."""
        out = []
        for name, rec in samples_index().items():
            out.append(
                {
                    **{
                        k: rec[k]
                        for k in ("name", "description", "pattern", "dtype", "format", "shape", "defects")
                    },
                    "noisy_url": f"/api/samples/{name}?kind=noisy",
                    "clean_url": f"/api/samples/{name}?kind=clean",
                    "preview_url": f"/api/samples/{name}?kind=preview",
                }
            )
        return {"samples": out}

    @app.get("/api/samples/{name}", response_model=None)
    async def sample(self, name: str, kind: str = "noisy") -> FileResponse | Response:
        """One sample file (``kind`` = noisy or clean) in its original format, or a PNG ``preview``."""
        if kind == "preview":
            png = await asyncio.to_thread(sample_preview_png, name)
            return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
        path = sample_file(name, kind)
        fmt = "png" if path.suffix == ".png" else "tiff"
        return FileResponse(path, media_type=MEDIA_TYPES[fmt], filename=path.name)

    async def _denoise(
        self, request: Request, previews: bool
    ) -> tuple[dict[str, Any], bytes, ImageMeta, Engine]:
        upload = await parse_upload(request, self.cfg.max_request_bytes)
        method, spec = parse_choice(upload.model, upload.method)
        t0 = time.monotonic()
        # images first: a bad upload is refused before any model is loaded for it
        decoded = await asyncio.to_thread(decode_upload, upload, self.cfg)
        t_load = time.monotonic()
        engine = await self._engine(method, spec)
        loaded_now = engine.method == "unet" and engine.loaded_at >= t_load
        report, result, meta = await asyncio.to_thread(
            run_denoise, engine, decoded, self.cfg, previews=previews
        )
        report["timing_ms"]["model_load_ms"] = engine.load_ms if loaded_now else 0.0
        report["timing_ms"]["total_ms"] = (time.monotonic() - t0) * 1e3
        report["model"] = {**engine_summary(engine), "loaded_now": loaded_now}
        self.requests += 1
        return report, result, meta, engine

    @app.post("/api/denoise", openapi_extra=_UPLOAD_DOC)
    async def denoise(self, request: Request) -> JSONResponse:
        """Denoise an upload; JSON with previews, timing, metrics and the full result in base64."""
        report, result, meta, _ = await self._denoise(request, previews=True)
        report["result"] = {
            "filename": result_filename(report["input"]["filename"], meta.format),
            "media_type": MEDIA_TYPES[meta.format],
            "dtype": meta.dtype,
            "shape": list(meta.shape),
            "bytes": len(result),
            "data_b64": base64.b64encode(result).decode("ascii"),
        }
        return JSONResponse(json_safe(report))

    @app.post("/api/denoise/file", openapi_extra=_UPLOAD_DOC)
    async def denoise_file(self, request: Request) -> Response:
        """Denoise an upload and answer with the file itself (same format, dtype and shape as the input)."""
        report, result, meta, engine = await self._denoise(request, previews=False)
        name = result_filename(report["input"]["filename"], meta.format)
        headers = {
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Semray-Model": f"{engine.method}:{engine.name}",
            "X-Semray-Denoise-Ms": f"{report['timing_ms']['denoise_ms']:.1f}",
            "X-Semray-Total-Ms": f"{report['timing_ms']['total_ms']:.1f}",
        }
        return Response(result, media_type=MEDIA_TYPES[meta.format], headers=headers)


# --------------------------------------------------------------------------------------- starting
def build_app(cfg: ServeConfig) -> Any:
    """The Serve application for ``cfg``: autoscaling, fractional CPUs, one torch thread per replica."""
    if cfg.models_dir is not None:  # replicas may not share the driver's working directory
        cfg = cfg.model_copy(update={"models_dir": Path(cfg.models_dir).expanduser().resolve()})
    # No runtime_env: it would make Ray set up a dedicated worker per replica (seconds each). Ray already
    # caps OMP/MKL threads to the replica's CPUs, __init__ sets torch's threads and the MLflow URI.
    return SemrayApp.options(
        autoscaling_config=cfg.serve_autoscaling_config(),
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus_per_replica},
    ).bind(cfg.model_dump(mode="json"))


def start(cfg: ServeConfig, *, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the app; returns the page URL.

    Uses the Ray instance already connected to, or starts a local one (``ray.init()``), so the same
    call works on a laptop and, with ``RAY_ADDRESS`` set, on a cluster.
    """
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}/"
