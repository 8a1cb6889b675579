"""Degradation Estimator: S3Diff's blur/noise scores for each image, estimated or set by hand."""

from __future__ import annotations

import torch

from ..pipelines.onestep import check_degradation
from ..pipelines.validation import check_images
from .handle import DEGRADATION_TYPE, MODEL_TYPE


class OneStepSRDegradationEstimator:
    DESCRIPTION = (
        "Estimates how blurry and how noisy each image is (S3Diff's degradation estimator, scores in [0, 1]). "
        "The scores steer S3Diff's LoRA: higher scores make it restore more aggressively (more generated "
        "detail), lower scores keep closer to the input. Use 'manual' to set them yourself."
    )
    CATEGORY = "image/upscaling/OneStep SR"
    FUNCTION = "estimate"
    RETURN_TYPES = (DEGRADATION_TYPE, "FLOAT", "FLOAT")
    RETURN_NAMES = ("degradation", "blur", "noise")
    OUTPUT_TOOLTIPS = (
        "Per-image scores for OneStep Upscale's degradation input.",
        "The first image's blur score (0 = sharp, 1 = very blurry).",
        "The first image's noise score (0 = clean, 1 = very noisy).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The low-resolution images, at their original size."}),
                "onestep_model": (MODEL_TYPE, {"tooltip": "An S3Diff model from Load OneStep SR."}),
                "mode": (["estimated", "manual"], {
                    "default": "estimated",
                    "tooltip": "estimated: run the degradation estimator; manual: use the blur and noise "
                               "values below for every image."}),
                "blur": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Blur score for mode = manual. Higher: sharper, more invented "
                                              "detail; lower: more faithful to the input."}),
                "noise": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Noise score for mode = manual. Higher: stronger denoising "
                                               "(smoother); lower: keeps fine texture and grain."}),
            },
        }

    def estimate(self, image, onestep_model, mode, blur, noise):
        image = check_images(image, "Degradation Estimator input 'image'")
        if mode == "manual":
            scores = check_degradation(torch.tensor([[blur, noise]]), image.shape[0]).clone()
        else:
            scores = onestep_model.pipeline().estimate_degradation(image)
        return (scores, float(scores[0, 0]), float(scores[0, 1]))
