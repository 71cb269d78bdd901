"""``semray ingest``: user image folders -> shards (data bar, crops, split by source, pairs, Ray == local)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from sem_files import FEI_INI
from sem_files import draw_bar as _draw_bar
from sem_files import texture as _texture

from semray.cli import main
from semray.config.base import ConfigError, load_config
from semray.config.ingest import IngestConfig
from semray.config.noise import NoiseConfig
from semray.databar import detect_data_bar
from semray.ingest import (
    IngestError,
    crop_grid,
    crop_starts,
    ingest,
    register_pair,
    split_for,
)
from semray.io import read_shard
from semray.noise import synthesize
from semray.synth import render_wafer

BAR_ROWS = 16
CROP, STRIDE = 32, 24


def _u8(x: np.ndarray) -> np.ndarray:
    return np.rint(x * 255).astype(np.uint8)


def _u16(x: np.ndarray) -> np.ndarray:
    return np.rint(x * 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A user's folder: good PNG/TIFF of every kind, a multipage stack, a bar, an FEI tag, bad files."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(7)
    (root / "lotA" / "w1").mkdir(parents=True)
    (root / "lotB").mkdir()
    (root / "junk").mkdir()
    expected: dict[str, np.ndarray | list[np.ndarray]] = {}

    def save(rel: str, arr: np.ndarray, float_img: np.ndarray, **kw: object) -> None:
        path = root / rel
        if rel.endswith(".png"):
            Image.fromarray(arr).save(path)
        else:
            tifffile.imwrite(path, arr, **kw)
        expected[rel] = float_img

    a = _texture(rng, (64, 80))
    save("lotA/w1/img8.png", _u8(a), _u8(a) / np.float32(255))
    b = _texture(rng, (64, 80))
    save("lotA/w1/img16.png", _u16(b), _u16(b) / np.float32(65535))
    c = _texture(rng, (64, 80))
    save("lotA/img8.tif", _u8(c), _u8(c) / np.float32(255))
    d = _texture(rng, (64, 80))
    save("lotA/img16.tif", _u16(d), _u16(d) / np.float32(65535))
    e = _texture(rng, (64, 80)) * 3.0 - 1.0  # float outside [0, 1]: mapped by its min/max
    save("lotB/float.tif", e, ((e - e.min()) / (e.max() - e.min())).astype(np.float32))
    f = _texture(rng, (64 + BAR_ROWS, 80))
    f_bar = _draw_bar(_u8(f) / np.float32(255), BAR_ROWS)
    save("lotB/bar.tif", _u8(f_bar), f_bar)
    g = _texture(rng, (64, 80))
    save("lotB/fei.tif", _u8(g), _u8(g) / np.float32(255), extratags=[(34682, "s", 0, FEI_INI, True)])
    pages = [_texture(rng, (64, 80)) for _ in range(3)]
    with tifffile.TiffWriter(root / "lotB" / "stack.tif") as tw:
        for p in pages:
            tw.write(_u16(p), photometric="minisblack")
    expected["lotB/stack.tif"] = [_u16(p) / np.float32(65535) for p in pages]
    h = _texture(rng, (64, 80))
    with tifffile.TiffWriter(root / "lotB" / "thumb.tif") as tw:  # a main image and its thumbnail page
        tw.write(_u8(h), photometric="minisblack")
        tw.write(_u8(h[::4, ::4]), photometric="minisblack", subfiletype=1)
    expected["lotB/thumb.tif"] = _u8(h) / np.float32(255)
    (root / "junk" / "empty.tif").write_bytes(b"")
    (root / "junk" / "notes.tif").write_text("this is not an image\n")
    colour = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # true colour (grey saved as RGB is read)
    Image.fromarray(colour).save(root / "junk" / "rgb.png")
    bad = {"junk/empty.tif": "0 bytes", "junk/notes.tif": "cannot be read", "junk/rgb.png": "true colour"}
    return {"root": root, "expected": expected, "bad": bad}


def _cfg(**kw: object) -> IngestConfig:
    base = {
        "crop_size": CROP,
        "stride": STRIDE,
        "val_fraction": 0.3,
        "test_fraction": 0.3,
        "rows_per_shard": 7,
    }
    return IngestConfig(**{**base, **kw})


def _rows(out: Path) -> dict[str, np.ndarray]:
    """All rows of a shard folder, concatenated in file order."""
    parts = [read_shard(p) for p in sorted(out.glob("*/part-*.parquet"))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def ingested(tree: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("shards")
    summary = ingest(_cfg(), tree["root"], out, parallel=False, progress=False)
    return out, summary


# --------------------------------------------------------------------------------------------------
# The whole tree
# --------------------------------------------------------------------------------------------------


def test_rows_hold_the_source_pixels_and_provenance(tree: dict, ingested: tuple[Path, object]) -> None:
    out, _ = ingested
    rows = _rows(out)
    n = len(rows["image_id"])
    assert len(set(rows["image_id"])) == n
    assert rows["clean"].shape == (n, CROP, CROP) and rows["clean"].dtype == np.float32
    assert rows["defect_mask"].dtype == bool and not rows["defect_mask"].any()
    assert not rows["defect_mask_known"].any()
    assert set(rows["pattern"]) == {"real"} and set(rows["source"]) == {"ingest"}
    assert set(rows["n_defects"]) == {-1}
    assert "reference" not in rows and "noisy" not in rows
    root = tree["root"]
    for i in range(n):
        rel, page = rows["source_path"][i], int(rows["page"][i])
        y, x = int(rows["crop_y"][i]), int(rows["crop_x"][i])
        src = tree["expected"][rel]
        img = src[page] if isinstance(src, list) else src
        np.testing.assert_allclose(rows["clean"][i], img[y : y + CROP, x : x + CROP], atol=1e-6)
        assert rows["source_sha256"][i] == hashlib.sha256((root / rel).read_bytes()).hexdigest()
        assert (int(rows["orig_height"][i]), int(rows["orig_width"][i])) == img.shape
    dtypes = dict(zip(rows["source_path"], rows["orig_dtype"], strict=True))
    assert dtypes["lotA/w1/img8.png"] == "uint8" and dtypes["lotA/w1/img16.png"] == "uint16"
    assert dtypes["lotA/img16.tif"] == "uint16" and dtypes["lotB/float.tif"] == "float32"
    # 64 x 80 at crop 32 / stride 24: rows at 0, 24, 32 (edge-aligned), columns at 0, 24, 48.
    per_image = {(s, int(p)) for s, p in zip(rows["source_path"], rows["page"], strict=True)}
    assert {s for s, _ in per_image} == set(tree["expected"])
    assert {p for s, p in per_image if s == "lotB/stack.tif"} == {0, 1, 2}
    mask = (rows["source_path"] == "lotA/img8.tif") & (rows["page"] == 0)
    assert sorted(zip(rows["crop_y"][mask], rows["crop_x"][mask], strict=True)) == [
        (y, x) for y in (0, 24, 32) for x in (0, 24, 48)
    ]


def test_vendor_tags_are_kept_as_text(ingested: tuple[Path, object]) -> None:
    rows = _rows(ingested[0])
    fei = rows["tiff_tags"][rows["source_path"] == "lotB/fei.tif"][0]
    tag = json.loads(fei)["34682"]
    assert tag["name"] == "FEI_HELIOS" and tag["value"] == FEI_INI
    assert json.loads(rows["tiff_tags"][rows["source_path"] == "lotA/img8.tif"][0]) == {}
    assert set(rows["tiff_description"][rows["source_path"] == "lotA/w1/img8.png"]) == {""}


def test_data_bar_is_cropped_and_reported(ingested: tuple[Path, object]) -> None:
    out, summary = ingested
    rows = _rows(out)
    on_bar = rows["source_path"] == "lotB/bar.tif"
    assert set(rows["cropped_bottom_rows"][on_bar]) == {BAR_ROWS}
    assert set(rows["cropped_bottom_rows"][~on_bar]) == {0}
    # No crop reaches into the bar: every crop ends above the first bar row.
    assert (rows["crop_y"][on_bar] + CROP).max() == 64
    assert summary.databar == {"pages_cropped": 1, "rows": {"lotB/bar.tif#p0": BAR_ROWS}}


def test_split_is_by_source_image(ingested: tuple[Path, object]) -> None:
    out, summary = ingested
    rows = _rows(out)
    splits_of: dict[str, set[str]] = {}
    for s, sp in zip(rows["source_path"], rows["split"], strict=True):
        splits_of.setdefault(s, set()).add(sp)
    assert all(len(v) == 1 for v in splits_of.values()), splits_of
    for s, v in splits_of.items():
        assert v == {split_for(s, 0, 0.3, 0.3)}
    for split in ("train", "val", "test"):
        files = sorted((out / split).glob("part-*.parquet"))
        assert sum(pq.read_metadata(f).num_rows for f in files) == summary.crops[split]
        assert all(set(read_shard(f)["split"]) == {split} for f in files)


def test_summary_accounts_for_every_input(tree: dict, ingested: tuple[Path, object], capsys) -> None:
    out, summary = ingested
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary.as_dict()))
    n_good, n_bad = len(tree["expected"]), len(tree["bad"])
    assert on_disk["files_seen"] == n_good + n_bad
    assert on_disk["files_ok"] == n_good and on_disk["files_skipped"] == n_bad
    # The stack has 3 pages; the thumbnail page of thumb.tif is seen and skipped.
    assert on_disk["pages_seen"] == n_good + 3
    assert on_disk["pages_ok"] == n_good + 2 and on_disk["pages_skipped"] == 1
    files = {s["path"]: s["reason"] for s in on_disk["skipped"] if s["page"] is None}
    pages = {(s["path"], s["page"]): s["reason"] for s in on_disk["skipped"] if s["page"] is not None}
    assert set(files) == set(tree["bad"])
    for path, why in tree["bad"].items():
        assert why in files[path] and path in files[path]
    assert list(pages) == [("lotB/thumb.tif", 1)] and "thumbnail" in pages["lotB/thumb.tif", 1]
    assert {(p["source_path"], p["page"]) for p in on_disk["pages"]} >= {("lotB/stack.tif", 2)}
    assert sum(on_disk["crops"].values()) == len(_rows(out)["image_id"])
    assert sum(on_disk["source_images"].values()) == n_good
    assert (out / "ingest.yaml").is_file()
    print(summary.format())
    text = capsys.readouterr().out
    assert "junk/notes.tif" in text and f"{n_good + n_bad} seen" in text


def test_refuses_to_mix_with_existing_shards(tree: dict, ingested: tuple[Path, object]) -> None:
    with pytest.raises(IngestError, match="already holds"):
        ingest(_cfg(), tree["root"], ingested[0], parallel=False, progress=False)


def test_fixed_bottom_crop_and_whole_images(tree: dict, tmp_path: Path) -> None:
    src = tree["root"] / "lotA"
    cfg = _cfg(crop_size=None, databar={"crop_rows": 10})
    summary = ingest(cfg, src, tmp_path, parallel=False, progress=False)
    rows = read_shard(next(tmp_path.glob("*/part-*.parquet")))
    assert summary.pages_ok == 4 and all(r == 10 for r in summary.databar["rows"].values())
    for img, rel in zip(rows["clean"], rows["source_path"], strict=True):
        np.testing.assert_allclose(img, tree["expected"][f"lotA/{rel}"][:-10], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def _noisy_wafer(pattern: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clean = render_wafer(pattern, shape, rng).clean
    return np.rint(synthesize(clean, NoiseConfig(), rng)[0] * 255) / np.float32(255)


@pytest.mark.parametrize("pattern", ["lines", "contacts", "contacts_staggered", "tin_balls"])
def test_data_bar_detector_finds_drawn_bars_and_nothing_else(pattern: str) -> None:
    for seed in range(3):
        img = _noisy_wafer(pattern, (96, 128), seed)
        assert detect_data_bar(img) == 0
        for level, ink, border in [(0.0, 1.0, True), (1.0, 0.0, False), (0.04, 0.9, True)]:
            assert detect_data_bar(_draw_bar(img, 20, level, ink, border)) == 20


def test_data_bar_detector_ignores_images_without_a_bar() -> None:
    rng = np.random.default_rng(3)
    ramp_x = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (96, 1))
    dark = np.clip(rng.normal(0.05, 0.03, (96, 128)), 0, 1).astype(np.float32)
    for img in (ramp_x, ramp_x.T.copy(), np.zeros((96, 128), np.float32), dark, _texture(rng, (96, 128))):
        assert detect_data_bar(img) == 0
    # A flat black band with no text at all is not a bar either.
    blank = _texture(rng, (96, 128))
    blank[-20:] = 0.0
    assert detect_data_bar(blank) == 0


def test_crop_starts_cover_every_pixel_with_edge_aligned_last_crop() -> None:
    for length in range(8, 90, 7):
        for size in (8, 16, 32):
            for stride in (1, 5, size):
                if size > length:
                    continue
                s = crop_starts(length, size, stride)
                covered = np.zeros(length, bool)
                for a in s:
                    covered[a : a + size] = True
                assert covered.all() and s[0] == 0 and s[-1] == length - size
                assert np.all(np.diff(s) > 0) and np.all(np.diff(s) <= stride)
    assert crop_grid((64, 80), None, None) == [(0, 0, 64, 80)]
    with pytest.raises(ValueError, match="shorter"):
        crop_starts(10, 16, 8)


def test_split_for_is_stable_and_matches_fractions() -> None:
    keys = [f"lot{i // 50}/wafer{i % 50}.tif" for i in range(4000)]
    splits = [split_for(k, 11, 0.15, 0.25) for k in keys]
    assert splits == [split_for(k, 11, 0.15, 0.25) for k in keys]
    frac = {s: splits.count(s) / len(keys) for s in ("train", "val", "test")}
    # Binomial sd at n=4000 is < 0.008; 0.03 is ~4 sd.
    assert abs(frac["val"] - 0.15) < 0.03 and abs(frac["test"] - 0.25) < 0.03
    other = [split_for(k, 12, 0.15, 0.25) for k in keys]
    assert sum(a != b for a, b in zip(splits, other, strict=True)) > 1000  # the seed matters


def _shifted_pair(
    shape: tuple[int, int], shift: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A clean contact-array wafer and a noisy copy moved by ``shift`` px (rows, columns)."""
    rng = np.random.default_rng(seed)
    clean = render_wafer("contacts", shape, rng).clean
    noisy = ndimage.shift(clean, shift, order=3, mode="nearest") + rng.normal(0, 0.05, shape)
    return np.clip(noisy, 0, 1).astype(np.float32), clean


