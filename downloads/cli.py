"""`onestep-sr fetch-weights METHOD --dir FOLDER`: the explicit, opt-in download of a method's files."""

from __future__ import annotations

import argparse
from pathlib import Path

from .catalog import METHOD_FILES
from .fetch import FetchError, fetch_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fetch-weights", help="download a method's published weights (hash-verified; never done automatically)")
    parser.add_argument("method", choices=sorted(METHOD_FILES))
    parser.add_argument("--dir", required=True, type=Path,
                        help="where the method files go, e.g. ComfyUI/models/onestep_sr")
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="also fetch the base checkpoint into this folder, e.g. ComfyUI/models/checkpoints")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="also download files without a verified published hash (their sha256 is printed)")
    parser.set_defaults(handler=run_fetch_weights)


def run_fetch_weights(args: argparse.Namespace) -> int:
    files, base = METHOD_FILES[args.method]
    jobs = [(entry, args.dir) for entry in files]
    if args.base_dir is not None:
        jobs.append((base, args.base_dir))
    failures = 0
    for entry, folder in jobs:  # one failure does not stop the others
        try:
            fetch_file(entry, folder, allow_unverified=args.allow_unverified)
        except FetchError as error:
            print(f"error: {error}")
            failures += 1
    if args.base_dir is None:
        print(f"base: {base.name} ({base.page}) in models/checkpoints; --base-dir fetches it too")
    return 1 if failures else 0
