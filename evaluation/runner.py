"""Score a folder of predictions against a folder of ground truth: per image, then the means.

Every metric is built (and its weights checked) before any image is scored, so a missing weight file
stops the run at once rather than after an hour. Per-image metrics run pair by pair (images of a test
set differ in size, so there is no batching across images); FID runs once, folder against folder,
on the pairs that were scored.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .metrics import MetricSpec
from .pairs import ImagePair, PairProblems, match_pairs, read_rgb


@dataclass
class EvalResult:
    metrics: list[MetricSpec]
    mean: dict[str, float]
    per_image: list[dict]  # {"name": stem, metric name: value, ...}
    problems: PairProblems

    def as_json(self) -> dict:
        return {"mean": self.mean, "per_image": self.per_image, "problems": self.problems.as_dict()}


class PairScorer:
    """Builds the per-image metrics once and scores pairs; used locally and inside Ray workers."""

    def __init__(self, specs: list[MetricSpec], weights_dir: Path, device: torch.device, allow_download: bool = False):
        from .metrics import build_metric

        self.specs = [s for s in specs if s.kind != "folder"]
        self.models = {s.name: build_metric(s, weights_dir, device, allow_download) for s in self.specs}

    @torch.no_grad()
    def score(self, pair: ImagePair) -> tuple[dict | None, dict | None]:
        """(row, None) or (None, problem) where problem is a size-mismatch or unreadable entry."""
        try:
            prediction, truth = read_rgb(pair.prediction), read_rgb(pair.ground_truth)
        except ValueError as error:
            return None, {"kind": "unreadable", "name": pair.name, "error": str(error)}
        if prediction.shape != truth.shape:
            return None, {"kind": "size_mismatch", "name": pair.name,
                          "prediction": [prediction.shape[3], prediction.shape[2]],
                          "ground_truth": [truth.shape[3], truth.shape[2]]}
        row: dict = {"name": pair.name}
        for spec in self.specs:
            model = self.models[spec.name]
            value = model(prediction, truth) if spec.kind == "full-reference" else model(prediction)
            row[spec.name] = float(value.reshape(-1)[0])
        return row, None


def record_problem(problems: PairProblems, problem: dict) -> None:
    entry = {k: v for k, v in problem.items() if k != "kind"}
    getattr(problems, problem["kind"]).append(entry)


def folder_fid(pairs: list[ImagePair], weights_dir: Path, device: torch.device, allow_download: bool = False,
               num_workers: int = 0) -> float:
    """clean-fid "clean" FID of the predictions against the ground truth of exactly these pairs."""
    from .metrics import METRICS, build_metric

    fid = build_metric(METRICS["fid"], weights_dir, device, allow_download)
    with tempfile.TemporaryDirectory(prefix="onestep_sr_fid_") as temp:
        folders = {}
        for side in ("prediction", "ground_truth"):
            folder = Path(temp) / side
            folder.mkdir()
            for pair in pairs:  # links, so only the scored pairs are seen (pyiqa reads whole folders)
                source = getattr(pair, side)
                os.symlink(source.resolve(), folder / f"{pair.name}{source.suffix.lower()}")
            folders[side] = str(folder)
        value = fid(folders["prediction"], folders["ground_truth"], mode="clean", num_workers=num_workers,
                    verbose=False)  # the pyiqa wrapper passes the metric's device
    return float(value)


def evaluate(prediction_dir: Path, ground_truth_dir: Path, specs: list[MetricSpec], weights_dir: Path,
             device: torch.device, allow_download: bool = False, progress: bool = True,
             score_pairs: Callable | None = None) -> EvalResult:
    """Match, score per image (locally, or with `score_pairs` e.g. on Ray), then FID and the means."""
    from tqdm import tqdm

    pairs, problems = match_pairs(Path(prediction_dir), Path(ground_truth_dir))
    if score_pairs is None:
        scorer = PairScorer(specs, weights_dir, device, allow_download)
        if any(s.kind == "folder" for s in specs):  # check FID's weights before the long part
            from .metric_weights import check_weight_files, required_files

            if not allow_download:
                check_weight_files(required_files("fid", {}), weights_dir, "fid")

        def score_pairs(todo):
            for pair in tqdm(todo, unit="img", desc="evaluating", disable=not progress):
                yield scorer.score(pair)

    rows, scored = [], []
    by_name = {pair.name: pair for pair in pairs}
    for row, problem in score_pairs(pairs):
        if problem is not None:
            record_problem(problems, problem)
        else:
            rows.append(row)
            scored.append(by_name[row["name"]])
    rows.sort(key=lambda row: row["name"])
    mean = {}
    for spec in specs:
        if spec.kind == "folder":
            mean[spec.name] = folder_fid(scored, weights_dir, device, allow_download) if len(scored) > 1 else math.nan
        else:
            values = [row[spec.name] for row in rows]
            mean[spec.name] = sum(values) / len(values) if values else math.nan
    return EvalResult(specs, mean, rows, problems)
