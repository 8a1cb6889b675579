"""`onestep-sr`: upscale images from the command line, convert weights, inspect files.

Runs the same pipeline as the ComfyUI nodes, so a CLI run and a node run with equal settings give
the same image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .cli_resshift import describe_method

log = logging.getLogger("onestep_sr")


def _pick_device(name: str) -> torch.device:
    """The device asked for, after checking that this torch build and machine have it."""
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device cuda: {why}; use --device cpu (or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: Apple's Metal backend is not available here; use --device cpu (or auto)")
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
    from .batch import upscale_cli

    parser = argparse.ArgumentParser(prog="onestep-sr", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    upscale_cli.add_parser(commands)

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

    from .downloads.cli import add_parser as add_fetch_weights

    add_fetch_weights(commands)
    from .evaluation.cli import add_parsers as add_evaluation_parsers

    add_evaluation_parsers(commands)  # eval, benchmark-quality (their handlers come with them)
    return parser


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
    from .batch.images import load_image

    tagger = _Tagger(args.clip, _pick_device(args.device))
    rows = [{"file": str(source), "prompt": tagger.prompt(load_image(source), args.top_k, args.threshold, args.user)}
            for source in _input_paths(args.inputs)]
    return _print_rows(rows, args.json, lambda row: row["prompt"])


def run_estimate(args: argparse.Namespace) -> int:
    from .batch.images import load_image
    from .models.degradation_estimator import estimate, load_degradation_estimator
    from .pipelines.channels import split_channels

    device = _pick_device(args.device)
    de_net = Path(args.de_net) if args.de_net else Path(args.weights).parent / "de_net.pth"
    module = load_degradation_estimator(de_net).to(device)
    rows = []
    for source in _input_paths(args.inputs):
        rgb = split_channels(load_image(source).permute(2, 0, 1)[None]).rgb
        scores = estimate(module, rgb.to(device))[0].tolist()
        rows.append({"file": str(source), "blur": scores[0], "noise": scores[1]})
    return _print_rows(rows, args.json, lambda row: f"blur {row['blur']:.4f}  noise {row['noise']:.4f}")


def run_timestep(args: argparse.Namespace) -> int:
    from .batch.images import load_image
    from .models.base_models import load_base
    from .pipelines.model import load_onestep_model
    from .pipelines.onestep import OneStepPipeline

    device = _pick_device(args.device)
    model = load_onestep_model(load_base(args.base), args.weights).to(device, torch.float32)
    pipeline = OneStepPipeline(model, device)
    rows = []
    for source in _input_paths(args.inputs):
        t, logits = pipeline.predict_timesteps(load_image(source).unsqueeze(0), scale=args.scale, mode=args.mode,
                                               seed=args.seed)
        rows.append({"file": str(source), "timestep": int(t[0]), "logits": logits[0].tolist()})
    return _print_rows(rows, args.json, lambda row: f"t = {row['timestep']}")


def _input_paths(items: list[str]) -> list[Path]:
    from .batch.plan import list_inputs

    return [item.path for item in list_inputs(items)]


def run_convert(args: argparse.Namespace) -> int:
    from .batch.atomic import atomic_write
    from .models.method_weights import detect_method
    from .models.weights_io import read_weights_file, safetensors_export_bytes

    source, target = Path(args.source), Path(args.target)
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise ValueError(f"convert would overwrite its source {source}; give another target")
    data = read_weights_file(source)
    method = detect_method(data, source.name)
    with atomic_write(target) as stream:  # never a half-written file, even on Ctrl-C
        if target.suffix == ".safetensors":
            stream.write(safetensors_export_bytes(data, method))
        else:
            torch.save(data, stream)
    print(f"{source.name} ({method}) -> {target}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from .models.method_weights import detect_method
    from .models.weights_io import read_weights_file

    path = Path(args.weights)
    print(f"{path.name}: {describe_method(detect_method(read_weights_file(path), path.name))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    handlers = {"convert": run_convert, "info": run_info, "estimate": run_estimate,
                "timestep": run_timestep, "tags": run_tags}
    handler = getattr(args, "handler", None) or handlers[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("onestep-sr: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"onestep-sr: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """Our errors carry their own message; anything else is named by type, with a hint for the traceback."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError, NotImplementedError)) and not isinstance(error, UnicodeError):
        return text
    return f"{type(error).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