def test_registration_recovers_a_subpixel_shift() -> None:
    true = (1.3, -0.7)
    noisy, clean = _shifted_pair((96, 96), true, seed=5)
    registered, (dy, dx) = register_pair(noisy, clean, upsample_factor=20)
    assert abs(dy + true[0]) < 0.1 and abs(dx + true[1]) < 0.1
    inner = (slice(4, -4), slice(4, -4))
    before = np.abs(noisy - clean)[inner].mean()
    after = np.abs(registered - clean)[inner].mean()
    assert after < 0.7 * before


def test_bounded_registration_keeps_to_its_search_window() -> None:
    """Within the bound it recovers the shift as the unbounded search does; on a periodic pattern the
    answer stays inside the bound, at the nearest copy of the period."""
    true = (1.3, -0.7)
    noisy, clean = _shifted_pair((96, 96), true, seed=5)
    _, (dy, dx) = register_pair(noisy, clean, upsample_factor=20, max_shift_px=4)
    assert abs(dy + true[0]) < 0.1 and abs(dx + true[1]) < 0.1
    # stripes of period 12 along y, the moving copy one period plus 1 px away: every multiple of the
    # period correlates alike, and the bounded search must answer within |shift| <= 3
    y = np.arange(128, dtype=np.float64)[:, None] * np.ones((1, 128))
    ref = 0.5 + 0.4 * np.sin(2 * np.pi * y / 12.0)
    mov = np.roll(ref, 13, axis=0)
    _, (dy, dx) = register_pair(mov.astype(np.float32), ref.astype(np.float32), max_shift_px=3)
    assert abs(dy) <= 3 + 1e-6 and abs(dx) <= 3 + 1e-6
    assert abs(dy - -1.0) < 0.2  # the nearest copy of the period: 13 - 12 = 1 px
    with pytest.raises(ValueError, match="max_shift_px"):
        register_pair(noisy, clean, max_shift_px=-1)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="exceeds 1"):
        load_config(IngestConfig, {"val_fraction": 0.6, "test_fraction": 0.5})
    with pytest.raises(ConfigError, match="crop_size"):
        load_config(IngestConfig, {"crop_size": 4})
    with pytest.raises(ConfigError, match="pair_regex"):
        load_config(IngestConfig, {"pair_regex": "(?P<key>.+)_noisy"})
    with pytest.raises(ConfigError, match="together"):
        load_config(IngestConfig, {"mode": "pairs", "noisy_dir": "a"})
    with pytest.raises(ConfigError, match="need mode: pairs"):
        load_config(IngestConfig, {"noisy_dir": "a", "clean_dir": "b"})


