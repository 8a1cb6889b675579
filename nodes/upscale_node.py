"""OneStep Upscale: one UNet pass on the upscaled image's latent."""

from __future__ import annotations

import logging

import torch

from ..models.tiled_vae import NORM_STATS_MODES
from ..pipelines.color_fix import COLOR_FIX_METHODS
from ..pipelines.onestep import RunHooks, UpscaleSettings
from ..pipelines.validation import check_images
from . import comfy_adapter as comfy
from .handle import DEGRADATION_INPUT, MODEL_TYPE, TIMESTEP_INPUT

log = logging.getLogger("onestep_sr")
METHOD_DEFAULT = "method default"
DEFAULT_MAX_MEGAPIXELS = 67.11  # 8192 x 8192, the CLI's default limit


def _alpha_from_mask(mask: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor | None:
    """Load Image's MASK (1 = transparent, B x H x W) -> alpha (B, H, W, 1), or None when there is no alpha.
    Load Image gives a 64x64 zero mask for images without alpha: that means no alpha, not an error."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape[-2:]) != tuple(image.shape[1:3]):
        if not bool(mask.any()):
            return None
        raise ValueError(f"OneStep Upscale: the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image "
                         f"{image.shape[2]}x{image.shape[1]}; connect the MASK of the same Load Image")
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"OneStep Upscale: {mask.shape[0]} masks for {image.shape[0]} images")
    return (1.0 - mask.float()).expand(image.shape[0], *mask.shape[-2:]).unsqueeze(-1)


class OneStepSRUpscale:
    DESCRIPTION = (
        "Upscales images with one diffusion pass, using the method Load OneStep SR loaded. OSEDiff, S3Diff, "
        "Hero-SR: resize x scale, VAE encode, one UNet step, decode, colour fix; large images are tiled and the "
        "progress bar counts tiles. SinSR and HF-Diff run one Swin-UNet step in a VQ latent, ResShift its "
        "15/4-step sampler; they ignore prompt, CFG, timestep, degradation and tile inputs (a warning says so), "
        "use the seed for their noise and chop big inputs into 512-px patches. Outputs are limited to "
        "max_megapixels (8192x8192 by default)."
    )
    CATEGORY = "image/upscaling/OneStep SR"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = (
        "The upscaled images (RGB; an RGBA input keeps its alpha).",
        "The mask input upscaled the same way (1 = transparent), for Save/Join Image with Alpha; all zeros when "
        "no mask is connected.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "onestep_model": (MODEL_TYPE, {"tooltip": "From Load OneStep SR."}),
                "image": ("IMAGE", {"tooltip": "Images to upscale (a batch shares one size)."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Text describing the content. OSEDiff was trained with tag lists "
                               "('tag1, tag2, ...'; see CLIP Prompt Extract); a generation prompt works too. "
                               "Empty: the method's default prompt."}),
                "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 8.0, "step": 0.5,
                                    "tooltip": "Upscale factor. The methods were trained at x4."}),
                "color_fix": ([METHOD_DEFAULT, *COLOR_FIX_METHODS], {
                    "default": METHOD_DEFAULT,
                    "tooltip": "Colour correction against the upscaled input. adain (OSEDiff/Hero-SR default): "
                               "per-channel mean/std, removes a global cast. wavelet (S3Diff default): takes the "
                               "input's coarse colours, keeps the output's detail. lab: adain in CIELAB, fewer hue "
                               "shifts on saturated images. hsv: the input's hue and saturation per pixel, strongest "
                               "colour fidelity. wavelet_adaptive: wavelet only where colours drifted. none."}),
                "latent_tile": ("INT", {"default": 96, "min": 32, "max": 512, "step": 8,
                                        "tooltip": "UNet tile size in latent pixels (x8 image pixels). Bigger "
                                                   "tiles give more coherent results and need more VRAM."}),
                "latent_overlap": ("INT", {"default": 32, "min": 0, "max": 256, "step": 8,
                                           "tooltip": "Overlap between UNet tiles in latent pixels."}),
                "vae_encoder_tile": ("INT", {"default": 1024, "min": 256, "max": 8192, "step": 64,
                                             "tooltip": "VAE encoder tile in image pixels."}),
                "vae_decoder_tile": ("INT", {"default": 224, "min": 32, "max": 1024, "step": 8,
                                             "tooltip": "VAE decoder tile in latent pixels."}),
                "latent": (["mean", "sample"], {
                    "default": "mean",
                    "tooltip": "mean: deterministic VAE latent. sample: draw it with the seed, as the "
                               "official code does (slightly different each seed)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed for latent sampling (latent = sample), for Hero-SR's own "
                                            "timestep choice when no timestep is connected, and for the noise "
                                            "of SinSR/HF-Diff/ResShift (the official scripts use 12345)."}),
            },
            "optional": {  # appended over releases: never reorder (saved workflows store widgets by position)
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Negative prompt for classifier-free guidance. Empty: the method's own "
                               "(S3Diff's published negative prompt)."}),
                "guidance": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 20.0, "step": 0.01,
                    "tooltip": "Classifier-free guidance scale. 0: the method's default (S3Diff 1.07, others "
                               "1.0). 1.0 runs no negative pass (half the UNet cost)."}),
                "timestep": (TIMESTEP_INPUT, {
                    "tooltip": "Per-image timesteps from DTSM Timestep (Hero-SR; its scale must equal this node's). "
                               "Unconnected: Hero-SR picks t itself (seeded sample). Other methods ignore it "
                               "(with a warning) and use their fixed t (999)."}),
                "degradation": (DEGRADATION_INPUT, {
                    "tooltip": "Blur/noise scores from Degradation Estimator (S3Diff). Unconnected: estimated "
                               "automatically. Other methods ignore it (with a warning)."}),
                "vae_norm_stats": (list(NORM_STATS_MODES), {
                    "default": "auto",
                    "tooltip": "GroupNorm statistics of the tiled VAE. exact: every tile of the image is held at "
                               "once (memory grows with the image). estimated: measured on small probe tiles "
                               "first, then tiles run one batch at a time (bounded memory, tiny differences). "
                               "auto: exact when it fits in free memory, else estimated."}),
                "color_fix_strength": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "Blend of the colour-corrected and the uncorrected result: 1 = full correction, "
                               "0 = none. Lower it when the correction washes out colours the model restored."}),
                "tile_batch": ("INT", {"default": 4, "min": 1, "max": 64,
                                       "tooltip": "UNet/VAE tiles run together. Lower it if you run out of VRAM; "
                                                  "higher can be faster on big GPUs."}),
                "max_megapixels": ("FLOAT", {
                    "default": DEFAULT_MAX_MEGAPIXELS, "min": 0.01, "max": 1024.0, "step": 0.01,
                    "tooltip": "Refuse outputs (and working images) above this many megapixels; 67.11 = "
                               "8192x8192. Raise it for huge outputs if you have the memory and time."}),
                "mask": ("MASK", {"tooltip": "Alpha from Load Image's MASK output (1 = transparent). It is "
                                             "upscaled and returned as the mask output; without it the mask "
                                             "output is empty."}),
                "steps": ("INT", {
                    "default": 0, "min": 0, "max": 1000,
                    "tooltip": "ResShift's sampler steps (respaced as the official code). 0: the model's own (15, "
                               "or 4 for the v3 model). SinSR and HF-Diff are one-step; other methods ignore it."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def upscale(self, onestep_model, image, prompt, scale, color_fix, latent_tile, latent_overlap,
                vae_encoder_tile, vae_decoder_tile, latent, seed, negative_prompt="", guidance=0.0,
                timestep=None, degradation=None, vae_norm_stats="auto", color_fix_strength=1.0, tile_batch=4,
                max_megapixels=DEFAULT_MAX_MEGAPIXELS, mask=None, steps=0, unique_id=None):
        image = check_images(image, "OneStep Upscale input 'image'")
        with comfy.ui_warnings(unique_id):
            timestep, degradation = self._used_conditions(onestep_model, scale, timestep, degradation)
            alpha = _alpha_from_mask(mask, image)
            settings = UpscaleSettings(
                scale=scale, prompt=prompt, color_fix=None if color_fix == METHOD_DEFAULT else color_fix,
                color_fix_strength=color_fix_strength, latent_tile=latent_tile, latent_overlap=latent_overlap,
                vae_encoder_tile=vae_encoder_tile, vae_decoder_tile=vae_decoder_tile, tile_batch=tile_batch,
                seed=seed if latent == "sample" else None, negative_prompt=negative_prompt or None,
                guidance=guidance or None, timesteps=None if timestep is None else timestep["timesteps"],
                degradation=degradation, timestep_seed=seed, vae_norm_stats=vae_norm_stats,
                max_output_pixels=int(max_megapixels * 1_000_000), steps=steps or None, noise_seed=seed,
            )
            pipeline = onestep_model.pipeline()
            hooks = RunHooks(progress=comfy.progress_bar(1), check_interrupt=comfy.check_interrupt)
            source = image if alpha is None or image.shape[-1] != 3 else torch.cat([image, alpha], dim=-1)
            result = pipeline(source, settings, hooks)
        if alpha is not None and image.shape[-1] == 3:
            result, upscaled_alpha = result[..., :3], result[..., 3]
            out_mask = 1.0 - upscaled_alpha
        else:
            out_mask = torch.zeros(result.shape[:3])
        device = comfy.intermediate_device()
        return (result.to(device), out_mask.to(device))

    @staticmethod
    def _used_conditions(onestep_model, scale: float, timestep, degradation):
        """Drop (with a visible warning) the inputs this method ignores; catch a DTSM scale mismatch."""
        model = onestep_model.model
        name = model.method.display_name
        if timestep is not None:
            if getattr(model, "dtsm", None) is None:
                log.warning("the timestep input is ignored: %s uses its fixed timestep (only Hero-SR uses DTSM "
                            "timesteps)", name)
                timestep = None
            elif timestep.get("scale") is not None and float(timestep["scale"]) != float(scale):
                raise ValueError(f"OneStep Upscale: DTSM Timestep chose t at scale {timestep['scale']:g} but this "
                                 f"node upscales x{scale:g}; set the same scale on both nodes")
        if degradation is not None and getattr(model, "modulator", None) is None:
            log.warning("the degradation input is ignored: %s has no degradation-modulated LoRA (only S3Diff "
                        "uses it)", name)
            degradation = None
        return timestep, degradation
