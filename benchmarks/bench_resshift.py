"""Time SinSR/HF-Diff one-step against ResShift's 15- and 4-step samplers on the same input.

Same Swin UNet and VQ-f4 weights (random; published sizes with --model full, or the tiny test
sizes), the same LR image, one process; prints wall time per variant and its ratio to one-step.

    python benchmarks/bench_resshift.py --model full --size 64 --device cpu
    python benchmarks/bench_resshift.py --model full --size 256 --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(kind: str):
    from onestep_sr.models.resshift.config import shipped_config
    from onestep_sr.models.resshift.swin_unet import SwinUNet
    from onestep_sr.models.resshift.vq_autoencoder import VQAutoencoder

    config = shipped_config("sinsr_s15")
    if kind == "tiny":
        import sys

        sys.path.insert(0, str(ROOT / "tests"))
        import synthetic_resshift as syn

        config = replace(config, unet=syn.UNET_CONFIG, vq=syn.VQ_CONFIG)
    torch.manual_seed(0)
    return config, SwinUNet(config.unet).eval(), VQAutoencoder(config.vq).eval()


def main() -> None:
    from onestep_sr.models.resshift.diffusion import ResShiftDiffusion
    from onestep_sr.models.resshift.sampler import SeededNoise, upscale_lr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--size", type=int, default=64, help="LR side in pixels (output is 4x)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    config, unet, vq = build(args.model)
    unet.to(args.device).set_torso_dtype(dtype)
    vq.to(args.device, dtype)
    lr = (torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(args.device)
    variants = {
        "SinSR / HF-Diff, 1 step": (ResShiftDiffusion(replace(config.diffusion, cap_sqrt_001=True)), True),
        "ResShift v1/v2, 15 steps": (ResShiftDiffusion(config.diffusion), False),
        "ResShift v3, 4 steps": (ResShiftDiffusion(replace(config.diffusion, steps=4, min_noise_level=0.2)), False),
    }

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    upscale_lr(unet, vq, variants["SinSR / HF-Diff, 1 step"][0], lr, SeededNoise(), True)  # warm-up
    times = {}
    for name, (diffusion, one_step) in variants.items():
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            upscale_lr(unet, vq, diffusion, lr, SeededNoise(), one_step)
            sync()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    base = times["SinSR / HF-Diff, 1 step"]
    print(f"model {args.model}, LR {args.size}x{args.size} -> {4 * args.size}x{4 * args.size}, {args.device} {args.dtype}")
    print(f"{'variant':28s} {'time s':>8s} {'x one-step':>11s}")
    for name, seconds in times.items():
        print(f"{name:28s} {seconds:8.2f} {seconds / base:11.2f}")


if __name__ == "__main__":
    main()