# --------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def pair_tree(tmp_path: Path) -> Path:
    rng = np.random.default_rng(9)
    root = tmp_path / "pairs"
    for sub in ("noisy", "clean"):
        (root / sub / "lot1").mkdir(parents=True)
    noisy, clean = _shifted_pair((72, 72), (1.3, -0.7), seed=9)
    tifffile.imwrite(root / "clean/lot1/a.tif", _u16(clean))
    tifffile.imwrite(root / "noisy/lot1/a.tif", _u16(noisy))
    Image.fromarray(_u8(_texture(rng, (64, 72)))).save(root / "clean/lot1/b.png")
    Image.fromarray(_u8(_texture(rng, (64, 64)))).save(root / "noisy/lot1/b.png")
    Image.fromarray(_u8(_texture(rng, (64, 64)))).save(root / "noisy/lot1/orphan.png")
    return root


def test_pairs_from_two_folders(pair_tree: Path, tmp_path: Path) -> None:
    cfg = _cfg(mode="pairs", noisy_dir="noisy", clean_dir="clean", registration=True, val_fraction=0.0,
               test_fraction=0.0)  # fmt: skip
    summary = ingest(cfg, pair_tree, tmp_path / "out", parallel=False, progress=False)
    assert summary.files_seen == 5 and summary.files_ok == 2 and summary.files_skipped == 3
    reasons = {(s["path"], s["page"]): s["reason"] for s in summary.skipped}
    mismatch = reasons[("clean/lot1/b.png", 0)]
    assert "noisy/lot1/b.png" in mismatch and "clean/lot1/b.png" in mismatch
    assert "64x64" in mismatch and "64x72" in mismatch
    assert "no matching clean image" in reasons[("noisy/lot1/orphan.png", None)]
    rows = _rows(tmp_path / "out")
    assert set(rows["source_path"]) == {"clean/lot1/a.tif"}
    assert set(rows["noisy_source_path"]) == {"noisy/lot1/a.tif"}
    assert rows["noisy"].shape == rows["clean"].shape
    np.testing.assert_allclose(rows["shift_y"], -1.3, atol=0.1)
    np.testing.assert_allclose(rows["shift_x"], 0.7, atol=0.1)
    # The extrapolated border (ceil(1.3) = 2 px) is trimmed before cropping: 68 px left, crops at 2..38.
    assert sorted(set(rows["crop_y"])) == [2, 26, 38]
    assert np.abs(rows["noisy"] - rows["clean"]).mean() < 0.05


