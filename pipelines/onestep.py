"""The one-step super-resolution pipeline.

IMAGE -> method preprocessing (resize x scale, snap or pad) -> VAE encode (tiled, shared GroupNorm
statistics) -> UNet once at t (latent tiles, Gaussian blending, optional CFG) -> x0 -> VAE decode ->
colour fix against the upscaled input -> crop/resize -> IMAGE. Host-agnostic: ComfyUI and the CLI
pass callbacks for progress, interrupts and warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..models.device_memory import TORCH_MEMORY, MemoryProvider, is_out_of_memory
from ..models.schedule import x0_from_eps
from ..models.tiled_vae import decode_tiled, encode_tiled, tile_grid
from . import speed
from .channels import merge_channels, split_channels
from .color_fix import color_fix
from .geometry import ResizePlan, apply_resize_plan, crop_to, plan_resize, reflect_pad_to_multiple
from .latent_tiling import latent_tile_grid, tiled_eps
from .methods import MethodSpec
from .model import OneStepModel
from .resize import resize_image
from .validation import check_images, check_scale, clamp_to_unit_range, validate_settings

log = logging.getLogger("onestep_sr")

ENCODER_PAD_PX = 32
DECODER_PAD_LATENT = 11
MIN_TILES = {"latent_tile": 32, "vae_encoder_tile": 256, "vae_decoder_tile": 32}


class ImageTooLargeError(ValueError):
    """The output would exceed the configured pixel limit."""


@dataclass
class Conditions:
    """Everything the single pass is conditioned on, one entry per image where it varies."""

    prompt_embeds: torch.Tensor  # (1, 77, D)
    negative_embeds: torch.Tensor | None  # (1, 77, D) when guidance != 1
    guidance: float
    timesteps: torch.Tensor  # (B,) long
    modulation: tuple[torch.Tensor, torch.Tensor] | None = None  # per-image (UNet, VAE) matrices

    def select(self, index: int) -> Conditions:
        modulation = None
        if self.modulation is not None:
            modulation = tuple(m[index : index + 1] for m in self.modulation)
        return replace(self, timesteps=self.timesteps[index : index + 1], modulation=modulation)


@dataclass
class UpscaleSettings:
    scale: float = 4.0
    prompt: str | None = None  # None: the method's default prompt
    color_fix: str | None = None  # None: the method's default
    color_fix_strength: float = 1.0  # blend of the colour-fixed and the raw output (0..1)
    latent_tile: int | None = None
    latent_overlap: int | None = None
    vae_encoder_tile: int | None = None
    vae_decoder_tile: int | None = None
    tile_batch: int = 4
    vae_norm_stats: str = "auto"  # tiled VAE GroupNorm statistics: "auto", "exact" or "estimated" (bounded memory)
    seed: int | None = None  # None: use the latent mean (deterministic); int: sample, seeded
    output_size: str = "exact"  # "exact": scale x input; "native": the size the model worked at
    max_output_pixels: int = 8192 * 8192
    negative_prompt: str | None = None  # None: the method's (used only when guidance != 1)
    guidance: float | None = None  # None: the method's; 1.0 runs no negative pass
    degradation: torch.Tensor | None = None  # (B, 2) blur/noise scores in [0, 1]; None: estimate (S3Diff)
    timesteps: int | torch.Tensor | None = None  # one t or (B,); None: DTSM (Hero-SR) or the method's t
    timestep_seed: int = 0  # seeds the DTSM's sampled timestep when it chooses t
    # ResShift backbone (ResShift, SinSR, HF-Diff); the SD backbone ignores these.
    steps: int | None = None  # sampler steps (ResShift: 1..T, respaced as the official code); None: the method's
    noise: object | None = None  # a NoiseSource or an .npz path replaying `p{patch}_s{step}` draws; None: seeded
    noise_seed: int | None = None  # seed of the CPU noise generator; None: 12345 (the official default)
    chop_size: int | None = None  # LR patch size (official 512, stride 448); None: 512


@dataclass
class RunHooks:
    progress: Callable[[int, int], None] | None = None
    check_interrupt: Callable[[], None] | None = None
    warn: Callable[[str], None] = field(default=log.warning)


class _TileCounter:
    """Turns per-stage (done, total) tile counts into one running count for the progress bar."""

    def __init__(self, totals: dict[str, int], hooks: RunHooks):
        self.totals = totals
        self.offsets = {}
        running = 0
        for stage, count in totals.items():
            self.offsets[stage] = running
            running += count
        self.total = running
        self.hooks = hooks

    def stage(self, name: str) -> Callable[[int, int], None]:
        def report(done: int, _total: int) -> None:
            if self.hooks.check_interrupt:
                self.hooks.check_interrupt()
            if self.hooks.progress:
                self.hooks.progress(self.offsets[name] + min(done, self.totals[name]), self.total)

        return report


class OneStepPipeline:
    """Runs a loaded OneStepModel on image batches."""

    def __init__(self, model: OneStepModel, device: torch.device | str = "cpu", memory: MemoryProvider | None = None,
                 output_device: torch.device | str = "cpu", channels_last: bool | None = None, compile: bool = False):
        """channels_last None: on where it pays (CUDA); compile: torch.compile the UNet (see pipelines/speed)."""
        self.model = model
        self.device = torch.device(device)
        self.channels_last = False
        if model.method.backbone == "sd":
            self.channels_last = speed.use_channels_last(self.device) if channels_last is None else channels_last
            if self.channels_last:
                speed.to_channels_last(model.unet, model.vae)
            if compile:
                speed.compile_unet(model.unet)
        self.memory = memory or TORCH_MEMORY  # free memory / cache release: PyTorch's, or the host's
        self.output_device = torch.device(output_device)  # where the result goes (ComfyUI's intermediate device)
        # The backbone seam: the SD one-step path is this class itself; others come from the
        # method's description (pipelines/resshift.py for ResShift, SinSR and HF-Diff).
        self.backbone = self if model.method.backbone == "sd" else _backbone(model, self.device, self.memory)

    # -- settings -------------------------------------------------------------------------------
    def resolve(self, settings: UpscaleSettings) -> UpscaleSettings:
        """Fill unset fields from the method's defaults."""
        return resolve_settings(self.model.method, settings)

    def plan(self, height: int, width: int, settings: UpscaleSettings) -> ResizePlan:
        return plan_for_method(self.model.method, height, width, settings)

    def working_plan(self, height: int, width: int, settings: UpscaleSettings) -> ResizePlan:
        """The geometry of one input through this model's backbone, refused above the pixel limit."""
        plan = self.backbone.plan(height, width, settings)
        _check_pixels(plan, settings)
        return plan

    # -- per-image conditions on their own (the DTSM Timestep / Degradation Estimator nodes) ---------
    @torch.no_grad()
    def predict_timesteps(self, images: torch.Tensor, scale: float = 4.0, mode: str = "sample", seed: int = 0,
                          fixed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hero-SR's DTSM on a batch (B, H, W, C): it sees the same upscaled image the UNet will."""
        images = check_images(images).clamp(0, 1)
        upscaled = upscale_input(self.model.method, images, scale, self.device)
        timesteps, logits = self.model.predict_timesteps(upscaled, mode=mode, seed=seed, fixed=fixed)
        return timesteps.cpu(), logits.cpu()

    @torch.no_grad()
    def estimate_degradation(self, images: torch.Tensor) -> torch.Tensor:
        """S3Diff's degradation scores (B, 2) = (blur, noise) of a batch (B, H, W, C), at input size."""
        images = check_images(images).clamp(0, 1)
        rgb = split_channels(images.permute(0, 3, 1, 2).float()).rgb
        return self.model.estimate_degradation(rgb.to(self.device)).cpu()

    # -- the run ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, settings: UpscaleSettings | None = None, hooks: RunHooks | None = None
    ) -> torch.Tensor:
        """Upscale a batch (B, H, W, C) in [0, 1]; returns (B, H', W', C) float32 on the output device."""
        settings = self.resolve(settings or UpscaleSettings())
        validate_settings(settings)
        hooks = hooks or RunHooks()
        images = clamp_to_unit_range(check_images(images), "image", hooks.warn)
        parts = split_channels(images.permute(0, 3, 1, 2).float())
        backbone = self.backbone
        plan = self.working_plan(images.shape[1], images.shape[2], settings)
        x, reference = backbone.prepare(parts.rgb, plan)  # model input; colour-fix reference, [0, 1]
        restored = backbone.run(parts.rgb, x, settings, hooks)
        restored = color_fix(restored, reference, settings.color_fix, settings.color_fix_strength)
        out_hw = plan.target_hw if settings.output_size == "exact" else plan.model_hw
        if tuple(restored.shape[-2:]) != tuple(out_hw):
            restored = resize_image(restored, out_hw, self.model.method.upscale_filter).clamp(0, 1)
        alpha = None
        if parts.alpha is not None:
            alpha = resize_image(parts.alpha.to(self.device), out_hw, self.model.method.upscale_filter).clamp(0, 1)
        result = merge_channels(restored, alpha, parts.grayscale)
        # channels-last on the device, then one transfer (no strided copy across the bus)
        return result.float().permute(0, 2, 3, 1).contiguous().to(self.output_device)

    # -- the SD backbone --------------------------------------------------------------------------
    def prepare(self, rgb: torch.Tensor, plan: ResizePlan) -> tuple[torch.Tensor, torch.Tensor]:
        x = apply_resize_plan(rgb.to(self.device), plan)  # the upscaled input, [0, 1]
        return x, x

    def run(self, original: torch.Tensor, x: torch.Tensor, settings: UpscaleSettings, hooks: RunHooks) -> torch.Tensor:
        return self._run_with_oom_fallback(x, settings, self.conditions(original, x, settings), hooks)

    def conditions(self, original: torch.Tensor, upscaled: torch.Tensor, settings: UpscaleSettings) -> Conditions:
        """Prompt embeddings, per-image timesteps and (S3Diff) degradation modulation for a batch."""
        model = self.model
        batch = upscaled.shape[0]
        embeds = model.encode_prompt(settings.prompt, self.device)
        negative = None
        if settings.guidance != 1.0:
            negative = model.encode_prompt(settings.negative_prompt, self.device)
        timesteps = settings.timesteps
        if timesteps is None and model.dtsm is not None:
            timesteps, _ = model.predict_timesteps(upscaled, mode="sample", seed=settings.timestep_seed)
        if timesteps is None:
            timesteps = model.method.timestep
        timesteps = torch.as_tensor(timesteps, device=self.device).long().reshape(-1)
        if timesteps.numel() not in (1, batch):
            raise ValueError(f"got {timesteps.numel()} timesteps for a batch of {batch} images")
        timesteps = timesteps.expand(batch).clone()
        if int(timesteps.min()) < 0 or int(timesteps.max()) > 999:
            raise ValueError(f"timesteps must lie in [0, 999], got {timesteps.tolist()}")
        modulation = None
        if model.modulator is not None:
            degradation = settings.degradation
            if degradation is None:
                degradation = model.estimate_degradation(original.to(self.device))
            modulation = model.modulation(check_degradation(degradation, batch).to(self.device))
        return Conditions(prompt_embeds=embeds, negative_embeds=negative, guidance=float(settings.guidance),
                          timesteps=timesteps, modulation=modulation)

    def _run_with_oom_fallback(self, x: torch.Tensor, settings: UpscaleSettings, conditions: Conditions,
                               hooks: RunHooks) -> torch.Tensor:
        """Restore; on out-of-memory halve the tiles and retry, then fall back to one image at a time."""
        while True:
            try:
                return self.restore(x, settings, conditions, hooks)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                smaller = _halve_tiles(settings)
                if smaller is None:
                    if x.shape[0] > 1:
                        hooks.warn("out of memory even with the smallest tiles; processing images one at a time")
                        return torch.cat([self.restore(x[i : i + 1], settings, conditions.select(i), hooks)
                                          for i in range(x.shape[0])])
                    raise
                self.memory.free_cached(self.device)
                hooks.warn(
                    f"out of memory; retrying with smaller tiles (latent {smaller.latent_tile}, "
                    f"VAE encoder {smaller.vae_encoder_tile}px, VAE decoder {smaller.vae_decoder_tile})"
                )
                settings = smaller

    def restore(self, x: torch.Tensor, settings: UpscaleSettings, conditions: Conditions,
                hooks: RunHooks) -> torch.Tensor:
        """The model proper on the upscaled RGB batch in [0, 1]: returns the restored image in [0, 1]."""
        model = self.model
        method = model.method
        original_hw = tuple(x.shape[-2:])
        if method.pad_multiple > 1:
            x = (reflect_pad_to_multiple(x * 2 - 1, method.pad_multiple)[0] + 1) / 2
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        counter = self._tile_counter(x, settings, hooks)

        latent = self.encode(x, settings, conditions, hooks, counter.stage("encode")) * model.scaling_factor
        eps = tiled_eps(latent, self._eps_function(conditions), settings.latent_tile, settings.latent_overlap,
                        settings.tile_batch, on_tile=counter.stage("unet"))
        z0 = x0_from_eps(latent, eps, conditions.timesteps, model.schedule)

        image = self.decode(z0 / model.scaling_factor, settings, hooks, counter.stage("decode")).float()
        return crop_to(image.clamp_(-1, 1).add_(1).div_(2), original_hw)  # in place: the decoder's own tensor

    def encode(self, x: torch.Tensor, settings: UpscaleSettings, conditions: Conditions, hooks: RunHooks,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """VAE latent (unscaled) of images in [0, 1]: the mean, or a seeded sample."""
        vae = self.model.vae
        vae_dtype = next(vae.parameters()).dtype

        def run(images: torch.Tensor, done_before: int) -> torch.Tensor:
            def report(done: int, total: int) -> None:
                if progress:
                    progress(done_before + done, total * x.shape[0] // images.shape[0])

            return encode_tiled(vae, (images * 2 - 1).to(vae_dtype), tile_px=settings.vae_encoder_tile,
                                pad_px=ENCODER_PAD_PX, tile_batch=settings.tile_batch, progress=report,
                                check_interrupt=hooks.check_interrupt, norm_stats=settings.vae_norm_stats,
                                memory=self.memory)

        if conditions.modulation is None:
            moments = run(x, 0)
        else:  # the encoder LoRA is modulated per image: encode one image at a time
            parts = []
            for i in range(x.shape[0]):
                self.model.set_vae_modulation(conditions.modulation[1][i : i + 1])
                parts.append(run(x[i : i + 1], i * self._tiles_per_image(x, settings)))
            moments = torch.cat(parts)
        return self._latent_from_moments(moments.float(), settings.seed)

    def _eps_function(self, conditions: Conditions):
        """eps(tiles, image_index): one UNet call per tile batch, CFG batched into the same call."""
        model = self.model
        dtype = next(model.unet.parameters()).dtype
        guided = conditions.negative_embeds is not None

        def eps_fn(tiles: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            count = tiles.shape[0]
            embeds = conditions.prompt_embeds.expand(count, -1, -1)
            timesteps = conditions.timesteps[index]
            latents = tiles.to(dtype)
            if guided:
                embeds = torch.cat([conditions.negative_embeds.expand(count, -1, -1), embeds])
                timesteps = torch.cat([timesteps, timesteps])
                latents = torch.cat([latents, latents])
            if conditions.modulation is not None:
                unet_matrices = conditions.modulation[0][index]
                model.set_unet_modulation(torch.cat([unet_matrices, unet_matrices]) if guided else unet_matrices)
            eps = model.unet(latents, timesteps, encoder_hidden_states=embeds.to(dtype)).sample
            if not guided:
                return eps
            negative, positive = eps.float().chunk(2)
            return negative + conditions.guidance * (positive - negative)

        return eps_fn

    def decode(self, z: torch.Tensor, settings: UpscaleSettings, hooks: RunHooks,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Tiled VAE decode of unscaled latents; NaN/inf in fp16/bf16 triggers one fp32 retry."""
        vae = self.model.vae
        vae_dtype = next(vae.parameters()).dtype
        image = decode_tiled(vae, z.to(vae_dtype), tile_latent=settings.vae_decoder_tile,
                             pad_latent=DECODER_PAD_LATENT, tile_batch=settings.tile_batch,
                             progress=progress, check_interrupt=hooks.check_interrupt,
                             norm_stats=settings.vae_norm_stats, memory=self.memory)
        if vae_dtype != torch.float32 and not torch.isfinite(image).all():
            hooks.warn("the VAE produced NaN/inf in reduced precision; decoding again in fp32 (the VAE stays fp32)")
            vae.to(torch.float32)
            image = decode_tiled(vae, z.float(), tile_latent=settings.vae_decoder_tile,
                                 pad_latent=DECODER_PAD_LATENT, tile_batch=settings.tile_batch,
                                 check_interrupt=hooks.check_interrupt, norm_stats=settings.vae_norm_stats,
                                 memory=self.memory)
        return image

    def _latent_from_moments(self, moments: torch.Tensor, seed: int | None) -> torch.Tensor:
        mean, logvar = moments.chunk(2, dim=1)
        if seed is None:
            return mean
        generator = torch.Generator(device=moments.device).manual_seed(int(seed))
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=moments.device, dtype=mean.dtype)
        return mean + std * noise

    def _tiles_per_image(self, x: torch.Tensor, settings: UpscaleSettings) -> int:
        return len(tile_grid(x.shape[-2], x.shape[-1], settings.vae_encoder_tile, ENCODER_PAD_PX, snap_multiple=8))

    def _tile_counter(self, x: torch.Tensor, settings: UpscaleSettings, hooks: RunHooks) -> _TileCounter:
        batch, _, height, width = x.shape
        encode = len(tile_grid(height, width, settings.vae_encoder_tile, ENCODER_PAD_PX, snap_multiple=8)) or 1
        latent_h, latent_w = height // 8, width // 8
        unet = max(1, len(latent_tile_grid(latent_h, latent_w, settings.latent_tile, settings.latent_overlap)))
        decode = len(tile_grid(latent_h, latent_w, settings.vae_decoder_tile, DECODER_PAD_LATENT)) or 1
        return _TileCounter({"encode": encode * batch, "unet": unet * batch, "decode": decode * batch}, hooks)


def resolve_settings(method: MethodSpec, settings: UpscaleSettings) -> UpscaleSettings:
    """Unset fields filled from the method's defaults."""
    return replace(
        settings,
        prompt=settings.prompt or method.prompt,
        color_fix=settings.color_fix or method.color_fix,
        latent_tile=settings.latent_tile or method.latent_tile,
        latent_overlap=method.latent_overlap if settings.latent_overlap is None else settings.latent_overlap,
        vae_encoder_tile=settings.vae_encoder_tile or method.vae_encoder_tile,
        vae_decoder_tile=settings.vae_decoder_tile or method.vae_decoder_tile,
        negative_prompt=method.negative_prompt if settings.negative_prompt is None else settings.negative_prompt,
        guidance=method.guidance if settings.guidance is None else settings.guidance,
    )


def _backbone(model, device: torch.device, memory: MemoryProvider):
    if model.method.backbone == "resshift":
        from .resshift import ResShiftBackbone

        return ResShiftBackbone(model, device, memory)
    raise ValueError(f"unknown backbone {model.method.backbone!r} in the {model.method.display_name} description")


def _check_pixels(plan: ResizePlan, settings: UpscaleSettings) -> None:
    biggest = max(plan.model_hw[0] * plan.model_hw[1], plan.target_hw[0] * plan.target_hw[1])
    if biggest > settings.max_output_pixels:
        height, width = plan.input_hw
        raise ImageTooLargeError(
            f"a {width}x{height} input at x{settings.scale:g} needs a {plan.model_hw[1]}x{plan.model_hw[0]} "
            f"working image, above the limit of {settings.max_output_pixels} pixels; lower the scale, "
            "downscale the input, or raise the limit (max_output_pixels / --max-pixels)"
        )


def plan_for_method(method: MethodSpec, height: int, width: int, settings: UpscaleSettings) -> ResizePlan:
    """The method's preprocessing geometry for one input size, with the pixel limit enforced."""
    check_scale(settings.scale)
    plan = plan_resize(
        (height, width), settings.scale, min_short_side=int(method.process_size // settings.scale),
        snap=method.snap, enlarge_filter=method.enlarge_filter, upscale_filter=method.upscale_filter,
        snap_filter=method.snap_filter,
    )
    _check_pixels(plan, settings)
    if min(plan.model_hw) < 8 and method.pad_multiple < 8:
        raise ValueError(f"a {width}x{height} input is too small to process at x{settings.scale:g}")
    return plan


def upscale_input(method: MethodSpec, images: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """The method's upscaled RGB input (B, 3, h, w) in [0, 1] for a batch (B, H, W, C)."""
    rgb = split_channels(images.permute(0, 3, 1, 2).float()).rgb
    plan = plan_for_method(method, images.shape[1], images.shape[2], UpscaleSettings(scale=scale))
    return apply_resize_plan(rgb.to(device), plan)


def check_degradation(scores: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, 2) blur/noise scores in [0, 1]; one row is applied to every image."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    if scores.dim() != 2 or scores.shape[1] != 2 or scores.shape[0] not in (1, batch):
        raise ValueError(f"degradation must be (blur, noise) per image, shape (B, 2); got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
        raise ValueError(f"degradation scores must lie in [0, 1], got {scores.tolist()}")
    return scores.expand(batch, 2)


def _halve_tiles(settings: UpscaleSettings) -> UpscaleSettings | None:
    changes = {}
    for name, minimum in MIN_TILES.items():
        value = getattr(settings, name)
        if value > minimum:
            changes[name] = max(minimum, value // 2)
    if not changes:
        return None
    if "latent_tile" in changes:
        changes["latent_overlap"] = min(settings.latent_overlap, changes["latent_tile"] // 3)
    return replace(settings, **changes)
