"""The one place ``semray adapt`` turns its config into a :class:`~semray.config.train.TrainConfig`.

Kept apart (and torch-free) so the config can validate its ``train`` overrides before any work starts,
and so a change of the training entry point touches one function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from semray.config.base import deep_merge, load_config
from semray.config.train import TrainConfig

if TYPE_CHECKING:
    from semray.config.adapt import AdaptConfig
    from semray.config.noise import NoiseConfig


def build_train_config(
    cfg: AdaptConfig,
    noise: NoiseConfig | None,
    user_shards: str,
    synth_shards: str,
    storage: str,
    run_name: str | None = None,
    crop_px: int | None = None,
    val_crop_px: int = 128,
) -> TrainConfig:
    """The fine-tune: the init model on a mix of the user's content and synthetic patterns.

    Both sources are ``noise: synthesize``: their clean (proxy) images get the *fitted* noise, fresh
    every epoch (fixed for validation), so every training pair is (fitted noise on X, X). Every epoch is
    checkpointed (``keep_best = epochs``) because the checkpoint is chosen afterwards without clean
    images; the child run registers nothing itself (the chosen one is registered by the driver).

    Args:
        cfg: the adapt config. noise: the fitted noise model (None: the TrainConfig default, for checks).
        user_shards, synth_shards: shard folders of the two sources. storage: Ray Train storage path.
        crop_px: training crop side (None: ``cfg.optim.crop_px``; smaller when the tiles are smaller).
        val_crop_px: side of the fixed validation crops (<= the smallest tile).
    """
    from semray.config.adapt import SYNTH_SOURCE, USER_SOURCE

    o = cfg.optim
    base: dict[str, Any] = {
        "seed": cfg.seed,
        "init": cfg.init,
        "data": {
            "sources": [
                {"name": USER_SOURCE, "shards": user_shards, "weight": cfg.user.weight},
                {"name": SYNTH_SOURCE, "shards": synth_shards, "weight": cfg.synthetic.weight},
            ],
            "crop_px": crop_px or o.crop_px,
            "batch_size": o.batch_size,
            "crops_per_image": 4,
            "val_crop_px": val_crop_px,
            "val_max_images": 16,
        },
        # BatchNorm statistics stay the init model's: re-estimating them from the fine-tune's 8-crop
        # batches alone cost 0.8-1.0 dB of val PSNR at lr 0 (docs/adapt.md, "Why BatchNorm is frozen")
        "optim": {
            "epochs": o.epochs,
            "steps_per_epoch": o.steps_per_epoch,
            "lr": o.lr,
            "freeze_batchnorm": True,
        },
        "validation": {"metric": f"val_psnr/{USER_SOURCE}", "figure_every": 0},
        "scaling": {"num_workers": o.num_workers},
        "checkpoint": {"keep_best": o.epochs},
        "mlflow": {"experiment": cfg.mlflow.experiment, "register_model": False, "alias": None},
        "run": {"storage_path": storage, "name": run_name},
    }
    if noise is not None:
        base["noise"] = noise.model_dump(mode="json")
    return load_config(TrainConfig, deep_merge(base, cfg.train))
