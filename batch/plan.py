"""Which files to upscale and where each result goes, decided before any model loads.

Public API (also used by distributed runs, which plan once and hand items to workers):

- `list_inputs(items)`: files as given plus the images found (recursively) in folders, each with the
  path it has relative to the folder it came from; hidden files and `atomic` leftovers are ignored.
- `plan_outputs(inputs, output, suffix=..., extension=..., existing=...)` -> `OutputPlan`: one
  `PlannedOutput` per input with its target path and whether it is skipped.
- `PlanError`: raised for anything that must stop the run before it starts (the message is one
  line, names the file or folder and says what to do).

Rules, in order:
1. `output` names a file (it has an image suffix and is not an existing folder) only when there is
   exactly one input; otherwise it is a folder and input sub-folders are mirrored under it.
2. Outputs never overwrite inputs: an output folder equal to or inside an input folder is refused
   (results would replace originals or be read back as inputs on the next run), and so is any
   target that is an input file.
3. Two inputs never share an output: equal names (compared case-insensitively, as on macOS and
   Windows) are disambiguated with the source extension (`photo.png` + `photo.jpg` ->
   `photo_png.png`, `photo_jpg.png`), then with a number in input order (`x.png` from two folders ->
   `x.png`, `x_2.png`). Names depend only on the input set, so a rerun plans the same names.
4. A target that already exists follows `existing`: `skip` (default; a rerun resumes where it
   stopped, because results are written atomically and are complete whenever they exist),
   `overwrite` (replaced atomically), or `error` (refuse the run, naming them).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import is_partial_file
from .images import IMAGE_SUFFIXES

EXISTING_POLICIES = ("skip", "overwrite", "error")


class PlanError(ValueError):
    """The run cannot start as asked; the message says why and what to change."""


@dataclass(frozen=True)
class InputFile:
    """An input image: its path, and where it sits relative to the folder it was found in."""

    path: Path
    relative: Path  # just the file name for a file given directly
    folder: Path | None = None  # the input folder it was found in; None for a file given directly


@dataclass(frozen=True)
class PlannedOutput:
    source: InputFile
    target: Path
    skip: bool = False  # target exists and the policy is `skip`
    exists: bool = False  # target existed when planned (skipped, or to be overwritten)
    note: str = ""  # e.g. why the name differs from the input's


@dataclass
class OutputPlan:
    items: list[PlannedOutput] = field(default_factory=list)

    @property
    def todo(self) -> list[PlannedOutput]:
        return [item for item in self.items if not item.skip]

    @property
    def skipped(self) -> list[PlannedOutput]:
        return [item for item in self.items if item.skip]


def list_inputs(items: Iterable[str | os.PathLike]) -> list[InputFile]:
    """Files as given (any suffix; validated later) and image files inside folders, recursively,
    sorted; a file reached twice is listed once. A missing path or an empty result is an error."""
    found: list[InputFile] = []
    seen: set[Path] = set()
    for item in items:
        path = Path(item)
        if path.is_dir():
            for file in _walk_images(path):
                _add(found, seen, InputFile(file, file.relative_to(path), path))
        elif path.is_file():
            _add(found, seen, InputFile(path, Path(path.name)))
        else:
            raise FileNotFoundError(f"input not found: {path.name} (looked in {path.parent.resolve()})")
    if not found:
        raise FileNotFoundError("no input images found in " + ", ".join(str(i) for i in items)
                                + " (supported: " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    return found


def plan_outputs(inputs: Sequence[InputFile], output: str | os.PathLike, *, suffix: str = "",
                 extension: str | Callable[[InputFile], str] = ".png", existing: str = "skip") -> OutputPlan:
    """Target path and skip decision for every input; see the module docstring for the rules.

    `extension` is the output suffix (with the dot), or a function giving it per input (e.g. PNG for
    images with alpha when JPEG was asked for).
    """
    if existing not in EXISTING_POLICIES:
        raise PlanError(f"existing-output policy must be one of {', '.join(EXISTING_POLICIES)}, got {existing!r}")
    output = Path(output)
    extension_of = extension if callable(extension) else (lambda _item: extension)
    if _names_a_file(output, len(inputs)):
        targets = [(output, "")]
    else:
        if output.exists() and not output.is_dir():
            raise PlanError(f"output {output.name} in {output.parent.resolve()} is a file, not a folder; "
                            "give a folder for several inputs")
        _refuse_output_inside_inputs(output, inputs)
        targets = _unique_targets(inputs, output, suffix, extension_of)
    _refuse_targets_that_are_inputs(inputs, [target for target, _ in targets])

    plan = OutputPlan()
    clashes = []
    for source, (target, note) in zip(inputs, targets, strict=True):
        if target.is_dir():
            raise PlanError(f"output {target.name} in {target.parent} is a folder; move it or choose another output")
        exists = target.exists()
        if exists and existing == "error":
            clashes.append(target)
        plan.items.append(PlannedOutput(source, target, skip=exists and existing == "skip", exists=exists, note=note))
    if clashes:
        shown = ", ".join(str(t) for t in clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        raise PlanError(f"{len(clashes)} output(s) already exist: {shown}; use --existing skip to resume "
                        "or --existing overwrite to replace them")
    return plan


def _walk_images(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            file = Path(root) / name
            if not name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES and not is_partial_file(file):
                files.append(file)
    return sorted(files)


def _add(found: list[InputFile], seen: set[Path], item: InputFile) -> None:
    key = item.path.resolve()
    if key not in seen:
        seen.add(key)
        found.append(item)


def _names_a_file(output: Path, count: int) -> bool:
    if output.is_dir() or output.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    if count != 1:
        raise PlanError(f"output {output.name} names a file but there are {count} inputs; give a folder")
    return True


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_output_inside_inputs(output: Path, inputs: Sequence[InputFile]) -> None:
    resolved = output.resolve()
    for folder in {item.folder.resolve() for item in inputs if item.folder is not None}:
        if _is_within(resolved, folder):
            raise PlanError(f"output folder {output} is inside the input folder {folder}: results would replace "
                            "the originals or be read as inputs on the next run; choose a folder outside it")


def _refuse_targets_that_are_inputs(inputs: Sequence[InputFile], targets: Sequence[Path]) -> None:
    sources = {_key(item.path.resolve()): item.path for item in inputs}
    for target in targets:
        source = sources.get(_key(target.resolve()))
        if source is None and target.exists():
            source = next((item.path for item in inputs if item.path.exists() and os.path.samefile(item.path, target)),
                          None)
        if source is not None:
            raise PlanError(f"output {target.name} in {target.parent.resolve()} would overwrite the input {source}; "
                            "choose another output folder or a --suffix")


def _key(path: Path) -> str:
    """Collision key: case-insensitive, so names are also distinct on macOS and Windows."""
    return os.path.normcase(str(path)).casefold()


def _unique_targets(inputs: Sequence[InputFile], output: Path, suffix: str,
                    extension_of: Callable[[InputFile], str]) -> list[tuple[Path, str]]:
    def target(item: InputFile, tag: str) -> Path:
        return output / item.relative.parent / f"{item.relative.stem}{tag}{suffix}{extension_of(item)}"

    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(inputs):
        groups[_key(target(item, ""))].append(index)
    tags = [""] * len(inputs)
    for members in groups.values():
        if len(members) == 1:
            continue
        extensions = {inputs[i].path.suffix.lower() for i in members}
        counts: dict[str, int] = defaultdict(int)
        for i in members:
            ext_tag = "_" + inputs[i].path.suffix.lower().lstrip(".") if len(extensions) > 1 else ""
            counts[ext_tag] += 1
            tags[i] = ext_tag + (f"_{counts[ext_tag]}" if counts[ext_tag] > 1 else "")

    taken: set[str] = set()
    result = []
    for item, tag in zip(inputs, tags, strict=True):  # a tagged name may equal another input's plain name
        path, number = target(item, tag), 1
        while _key(path) in taken:
            number += 1
            path = target(item, f"{tag}_{number}")
        taken.add(_key(path))
        note = f"named {path.name} (another input has the same name)" if path.name != target(item, "").name else ""
        result.append((path, note))
    return result
