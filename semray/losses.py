"""Training losses: Charbonnier, MS-SSIM, Sobel edge, the MSE + SSIM baseline, L1, and the composite.

Every loss compares ``pred`` (the model's clean-image estimate; with a residual U-Net that is already
``input - predicted noise``) to ``target`` (the clean image). Both are ``(N, C, H, W)`` floating tensors
of the same shape, dtype and device (C = 1 for SEM), values nominally in [0, 1]. Functional forms
return a scalar tensor; modules return ``(total, parts)`` where ``parts`` maps each component's name
to its unweighted value as a detached Python float, plus ``"total"``, for logging.

Example::

    >>> import torch
    >>> from semray.config.loss import loss_config
    >>> loss = build_loss(loss_config())
    >>> total, parts = loss(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
    >>> sorted(parts)
    ['charbonnier', 'edge', 'ms_ssim', 'total']
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia
import torch
from torch import Tensor, nn

from semray.config.loss import MS_SSIM_WEIGHTS, CompositeLossConfig, LossConfig, MseSsimLossConfig
from semray.metrics import ms_ssim_torch, ssim_torch


def _check_inputs(pred: Tensor, target: Tensor) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"pred and target must be tensors, got {type(pred).__name__}, {type(target).__name__}"
        )
    if pred.ndim != 4:
        raise ValueError(f"pred must be (N, C, H, W), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target on different devices: {pred.device} vs {target.device}")
    if pred.dtype != target.dtype or not pred.is_floating_point():
        raise ValueError(f"pred and target must share one floating dtype, got {pred.dtype}, {target.dtype}")


def charbonnier_loss(pred: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """``mean(sqrt((pred - target)**2 + eps**2))``, the write-up's Charbonnier term.

    For ``|d| >> eps`` it is ``|d|`` (L1: robust to outliers, does not average edges away); for
    ``|d| << eps`` it is ``eps + d**2 / (2 eps)`` (L2: smooth, differentiable at 0). Its minimum, at
    ``pred == target``, is ``eps``. Not kornia's ``charbonnier_loss``, which is Barron's
    ``sqrt(d**2 + 1) - 1`` (eps fixed at 1, so L2-like everywhere on [0, 1] images).
    """
    _check_inputs(pred, target)
    return _charbonnier_map(pred, target, eps).mean()


def _charbonnier_map(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """Per-pixel ``sqrt((pred - target)**2 + eps**2)``, same shape as the inputs."""
    return torch.sqrt((pred - target).pow(2) + eps**2)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``mean(|pred - target|)``, the plain L1 baseline."""
    _check_inputs(pred, target)
    return (pred - target).abs().mean()


def ms_ssim_loss(
    pred: Tensor,
    target: Tensor,
    weights: Sequence[float] = MS_SSIM_WEIGHTS[:3],
    win_size: int = 7,
    win_sigma: float = 1.5,
) -> Tensor:
    """``1 - mean_n MS-SSIM(pred_n, target_n)`` with data range 1, in [0, 1]; 0 for identical inputs.

    One scale per entry of ``weights`` (renormalised); needs ``min(H, W) >= (win_size - 1) *
    2**(scales - 1) + 1`` (25 px for the default 3 scales and 7-px window), see
    :func:`semray.metrics.ms_ssim_torch`.
    """
    _check_inputs(pred, target)
    return 1.0 - ms_ssim_torch(pred, target, weights=weights, win_size=win_size, win_sigma=win_sigma).mean()


