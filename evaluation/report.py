"""Evaluation results as the papers print them: one row of means per method, metric columns in
the order of OSEDiff's Table 1 with up/down arrows, and the papers' decimals (PSNR, FID, MUSIQ: 2; others: 4).
Per-image rows go to CSV; everything goes to JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math

from .metrics import MetricSpec
from .runner import EvalResult

DECIMALS = {"psnr": 2, "fid": 2, "musiq": 2}
NOT_PUBLISHED = "not published"


def format_value(spec: MetricSpec, value: float | None) -> str:
    if value is None:
        return NOT_PUBLISHED
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{DECIMALS.get(spec.name, 4)}f}"


def markdown_table(specs: list[MetricSpec], rows: list[tuple[str, dict]]) -> str:
    """`rows`: (label, {metric name: value or None}); None prints as "not published"."""
    header = "| Method | " + " | ".join(f"{s.column}{s.arrow}" for s in specs) + " |"
    lines = [header, "|---|" + "---|" * len(specs)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(format_value(s, values.get(s.name)) for s in specs) + " |")
    return "\n".join(lines)


def per_image_csv(result: EvalResult) -> str:
    """One row per image, then a `(mean)` row; full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [s.name for s in result.metrics]
    writer.writerow(["name", *names])
    for row in result.per_image:
        writer.writerow([row["name"], *(repr(row[n]) if n in row else "" for n in names)])
    writer.writerow(["(mean)", *(repr(result.mean[n]) for n in names)])
    return buffer.getvalue()


def json_text(result: EvalResult) -> str:
    return json.dumps(result.as_json(), indent=2, allow_nan=True)


def text_summary(result: EvalResult, label: str) -> str:
    lines = [markdown_table(result.metrics, [(label, result.mean)]), f"{len(result.per_image)} image pair(s) scored"]
    lines += [f"warning: {line}" for line in result.problems.lines()]
    return "\n".join(lines)
