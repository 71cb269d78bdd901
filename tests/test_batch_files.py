"""`semray denoise` on files as tools write them: grey saved as RGB, multipage stacks, palettes, JPEG, data
bars; pages in = pages out and files in = manifest rows for any tree; in process or on Ray, the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from sem_files import (
    PAGE_TAG,
    texture,
    u8,
    write_bar_image,
    write_fei_rgb,
    write_multipage,
    write_palette,
    write_true_colour,
)

from semray.batch import MANIFEST_FILE, choose_executor, plan_inputs, read_manifest, run_denoise_job
from semray.cli import main
from semray.config.infer import InferConfig
from semray.io import count_pages

#: Columns that differ between two runs of the same job (who ran it, when, how long).
VOLATILE = ["worker", "runtime_s", "finished_at"]


def _tree(root: Path) -> dict[str, np.ndarray]:
    """One of each real-file case under ``root``; returns the pixels of those a test inspects."""
    (root / "L1" / "W1").mkdir(parents=True)
    (root / "L2").mkdir()
    data = {
        "L1/W1/quanta.tif": write_fei_rgb(root / "L1/W1/quanta.tif"),
        "L1/W1/zeiss.tif": write_multipage(root / "L1/W1/zeiss.tif", pages=2),
        "L1/pal.tif": write_palette(root / "L1/pal.tif"),
        "L2/bar.tif": write_bar_image(root / "L2/bar.tif", bar_rows=24),
    }
    write_palette(root / "L2/colour_palette.tif", grey=False)
    write_true_colour(root / "L2/colour.tif")
    Image.fromarray(u8(texture(np.random.default_rng(1), (64, 64)))).save(root / "L2/tool.jpg", quality=90)
    return data


def _cli(*args: object) -> int:
    return main(["denoise", *[str(a) for a in args], "--no-progress", "--no-track"])


def test_every_file_comes_back_in_its_own_layout_with_pages_and_bars(tmp_path: Path) -> None:
    data = _tree(tmp_path / "in")
    assert _cli(tmp_path / "in", tmp_path / "out", "--method", "gaussian") == 1  # two colour files fail
    rows = read_manifest(tmp_path / "out" / MANIFEST_FILE).set_index("rel_path")
    assert "true colour" in rows.loc["L2/colour.tif", "error"]
    assert "colour palette" in rows.loc["L2/colour_palette.tif", "error"]
    ok = rows[rows["status"] == "ok"]
    assert sorted(ok.index) == [
        "L1/W1/quanta.tif",
        "L1/W1/zeiss.tif",
        "L1/pal.tif",
        "L2/bar.tif",
        "L2/tool.jpg",
    ]
    assert dict(ok["layout"]) == {
        "L1/W1/quanta.tif": "rgb",
        "L1/W1/zeiss.tif": "grey",
        "L1/pal.tif": "palette",
        "L2/bar.tif": "grey",
        "L2/tool.jpg": "grey",
    }
    assert dict(ok["pages"]) == dict.fromkeys(ok.index, 1) | {"L1/W1/zeiss.tif": 2}
    # the FEI file: 3 channels, its border and its 29-row data bar byte for byte, the image denoised
    rgb, out = data["L1/W1/quanta.tif"], tifffile.imread(tmp_path / "out/L1/W1/quanta.tif")
    assert list(rows.loc["L1/W1/quanta.tif", "bar_rows"]) == [29]
    assert out.shape == rgb.shape and out.dtype == rgb.dtype
    np.testing.assert_array_equal(out[-29:], rgb[-29:])
    np.testing.assert_array_equal(out[0], rgb[0])
    assert not np.array_equal(out[1:-29, 1:-1], rgb[1:-29, 1:-1])
    assert (out[1:-1, 1:-1, 0] == out[1:-1, 1:-1, 2]).all()
    # the uint16 bar image: its bar found and kept, the image above denoised
    bar, out = data["L2/bar.tif"], tifffile.imread(tmp_path / "out/L2/bar.tif")
    assert list(rows.loc["L2/bar.tif", "bar_rows"]) == [24]
    np.testing.assert_array_equal(out[-24:], bar[-24:])
    assert not np.array_equal(out[:-24], bar[:-24])
    # the stack: both pages, each with its own tags
    with tifffile.TiffFile(tmp_path / "out/L1/W1/zeiss.tif") as tf:
        assert [p.description for p in tf.pages] == ["page 0", "page 1"]
        assert [p.tags[PAGE_TAG].value for p in tf.pages] == ["zeiss 0", "zeiss 1"]
    with Image.open(tmp_path / "out/L2/tool.jpg") as im:
        assert im.format == "JPEG" and im.size == (64, 64)


def test_keep_bottom_rows_zero_disables_and_an_int_still_works(tmp_path: Path) -> None:
    bar = write_bar_image(tmp_path / "bar.tif", bar_rows=24)
    for flag, kept in (("0", 0), ("10", 10), ("auto", 24)):
        out = tmp_path / f"o{flag}.tif"
        assert _cli(tmp_path / "bar.tif", out, "--method", "gaussian", "--keep-bottom-rows", flag) == 0
        got = tifffile.imread(out)
        h = got.shape[0]
        np.testing.assert_array_equal(got[h - kept :], bar[h - kept :])  # kept rows: byte for byte
        assert not np.array_equal(got[: h - 24], bar[: h - 24])  # the image is denoised
        if kept < 24:  # bar rows not kept are smoothed like the image (its text blurs)
            assert not np.array_equal(got[h - 24 : h - kept], bar[h - 24 : h - kept])
    with pytest.raises(SystemExit) as exc:
        _cli(tmp_path / "bar.tif", tmp_path / "x.tif", "--keep-bottom-rows", "some")
    assert exc.value.code == 2


def test_a_failing_page_fails_the_file_with_its_page_number(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with tifffile.TiffWriter(tmp_path / "in/stack.tif") as tw:
        tw.write(np.full((64, 64), 100, np.uint8))
        tw.write(np.full((4, 4), 100, np.uint8))  # too small for min_side=8
    cfg = InferConfig(method="gaussian", min_side=8, track=False, keep_bottom_rows=0)
    s = run_denoise_job(tmp_path / "in", tmp_path / "out", cfg, progress=False)
    row = s.rows.iloc[0]
    assert row["status"] == "failed" and "page 1 of 2" in row["error"] and "min_side=8" in row["error"]
    assert row["pages"] == 2 and not (tmp_path / "out/stack.tif").exists()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconciliation_pages_in_equal_pages_out_and_files_equal_rows(tmp_path: Path, seed: int) -> None:
    """Any tree: one manifest row per input file; every ok file written with exactly its pages."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "in"
    n_files = int(rng.integers(3, 9))
    for i in range(n_files):
        p = root / f"L{rng.integers(0, 3)}" / f"W{rng.integers(0, 2)}" / f"f{i}.tif"
        p.parent.mkdir(parents=True, exist_ok=True)
        kind = rng.integers(0, 4)
        if kind == 0:
            write_multipage(p, pages=int(rng.integers(1, 5)), shape=(int(rng.integers(16, 48)), 40))
        elif kind == 1:
            write_fei_rgb(p, bar_rows=20, shape=(int(rng.integers(120, 160)), 64))
        elif kind == 2:
            p.write_bytes(b"broken")
        else:
            write_palette(p.with_suffix(".tif"), grey=bool(rng.integers(0, 2)))
    s = run_denoise_job(root, tmp_path / "out", InferConfig(method="median", track=False), progress=False)
    items, _ = plan_inputs(root, tmp_path / "out")
    assert sorted(s.rows["rel_path"]) == sorted(i.rel_path for i in items)  # files in = rows
    for _, r in s.rows.iterrows():
        out = tmp_path / "out" / r["rel_path"]
        if r["status"] == "ok":
            assert r["pages"] == count_pages(root / r["rel_path"]) == count_pages(out) == len(r["bar_rows"])
        else:
            assert r["error"] and not out.exists()
    assert s.extra["pages"] == int(s.rows.loc[s.rows["status"] == "ok", "pages"].sum()) + int(
        s.rows.loc[s.rows["status"] != "ok", "pages"].fillna(0).sum()
    )