def sobel_edge_loss(pred: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """Charbonnier penalty on the Sobel gradient-vector error, ``mean(sqrt(|g(pred) - g(target)|**2 + eps**2))``.

    ``g`` is kornia's normalised Sobel gradient (x and y; a step of height ``h`` gives ``h / 2`` on the
    two pixels either side), replicate-padded at the border. Comparing gradient vectors rather than
    magnitudes penalises a smeared edge (lower, wider gradient), a broken one (gradient missing) and a
    shifted one (gradient in the wrong place) alike, while flat regions where both gradients vanish
    cost only ``eps``.
    """
    _check_inputs(pred, target)
    diff = kornia.filters.spatial_gradient(
        pred, mode="sobel", normalized=True
    ) - kornia.filters.spatial_gradient(target, mode="sobel", normalized=True)  # (N, C, 2, H, W)
    return torch.sqrt(diff.pow(2).sum(dim=2) + eps**2).mean()


def mse_ssim_loss(pred: Tensor, target: Tensor, ssim_lambda: float = 0.2, win_size: int = 11) -> Tensor:
    """The write-up's baseline: ``mean((pred - target)**2) + ssim_lambda * (1 - SSIM(pred, target))``.

    SSIM: Gaussian window ``win_size`` px, sigma 1.5, data range 1, averaged over the batch.
    """
    _check_inputs(pred, target)
    mse = (pred - target).pow(2).mean()
    return mse + ssim_lambda * (1.0 - ssim_torch(pred, target, win_size=win_size).mean())


def _parts(named: dict[str, Tensor], total: Tensor) -> dict[str, float]:
    # one device sync for all values instead of one .item() per component
    values = torch.stack([t.detach().float() for t in [*named.values(), total]]).tolist()
    return dict(zip([*named, "total"], values, strict=True))


class CharbonnierLoss(nn.Module):
    """Module form of :func:`charbonnier_loss`; ``forward(pred, target) -> (loss, parts)``."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = charbonnier_loss(pred, target, self.eps)
        return loss, _parts({"charbonnier": loss}, loss)


class L1Loss(nn.Module):
    """Module form of :func:`l1_loss`; ``forward(pred, target) -> (loss, parts)``."""

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = l1_loss(pred, target)
        return loss, _parts({"l1": loss}, loss)


class MSSSIMLoss(nn.Module):
    """Module form of :func:`ms_ssim_loss`; ``forward(pred, target) -> (loss, parts)``."""

    def __init__(
        self, weights: Sequence[float] = MS_SSIM_WEIGHTS[:3], win_size: int = 7, win_sigma: float = 1.5
    ) -> None:
        super().__init__()
        self.weights = list(weights)
        self.win_size = win_size
        self.win_sigma = win_sigma

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = ms_ssim_loss(pred, target, self.weights, self.win_size, self.win_sigma)
        return loss, _parts({"ms_ssim": loss}, loss)


class SobelEdgeLoss(nn.Module):
    """Module form of :func:`sobel_edge_loss`; ``forward(pred, target) -> (loss, parts)``."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = sobel_edge_loss(pred, target, self.eps)
        return loss, _parts({"edge": loss}, loss)


class MSESSIMLoss(nn.Module):
    """The baseline ``MSE + lambda * (1 - SSIM)``; parts ``mse`` and ``ssim`` (the latter is 1 - SSIM)."""

    def __init__(self, ssim_lambda: float = 0.2, win_size: int = 11) -> None:
        super().__init__()
        self.ssim_lambda = ssim_lambda
        self.win_size = win_size

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(pred, target)
        mse = (pred - target).pow(2).mean()
        dssim = 1.0 - ssim_torch(pred, target, win_size=self.win_size).mean()
        total = mse + self.ssim_lambda * dssim
        return total, _parts({"mse": mse, "ssim": dssim}, total)


class CompositeLoss(nn.Module):
    """``L = L_char + alpha * (1 - MS-SSIM) + beta * L_edge``; parts ``charbonnier``, ``ms_ssim``, ``edge``.

    Terms with a zero weight are neither computed nor reported (so ``alpha = beta = 0`` is the plain
    Charbonnier run, and works on crops too small for MS-SSIM). The minimum, at ``pred == target``,
    is ``(1 + beta) * eps``.
    """

    def __init__(
        self,
        eps: float = 1e-3,
        alpha: float = 0.5,
        beta: float = 0.5,
        ms_ssim_weights: Sequence[float] = MS_SSIM_WEIGHTS[:3],
        ms_ssim_win_size: int = 7,
        ms_ssim_win_sigma: float = 1.5,
    ) -> None:
        super().__init__()
        if alpha < 0 or beta < 0 or eps <= 0:
            raise ValueError(f"need alpha >= 0, beta >= 0, eps > 0; got {alpha}, {beta}, {eps}")
        self.eps, self.alpha, self.beta = eps, alpha, beta
        self.ms_ssim = MSSSIMLoss(ms_ssim_weights, ms_ssim_win_size, ms_ssim_win_sigma)

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        terms = {"charbonnier": charbonnier_loss(pred, target, self.eps)}
        total = terms["charbonnier"]
        if self.alpha > 0:
            terms["ms_ssim"] = ms_ssim_loss(
                pred, target, self.ms_ssim.weights, self.ms_ssim.win_size, self.ms_ssim.win_sigma
            )
            total = total + self.alpha * terms["ms_ssim"]
        if self.beta > 0:
            terms["edge"] = sobel_edge_loss(pred, target, self.eps)
            total = total + self.beta * terms["edge"]
        return total, _parts(terms, total)


def grow_mask(mask: Tensor, px: int) -> Tensor:
    """Dilate a binary mask by a (2 px + 1)^2 square. ``mask`` (N, 1, H, W) float in {0, 1}; same out."""
    if px <= 0:
        return mask
    return nn.functional.max_pool2d(mask, kernel_size=2 * px + 1, stride=1, padding=px)


def defect_charbonnier_loss(pred: Tensor, target: Tensor, region: Tensor, eps: float = 1e-3) -> Tensor:
    """Charbonnier loss averaged over the pixels where ``region`` (same shape, {0, 1}) is 1.

    Returns 0 (with a gradient path) when the region is empty, so batches without defects add nothing.
    """
    _check_inputs(pred, target)
    if region.shape != pred.shape:
        raise ValueError(f"defect region must have the prediction's shape {tuple(pred.shape)}, got "
                         f"{tuple(region.shape)}")  # fmt: skip
    return (_charbonnier_map(pred, target, eps) * region).sum() / region.sum().clamp_min(1.0)


class DefectWeightedLoss(nn.Module):
    """``base(pred, target) + weight * Charbonnier over the grown defect pixels``; part ``defect``.

    ``forward(pred, target, defect=None)``: ``defect`` (N, 1, H, W) {0, 1} float masks of the labelled
    defects (None, e.g. for the validation loss, gives the base loss alone, so ``val_loss`` stays
    comparable with runs without the term). The defect term is averaged over defect pixels, not over
    the image, so its size does not depend on how much of the crop the defect covers.
    """

    def __init__(self, base: nn.Module, weight: float, grow_px: int = 3, eps: float = 1e-3) -> None:
        super().__init__()
        if weight < 0 or grow_px < 0:
            raise ValueError(f"need weight >= 0 and grow_px >= 0; got {weight}, {grow_px}")
        self.base, self.weight, self.grow_px, self.eps = base, weight, grow_px, eps

    def forward(
        self, pred: Tensor, target: Tensor, defect: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        total, parts = self.base(pred, target)
        if defect is None:
            return total, parts
        region = grow_mask((defect > 0).to(pred.dtype), self.grow_px)
        term = defect_charbonnier_loss(pred, target, region, self.eps)
        total = total + self.weight * term
        return total, {**parts, "defect": float(term.detach()), "total": float(total.detach())}


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module a :class:`~semray.config.loss.LossConfig` describes (wrapped in
    :class:`DefectWeightedLoss` when ``defect_weight > 0``)."""
    base = _build_base_loss(cfg)
    if cfg.defect_weight > 0:
        return DefectWeightedLoss(base, cfg.defect_weight, cfg.defect_grow_px, cfg.charbonnier_eps)
    return base


def _build_base_loss(cfg: LossConfig) -> nn.Module:
    if isinstance(cfg, CompositeLossConfig):
        return CompositeLoss(
            eps=cfg.charbonnier_eps,
            alpha=cfg.alpha,
            beta=cfg.beta,
            ms_ssim_weights=cfg.ms_ssim_scale_weights(),
            ms_ssim_win_size=cfg.ms_ssim_win_size,
            ms_ssim_win_sigma=cfg.ms_ssim_win_sigma,
        )
    if isinstance(cfg, MseSsimLossConfig):
        return MSESSIMLoss(cfg.ssim_lambda, cfg.ssim_win_size)
    if cfg.kind == "l1":
        return L1Loss()
    raise ValueError(f"unknown loss kind {cfg.kind!r}")  # pragma: no cover
