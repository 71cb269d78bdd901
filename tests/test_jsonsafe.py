"""semray.jsonsafe: the one strict-JSON copier (adapt report/card, calibration JSON, app responses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from semray.jsonsafe import json_safe


def test_json_safe_known_values() -> None:
    obj = {
        "nan": math.nan,
        "inf": -math.inf,
        "x": 1.5,
        "np": np.float32(0.25),
        "np_nan": np.float64("nan"),
        "n": np.int64(3),
        "path": Path("/tmp/a.tif"),
        "nested": [(1, math.nan), {"k": math.inf}],
        2: "int key",
        "s": "text",
    }
    out = json_safe(obj)
    assert out == {
        "nan": None,
        "inf": None,
        "x": 1.5,
        "np": 0.25,
        "np_nan": None,
        "n": 3,
        "path": "/tmp/a.tif",
        "nested": [[1, None], {"k": None}],
        "2": "int key",
        "s": "text",
    }
    assert type(out["n"]) is int
    json.dumps(out, allow_nan=False)  # strict JSON
