"""Step time and peak memory of one OSEDiff training step (generator + VSD + fake-score update), random
weights, with the shared-base design against the official three-UNet layout's parameter bytes.

    python benchmarks/bench_training.py --model tiny --batch 2 --crop 64          # CPU smoke run
    python benchmarks/bench_training.py --model sd21 --batch 4 --crop 512 --mixed-precision bf16 \
        --gradient-checkpointing --device cuda                                     # the 24 GB question

`--model sd21` builds the SD-2.1-base UNet/VAE from the shipped configs and a full-width VGG16 for
LPIPS with random weights: memory and time do not depend on the values. Peak memory is CUDA's
max_memory_allocated on a GPU, and the process's peak RSS on the CPU. The first `--warmup` steps are
not timed.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FULL_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _modules(kind: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if kind == "tiny":
        import tinymodels

        return (UNet2DConditionModel(**tinymodels.TINY_UNET_CONFIG), AutoencoderKL(**tinymodels.TINY_VAE_CONFIG),
                tinymodels.TINY_TEXT_CONFIG["hidden_size"])
    from onestep_sr.models.base_models import load_config

    return (UNet2DConditionModel(**load_config("sd21_base", "unet")), AutoencoderKL(**load_config("sd21_base", "vae")),
            1024)


def _lpips(kind: str):
    from onestep_sr.training.losses.lpips import LPIPSVGG

    import training_fixtures as tf

    widths = tf.TINY_WIDTHS if kind == "tiny" else FULL_VGG_WIDTHS
    state, channels = {}, 3
    for index, width in zip(tf.VGG_CONVS, widths, strict=True):
        state[f"features.{index}.weight"] = torch.randn(width, channels, 3, 3) * 0.05
        state[f"features.{index}.bias"] = torch.zeros(width)
        channels = width
    taps = (widths[1], widths[3], widths[6], widths[9], widths[12])
    return LPIPSVGG(state, {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(taps)})


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21"], default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from onestep_sr.training.adapters import add_osediff_adapters, set_osediff_trainable
    from onestep_sr.training.osediff import (
        OSEDiffTrainModel,
        StepRandom,
        fake_parameters,
        generator_parameters,
    )

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet, vae, width = _modules(args.model)
    base_bytes = _bytes(unet)
    add_osediff_adapters(unet, vae, 4, 4)
    set_osediff_trainable(unet, vae)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = OSEDiffTrainModel(unet, vae, None, _lpips(args.model), {"mse": 1.0, "lpips": 2.0, "vsd": 1.0}).to(device)
    unet.train()
    opt_g = torch.optim.AdamW([p for _, p in generator_parameters(model)], lr=5e-5, weight_decay=1e-2)
    opt_f = torch.optim.AdamW([p for _, p in fake_parameters(model)], lr=5e-5, weight_decay=1e-2)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    embeds = torch.randn(args.batch, 77, width, device=device)
    negative = torch.randn(args.batch, 77, width, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        lq = torch.rand(args.batch, 3, args.crop, args.crop, device=device) * 2 - 1
        gt = torch.rand(args.batch, 3, args.crop, args.crop, device=device) * 2 - 1
        random = StepRandom.make(0, step, list(range(args.batch)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model("generator", lq=lq, gt=gt, embeds=embeds, negative=negative, random=random)
        out["total"].backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            fake = model("fake", **model.fake_inputs(out["z0"], embeds, random))
        fake["fake"].backward()
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS; " \
               f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20:.2f} GiB during the steps)"
    shared = _bytes(unet)
    print(f"model {args.model}, batch {args.batch}, crop {args.crop}, {args.mixed_precision}, "
          f"checkpointing {args.gradient_checkpointing}, {device}")
    print(f"step time: median {statistics.median(times):.3f} s over {len(times)} steps")
    print(f"peak memory: {peak}")
    print(f"UNet parameter+buffer bytes: shared base with both LoRA sets {shared / 2**20:.1f} MiB; official layout "
          f"(generator + real + fake UNets) {3 * base_bytes / 2**20:.1f} MiB; ratio {shared / (3 * base_bytes):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
