"""Image-quality and defect-aware metrics for denoised SEM images.

NumPy functions take ``(H, W)`` float images in [0, 1] (``data_range = 1``) and return Python floats;
the ``*_torch`` functions take ``(N, C, H, W)`` tensors and return one value per image, for fast
validation inside a training loop. Both families share the same SSIM definition (Gaussian window,
sigma 1.5, K = (0.01, 0.03), 'valid' filtering, as in Wang et al. and ``pytorch_msssim``), which
agrees with ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)``.

PSNR and SSIM average over the whole image, where background dominates; a denoiser can score well on
them and still erase a 3-pixel defect. The defect-aware metrics (``defect_contrast``,
``defect_recall``) look only at the pixels the synthetic ``defect_mask`` marks, using the defect-free
``reference`` render of the same field where one exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pytorch_msssim import ssim as _pm_ssim
from pytorch_msssim.ssim import _ssim
from scipy import ndimage as ndi
from scipy.special import ndtr, ndtri
from skimage.feature import canny
from skimage.segmentation import expand_labels
from torch import Tensor
from torch.nn import functional as F

from semray.config.loss import MS_SSIM_WEIGHTS

#: PSNR is capped here (dB) so identical images give a finite value that can be averaged.
PSNR_MAX_DB = 100.0

# Fixed parameters of the defect detector (see `defect_recall`): they are part of the metric's
# definition, so changing them changes every recorded number.
DETECT_SIGMA_PX = 1.0  # pre-smoothing of the difference image: averages white noise down ~3.5x
DETECT_REL_THRESHOLD = 0.5  # fraction of the clean defect's own signature peak that must survive
DETECT_NOISE_K = 4.0  # the threshold is never below this many robust noise sigmas of the residual
DETECT_BACKGROUND_SIGMA_PX = 5.0  # no-reference fallback: local background = Gaussian of this sigma
MIN_DEFECT_SIGNATURE = 0.02  # instances fainter than this in the clean image are not measurable
CONTRAST_CLIP = (0.0, 1.5)
RING_WIDTH_PX = 3  # no-reference contrast: ring from 2 to 2 + RING_WIDTH_PX px around the defect
DEFECT_REGION_PX = 3  # defect_psnr: the mask grown by this many px (the defect's edges and halo)


# --------------------------------------------------------------------------------------------- torch
def _check_batch(pred: Tensor, target: Tensor) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"expected tensors, got {type(pred).__name__} and {type(target).__name__}")
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(
            f"expected two (N, C, H, W) tensors of the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"inputs on different devices: {pred.device} and {target.device}")


def _gauss_window(win_size: int, win_sigma: float, channels: int, dtype: torch.dtype) -> Tensor:
    """pytorch_msssim's 1-D Gaussian window, ``(channels, 1, 1, win_size)``, normalised in ``dtype``.

    Built in float64 (pytorch_msssim builds it in float32): in float64 inputs a window summing to
    ``1 +- 6e-8`` leaves variance errors of that size on flat regions, which the SSIM constant
    ``C2 = 9e-4`` turns into ~1e-5 errors.
    """
    coords = torch.arange(win_size, dtype=torch.float64) - win_size // 2
    g = torch.exp(-(coords**2) / (2 * win_sigma**2))
    g = (g / g.sum()).to(dtype)
    return g.reshape(1, 1, 1, -1).repeat(channels, 1, 1, 1)


def psnr_torch(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, ``(N, C, H, W) x 2 -> (N,)``, capped at :data:`PSNR_MAX_DB`."""
    _check_batch(pred, target)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-PSNR_MAX_DB / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def ssim_torch(
    pred: Tensor, target: Tensor, data_range: float = 1.0, win_size: int = 11, win_sigma: float = 1.5
) -> Tensor:
    """Per-image SSIM, ``(N, C, H, W) x 2 -> (N,)`` (mean over channels), Gaussian window.

    Needs ``H, W >= win_size``; the SSIM map is computed on 'valid' window positions only.
    """
    _check_batch(pred, target)
    if min(pred.shape[-2:]) < win_size:
        raise ValueError(f"SSIM with win_size={win_size} needs images at least {win_size} px per side")
    win = _gauss_window(win_size, win_sigma, pred.shape[1], pred.dtype)
    return _pm_ssim(pred, target, data_range=data_range, size_average=False, win=win)


