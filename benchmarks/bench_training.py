"""Step time and peak memory of one OSEDiff training step (generator + VSD + fake-score update), random
weights, with the shared-base design against the official three-UNet layout's parameter bytes.

    python benchmarks/bench_training.py --model tiny --batch 2 --crop 64          # CPU smoke run
    python benchmarks/bench_training.py --model sd21 --batch 4 --crop 512 --mixed-precision bf16 \
        --gradient-checkpointing --device cuda                                     # the 24 GB question

`--model sd21` builds the SD-2.1-base UNet/VAE from the shipped configs and a full-width VGG16 for
LPIPS with random weights: memory and time do not depend on the values. Peak memory is CUDA's
max_memory_allocated on a GPU, and the process's peak RSS on the CPU. The first `--warmup` steps are
not timed.

    python benchmarks/bench_training.py --estimate --crop 512                      # no GPU needed

--estimate builds the SD-2.1-base UNet (generator + fake-score adapters on one base), the VAE (encoder
LoRA), a full-width LPIPS VGG16 and the OpenCLIP-H text encoder on the meta device and prints, for batch 1
and 4, without gradient checkpointing, with the UNet's only, and with the UNet's and the VAE's (what the
recipe's `model.gradient_checkpointing` sets), in fp32 and in bf16 mixed
precision: weights + buffers (fp32, as accelerate keeps them), gradients and AdamW state of all trainable
parameters (fp32), and the bytes autograd saves in each part of the step (`meta_memory.SavedBytes`):
the generator (encoder + UNet + decoder + MSE + LPIPS + the VSD loss on z0; the real/fake score passes run
without grad and save nothing) and the fake score's eps-MSE. The parts run one after another with a
backward in between, so the activation peak is the larger part (+ the largest checkpointed block's
activations while it is recomputed). bf16 imitates CUDA autocast's casting policy
(`meta_memory.BF16Autocast`). Meta tensors take PyTorch's reference attention path, which saves the
attention probabilities; flash / memory-efficient attention on a GPU does not, so the activations are an
upper bound there. Transient buffers (e.g. the no-grad score passes' attention at 2 x batch), autocast's
per-op weight copies outside backward, and allocator overhead are not counted.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

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


CHECKPOINTING = ("none", "unet", "unet+vae")


def _meta_model(checkpointing: str):
    """The SD-2.1-base-sized OSEDiff training model on the meta device, its counter and text encoder bytes."""
    from meta_memory import SavedBytes, module_bytes
    from transformers import CLIPTextConfig, CLIPTextModel

    from onestep_sr.models.base_models import load_config
    from onestep_sr.training.adapters import add_osediff_adapters, set_osediff_trainable
    from onestep_sr.training.osediff import OSEDiffTrainModel

    with torch.device("meta"):
        unet, vae, width = _modules("sd21")
        add_osediff_adapters(unet, vae, 4, 4)
        set_osediff_trainable(unet, vae)
        model = OSEDiffTrainModel(unet, vae, None, _lpips("sd21"), {"mse": 1.0, "lpips": 2.0, "vsd": 1.0})
        text_bytes = module_bytes(CLIPTextModel(CLIPTextConfig(**load_config("sd21_base", "text_encoder"))))
    model.to("meta").train()
    saved = SavedBytes(model)
    if checkpointing != "none":
        unet.enable_gradient_checkpointing(saved.checkpoint)
    if checkpointing == "unet+vae":
        vae.enable_gradient_checkpointing(saved.checkpoint)
    return model, saved, width, text_bytes


def _track(saved, modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Bytes saved inside each module's forward, accumulated into the returned dict."""
    deltas = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        def pre(_module, _inputs, name=name):
            deltas[name] -= saved.total

        def post(_module, _inputs, _output, name=name):
            deltas[name] += saved.total

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    return deltas


def estimate(args) -> int:
    from contextlib import nullcontext

    from meta_memory import GIB, BF16Autocast, meta_x0_from_eps, module_bytes

    import onestep_sr.training.osediff as osediff

    osediff.x0_from_eps = meta_x0_from_eps
    meta = torch.device("meta")
    rows = []
    for checkpointing in CHECKPOINTING:
        model, saved, width, text_bytes = _meta_model(checkpointing)
        deltas = _track(saved, {"VAE encoder": model.vae.encoder, "UNet": model.unet,
                                "VAE decoder": model.vae.decoder, "LPIPS": model.lpips})
        static = module_bytes(model) + text_bytes
        trainable = sum(p.numel() for _, p in [*osediff.generator_parameters(model), *osediff.fake_parameters(model)])
        for precision in ("fp32", "bf16"):
            for batch in (1, 4):
                lq = torch.rand(batch, 3, args.crop, args.crop, device=meta) * 2 - 1
                embeds = torch.randn(batch, 77, width, device=meta)
                random = osediff.StepRandom.make(0, 0, list(range(batch)))
                parts = {}
                for key in deltas:
                    deltas[key] = 0
                with BF16Autocast() if precision == "bf16" else nullcontext():
                    with saved:
                        out = model("generator", lq=lq, gt=lq.clone(), embeds=embeds, negative=embeds.clone(),
                                    random=random)
                    parts["generator"] = (saved.total, saved.recompute)
                    split = dict(deltas)
                    with saved:
                        model("fake", **model.fake_inputs(out["z0"], embeds, random))
                    parts["fake"] = (saved.total, saved.recompute)
                peak = max(a + r for a, r in parts.values())
                rows.append((batch, precision, checkpointing, parts, split, static + 12 * trainable + peak))
    print(f"OSEDiff training step on SD-2.1-base (meta tensors), {args.crop} px; weights + buffers (UNet with both "
          f"adapter sets, VAE, VGG16, text encoder), fp32: {static / GIB:.2f} GiB (text encoder {text_bytes / GIB:.2f}); "
          f"trainable {trainable / 1e6:.2f} M: gradients {4 * trainable / GIB:.2f} GiB, "
          f"AdamW state {8 * trainable / GIB:.2f} GiB")
    print("| batch | precision | checkpointing | generator saved (VAE enc / UNet / VAE dec / LPIPS) | fake saved | "
          "recompute | estimated peak |")
    print("|---|---|---|---|---|---|---|")
    for batch, precision, checkpointing, parts, split, total in rows:
        gen, fake = parts["generator"], parts["fake"]
        shares = " / ".join(f"{v / GIB:.1f}" for v in split.values())
        print(f"| {batch} | {precision} | {checkpointing} | {gen[0] / GIB:.2f} GiB ({shares}) | "
              f"{fake[0] / GIB:.2f} GiB | {max(gen[1], fake[1]) / GIB:.2f} GiB | {total / GIB:.2f} GiB |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21"], default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--estimate", action="store_true",
                        help="count SD-2.1-base-sized memory on meta tensors (batch 1 and 4, fp32 and bf16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.estimate:
        return estimate(args)

    from meta_memory import module_bytes as _bytes

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
    if args.gradient_checkpointing:  # as the recipe: UNet and VAE
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
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
