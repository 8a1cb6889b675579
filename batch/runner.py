"""The batch loop: check every input cheaply before any model loads, then process each file on its
own, so one bad file is reported by name and the others still run.

- `prepare(...)` -> (`jobs`, `RunReport`): lists and plans (see `batch.plan`), probes only what will
  run (a resumed run does not re-read finished files), picks an output format that can hold each
  image (or fails that file when the user named the output file), applies a cheap pixel-limit
  estimate, and checks the output folder is writable. `PlanError` stops the run; per-file problems
  become `failed` outcomes.
- `run_jobs(jobs, process, report, ...)`: reads, processes and atomically saves each job; errors are
  per file; `fail_fast` stops at the first one; Ctrl-C stops cleanly (nothing partial is left, see
  `batch.atomic`) and marks the report interrupted, so a rerun with `--existing skip` resumes.
- `RunReport`: outcomes (done / skipped / failed, with reasons), `summary_lines()` and `exit_code`
  (0 all good, 1 something failed, 130 interrupted).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import TargetExistsError
from .images import (
    CHANNEL_NAMES,
    ImageError,
    ImageInfo,
    ImageTooLargeError,
    LoadedImage,
    fallback_suffix,
    output_format,
    probe_image,
    read_image,
    save_image,
    where,
)
from .plan import InputFile, PlanError, PlannedOutput, list_inputs, plan_outputs

log = logging.getLogger("onestep_sr")

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass
class Outcome:
    source: Path
    target: Path | None
    status: str  # DONE, SKIPPED or FAILED
    detail: str = ""


@dataclass
class RunReport:
    outcomes: list[Outcome] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False  # --fail-fast stopped the run
    not_run: int = 0

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.outcomes)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.count(FAILED) or self.stopped_early else 0

    def summary_lines(self) -> list[str]:
        done, skipped, failed = self.count(DONE), self.count(SKIPPED), self.count(FAILED)
        head = f"done {done}, skipped {skipped}, failed {failed}"
        if self.not_run:
            head += f", not run {self.not_run}"
        lines = [head]
        if skipped:
            lines.append(f"skipped {skipped} file(s) whose output already exists (--existing skip: a rerun "
                         "resumes; --existing overwrite redoes them)")
        lines += [f"note: {o.source}: {o.detail}" for o in self.outcomes if o.status == DONE and o.detail]
        lines += [f"failed: {o.source}: {o.detail}" for o in self.outcomes if o.status == FAILED]
        if self.stopped_early:
            lines.append("stopped at the first failure (--fail-fast)")
        if self.interrupted:
            lines.append("interrupted: finished files are complete, nothing partial was left; "
                         "run the same command again to do the rest")
        return lines


@dataclass
class Job:
    planned: PlannedOutput
    info: ImageInfo
    notes: list[str] = field(default_factory=list)

    @property
    def source(self) -> Path:
        return self.planned.source.path

    @property
    def target(self) -> Path:
        return self.planned.target


def prepare(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, suffix: str = "",
            format_suffix: str = ".png", existing: str = "skip", bit_depth: int = 8,
            scale: float = 4.0, max_pixels: int | None = None) -> tuple[list[Job], RunReport]:
    """Everything that can be checked without a model; see the module docstring."""
    listed = list_inputs(inputs)
    probes: dict[Path, ImageInfo | ImageError] = {}

    # inputs far above the limit are refused from their header, before they are decoded
    input_limit = None if max_pixels is None or not scale > 0 else int(2 * max_pixels / scale**2) + 1

    def probe(item: InputFile) -> ImageInfo | ImageError:
        if item.path not in probes:
            try:
                probes[item.path] = probe_image(item.path, input_limit)
            except ImageTooLargeError as error:
                probes[item.path] = ImageError(_size_message(item.path, error.width, error.height, scale, max_pixels))
            except ImageError as error:
                probes[item.path] = error
        return probes[item.path]

    def extension(item: InputFile) -> str:
        if format_suffix == ".png" and bit_depth in (8, 16):  # PNG holds every image: no need to open it
            return ".png"
        info = probe(item)
        return format_suffix if isinstance(info, ImageError) else fallback_suffix(format_suffix, info.channels,
                                                                                   bit_depth)

    plan = plan_outputs(listed, output, suffix=suffix, extension=extension, existing=existing)
    if plan.todo:
        _check_writable(plan.todo[0].target.parent if len(plan.items) == 1 else Path(output))

    report = RunReport()
    jobs = []
    for planned in plan.items:
        source = planned.source.path
        if planned.skip:
            report.outcomes.append(Outcome(source, planned.target, SKIPPED, "output exists"))
            continue
        info = probe(planned.source)
        if isinstance(info, ImageError):
            report.outcomes.append(Outcome(source, planned.target, FAILED, str(info)))
            continue
        problem = _format_problem(planned.target, info, bit_depth) or _size_problem(info, scale, max_pixels)
        if problem:
            report.outcomes.append(Outcome(source, planned.target, FAILED, problem))
            continue
        notes = [planned.note] if planned.note else []
        if planned.target != Path(output) and planned.target.suffix.lower() != format_suffix:
            notes.append(f"{CHANNEL_NAMES[info.channels]} cannot be saved as {format_suffix}: "
                         f"written as {planned.target.suffix}")
        if info.bit_depth > 8 and bit_depth == 8:
            notes.append(f"{info.bit_depth}-bit source written with 8 bits (--bit-depth 16 keeps the precision)")
        jobs.append(Job(planned, info, notes))
    return jobs, report


def run_jobs(jobs: Sequence[Job], process: Callable[[Job, LoadedImage], torch.Tensor], report: RunReport, *,
             bit_depth: int = 8, overwrite: bool = False, fail_fast: bool = False,
             on_done: Callable[[Job, torch.Tensor], None] | None = None,
             on_failed: Callable[[Job, str], None] | None = None, debug: bool = False) -> RunReport:
    """Process each job: read, `process` (-> (H, W, C) in [0, 1]), save atomically; see the module docstring."""
    for index, job in enumerate(jobs):
        try:
            loaded = read_image(job.source)
            result = process(job, loaded)
            if result.dim() == 4:
                result = result[0]
            save_image(result, job.target, bit_depth=bit_depth, replace=overwrite)
        except KeyboardInterrupt:
            report.interrupted = True
            report.not_run += len(jobs) - index
            return report
        except TargetExistsError:
            report.outcomes.append(Outcome(job.source, job.target, SKIPPED, "output appeared while it was computed"))
            continue
        except Exception as error:  # one bad file must not stop the others
            if debug:
                log.exception("%s failed", job.source)
            message = describe_error(error)
            report.outcomes.append(Outcome(job.source, job.target, FAILED, message))
            if on_failed:
                on_failed(job, message)
            if fail_fast:
                report.stopped_early = True
                report.not_run += len(jobs) - index - 1
                return report
            continue
        report.outcomes.append(Outcome(job.source, job.target, DONE, "; ".join(job.notes + loaded.notes)))
        if on_done:
            on_done(job, result)
    return report


def describe_error(error: BaseException) -> str:
    """One line: our own errors as they are, anything else with its type (and no traceback)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError, ImageError)) and not isinstance(error, UnicodeError):
        return text
    return f"{type(error).__name__}: {text}"


