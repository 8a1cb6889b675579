"""The training loop on accelerate: one process or many (DDP), mixed precision, gradient accumulation.

The loop knows no method: a recipe (training/recipes/) yields the phases of each micro step in
order (e.g. OSEDiff: generator, then fake score; S3Diff: generator, then discriminator); each phase's
loss is back-propagated and, at the accumulation boundary, its optimiser clips and steps before the
next phase runs. Micro-batch m of step s is global micro step s * accumulation + m; data and noise
depend only on it (data.py, recipes), which is what makes resume and multi-process runs reproduce
single-process ones.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.device_memory import is_out_of_memory
from .checkpoints import (
    read_state,
    resolve_resume,
    restore_rng,
    rng_state,
    write_checkpoint,
)
from .config import TrainConfig, config_differences
from .recipes.base import StepInputs

log = logging.getLogger("onestep_sr.training")


class TrainingError(ValueError):
    """Training cannot start or continue (bad resume, out of memory, ...)."""


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    interrupted: bool = False


def _device(name: str) -> str | None:
    if name == "auto":
        return None
    return name


class _Interrupt:
    """SIGINT sets a flag: the loop saves a checkpoint and returns instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> _Interrupt:
        def handler(signum, frame):  # noqa: ARG001
            if self.requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.requested = True
            log.warning("interrupt received: finishing this step, saving a checkpoint and exiting "
                        "(press Ctrl-C again to stop without saving)")

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Logger:
    """CSV files (always: log.csv for losses, validation.csv for validation metrics) and TensorBoard
    (when chosen and installed), on the main process only."""

    def __init__(self, folder: Path, kind: str, enabled: bool) -> None:
        self.enabled = enabled
        self.folder = folder
        self.writer = None
        self.fields: dict[str, list[str]] = {}
        if enabled and kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard); logging to CSV in %s only", folder)

    def write(self, step: int, values: dict[str, float], name: str = "log.csv") -> None:
        if not self.enabled:
            return
        path = self.folder / name
        row = {"step": step, **values}
        new = not path.exists()
        if name not in self.fields:
            self.fields[name] = list(row) if new else path.read_text().splitlines()[0].split(",")
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields[name], extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    o = config.optim
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise TrainingError("optim.use_8bit_adam needs bitsandbytes (pip install bitsandbytes) and a CUDA "
                                "device; set it to false otherwise") from error
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)


def _scheduler(optimizer, config: TrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.optim.scheduler, optimizer=optimizer, num_warmup_steps=config.optim.warmup_steps,
                         num_training_steps=config.train.max_steps)


def _prepare_inputs(batch: dict, config: TrainConfig, degrader, micro_step: int, rank: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lq, gt) in [-1, 1] at GT size on the device, and the original-size LR in [0, 1]."""
    gt = batch["gt"].to(device, non_blocking=True)
    if "lr" in batch:
        lr = batch["lr"].to(device, non_blocking=True)
        mode = "bicubic"
        lq = F.interpolate(lr, size=gt.shape[-2:], mode=mode, align_corners=False).clamp(0, 1)
    else:
        degraded = degrader(gt, seed=(config.seed * 1_000_003 + micro_step) * 64 + rank)
        lr, lq = degraded.lr, degraded.lr_upscaled
        if lq is None:
            lq = F.interpolate(degraded.lr, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return lq * 2 - 1, gt * 2 - 1, lr


def degradation_params(config: TrainConfig):
    """The preset of METHODS.md section 7, with the config's explicit overrides."""
    from dataclasses import replace

    from .degradations import get_preset

    d = config.degradation
    overrides = {k: v for k, v in (("no_degradation_prob", d.no_degradation_prob), ("resize_back", d.resize_back))
                 if v is not None}
    return replace(get_preset(d.preset), **overrides)


