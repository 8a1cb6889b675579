"""Throughput of `onestep-sr upscale --ray` against the single-process CLI on the same folder.

Both runs are timed in this process, on the same images and model files, from the CLI entry point
(model loading included, as a user sees it); the Ray run includes starting the local Ray. The
ratio is the Ray path's overhead on one machine (CPU here: the tiny test model, so the fixed costs
dominate; with SD-sized models and GPUs the per-image work dominates).

    python benchmarks/bench_ray.py --images 16 --size 64 --workers 1
    python benchmarks/bench_ray.py --images 16 --size 64 --workers 2 --cpus 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _prepare(folder: Path, images: int, size: int) -> tuple[Path, Path, Path]:
    import synthetic_weights
    import tinymodels

    base = tinymodels.build_tiny_base(seed=0, tokenizer_dir=folder / "tok")
    base_dir = folder / "base"
    tinymodels.save_diffusers_folder(base, base_dir)
    weights = folder / "osediff.pkl"
    synthetic_weights.write_osediff_pkl(base, weights)
    inputs = folder / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for index in range(images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(inputs / f"{index:04d}.png")
    return inputs, base_dir, weights


def _timed(argv: list[str]) -> float:
    from onestep_sr.cli import main

    started = time.perf_counter()
    status = main(argv)
    if status != 0:
        raise SystemExit(f"run failed ({status}): {' '.join(argv)}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input side in px (output is x4)")
    parser.add_argument("--workers", type=int, default=1, help="Ray upscale actors")
    parser.add_argument("--cpus", type=int, default=None, help="num_cpus of the local Ray (default: all)")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as temp:
        folder = Path(temp)
        inputs, base_dir, weights = _prepare(folder, args.images, args.size)
        common = ["--base", str(base_dir), "--weights", str(weights), "--device", "cpu", "--dtype", "fp32"]
        single = _timed(["upscale", str(inputs), "-o", str(folder / "single"), *common])
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        distributed = _timed(["upscale", str(inputs), "-o", str(folder / "ray"), *common, "--ray",
                              "--ray-workers", str(args.workers)]) + ray_start
        ray.shutdown()
    rate_single, rate_ray = args.images / single, args.images / distributed
    print(f"\n{args.images} images {args.size}x{args.size} -> x4, tiny model, CPU")
    print("| path | seconds | images/s | vs single-process |")
    print("|---|---|---|---|")
    print(f"| single-process CLI | {single:.1f} | {rate_single:.2f} | 1.00 |")
    print(f"| Ray, {args.workers} worker(s) (incl. {ray_start:.1f} s Ray start) | {distributed:.1f} | "
          f"{rate_ray:.2f} | {rate_ray / rate_single:.2f} |")


if __name__ == "__main__":
    main()
