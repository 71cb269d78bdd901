"""The denoising app: pure helpers without Ray, then every endpoint and error path on a local Serve.

The Serve instance runs on the session's local Ray, bound to 127.0.0.1 on a free port, with three tiny
random U-Nets in a temporary models folder, one replica, a 2-model cache, a 1 MiB request limit and a
300 x 300 px image limit so every limit can be hit with small payloads.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import tifffile
import torch
from conftest import free_port, save_tiny_model, tiny_unet, wait_until_up
from PIL import Image

from semray.classical import METHODS, denoise_classical
from semray.config.base import ConfigError, load_config
from semray.config.serve import ServeConfig
from semray.infer import Denoiser
from semray.io import ImageMeta, read_image
from semray.metrics import compute_metrics
from semray.models.resolve import resolve_model
from semray.models.store import save_model
from semray.models.unet import build_model
from semray.serve import SAMPLES_DIR, finite_metrics, samples_index, validate_model_spec
from semray.webimage import (
    RequestError,
    decode_image,
    difference_map,
    display_name,
    encode_image,
    probe_shape,
    result_filename,
    sniff_format,
)

TINY = tiny_unet()
MODEL_NAMES = ("tiny_a", "tiny_b", "tiny_c")
RNG = np.random.default_rng(7)


# ------------------------------------------------------------------------------------- payloads
def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(pixels).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def tiff_bytes(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, **kwargs)
    return buf.getvalue()


def noisy_u8(shape=(64, 80)) -> np.ndarray:
    xx = np.arange(shape[1])[None, :] * np.ones((shape[0], 1), int)
    clean = 0.3 + 0.4 * ((xx // 8) % 2)
    return np.clip(np.rint((clean + RNG.normal(0, 0.08, shape)) * 255), 0, 255).astype(np.uint8)


def data_uri_image(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def read_bytes_image(data: bytes, suffix: str, tmp: Path) -> tuple[np.ndarray, ImageMeta]:
    path = tmp / f"check{suffix}"
    path.write_bytes(data)
    return read_image(path)


# ------------------------------------------------------------------------------ pure helpers
def test_sniff_format_uses_magic_bytes_not_names():
    assert sniff_format(png_bytes(noisy_u8())) == "png"
    assert sniff_format(tiff_bytes(noisy_u8())) == "tiff"
    assert sniff_format(tiff_bytes(noisy_u8(), byteorder=">")) == "tiff"
    assert sniff_format(tiff_bytes(noisy_u8(), bigtiff=True)) == "tiff"
    for junk in (b"", b"GIF89a....", b"%PDF-1.7", b"hello world", b"\xff\xd8\xff\xe0JFIF"):
        with pytest.raises(RequestError) as e:
            sniff_format(junk)
        assert e.value.status == 415


def test_probe_shape_reads_headers_without_decoding():
    img = noisy_u8((37, 53))
    assert probe_shape(png_bytes(img), "png") == (37, 53)
    assert probe_shape(tiff_bytes(img), "tiff") == (37, 53)
    # a PNG header claiming 100000 x 90000 px, with no pixel data behind it: refused from the header
    bomb = png_bytes(img)
    bomb = bomb[:16] + (90000).to_bytes(4, "big") + (100000).to_bytes(4, "big") + bomb[24:]
    assert probe_shape(bomb, "png") == (100000, 90000)
    with pytest.raises(RequestError) as e:
        decode_image(bomb, "bomb.png", max_pixels=10**6)
    assert e.value.status == 413 and "100000x90000" in e.value.detail


@pytest.mark.parametrize(
    ("pixels", "fmt"),
    [
        (noisy_u8(), "png"),
        ((noisy_u8().astype(np.uint16) * 257), "png"),
        ((noisy_u8().astype(np.uint16) * 251), "tiff"),
        ((noisy_u8().astype(np.float32) / 255.0), "tiff"),
    ],
    ids=["u8-png", "u16-png", "u16-tiff", "f32-tiff"],
)
def test_decode_encode_round_trip_keeps_dtype_format_and_values(pixels, fmt):
    data = png_bytes(pixels) if fmt == "png" else tiff_bytes(pixels)
    image, meta = decode_image(data, "x", max_pixels=10**6)
    assert image.dtype == np.float32 and image.shape == pixels.shape
    assert (meta.format, meta.dtype) == (fmt, pixels.dtype.name)
    out = encode_image(image, meta)
    assert sniff_format(out) == fmt
    back = (
        np.asarray(Image.open(io.BytesIO(out))) if fmt == "png" else tifffile.imread(io.BytesIO(out))
    ).astype(pixels.dtype)
    assert back.dtype == pixels.dtype
    np.testing.assert_array_equal(back, pixels)


def test_grey_saved_as_rgb_comes_back_as_rgb():
    grey = noisy_u8()
    image, meta = decode_image(png_bytes(np.repeat(grey[..., None], 3, -1)), "rgb.png", max_pixels=10**6)
    assert meta.layout == "rgb" and image.shape == grey.shape
    back = np.asarray(Image.open(io.BytesIO(encode_image(image, meta))))
    np.testing.assert_array_equal(back, np.repeat(grey[..., None], 3, -1))


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"not an image at all", 415, "PNG or TIFF"),
        (png_bytes(noisy_u8())[:60], 400, "cannot be read"),
        (png_bytes(RNG.integers(0, 255, (16, 16, 3), dtype=np.uint8)), 422, "channel"),
        (tiff_bytes(RNG.integers(-5, 5, (16, 16), dtype=np.int16)), 422, "dtype"),
        (tiff_bytes(np.full((16, 16), np.nan, np.float32)), 422, "NaN"),
        (tiff_bytes(np.stack([noisy_u8(), noisy_u8()]), photometric="minisblack"), 422, "multipage"),
    ],
    ids=["empty", "text", "truncated-png", "rgb-png", "int16-tiff", "nan-tiff", "multipage-tiff"],
)
def test_decode_rejects_bad_images_with_4xx(data, status, words):
    with pytest.raises(RequestError) as e:
        decode_image(data, "../../secret/upload.png", max_pixels=10**6)
    assert e.value.status == status
    assert words in e.value.detail
    assert "secret" not in e.value.detail  # the client's path is reduced to its base name


@pytest.mark.parametrize(
    "spec",
    ["default", "tiny_a", "unet-v2.1", "models:/denoiser/3", "models:/denoiser/latest", "models:/d@champion"],
)
def test_validate_model_spec_accepts_names_and_registry_uris(spec):
    assert validate_model_spec(spec) == spec


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "..",
        "../models/x",
        "/etc/passwd",
        "a/b",
        ".hidden",
        "x\\y",
        "C:\\models\\m",
        "name\x00",
        "models:/../x/1",
        "models:/a/b/c",
        "models:/a@../../b",
        "file:///etc/passwd",
        "runs:/abc/model",
        "a" * 200,
    ],
)
def test_validate_model_spec_rejects_paths_and_odd_names(spec):
    with pytest.raises(RequestError) as e:
        validate_model_spec(spec)
    assert e.value.status == 400


def test_display_and_result_names_are_safe():
    assert display_name("../../etc/passwd") == "passwd"
    assert display_name("C:\\data\\wafer 7.tif") == "wafer_7.tif"
    assert display_name(".bashrc") == "bashrc"
    assert display_name("") == "image"
    assert result_filename("lot1/w3.TIFF", "tiff") == "w3_denoised.tif"
    assert result_filename("a.png", "png") == "a_denoised.png"


def test_difference_map_scale_and_colours():
    noisy = np.zeros((20, 30), np.float32)
    rgb, scale = difference_map(noisy, noisy + 0.1)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert scale == pytest.approx(0.1, rel=1e-5)
    assert (rgb == rgb[0, 0]).all() and rgb[0, 0].sum() > 600  # uniform, brightest end of magma
    rgb0, scale0 = difference_map(noisy, noisy)
    assert scale0 == pytest.approx(1 / 255) and rgb0[0, 0].sum() < 20  # darkest end
    # one outlier does not set the scale: the 99.5th percentile does
    den = noisy + 0.05
    den[0, 0] = 1.0
    _, s = difference_map(noisy, den)
    assert s == pytest.approx(0.05, rel=1e-4)


def test_finite_metrics_keeps_shown_finite_values_only():
    out = finite_metrics({"psnr": 30.0, "ssim": float("nan"), "defect_recall": 1.0, "ms_ssim": 0.9})
    assert out == {"psnr": 30.0, "ms_ssim": 0.9}


def test_serve_config_validation_and_autoscaling_dict():
    cfg = load_config(ServeConfig, {"autoscaling": {"min_replicas": 2, "max_replicas": 5}})
    a = cfg.serve_autoscaling_config()
    assert (a["min_replicas"], a["max_replicas"], a["target_ongoing_requests"]) == (2, 5, 2.0)
    assert cfg.max_request_bytes == 64 * 2**20
    for bad, field in [
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
        ({"port": 70000}, "port"),
        ({"num_cpus_per_replica": 0}, "num_cpus_per_replica"),
        ({"tiling": {"tile": 64, "overlap": 32}}, "overlap"),
        ({"tile": 512}, "tiling.tile"),
        ({"max_request_mb": 3}, "max_request_mb"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_config(ServeConfig, bad)


def test_shipped_samples_match_their_index():
    index = samples_index()
    assert len(index) >= 3
    for name, rec in index.items():
        for kind in ("noisy", "clean"):
            image, meta = read_image(SAMPLES_DIR / rec[f"{kind}_file"])
            assert meta.dtype == rec["dtype"] and meta.format == rec["format"]
            assert list(image.shape) == rec["shape"]
        noisy, _ = read_image(SAMPLES_DIR / rec["noisy_file"])
        clean, _ = read_image(SAMPLES_DIR / rec["clean_file"])
        # the pair is a real noisy/clean pair: correlated, and the noisy one is actually noisy
        assert np.corrcoef(noisy.ravel(), clean.ravel())[0, 1] > 0.5, name
        assert 0.02 < np.std(noisy - clean) < 0.4, name


def test_cli_parses_and_prints_config(capsys, tmp_path):
    from semray.cli import main

    assert main(["serve", "--print-config", "--port", "9123", "--set", "autoscaling.max_replicas=3"]) == 0
    out = capsys.readouterr().out
    assert "port: 9123" in out and "max_replicas: 3" in out
    bad = tmp_path / "serve.yaml"
    bad.write_text("port: 8000\nmax_replicas: 2\n")
    assert main(["serve", "--config", str(bad), "--print-config"]) == 2
    assert "max_replicas" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the server
def make_models(root: Path, names=MODEL_NAMES) -> Path:
    for i, name in enumerate(names):
        save_tiny_model(  # different weights, so switching models changes the output
            root / name,
            {
                "name": name,
                "version": str(i + 1),
                "metrics": {"val_psnr": 30.0 + i},
                "description": f"test {name}",
            },
            seed=100 + i,
        )
    return root


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from semray.serve import start

    models = make_models(tmp_path_factory.mktemp("serve_models"))
    make_models(models, names=("broken",))
    weights = models / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated on disk: fails its sha256 check
    # a valid model directory *outside* the models folder: it must never be reachable by name or path
    outside = make_models(tmp_path_factory.mktemp("outside"), names=("secret_model",))
    cfg = ServeConfig(
        port=free_port(),
        models_dir=models,
        include_mlflow=False,
        autoscaling={"min_replicas": 1, "max_replicas": 1},
        max_cached_models=2,
        max_request_mib=1.0,
        max_image_pixels=300 * 300,
    )
    url = start(cfg)
    assert wait_until_up(url + "api/health"), f"the app at {url} did not answer within 60 s"
    yield SimpleNamespace(url=url, models=models, outside=outside, cfg=cfg)
    serve.shutdown()


def post(server, image: bytes, name: str = "in.png", path: str = "api/denoise", reference=None, **fields):
    files = {"image": (name, image, "application/octet-stream")}
    if reference is not None:
        files["reference"] = ("ref" + Path(name).suffix, reference, "application/octet-stream")
    return requests.post(server.url + path, files=files, data=fields, timeout=120)


def expect_error(resp: requests.Response, status: int, words: str = "") -> str:
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and words in detail, detail
    return detail


def local_denoiser(server, name: str) -> Denoiser:
    torch.set_num_threads(1)
    resolved = resolve_model(name, models_dir=server.models, allow_paths=False)
    return Denoiser.from_config(server.cfg.infer_config("unet"), resolved)


@pytest.mark.ray
def test_health_and_page(server):
    h = requests.get(server.url + "api/health", timeout=10).json()
    assert h["status"] == "ok" and h["version"]
    assert h["limits"] == {"max_request_mib": 1.0, "max_image_pixels": 90000}
    page = requests.get(server.url, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/static/app.js" in page.text and "http://" not in page.text and "https://" not in page.text
    for name, ctype in (
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ):
        r = requests.get(server.url + f"static/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "https://" not in r.text  # nothing is fetched from a CDN
    for bad in (
        "static/serve.py",
        "static/..%2Fserve.py",
        "static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "static/index.html",
    ):
        expect_error(requests.get(server.url + bad, timeout=10), 404)
    expect_error(requests.get(server.url + "api/nothing-here", timeout=10), 404)
    expect_error(requests.get(server.url + "docs", timeout=10), 404)  # Swagger UI would need a CDN
    openapi = requests.get(server.url + "openapi.json", timeout=10).json()
    assert "multipart/form-data" in json.dumps(openapi["paths"]["/api/denoise"])


@pytest.mark.ray
def test_models_lists_local_models_with_cards_and_methods(server):
    data = requests.get(server.url + "api/models", timeout=30).json()
    by_name = {m["name"]: m for m in data["models"]}
    assert set(MODEL_NAMES) <= set(by_name)
    assert "secret_model" not in by_name
    a = by_name["tiny_a"]
    assert a["source"] == "local" and a["version"] == "1"
    assert a["card"]["metrics"] == {"val_psnr": 30.0}
    assert a["card"]["model_config"]["base_width"] == 4 and a["card"]["params"] > 0
    assert [m["name"] for m in data["methods"]] == list(METHODS)
    assert data["default"]["method"] == "unet" and data["default"]["model"] in by_name
    assert data["limits"]["max_request_mib"] == 1.0


@pytest.mark.ray
def test_samples_endpoints(server, tmp_path):
    listed = requests.get(server.url + "api/samples", timeout=10).json()["samples"]
    assert {s["name"] for s in listed} == set(samples_index())
    for s in listed:
        for kind in ("noisy", "clean"):
            r = requests.get(server.url + s[f"{kind}_url"].lstrip("/"), timeout=10)
            assert r.status_code == 200
            suffix = ".png" if s["format"] == "png" else ".tif"
            img, meta = read_bytes_image(r.content, suffix, tmp_path)
            assert meta.dtype == s["dtype"] and list(img.shape) == s["shape"]
        thumb = requests.get(server.url + s["preview_url"].lstrip("/"), timeout=10)
        assert thumb.headers["content-type"] == "image/png"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 160
    expect_error(requests.get(server.url + "api/samples/nope", timeout=10), 404, "unknown sample")
    expect_error(requests.get(server.url + "api/samples/lines?kind=secret", timeout=10), 400, "kind")
    # an encoded slash makes the path miss the route (404); a dotted name is refused by the name check
    traversal = requests.get(server.url + "api/samples/..%2F..%2Fserve.py", timeout=10)
    expect_error(traversal, traversal.status_code)
    assert traversal.status_code in (400, 404)
    expect_error(requests.get(server.url + "api/samples/.samples", timeout=10), 400)


@pytest.mark.ray
def test_denoise_png_with_reference_matches_local_engine(server):
    rec = samples_index()["lines"]
    noisy_b = (SAMPLES_DIR / rec["noisy_file"]).read_bytes()
    clean_b = (SAMPLES_DIR / rec["clean_file"]).read_bytes()
    r = post(server, noisy_b, name="lines.png", reference=clean_b, model="tiny_a")
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert out["model"] | {"loaded_now": None} == {
        "method": "unet", "name": "tiny_a", "version": "1", "source": "local", "loaded_now": None
    }  # fmt: skip
    assert out["input"] == {"filename": "lines.png", "format": "png", "dtype": "uint8", "shape": [256, 256]}
    # the full result: same format, dtype and shape, and the same pixels the batch engine gives
    res = out["result"]
    assert (res["filename"], res["media_type"], res["dtype"], res["shape"]) == (
        "lines_denoised.png", "image/png", "uint8", [256, 256]
    )  # fmt: skip
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["data_b64"]))))
    assert got.dtype == np.uint8 and len(base64.b64decode(res["data_b64"])) == res["bytes"]
    noisy, _ = read_image(SAMPLES_DIR / rec["noisy_file"])
    clean, _ = read_image(SAMPLES_DIR / rec["clean_file"])
    expected = local_denoiser(server, "tiny_a")(noisy)
    diff = np.abs(got.astype(int) - np.rint(expected * 255).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    # metrics against the reference, for the input and for the output
    m = out["metrics"]
    assert set(m["denoised"]) == {"psnr", "ssim", "ms_ssim", "edge_preservation", "gradient_correlation"}
    assert m["noisy"]["psnr"] == pytest.approx(compute_metrics(clean, noisy)["psnr"], abs=1e-6)
    assert m["denoised"]["psnr"] == pytest.approx(compute_metrics(clean, expected)["psnr"], abs=0.02)
    # previews: full-size grey PNGs and an RGB difference map; timing fields present and positive
    p = out["previews"]
    assert data_uri_image(p["noisy"]).shape == (256, 256)
    assert data_uri_image(p["clean"]).shape == (256, 256)
    assert data_uri_image(p["difference"]).shape == (256, 256, 3)
    np.testing.assert_array_equal(data_uri_image(p["denoised"]), got)
    assert out["difference"]["mean_abs"] == pytest.approx(np.abs(expected - noisy).mean(), abs=2e-3)
    t = out["timing_ms"]
    assert all(t[k] >= 0 for k in ("decode_ms", "denoise_ms", "metrics_ms", "encode_ms", "total_ms"))
    assert t["total_ms"] >= t["denoise_ms"]


@pytest.mark.ray
def test_denoise_keeps_16bit_and_float_tiff(server, tmp_path):
    img16 = (noisy_u8((48, 72)).astype(np.uint16) * 257) ^ 0x0055  # low bits set: a true 16-bit image
    r = post(server, tiff_bytes(img16, description="wafer 7 site 3"), name="w7.tif", model="tiny_b")
    assert r.status_code == 200, r.text[:300]
    res = r.json()["result"]
    assert (res["media_type"], res["dtype"], res["shape"]) == ("image/tiff", "uint16", [48, 72])
    got = tifffile.imread(io.BytesIO(base64.b64decode(res["data_b64"])))
    assert got.dtype == np.uint16 and got.shape == (48, 72)
    expected = local_denoiser(server, "tiny_b")(img16.astype(np.float32) / 65535)
    assert np.abs(got.astype(np.int64) - np.rint(expected * 65535).astype(np.int64)).max() <= 64
    with tifffile.TiffFile(io.BytesIO(base64.b64decode(res["data_b64"]))) as tf:
        assert tf.pages[0].description == "wafer 7 site 3"  # TIFF tags carried over
    # float32 TIFF comes back float32 through the raw-file endpoint
    f32 = noisy_u8((40, 40)).astype(np.float32) / 255
    raw = post(server, tiff_bytes(f32), name="f.tiff", path="api/denoise/file", model="tiny_b")
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/tiff"
    assert raw.headers["x-semray-model"] == "unet:tiny_b"
    assert 'filename="f_denoised.tif"' in raw.headers["content-disposition"]
    back = tifffile.imread(io.BytesIO(raw.content))
    assert back.dtype == np.float32 and back.shape == (40, 40)
    np.testing.assert_allclose(back, local_denoiser(server, "tiny_b")(f32), atol=1e-5)


@pytest.mark.ray
def test_classical_method_matches_library(server):
    img = noisy_u8()
    r = post(server, png_bytes(img), method="median")
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert out["model"]["method"] == "median" and out["model"]["source"] == "classical"
    assert out["metrics"] is None and "clean" not in out["previews"]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["result"]["data_b64"]))))
    want = np.rint(denoise_classical(img.astype(np.float32) / 255, "median") * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.ray
def test_models_are_cached_per_replica_with_lru_eviction(server):
    img = png_bytes(noisy_u8((32, 32)))

    def run(name: str) -> dict:
        r = post(server, img, model=name)
        assert r.status_code == 200, r.text[:300]
        return r.json()

    def loads() -> int:
        return requests.get(server.url + "api/health", timeout=10).json()["model_loads"]

    first = run("tiny_a")
    n = loads()
    second = run("tiny_a")  # just used: must come from the cache
    assert second["model"]["loaded_now"] is False and second["timing_ms"]["model_load_ms"] == 0
    assert loads() == n
    if first["model"]["loaded_now"]:
        assert first["timing_ms"]["model_load_ms"] > 0
    # switching is really switching: different weights, different output
    b = run("tiny_b")
    assert b["result"]["data_b64"] != second["result"]["data_b64"]
    run("tiny_c")  # cache holds 2: tiny_a (least recently used) is evicted now
    assert requests.get(server.url + "api/health", timeout=10).json()["cached_models"] == ["tiny_b", "tiny_c"]
    n = loads()
    again = run("tiny_a")
    assert again["model"]["loaded_now"] is True and again["timing_ms"]["model_load_ms"] > 0
    assert loads() == n + 1
    assert again["result"]["data_b64"] == second["result"]["data_b64"]  # same model, same answer
    assert run("tiny_a")["model"]["loaded_now"] is False


@pytest.mark.ray
def test_denoise_error_paths(server):
    good = png_bytes(noisy_u8((32, 32)))
    url = server.url + "api/denoise"
    expect_error(post(server, b"hello, not an image", name="x.png"), 415, "PNG or TIFF")
    expect_error(post(server, good[:50], name="x.png"), 400, "cannot be read")
    expect_error(post(server, b"", name="x.png"), 400)
    expect_error(post(server, png_bytes(RNG.integers(0, 255, (16, 16, 3), dtype=np.uint8))), 422, "channel")
    expect_error(post(server, tiff_bytes(np.zeros((16, 16), np.int32)), name="x.tif"), 422, "dtype")
    expect_error(post(server, png_bytes(np.zeros((301, 300), np.uint8))), 413, "exceeds the limit")
    expect_error(post(server, good, reference=png_bytes(np.zeros((16, 16), np.uint8))), 422, "reference")
    expect_error(post(server, good, reference=b"garbage!"), 415)
    # models: unknown names are 404, anything path-like is 400, even when it points at a real model
    expect_error(post(server, good, model="no_such_model"), 404, "unknown model")
    for spec in (
        "../outside/secret_model",
        str(server.outside / "secret_model"),
        "secret_model",
        "..",
        "a/b",
    ):
        resp = post(server, good, model=spec)
        assert resp.status_code in (400, 404), (spec, resp.status_code)
        assert "secret_model" != resp.json().get("model", {}).get("name")
    expect_error(post(server, good, model=str(server.models / "tiny_a")), 400, "invalid model name")
    expect_error(post(server, good, model="models:/../../x/1"), 400)
    expect_error(post(server, good, method="sharpen"), 400, "unknown method")
    # a model broken on disk is the server's problem: 500, still a JSON detail naming the cause
    expect_error(post(server, good, model="broken"), 500, "sha256")
    # malformed requests
    expect_error(requests.post(url, json={"image": "x"}, timeout=10), 415, "multipart")
    expect_error(requests.post(url, files={"picture": ("x.png", good)}, timeout=10), 400, "'image'")
    bad_mp = requests.post(
        url,
        data=b"--xx\r\nnonsense",
        headers={"content-type": "multipart/form-data; boundary=xx"},
        timeout=10,
    )
    assert bad_mp.status_code == 400 and "detail" in bad_mp.json()
    # body size: with Content-Length, and chunked (no length) so it must be counted as it streams
    big = b"\0" * (server.cfg.max_request_bytes + 1024)
    expect_error(post(server, big, name="big.png"), 413, "MiB")

    def chunks():
        for _ in range(40):
            yield b"\0" * 65536

    chunked = requests.post(
        url, data=chunks(), headers={"content-type": "multipart/form-data; boundary=xx"}, timeout=30
    )
    expect_error(chunked, 413, "limit")
    # the service is still healthy after all that
    assert requests.get(server.url + "api/health", timeout=10).json()["status"] == "ok"


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_registered_models_are_listed_and_served(server, mlflow_store, tmp_path):
    """A second app on the same Serve instance, reading a fresh MLflow registry (slow: DB migrations)."""
    from mlflow import MlflowClient
    from ray import serve

    from semray.serve import build_app

    torch.manual_seed(300)
    art = save_model(build_model(TINY), TINY, tmp_path / "registered" / "model", {"name": "tiny_reg"})
    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    client.create_registered_model("tiny_reg")
    version = client.create_model_version("tiny_reg", source=str(art.parent), run_id=None).version
    client.set_registered_model_alias("tiny_reg", "champion", version)

    cfg = server.cfg.model_copy(
        update={"include_mlflow": True, "mlflow_tracking_uri": mlflow_store, "app_name": "semray-mlflow"}
    )
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/mlflow")
    try:
        base = server.url + "mlflow/"
        listed = {m["name"]: m for m in requests.get(base + "api/models", timeout=120).json()["models"]}
        assert {f"models:/tiny_reg/{version}", "models:/tiny_reg@champion"} <= set(listed)
        assert listed["models:/tiny_reg@champion"]["source"] == "mlflow"
        assert set(MODEL_NAMES) <= set(listed)  # local models are still offered next to the registry
        img = noisy_u8((40, 48))
        r = requests.post(
            base + "api/denoise",
            files={"image": ("x.png", png_bytes(img))},
            data={"model": "models:/tiny_reg@champion"},
            timeout=120,
        )
        assert r.status_code == 200, r.text[:300]
        out = r.json()
        assert out["model"]["source"] == "mlflow" and out["model"]["version"] == str(version)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["result"]["data_b64"]))))
        torch.set_num_threads(1)
        want = Denoiser.from_config(cfg.infer_config("unet"), resolve_model("models:/tiny_reg@champion"))(
            img.astype(np.float32) / 255
        )
        assert np.abs(got.astype(int) - np.rint(want * 255).astype(int)).max() <= 1
        missing = requests.post(
            base + "api/denoise",
            files={"image": ("x.png", png_bytes(img))},
            data={"model": "models:/tiny_reg@nobody"},
            timeout=120,
        )
        expect_error(missing, 404, "tiny_reg")
    finally:
        serve.delete(cfg.app_name)
