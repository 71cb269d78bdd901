"""The per-worker training loop that Ray Train runs on every rank (also usable from Ray Tune trials).

``train_loop_per_worker(config)`` expects the dict :func:`semray.train.fit.loop_config` builds:
the validated :class:`~semray.config.train.TrainConfig` (as JSON), the epoch-clock actor, the steps per
epoch, the fixed validation set (an object ref, built once by the driver), the MLflow tracking URI and
run id, and optional starting weights. Each epoch:

1. rank 0 sets the epoch clock, every rank streams its split of the ``train`` dataset (noise
   synthesised for this epoch, see :mod:`semray.train.pipeline`) and takes AdamW steps under DDP
   (gloo on CPU, NCCL on GPU), with bf16 autocast on GPU, gradient clipping and the lr schedule;
2. every rank validates its share of the fixed validation crops; sums are all-reduced so every rank
   holds the same metrics, hence the same early-stopping decision;
3. every rank reports (a barrier): rank 0 with the model + optimiser state, each rank with the list of
   images it trained on; Ray Train merges them into one checkpoint and keeps the best k;
4. rank 0 logs the epoch's metrics (and every few epochs a sample figure) to MLflow.

A restarted worker group (after a failure, or ``semray train --resume``) continues from
``ray.train.get_checkpoint()``: weights, optimiser, step, epoch and early-stopping state.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from semray.config.train import TrainConfig
from semray.losses import build_loss
from semray.models.unet import build_model, freeze_batchnorm
from semray.train.checkpoint import (
    DataRecord,
    LoopState,
    load_checkpoint,
    model_card,
    save_checkpoint,
    write_data_record,
)
from semray.train.objectives import BatchObjective
from semray.train.schedule import apply_schedule
from semray.train.validate import (
    collect_val_items,
    denoise_images,
    finalize,
    metric_sums,
    sample_figure,
    sums_to_tensor,
    val_keys,
)

#: Worst possible ``checkpoint_score``: given to epochs whose validation metric is NaN.
WORST_SCORE = -1e30


class InjectedFailure(RuntimeError):
    """Raised by the fault-injection hook (``debug.fail_once_at_epoch``)."""


class _Collate(NumpyBatchCollateFn):
    """numpy batch -> ``noisy``/``clean`` (and ``noisy2`` when present: Noise2Noise) (N, 1, h, w) float32
    tensors, ``defect`` (N, 1, h, w) uint8 masks, plus ids, epochs and per-crop objectives (lists/numpy)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {
            "noisy": torch.from_numpy(np.ascontiguousarray(batch["noisy"], dtype=np.float32))[:, None],
            "clean": torch.from_numpy(np.ascontiguousarray(batch["clean"], dtype=np.float32))[:, None],
            "image_id": [str(i) for i in batch["image_id"]],
            "noise_epoch": np.asarray(batch["noise_epoch"]),
        }
        if "defect" in batch:
            out["defect"] = torch.from_numpy(np.ascontiguousarray(batch["defect"], dtype=np.uint8))[:, None]
        if "noisy2" in batch:
            out["noisy2"] = torch.from_numpy(np.ascontiguousarray(batch["noisy2"], dtype=np.float32))[:, None]
        if "objective" in batch:
            out["objective"] = [str(o) for o in batch["objective"]]
        return out


def mask_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """Generator of the blind-spot masks of one optimiser step on one rank (reproducible on resume)."""
    return np.random.default_rng([int(seed), int(rank), int(step), 0x5E1F])


def checkpoint_score(value: float, mode: str) -> float:
    """Higher-is-better score of a validation value (NaN -> :data:`WORST_SCORE`)."""
    if not math.isfinite(value):
        return WORST_SCORE
    return value if mode == "max" else -value


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # gloo reduces float64 CPU tensors; NCCL needs them on the GPU
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        t = t.cpu()
    return t


