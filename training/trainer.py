"""The training loop on accelerate: one process or many (DDP), mixed precision, gradient accumulation.

Per optimizer step (OSEDiff, as train_osediff.py): for each of `gradient_accumulation` micro-batches,
the generator loss (MSE + LPIPS + VSD) is back-propagated, then the fake-score eps-MSE on the
generator's detached latents; at the boundary both optimisers clip (1.0) and step. Micro-batch m of
step s is global micro step s * accumulation + m; data and noise depend only on it (data.py,
osediff.py), which is what makes resume and multi-process runs reproduce single-process ones.
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

log = logging.getLogger("onestep_sr.training")


class TrainingError(ValueError):
    """Training cannot start or continue (bad resume, out of memory, ...)."""


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    interrupted: bool = False


class PromptEncoder:
    """CLIP text embeddings, padded to 77 tokens as the official code does; cached per string."""

    def __init__(self, text_encoder, tokenizer, device: torch.device) -> None:
        self.text_encoder, self.tokenizer, self.device = text_encoder, tokenizer, device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for prompt in prompts:
            if prompt not in self.cache:
                length = int(self.text_encoder.config.max_position_embeddings)
                ids = self.tokenizer(prompt, max_length=length, padding="max_length", truncation=True,
                                     return_tensors="pt").input_ids
                self.cache[prompt] = self.text_encoder(ids.to(self.device))[0].float()
            out.append(self.cache[prompt])
        return torch.cat(out)


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


class OSEDiffRecipe:
    """Builds the OSEDiff model/optimisers and runs one micro step."""

    method = "osediff"

    def __init__(self, config: TrainConfig, base, device: torch.device, lpips: torch.nn.Module | None) -> None:
        from .adapters import add_osediff_adapters, set_osediff_trainable
        from .osediff import OSEDiffTrainModel

        self.config = config
        unet, vae = base.unet, base.vae
        self.lists = add_osediff_adapters(unet, vae, config.model.lora_rank, config.model.fake_lora_rank)
        set_osediff_trainable(unet, vae)
        if config.model.init_weights:
            self.load_published(unet, vae, config.model.init_weights)
        if config.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        weights = {"mse": config.loss.mse, "lpips": config.loss.lpips, "vsd": config.loss.vsd}
        self.model = OSEDiffTrainModel(unet, vae, None, lpips, weights, config.loss.vsd_guidance,
                                       (config.loss.vsd_t_min, config.loss.vsd_t_max))
        self.model.to(device)

    @staticmethod
    def load_published(unet, vae, path: str) -> None:
        from ..models.method_weights import detect_method
        from ..models.weights_io import read_weights_file

        data = read_weights_file(Path(path))
        if detect_method(data, Path(path).name) != "osediff":
            raise TrainingError(f"model.init_weights {Path(path).name} is not OSEDiff weights")
        for module, key in ((unet, "state_dict_unet"), (vae, "state_dict_vae")):
            result = module.load_state_dict(data[key], strict=False)
            if result.unexpected_keys:
                raise TrainingError(f"{Path(path).name}: {key} has entries the model lacks, e.g. "
                                    f"{result.unexpected_keys[0]} (different rank or base?)")

    def param_groups(self) -> tuple[list, list]:
        from .osediff import fake_parameters, generator_parameters

        return generator_parameters(self.model), fake_parameters(self.model)

    def published(self, unwrapped) -> dict:
        from .osediff import osediff_checkpoint

        return osediff_checkpoint(unwrapped, self.lists, self.config.model.lora_rank)


def _prepare_inputs(batch: dict, config: TrainConfig, degrader, micro_step: int, rank: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lq, gt) in [-1, 1] at GT size on the device."""
    gt = batch["gt"].to(device, non_blocking=True)
    if "lr" in batch:
        lr = batch["lr"].to(device, non_blocking=True)
        mode = "bicubic"
        lq = F.interpolate(lr, size=gt.shape[-2:], mode=mode, align_corners=False).clamp(0, 1)
    else:
        degraded = degrader(gt, seed=(config.seed * 1_000_003 + micro_step) * 64 + rank)
        lq = degraded.lr_upscaled
        if lq is None:
            lq = F.interpolate(degraded.lr, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return lq * 2 - 1, gt * 2 - 1


def train(config: TrainConfig, resume: str | Path | None = None, accelerator=None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; returns the losses logged per step."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from ..models.base_models import load_base
    from .data import StepBatchSampler, TrainImages, collate
    from .degradations import RealESRGANDegrader, get_preset

    if config.method != "osediff":
        raise TrainingError(f"method {config.method!r} training is not available in this version; "
                            "train osediff, or use the published s3diff.pkl for inference")
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
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)

    base = load_base(config.model.base, config.model.tokenizer)
    prompts = PromptEncoder(base.text_encoder.to(device).float(), base.tokenizer, device)
    lpips = None
    if config.loss.lpips:
        from .losses.lpips import LPIPSVGG

        lpips = LPIPSVGG.from_folder(config.model.feature_networks).to(device)
    torch.manual_seed(config.seed)  # LoRA A initialisation (peft's "gaussian") draws from the global RNG
    recipe = OSEDiffRecipe(config, base, device, lpips)
    model = recipe.model
    gen_named, fake_named = recipe.param_groups()
    fake_lr = config.optim.lr_fake or config.optim.lr
    opt_g = _optimizer([p for _, p in gen_named], config, config.optim.lr)
    opt_f = _optimizer([p for _, p in fake_named], config, fake_lr)
    sched_g, sched_f = _scheduler(opt_g, config), _scheduler(opt_f, config)

    start_step = 0
    if resume_state is not None:
        trainable = dict(gen_named + fake_named)
        missing = sorted(set(trainable) - set(resume_state["trainable"]))
        if missing:
            raise TrainingError(f"the checkpoint lacks trainable weights, e.g. {missing[0]}")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(resume_state["trainable"][name])
        opt_g.load_state_dict(resume_state["opt_g"])
        opt_f.load_state_dict(resume_state["opt_f"])
        sched_g.load_state_dict(resume_state["sched_g"])
        sched_f.load_state_dict(resume_state["sched_f"])
        restore_rng(resume_state["rng"])
        start_step = int(resume_state["step"])

    model, opt_g, opt_f = accelerator.prepare(model, opt_g, opt_f)
    if resume_state is not None and resume_state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resume_state["scaler"])
    gen_params = [p for _, p in gen_named]
    fake_params = [p for _, p in fake_named]

    dataset = TrainImages(config.data.train, config.data.crop, config.data.scale, config.data.flip,
                          config.data.small_images, config.data.train_lr, config.data.prompts,
                          config.data.cache_decoded)
    sampler = StepBatchSampler(len(dataset), config.train.batch_size, config.seed, start_step * accum,
                               config.train.max_steps * accum, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.data.workers,
                                         pin_memory=config.data.pin_memory and device.type == "cuda",
                                         persistent_workers=config.data.workers > 0)
    degrader = None if config.data.train_lr else RealESRGANDegrader(get_preset(config.degradation.preset))
    negative = prompts([config.loss.negative_prompt])
    logger = Logger(output_dir, config.train.logger, main)

    from .osediff import StepRandom

    unwrapped = accelerator.unwrap_model(model)
    result = TrainResult(step=start_step)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.train.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    step = start_step
    sums: dict[str, float] = {}
    started = time.perf_counter()
    batches = iter(loader)
    with _Interrupt() as interrupt:
        try:
            while step < config.train.max_steps and not interrupt.requested:
                sums = {}
                for micro in range(accum):
                    micro_step = step * accum + micro
                    batch = next(batches)
                    lq, gt = _prepare_inputs(batch, config, degrader, micro_step, accelerator.process_index, device)
                    embeds = prompts(batch["prompt"])
                    random = StepRandom.make(config.seed, micro_step, batch["id"].tolist())
                    boundary = micro == accum - 1
                    sync = accelerator.no_sync(model) if not boundary else _null()
                    with sync:
                        out = model(mode="generator", lq=lq, gt=gt, embeds=embeds,
                                    negative=negative.expand(lq.shape[0], -1, -1), random=random)
                        accelerator.backward(out["total"] / accum)
                    if boundary:
                        if config.optim.grad_clip > 0:
                            accelerator.clip_grad_norm_(gen_params, config.optim.grad_clip)
                        opt_g.step()
                        sched_g.step()
                        opt_g.zero_grad(set_to_none=True)
                    fake_in = unwrapped.fake_inputs(out["z0"], embeds, random)
                    with accelerator.no_sync(model) if not boundary else _null():
                        fake = model(mode="fake", **fake_in)
                        accelerator.backward(fake["fake"] / accum)
                    for key, value in {**{k: v for k, v in out.items() if k != "z0"}, **fake}.items():
                        sums[key] = sums.get(key, 0.0) + float(value.detach()) / accum
                if config.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(fake_params, config.optim.grad_clip)
                opt_f.step()
                sched_f.step()
                opt_f.zero_grad(set_to_none=True)
                step += 1
                losses = _mean_over_processes(accelerator, sums)
                result.history.append(losses)
                rate = (step - start_step) / max(time.perf_counter() - started, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items() if k in ("total", "vsd", "fake")},
                                    refresh=False)
                if step % config.train.log_every == 0 or step == config.train.max_steps:
                    logger.write(step, {**losses, "lr": sched_g.get_last_lr()[0], "steps_per_s": rate})
                if step % config.train.checkpoint_every == 0 or step == config.train.max_steps:
                    result.checkpoint = _save(accelerator, recipe, unwrapped, config, step, gen_named, fake_named,
                                              opt_g, opt_f, sched_g, sched_f)
                if config.data.validation and step % config.train.validate_every == 0 and main:
                    from .validation import validate

                    metrics = validate(config, recipe.published(unwrapped), step, device)
                    logger.write(step, metrics, "validation.csv")
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
            result.checkpoint = _save(accelerator, recipe, unwrapped, config, step, gen_named, fake_named,
                                      opt_g, opt_f, sched_g, sched_f)
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


def _save(accelerator, recipe, unwrapped, config: TrainConfig, step: int, gen_named, fake_named,
          opt_g, opt_f, sched_g, sched_f) -> Path | None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    state: dict[str, Any] = {
        "step": step,
        "config": config.to_dict(),
        "method": recipe.method,
        "trainable": {n: p.detach().cpu().clone() for n, p in gen_named + fake_named},
        "opt_g": copy.deepcopy(opt_g.state_dict()),
        "opt_f": copy.deepcopy(opt_f.state_dict()),
        "sched_g": sched_g.state_dict(),
        "sched_f": sched_f.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": rng_state(),
    }
    return write_checkpoint(Path(config.output_dir), step, recipe.method, recipe.published(unwrapped), state,
                            config.train.keep_checkpoints)


def _finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())
