"""`onestep-sr train CONFIG.yaml [--resume DIR]` and `python -m onestep_sr.training` (for accelerate launch)."""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = ("train a one-step SR model (OSEDiff, S3Diff, Hero-SR, VPD-SR, HF-Diff) from a YAML config; "
               "multi-GPU / multi-node: accelerate launch -m onestep_sr.training CONFIG.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see training/configs/)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue from a checkpoint folder, or a run's output folder (its latest checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train OSEDiff, S3Diff, Hero-SR, VPD-SR or HF-Diff on your images (needs the [train] extra)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(handler=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    try:
        from .config import load_config
        from .trainer import train
    except ImportError as error:
        raise ValueError(f"training needs the [train] extra: pip install -e \".[train]\" ({error})") from error
    config = load_config(args.config)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
    state = "interrupted" if result.interrupted else "finished"
    print(f"training {state} at step {result.step}{where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m onestep_sr.training", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"onestep-sr train: error: {error}", file=sys.stderr)
        return 2
