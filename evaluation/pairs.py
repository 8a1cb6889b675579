"""Matching predictions to ground truth by file stem, and reading images as the reference scripts do.

Pairs are matched by stem (`0001.png` with `0001.jpg`), since SR outputs are PNG while test sets
mix formats. Nothing is dropped silently: a stem present on one side only, two files with one stem
in a folder, an unreadable file, or a pair whose sizes differ is recorded in `PairProblems`, and
the metrics run on the pairs that are left.

Images are read as OSEDiff's `test_metrics.py` reads them: OpenCV (`cv2.imread`, colour), BGR to
RGB, float in [0, 1]. For 8-bit files this equals a PIL read; cv2 is kept because it is what the
published numbers came from (it also drops alpha without compositing, and applies EXIF orientation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImagePair:
    name: str  # the shared stem
    prediction: Path
    ground_truth: Path


@dataclass
class PairProblems:
    missing_prediction: list[str] = field(default_factory=list)  # stems only in the ground truth
    missing_ground_truth: list[str] = field(default_factory=list)  # stems only in the predictions
    duplicate_stems: list[str] = field(default_factory=list)  # "folder: a.png, a.jpg"
    size_mismatch: list[dict] = field(default_factory=list)  # {"name", "prediction": [w, h], "ground_truth": [w, h]}
    unreadable: list[dict] = field(default_factory=list)  # {"name", "file", "error"}

    def any(self) -> bool:
        return any((self.missing_prediction, self.missing_ground_truth, self.duplicate_stems,
                    self.size_mismatch, self.unreadable))

    def as_dict(self) -> dict:
        return {"missing_prediction": self.missing_prediction, "missing_ground_truth": self.missing_ground_truth,
                "duplicate_stems": self.duplicate_stems, "size_mismatch": self.size_mismatch,
                "unreadable": self.unreadable}

    def lines(self) -> list[str]:
        """One human-readable line per kind of problem."""
        out = []
        if self.missing_prediction:
            out.append(f"{len(self.missing_prediction)} ground-truth image(s) without a prediction: "
                       + _shorten(self.missing_prediction))
        if self.missing_ground_truth:
            out.append(f"{len(self.missing_ground_truth)} prediction(s) without a ground truth: "
                       + _shorten(self.missing_ground_truth))
        for entry in self.duplicate_stems:
            out.append(f"two files share a stem, both skipped: {entry}")
        for entry in self.size_mismatch:
            out.append(f"{entry['name']}: prediction is {entry['prediction'][0]}x{entry['prediction'][1]}, "
                       f"ground truth {entry['ground_truth'][0]}x{entry['ground_truth'][1]}; pair skipped")
        for entry in self.unreadable:
            out.append(f"{entry['name']}: {entry['error']}; pair skipped")
        return out


def _shorten(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _images_by_stem(folder: Path, problems: PairProblems) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder.name} (looked in {folder.parent.resolve()})")
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            by_stem.setdefault(path.stem, []).append(path)
    unique = {}
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            problems.duplicate_stems.append(f"{folder}: " + ", ".join(p.name for p in paths))
        else:
            unique[stem] = paths[0]
    return unique


def match_pairs(prediction_dir: Path, ground_truth_dir: Path) -> tuple[list[ImagePair], PairProblems]:
    """Pairs by stem, sorted by name, and what could not be paired. Sizes are checked when read."""
    problems = PairProblems()
    predictions = _images_by_stem(Path(prediction_dir), problems)
    truths = _images_by_stem(Path(ground_truth_dir), problems)
    problems.missing_prediction = sorted(set(truths) - set(predictions))
    problems.missing_ground_truth = sorted(set(predictions) - set(truths))
    pairs = [ImagePair(stem, predictions[stem], truths[stem]) for stem in sorted(set(predictions) & set(truths))]
    if not pairs:
        raise FileNotFoundError(
            f"no image pairs: no file stem in {prediction_dir} matches one in {ground_truth_dir}"
        )
    return pairs, problems


def read_rgb(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1], read like the reference script (cv2, BGR -> RGB)."""
    import cv2

    array = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if array is None:
        raise ValueError(f"could not read {path.name} in {path.parent} (corrupt, truncated or not an image)")
    rgb = cv2.cvtColor(array, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0  # IMREAD_COLOR gives 8 bits
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
