"""OneStep Upscale: one UNet pass on the upscaled image's latent."""

from __future__ import annotations

from ..models.tiled_vae import NORM_STATS_MODES
from ..pipelines.color_fix import COLOR_FIX_METHODS
from ..pipelines.onestep import RunHooks, UpscaleSettings
from ..pipelines.validation import check_images
from . import comfy_adapter as comfy
from .handle import MODEL_TYPE

METHOD_DEFAULT = "method default"


class OneStepSRUpscale:
    DESCRIPTION = (
        "Upscales images with one diffusion UNet pass (OSEDiff): resize x scale, VAE encode, one UNet step, "
        "decode, colour fix. Large images are tiled; the progress bar counts tiles."
    )
    CATEGORY = "image/upscaling/OneStep SR"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The upscaled images (alpha and grayscale are preserved).",)

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
                    "tooltip": "Colour correction against the upscaled input: adain (OSEDiff default) matches "
                               "per-channel mean/std; wavelet keeps the input's low frequencies; none."}),
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
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed for latent sampling (latent = sample) and for Hero-SR's own "
                                            "timestep choice when no timestep is connected."}),
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
                "timestep": ("SR_TIMESTEP", {
                    "tooltip": "Per-image timesteps from DTSM Timestep (Hero-SR). Unconnected: Hero-SR picks t "
                               "itself (seeded sample); other methods use their fixed t (999)."}),
                "degradation": ("SR_DEGRADATION", {
                    "tooltip": "Blur/noise scores from Degradation Estimator (S3Diff). Unconnected: estimated "
                               "automatically."}),
                "vae_norm_stats": (list(NORM_STATS_MODES), {
                    "default": "auto",
                    "tooltip": "GroupNorm statistics of the tiled VAE. exact: every tile of the image is held at "
                               "once (memory grows with the image). estimated: measured on small probe tiles "
                               "first, then tiles run one batch at a time (bounded memory, tiny differences). "
                               "auto: exact when it fits in free memory, else estimated."}),
            },
        }

    def upscale(self, onestep_model, image, prompt, scale, color_fix, latent_tile, latent_overlap,
                vae_encoder_tile, vae_decoder_tile, latent, seed, negative_prompt="", guidance=0.0,
                timestep=None, degradation=None, vae_norm_stats="auto"):
        image = check_images(image, "OneStep Upscale input 'image'")
        settings = UpscaleSettings(
            scale=scale, prompt=prompt, color_fix=None if color_fix == METHOD_DEFAULT else color_fix,
            latent_tile=latent_tile, latent_overlap=latent_overlap, vae_encoder_tile=vae_encoder_tile,
            vae_decoder_tile=vae_decoder_tile, seed=seed if latent == "sample" else None,
            negative_prompt=negative_prompt or None, guidance=guidance or None,
            timesteps=None if timestep is None else timestep["timesteps"],
            degradation=degradation, timestep_seed=seed, vae_norm_stats=vae_norm_stats,
        )
        pipeline = onestep_model.pipeline()
        hooks = RunHooks(progress=comfy.progress_bar(1), check_interrupt=comfy.check_interrupt)
        result = pipeline(image, settings, hooks)
        return (result.to(comfy.intermediate_device()),)
