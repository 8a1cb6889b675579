"""Step time and peak memory of one S3Diff training step (reconstruction, GAN generator, D real, D fake),
random weights; or, with --estimate, the memory of the SD-Turbo-sized step counted on meta tensors.

    python benchmarks/bench_training_s3diff.py --model tiny --batch 2 --crop 64         # CPU smoke run
    python benchmarks/bench_training_s3diff.py --model sd-turbo --batch 4 --crop 512 \
        --mixed-precision bf16 --gradient-checkpointing --device cuda                  # the 24 GB question
    python benchmarks/bench_training_s3diff.py --estimate --batch 1 --crop 512         # no GPU needed

--estimate builds SD-Turbo's UNet/VAE, DINO ViT-B/16, a full-width LPIPS VGG and de_net on the meta
device and reports (a) parameter/buffer bytes, gradients and AdamW state of the trainable set, and (b)
the bytes autograd saves for backward in each part of the step (views counted once, parameters
excluded; with checkpointing, the block inputs diffusers' checkpoint keeps and the largest block while
backward recomputes it). The parts run one after another with a backward in between, so the activation
peak is the largest part. Meta tensors take PyTorch's reference attention path, which saves the attention
probabilities; flash / memory-efficient attention on a GPU does not, so (b) is an upper bound there.
Allocator overhead and transient buffers are not counted.
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

def _modules(kind: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if kind == "tiny":
        import tinymodels

        return (UNet2DConditionModel(**tinymodels.TINY_UNET_CONFIG), AutoencoderKL(**tinymodels.TINY_VAE_CONFIG),
                tinymodels.TINY_TEXT_CONFIG["hidden_size"])
    from onestep_sr.models.base_models import load_config

    return (UNet2DConditionModel(**load_config("sd_turbo", "unet")),
            AutoencoderKL(**load_config("sd_turbo", "vae")), 1024)


def _model(kind: str, checkpointing: bool):
    from bench_training import _lpips

    from onestep_sr.models.degradation_estimator import DegradationEstimator
    from onestep_sr.training.losses.dino_discriminator import DinoDiscriminator, DinoViT
    from onestep_sr.training.s3diff import (
        S3DiffTrainModel,
        add_s3diff_lora,
        new_modulator,
        set_s3diff_trainable,
    )

    unet, vae, width = _modules(kind)
    ranks = (4, 4) if kind == "tiny" else (32, 16)
    add_s3diff_lora(unet, vae, *ranks, seed=0)
    modulator = new_modulator(*ranks, seed=0)
    set_s3diff_trainable(unet, vae, modulator)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    disc = DinoDiscriminator.tiny() if kind == "tiny" else DinoDiscriminator(DinoViT())
    model = S3DiffTrainModel(unet, vae, modulator, DegradationEstimator(), _lpips("tiny" if kind == "tiny" else "sd21"),
                             disc, {"mse": 2.0, "lpips": 5.0, "gan": 0.5})
    return model.train(), width


def _parts(model, batch: int, crop: int, width: int, device, step: int = 0):
    """The four parts of a micro step as (name, closure returning the loss)."""
    from onestep_sr.training.osediff import StepRandom
    from onestep_sr.training.s3diff import AUG_FAKE, AUG_REAL, augment_generators

    lq = torch.rand(batch, 3, crop, crop, device=device) * 2 - 1
    gt = torch.rand(batch, 3, crop, crop, device=device) * 2 - 1
    embeds = torch.randn(batch, 77, width, device=device)
    scores = torch.rand(batch, 2, device=device)
    random = StepRandom.make(0, step, list(range(batch)))
    held: dict = {}

    def adversarial():
        out = model("adversarial", lq=lq, embeds=embeds, scores=scores, random=random)
        held["fake"] = out.pop("image")
        return out["gan_g"]

    return [
        ("generator", lambda: model("reconstruction", lq=lq, target=gt, embeds=embeds, scores=scores,
                                     random=random)["rec"]),
        ("generator", adversarial),
        ("discriminator", lambda: model("disc_real", gt=gt, augment=augment_generators(random, AUG_REAL))["d_real"]),
        ("discriminator", lambda: model("disc_fake", fake=held["fake"],
                                        augment=augment_generators(random, AUG_FAKE))["d_fake"]),
    ]


def estimate(args) -> int:
    from meta_memory import GIB, SavedBytes, meta_x0_from_eps, module_bytes

    import onestep_sr.training.s3diff as s3diff
    from onestep_sr.training.s3diff import discriminator_parameters, generator_parameters

    with torch.device("meta"):
        model, width = _model("sd-turbo", args.gradient_checkpointing)
    model.to("meta")
    s3diff.x0_from_eps = meta_x0_from_eps
    static = module_bytes(model)
    trainable = sum(p.numel() for _, p in generator_parameters(model)) + \
        sum(p.numel() for _, p in discriminator_parameters(model))
    print(f"S3Diff training step on SD-Turbo (meta tensors), batch {args.batch}, {args.crop} px, fp32, "
          f"gradient checkpointing {args.gradient_checkpointing}")
    print(f"weights + buffers (UNet, VAE, modulator, de_net, DINO ViT-B/16, VGG16): {static / GIB:.2f} GiB; "
          f"text encoder (OpenCLIP-H text, fp32) ~1.27 GiB more unless moved off the device")
    print(f"trainable {trainable / 1e6:.1f} M: gradients {4 * trainable / GIB:.2f} GiB, "
          f"AdamW state {8 * trainable / GIB:.2f} GiB")
    peak = 0
    saved = SavedBytes(model)
    if args.gradient_checkpointing:  # count the block inputs and the recomputed block (see meta_memory)
        model.unet.enable_gradient_checkpointing(saved.checkpoint)
        model.vae.enable_gradient_checkpointing(saved.checkpoint)
    for name, part in _parts(model, args.batch, args.crop, width, torch.device("meta")):
        with saved:
            part()
        peak = max(peak, saved.total + saved.recompute)
        print(f"  {name:13s} saved for backward: {saved.total / GIB:6.2f} GiB, "
              f"+ {saved.recompute / GIB:.2f} GiB while its largest checkpointed block is recomputed")
    total = static + 12 * trainable + peak
    print(f"estimated peak (weights + grads + AdamW + largest part's saved and recomputed activations): "
          f"{total / GIB:.2f} GiB "
          f"(+ text encoder if kept on the device)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd-turbo"], default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--estimate", action="store_true", help="count SD-Turbo-sized memory on meta tensors")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.estimate:
        return estimate(args)

    from meta_memory import GIB

    from onestep_sr.training.s3diff import discriminator_parameters, generator_parameters

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, width = _model(args.model, args.gradient_checkpointing)
    model.to(device)
    optimizers = {"generator": torch.optim.AdamW([p for _, p in generator_parameters(model)], lr=2e-5),
                  "discriminator": torch.optim.AdamW([p for _, p in discriminator_parameters(model)], lr=2e-5)}
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for name, part in _parts(model, args.batch, args.crop, width, device, step):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = part()
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB (CUDA max allocated)"
    else:
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = f"{usage / 2**20:.2f} GiB (peak RSS; {(usage - rss_before) / 2**20:.2f} GiB during the steps)"
    print(f"S3Diff, model {args.model}, batch {args.batch}, crop {args.crop}, {args.mixed_precision}, "
          f"checkpointing {args.gradient_checkpointing}, {device}")
    print(f"step time: median {statistics.median(times):.3f} s over {len(times)} steps (4 parts, 2 G + 2 D updates)")
    print(f"peak memory: {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
