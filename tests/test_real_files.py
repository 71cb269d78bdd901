"""Files as microscopes write them: grey saved as RGB with a coloured border and vendor tags, multipage
stacks, palettes, JPEG, and the real micrographs in ../shared/data/real-sem/ (read through semray.io)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from sem_files import (
    PAGE_TAG,
    REAL_SEM,
    texture,
    u8,
    write_fei_rgb,
    write_multipage,
    write_palette,
    write_true_colour,
)

from semray.databar import detect_data_bar
from semray.greyscale import nearest_palette_index, split_grey, to_file_layout
from semray.io import (
    ImageReadError,
    count_pages,
    iter_pages,
    list_images,
    pixel_count,
    read_image,
    write_image,
    write_pages,
)

needs_real = pytest.mark.skipif(
    not REAL_SEM.is_dir(), reason=f"real SEM images not found at {REAL_SEM} (see shared/data/real-sem)"
)


def _tiff_page(path: Path, k: int = 0) -> tuple[np.ndarray, dict]:
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[k]
        return p.asarray(), {t.code: t.value for t in p.tags.values()}


def test_grey_saved_as_rgb_reads_as_grey_and_comes_back_in_its_own_layout(tmp_path: Path) -> None:
    rgb = write_fei_rgb(tmp_path / "quanta.tif")
    img, meta = read_image(tmp_path / "quanta.tif")
    assert img.shape == (471, 512) and meta.layout == "rgb" and meta.dtype == "uint8"
    inner = np.s_[1:-1, 1:-1]
    np.testing.assert_array_equal(u8(img)[inner], rgb[inner][..., 0])  # the grey, exactly
    # a denoised (here: inverted) image goes back into 3 equal channels; the green border is copied
    write_image(tmp_path / "out.tif", 1.0 - img, meta)
    out, tags = _tiff_page(tmp_path / "out.tif")
    assert out.shape == rgb.shape and out.dtype == rgb.dtype
    np.testing.assert_array_equal(out[inner], 255 - rgb[inner])
    border = np.ones(img.shape, bool)
    border[inner] = False
    np.testing.assert_array_equal(out[border], rgb[border])
    _, tags_in = _tiff_page(tmp_path / "quanta.tif")
    assert tags[262] == 2 and tags[270] == "FEI Quanta 250" and tags[34682] == tags_in[34682]
    assert tags_in[34682]["Beam"]["HV"] == 5000  # tifffile parses FEI's INI: the text came through whole
    assert tags[282] == (2000, 1)


def test_split_grey_round_trips_any_overlay_and_alpha() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    rgba = np.concatenate([np.repeat(grey[..., None], 3, -1), np.full((40, 50, 1), 9, np.uint16)], -1)
    rgba[10:12, 5:30, :3] = (65535, 0, 0)  # a red annotation inside the frame (2.5 % of the pixels)
    g, layout = split_grey(rgba, 3, "rgb", "x.tif")
    assert layout.overlay_index.size == 2 * 25 and layout.extra is not None
    np.testing.assert_array_equal(g[:10], grey[:10])
    coloured = rgba[..., 0] != rgba[..., 1]
    for y, x in zip(*np.nonzero(coloured), strict=True):  # takes the grey of a nearest grey pixel
        steps = ((-1, 0), (1, 0), (0, -1), (0, 1))
        assert g[y, x] in {grey[y + dy, x + dx] for dy, dx in steps if not coloured[y + dy, x + dx]}
    np.testing.assert_array_equal(to_file_layout(g, layout), rgba)


@pytest.mark.parametrize("fmt", [".tif", ".png"])
def test_true_colour_fails_with_a_reason_naming_the_file(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"colour{fmt}"
    if fmt == ".tif":
        write_true_colour(path)
    else:
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ImageReadError, match=rf"colour{fmt}: a true colour image \(100\.0% of its pixels"):
        read_image(path)


def test_grey_palette_reads_as_grey_and_writes_the_same_palette(tmp_path: Path) -> None:
    index = write_palette(tmp_path / "pal.tif")
    img, meta = read_image(tmp_path / "pal.tif")
    assert meta.layout == "palette" and meta.dtype == "uint16"
    np.testing.assert_allclose(img, index / 255.0, atol=1e-6)
    write_image(tmp_path / "out.tif", img, meta)
    out, tags = _tiff_page(tmp_path / "out.tif")
    np.testing.assert_array_equal(out, index)
    assert tags[262] == 3 and np.array_equal(np.asarray(tags[320]).reshape(3, -1)[0], np.arange(256) * 257)
    write_palette(tmp_path / "colour.tif", grey=False)
    with pytest.raises(ImageReadError, match="colour.tif: a colour palette"):
        read_image(tmp_path / "colour.tif")


def test_png_palette_and_grey_alpha_round_trip(tmp_path: Path) -> None:
    grey = u8(texture(np.random.default_rng(2), (30, 40)))
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    la = np.stack([grey, np.full_like(grey, 77)], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    for name in ("p.png", "la.png"):
        img, meta = read_image(tmp_path / name)
        np.testing.assert_array_equal(u8(img), grey)
        write_image(tmp_path / f"out_{name}", img, meta)
        with Image.open(tmp_path / name) as a, Image.open(tmp_path / f"out_{name}") as b:
            assert a.mode == b.mode
            np.testing.assert_array_equal(np.asarray(a.convert("LA")), np.asarray(b.convert("LA")))


def test_nearest_palette_index_picks_the_closest_grey_entry() -> None:
    palette = np.array([0, 100, -1, 50, 200])  # entry 2 is a colour entry: never chosen
    got = nearest_palette_index(np.array([[0, 24, 26, 74, 76, 151, 255]]), palette)
    np.testing.assert_array_equal(got, [[0, 0, 3, 3, 1, 4, 4]])


def test_multipage_pages_come_back_as_the_same_pages_with_their_tags(tmp_path: Path) -> None:
    data = write_multipage(tmp_path / "zeiss.tif", pages=3)
    assert count_pages(tmp_path / "zeiss.tif") == 3 and pixel_count(tmp_path / "zeiss.tif") == 3 * 96 * 128
    pages = list(iter_pages(tmp_path / "zeiss.tif"))
    assert [m.page for _, m in pages] == [0, 1, 2] and all(m.pages == 3 for _, m in pages)
    write_pages(tmp_path / "out.tif", ((1.0 - img, meta) for img, meta in pages))
    with tifffile.TiffFile(tmp_path / "out.tif") as tf:
        assert len(tf.pages) == 3
        for k, p in enumerate(tf.pages):
            np.testing.assert_array_equal(p.asarray(), 255 - data[k])
            assert p.description == f"page {k}" and p.tags[PAGE_TAG].value == f"zeiss {k}"


def test_a_failing_page_leaves_no_output(tmp_path: Path) -> None:
    write_multipage(tmp_path / "m.tif", pages=3)

    def pages():  # type: ignore[no-untyped-def]
        for img, meta in iter_pages(tmp_path / "m.tif"):
            if meta.page == 2:
                raise ValueError("page 2 broke")
            yield img, meta

    with pytest.raises(ValueError, match="page 2 broke"):
        write_pages(tmp_path / "out.tif", pages())
    assert list(tmp_path.iterdir()) == [tmp_path / "m.tif"]


def test_jpeg_is_listed_read_and_written_back_as_jpeg_with_its_own_tables(tmp_path: Path) -> None:
    grey = u8(texture(np.random.default_rng(6), (64, 72)))
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=80, comment=b"tool 1.0")
    (tmp_path / "b.JPEG").write_bytes((tmp_path / "a.jpg").read_bytes())
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.JPEG"]
    img, meta = read_image(tmp_path / "a.jpg")
    assert meta.format == "jpeg" and meta.dtype == "uint8" and img.shape == grey.shape
    write_image(tmp_path / "out" / "a.jpg", img, meta)
    with Image.open(tmp_path / "a.jpg") as a, Image.open(tmp_path / "out" / "a.jpg") as b:
        assert b.format == "JPEG" and b.mode == "L" and b.info.get("comment") == b"tool 1.0"
        assert a.quantization == b.quantization  # no more compression than the input had
        # re-encoding a decoded JPEG with its own tables moves pixels by a few grey levels at most
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 4


@needs_real
def test_real_jpeg_frames_read_with_their_data_bar_found() -> None:
    frames = sorted(REAL_SEM.glob("resist_lines_frame*.jpg"))
    assert len(frames) == 4
    img, meta = read_image(frames[0])
    assert img.shape == (2168, 2048) and meta.dtype == "uint8" and meta.layout == "grey"
    assert detect_data_bar(img) == 120  # the README's 120-row data bar under the 2048 x 2048 image


@needs_real
def test_real_float_tiff_round_trips(tmp_path: Path) -> None:
    src = REAL_SEM / "low_dose_sem_crop.tif"
    img, meta = read_image(src)
    assert img.shape == (600, 600) and meta.dtype == "float32" and 0.0 <= img.min() and img.max() <= 1.0
    write_image(tmp_path / "out.tif", img, meta)
    np.testing.assert_allclose(
        tifffile.imread(tmp_path / "out.tif"), tifffile.imread(src), rtol=1e-5, atol=0.05
    )
