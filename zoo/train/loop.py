"""The classification training loop: ``train(cfg) -> dict`` (final metrics).

Reads like the algorithm; each concern is a component: ``config`` (what to do), ``data`` (datasets and
resumable samplers), ``distributed`` (process group, seeds), ``checkpoint`` (atomic, last-N + best, exact
resume), ``metrics`` (progress, CSV/TensorBoard/wandb, curves). Optimizer, schedule, EMA, mixup and
transforms are timm's; mixed precision is ``torch.amp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad

import zoo

from .._io import atomic_write_text, load_state_dict_checked
from .._registry import close_model_names
from . import data as data_lib
from .checkpoint import (
    CheckpointManager,
    atomic_save,
    capture_rng_state,
    check_out_dir,
    load_sharded,
    prepare_run_folder,
    restore_rng_state,
)
from .config import Config, dump_config
from .distributed import (
    DistInfo,
    StopSignals,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    cleanup,
    init_distributed,
    rank0_print,
    seed_everything,
)
from .metrics import CSVWriter, MetricLogger, Progress, plot_curves, rewind_csv


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


def check_model_name(name: str) -> None:
    """Raise ``ConfigError`` with close names when ``name`` is in neither zoo's nor timm's registry."""
    arch = name.split(".")[0]
    if zoo.is_model(arch) or arch in timm.list_models():
        return
    close = close_model_names(arch)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `zoo list` or timm.list_models()"
    raise ConfigError(f"unknown model {name!r}{hint}")


def preflight(cfg: Config, world_size: int) -> None:
    """Every check that can fail fast, before data loading or model construction."""
    check_model_name(cfg.model.name)
    check_out_dir(cfg.log.out)
    if cfg.checkpoint.dir:
        check_out_dir(cfg.checkpoint.dir, "--checkpoint.dir")
    data_lib.check_source(cfg)
    per_step = world_size * cfg.loop.grad_accum
    if cfg.loop.batch_size % per_step:
        raise ConfigError(
            f"--batch-size {cfg.loop.batch_size} (global) is not divisible by world_size {world_size} x grad_accum "
            f"{cfg.loop.grad_accum}; pick a multiple of {per_step}"
        )
    if (cfg.aug.mixup or cfg.aug.cutmix) and (cfg.loop.batch_size // per_step) % 2:
        raise ConfigError("mixup/cutmix need an even per-rank micro-batch; change --batch-size or --loop.grad_accum")
    if cfg.loop.amp not in ("none", "bf16", "fp16"):
        raise ConfigError(f"--loop.amp {cfg.loop.amp!r}; expected none, bf16 or fp16")
    if cfg.dist.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"--dist.strategy {cfg.dist.strategy!r}; expected ddp or fsdp")
    if cfg.dist.strategy == "fsdp" and world_size > 1 and cfg.model.channels_last:
        raise ConfigError(
            "--model.channels_last with --dist.strategy fsdp: FSDP2 shards contiguous parameters only and "
            "channels-last conv weights are not; drop one of them"
        )
    if cfg.dist.strategy == "fsdp" and world_size > 1 and cfg.loop.ema:
        raise ConfigError("--loop.ema is not supported with --dist.strategy fsdp yet; use ddp or drop the EMA")


def build_model(cfg: Config, num_classes: int, in_chans: int) -> nn.Module:
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.drop_path_rate:
        kwargs.setdefault("drop_path_rate", cfg.model.drop_path_rate)
    if cfg.model.drop_rate:
        kwargs.setdefault("drop_rate", cfg.model.drop_rate)
    if cfg.model.attn_backend:  # only when set: models without zoo.ops attention take no such kwarg
        kwargs.setdefault("attn_backend", cfg.model.attn_backend)
    return zoo.create_model(
        cfg.model.name,
        pretrained=cfg.model.pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        checkpoint_path=cfg.model.checkpoint_path or None,
        **kwargs,
    )


def build_loss(cfg: Config) -> nn.Module:
    """The training loss, chosen as timm's train.py chooses it (see ``LossConfig``); validation uses plain CE.

    One deliberate difference: timm ignores ``--bce-loss`` when neither mixup nor smoothing is on (plain CE);
    here ``loss.bce`` always gives BCE.
    """
    mixup_active = bool(cfg.aug.mixup or cfg.aug.cutmix)
    if cfg.loss.bce:
        return BinaryCrossEntropy(
            # mixup's targets arrive dense and already smoothed; the smoothing here is for index targets only
            smoothing=0.0 if mixup_active else cfg.aug.label_smoothing,
            target_threshold=cfg.loss.bce_target_thresh or None,
            sum_classes=cfg.loss.bce_sum,
            pos_weight=cfg.loss.bce_pos_weight or None,
        )
    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.aug.label_smoothing:
        return LabelSmoothingCrossEntropy(smoothing=cfg.aug.label_smoothing)
    return nn.CrossEntropyLoss()


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` each block (class name ending in 'Block'), then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("Block") and module is not model:
            fully_shard(module)
    fully_shard(model)
    return model


@dataclass
class TrainState:
    """The loop's position: optimizer steps done, epoch, batches done in that epoch, time trained."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_time: float = 0.0


