"""DTSM Timestep: Hero-SR's time-step module picks t per image (seeded), for OneStep Upscale."""

from __future__ import annotations

from ..models.dtsm import SELECTION_MODES
from ..pipelines.validation import check_images
from .handle import MODEL_TYPE, TIMESTEP_TYPE


class OneStepSRTimestep:
    DESCRIPTION = (
        "Hero-SR's dynamic time-step module (DTSM) chooses the diffusion timestep t for each image from "
        "101 candidates (1, 9, 19, ..., 999). Connect the result to OneStep Upscale's timestep input; its "
        "scale must equal this node's (the value carries the scale and OneStep Upscale checks it)."
    )
    CATEGORY = "image/upscaling/OneStep SR"
    FUNCTION = "choose"
    RETURN_TYPES = (TIMESTEP_TYPE, "INT")
    RETURN_NAMES = ("timestep", "t")
    OUTPUT_TOOLTIPS = ("Per-image timesteps for OneStep Upscale.", "The first image's t, for display.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The images that OneStep Upscale will upscale."}),
                "onestep_model": (MODEL_TYPE, {"tooltip": "A Hero-SR model from Load OneStep SR."}),
                "mode": (list(SELECTION_MODES), {
                    "default": "sample",
                    "tooltip": "sample: draw t from the DTSM's distribution as the release does (seeded, so "
                               "reproducible); argmax: the most likely t; fixed: use fixed_timestep."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed for mode = sample."}),
                "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 8.0, "step": 0.5,
                                    "tooltip": "Use the same scale as OneStep Upscale: the DTSM looks at the "
                                               "upscaled image."}),
                "fixed_timestep": ("INT", {"default": 999, "min": 0, "max": 999,
                                           "tooltip": "t for every image when mode = fixed."}),
            },
        }

    def choose(self, image, onestep_model, mode, seed, scale, fixed_timestep):
        image = check_images(image, "DTSM Timestep input 'image'")
        pipeline = onestep_model.pipeline()
        timesteps, logits = pipeline.predict_timesteps(image, scale=scale, mode=mode, seed=seed,
                                                       fixed=fixed_timestep if mode == "fixed" else None)
        return ({"timesteps": timesteps, "logits": logits, "scale": float(scale)}, int(timesteps[0]))
