"""U-Net for SEM denoising: any input size, optional residual head and Sobel edge input channel.

Output range: the network's last layer is linear (no sigmoid). A sigmoid would squash gradients exactly
where SEM images live (dark background near 0, bright edges near 1) and slow learning of full-contrast
structures. Instead the output is left unclamped while the module is in training mode, so every pixel
keeps a gradient, and is clamped to [0, 1] in eval mode, which is what inference, validation and saved
models use.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semray.config.model import UNetConfig


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class _ConvBlock(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2; zero 'same' padding, spatial size unchanged."""

    def __init__(self, c_in: int, c_out: int, norm: str, groups: int) -> None:
        bias = norm == "none"  # a norm layer's shift makes the conv bias redundant
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
            _norm(norm, c_out, groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias),
            _norm(norm, c_out, groups),
            nn.ReLU(inplace=True),
        )


def _upsampler(kind: str, c_in: int, c_out: int) -> nn.Module:
    if kind == "bilinear":
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(c_in, c_out, 1),
        )
    return nn.ConvTranspose2d(c_in, c_out, 2, stride=2)


def sobel_magnitude(x: Tensor) -> Tensor:
    """Sobel gradient magnitude, (N, 1, H, W) -> (N, 1, H, W), kornia's normalised kernel.

    For a step of height ``h`` the magnitude peaks at ``h / 2`` on the two pixels either side of it.
    """
    return kornia.filters.sobel(x, normalized=True, eps=1e-6)


def align_padding(h: int, w: int, multiple: int) -> tuple[int, int, int, int, str]:
    """How an (h, w) image is padded to multiples of ``multiple``: ``(top, bottom, left, right, mode)``.

    The padding is split evenly (the extra pixel, if any, at the bottom/right) and is ``"reflect"``
    (mirror without repeating the edge: keeps local statistics, no artificial dark frame) where every
    pad is shorter than the side it mirrors, else ``"replicate"``. The U-Net pads its input this way, and
    the tiled engine pads the whole image the same way once, so tiles see what a whole pass sees.
    """
    ph, pw = (-h) % multiple, (-w) % multiple
    top, left = ph // 2, pw // 2
    bottom, right = ph - top, pw - left
    mode = "reflect" if max(left, right) < w and max(top, bottom) < h else "replicate"
    return top, bottom, left, right, mode


def receptive_radius(cfg: UNetConfig) -> int:
    """Receptive-field radius of the U-Net a config describes (pixels, exact, not an estimate).

    An output pixel depends on input pixels at most this far from it along each axis, and exactly that
    far for some pixel positions; pixels closer than this to a tile edge therefore see the tile's zero
    padding instead of the image. Computed by walking an interval of positions back through the
    network: each 3x3 conv widens it by 1 px per side at its level, a 2x2 max pool maps level-(l+1)
    positions ``[a, b]`` to level-l ``[2a, 2b + 1]``, a 2x2 stride-2 transposed conv maps level-l
    ``[a, b]`` to level-(l+1) ``[a // 2, b // 2]``, a bilinear 2x up-sampling to
    ``[floor(a/2 - 1/4), floor(b/2 - 1/4) + 1]``, the Sobel edge input adds 1 px and 1x1 convs nothing;
    the radius is the largest reach over the ``2**depth`` positions of the down-sampling grid. Example:
    depth 3, two 3x3 convs per block, transposed up-sampling (the shipped model): 51 px.
    """
    per_block = 2  # 3x3 convs per _ConvBlock, each widening the interval by 1 px at its level

    def up(a: int, b: int) -> tuple[int, int]:
        if cfg.upsample == "transpose":
            return a // 2, b // 2
        return math.floor(a / 2 - 0.25), math.floor(b / 2 - 0.25) + 1

    def encoder(level: int, a: int, b: int) -> tuple[int, int]:
        a, b = a - per_block, b + per_block
        if level == 0:
            edge = int(cfg.edge_input)
            return a - edge, b + edge
        return encoder(level - 1, 2 * a, 2 * b + 1)

    def decoder(level: int, a: int, b: int) -> tuple[int, int]:
        if level == cfg.depth:  # the bottleneck is the deepest encoder block
            return encoder(level, a, b)
        a, b = a - per_block, b + per_block
        (a1, b1), (a2, b2) = encoder(level, a, b), decoder(level + 1, *up(a, b))
        return min(a1, a2), max(b1, b2)

    reach = 0
    for p in range(2**cfg.depth):
        a, b = decoder(0, p, p)
        reach = max(reach, p - a, b - p)
    return reach