def _sync_buffers(net: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before validation: each rank's
    last training forward updated them with its own batch, so without this ranks > 0 would validate a
    slightly different model than the one rank 0 checkpoints."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in net.buffers():
            dist.broadcast(buf.data, src=0)


def _maybe_fail(cfg: TrainConfig, epoch: int, step_in_epoch: int, rank: int, world: int) -> None:
    """The fault-injection hook: the last rank raises once, one step into the configured epoch."""
    dbg = cfg.debug
    if dbg.fail_once_at_epoch != epoch or rank != world - 1 or step_in_epoch != 1 or dbg.fail_marker is None:
        return
    marker = Path(dbg.fail_marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at epoch {epoch} on rank {rank}\n")
    raise InjectedFailure(f"semray debug: injected worker failure at epoch {epoch} on rank {rank}")


def _train_batches(shard: Any, cfg: TrainConfig, epoch: int) -> Iterator[dict[str, Any]]:
    bs = cfg.data.batch_size
    buf = max(cfg.data.shuffle_buffer, bs) if cfg.data.shuffle_buffer > 0 else None
    return iter(
        shard.iter_torch_batches(
            batch_size=bs,
            collate_fn=_Collate(),
            drop_last=True,
            local_shuffle_buffer_size=buf,
            local_shuffle_seed=None if buf is None else cfg.seed * 100_003 + epoch,
        )
    )


@dataclass
class Worker:
    """Everything one rank holds for the run, built once by :func:`setup_worker`."""

    cfg: TrainConfig
    run_name: str
    rank: int
    world: int
    clock: Any
    steps_per_epoch: int
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    net: torch.nn.Module  # the bare model (checkpoints, validation)
    model: torch.nn.Module  # the DDP-wrapped one (training)
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    objective: BatchObjective
    state: LoopState
    val_all: list[Any]
    train_shard: Any
    logger: Any = None

    @property
    def val_mine(self) -> list[Any]:
        """This rank's share of the fixed validation items."""
        return self.val_all[self.rank :: self.world]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (see module docstring). ``config`` comes from ``fit.loop_config``."""
    # 1. setup: model (resumed or initial weights), DDP, optimiser, losses, validation set, data shard
    w = setup_worker(config)
    for epoch in range(w.state.epoch + 1, w.cfg.optim.epochs):
        # 2. one epoch of training on this rank's split of the train dataset
        metrics, seen = train_epoch(w, epoch)
        # 3. validation, all-reduced, and the early-stopping decision (the same on every rank)
        stop = validate_epoch(w, epoch, metrics)
        # 4. report: the checkpoint (a barrier), then MLflow metrics and figures on rank 0
        report_epoch(w, epoch, metrics, seen, last=stop or epoch == w.cfg.optim.epochs - 1)
        if stop:
            break


def setup_worker(config: dict[str, Any]) -> Worker:
    """Step 1: this rank's model, optimiser and data, continuing from the last checkpoint if any."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.seed)

    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (on_gpu and cfg.optim.amp) else None
    memory_format = torch.channels_last if (on_gpu and cfg.optim.channels_last) else torch.contiguous_format

    net = build_model(cfg.model)
    state, opt_state = LoopState(), None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model_sd, opt_state, state = load_checkpoint(d)
        net.load_state_dict(model_sd)
    elif config.get("init_state") is not None:
        net.load_state_dict(config["init_state"])
    if cfg.optim.freeze_batchnorm:
        freeze_batchnorm(net)
    net = net.to(device=device, memory_format=memory_format)
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    loss_fn = build_loss(cfg.loss).to(device)  # supervised objective; always the val_loss against clean
    sources = cfg.data.sources or []
    objective = BatchObjective(
        cfg.loss, [cfg.data.source_objective(s, cfg.loss.objective) for s in sources], loss_fn
    )

    val_batch = config["val_batch"]
    val_all = collect_val_items([ray.get(val_batch) if isinstance(val_batch, ray.ObjectRef) else val_batch])
    rank = ctx.get_world_rank()
    logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        from semray.train.mlflow_log import EpochLogger

        logger = EpochLogger(config["tracking_uri"], config["mlflow_run_id"])
    return Worker(
        cfg, str(config["run_name"]), rank, ctx.get_world_size(), config["clock"], int(config["steps_per_epoch"]),
        device, amp_dtype, memory_format, net, model, optimizer, loss_fn, objective, state, val_all,
        ray.train.get_dataset_shard("train"), logger,
    )  # fmt: skip


def _check_noise_epoch(batch: dict[str, Any], epoch: int, rank: int) -> None:
    if not (batch["noise_epoch"] == epoch).all():
        raise RuntimeError(
            f"rank {rank} got noise of epoch(s) {sorted(set(batch['noise_epoch'].tolist()))} while "
            f"training epoch {epoch}: the epoch clock and the data pipeline are out of step"
        )


def _step(w: Worker, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float], int, float]:
    """One optimiser step on one batch: ``(loss, its parts, batch size, learning rate)``."""
    cfg, device, fmt = w.cfg, w.device, w.memory_format
    noisy = batch["noisy"].to(device, non_blocking=True, memory_format=fmt)
    clean = batch["clean"].to(device, non_blocking=True, memory_format=fmt)
    lr = apply_schedule(
        w.optimizer, w.state.step, w.steps_per_epoch * cfg.optim.epochs, cfg.optim.lr, cfg.optim.schedule,
        cfg.optim.warmup_fraction, cfg.optim.min_lr_ratio,
    )  # fmt: skip
    prep = w.objective.prepare(batch, noisy, clean, mask_rng(cfg.seed, w.rank, w.state.step), fmt)
    with torch.autocast(device.type, dtype=w.amp_dtype, enabled=w.amp_dtype is not None):
        pred = w.model(prep.inputs)
    defect = batch["defect"].to(device, non_blocking=True) if w.objective.needs_defect else None
    total, parts = w.objective.loss(pred.float(), prep, defect)
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {w.state.step}: {parts}")
    w.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if cfg.optim.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), cfg.optim.grad_clip_norm)
    w.optimizer.step()
    w.state.step += 1
    return total, parts, noisy.shape[0], lr


