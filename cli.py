"""`onestep-sr`: upscale images from the command line, convert weights, inspect files.

Runs the same pipeline as the ComfyUI nodes, so a CLI run and a node run with equal settings give
the same image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
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
    up.add_argument("--method", default="auto", choices=["auto", "osediff", "s3diff", "hero_sr"],
                    help="default: read from the weights")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor (default 4)")
    up.add_argument("--prompt", default=None,
                    help="text prompt (OSEDiff was trained with 'tag1, tag2, ...'); 'auto': CLIP tags (needs --clip)")
    up.add_argument("--clip", default=None, help="a transformers CLIPModel folder, for --prompt auto")
    up.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default=None,
                    help="colour correction against the upscaled input (default: the method's)")
    up.add_argument("--latent-tile", type=int, default=None, help="UNet tile size in latent px (default 96)")
    up.add_argument("--latent-overlap", type=int, default=None, help="UNet tile overlap in latent px (default 32)")
    up.add_argument("--vae-encoder-tile", type=int, default=None, help="VAE encoder tile in image px (default 1024)")
    up.add_argument("--vae-decoder-tile", type=int, default=None, help="VAE decoder tile in latent px (default 224)")
    up.add_argument("--tile-batch", type=int, default=4, help="tiles per batch (default 4)")
    up.add_argument("--vae-stats", choices=["auto", "exact", "estimated"], default="auto",
                    help="tiled VAE GroupNorm statistics: exact (all tiles alive at once), estimated (bounded "
                         "memory, measured on probe tiles first), auto (exact when it fits in free memory)")
    up.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="model precision (auto: fp16 on GPU, fp32 on CPU)")
    up.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    up.add_argument("--seed", type=int, default=None,
                    help="sample the VAE latent with this seed (default: the latent mean, deterministic)")
    up.add_argument("--output-size", choices=["exact", "native"], default="exact",
                    help="exact: scale x input (default); native: the size the model worked at (as the official code saves)")
    up.add_argument("--max-pixels", type=int, default=8192 * 8192, help="refuse outputs larger than this")
    up.add_argument("--suffix", default="", help="added to output file names, e.g. _x4")
    up.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: the method's)")
    up.add_argument("--guidance", type=float, default=None,
                    help="CFG scale (default: the method's; S3Diff 1.07). 1 skips the negative pass")
    up.add_argument("--degradation", default="auto",
                    help="S3Diff: 'auto' (estimate) or BLUR,NOISE in [0, 1], e.g. 0.3,0.2")
    up.add_argument("--de-net", default=None, help="S3Diff's de_net.pth (default: beside the weights file)")
    up.add_argument("--timestep", default="auto",
                    help="'auto' (Hero-SR: DTSM sample, seeded; others: the method's t), 'argmax', or N in 0..999")
    up.add_argument("--timestep-seed", type=int, default=0, help="seed of the DTSM's sampled timestep")
    from .distributed.ray_upscale import add_ray_options

    add_ray_options(up)

    tags = commands.add_parser("tags", help="print CLIP tag prompts ('tag1, tag2, ...') for images")
    tags.add_argument("inputs", nargs="+", metavar="INPUT")
    tags.add_argument("--clip", required=True, help="a transformers CLIPModel folder (e.g. CLIP-ViT-H-14)")
    tags.add_argument("--top-k", type=int, default=8)
    tags.add_argument("--threshold", type=float, default=3.0, help="z-score over the vocabulary (default 3)")
    tags.add_argument("--user", default="", help="text appended as OSEDiff does: '{tags}, {user},'")
    tags.add_argument("--json", action="store_true")
    tags.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")

    est = commands.add_parser("estimate", help="print S3Diff's degradation scores (blur, noise) of images")
    est.add_argument("inputs", nargs="+", metavar="INPUT")
    est.add_argument("--weights", required=True, help="s3diff.pkl (de_net.pth is looked up beside it)")
    est.add_argument("--de-net", default=None, help="de_net.pth (default: beside the weights file)")
    est.add_argument("--json", action="store_true", help="machine-readable output")
    est.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")

    ts = commands.add_parser("timestep", help="print the timestep Hero-SR's DTSM picks for each image")
    ts.add_argument("inputs", nargs="+", metavar="INPUT")
    ts.add_argument("--base", required=True, help="SD-Turbo base (as for upscale)")
    ts.add_argument("--weights", required=True, help="hero_sr_model.pkl")
    ts.add_argument("--mode", choices=["sample", "argmax"], default="sample")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--scale", type=float, default=4.0)
    ts.add_argument("--json", action="store_true", help="machine-readable output, with the 101 DTSM logits")
    ts.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")

    conv = commands.add_parser("convert", help="convert a published .pkl to a safetensors export (or back)")
    conv.add_argument("source", help="osediff.pkl (or an export .safetensors)")
    conv.add_argument("target", help="output .safetensors (or .pkl)")

    info = commands.add_parser("info", help="say which method a weights file holds")
    info.add_argument("weights")
    from .models import hf_inn_pretrain  # sub-commands in their own modules set args.handler

    hf_inn_pretrain.add_parser(commands)
    from .training import cli as training_cli

    training_cli.add_parser(commands)
    from .evaluation.cli import add_parsers as add_evaluation_parsers

    add_evaluation_parsers(commands)  # eval, benchmark-quality (their handlers come with them)
    return parser


def _output_path(source: Path, output: Path, single: bool, suffix: str) -> Path:
    if single and output.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}:
        return output
    return output / f"{source.stem}{suffix}.png"


def run_upscale(args: argparse.Namespace) -> int:
    if args.ray is not None:
        from .distributed.ray_upscale import upscale_on_ray

        return upscale_on_ray(args)
    from tqdm import tqdm

    from .models.base_models import load_base
    from .pipelines.image_io import collect_inputs, load_image, save_image
    from .pipelines.model import load_onestep_model
    from .pipelines.onestep import OneStepPipeline, RunHooks, UpscaleSettings

    inputs = collect_inputs(args.inputs)
    device = _pick_device(args.device)
    dtype = _pick_dtype(args.dtype, device)
    model = load_onestep_model(load_base(args.base, args.tokenizer), args.weights, args.method,
                               de_net_path=args.de_net).to(device, dtype)
    pipeline = OneStepPipeline(model, device)
    timestep_mode, fixed_timestep = _parse_timestep(args.timestep)
    if args.prompt == "auto" and not args.clip:
        raise ValueError("--prompt auto needs --clip FOLDER (a transformers CLIPModel folder)")
    tagger = _Tagger(args.clip, device) if args.prompt == "auto" else None
    degradation = _parse_degradation(args.degradation)
    settings = UpscaleSettings(
        scale=args.scale, prompt=args.prompt, color_fix=args.color_fix, latent_tile=args.latent_tile,
        latent_overlap=args.latent_overlap, vae_encoder_tile=args.vae_encoder_tile,
        vae_decoder_tile=args.vae_decoder_tile, tile_batch=args.tile_batch, seed=args.seed,
        vae_norm_stats=args.vae_stats, output_size=args.output_size, max_output_pixels=args.max_pixels,
        negative_prompt=args.negative_prompt,
        guidance=args.guidance, degradation=degradation, timesteps=fixed_timestep, timestep_seed=args.timestep_seed,
    )
    output = Path(args.output)
    with tqdm(total=len(inputs), unit="img", desc="upscaling") as bar:
        for source in inputs:
            tiles = tqdm(leave=False, unit="tile", desc=source.name)

            def progress(done: int, total: int, tiles=tiles) -> None:
                tiles.total = total
                tiles.n = done
                tiles.refresh()

            image = load_image(source).unsqueeze(0)
            run_settings = settings
            if tagger is not None:
                run_settings = replace(settings, prompt=tagger.prompt(image[0]))
                bar.write(f"{source.name}: prompt {run_settings.prompt!r}")
            if timestep_mode == "argmax":
                chosen, _ = pipeline.predict_timesteps(image, scale=args.scale, mode="argmax")
                run_settings = replace(settings, timesteps=chosen)
            result = pipeline(image, run_settings, RunHooks(progress=progress, warn=tqdm.write))
            tiles.close()
            target = _output_path(source, output, len(inputs) == 1, args.suffix)
            save_image(result[0], target)
            bar.write(f"{source} -> {target} ({result.shape[2]}x{result.shape[1]})")
            bar.update(1)
    return 0


def _parse_timestep(text: str) -> tuple[str, int | None]:
    if text in ("auto", "argmax"):
        return text, None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--timestep must be auto, argmax or an integer in 0..999, got {text!r}") from None
    if not 0 <= value <= 999:
        raise ValueError(f"--timestep must lie in 0..999, got {value}")
    return "fixed", value


def _parse_degradation(text: str) -> torch.Tensor | None:
    if text == "auto":
        return None
    try:
        blur, noise = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--degradation must be auto or BLUR,NOISE (e.g. 0.3,0.2), got {text!r}") from None
    from .pipelines.onestep import check_degradation

    return check_degradation(torch.tensor([[blur, noise]]), 1)


class _Tagger:
    """CLIP tags for the CLI's --prompt auto and `tags`: the vocabulary is encoded once per run."""

    def __init__(self, folder: str, device: torch.device):
        from .models.clip_tags import transformers_clip_encoders

        self.scorer = transformers_clip_encoders(folder, device=device).scorer()
        self.device = device

    def prompt(self, image_hwc: torch.Tensor, top_k: int = 8, threshold: float = 3.0, user: str = "") -> str:
        from .models.clip_tags import format_prompt

        images = image_hwc.permute(2, 0, 1)[None].to(self.device)
        return format_prompt([t.tag for t in self.scorer.top_tags(images, top_k, threshold)[0]], user)