@dataclass
class EpochTotals:
    """Sums over the optimizer steps of the current epoch, checkpointed so a resumed epoch logs the same loss."""

    loss_sum: float = 0.0
    loss_count: int = 0
    skipped: int = 0


RUN_LOGS = (
    "metrics.csv",
    "steps.csv",
    "curves.png",
    "tb",
    "wandb",
    "model_final.pt",
)  # what --overwrite removes besides checkpoints


class Trainer:
    """One training run; ``run()`` trains, evaluates, checkpoints and returns the final metrics."""

    def __init__(self, cfg: Config, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.signals: StopSignals | None = None  # set while run() trains
        self.device = dist_info.device
        self.out = Path(cfg.log.out)
        preflight(cfg, dist_info.world_size)  # fail before any work
        if cfg.model.sync_bn and self.device.type != "cuda":
            raise ConfigError(
                "--model.sync_bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; drop it on the CPU (the "
                "ranks' running statistics are taken from rank 0 before every evaluation anyway)"
            )

        # the run folder: a fresh run never mixes with (or prunes) the run a folder already holds
        self.ckpt = CheckpointManager(
            cfg.checkpoint.dir or self.out / "checkpoints", keep_last=cfg.checkpoint.keep_last
        )
        prepare_run_folder(
            self.out, self.ckpt, cfg.checkpoint.resume, cfg.checkpoint.overwrite, RUN_LOGS, remove=dist_info.is_main
        )
        barrier()  # rank 0 has removed an overwritten run before any rank goes on
        resumed = self.ckpt.resolve_resume(cfg.checkpoint.resume)
        self.finished_metrics: dict[str, float] | None = None
        if resumed is not None and self._is_finished(resumed):
            # --resume auto on a finished run: no step, nothing written
            self.finished_metrics = dict(resumed.get("metrics") or {})
            rank0_print(
                f"run in {self.out} already finished at step {resumed['step']} (epoch {resumed.get('epoch')}): "
                f"nothing to do; raise --epochs (or --loop.max_steps / --loop.time_limit) to train on"
            )
            return

        if cfg.loop.threads:
            torch.set_num_threads(cfg.loop.threads)
        seed_everything(cfg.loop.seed)  # same seed on every rank: identical initial weights
        if cfg.loop.deterministic:
            torch.use_deterministic_algorithms(True)
        pretrained_cfg = zoo.get_pretrained_cfg(cfg.model.name.split(".")[0])
        pcfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
        self.data = data_lib.build_datasets(cfg, pcfg)
        if isinstance(self.data.train, torch.utils.data.Dataset) and hasattr(self.data.train, "__len__"):
            if len(self.data.train) == 0:
                raise data_lib.DataError(f"no training samples in {cfg.data.source}")
        self.model = build_model(cfg, self.data.num_classes, self.data.in_chans).to(self.device)
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(self.model, decay=cfg.loop.ema_decay, device=self.device) if cfg.loop.ema else None
        self.fsdp = dist_info.distributed and cfg.dist.strategy == "fsdp"
        if self.fsdp:  # FSDP2 shards the parameters in place: before the optimizer sees them
            shard_fsdp(self.model)

        world, accum = dist_info.world_size, cfg.loop.grad_accum
        self.micro_batch = cfg.loop.batch_size // (world * accum)
        lr = cfg.optim.lr * (cfg.loop.batch_size / cfg.optim.lr_base_size if cfg.optim.lr_base_size else 1.0)
        self.optimizer = create_optimizer_v2(
            self.model,
            opt=cfg.optim.opt,
            lr=lr,
            weight_decay=cfg.optim.weight_decay,
            momentum=cfg.optim.momentum,
            eps=cfg.optim.eps,
            layer_decay=cfg.optim.layer_decay or None,
        )
        self.train_loader, self.sampler = data_lib.build_train_loader(
            cfg, self.data.train, dist_info.rank, world, self.micro_batch
        )
        self.steps_per_epoch = len(self.train_loader) // accum
        if self.steps_per_epoch == 0:
            raise data_lib.DataError(
                f"{len(self.data.train)} training samples fill no step of {cfg.loop.batch_size}; lower --batch-size"
            )
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=cfg.schedule.sched,
            num_epochs=cfg.schedule.epochs,
            warmup_epochs=cfg.schedule.warmup_epochs,
            warmup_lr=cfg.schedule.warmup_lr,
            min_lr=cfg.schedule.min_lr,
            step_on_epochs=False,  # per optimizer step
            updates_per_epoch=self.steps_per_epoch,
        )
        self.mixup = (
            Mixup(
                mixup_alpha=cfg.aug.mixup,
                cutmix_alpha=cfg.aug.cutmix,
                prob=cfg.aug.mixup_prob,
                switch_prob=cfg.aug.mixup_switch_prob,
                label_smoothing=cfg.aug.label_smoothing,
                num_classes=self.data.num_classes,
            )
            if cfg.aug.mixup or cfg.aug.cutmix
            else None
        )
        self.loss_fn = build_loss(cfg)
        if isinstance(self.loss_fn, nn.Module):  # BCE's pos_weight is a buffer
            self.loss_fn = self.loss_fn.to(self.device)
        self.eval_loss_fn = nn.CrossEntropyLoss(reduction="sum")  # whatever the training loss: comparable runs
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.loop.amp)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.loop.amp == "fp16")

        self.state = TrainState()
        self.epoch_totals = EpochTotals()
        self.last_metrics: dict[str, float] = {}
        if resumed is not None:
            self._load(resumed)
        if dist_info.is_main and cfg.checkpoint.resume:
            # rows logged after the resumed checkpoint (killed between a log and its save) are logged again
            for name in ("metrics.csv", "steps.csv"):
                rewind_csv(self.out / name, self.state.step)

        # DDP wraps after loading: checkpoints hold plain (unwrapped) weights
        self.train_model: nn.Module = self.model
        if dist_info.distributed and not self.fsdp:
            if cfg.model.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.ddp = self.train_model if isinstance(self.train_model, nn.parallel.DistributedDataParallel) else None
        if cfg.model.compile:  # training forward/backward only; evaluation runs the eager module
            self.train_model = torch.compile(self.train_model)
        self.logger = MetricLogger(
            self.out,
            cfg.log.backends,
            enabled=dist_info.is_main,
            run_name=cfg.log.run_name or None,
            config=cfg.to_dict(),
            wandb_id=resumed.get("wandb_id") if resumed is not None else None,  # one wandb run across restarts
        )
        self.stop_signal: str | None = None  # SIGTERM / SIGUSR1 seen by any rank: checkpoint and leave
        self.step_csv = CSVWriter(self.out / "steps.csv") if dist_info.is_main and cfg.log.step_every else None
        if dist_info.is_main:
            atomic_write_text(self.out / "config.yaml", dump_config(cfg))
        if resumed is None:  # per-rank streams (drop path, mixup); a resumed run restored its own instead
            seed_everything(cfg.loop.seed, dist_info.rank)

    # ----------------------------------------------------------------------------------------- state
    @property
    def sharded(self) -> bool:
        """FSDP on several processes: checkpoints are sharded (torch.distributed.checkpoint), never gathered."""
        return self.fsdp and self.dist.world_size > 1

    def _state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, the weights whole (one process, or DDP). The optimizer state is keyed by
        parameter name (torch.distributed.checkpoint's layout), so FSDP on any number of processes reads it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))
        return dict(model=model_sd, optimizer=optim_sd, **self._meta_state())

    def _meta_state(self) -> dict[str, Any]:
        """Everything but the weights and the optimizer's tensors: plain data (a collective: RNG states)."""
        return dict(
            scheduler=self.scheduler.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            scaler=self.scaler.state_dict(),
            sampler=dict(epoch=self.state.epoch, batch_in_epoch=self.state.batch_in_epoch),
            epoch_totals=dataclasses.asdict(self.epoch_totals),
            wandb_id=self.logger.wandb_id if self.dist.is_main else None,
            rng=gather_rng_states(),
            epoch=self.state.epoch,
            train_time=self.state.train_time,
            **self._inference_meta(),
        )

    def _load(self, state: dict[str, Any]) -> None:
        trained = state.get("model_name")
        if trained and trained != self.cfg.model.name:
            raise ConfigError(
                f"checkpoint {state['path']} is a run of {trained}, not {self.cfg.model.name}; resume with "
                f"--model {trained}, or start a new run in another --out"
            )
        if state.get("sharded_dir"):  # written by several FSDP processes: read into this run's layout (resharded)
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            target = dict(model=model_sd, optimizer=optim_sd)
            load_sharded(target, state["sharded_dir"])
            set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        elif self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            load_state_dict_checked(self.model, state["model"], f"checkpoint {state['path']}")
            optim_sd = state["optimizer"]
            if all(isinstance(k, int) for k in optim_sd.get("state", {})) and optim_sd.get("state"):
                self.optimizer.load_state_dict(optim_sd)  # written before name-keyed optimizer states
            else:
                set_optimizer_state_dict(
                    self.model, self.optimizer, optim_sd, options=StateDictOptions(full_state_dict=True)
                )
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):  # empty when saved without fp16: a run switched to fp16 starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(
            step=state["step"],
            epoch=state["sampler"]["epoch"],
            batch_in_epoch=state["sampler"]["batch_in_epoch"],
            train_time=state.get("train_time", 0.0),
        )
        if self.state.batch_in_epoch and state.get("epoch_totals"):
            self.epoch_totals = EpochTotals(**state["epoch_totals"])
        self.last_metrics = dict(state.get("metrics") or {})
        # RNG: each rank restores its own stream; a changed world size reseeds (no longer bitwise)
        rng = state["rng"]
        if isinstance(rng, list) and len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            seed_everything(self.cfg.loop.seed + state["step"], self.dist.rank)
        rank0_print(f"resumed from {state['path']} at step {self.state.step} (epoch {self.state.epoch})")

    def _is_finished(self, state: dict[str, Any]) -> bool:
        """Whether a checkpoint's run has nothing left to do under this config (epochs, steps, time)."""
        loop = self.cfg.loop
        epoch = state.get("sampler", {}).get("epoch", state.get("epoch", 0))
        return bool(
            epoch >= self.cfg.schedule.epochs
            or (loop.max_steps and state["step"] >= loop.max_steps)
            or (loop.time_limit and state.get("train_time", 0.0) >= loop.time_limit)
        )

    def save(self, metric: float | None = None) -> None:
        """A checkpoint at this step: every rank calls it (collectives); sharded under multi-process FSDP."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # this rank's shards
            tensors = dict(model=model_sd, optimizer=optim_sd)
            self.ckpt.save_sharded(tensors, self._meta_state(), self.state.step, metric, self.dist.is_main)
            return
        state = self._state_dict()
        if self.dist.is_main:
            self.ckpt.save(state, self.state.step, metric=metric)
        barrier()

    def export_consolidated(self) -> Path | None:
        """Sharded runs: the whole model once, for inference (``OUT/model_final.pt``; ``zoo validate`` and
        ``create_model(checkpoint_path=...)`` read it). A collective; None when the run is not sharded."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=options)
        path = self.out / "model_final.pt"
        if self.dist.is_main:
            atomic_save(dict(self._inference_meta(), model=model_sd, step=self.state.step), path)
        barrier()
        return path

    def _inference_meta(self) -> dict[str, Any]:
        return dict(
            config=self.cfg.to_dict(),
            classes=self.data.classes,
            model_name=self.cfg.model.name,
            num_classes=self.data.num_classes,
            in_chans=self.data.in_chans,
            data_config=self.data.data_config,
            metrics=self.last_metrics,
        )

    # ------------------------------------------------------------------------------------------ loop
    def train_epoch(self) -> dict[str, float]:
        cfg, st = self.cfg, self.state
        accum = cfg.loop.grad_accum
        self.train_model.train()
        if self.sampler is not None:
            self.sampler.set_epoch(st.epoch, start_batch=st.batch_in_epoch * accum)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(st.epoch)
        total_steps = self.steps_per_epoch
        progress = Progress(
            total_steps, f"train {st.epoch + 1}/{cfg.schedule.epochs}", enabled=self.dist.is_main, every=cfg.log.every
        )
        if st.batch_in_epoch:
            progress.update(st.batch_in_epoch)
        totals = self.epoch_totals  # carried over when resumed inside this epoch
        data_time = 0.0
        step_start = time.perf_counter()
        batches = iter(self.train_loader)
        while st.batch_in_epoch < total_steps:
            step_loss = torch.zeros((), device=self.device)
            step_correct = 0  # top-1 hits on the training batches (hard labels only: not under mixup)
            n_images = 0
            for micro in range(accum):
                t0 = time.perf_counter()
                images, targets, skipped = next(batches)
                data_time += time.perf_counter() - t0
                for path in skipped:
                    print(f"warning: skipped unreadable image {path}", flush=True)
                totals.skipped += len(skipped)
                images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
                if self.mixup is not None and len(images) % 2:
                    images, targets = images[:-1], targets[:-1]  # timm's Mixup needs an even batch
                if len(images) == 0:
                    continue
                if self.mixup is not None:
                    images, targets = self.mixup(images, targets)
                if cfg.model.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # DDP: synchronise gradients only on the last micro-step
                sync = micro == accum - 1 or self.ddp is None
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    with self.autocast():
                        logits = self.train_model(images)
                        loss = self.loss_fn(logits, targets)
                    self.scaler.scale(loss / accum).backward()
                step_loss += loss.detach() / accum
                if targets.ndim == 1:
                    step_correct += int((logits.detach().argmax(dim=1) == targets).sum())
                n_images += len(images)
            if cfg.optim.clip_grad:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.model.parameters(), cfg.optim.clip_grad, mode=cfg.optim.clip_mode)
            # one collective for the loss and the stop request, so every rank stops after the same step
            signalled = float(self.signals is not None and self.signals.received is not None)
            reduced = all_reduce_sum(torch.stack([step_loss.float(), torch.tensor(signalled, device=self.device)]))
            global_loss = reduced[0] / self.dist.world_size
            if cfg.loop.nan_check and not torch.isfinite(global_loss):
                last = self.ckpt.latest_path()
                raise FloatingPointError(
                    f"loss is {global_loss.item()} at step {st.step + 1} (epoch {st.epoch + 1}, batch "
                    f"{st.batch_in_epoch + 1}); stopping. Last good checkpoint: {last or 'none'}; try a lower --lr, "
                    "--optim.clip_grad or --loop.amp bf16"
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            st.batch_in_epoch += 1
            self.scheduler.step_update(num_updates=st.step)
            if self.ema is not None:
                self.ema.update(self.model, step=st.step)

            loss_value = global_loss.item()
            totals.loss_sum += loss_value
            totals.loss_count += 1
            now = time.perf_counter()
            st.train_time += now - step_start
            img_s = n_images * self.dist.world_size / max(now - step_start, 1e-9)
            step_start = now
            lr = self.optimizer.param_groups[0]["lr"]
            progress.update(1, loss=loss_value, lr=lr, img_s=round(img_s, 1))
            if cfg.log.step_every and st.step % cfg.log.step_every == 0:
                train_acc1 = 100 * step_correct / max(n_images, 1) if self.mixup is None else ""
                if self.step_csv is not None:
                    row = dict(step=st.step, epoch=st.epoch, loss=repr(loss_value), lr=lr, img_s=img_s)
                    self.step_csv.write(dict(row, train_acc1=train_acc1))
                self.logger.log_step(dict(loss=loss_value, lr=lr, img_s=img_s, acc1=train_acc1), st.step)
            saved = bool(cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0)
            if saved:
                self.save()
            if reduced[1].item() > 0:  # preempted: keep this step, then leave
                self.stop_signal = (self.signals.received if self.signals else None) or "SIGTERM"
                if not saved:
                    self.save()
                break
            if self._should_stop():
                break
        progress.close()
        result = dict(
            train_loss=totals.loss_sum / max(1, totals.loss_count),
            skipped_images=float(all_reduce_sum(torch.tensor(float(totals.skipped))).item()),
            data_time_frac=data_time / max(time.perf_counter() - progress.start, 1e-9),
        )
        if st.batch_in_epoch >= total_steps:
            self.epoch_totals = EpochTotals()  # the next epoch sums from zero
        return result

    def _should_stop(self) -> bool:
        cfg = self.cfg.loop
        if cfg.max_steps and self.state.step >= cfg.max_steps:
            return True
        if cfg.time_limit:
            # every rank must agree, so the decision is rank 0's elapsed time
            flag = torch.tensor(float(self.state.train_time >= cfg.time_limit), device=self.device)
            if self.dist.distributed:
                torch.distributed.broadcast(flag, 0)
            return bool(flag.item())
        return False

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1, top-5 and loss on the validation set (EMA weights when ``--loop.eval_ema``)."""
        # the unwrapped module: DDP must not sync buffers over ranks holding different numbers of batches
        model = self.ema.module if (self.ema is not None and self.cfg.loop.eval_ema) else self.model
        broadcast_buffers(model)  # rank 0's running statistics: the weights it saves, as `zoo validate` reads them
        model.eval()
        loader = data_lib.build_eval_loader(
            self.data.val, self.micro_batch, self.cfg.data.num_workers, self.dist.rank, self.dist.world_size
        )
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, count
        if self.fsdp:  # every rank must run the same number of forwards (each one all-gathers the weights)
            n_batches = torch.tensor(float(len(loader)), device=self.device)
            torch.distributed.all_reduce(n_batches, op=torch.distributed.ReduceOp.MAX)
            spare = int(n_batches.item()) - len(loader)
        for images, targets, skipped in loader:
            for path in skipped:
                print(f"warning: skipped unreadable image {path}", flush=True)
            if len(images) == 0:
                continue
            images, targets = images.to(self.device), targets.to(self.device)
            if self.cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = model(images)
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            totals[0] += self.eval_loss_fn(logits.float(), targets).item()
            totals[1] += (top[:, 0] == targets).sum().item()
            totals[2] += (top == targets[:, None]).any(dim=1).sum().item()
            totals[3] += len(targets)
        if self.fsdp:
            dummy = torch.zeros((1, *self.data.data_config["input_size"]), device=self.device)
            for _ in range(spare):
                model(dummy)
        totals = all_reduce_sum(totals)
        n = max(totals[3].item(), 1.0)
        return dict(
            val_loss=totals[0].item() / n, val_acc1=100 * totals[1].item() / n, val_acc5=100 * totals[2].item() / n
        )

    def run(self) -> dict[str, Any]:
        """Train to the end (or a stop signal) and return the last evaluation's metrics.

        SIGTERM / SIGUSR1 stop the run after the current optimizer step: a checkpoint is written and the
        metrics come back with ``stopped_by`` set to the signal's name (``--resume auto`` continues exactly).
        """
        if self.finished_metrics is not None:
            return self.finished_metrics
        with StopSignals() as self.signals:
            try:
                return self._run()
            finally:
                self.signals = None

    def _run(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        rank0_print(
            f"training {cfg.model.name} on {cfg.data.source}: {len(self.data.train)} images, "
            f"{self.data.num_classes} classes, input {self.data.data_config['input_size']}, "
            f"world {self.dist.world_size}, "
            f"global batch {cfg.loop.batch_size}, {self.steps_per_epoch} steps/epoch, {cfg.schedule.epochs} epochs"
        )
        metrics: dict[str, float] = {}
        while st.epoch < cfg.schedule.epochs:
            train_metrics = self.train_epoch()
            if self.stop_signal is not None:
                rank0_print(
                    f"stopped by {self.stop_signal} at step {st.step} (epoch {st.epoch + 1}); checkpoint "
                    f"{self.ckpt.latest_path()}; continue with --resume auto"
                )
                self.logger.close()
                return dict(self.last_metrics, stopped_by=self.stop_signal, step=st.step)
            finished_epoch = st.batch_in_epoch >= self.steps_per_epoch
            stopping = self._should_stop() or (finished_epoch and st.epoch + 1 >= cfg.schedule.epochs)
            if finished_epoch:
                st.epoch += 1
                st.batch_in_epoch = 0
            if stopping or (finished_epoch and st.epoch % cfg.loop.eval_every == 0):
                metrics = dict(
                    epoch=st.epoch if finished_epoch else st.epoch + st.batch_in_epoch / self.steps_per_epoch
                )
                metrics.update(train_metrics, **self.evaluate(), lr=self.optimizer.param_groups[0]["lr"])
                metrics["train_time_s"] = st.train_time
                self.logger.log(metrics, step=st.step)
                self.last_metrics = {k: float(v) for k, v in metrics.items()}
                rank0_print(
                    f"epoch {metrics['epoch']:.2f} step {st.step}: train loss {metrics['train_loss']:.4f}, val loss "
                    f"{metrics['val_loss']:.4f}, top-1 {metrics['val_acc1']:.2f}%, top-5 {metrics['val_acc5']:.2f}%, "
                    f"data {100 * metrics['data_time_frac']:.1f}% of step time, skipped images "
                    f"{int(metrics['skipped_images'])}"
                )
                self.save(metric=metrics["val_acc1"])
            elif finished_epoch:
                self.save()
            if stopping:
                break
        self.export_consolidated()  # sharded runs: the whole model once, for inference
        self.logger.close()
        if self.dist.is_main and cfg.log.plot and self.logger.csv_path and self.logger.csv_path.is_file():
            try:
                png = plot_curves(
                    self.logger.csv_path, self.out / "curves.png", x="step", steps_csv=self.out / "steps.csv"
                )
                metrics["curves"] = str(png)  # type: ignore[assignment]
            except ImportError as err:
                rank0_print(f"no curves.png: {err}")
        return metrics


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by rank (a collective under torch.distributed)."""
    state = capture_rng_state()
    if not torch.distributed.is_initialized():
        return [state]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def train(cfg: Config) -> dict[str, Any]:
    """Run one training job (single process, or one rank of a torchrun job); returns the last eval metrics
    (with ``stopped_by`` when SIGTERM / SIGUSR1 stopped it after a checkpoint)."""
    dist_info = init_distributed(cfg.dist.backend or None, cfg.loop.device or None)
    try:
        result = Trainer(cfg, dist_info).run()
        # every rank's last collective finishes before the group goes away (a rank that tore down gloo while
        # its peer was still in the last all-gather was seen to abort, rarely, under FSDP)
        barrier()
        return result
    finally:
        cleanup()
