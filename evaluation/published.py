"""The published numbers shipped with the pack (`published_results.json`, from METHODS.md), looked up
by method and test set. Absent entries mean "not published"; nothing here is estimated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_FILE = Path(__file__).with_name("published_results.json")


@dataclass(frozen=True)
class PublishedRow:
    method: str
    test_set: str
    values: dict  # metric name -> value; absent metrics were not published
    source: str


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def test_sets() -> dict[str, str]:
    return dict(_data()["sets"])


def published_row(method: str, test_set: str) -> PublishedRow:
    """The paper's row, or an empty row whose source says why there is none."""
    for entry in _data()["results"]:
        if entry["method"] == method and entry["set"] == test_set:
            return PublishedRow(method, test_set, dict(entry["values"]), entry["source"])
    note = _data()["unpublished"].get(method, "no published numbers recorded in METHODS.md")
    return PublishedRow(method, test_set, {}, f"not published: {note}")


def guess_test_set(folder: Path) -> str | None:
    """realsr / drealsr / div2k-val from a folder name like RealSRVal_crop128, or None."""
    name = folder.resolve().name.lower().replace("-", "").replace("_", "")
    if "drealsr" in name:
        return "drealsr"
    if "realsr" in name:
        return "realsr"
    if "div2k" in name:
        return "div2k-val"
    return None
