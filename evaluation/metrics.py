"""The papers' metrics as pyiqa calls (METHODS.md §7, OSEDiff's `test_metrics.py`).

Each metric is a row of data: our name (what `--metrics` takes), the column header of the papers'
tables, the pyiqa metric and the options the reference scripts pass. pyiqa is the implementation
the papers used, so numbers are comparable; we only add local weight resolution
(`metric_weights`) and the reading of images.

MANIQA comes in two variants that the papers mix up under one column name: OSEDiff and TSD-SR use
`maniqa-pipal`, S3Diff uses `maniqa` (KonIQ-trained, scale 0.8). They are named apart here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class MetricSpec:
    name: str
    column: str  # header in the papers' tables
    pyiqa_name: str
    kind: str  # "full-reference", "no-reference" or "folder" (FID: set against set)
    lower_better: bool
    options: dict = field(default_factory=dict)

    @property
    def arrow(self) -> str:
        return "\u2193" if self.lower_better else "\u2191"  # down / up arrows, as in the papers


_SPECS = [
    MetricSpec("psnr", "PSNR", "psnr", "full-reference", False, {"test_y_channel": True, "color_space": "ycbcr"}),
    MetricSpec("ssim", "SSIM", "ssim", "full-reference", False, {"test_y_channel": True, "color_space": "ycbcr"}),
    MetricSpec("lpips", "LPIPS", "lpips", "full-reference", True),  # AlexNet, v0.1
    MetricSpec("dists", "DISTS", "dists", "full-reference", True),
    MetricSpec("fid", "FID", "fid", "folder", True),  # clean-fid "clean" mode
    MetricSpec("niqe", "NIQE", "niqe", "no-reference", True),
    MetricSpec("musiq", "MUSIQ", "musiq", "no-reference", False),  # KonIQ-10k
    MetricSpec("maniqa-pipal", "MANIQA-PIPAL", "maniqa-pipal", "no-reference", False),
    MetricSpec("maniqa-koniq", "MANIQA-KonIQ", "maniqa", "no-reference", False),
    MetricSpec("clipiqa", "CLIPIQA", "clipiqa", "no-reference", False),  # RN50, 5 antonym pairs
    MetricSpec("topiq-nr", "TOPIQ-NR", "topiq_nr", "no-reference", False),
]
METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
# OSEDiff's Table 1 columns, the layout the other one-step papers follow.
DEFAULT_METRICS = ["psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa-pipal", "clipiqa"]


def parse_metric_names(text: str | list[str] | None) -> list[MetricSpec]:
    """'psnr,ssim lpips' or a list; None gives the papers' default set. Unknown names are an error."""
    if text is None:
        names = DEFAULT_METRICS
    else:
        parts = text if isinstance(text, list) else [text]
        names = [n.strip().lower() for part in parts for n in part.replace(",", " ").split() if n.strip()]
    if "maniqa" in names:
        raise ValueError("metric 'maniqa' is ambiguous: use maniqa-pipal (OSEDiff, TSD-SR) or maniqa-koniq (S3Diff)")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    return [METRICS[n] for n in dict.fromkeys(names)]


def build_metric(spec: MetricSpec, weights_dir: Path, device: torch.device, allow_download: bool = False):
    """A pyiqa metric with its weights from `weights_dir` (pyiqa's cache layout); see `metric_weights`."""
    import pyiqa

    from .metric_weights import check_weight_files, offline_weights, required_files

    options = dict(spec.options)
    if spec.pyiqa_name == "clipiqa":  # a path makes pyiqa skip its SHA-256 check (and re-download) of RN50.pt
        options["backbone"] = str(weights_dir / "clip" / "RN50.pt")
    if spec.pyiqa_name == "topiq_nr":  # the CFANet checkpoint holds the ResNet-50 weights too
        options["backbone_pretrain"] = False
    if not allow_download:
        check_weight_files(required_files(spec.pyiqa_name, options), weights_dir, spec.name)
    elif spec.pyiqa_name == "clipiqa" and not Path(options["backbone"]).is_file():
        options.pop("backbone")
    with offline_weights(weights_dir, allow_download, skip_timm_pretrained=spec.pyiqa_name.startswith("maniqa")):
        metric = pyiqa.create_metric(spec.pyiqa_name, device=device, **options)
    return metric.eval()
