"""The single pass (VAE encode, UNet once, VAE decode) of every peer side by side, one process per variant.

Prints ms/image and peak memory for three sizes and each variant, with its ratio to this pack's default
and to the FLOP floor (FLOPs counted on meta tensors / the device's peak throughput). All variants use
the same random full-size SD-2.1 weights (nothing is downloaded):

- ours: this pack's tiled VAE (models/tiled_vae.py) with its defaults; kernels off / on; estimated
  statistics (bounded memory); torch.compile of the UNet and the VAE convolutions (GPU only by default)
- diffusers: AutoencoderKL untiled, and with enable_tiling()
- ComfyUI's core tiled VAE (comfy.sd.VAE encode_tiled/decode_tiled) when COMFYUI_PATH points to a checkout
- the official OSEDiff tiled-VAE hook (my_utils/vaehook.py) when OSEDIFF_PATH points to a checkout

    python benchmarks/bench_gpu.py                     # GPU: x4 512->2048, 256->1024, one 512 tile, bf16
    python benchmarks/bench_gpu.py --device cpu        # CPU: 128, 64, 32 px, fp32, VAE only, tiles x1/16
    python benchmarks/bench_gpu.py --smoke             # the smallest case of every variant available

On the CPU the default tiles are scaled by --tile-scale (1/16) so that the sizes that stand in for
2048/1024/512 px tile the way those do on the GPU. Peak memory: the CUDA allocator's peak, or on the
CPU the process's peak RSS above what it held after building the models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from process_memory import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
GPU_SIZES = {"x4 512->2048": 2048, "x4 256->1024": 1024, "one 512 tile": 512}
CPU_SIZES = {"x4 32->128 (for 2048)": 128, "x4 16->64 (for 1024)": 64, "one 32 tile (for 512)": 32}
# Dense bf16 tensor-core peaks (TFLOP/s) of common GPUs; others are measured with a matmul.
KNOWN_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
ENCODER_TILE, ENCODER_PAD, DECODER_TILE, DECODER_PAD = 1024, 32, 224, 11


def variants() -> dict[str, str]:
    """name -> why it is not available here ('' when it is)."""
    cuda = torch.cuda.is_available()
    try:
        from onestep_sr.gpu_kernels import triton_available

        triton = triton_available()
    except ImportError:
        triton = False
    return {
        "ours (default)": "",
        "ours, kernels off": "",
        "ours, kernels on": "" if cuda and triton else "needs CUDA/ROCm and Triton",
        "ours, estimated stats": "",
        "ours, compile": "" if cuda else "GPU only (CPU compile takes minutes)",
        "diffusers untiled": "",
        "diffusers enable_tiling": "",
        "ComfyUI core tiled": "" if os.environ.get("COMFYUI_PATH") else "set COMFYUI_PATH",
        "official OSEDiff hook": "" if os.environ.get("OSEDIFF_PATH") else "set OSEDIFF_PATH",
    }


# --------------------------------------------------------------------------------------------------
# One variant, in its own process
# --------------------------------------------------------------------------------------------------


def build_models(device: str, dtype: torch.dtype, with_unet: bool, meta: bool = False):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from onestep_sr.models.base_models import load_config

    torch.manual_seed(0)
    with torch.device("meta") if meta else contextlib.nullcontext():
        vae = AutoencoderKL(**load_config("sd21_base", "vae")).eval()
        unet = UNet2DConditionModel(**load_config("sd21_base", "unet")).eval() if with_unet else None
    if not meta:
        vae = vae.to(device, dtype)
        unet = unet.to(device, dtype) if unet is not None else None
    return vae, unet


def _tiles(args) -> dict[str, int]:
    scale = args.tile_scale
    return {"encoder": max(64, int(ENCODER_TILE * scale) // 8 * 8), "decoder": max(8, int(DECODER_TILE * scale))}


def _vae_functions(variant: str, vae, args):
    """(encode(x in [-1, 1]) -> latent, decode(latent) -> image) for a variant."""
    tiles = _tiles(args)
    if variant.startswith("ours"):
        from onestep_sr.gpu_kernels import set_kernels
        from onestep_sr.models.tiled_vae import decode_tiled, encode_tiled

        set_kernels({"ours, kernels off": "off", "ours, kernels on": "on"}.get(variant, "auto"))
        stats = "estimated" if variant == "ours, estimated stats" else "auto"
        if variant == "ours, compile":
            for module in vae.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.compile()

        def encode(x):
            return encode_tiled(vae, x, tile_px=tiles["encoder"], pad_px=ENCODER_PAD, norm_stats=stats)[:, :4]

        def decode(z):
            return decode_tiled(vae, z, tile_latent=tiles["decoder"], pad_latent=DECODER_PAD, norm_stats=stats)

        return encode, decode
    if variant.startswith("diffusers"):
        if variant == "diffusers enable_tiling":
            vae.enable_tiling()
            vae.tile_sample_min_size = tiles["encoder"]
            vae.tile_latent_min_size = tiles["decoder"]
        return (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)
    if variant == "ComfyUI core tiled":
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
        import comfy.sd

        from onestep_sr.models.ldm_convert import diffusers_to_ldm_vae

        comfy_vae = comfy.sd.VAE(sd=diffusers_to_ldm_vae(vae.state_dict(), vae.config))
        tile_px, tile_latent = tiles["encoder"], tiles["decoder"]

        def encode(x):
            pixels = ((x + 1) / 2).permute(0, 2, 3, 1)
            return comfy_vae.encode_tiled(pixels, tile_x=tile_px, tile_y=tile_px, overlap=2 * ENCODER_PAD)

        def decode(z):
            return comfy_vae.decode_tiled(z, tile_x=tile_latent, tile_y=tile_latent, overlap=2 * DECODER_PAD)

        return encode, decode
    if variant == "official OSEDiff hook":
        sys.path.insert(0, os.environ["OSEDIFF_PATH"])
        from my_utils.vaehook import VAEHook

        for part, tile, decoder in ((vae.encoder, tiles["encoder"], False), (vae.decoder, tiles["decoder"], True)):
            part.original_forward = part.forward
            part.forward = VAEHook(part, tile, is_decoder=decoder, fast_decoder=False, fast_encoder=False,
                                   color_fix=False, to_gpu=False)
        return (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)
    raise ValueError(f"unknown variant {variant!r}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run_variant(args) -> dict:
    dtype = getattr(torch, args.dtype)
    vae, unet = build_models(args.device, dtype, args.unet)
    if unet is not None and args.variant == "ours, compile":
        unet = torch.compile(unet)
    encode, decode = _vae_functions(args.variant, vae, args)
    side = args.size
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, side, side, generator=gen) * 2 - 1).to(args.device, dtype)
    embeds = torch.randn(1, 77, 1024, generator=gen).to(args.device, dtype)

    def single_pass():
        latent = encode(x)
        if unet is not None:
            latent = unet(latent.to(dtype), torch.tensor([999], device=args.device), embeds).sample
        return decode(latent.to(dtype))

    cuda = args.device.startswith("cuda")
    with torch.no_grad():
        for _ in range(args.warmup):
            single_pass()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset the peak RSS: the peak below belongs to the runs
        loaded = _rss_bytes()
        start = time.perf_counter()
        for _ in range(args.repeat):
            out = single_pass()
        if cuda:
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeat
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - loaded
    return {"ms": 1000 * seconds, "peak_bytes": peak, "shape": list(out.shape)}


# --------------------------------------------------------------------------------------------------
# The FLOP floor
# --------------------------------------------------------------------------------------------------


def counted_flops(size: int, with_unet: bool) -> int:
    """FLOPs of the untiled single pass, counted on meta tensors (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    vae, unet = build_models("meta", torch.float32, with_unet, meta=True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        latent = vae.encoder(torch.empty(1, 3, size, size, device="meta"))[:, :4]
        if unet is not None:
            latent = unet(latent, torch.tensor([999], device="meta"), torch.empty(1, 77, 1024, device="meta")).sample
        vae.decoder(latent)
    return counter.get_total_flops()


def peak_flops(device: str, dtype: torch.dtype, given_tflops: float | None) -> tuple[float, str]:
    """The device's peak in FLOP/s: given, known for common GPUs, else a large matmul measured here."""
    if given_tflops:
        return given_tflops * 1e12, "given"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, tflops in KNOWN_PEAKS.items():
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return tflops * 1e12, f"{name} datasheet"
    n = 2048 if device.startswith("cuda") else 768
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        a @ a
        count += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start), f"measured {n}x{n} matmul"


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: bfloat16 on the GPU, float32 on the CPU")
    parser.add_argument("--unet", action=argparse.BooleanOptionalAction, default=None,
                        help="run the full-size UNet once between encode and decode (default: on the GPU only)")
    parser.add_argument("--tile-scale", type=float, default=None, help="scale of the default tiles (CPU: 1/16)")
    parser.add_argument("--smoke", action="store_true", help="the smallest size of every available variant")
    parser.add_argument("--only", action="append", default=[], metavar="VARIANT", help="run only these; repeatable")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the FLOP floor")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.unet = on_gpu if args.unet is None else args.unet
    args.tile_scale = args.tile_scale or (1.0 if on_gpu else 1 / 16)
    args.repeat = args.repeat or (5 if on_gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    if args.smoke:
        sizes = dict(list(sizes.items())[-1:])
        args.repeat, args.warmup = 1, 0
    available = variants()
    chosen = [v for v in available if not args.only or v in args.only]
    dtype = getattr(torch, args.dtype)
    peak, peak_source = peak_flops(args.device, dtype, args.peak_tflops)
    memory = "peak CUDA memory" if on_gpu else "peak RSS above the loaded models"
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores visible)"
    print(f"{device_name}, {args.dtype}, {'VAE + UNet' if args.unet else 'VAE encode + decode'}, tiles x{args.tile_scale:g}; "
          f"{memory}; FLOP floor at {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    for label, size in sizes.items():
        floor_ms = 1000 * counted_flops(size, args.unet) / peak
        print(f"\n{label}: {size}x{size} px, FLOP floor {floor_ms:.1f} ms")
        print(f"{'variant':26s} {'ms/image':>10s} {'vs ours':>8s} {'vs floor':>9s} {'peak MiB':>10s} {'vs ours':>8s}")
        results = {}
        for variant in chosen:
            if available[variant]:
                print(f"{variant:26s}  n/a: {available[variant]}")
                continue
            command = [sys.executable, __file__, "--variant", variant, "--size", str(size), "--device", args.device,
                       "--dtype", args.dtype, "--tile-scale", str(args.tile_scale), "--repeat", str(args.repeat),
                       "--warmup", str(args.warmup), "--unet" if args.unet else "--no-unet"]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["failed"])[-1][:80]
                print(f"{variant:26s}  failed: {reason}")
                continue
            results[variant] = result = json.loads(done.stdout.strip().splitlines()[-1])
            ours = results.get("ours (default)", result)
            print(f"{variant:26s} {result['ms']:10.1f} {result['ms'] / ours['ms']:7.2f}x {result['ms'] / floor_ms:8.2f}x "
                  f"{result['peak_bytes'] / 2**20:10.0f} {result['peak_bytes'] / max(1, ours['peak_bytes']):7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
