"""Why did ``semray adapt``'s fine-tune end below its init model? A controlled, Ray-free replica.

The shipped model is fine-tuned in one process exactly as ``semray adapt``'s training does it per step
(two "workers" of ``--per`` 64-px crops: BatchNorm statistics per worker batch, the gradient averaged
over both; AdamW, weight decay 1e-4, gradient clip 1, the schedule of :mod:`semray.train.schedule`,
the composite loss of :mod:`semray.losses`) on semray wafers (32 of 256 px) with a fitted noise model
(the ``noise`` section of a ``train.yaml``, e.g. the one ``semray adapt`` saved). Val PSNR is the mean
over fixed 128-px crops of 8 other wafers with fixed noise: before training, and after each third of
the steps. One variable per flag, so each suspect is tested alone::

    python benchmarks/finetune_bn.py --noise OUT/train.yaml --steps 60 --lr 0 --bn train   # stats only
    python benchmarks/finetune_bn.py --noise OUT/train.yaml --steps 60 --bn frozen        # the fix

Prints one JSON line (and appends it to ``--log`` when given).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Offsets of the four fixed 128-px validation crops of each 256-px validation wafer.
VAL_WINDOWS = ((0, 0), (0, 128), (128, 0), (128, 128))


def wafers(n: int, seed: int, size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` clean wafers: (float32 (size, size) in [0, 1], uint8 defect mask) each."""
    from semray.synth import PATTERN_NAMES, render_wafer

    out = []
    for i in range(n):
        s = render_wafer(
            PATTERN_NAMES[i % len(PATTERN_NAMES)], (size, size), np.random.default_rng([seed, i])
        )
        out.append((s.clean.astype(np.float32), s.defect_mask.astype(np.uint8)))
    return out


def val_set(noise: Any, n: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fixed (clean, noisy) float32 128-px crops: 4 per wafer, noise drawn once."""
    from semray.noise import image_rng, synthesize

    clean, noisy = [], []
    for i, (c, _) in enumerate(wafers(n, 12)):
        for k, (y, x) in enumerate(VAL_WINDOWS):
            crop = c[y : y + 128, x : x + 128].copy()
            clean.append(crop)
            noisy.append(synthesize(crop, noise, image_rng(99, f"v{i}_{k}", 0))[0])
    return clean, noisy


def val_psnr(net: torch.nn.Module, val: tuple[list[np.ndarray], list[np.ndarray]]) -> float:
    """Mean PSNR (dB) of the model's eval-mode outputs over the validation crops."""
    from semray.metrics import psnr
    from semray.train.validate import denoise_images

    return float(np.mean([psnr(c, d) for c, d in zip(val[0], denoise_images(net, val[1]), strict=True)]))


def crop_batch(
    train: list[tuple[np.ndarray, np.ndarray]], noise: Any, per: int, key: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``per`` random 64-px crops (random x flip), fresh noise: noisy, clean float32 and defect uint8
    tensors of shape (per, 1, 64, 64)."""
    from semray.noise import image_rng, synthesize

    noisy, clean, mask = [], [], []
    for j in range(per):
        idx = int(rng.integers(len(train)))
        c, m = train[idx]
        y, x = rng.integers(0, c.shape[0] - 64, 2)
        cc, mm = c[y : y + 64, x : x + 64], m[y : y + 64, x : x + 64]
        if rng.random() < 0.5:
            cc, mm = cc[:, ::-1], mm[:, ::-1]
        cc, mm = np.ascontiguousarray(cc), np.ascontiguousarray(mm)
        noisy.append(synthesize(cc, noise, image_rng(7, f"t{idx}_{key}_{j}", 0))[0])
        clean.append(cc)
        mask.append(mm)

    def t(a: list[np.ndarray], dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.from_numpy(np.stack(a)).to(dt)[:, None]

    return t(noisy), t(clean), t(mask, torch.uint8)


def fine_tune(a: argparse.Namespace, net: torch.nn.Module, noise: Any, val: Any) -> list[float]:
    """Train ``a.steps`` steps; val PSNR after each third of them."""
    from semray.config.loss import loss_config
    from semray.losses import DefectWeightedLoss, build_loss
    from semray.models.unet import freeze_batchnorm
    from semray.train.schedule import apply_schedule

    if a.bn == "frozen":
        freeze_batchnorm(net)
    loss_fn = build_loss(loss_config(defect_weight=a.defect_weight))
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    train, rng, curve = wafers(32, 11), np.random.default_rng(5), []
    for step in range(a.steps):
        net.train()
        apply_schedule(opt, step, a.steps, a.lr, a.schedule, a.warmup_fraction, 0.01)
        opt.zero_grad()
        for w in range(a.workers):
            noisy, clean, defect = crop_batch(train, noise, a.per, step * 10 + w, rng)
            pred = net(noisy)
            args = (pred, clean, defect) if isinstance(loss_fn, DefectWeightedLoss) else (pred, clean)
            (loss_fn(*args)[0] / a.workers).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, a.steps // 3) == 0:
            curve.append(round(val_psnr(net, val), 3))
    return curve


def main(argv: list[str] | None = None) -> int:
    import yaml

    from semray.config.base import load_config
    from semray.config.noise import NoiseConfig
    from semray.models.resolve import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--noise", type=Path, required=True, help="a YAML file (e.g. a train.yaml) whose noise section to use"
    )
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle", "constant"])
    ap.add_argument("--warmup-fraction", type=float, default=0.05)
    ap.add_argument("--bn", default="train", choices=["train", "frozen"])
    ap.add_argument("--defect-weight", type=float, default=0.0)
    ap.add_argument("--per", type=int, default=8, help="crops per worker batch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--log", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # only the noise section: the rest of an older train.yaml need not validate against today's schema
    noise = load_config(NoiseConfig, (yaml.safe_load(a.noise.read_text()) or {}).get("noise"))
    net = resolve_model("default").model.float()
    val = val_set(noise)
    t0 = time.time()
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "init": round(val_psnr(net, val), 3)}
    out["after_each_third"] = fine_tune(a, net, noise, val)
    out["wall_s"] = round(time.time() - t0)
    line = json.dumps(out)
    print(line)
    if a.log is not None:
        with a.log.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