def train_epoch(w: Worker, epoch: int) -> tuple[dict[str, float], Counter[str]]:
    """Step 2: one epoch of training; returns the epoch's all-reduced training metrics and the images
    this rank trained on (with multiplicity)."""
    import ray

    if w.rank == 0:
        ray.get(w.clock.set.remote(epoch))
    w.model.train()
    seen: Counter[str] = Counter()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, batches, samples
    part_sums: Counter[str] = Counter()
    lr = float("nan")
    t0 = time.perf_counter()
    for i, batch in enumerate(_train_batches(w.train_shard, w.cfg, epoch)):
        if i >= w.steps_per_epoch:
            break
        _check_noise_epoch(batch, epoch, w.rank)
        _maybe_fail(w.cfg, epoch, i, w.rank, w.world)
        total, parts, n, lr = _step(w, batch, epoch)
        sums += torch.tensor([float(total.detach()) * n, 1.0, float(n)], dtype=torch.float64)
        part_sums.update({k: v * n for k, v in parts.items() if k != "total"})
        seen.update(batch["image_id"])
    return _train_metrics(w, epoch, lr, sums, part_sums, time.perf_counter() - t0), seen


def _train_metrics(
    w: Worker, epoch: int, lr: float, sums: torch.Tensor, part_sums: Counter[str], epoch_time: float
) -> dict[str, float]:
    """The epoch's training metrics, summed over ranks (time: the slowest rank's)."""
    crop_px = w.cfg.data.crop_px
    part_keys = sorted(part_sums)
    totals = _all_reduce(
        torch.cat([sums, torch.tensor([part_sums[k] for k in part_keys], dtype=torch.float64)])
    )
    slowest = float(_all_reduce(torch.tensor([epoch_time], dtype=torch.float64), op="max")[0])
    n_samples = max(float(totals[2]), 1.0)
    return {
        "epoch": float(epoch),
        "step": float(w.state.step),
        "lr": lr,
        "train_loss": float(totals[0]) / n_samples,
        **{f"train_{k}": float(totals[3 + j]) / n_samples for j, k in enumerate(part_keys)},
        "epoch_time_s": slowest,
        "samples_per_s": float(totals[2]) / max(slowest, 1e-9),
        "megapixels_per_s": float(totals[2]) * crop_px * crop_px / 1e6 / max(slowest, 1e-9),
    }


def validate_epoch(w: Worker, epoch: int, metrics: dict[str, float]) -> bool:
    """Step 3: validate this rank's share of the fixed crops, all-reduce the sums (so every rank holds
    the same metrics), update the early-stopping state; adds to ``metrics`` and returns whether to stop."""
    cfg, state = w.cfg, w.state
    mode = cfg.validation.resolved_mode
    t_val = time.perf_counter()
    _sync_buffers(w.net)
    val_mine = w.val_mine
    den = denoise_images(w.net, [it.noisy for it in val_mine], w.device, w.amp_dtype)
    keys = val_keys(w.val_all)  # + per-source keys of a mix, the same on every rank
    val = finalize(_all_reduce(sums_to_tensor(metric_sums(val_mine, den, w.loss_fn), keys)), keys)
    metrics.update(val)
    metrics["val_time_s"] = time.perf_counter() - t_val
    score = val[cfg.validation.metric]
    metrics["checkpoint_score"] = checkpoint_score(score, mode)
    if math.isfinite(score) and state.improved(score, mode, cfg.validation.min_delta):
        state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
    else:
        state.bad_epochs += 1
    state.epoch = epoch
    metrics["best_epoch"] = float(state.best_epoch)
    patience = cfg.validation.patience
    return patience > 0 and state.bad_epochs >= patience


def report_epoch(w: Worker, epoch: int, metrics: dict[str, float], seen: Counter[str], last: bool) -> None:
    """Step 4: every rank reports (a barrier): rank 0 with the model + optimiser state, each rank with
    the images it trained on; then rank 0 logs the metrics (and every few epochs a figure) to MLflow."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="semray-ckpt-") as tmp:
        if w.rank == 0:
            val_metrics = {k: v for k, v in metrics.items() if k.startswith("val_")}
            card = model_card(w.cfg, w.run_name, epoch, val_metrics)
            save_checkpoint(tmp, w.net, w.cfg, w.optimizer, w.state, card)
        write_data_record(tmp, DataRecord.from_counter(epoch, w.rank, seen))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"epoch-{epoch:05d}",
        )
    if w.logger is None:
        return
    w.logger.log_metrics(metrics, step=epoch)
    every = w.cfg.validation.figure_every
    if last or (every > 0 and epoch % every == 0):
        fig_items = w.val_all[: w.cfg.validation.figure_images]
        with tempfile.TemporaryDirectory(prefix="semray-fig-") as tmp:
            fig_den = denoise_images(w.net, [it.noisy for it in fig_items], w.device, w.amp_dtype)
            png = sample_figure(
                fig_items, fig_den, Path(tmp) / f"val_epoch{epoch:05d}.png",
                title=f"{w.run_name} epoch {epoch}: val PSNR {metrics['val_psnr']:.2f} dB",
            )  # fmt: skip
            w.logger.log_artifact(png, "figures")
