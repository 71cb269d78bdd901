"""Adapting a denoiser to a user's microscope from their noisy images alone (``semray adapt``).

* :mod:`semray.adapt.inputs`: reading and checking the images, frame averaging, tiles, user shards;
* :mod:`semray.adapt.select`: choosing a checkpoint without clean images (structN2V / Noise2Noise scores);
* :mod:`semray.adapt.rounds`: proxy refinement rounds (``user.proxy_rounds``): epoch split, next proxies;
* :mod:`semray.adapt.report`: no-reference statistics, figures and the HTML page;
* :mod:`semray.adapt.driver`: :func:`run_adapt`, the one driver over all of the above.

The fine-tune's TrainConfig is built by :func:`semray.config.adapt.build_train_config` (config layer,
torch-free). The names below are imported lazily, so importing the package does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AdaptInputError", "AdaptResult", "run_adapt"]


def __getattr__(name: str) -> Any:
    if name in ("AdaptResult", "run_adapt"):
        from semray.adapt import driver

        return getattr(driver, name)
    if name == "AdaptInputError":
        from semray.adapt.inputs import AdaptInputError

        return AdaptInputError
    raise AttributeError(f"module 'semray.adapt' has no attribute {name!r}")
