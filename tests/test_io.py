"""Image I/O and shard schema: dtype/shape round trips, carried TIFF tags, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from semray.io import (
    ImageReadError,
    ShardError,
    list_images,
    read_image,
    read_shard,
    sha256_file,
    write_image,
    write_shard,
)

RNG = np.random.default_rng(0)


def _pixels(dtype: str, shape=(37, 53)) -> np.ndarray:
    if dtype == "uint8":
        return RNG.integers(0, 256, shape, dtype=np.uint8)
    if dtype == "uint16":
        return RNG.integers(0, 65536, shape, dtype=np.uint16)
    return RNG.random(shape, dtype=np.float32)


@pytest.mark.parametrize(
    ("suffix", "dtype"),
    [(".png", "uint8"), (".png", "uint16"), (".tif", "uint8"), (".tif", "uint16"), (".tiff", "float32")],
)
def test_round_trip_preserves_dtype_shape_and_values(tmp_path: Path, suffix: str, dtype: str) -> None:
    data = _pixels(dtype)
    src = tmp_path / f"in{suffix}"
    if suffix == ".png":
        Image.fromarray(data).save(src)
    else:
        tifffile.imwrite(src, data)
    img, meta = read_image(src)
    assert img.dtype == np.float32 and img.shape == data.shape
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert meta.dtype == dtype and meta.shape == data.shape
    out = write_image(tmp_path / f"out{suffix}", img, meta)
    back = tifffile.imread(out) if suffix != ".png" else np.asarray(Image.open(out))
    assert back.dtype == data.dtype and back.shape == data.shape
    np.testing.assert_array_equal(back, data)


def test_float_tiff_outside_unit_range_is_mapped_and_restored(tmp_path: Path) -> None:
    data = (RNG.random((20, 30)) * 500.0 - 100.0).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", data)
    img, meta = read_image(tmp_path / "f.tif")
    assert img.min() == pytest.approx(0.0) and img.max() == pytest.approx(1.0)
    back = tifffile.imread(write_image(tmp_path / "o.tif", img, meta))
    np.testing.assert_allclose(back, data, rtol=0, atol=1e-3)


def test_tiff_tags_and_vendor_metadata_are_carried_over(tmp_path: Path) -> None:
    data = _pixels("uint16", (16, 24))
    fei = "[User]\nDate=01/02/2026\n[Beam]\nHV=5000\n"
    tifffile.imwrite(
        tmp_path / "sem.tif",
        data,
        description="lot A wafer 3",
        resolution=(1000.0, 1000.0),
        extratags=[(34682, "s", 0, fei, True), (65000, "I", 2, (7, 9), True)],
    )
    with tifffile.TiffFile(tmp_path / "sem.tif") as tf:
        fei_parsed = tf.pages[0].tags[34682].value
    img, meta = read_image(tmp_path / "sem.tif")
    out = write_image(tmp_path / "den.tif", img, meta)
    with tifffile.TiffFile(out) as tf:
        page = tf.pages[0]
        assert page.description == "lot A wafer 3"
        assert page.tags[34682].value == fei_parsed
        assert page.tags[34682].dtype == 2  # still ASCII, as the microscope wrote it
        assert tuple(page.tags[65000].value) == (7, 9)
        assert page.tags[282].value == (1000, 1)


def test_multipage_tiff_pages_are_addressable(tmp_path: Path) -> None:
    pages = np.stack([_pixels("uint8", (10, 12)) for _ in range(3)])
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="minisblack")
    for k in range(3):
        img, meta = read_image(tmp_path / "stack.tif", page=k)
        np.testing.assert_array_equal(np.rint(img * 255).astype(np.uint8), pages[k])
        assert meta.page == k
    with pytest.raises(ImageReadError, match="page 3"):
        read_image(tmp_path / "stack.tif", page=3)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.tif", b"", "empty"),
        ("text.tif", b"this is not a tiff at all\n" * 10, "cannot be read as TIFF"),
        ("notes.txt", b"hello", "unsupported file type"),
    ],
)
def test_bad_files_raise_a_clear_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as exc:
        read_image(p)
    assert name in str(exc.value)


def test_truncated_tiff_and_rgb_png_are_rejected(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "full.tif", _pixels("uint16", (256, 256)))
    raw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ImageReadError, match="trunc.tif"):
        read_image(tmp_path / "trunc.tif")
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match="rgb.png: a true colour image"):
        read_image(tmp_path / "rgb.png")


def test_non_finite_float_and_oversize_images_are_rejected(tmp_path: Path) -> None:
    data = np.ones((8, 8), np.float32)
    data[2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", data)
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(ImageReadError, match="exceeds"):
        read_image(tmp_path / "big.tif", max_pixels=1000)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    img = RNG.random((9, 11), dtype=np.float32)
    write_image(tmp_path / "a" / "b" / "x.png", img)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["x.png"]
    assert len(sha256_file(tmp_path / "a" / "b" / "x.png")) == 64


def test_list_images_recurses_and_ignores_other_files(tmp_path: Path) -> None:
    for rel in ["lot1/w1/a.tif", "lot1/w2/b.PNG", "lot2/c.tiff", "lot2/readme.txt", "lot2/.hidden.tif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["lot1/w1/a.tif", "lot1/w2/b.PNG", "lot2/c.tiff"]


def _record(i: int, shape=(21, 34)) -> dict:
    return {
        "image_id": f"img-{i}",
        "clean": RNG.random(shape, dtype=np.float32),
        "defect_mask": RNG.random(shape) > 0.9,
        "pattern": "lines",
        "split": "train",
        "n_defects": i,
    }


def test_shard_round_trip_is_lossless(tmp_path: Path) -> None:
    recs = [_record(i) for i in range(5)]
    write_shard(recs, tmp_path / "s.parquet")
    back = read_shard(tmp_path / "s.parquet")
    assert back["clean"].shape == (5, 21, 34) and back["clean"].dtype == np.float32
    assert back["defect_mask"].dtype == bool
    for i, r in enumerate(recs):
        assert back["image_id"][i] == r["image_id"]
        np.testing.assert_array_equal(back["clean"][i], r["clean"])
        np.testing.assert_array_equal(back["defect_mask"][i], r["defect_mask"])
    assert list(back["n_defects"]) == [0, 1, 2, 3, 4]


def test_shard_with_differently_sized_images(tmp_path: Path) -> None:
    recs = [_record(0, (10, 12)), _record(1, (7, 15))]
    write_shard(recs, tmp_path / "r.parquet")
    back = read_shard(tmp_path / "r.parquet")
    assert back["clean"][1].shape == (7, 15)
    np.testing.assert_array_equal(back["clean"][1], recs[1]["clean"])


def test_shard_schema_errors_name_the_problem(tmp_path: Path) -> None:
    rec = _record(0)
    del rec["split"]
    with pytest.raises(ShardError, match="split"):
        write_shard([rec], tmp_path / "bad.parquet")
    bad = _record(0)
    bad["split"] = "training"
    with pytest.raises(ShardError, match="training"):
        write_shard([bad], tmp_path / "bad.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"nope")
    with pytest.raises(ShardError, match="junk.parquet"):
        read_shard(tmp_path / "junk.parquet")