def train(config: TrainConfig, resume: str | Path | None = None, accelerator=None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; returns the losses logged per step."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from .data import StepBatchSampler, TrainImages, collate
    from .degradations import RealESRGANDegrader
    from .recipes import RecipeError, build_recipe

    output_dir = Path(config.output_dir)
    resume_state = None
    if resume is not None:
        folder = resolve_resume(resume)
        resume_state = read_state(folder)
        differing = config_differences(resume_state["config"], config.to_dict())
        if differing:
            raise TrainingError(f"refusing to resume from {folder}: the config differs in "
                                f"{', '.join(differing)} (use the run's config, or start a new run)")
    accum = config.train.gradient_accumulation
    if accelerator is None:
        cpu = config.train.device == "cpu" or (config.train.device == "auto" and not torch.cuda.is_available())
        accelerator = Accelerator(mixed_precision=config.train.mixed_precision if not cpu else "no", cpu=cpu,
                                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    device = accelerator.device
    main = accelerator.is_main_process
    if main:
        log.info("training %s on %d process(es) (%s), batch %d each x %d accumulation = %d per optimizer step",
                 config.method, accelerator.num_processes, device, config.train.batch_size, accum,
                 config.train.batch_size * accum * accelerator.num_processes)
        output_dir.mkdir(parents=True, exist_ok=True)

    try:
        recipe = build_recipe(config, device)
    except RecipeError as error:
        raise TrainingError(str(error)) from None
    phases = recipe.phases
    optimizers = {p.name: _optimizer([param for _, param in p.parameters], config, p.lr) for p in phases}
    schedulers = {name: _scheduler(opt, config) for name, opt in optimizers.items()}

    start_step = 0
    if resume_state is not None:
        try:
            recipe.load_state(resume_state["trainable"], folder)
            recipe.load_extra_state(resume_state.get("recipe", {}))
        except RecipeError as error:
            raise TrainingError(str(error)) from None
        for name in optimizers:
            optimizers[name].load_state_dict(resume_state["optimizers"][name])
            schedulers[name].load_state_dict(resume_state["schedulers"][name])
        restore_rng(resume_state["rng"])
        start_step = int(resume_state["step"])

    model, *prepared = accelerator.prepare(recipe.model, *optimizers.values())
    optimizers = dict(zip(optimizers, prepared, strict=True))
    if resume_state is not None and resume_state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resume_state["scaler"])
    phase_params = {p.name: [param for _, param in p.parameters] for p in phases}

    dataset = TrainImages(config.data.train, config.data.crop, config.data.scale, config.data.flip,
                          config.data.small_images, config.data.train_lr, config.data.prompts,
                          config.data.cache_decoded)
    sampler = StepBatchSampler(len(dataset), config.train.batch_size, config.seed, start_step * accum,
                               config.train.max_steps * accum, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.data.workers,
                                         pin_memory=config.data.pin_memory and device.type == "cuda",
                                         persistent_workers=config.data.workers > 0)
    degrader = None if config.data.train_lr else RealESRGANDegrader(degradation_params(config))
    tagger = None
    if config.data.prompts == "clip_tags":
        from .prompts import ClipTagPrompts

        tagger = ClipTagPrompts(config.data.clip_tagger, device, output_dir / "clip_tags.json" if main else None)
    logger = Logger(output_dir, config.train.logger, main)

    unwrapped = accelerator.unwrap_model(model)
    result = TrainResult(step=start_step)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.train.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    step = start_step
    first = phases[0].name
    started = time.perf_counter()
    batches = iter(loader)

    def save() -> Path | None:
        return _save(accelerator, recipe, unwrapped, config, step, optimizers, schedulers)

    with _Interrupt() as interrupt:
        try:
            while step < config.train.max_steps and not interrupt.requested:
                sums: dict[str, float] = {}
                for micro in range(accum):
                    micro_step = step * accum + micro
                    batch = next(batches)
                    if tagger is not None:
                        batch["prompt"] = tagger(batch["path"])
                    lq, gt, lr = _prepare_inputs(batch, config, degrader, micro_step, accelerator.process_index,
                                                 device)
                    inputs = StepInputs(lq=lq, gt=gt, batch=batch, micro_step=micro_step, seed=config.seed,
                                        extras={"lr": lr})
                    boundary = micro == accum - 1
                    with accelerator.no_sync(model) if not boundary else _null():
                        for part in recipe.micro_step(model, unwrapped, inputs):
                            accelerator.backward(part.loss / accum)
                            if boundary:
                                if config.optim.grad_clip > 0:
                                    accelerator.clip_grad_norm_(phase_params[part.phase], config.optim.grad_clip)
                                optimizers[part.phase].step()
                                schedulers[part.phase].step()
                                optimizers[part.phase].zero_grad(set_to_none=True)
                            for key, value in part.logs.items():
                                sums[key] = sums.get(key, 0.0) + float(value.detach()) / accum
                step += 1
                losses = _mean_over_processes(accelerator, sums)
                result.history.append(losses)
                rate = (step - start_step) / max(time.perf_counter() - started, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items() if k in recipe.progress_keys},
                                    refresh=False)
                if step % config.train.log_every == 0 or step == config.train.max_steps:
                    logger.write(step, {**losses, "lr": schedulers[first].get_last_lr()[0], "steps_per_s": rate})
                if step % config.train.checkpoint_every == 0 or step == config.train.max_steps:
                    result.checkpoint = save()
                if config.data.validation and step % config.train.validate_every == 0 and main:
                    logger.write(step, recipe.validate(unwrapped, step), "validation.csv")
        except Exception as error:
            if is_out_of_memory(error):
                raise TrainingError(
                    f"out of memory at step {step} with batch {config.train.batch_size} at {config.data.crop} px: "
                    "lower train.batch_size (and raise train.gradient_accumulation to keep the effective batch), "
                    "set model.gradient_checkpointing: true, or use train.mixed_precision: bf16/fp16"
                ) from error
            raise
        if interrupt.requested:
            result.interrupted = True
            result.checkpoint = save()
            log.warning("interrupted at step %d; resume with --resume %s", step, result.checkpoint)
    if bar is not None:
        bar.close()
    result.step = step
    accelerator.wait_for_everyone()
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _mean_over_processes(accelerator, sums: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return dict(sums)
    keys = list(sums)
    values = torch.tensor([sums[k] for k in keys], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return {k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}


def _save(accelerator, recipe, unwrapped, config: TrainConfig, step: int, optimizers: dict, schedulers: dict
          ) -> Path | None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    state: dict[str, Any] = {
        "step": step,
        "config": config.to_dict(),
        "method": recipe.method,
        "trainable": {n: p.detach().cpu().clone() for phase in recipe.phases for n, p in phase.parameters},
        "recipe": recipe.extra_state(),
        "optimizers": {name: copy.deepcopy(opt.state_dict()) for name, opt in optimizers.items()},
        "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": rng_state(),
    }
    return write_checkpoint(Path(config.output_dir), step, recipe.published_file, recipe.export_method,
                            recipe.published(unwrapped), state, config.train.keep_checkpoints,
                            getattr(recipe, "extra_files", None))


def _finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())
