"""Denoising networks: the configurable U-Net, its cost figures, and the on-disk model store."""

from semray.models.store import ModelStoreError, load_model, read_card, save_model
from semray.models.unet import UNet, build_model, count_parameters, flops_per_megapixel

__all__ = [
    "ModelStoreError",
    "UNet",
    "build_model",
    "count_parameters",
    "flops_per_megapixel",
    "load_model",
    "read_card",
    "save_model",
]
