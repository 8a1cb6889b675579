"""One image in, one upscaled image out, set up from `onestep-sr upscale`'s arguments.

Ray actors build this once and call it per image. It makes the same model, settings and per-image
choices (CLIP tags for `--prompt auto`, DTSM argmax) as the single-process loop in `cli.run_upscale`,
from the same helpers; when that loop is reshaped around `batch/`, it can call this too, so both
paths share one definition.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace

import torch


def build_upscaler(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """(H, W, C) in [0, 1] -> (H', W', C) in [0, 1], with the model loaded once."""
    from .. import cli
    from ..models.base_models import load_base
    from ..pipelines.model import load_onestep_model
    from ..pipelines.onestep import OneStepPipeline, RunHooks, UpscaleSettings

    device = cli._pick_device(args.device)
    dtype = cli._pick_dtype(args.dtype, device)
    model = load_onestep_model(load_base(args.base, args.tokenizer), args.weights, args.method,
                               de_net_path=args.de_net).to(device, dtype)
    pipeline = OneStepPipeline(model, device)
    timestep_mode, fixed_timestep = cli._parse_timestep(args.timestep)
    if args.prompt == "auto" and not args.clip:
        raise ValueError("--prompt auto needs --clip FOLDER (a transformers CLIPModel folder)")
    tagger = cli._Tagger(args.clip, device) if args.prompt == "auto" else None
    settings = UpscaleSettings(
        scale=args.scale, prompt=args.prompt, color_fix=args.color_fix, latent_tile=args.latent_tile,
        latent_overlap=args.latent_overlap, vae_encoder_tile=args.vae_encoder_tile,
        vae_decoder_tile=args.vae_decoder_tile, tile_batch=args.tile_batch, seed=args.seed,
        vae_norm_stats=args.vae_stats, output_size=args.output_size, max_output_pixels=args.max_pixels,
        negative_prompt=args.negative_prompt, guidance=args.guidance,
        degradation=cli._parse_degradation(args.degradation), timesteps=fixed_timestep,
        timestep_seed=args.timestep_seed,
    )

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
