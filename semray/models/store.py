"""A saved model is a directory: ``model.safetensors`` (weights) + ``card.json`` (what it is).

Weights are read and written with safetensors only (never pickle), so loading a model from an untrusted
directory cannot run code. The card records the model config (enough to rebuild the network), a
summary of how it was trained, its metrics, and the sha256 of the weights file, which is checked on
load so a truncated or swapped file is an error rather than a silently different model.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from semray import __version__
from semray.config.base import ConfigError, load_config
from semray.config.model import UNetConfig
from semray.models.unet import build_model, count_parameters, receptive_radius

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
CARD_FORMAT = "semray-model/1"


class ModelStoreError(ValueError):
    """A model directory could not be read; the message names the offending file and why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model(
    model: nn.Module, cfg: UNetConfig, out_dir: str | Path, card: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (built from ``cfg``) to ``out_dir``; returns the directory.

    ``card`` may carry ``name``, ``version``, ``training`` (a JSON-able summary of the training config),
    ``metrics`` (name -> float) and any other JSON-able keys. The store fills in ``format``,
    ``model_config``, ``param_count``, ``receptive_radius_px`` (how far an output pixel sees, from which
    the tiled engine's default overlap follows), ``semray_version``, ``created`` (UTC ISO 8601, unless given),
    ``weights_file`` and ``weights_sha256``, overriding any caller values for those computed keys.
    Files are written via a temporary name and renamed, so a crash never leaves a half-written file
    under the final name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt", "semray_card_format": CARD_FORMAT})
    os.replace(tmp, out / WEIGHTS_FILE)
    info: dict[str, Any] = {
        "name": out.name,
        "version": "0",
        "training": {},
        "metrics": {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(card or {})
    info.update(
        format=CARD_FORMAT,
        model_config=cfg.model_dump(mode="json"),
        param_count=count_parameters(model),
        receptive_radius_px=receptive_radius(cfg),
        semray_version=__version__,
        weights_file=WEIGHTS_FILE,
        weights_sha256=_sha256(out / WEIGHTS_FILE),
    )
    try:
        text = json.dumps(info, indent=2, sort_keys=False)
    except TypeError as e:
        raise ValueError(f"model card is not JSON-serialisable: {e}") from e
    _atomic_write_bytes(out / CARD_FILE, (text + "\n").encode())
    return out


def read_card(path: str | Path) -> dict[str, Any]:
    """The parsed ``card.json`` of a model directory (or of the directory holding ``path``)."""
    card_path = _model_dir(path) / CARD_FILE
    if not card_path.is_file():
        raise ModelStoreError(f"{card_path}: model card missing (a model directory needs {CARD_FILE})")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelStoreError(f"{card_path}: not valid JSON ({e})") from None
    if not isinstance(card, dict) or "model_config" not in card:
        raise ModelStoreError(f"{card_path}: not a semray model card (no 'model_config' entry)")
    return card


def _model_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p.parent
    if not p.exists():
        raise ModelStoreError(f"{p}: model directory does not exist")
    return p


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model directory written by :func:`save_model`; returns ``(model in eval mode, card)``.

    ``path`` is the directory or any file inside it. Raises :class:`ModelStoreError` naming the file
    when the card or weights are missing, unparsable, fail the sha256 check, hold an invalid model
    config, a ``receptive_radius_px`` other than the config's, or do not match the network the config
    describes. A card without ``receptive_radius_px`` (written before it was recorded) gets it filled in.
    """
    root = _model_dir(path)
    card = read_card(root)
    card_path = root / CARD_FILE
    try:
        cfg = load_config(UNetConfig, card["model_config"])
    except ConfigError as e:
        raise ModelStoreError(f"{card_path}: invalid model_config: {e}") from None
    weights_path = root / card.get("weights_file", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise ModelStoreError(f"{weights_path}: weights file missing")
    expected = card.get("weights_sha256")
    if expected and _sha256(weights_path) != expected:
        raise ModelStoreError(
            f"{weights_path}: sha256 does not match {card_path} (file corrupt, truncated or replaced)"
        )
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelStoreError(f"{weights_path}: not a readable safetensors file ({e})") from None
    radius = receptive_radius(cfg)
    if card.setdefault("receptive_radius_px", radius) != radius:  # cards before it was recorded: filled in
        raise ModelStoreError(
            f"{card_path}: receptive_radius_px {card['receptive_radius_px']!r} does not match its "
            f"model_config ({radius} px)"
        )
    model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelStoreError(f"{weights_path}: weights do not fit the model in {card_path}: {e}") from None
    return model.to(device).eval(), card
