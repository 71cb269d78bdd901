"""Record the golden figures that ``tests/test_golden.py`` checks (issue 23: behaviour unchanged).

Run from the project root only when a change of behaviour is intended, and say so in the commit:

    python scripts/make_golden.py            # rewrites tests/golden/golden.json

What it pins, for a fixed seed: the content of every column of a synthesised shard set, the noisy
images and sampled physical parameters of the noise stage, the shipped model's denoised output (one
image smaller than a tile, so tile layout does not enter), and the numbers of a tiny evaluation
(shipped model, one classical method, SEM doses and one Gaussian condition; timings excluded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from golden_figures import compute_golden  # noqa: E402

if __name__ == "__main__":
    out = ROOT / "tests" / "golden" / "golden.json"
    out.write_text(
        json.dumps(compute_golden(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=1) + "\n"
    )
    print(f"wrote {out}")
