"""The `upscale` / `info` options of the ResShift family (ResShift, SinSR, HF-Diff), kept apart from
cli.py so the SD options and these evolve separately. Registered by cli.py in two lines."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_resshift_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ResShift, SinSR and HF-Diff (no --base needed)")
    group.add_argument("--autoencoder", default=None,
                       help="the VQ-f4 autoencoder (default: autoencoder_vq_f4.pth beside the weights)")
    group.add_argument("--steps", type=int, default=None,
                       help="ResShift sampler steps, 1..T, respaced as the official code (default: T = 15, or 4 "
                            "for the v3 model); SinSR and HF-Diff are one-step")
    group.add_argument("--noise", default=None,
                       help="replay recorded noise from an .npz (arrays p{patch}_s{step}; one input image only); "
                            "default: a CPU generator seeded with --seed (12345 when not given)")
    group.add_argument("--model-config", default=None,
                       help="official-format YAML for a model of another size (model/autoencoder/diffusion params)")
    group.add_argument("--chop-size", type=int, default=None,
                       help="LR patch size for big inputs (default 512, stride 7/8 of it, as the official code)")


def loader_options(args: argparse.Namespace) -> dict:
    return {"autoencoder_path": args.autoencoder, "model_config": args.model_config}


def settings_options(args: argparse.Namespace, input_count: int) -> dict:
    if args.noise and input_count != 1:
        raise ValueError(f"--noise replays the draws of one image, but {input_count} inputs were given")
    if args.noise and not Path(args.noise).is_file():
        raise ValueError(f"noise file not found: {Path(args.noise).name} (looked in {Path(args.noise).parent})")
    return {"steps": args.steps, "noise": args.noise, "chop_size": args.chop_size}


def describe_method(name: str) -> str:
    """What `onestep-sr info` says about a method: family, variant, steps."""
    from .pipelines.methods import get_method

    method = get_method(name)
    if method.backbone != "resshift":
        return f"{name} ({method.display_name}, Stable Diffusion one-step: needs an SD-2.x base)"
    steps = "one step" if method.one_step else f"{method.sampler_steps} steps"
    return (f"{name} ({method.display_name}: ResShift family, Swin UNet + VQ-f4 autoencoder, {steps}, "
            f"schedule {method.model_config})")
