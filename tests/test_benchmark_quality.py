"""`onestep-sr benchmark-quality`: upscale a test set, score it, print it beside the paper's row;
and the published numbers shipped as data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pyiqa")

from onestep_sr.cli import main as cli_main  # noqa: E402
from onestep_sr.evaluation.metrics import parse_metric_names  # noqa: E402
from onestep_sr.evaluation.published import guess_test_set, published_row  # noqa: E402
from onestep_sr.evaluation.report import markdown_table  # noqa: E402


def test_published_rows_are_the_reference_numbers_with_sources():
    osediff = published_row("osediff", "realsr")  # METHODS.md section 1, Results
    assert osediff.values["psnr"] == 25.15 and osediff.values["maniqa-pipal"] == 0.6326
    assert "Table 1" in osediff.source and "maniqa-koniq" not in osediff.values
    s3diff = published_row("s3diff", "realsr")
    assert s3diff.values == {"psnr": 25.03, "lpips": 0.2699, "musiq": 67.89, "clipiqa": 0.6722}
    assert "secondary" in s3diff.source
    assert published_row("hero_sr", "drealsr").values == {}
    assert published_row("hero_sr", "drealsr").source.startswith("not published")
    table = markdown_table(parse_metric_names("psnr ssim"), [("S3Diff (paper)", s3diff.values)])
    assert "| S3Diff (paper) | 25.03 | not published |" in table
    assert guess_test_set(__import__("pathlib").Path("/data/DrealSRVal_crop128")) == "drealsr"


def test_benchmark_quality_runs_upscale_then_eval(tmp_path, tiny_base_dir, osediff_pkl, capsys):
    dataset = tmp_path / "RealSRVal_crop128"
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        for folder, size in (("test_LR", 16), ("test_HR", 64)):
            (dataset / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(dataset / folder / f"{name}.png")
    status = cli_main(["benchmark-quality", "--method", "osediff", "--dataset", str(dataset), "--base",
                       str(tiny_base_dir), "--weights", str(osediff_pkl[0]), "--output", str(tmp_path / "sr"),
                       "--metrics", "psnr", "ssim", "--device", "cpu", "--markdown", "--upscale-args", "--dtype fp32"])
    assert status == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "sr").iterdir()) == ["a.png", "b.png"]
    assert "| osediff (published, realsr) | 25.15 | 0.7341 |" in out
    ours = next(line for line in out.splitlines() if "this run" in line)
    assert float(ours.split("|")[2]) > 0  # a PSNR was computed on our upscales
