"""`onestep-sr upscale ... --ray [ADDRESS]`: the batch upscale as a Ray Data pipeline.

    planned items -> decode (CPU tasks) -> upscale (actors that load the model once; num_gpus=1 on
    GPU clusters) -> atomic write (CPU tasks) -> per-file report on the driver

What is done, skipped and where it goes is decided once, on the driver, by `batch.plan` — the same
planner and `--existing` policy as the single-process CLI (there is no second copy of the policy
here). Results are written with `batch.images.save_image` (atomic), so a file exists only when it
is complete and an interrupted cluster run resumes by planning again: existing outputs are skipped.
Every row carries its own error, so one corrupt input is reported and the others complete.

Images of a batch differ in size, so actors take one image at a time; the batching that fills the
GPU happens inside the pipeline, over the image's tiles (`--tile-batch`). Decoding and PNG encoding
run in separate CPU tasks so the GPU actors only upscale.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

RAY_EXTRA_HINT = '--ray needs Ray: pip install "onestep-sr[ray]" (or pip install -e ".[ray]" in a clone)'
_EMPTY = np.zeros((0, 0, 0), dtype=np.float32)


@dataclass
class RayRunSummary:
    written: list[str]
    skipped: list[str]
    failed: list[tuple[str, str]]  # (source, error)
    seconds: float


def import_ray():
    try:
        import ray
    except ImportError as error:
        from ..evaluation.cli import MissingExtra

        raise MissingExtra(f"{RAY_EXTRA_HINT} ({error})") from None
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at `address` ('auto': the one this machine belongs to), or start a local Ray.
    A Ray already initialised in this process (e.g. by a test) is used as is."""
    ray = import_ray()
    if ray.is_initialized():
        return
    ray.init(address=None if address in (None, "local") else address, log_to_driver=False)


def _decode(row: dict) -> dict:
    from ..batch.images import ImageError, load_image

    try:
        return {**row, "pixels": load_image(row["source"]).numpy(), "error": ""}
    except (ImageError, OSError) as error:
        return {**row, "pixels": _EMPTY, "error": str(error)}


class _Upscaler:
    """A Ray actor: builds the model once from the upscale arguments, then upscales row by row."""

    def __init__(self, args: argparse.Namespace):
        from .upscaler import build_upscaler

        self.upscale = build_upscaler(args)

    def __call__(self, row: dict) -> dict:
        if row["error"]:
            return row
        import torch

        try:
            result = self.upscale(torch.from_numpy(np.ascontiguousarray(row["pixels"])))
        except (ValueError, RuntimeError) as error:
            return {**row, "pixels": _EMPTY, "error": f"{row['source']}: {error}"}
        return {**row, "pixels": result.numpy().astype(np.float32, copy=False)}


def _write(row: dict, replace: bool) -> dict:
    from ..batch.images import ImageError, save_image

    out = {"source": row["source"], "target": row["target"], "error": row["error"]}
    if not row["error"]:
        try:
            save_image(row["pixels"], row["target"], replace=replace)
        except (ImageError, OSError) as error:
            out["error"] = str(error)
    return out


def run_pipeline(items: list[tuple[str, str]], args: argparse.Namespace, *, replace: bool, workers: int,
                 gpus_per_worker: float) -> list[dict]:
    """Run (source, target) items through decode -> upscale actors -> atomic write; one row per item."""
    ray = import_ray()
    dataset = ray.data.from_items([{"source": s, "target": t} for s, t in items],
                                  override_num_blocks=max(1, len(items)))
    dataset = dataset.map(_decode)
    dataset = dataset.map(_Upscaler, fn_constructor_kwargs={"args": args}, concurrency=workers,
                          num_gpus=gpus_per_worker)
    dataset = dataset.map(_write, fn_kwargs={"replace": replace})
    return list(dataset.iter_rows())


def _cluster_gpus() -> int:
    ray = import_ray()
    return int(ray.cluster_resources().get("GPU", 0))


def upscale_on_ray(args: argparse.Namespace) -> int:
    """The `--ray` branch of `onestep-sr upscale`: plan, run, report. Exit 1 when any file failed."""
    from ..batch.plan import list_inputs, plan_outputs

    import_ray()
    existing = getattr(args, "existing", "skip")
    plan = plan_outputs(list_inputs(args.inputs), args.output, suffix=args.suffix, existing=existing)
    for item in plan.skipped:
        print(f"{item.source.path}: skipped, {item.target} exists (--existing skip)")
    if not plan.todo:
        print("nothing to do: every output exists")
        return 0
    connect(args.ray)
    gpus = _cluster_gpus()
    workers = getattr(args, "ray_workers", None) or (gpus if gpus else 1)
    started = time.perf_counter()
    rows = run_pipeline([(str(i.source.path), str(i.target)) for i in plan.todo], args,
                        replace=existing == "overwrite", workers=workers, gpus_per_worker=1 if gpus else 0)
    failed = 0
    for row in sorted(rows, key=lambda r: r["source"]):
        if row["error"]:
            failed += 1
            print(f"onestep-sr: error: {row['error']}", file=sys.stderr)
        else:
            print(f"{row['source']} -> {row['target']}")
    print(f"{len(rows) - failed} written, {len(plan.skipped)} skipped, {failed} failed "
          f"in {time.perf_counter() - started:.1f} s on Ray ({workers} worker(s), {gpus} GPU(s) in the cluster)")
    return 1 if failed else 0


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]` and `--ray-workers` for `onestep-sr upscale` (Ray itself is imported only when used)."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run on Ray: a local Ray without ADDRESS, 'auto' for this machine's cluster, "
                             "or ray://HOST:10001 / HOST:6379 (needs the [ray] extra)")
    parser.add_argument("--ray-workers", type=int, default=None,
                        help="Ray upscale actors, each loading the model once (default: one per GPU, else 1)")