def smooth_floor(x: Tensor, floor: float) -> Tensor:
    """A smooth lower bound: ``x`` itself (exactly) from ``2 * floor`` up; below, with
    ``t = 2 * floor - x``, ``floor + floor / (1 + t / floor)``, which meets ``x`` with the same value
    and slope at ``2 * floor`` and tends to ``floor`` as ``x -> -inf``.

    Its derivative ``1 / (1 + t / floor) ** 2`` lies in (0, 1] and falls off only as ``1 / t ** 2``, so
    it is finite everywhere and not 0 in floating point for any term an MS-SSIM can produce (>= -1):
    a term that went negative still gets a gradient pushing it back up, and ``f(x) ** w``
    (``0 < w < 1``) has a derivative of at most ``w * floor ** (w - 1)`` because ``f >= floor``.
    """
    t = (2.0 * floor - x).clamp_min(0.0)  # 0 on the identity side, so that branch stays finite
    return torch.where(x >= 2.0 * floor, x, floor + floor / (1.0 + t / floor))


def ms_ssim_min_side(scales: int, win_size: int) -> int:
    """Smallest image side (px) for which every one of ``scales`` scales is at least ``win_size``."""
    return win_size * 2 ** (scales - 1) - (2 ** (scales - 1) - 1)


def ms_ssim_torch(
    pred: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    win_size: int = 11,
    win_sigma: float = 1.5,
    floor: float = 1e-3,
) -> Tensor:
    """Per-image multi-scale SSIM, ``(N, C, H, W) x 2 -> (N,)``, one scale per entry of ``weights``.

    ``MS-SSIM = prod_j cs_j ** w_j`` for the contrast-structure term at each of the first ``L - 1``
    scales and the full SSIM at the coarsest, with 2x average pooling between scales. Weights are
    renormalised to sum to 1 so fewer scales keep the [0, 1] range. Each scale's SSIM/CS comes from
    ``pytorch_msssim`` itself; the loop is ours because ``pytorch_msssim.ms_ssim`` asserts
    ``min side > (win_size - 1) * 16`` whatever the number of scales, which would force a 3-px window on
    64 x 64 crops. Here the only requirement is that the coarsest scale is at least ``win_size`` px,
    i.e. ``min side >= ms_ssim_min_side(len(weights), win_size)``. Terms pass through
    :func:`smooth_floor` rather than a ReLU (as pytorch_msssim does) or a hard clamp: ``relu(x) ** w``
    has an infinite derivative at 0 (NaN gradients early in training), and ``clamp_min(1e-6) ** w`` a
    zero gradient for a term <= 0 and a derivative of ~2.4e4 just above the clamp. Terms from
    ``2 * floor`` up are used exactly as they are.
    """
    _check_batch(pred, target)
    w = torch.as_tensor(list(weights), dtype=pred.dtype, device=pred.device)
    if w.ndim != 1 or len(w) == 0 or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"MS-SSIM weights must be a non-empty list of non-negative numbers, got {weights}")
    w = w / w.sum()
    need = ms_ssim_min_side(len(w), win_size)
    if min(pred.shape[-2:]) < need:
        raise ValueError(
            f"MS-SSIM with {len(w)} scales and win_size={win_size} needs images at least {need} px per "
            f"side, got {tuple(pred.shape[-2:])}; use fewer scales or a smaller window"
        )
    win = _gauss_window(win_size, win_sigma, pred.shape[1], pred.dtype)
    x, y = pred, target
    terms = []
    for level in range(len(w)):
        ssim_val, cs = _ssim(x, y, data_range=data_range, win=win, size_average=False, K=(0.01, 0.03))
        if level < len(w) - 1:
            terms.append(cs)
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    terms.append(ssim_val)
    stacked = smooth_floor(torch.stack(terms, dim=0), floor)  # (L, N, C)
    return torch.prod(stacked ** w.view(-1, 1, 1), dim=0).mean(1)


# --------------------------------------------------------------------------------------------- numpy
def _check_pair(
    clean: np.ndarray, other: np.ndarray, name: str = "denoised"
) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(clean, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"expected clean and {name} as (H, W) images of the same shape, got {a.shape}, {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("images contain NaN or inf")
    return a, b


def _to_tensor(img: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float64))[None, None]


