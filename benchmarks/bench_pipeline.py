"""Time the one-step pipeline untiled vs tiled on one image size, with random weights.

Prints wall time and peak memory of each variant and their ratios against the untiled baseline
measured in the same run. Each variant runs in its own process so peak memory is its own.

    python benchmarks/bench_pipeline.py --size 512 --model sd21     # real SD-2 sizes, random weights
    python benchmarks/bench_pipeline.py --size 256 --model tiny     # quick smoke run
    python benchmarks/bench_pipeline.py --suite cfg --method s3diff --size 512   # cost of the CFG pass
    python benchmarks/bench_pipeline.py --size 4096 --model tiny --skip "tiled, exact stats"  # bounded memory

Tiles default to 96 latent / 1024 px encoder / 224 latent decoder. "exact" GroupNorm statistics hold
every tile of a layer at once; "estimated" measures them on probe tiles and streams the tiles (bounded
memory); "auto" picks exact when it fits in free memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from process_memory import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

UNTILED = dict(latent_tile=4096, vae_encoder_tile=16384, vae_decoder_tile=4096)
SUITES = {
    "tiling": {
        "untiled": UNTILED,
        "tiled, auto stats": dict(),
        "tiled, exact stats": dict(vae_norm_stats="exact"),
        "tiled, estimated stats": dict(vae_norm_stats="estimated"),
        "tiled small, estimated": dict(latent_tile=64, latent_overlap=16, vae_encoder_tile=512, vae_decoder_tile=64,
                                       vae_norm_stats="estimated"),
    },
    "cfg": {  # S3Diff's second (negative) UNet pass, batched into the same call
        "no CFG (guidance 1)": dict(UNTILED, guidance=1.0),
        "CFG 1.07 (two passes)": dict(UNTILED, guidance=1.07),
    },
}


def build_model(kind: str, dtype: torch.dtype, device: str, method: str = "osediff"):
    """A OneStepModel with random base weights and synthetic method weights (nothing downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from onestep_sr.models.base_models import BaseModels, load_config
    from onestep_sr.pipelines.model import apply_method_weights

    import synthetic_s3diff
    import synthetic_weights
    import tinymodels

    folder = Path(tempfile.mkdtemp(prefix="bench_"))
    if kind == "tiny":
        base = tinymodels.build_tiny_base(tokenizer_dir=folder / "tok")
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**load_config("sd21_base", "unet")).eval()
        vae = AutoencoderKL(**load_config("sd21_base", "vae")).eval()
        text = CLIPTextModel(CLIPTextConfig(**{**load_config("sd21_base", "text_encoder"), "num_hidden_layers": 2}))
        tinymodels.write_tiny_tokenizer(folder / "tok")
        from transformers import CLIPTokenizer

        base = tinymodels.TinyBase(unet, vae, text.eval(), CLIPTokenizer.from_pretrained(str(folder / "tok")))
    bm = BaseModels(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer)
    if method == "s3diff":
        data = synthetic_s3diff.make_s3diff_checkpoint(base).data
        synthetic_s3diff.write_de_net(folder / "de_net.pth")
        return apply_method_weights(bm, data, "s3diff", "synthetic.pkl", folder / "de_net.pth").to(device, dtype)
    unet, vae, lists = synthetic_weights.make_osediff_peft_models(base, rank=4)
    data = synthetic_weights.osediff_checkpoint_dict(unet, vae, lists, rank=4)
    return apply_method_weights(bm, data, "osediff", "synthetic.pkl").to(device, dtype)


def _rss_bytes() -> int:
    """Current resident memory (Linux), to subtract the loaded model from the peak."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so the peak measured
    afterwards belongs to the run, not to building the random model."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def run_variant(args) -> dict:
    from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = build_model(args.model, dtype, args.device, args.method)
    pipeline = OneStepPipeline(model, args.device)
    import gc

    gc.collect()
    side = args.size // 4
    image = torch.rand(1, side, side, 3)
    settings = UpscaleSettings(output_size="native", **SUITES[args.suite][args.variant])
    pipeline(torch.rand(1, 8, 8, 3), UpscaleSettings(output_size="native"))  # warm-up (kernels, prompt cache)
    loaded = _rss_bytes()
    if args.device != "cuda":
        _reset_peak_rss()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pipeline(image, settings)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else peak_rss_bytes() - loaded)
    return {"seconds": seconds, "peak_bytes": peak, "shape": list(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="output side in pixels (input is size/4)")
    parser.add_argument("--model", choices=["tiny", "sd21"], default="sd21")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--suite", choices=list(SUITES), default="tiling",
                        help="tiling: untiled vs tiled; cfg: guidance 1 vs 1.07 (use with --method s3diff)")
    parser.add_argument("--method", choices=["osediff", "s3diff"], default="osediff")
    parser.add_argument("--skip", action="append", default=[], metavar="VARIANT",
                        help="leave a variant out (e.g. one that would not fit in memory); repeatable")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in [v for v in SUITES[args.suite] if v not in args.skip]:
        command = [sys.executable, __file__, "--size", str(args.size), "--model", args.model, "--dtype", args.dtype,
                   "--device", args.device, "--suite", args.suite, "--method", args.method, "--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base = next(iter(results.values()))
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS above the loaded model"
    print(f"{args.method} on the {args.model} model, {args.size}x{args.size} output, {args.dtype}, {args.device}; "
          f"{memory}; ratios against the first row")
    for variant, r in results.items():
        print(f"{variant:30s} {r['seconds']:8.2f} s  x{r['seconds'] / base['seconds']:.2f}   "
              f"{r['peak_bytes'] / 2**20:9.0f} MiB  x{r['peak_bytes'] / base['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
