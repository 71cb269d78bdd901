"""Golden test (issue 23): restructuring changes no behaviour.

``tests/golden/golden.json`` was recorded by ``scripts/make_golden.py`` before the restructuring; the same
seeds must give byte-identical shard columns and noise-stage outputs, bit-identical denoised output of
the shipped model, and identical evaluation numbers. Re-record it only for an intended change of
behaviour, and say so in the commit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from golden_figures import denoise_figures, evaluation_figures, shard_figures

GOLDEN = json.loads((Path(__file__).parent / "golden" / "golden.json").read_text())


def test_shards_and_noise_stage_are_byte_identical(tmp_path: Path) -> None:
    got = shard_figures(tmp_path)
    assert sorted(got) == sorted(GOLDEN["shards"])
    for key, cols in GOLDEN["shards"].items():
        assert got[key] == cols, f"{key}: columns changed: {[c for c in cols if got[key].get(c) != cols[c]]}"


def test_shipped_model_output_is_bit_identical() -> None:
    assert denoise_figures() == GOLDEN["denoise"]


def test_evaluation_numbers_are_identical(tmp_path: Path) -> None:
    got = evaluation_figures(tmp_path)
    assert got["rows"] == GOLDEN["evaluation"]["rows"]
    assert len(got["means"]) == len(GOLDEN["evaluation"]["means"])
    for g, want in zip(got["means"], GOLDEN["evaluation"]["means"], strict=True):
        for k, v in want.items():
            if isinstance(v, str):
                assert g[k] == v
            elif math.isnan(v):
                assert math.isnan(g[k]), (want, k)
            else:
                assert g[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (want, k, g[k])