def psnr(clean: np.ndarray, denoised: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for ``(H, W)`` images in [0, 1], capped at :data:`PSNR_MAX_DB`."""
    a, b = _check_pair(clean, denoised)
    mse = float(np.mean((a - b) ** 2))
    return float(10 * math.log10(1.0 / max(mse, 10 ** (-PSNR_MAX_DB / 10))))


def affine_psnr(reference: np.ndarray, output: np.ndarray) -> tuple[float, float, float]:
    """PSNR of ``output`` against ``reference`` after the best gain and offset: ``(psnr_db, a, b)``.

    ``reference ~ a * output + b`` is fitted by least squares over all pixels (float64), then
    :func:`psnr` of ``reference`` against ``a * output + b`` (data range 1, not clipped). For real
    images scored against a frame average, where a denoiser and the average may differ in brightness
    and contrast (charging, detector drift between scans) and plain PSNR would score that difference.
    A constant ``output`` gets ``a = 0`` and ``b = mean(reference)``.

    Args:
        reference, output: ``(H, W)`` float images of one shape, nominally in [0, 1].
    """
    ref, out = _check_pair(reference, output, "output")
    d = out - out.mean()
    var = float(np.mean(d * d))
    a = float(np.mean(d * (ref - ref.mean()))) / var if np.ptp(out) > 0 else 0.0
    b = float(ref.mean()) - a * float(out.mean())
    return psnr(ref, a * out + b), a, b


def frame_pair_noise_variance(frames: Sequence[np.ndarray]) -> float:
    """Per-frame noise variance of registered repeated scans: the mean over pairs of ``var(f_i - f_j) / 2``.

    The signal cancels in each difference and independent noise adds, so this is the frames' mean
    noise variance; misregistration and changes of the specimen between scans count as noise too.

    Args:
        frames: two or more ``(H, W)`` float images of one shape, registered onto each other.
    """
    if len(frames) < 2:
        raise ValueError(f"frame_pair_noise_variance needs at least two frames, got {len(frames)}")
    arrs = [_check_pair(frames[0], f, "frame")[1] for f in frames]
    pairs = [(i, j) for i in range(len(arrs)) for j in range(i + 1, len(arrs))]
    return float(np.mean([np.var(arrs[i] - arrs[j]) / 2.0 for i, j in pairs]))


def noisy_reference_psnr_bound(frame_noise_var: float, n_averaged: int) -> float:
    """The PSNR (dB, data range 1) that a perfect denoiser gets against an ``n_averaged``-frame average.

    The average still carries noise of variance ``frame_noise_var / n_averaged``, independent of the
    scored frame's, so even the clean image is that far from it: ``10 log10(n / frame_noise_var)``.
    """
    if frame_noise_var <= 0 or n_averaged < 1:
        raise ValueError(f"need frame_noise_var > 0 and n_averaged >= 1, got {frame_noise_var}, {n_averaged}")
    return float(10 * math.log10(n_averaged / frame_noise_var))


def clean_psnr_estimate(psnr_vs_reference: float, reference_noise_var: float) -> float:
    """PSNR against the clean image implied by a PSNR against a noisy reference (dB, data range 1).

    The reference's noise is independent of the output's error, so its variance adds to the mean
    squared error: ``mse_clean = 10**(-psnr / 10) - reference_noise_var``. NaN when that is not positive
    (the output is within the reference's noise of it, so the estimate says nothing).
    """
    mse_clean = 10 ** (-psnr_vs_reference / 10) - reference_noise_var
    return float(10 * math.log10(1.0 / mse_clean)) if mse_clean > 0 else float("nan")


def ssim(clean: np.ndarray, denoised: np.ndarray, win_size: int = 11) -> float:
    """Structural similarity of two ``(H, W)`` images in [0, 1]; Gaussian window sigma 1.5, in [-1, 1]."""
    a, b = _check_pair(clean, denoised)
    return float(ssim_torch(_to_tensor(b), _to_tensor(a), win_size=win_size)[0])


def ms_ssim(clean: np.ndarray, denoised: np.ndarray, win_size: int = 11, max_scales: int = 5) -> float:
    """Multi-scale SSIM of two ``(H, W)`` images in [0, 1], in [0, 1].

    Uses the standard five scales and weights where the image is large enough (min side >= 161 px for
    an 11-px window) and otherwise the largest number of scales that fits, with the standard weights
    truncated and renormalised, so compare values only between images of similar size.
    """
    a, b = _check_pair(clean, denoised)
    scales = max_scales
    while scales > 1 and min(a.shape) < ms_ssim_min_side(scales, win_size):
        scales -= 1
    weights = MS_SSIM_WEIGHTS[:scales]
    return float(ms_ssim_torch(_to_tensor(b), _to_tensor(a), weights=weights, win_size=win_size)[0])


def _edge_maps(a: np.ndarray, b: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    smoothed = ndi.gaussian_filter(a, sigma, mode="nearest")
    peak = float(np.hypot(ndi.sobel(smoothed, 0), ndi.sobel(smoothed, 1)).max())
    if peak < 1e-6:
        return np.zeros(a.shape, bool), canny(b, sigma=sigma, low_threshold=1e-3, high_threshold=2e-3)
    # thresholds follow the clean image's strongest edge, so the same structures count as edges in
    # both images whatever the pattern contrast; noise that survives denoising adds spurious edges
    low, high = 0.1 * peak, 0.2 * peak
    kwargs = {"sigma": sigma, "low_threshold": low, "high_threshold": high, "mode": "nearest"}
    return canny(a, **kwargs), canny(b, **kwargs)


def edge_preservation(
    clean: np.ndarray, denoised: np.ndarray, sigma: float = 1.0, tolerance_px: int = 1
) -> float:
    """F1 score of the denoised image's Canny edges against the clean image's, in [0, 1].

    Both edge maps come from ``skimage.feature.canny`` with the same smoothing ``sigma`` (px) and the
    same hysteresis thresholds (10 % and 20 % of the clean image's strongest smoothed Sobel gradient).
    An edge pixel matches when the other map has an edge within ``tolerance_px`` (chessboard
    distance). Precision falls when residual noise or artefacts create edges, recall when edges are
    broken or erased. 1.0 when both maps are empty.
    """
    a, b = _check_pair(clean, denoised)
    ea, eb = _edge_maps(a, b, sigma)
    if not ea.any() and not eb.any():
        return 1.0
    grow = np.ones((2 * tolerance_px + 1,) * 2, bool)
    precision = float((eb & ndi.binary_dilation(ea, grow)).sum()) / max(int(eb.sum()), 1)
    recall = float((ea & ndi.binary_dilation(eb, grow)).sum()) / max(int(ea.sum()), 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def gradient_correlation(clean: np.ndarray, denoised: np.ndarray) -> float:
    """Pearson correlation of the two images' Sobel gradient magnitudes, in [-1, 1].

    Smeared edges (lower, wider gradient ridges) and residual noise (gradient everywhere) both lower
    it. NaN when the clean image is flat.
    """
    a, b = _check_pair(clean, denoised)
    ga = np.hypot(ndi.sobel(a, 0), ndi.sobel(a, 1)).ravel()
    gb = np.hypot(ndi.sobel(b, 0), ndi.sobel(b, 1)).ravel()
    if ga.std() < 1e-12 or gb.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(ga, gb)[0, 1])


# ----------------------------------------------------------------------------------- defect-aware
def _label_defects(defect_mask: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    mask = np.asarray(defect_mask)
    if mask.shape != shape:
        raise ValueError(f"defect_mask shape {mask.shape} does not match image shape {shape}")
    labels, n = ndi.label(mask.astype(bool), structure=np.ones((3, 3), bool))  # 8-connected instances
    return labels, int(n)


def _signature(img: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """What the detector sees: smoothed difference from the reference, or a local anomaly score."""
    if reference is not None:
        return ndi.gaussian_filter(img - reference, DETECT_SIGMA_PX, mode="nearest")
    return ndi.gaussian_filter(img, DETECT_SIGMA_PX, mode="nearest") - ndi.gaussian_filter(
        img, DETECT_BACKGROUND_SIGMA_PX, mode="nearest"
    )


def _check_reference(reference: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if reference is None:
        return None
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != shape:
        raise ValueError(f"reference shape {ref.shape} does not match image shape {shape}")
    return ref


def _require_reference(reference: np.ndarray | None, shape: tuple[int, ...], caller: str) -> np.ndarray:
    """:func:`_check_reference` for the metrics that cannot do without the defect-free render."""
    ref = _check_reference(reference, shape)
    if ref is None:
        raise ValueError(f"{caller} needs the defect-free reference image")
    return ref


def _check_noise_var(noise_var: np.ndarray | float, shape: tuple[int, ...]) -> np.ndarray:
    """``noise_var`` (scalar or ``shape``) as a float64 view of ``shape``, checked positive and finite."""
    var = np.broadcast_to(np.asarray(noise_var, dtype=np.float64), shape)
    if not (np.all(np.isfinite(var)) and np.all(var > 0)):
        raise ValueError("noise_var must be positive and finite everywhere")
    return var


def defect_contrast(
    clean: np.ndarray,
    denoised: np.ndarray,
    defect_mask: np.ndarray,
    reference: np.ndarray | None = None,
) -> float:
    """Fraction of each defect's local contrast the denoised image retains, averaged over defects.

    Each 8-connected component of ``defect_mask`` (bool ``(H, W)``) is one defect; its support is the
    component grown by 2 px so the defect's soft rim counts too.

    With ``reference`` (the defect-free render of the same field, float ``(H, W)``): the defect's
    signature is ``s = clean - reference`` on its support and the retained fraction is the
    least-squares gain of the denoised image's signature onto it,
    ``sum((denoised - reference) * s) / sum(s ** 2)``: 1 when kept exactly, 0 when the denoiser
    replaced the defect by the defect-free pattern, and zero-mean residual noise averages out.

    Without ``reference`` (fallback): contrast is ``mean(inside) - mean(ring)`` with the ring
    2..5 px around the component (other defects excluded), and the fraction is the denoised
    contrast over the clean one, signed, so contrast of the wrong polarity counts as 0. This is
    weaker on dense patterns, where the ring mixes pattern structure into the contrast.

    Per-defect fractions are clipped to [0, 1.5] and averaged; defects whose clean signature is below
    :data:`MIN_DEFECT_SIGNATURE` (invisible even without noise) are skipped. NaN when no defect is
    measurable.
    """
    a, b = _check_pair(clean, denoised)
    ref = _check_reference(reference, a.shape)
    labels, n = _label_defects(defect_mask, a.shape)
    if n == 0:
        return float("nan")
    index = np.arange(1, n + 1)
    if ref is not None:
        support = expand_labels(labels, 2)
        s_clean, s_den = a - ref, b - ref
        energy = ndi.sum_labels(s_clean**2, support, index)
        gain = ndi.sum_labels(s_den * s_clean, support, index) / np.maximum(energy, 1e-12)
        peak = ndi.maximum(np.abs(s_clean), support, index)
        ratios = gain[peak >= MIN_DEFECT_SIGNATURE]
    else:
        inner = labels
        outer = expand_labels(labels, 2 + RING_WIDTH_PX)
        ring = np.where((expand_labels(labels, 2) == 0) & (labels == 0), outer, 0)

        def contrast(img: np.ndarray) -> np.ndarray:
            return np.asarray(ndi.mean(img, inner, index)) - np.asarray(ndi.mean(img, ring, index))

        # signed: the denoised contrast counts only with the clean defect's polarity, so a bright
        # particle turned into a dark smear scores 0 (after clipping), not its absolute contrast
        c_clean, c_den = contrast(a), contrast(b)
        ok = (np.abs(c_clean) >= MIN_DEFECT_SIGNATURE) & np.isfinite(c_clean) & np.isfinite(c_den)
        ratios = c_den[ok] / c_clean[ok]
    if ratios.size == 0:
        return float("nan")
    return float(np.mean(np.clip(ratios, *CONTRAST_CLIP)))


def _instance_peaks(
    clean: np.ndarray, labels: np.ndarray, n: int, ref: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(support, clean signature, peak per instance)``: each instance's strength in the clean image;
    instances with ``peak < MIN_DEFECT_SIGNATURE`` are the ones the recall metrics skip."""
    support = expand_labels(labels, 1)
    sig_clean = _signature(clean, ref)
    peak = ndi.maximum(np.abs(sig_clean), support, np.arange(1, n + 1))
    return support, sig_clean, np.asarray(peak, dtype=np.float64).reshape(n)


def _detected(
    clean: np.ndarray, image: np.ndarray, labels: np.ndarray, n: int, ref: np.ndarray | None
) -> np.ndarray:
    """Per measurable instance: did the fixed detector fire on ``image``? (bool array)."""
    index = np.arange(1, n + 1)
    support, sig_clean, peak = _instance_peaks(clean, labels, n, ref)
    sig_img = _signature(image, ref)
    peak_map = np.concatenate([[np.inf], peak])[support]
    core = (support > 0) & (np.abs(sig_clean) >= DETECT_REL_THRESHOLD * peak_map)
    # score with the defect's polarity: a dark smear where a bright particle was is not a detection
    score_map = np.where(core, sig_img * np.sign(sig_clean), -np.inf)
    score = ndi.maximum(score_map, support, index)
    # residual noise the image carries in the detector's own units, measured away from all defects;
    # taken relative to the clean signature so pattern structure (no-reference mode) is not "noise"
    residual = (sig_img - sig_clean)[expand_labels(labels, 3) == 0]
    noise = 1.4826 * float(np.median(np.abs(residual - np.median(residual)))) if residual.size else 0.0
    threshold = np.maximum(DETECT_REL_THRESHOLD * peak, DETECT_NOISE_K * noise)
    return (score >= threshold)[peak >= MIN_DEFECT_SIGNATURE]


def defect_recall(
    clean: np.ndarray,
    denoised: np.ndarray,
    defect_mask: np.ndarray,
    reference: np.ndarray | None = None,
) -> float:
    """Fraction of defects a fixed, simple detector still finds in ``denoised``, in [0, 1].

    The detector looks at a signature image ``d``: ``gaussian(image - reference, 1 px)`` when the
    defect-free ``reference`` is given (die-to-reference inspection), otherwise the local anomaly score
    ``gaussian(image, 1 px) - gaussian(image, 5 px)`` (weaker on dense patterns). For each defect
    instance (8-connected component of ``defect_mask``, grown by 1 px) with clean signature peak ``p``:

    * its core is where the clean image's ``|d|`` is at least ``p / 2``;
    * it is detected when, somewhere in the core, the image's ``d`` has the clean defect's polarity
      and magnitude ``>= max(p / 2, 4 * noise)``, with ``noise`` the robust (MAD) standard deviation of
      ``d(image) - d(clean)`` away from all defects (the residual noise the denoiser left, in the
      detector's units).

    So a defect blurred or painted over to less than half its strength is missed, while residual
    noise alone cannot fire (the 4-sigma floor) and a noisy image gets no credit for its noise.
    ``defect_recall(clean, clean, ...)`` is 1.0 by construction whenever the clean background is
    quiet; :func:`compute_metrics` reports it as a sanity check. Instances fainter than
    :data:`MIN_DEFECT_SIGNATURE` are skipped; NaN when none is measurable.
    """
    a, b = _check_pair(clean, denoised)
    ref = _check_reference(reference, a.shape)
    labels, n = _label_defects(defect_mask, a.shape)
    if n == 0:
        return float("nan")
    hits = _detected(a, b, labels, n, ref)
    return float(hits.mean()) if hits.size else float("nan")


def defect_detectability(
    clean: np.ndarray,
    reference: np.ndarray,
    defect_mask: np.ndarray,
    noise_var: np.ndarray | float,
) -> np.ndarray:
    """Ideal-observer SNR ``d'`` of each defect instance: how visible it is in the noise at all.

    The best possible detector of a defect whose shape, position and background are known exactly
    (the signal-known-exactly ideal observer) computes the prewhitened matched filter; with independent
    Gaussian pixel noise of variance ``v`` its SNR is ``d' = sqrt(sum(s**2 / v))`` over the instance,
    with ``s = clean - reference`` the defect's signal. No denoiser and detector can separate the
    defect from noise better than this observer, so ``d'`` bounds what any method can recall at a
    noise level (the Rose criterion of imaging: ``d' >= 5`` for reliable detection).

    Args:
        clean: float ``(H, W)`` clean image, intensities in [0, 1].
        reference: float ``(H, W)`` defect-free render of the same field.
        defect_mask: bool ``(H, W)``; each 8-connected component is one instance (as in
            :func:`defect_recall`), summed over the component grown by :data:`DEFECT_REGION_PX` px so
            the defect's blurred rim counts.
        noise_var: per-pixel noise variance, a scalar or float ``(H, W)``, in intensity units squared
            (for the SEM model: ``a * I + b``, see :func:`semray.noise.poisson_gaussian_coefficients`).

    Returns:
        float64 ``(n,)``: ``d'`` of each instance :func:`defect_recall` scores (the same instances, in
        label order; those fainter than :data:`MIN_DEFECT_SIGNATURE` are skipped). Empty without any.

    Raises:
        ValueError: a shape does not match, or a variance is not positive and finite.
    """
    a = np.asarray(clean, dtype=np.float64)
    ref = _require_reference(reference, a.shape, "defect_detectability")
    var = _check_noise_var(noise_var, a.shape)
    labels, n = _label_defects(defect_mask, a.shape)
    if n == 0:
        return np.zeros(0)
    _, _, peak = _instance_peaks(a, labels, n, ref)
    energy = ndi.sum_labels(
        (a - ref) ** 2 / var, expand_labels(labels, DEFECT_REGION_PX), np.arange(1, n + 1)
    )
    return np.sqrt(np.asarray(energy, dtype=np.float64).reshape(n))[peak >= MIN_DEFECT_SIGNATURE]


def defect_site_scores(
    clean: np.ndarray,
    image: np.ndarray,
    defect_mask: np.ndarray,
    reference: np.ndarray,
    noise_var: np.ndarray | float | None = None,
) -> np.ndarray:
    """The matched-filter detection statistic of ``image`` at every measurable defect site.

    The template of a site is its clean signal ``s = clean - reference`` over the instance grown by
    :data:`DEFECT_REGION_PX` px (the instances and support of :func:`defect_detectability`). Pass as
    ``image`` an image of the field with the defect (a denoised noisy ``clean``) or without it (a
    denoised noisy ``reference``, same sites): scoring both is what gives a false-alarm rate.

    * without ``noise_var``: the least-squares gain ``sum(s * (image - reference)) / sum(s ** 2)``, the
      fraction of the defect's signal present at its site (1 = full strength, 0 = defect-free; signed,
      so a defect of the wrong polarity scores below 0). Comparable across sites, it is what a
      method's output is thresholded on (one threshold per method and dose).
    * with ``noise_var`` (per-pixel variance, scalar or ``(H, W)``): the prewhitened matched filter
      ``sum(s * (image - reference) / v) / sqrt(sum(s ** 2 / v))``, the ideal observer's statistic:
      ``N(0, 1)`` without the defect and ``N(d', 1)`` with it under independent Gaussian noise of that
      variance (``d'`` from :func:`defect_detectability`).

    Returns:
        float64 ``(n,)`` in label order, only instances with clean peak >= :data:`MIN_DEFECT_SIGNATURE`
        (those :func:`defect_recall` scores); empty without any.

    Raises:
        ValueError: a shape does not match, or a variance is not positive and finite.
    """
    a, b = _check_pair(clean, image, "scored")
    ref = _require_reference(reference, a.shape, "defect_site_scores")
    labels, n = _label_defects(defect_mask, a.shape)
    if n == 0:
        return np.zeros(0)
    _, _, peak = _instance_peaks(a, labels, n, ref)
    sig, index = a - ref, np.arange(1, n + 1)
    support = expand_labels(labels, DEFECT_REGION_PX)
    if noise_var is None:
        energy = ndi.sum_labels(sig**2, support, index)
        score = ndi.sum_labels(sig * (b - ref), support, index) / np.maximum(energy, 1e-12)
    else:
        var = _check_noise_var(noise_var, a.shape)
        energy = ndi.sum_labels(sig**2 / var, support, index)
        score = ndi.sum_labels(sig * (b - ref) / var, support, index) / np.sqrt(np.maximum(energy, 1e-24))
    return np.asarray(score, dtype=np.float64).reshape(n)[peak >= MIN_DEFECT_SIGNATURE]


def defect_false_alarm(
    clean: np.ndarray,
    denoised_reference: np.ndarray,
    defect_mask: np.ndarray,
    reference: np.ndarray,
) -> float:
    """Fraction of defect sites where :func:`defect_recall`'s detector fires on a defect-free image.

    ``denoised_reference`` is the method's output on the noisy defect-free ``reference`` render (same
    noise draw as its output on ``clean``); the detector is given the same sites, cores and thresholds
    as for ``defect_recall(clean, denoised, ...)``, so this is that recall's false-alarm rate per site,
    in [0, 1]. NaN when no defect is measurable.
    """
    a, b = _check_pair(clean, denoised_reference, "denoised reference")
    ref = _require_reference(reference, a.shape, "defect_false_alarm")
    labels, n = _label_defects(defect_mask, a.shape)
    if n == 0:
        return float("nan")
    hits = _detected(a, b, labels, n, ref)
    return float(hits.mean()) if hits.size else float("nan")


def ideal_observer_recall(dprime: np.ndarray, false_alarm: float = 1e-3) -> float:
    """Expected fraction of defects the ideal observer finds, in [0, 1]; NaN for no defects.

    The observer's matched-filter output is ``N(0, 1)`` without the defect and ``N(d', 1)`` with it;
    thresholding at ``t`` with ``P(N(0, 1) > t) = false_alarm`` (per defect site, where it is known
    to be) finds each defect with probability ``Phi(d' - t)``. Searching a whole image for defects
    at unknown places needs a higher threshold, so this is an upper bound on any method's recall.

    Args:
        dprime: ``d'`` per defect (:func:`defect_detectability`), any shape.
        false_alarm: false-alarm probability per site, in (0, 0.5].
    """
    if not 0.0 < false_alarm <= 0.5:
        raise ValueError(f"false_alarm must be in (0, 0.5], got {false_alarm}")
    d = np.asarray(dprime, dtype=np.float64).ravel()
    if d.size == 0:
        return float("nan")
    t = float(ndtri(1.0 - false_alarm))  # inverse survival function of N(0, 1)
    return float(np.mean(ndtr(d - t)))


def defect_region(defect_mask: np.ndarray, grow_px: int = DEFECT_REGION_PX) -> np.ndarray:
    """The pixels ``defect_psnr`` scores: the ``(H, W)`` mask grown by ``grow_px`` px (bool ``(H, W)``).

    Growing the mask takes in the defect's outline, where blur and smearing show first.
    """
    mask = np.asarray(defect_mask).astype(bool)
    if grow_px <= 0 or not mask.any():
        return mask
    return ndi.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=grow_px)


def defect_psnr(clean: np.ndarray, denoised: np.ndarray, defect_mask: np.ndarray) -> float:
    """PSNR in dB over the defect region only (:func:`defect_region`); NaN when the mask is empty.

    Whole-image PSNR is dominated by background, so a denoiser that blurs a bridge away loses little
    of it; on the defect region the same blur costs several dB.
    """
    a, b = _check_pair(clean, denoised)
    if np.asarray(defect_mask).shape != a.shape:
        raise ValueError(
            f"defect_mask shape {np.asarray(defect_mask).shape} does not match image shape {a.shape}"
        )
    region = defect_region(defect_mask)
    if not region.any():
        return float("nan")
    mse = float(np.mean((a[region] - b[region]) ** 2))
    return float(10 * math.log10(1.0 / max(mse, 10 ** (-PSNR_MAX_DB / 10))))


def compute_metrics(
    clean: np.ndarray,
    denoised: np.ndarray,
    defect_mask: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    denoised_reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric for one ``(H, W)`` image pair in [0, 1].

    Keys: ``psnr`` (dB), ``ssim``, ``ms_ssim``, ``edge_preservation`` (edge F1), ``gradient_correlation``,
    ``defect_psnr`` (dB over the grown defect mask, see :func:`defect_psnr`), ``defect_contrast``,
    ``defect_recall``, ``defect_recall_clean`` (the detector on the clean image,
    a sanity value that should be 1.0) and ``defect_count`` (instances in the mask). Defect metrics are
    NaN when there is no mask or it is empty. SSIM needs images of at least 11 x 11 px.

    With ``denoised_reference`` (the method's output on the noisy defect-free ``reference``, same noise
    draw) and a ``reference``, also ``defect_false_alarm`` (:func:`defect_false_alarm`: how often
    ``defect_recall``'s detector fires at the same sites without a defect); absent otherwise.
    """
    a, b = _check_pair(clean, denoised)
    out = {
        "psnr": psnr(a, b),
        "ssim": ssim(a, b),
        "ms_ssim": ms_ssim(a, b),
        "edge_preservation": edge_preservation(a, b),
        "gradient_correlation": gradient_correlation(a, b),
    }
    nan = float("nan")
    n = 0
    if defect_mask is not None:
        n = _label_defects(defect_mask, a.shape)[1]
    if n == 0:
        out.update(defect_psnr=nan, defect_contrast=nan, defect_recall=nan, defect_recall_clean=nan)
    else:
        assert defect_mask is not None
        out["defect_psnr"] = defect_psnr(a, b, defect_mask)
        out["defect_contrast"] = defect_contrast(a, b, defect_mask, reference)
        out["defect_recall"] = defect_recall(a, b, defect_mask, reference)
        out["defect_recall_clean"] = defect_recall(a, a, defect_mask, reference)
    if denoised_reference is not None and reference is not None:
        out["defect_false_alarm"] = (
            nan if n == 0 else defect_false_alarm(a, denoised_reference, np.asarray(defect_mask), reference)
        )
    out["defect_count"] = float(n)
    return out