def test_pairs_by_naming_rule_in_one_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    src = tmp_path / "mixed"
    src.mkdir()
    clean = _texture(rng, (40, 40))
    tifffile.imwrite(src / "site1_slow.tif", _u8(clean))
    tifffile.imwrite(src / "site1_fast.tif", _u8(np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1)))
    tifffile.imwrite(src / "site2_fast.tif", _u8(clean))
    tifffile.imwrite(src / "README.tif", _u8(clean))
    cfg = _cfg(mode="pairs", pair_regex=r"(?P<key>.+)_(?P<role>fast|slow)", noisy_role="fast",
               clean_role="slow")  # fmt: skip
    summary = ingest(cfg, src, tmp_path / "out", parallel=False, progress=False)
    assert (summary.files_seen, summary.files_ok, summary.files_skipped) == (4, 2, 2)
    rows = _rows(tmp_path / "out")
    assert set(rows["source_path"]) == {"site1_slow.tif"} and set(rows["noisy_source_path"]) == {
        "site1_fast.tif"
    }
    assert set(rows["shift_y"]) == {0.0}  # registration off
    reasons = {s["path"]: s["reason"] for s in summary.skipped}
    assert "pair_regex" in reasons["README.tif"] and "no matching clean" in reasons["site2_fast.tif"]


