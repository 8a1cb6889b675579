"""`onestep-sr`: upscale images from the command line, convert weights, inspect files.

Runs the same pipeline as the ComfyUI nodes, so a CLI run and a node run with equal settings give
the same image.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("onestep_sr")


def _pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    from .pipelines.model import DTYPES

    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return DTYPES[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep-sr", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("upscale", help="upscale image files or folders")
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images")
    up.add_argument("-o", "--output", required=True, help="output folder, or a file name for a single input")
    up.add_argument("--base", required=True, help="SD-2.x base: a diffusers folder or a single-file .safetensors")
    up.add_argument("--weights", required=True, help="method weights (osediff.pkl or its .safetensors export)")
    up.add_argument("--tokenizer", help="folder with vocab.json + merges.txt (needed for a single-file base)")
    up.add_argument("--method", default="auto", choices=["auto", "osediff"], help="default: read from the weights")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor (default 4)")
    up.add_argument("--prompt", default=None, help="text prompt (OSEDiff was trained with 'tag1, tag2, ...')")
    up.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default=None,
                    help="colour correction against the upscaled input (default: the method's)")
    up.add_argument("--latent-tile", type=int, default=None, help="UNet tile size in latent px (default 96)")
    up.add_argument("--latent-overlap", type=int, default=None, help="UNet tile overlap in latent px (default 32)")
    up.add_argument("--vae-encoder-tile", type=int, default=None, help="VAE encoder tile in image px (default 1024)")
    up.add_argument("--vae-decoder-tile", type=int, default=None, help="VAE decoder tile in latent px (default 224)")
    up.add_argument("--tile-batch", type=int, default=4, help="tiles per batch (default 4)")
    up.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="model precision (auto: fp16 on GPU, fp32 on CPU)")
    up.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    up.add_argument("--seed", type=int, default=None,
                    help="sample the VAE latent with this seed (default: the latent mean, deterministic)")
    up.add_argument("--output-size", choices=["exact", "native"], default="exact",
                    help="exact: scale x input (default); native: the size the model worked at (as the official code saves)")
    up.add_argument("--max-pixels", type=int, default=8192 * 8192, help="refuse outputs larger than this")
    up.add_argument("--suffix", default="", help="added to output file names, e.g. _x4")

    conv = commands.add_parser("convert", help="convert a published .pkl to a safetensors export (or back)")
    conv.add_argument("source", help="osediff.pkl (or an export .safetensors)")
    conv.add_argument("target", help="output .safetensors (or .pkl)")

    info = commands.add_parser("info", help="say which method a weights file holds")
    info.add_argument("weights")
    return parser


def _output_path(source: Path, output: Path, single: bool, suffix: str) -> Path:
    if single and output.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}:
        return output
    return output / f"{source.stem}{suffix}.png"


def run_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .models.base_models import load_base
    from .pipelines.image_io import collect_inputs, load_image, save_image
    from .pipelines.model import load_onestep_model
    from .pipelines.onestep import OneStepPipeline, RunHooks, UpscaleSettings

    inputs = collect_inputs(args.inputs)
    device = _pick_device(args.device)
    dtype = _pick_dtype(args.dtype, device)
    model = load_onestep_model(load_base(args.base, args.tokenizer), args.weights, args.method).to(device, dtype)
    pipeline = OneStepPipeline(model, device)
    settings = UpscaleSettings(
        scale=args.scale, prompt=args.prompt, color_fix=args.color_fix, latent_tile=args.latent_tile,
        latent_overlap=args.latent_overlap, vae_encoder_tile=args.vae_encoder_tile,
        vae_decoder_tile=args.vae_decoder_tile, tile_batch=args.tile_batch, seed=args.seed,
        output_size=args.output_size, max_output_pixels=args.max_pixels,
    )
    output = Path(args.output)
    with tqdm(total=len(inputs), unit="img", desc="upscaling") as bar:
        for source in inputs:
            tiles = tqdm(leave=False, unit="tile", desc=source.name)

            def progress(done: int, total: int, tiles=tiles) -> None:
                tiles.total = total
                tiles.n = done
                tiles.refresh()

            result = pipeline(load_image(source).unsqueeze(0), settings, RunHooks(progress=progress, warn=tqdm.write))
            tiles.close()
            target = _output_path(source, output, len(inputs) == 1, args.suffix)
            save_image(result[0], target)
            bar.write(f"{source} -> {target} ({result.shape[2]}x{result.shape[1]})")
            bar.update(1)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .models.method_weights import detect_method
    from .models.weights_io import read_weights_file, write_safetensors_export

    source, target = Path(args.source), Path(args.target)
    data = read_weights_file(source)
    method = detect_method(data, source.name)
    if target.suffix == ".safetensors":
        write_safetensors_export(data, target, method)
    else:
        torch.save(data, target)
    print(f"{source.name} ({method}) -> {target}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from .models.method_weights import detect_method
    from .models.weights_io import read_weights_file

    path = Path(args.weights)
    print(f"{path.name}: {detect_method(read_weights_file(path), path.name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    handlers = {"upscale": run_upscale, "convert": run_convert, "info": run_info}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"onestep-sr: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
