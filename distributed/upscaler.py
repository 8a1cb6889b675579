"""One image in, one upscaled image out, set up from `onestep-sr upscale`'s arguments.

Ray actors build this once and call it per image. It makes the same model, settings and per-image
choices (CLIP tags for `--prompt auto`, DTSM argmax) as the single-process loop in
`batch/upscale_cli.py`, from the same helpers (settings and model loading are that module's).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace

import torch


def build_upscaler(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """(H, W, C) in [0, 1] -> (H', W', C) in [0, 1], with the model loaded once."""
    from .. import cli
    from ..batch.upscale_cli import _load_pipeline, _settings
    from ..pipelines.onestep import RunHooks

    settings, timestep_mode = _settings(args)
    device = cli._pick_device(args.device)
    pipeline = _load_pipeline(args, device, cli._pick_dtype(args.dtype, device))
    tagger = cli._Tagger(args.clip, device) if args.prompt == "auto" else None

    def upscale(pixels: torch.Tensor) -> torch.Tensor:
        image = pixels.unsqueeze(0)
        run_settings = settings
        if tagger is not None:
            run_settings = replace(settings, prompt=tagger.prompt(image[0]))
        if timestep_mode == "argmax":
            chosen, _ = pipeline.predict_timesteps(image, scale=args.scale, mode="argmax")
            run_settings = replace(settings, timesteps=chosen)
        return pipeline(image, run_settings, RunHooks())[0].cpu()

    return upscale
