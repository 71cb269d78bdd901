"""benchmarks/real_sem.py: the scored windows, and on the real resist frames the leave-one-out reference
whose noise (from registered frame differences) predicts how the noisy frame itself scores against it."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import load_benchmark
from sem_files import REAL_SEM


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("real_sem")


def test_scored_region_is_the_crop_less_its_margin_inside_the_overlap(bench) -> None:
    win = bench.centre_window((2048, 2040), 1024)
    assert win == (512, 508, 1024, 1024)
    cy, cx, ry, rx = bench.score_window((2048, 2040), win, m=11, margin=16)
    assert (cy, cx) == (slice(16, 1008), slice(16, 1008))
    assert (ry, rx) == (slice(517, 1509), slice(513, 1505))  # full-frame 528.. less the trim of 11
    # the whole frame: the overlap [m, H - m) binds, not the margin
    whole = bench.centre_window((300, 200), 0)
    assert whole == (0, 0, 300, 200)
    cy, cx, ry, rx = bench.score_window((300, 200), whole, m=20, margin=4)
    assert (cy, cx, ry, rx) == (slice(20, 280), slice(20, 180), slice(0, 260), slice(0, 160))
    with pytest.raises(ValueError, match="too small"):
        bench.score_window((300, 200), bench.centre_window((300, 200), 30), m=12, margin=8)


@pytest.mark.skipif(not REAL_SEM.is_dir(), reason=f"real SEM images not found at {REAL_SEM}")
def test_real_frames_noise_predicts_the_noisy_frames_score_against_the_reference(bench) -> None:
    """On 512 x 512 of the real frames (a line end, so both shifts are pinned down): the frame noise is
    the README's ~3 DN, and frame 1 scores against the average of the others what that noise predicts."""
    from semray.metrics import affine_psnr

    _, frames, bars = bench.read_frames(REAL_SEM)
    assert bars == [120] * 4 and frames[0].shape == (2048, 2048)
    frames = [f[256:768, 768:1280] for f in frames]
    frame_k, ref, others, (shifts, m) = bench.loo_reference(frames, 0)
    assert len(shifts) == 3 and max(abs(s) for sh in shifts for s in sh) <= 12 and ref.shape == frame_k.shape
    b = bench.bounds(frame_k, others)
    assert 2.0 < b["frame_noise_std_dn"] < 5.0 and 2.0 < b["heldout_noise_std_dn"] < 5.0
    assert b["reference_noise_var"] == pytest.approx(b["frame_noise_var"] / 3)
    noisy = affine_psnr(ref, frame_k)[0]
    assert noisy == pytest.approx(b["noisy_frame_psnr_expected"], abs=0.5)
    assert b["perfect_denoiser_psnr"] > noisy + 4
    assert np.array_equal(frame_k, frames[0][m:-m, m:-m])  # frame k itself is not resampled
