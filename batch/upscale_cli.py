"""`onestep-sr upscale`: the command line's main job, a folder of images, without losing a file.

Order of work: parse and validate every setting, list and plan outputs (refusing any that would
overwrite an input), probe the inputs that will run, check the device and the output folder; only
then load the models, and process each file on its own (see `batch.runner`). The run ends with a
summary and exit code 0 (all done or skipped), 1 (a file failed), 2 (nothing could start) or 130
(interrupted; a rerun resumes).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from ..cli_resshift import add_resshift_arguments, loader_options, settings_options
from ..models.method_weights import KNOWN_METHODS
from ..pipelines.color_fix import COLOR_FIX_METHODS
from .images import OUTPUT_SUFFIXES
from .plan import EXISTING_POLICIES

FORMATS = sorted({suffix.lstrip(".") for suffix in OUTPUT_SUFFIXES} - {"jpeg", "tiff"})


def add_parser(commands) -> argparse.ArgumentParser:
    up = commands.add_parser("upscale", help="upscale image files or folders")
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images (searched "
                                                               "recursively; sub-folders are mirrored)")
    up.add_argument("-o", "--output", required=True, help="output folder, or a file name for a single input")
    up.add_argument("--base", help="SD-2.x base for OSEDiff/S3Diff/Hero-SR: a diffusers folder or a single-file "
                                   ".safetensors (SinSR/HF-Diff/ResShift need none)")
    up.add_argument("--weights", required=True, help="method weights (osediff.pkl or its .safetensors export)")
    up.add_argument("--tokenizer", help="folder with vocab.json + merges.txt (needed for a single-file base)")
    up.add_argument("--method", default="auto", choices=["auto", *KNOWN_METHODS],
                    help="default: read from the weights")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor (default 4)")
    up.add_argument("--prompt", default=None,
                    help="text prompt (OSEDiff was trained with 'tag1, tag2, ...'); 'auto': CLIP tags (needs --clip)")
    up.add_argument("--clip", default=None, help="a transformers CLIPModel folder, for --prompt auto")
    up.add_argument("--color-fix", choices=list(COLOR_FIX_METHODS), default=None,
                    help="colour correction against the upscaled input (default: the method's)")
    up.add_argument("--color-fix-strength", type=float, default=1.0, help="0..1 blend of fixed and raw output")
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
    up.add_argument("--compile", action="store_true",
                    help="torch.compile the UNet (slower first image, faster after; see README Performance)")
    up.add_argument("--seed", type=int, default=None,
                    help="sample the VAE latent with this seed (default: the latent mean, deterministic); "
                         "SinSR/HF-Diff/ResShift: the noise seed (default 12345)")
    up.add_argument("--output-size", choices=["exact", "native"], default="exact",
                    help="exact: scale x input (default); native: the size the model worked at (as the official code saves)")
    up.add_argument("--max-pixels", type=int, default=8192 * 8192,
                    help="refuse an image whose working image (input x scale, as the model sees it) would have "
                         "more pixels than this (default 8192*8192)")
    up.add_argument("--suffix", default="", help="added to output file names, e.g. _x4")
    up.add_argument("--format", choices=FORMATS, default="png",
                    help="output format in a folder (default png); an image the format cannot hold (alpha in jpg) "
                         "is written as png, and the summary says so")
    up.add_argument("--bit-depth", type=int, choices=[8, 16], default=8,
                    help="bits per channel of the outputs (16: png, or grayscale tif), so 16-bit and float "
                         "sources are not truncated (default 8)")
    up.add_argument("--existing", choices=EXISTING_POLICIES, default="skip",
                    help="an output that already exists: skip it (default; a rerun resumes an interrupted run), "
                         "overwrite it (atomically), or error before anything runs")
    up.add_argument("--fail-fast", action="store_true", help="stop at the first file that fails")
    up.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help="print tracebacks of errors")
    up.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: the method's)")
    up.add_argument("--guidance", type=float, default=None,
                    help="CFG scale (default: the method's; S3Diff 1.07). 1 skips the negative pass")
    up.add_argument("--degradation", default="auto",
                    help="S3Diff: 'auto' (estimate) or BLUR,NOISE in [0, 1], e.g. 0.3,0.2")
    up.add_argument("--de-net", default=None, help="S3Diff's de_net.pth (default: beside the weights file)")
    up.add_argument("--timestep", default="auto",
                    help="'auto' (Hero-SR: DTSM sample, seeded; others: the method's t), 'argmax', or N in 0..999")
    up.add_argument("--timestep-seed", type=int, default=0, help="seed of the DTSM's sampled timestep")
    up.set_defaults(handler=run_upscale)
    add_resshift_arguments(up)
    from ..distributed.ray_upscale import add_ray_options

    add_ray_options(up)
    return up


def _settings(args: argparse.Namespace):
    from ..cli import _parse_degradation, _parse_timestep
    from ..pipelines.methods import MethodSpec
    from ..pipelines.onestep import UpscaleSettings, resolve_settings
    from ..pipelines.validation import validate_settings

    timestep_mode, fixed_timestep = _parse_timestep(args.timestep)
    settings = UpscaleSettings(
        scale=args.scale, prompt=args.prompt, color_fix=args.color_fix, latent_tile=args.latent_tile,
        latent_overlap=args.latent_overlap, vae_encoder_tile=args.vae_encoder_tile,
        vae_decoder_tile=args.vae_decoder_tile, tile_batch=args.tile_batch, seed=args.seed,
        vae_norm_stats=args.vae_stats, output_size=args.output_size, max_output_pixels=args.max_pixels,
        negative_prompt=args.negative_prompt, guidance=args.guidance,
        degradation=_parse_degradation(args.degradation), timesteps=fixed_timestep,
        timestep_seed=args.timestep_seed, color_fix_strength=args.color_fix_strength, noise_seed=args.seed,
        **settings_options(args, 1),
    )
    # checked now with generic defaults (the method is known only once the weights load), again in the pipeline
    validate_settings(resolve_settings(MethodSpec("any", "any", "sd21_base"), settings))
    if args.prompt == "auto" and not args.clip:
        raise ValueError("--prompt auto needs --clip FOLDER (a transformers CLIPModel folder)")
    return settings, timestep_mode


def run_upscale(args: argparse.Namespace) -> int:
    if args.ray is not None:
        from ..distributed.ray_upscale import upscale_on_ray

        return upscale_on_ray(args)
    from tqdm import tqdm

    from ..cli import _pick_device, _pick_dtype, _Tagger
    from .runner import prepare, run_jobs

    settings, timestep_mode = _settings(args)
    device = _pick_device(args.device)
    jobs, report = prepare(args.inputs, args.output, suffix=args.suffix, format_suffix="." + args.format,
                           existing=args.existing, bit_depth=args.bit_depth, scale=args.scale,
                           max_pixels=args.max_pixels)
    if args.noise and len(jobs) > 1:
        raise ValueError(f"--noise replays the draws of one image, but {len(jobs)} inputs are to be upscaled")
    for outcome in report.outcomes:
        if outcome.status == "failed":
            tqdm.write(f"skipping {outcome.source}: {outcome.detail}")
    if report.count("failed") and args.fail_fast:
        report.stopped_early = True
        report.not_run = len(jobs)
        return _finish(report)
    if jobs:
        pipeline = _load_pipeline(args, device, _pick_dtype(args.dtype, device))
        tagger = _Tagger(args.clip, device) if args.prompt == "auto" else None
        jobs = _check_sizes(jobs, pipeline, settings, report, args.fail_fast)
    if jobs:
        with tqdm(total=len(jobs), unit="img", desc="upscaling") as bar:

            def process(job, loaded) -> torch.Tensor:
                tiles = tqdm(leave=False, unit="tile", desc=job.source.name)

                def progress(done: int, total: int) -> None:
                    tiles.total = total
                    tiles.n = done
                    tiles.refresh()

                from ..pipelines.onestep import RunHooks

                image = loaded.pixels.unsqueeze(0)
                run_settings = settings
                if tagger is not None:
                    run_settings = replace(run_settings, prompt=tagger.prompt(image[0]))
                    bar.write(f"{job.source.name}: prompt {run_settings.prompt!r}")
                if timestep_mode == "argmax":
                    chosen, _ = pipeline.predict_timesteps(image, scale=args.scale, mode="argmax")
                    run_settings = replace(run_settings, timesteps=chosen)
                try:
                    return pipeline(image, run_settings, RunHooks(progress=progress, warn=tqdm.write))
                finally:
                    tiles.close()

            def done(job, result) -> None:
                notes = report.outcomes[-1].detail
                bar.write(f"{job.source} -> {job.target} ({result.shape[1]}x{result.shape[0]})"
                          + (f"; {notes}" if notes else ""))
                bar.update(1)

            def failed(job, message) -> None:
                bar.write(f"failed {job.source}: {message}")
                bar.update(1)

            run_jobs(jobs, process, report, bit_depth=args.bit_depth, overwrite=args.existing == "overwrite",
                     fail_fast=args.fail_fast, on_done=done, on_failed=failed, debug=getattr(args, "debug", False))
    return _finish(report)


def _load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from ..models.base_models import load_base
    from ..pipelines.model import OneStepModel, load_onestep_model
    from ..pipelines.onestep import OneStepPipeline
    from ..pipelines.speed import auto_vae_dtype

    model = load_onestep_model(lambda _kind: load_base(args.base, args.tokenizer) if args.base else None,
                               args.weights, args.method, de_net_path=args.de_net, **loader_options(args))
    if isinstance(model, OneStepModel) and args.dtype == "auto":  # bf16 VAE where the device has it
        model.to(device, dtype, vae_dtype=auto_vae_dtype(device, dtype))
    else:
        model.to(device, dtype)
    return OneStepPipeline(model, device, compile=getattr(args, "compile", False))


def _check_sizes(jobs, pipeline, settings, report, fail_fast: bool):
    """The method's exact working size against the pixel limit, for every job before any runs."""
    from tqdm import tqdm

    from .runner import FAILED, Outcome

    kept = []
    for job in jobs:
        try:
            pipeline.working_plan(job.info.height, job.info.width, pipeline.resolve(settings))
        except ValueError as error:
            report.outcomes.append(Outcome(job.source, job.target, FAILED, str(error)))
            tqdm.write(f"skipping {job.source}: {error}")
            if fail_fast:
                report.stopped_early = True
                report.not_run = len(jobs) - 1
                return []
            continue
        kept.append(job)
    return kept


def _finish(report) -> int:
    import sys

    for line in report.summary_lines():
        print(line, file=sys.stderr)
    return report.exit_code