class UNet(nn.Module):
    """U-Net denoiser built from a :class:`~semray.config.model.UNetConfig`.

    Input: ``(N, 1, H, W)`` float32 noisy images in [0, 1], any ``H, W >= 1``. Output: the denoised
    image, same shape. Internally the input is reflect-padded (replicate where the image is too small to
    reflect) to a multiple of ``2**depth`` and the output cropped back, so 771 x 1023 comes back
    771 x 1023. With ``cfg.residual`` the network predicts the noise and the module returns
    ``input - noise``; the returned tensor is the clean-image estimate either way. Clamped to [0, 1] in
    eval mode only (see the module docstring).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg.model_copy()
        widths = cfg.widths()
        c_in = 2 if cfg.edge_input else 1
        self.encoders = nn.ModuleList()
        for w in widths:
            self.encoders.append(_ConvBlock(c_in, w, cfg.norm, cfg.norm_groups))
            c_in = w
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(cfg.depth)):
            self.ups.append(_upsampler(cfg.upsample, widths[level + 1], widths[level]))
            self.decoders.append(_ConvBlock(2 * widths[level], widths[level], cfg.norm, cfg.norm_groups))
        self.head = nn.Conv2d(widths[0], 1, 1)

    @property
    def multiple(self) -> int:
        """Spatial sizes the core network accepts are multiples of this (pixels)."""
        return 2**self.cfg.depth

    @property
    def receptive_radius(self) -> int:
        """Pixels an output pixel sees on each side of it; see :func:`receptive_radius`."""
        return receptive_radius(self.cfg)

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        h, w = x.shape[-2:]
        top, bottom, left, right, mode = align_padding(h, w, self.multiple)
        pads = (left, right, top, bottom)
        if top == bottom == left == right == 0:
            return x, pads
        return F.pad(x, pads, mode=mode), pads

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"UNet expects (N, 1, H, W) images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        xp, (left, _, top, _) = self._pad(x)
        feats = torch.cat([xp, sobel_magnitude(xp)], dim=1) if self.cfg.edge_input else xp
        skips: list[Tensor] = []
        for i, enc in enumerate(self.encoders):
            feats = enc(feats)
            if i < len(self.encoders) - 1:
                skips.append(feats)
                feats = F.max_pool2d(feats, 2)
        for up, dec in zip(self.ups, self.decoders, strict=True):
            feats = dec(torch.cat([up(feats), skips.pop()], dim=1))
        out = self.head(feats)[..., top : top + h, left : left + w]
        if self.cfg.residual:
            out = x - out
        if not self.training:
            out = out.clamp(0.0, 1.0)
        return out


def build_model(cfg: UNetConfig) -> nn.Module:
    """The model a config describes (dispatch on ``cfg.architecture``), freshly initialised."""
    if cfg.architecture == "unet":
        return UNet(cfg)
    raise ValueError(f"unknown model architecture {cfg.architecture!r}")  # pragma: no cover


def _batchnorm_eval_hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
    # runs before every forward, so a later model.train() (every epoch) cannot switch it back
    module.training = False


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm layer of ``model`` in eval mode from now on, whatever ``model.train()`` says.

    Frozen layers normalise with their running mean/variance and never update them (nor
    ``num_batches_tracked``); their affine weight and bias still get gradients. Fine-tuning a trained
    model on small batches otherwise replaces its running statistics by ones estimated from those
    batches (momentum 0.1), which measurably hurts it (see ``optim.freeze_batchnorm``). Apply before
    wrapping the model in DDP; the state dict is unchanged.

    Returns:
        The number of BatchNorm layers frozen (0 for a model without BatchNorm: nothing changes).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.register_forward_pre_hook(_batchnorm_eval_hook)
        m.eval()
    return len(layers)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) in ``model``; buffers such as BatchNorm statistics excluded."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_megapixel(model_or_cfg: nn.Module | UNetConfig, size: int = 256) -> float:
    """Forward-pass FLOPs per megapixel of input (1 multiply-add = 2 FLOPs).

    Measured with :class:`torch.utils.flop_counter.FlopCounterMode` on one ``size x size`` image and
    scaled linearly to 1e6 pixels (a fully convolutional net's cost is linear in pixels once the size is
    a multiple of ``2**depth``). Counts convolutions and matmuls, which dominate; element-wise ops
    (norms, ReLU, bilinear resize) are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_or_cfg) if isinstance(model_or_cfg, UNetConfig) else model_or_cfg
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, 1, size, size, device=param.device, dtype=param.dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        flops = counter.get_total_flops()
    finally:
        model.train(was_training)
    return float(flops) * 1e6 / (size * size)