def test_small_jobs_run_in_process_and_large_ones_on_ray(tmp_path: Path) -> None:
    write_multipage(tmp_path / "a.tif", pages=3, shape=(100, 100))  # 0.03 MP
    write_multipage(tmp_path / "b.tif", pages=1, shape=(100, 100))
    items, _ = plan_inputs(tmp_path, tmp_path / "out")
    assert choose_executor(InferConfig(), items, single=False) == "local"
    assert choose_executor(InferConfig(local_max_megapixels=0.035), items, single=False) == "ray"
    assert choose_executor(InferConfig(local_max_megapixels=0.04), items, single=False) == "local"
    assert choose_executor(InferConfig(executor="ray"), items, single=False) == "ray"
    assert choose_executor(InferConfig(executor="ray"), items[:1], single=True) == "local"
    assert choose_executor(InferConfig(executor="ray", num_actors=0), items, single=False) == "local"


@pytest.mark.ray
def test_ray_actors_write_the_same_outputs_and_manifest_as_in_process(
    ray_local: None, tmp_path: Path
) -> None:
    _tree(tmp_path / "in")
    cfg = InferConfig(method="gaussian", track=False, num_actors=2)
    here = run_denoise_job(tmp_path / "in", tmp_path / "local", cfg.model_copy(update={"executor": "local"}))
    ray = run_denoise_job(tmp_path / "in", tmp_path / "ray", cfg.model_copy(update={"executor": "ray"}))
    assert here.extra["executor"] == "local" and ray.extra["executor"] == "ray"
    a, b = (s.rows.drop(columns=VOLATILE) for s in (here, ray))
    assert a.astype(str).equals(b.astype(str))