def _print_rows(rows: list[dict], as_json: bool, describe) -> int:
    """One line per input file, or the rows as JSON for scripts."""
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['file']}: {describe(row)}")
    return 0


def run_tags(args: argparse.Namespace) -> int:
    from .pipelines.image_io import collect_inputs, load_image

    tagger = _Tagger(args.clip, _pick_device(args.device))
    rows = [{"file": str(source), "prompt": tagger.prompt(load_image(source), args.top_k, args.threshold, args.user)}
            for source in collect_inputs(args.inputs)]
    return _print_rows(rows, args.json, lambda row: row["prompt"])


def run_estimate(args: argparse.Namespace) -> int:
    from .models.degradation_estimator import estimate, load_degradation_estimator
    from .pipelines.channels import split_channels
    from .pipelines.image_io import collect_inputs, load_image

    device = _pick_device(args.device)
    de_net = Path(args.de_net) if args.de_net else Path(args.weights).parent / "de_net.pth"
    module = load_degradation_estimator(de_net).to(device)
    rows = []
    for source in collect_inputs(args.inputs):
        rgb = split_channels(load_image(source).permute(2, 0, 1)[None]).rgb
        scores = estimate(module, rgb.to(device))[0].tolist()
        rows.append({"file": str(source), "blur": scores[0], "noise": scores[1]})
    return _print_rows(rows, args.json, lambda row: f"blur {row['blur']:.4f}  noise {row['noise']:.4f}")


def run_timestep(args: argparse.Namespace) -> int:
    from .models.base_models import load_base
    from .pipelines.image_io import collect_inputs, load_image
    from .pipelines.model import load_onestep_model
    from .pipelines.onestep import OneStepPipeline

    device = _pick_device(args.device)
    model = load_onestep_model(load_base(args.base), args.weights).to(device, torch.float32)
    pipeline = OneStepPipeline(model, device)
    rows = []
    for source in collect_inputs(args.inputs):
        t, logits = pipeline.predict_timesteps(load_image(source).unsqueeze(0), scale=args.scale, mode=args.mode,
                                               seed=args.seed)
        rows.append({"file": str(source), "timestep": int(t[0]), "logits": logits[0].tolist()})
    return _print_rows(rows, args.json, lambda row: f"t = {row['timestep']}")


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
    handlers = {"upscale": run_upscale, "convert": run_convert, "info": run_info, "estimate": run_estimate,
                "timestep": run_timestep, "tags": run_tags}
    try:
        return handlers.get(args.command, getattr(args, "handler", None))(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        print(f"onestep-sr: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