def _format_problem(target: Path, info: ImageInfo, bit_depth: int) -> str:
    try:
        output_format(target.suffix, info.channels, bit_depth)
    except ImageError as error:
        return f"cannot write {where(target)}: {error}; name a .png output instead"
    return ""


def _size_problem(info: ImageInfo, scale: float, max_pixels: int | None) -> str:
    if max_pixels is None or not math.isfinite(scale):
        return ""
    pixels = round(info.width * scale) * round(info.height * scale)
    if pixels <= max_pixels:
        return ""
    return _size_message(info.path, info.width, info.height, scale, max_pixels)


def _size_message(path: Path, width: int, height: int, scale: float, max_pixels: int) -> str:
    pixels = round(width * scale) * round(height * scale)
    return (f"{where(path)} is {width}x{height}: x{scale:g} needs {pixels} working pixels, above "
            f"--max-pixels {max_pixels}; downscale it, lower --scale or raise --max-pixels")


def _check_writable(folder: Path) -> None:
    """Create the output folder now and prove it takes files, before any model loads."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PlanError(f"cannot create the output folder {folder} ({error.strerror or error}); "
                        "choose another output") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PlanError(f"cannot write into the output folder {folder.resolve()} ({error.strerror or error}); "
                        "choose another output or fix its permissions") from None