# --------------------------------------------------------------------------------------------------
# Ray and the command line
# --------------------------------------------------------------------------------------------------


def test_ray_path_equals_local_path(
    tree: dict, ingested: tuple[Path, object], tmp_path: Path, ray_local: None
) -> None:
    out_local, local = ingested
    ray_summary = ingest(_cfg(), tree["root"], tmp_path, parallel=True, progress=False)
    a, b = local.as_dict(), ray_summary.as_dict()
    a.pop("out_dir"), b.pop("out_dir")
    assert a == b
    files = sorted(p.relative_to(out_local) for p in out_local.glob("*/part-*.parquet"))
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/part-*.parquet"))
    for f in files:
        assert pq.read_table(out_local / f).equals(pq.read_table(tmp_path / f))


def test_cli_ingest(tree: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["ingest", str(tree["root"] / "lotA"), "--out", str(out), "--crop-size", "32", "--stride", "24",
            "--no-databar", "--label", "fab7", "--test-fraction", "0.5"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 seen, 4 ok, 0 skipped" in text
    rows = _rows(out)
    assert set(rows["pattern"]) == {"fab7"}
    assert yaml_field(out / "ingest.yaml", "test_fraction") == 0.5
    assert main(argv) == 2  # shards already there
    assert "already holds" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--set", "crop_size=4"]) == 2
    assert "crop_size" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2


def test_cli_pairs_from_two_folders(pair_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli_pairs"
    argv = ["ingest", str(pair_tree), "--out", str(out), "--noisy", "noisy", "--clean", "clean", "--register",
            "--crop-size", "32", "--val-fraction", "0", "--test-fraction", "0"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "(pairs mode)" in text and "pair shape mismatch" in text
    rows = _rows(out)
    np.testing.assert_allclose(rows["shift_x"], 0.7, atol=0.1)


def yaml_field(path: Path, key: str) -> object:
    import yaml

    return yaml.safe_load(path.read_text())[key]


@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.4, -0.3)])
def test_bounded_registration_of_periodic_patterns_at_low_dose(shift: tuple[float, float]) -> None:
    """Contact arrays (straight and staggered) at 5 e-/px, the low-dose chain of benchmarks/adapt.py:
    every copy of the period within the 16-px bound correlates almost alike, and the highest one was
    13-20 px away on most of these pairs; the answer is the smallest shift that the noise cannot
    tell from the highest (384 px: measured errors <= 1.01 px here, 1.5 px allowed)."""
    from bench_modules import load_benchmark

    bench = load_benchmark("frames_registration")
    errors = []
    for seed in range(4):
        for field in bench.dom.render_fields(3, 384 + 2 * bench.PAD, seed=200 + seed)[1:]:
            ref, mov = bench.make_pair(field.content, shift, 5.0, 384, np.random.default_rng([seed, 7]))
            _, (dy, dx) = register_pair(mov, ref, max_shift_px=16)
            errors.append(float(np.hypot(dy + shift[0], dx + shift[1])))
    assert max(errors) < 1.5, errors
