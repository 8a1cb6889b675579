"""Packaging promises: requirements.txt mirrors pyproject's dependencies (minus torch, which
ComfyUI owns), the pack imports without ComfyUI, and the registry metadata is present."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).parents[1]


def test_requirements_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {d for d in project["dependencies"] if not d.startswith("torch")}
    listed = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert declared == listed


def test_registry_metadata():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "OneStep SR" and comfy["Icon"]
    assert data["project"]["urls"]["Repository"]
    assert not any("torch==" in d for d in data["project"]["dependencies"])


def test_imports_without_comfyui():
    import sys

    import onestep_sr

    assert "comfy" not in sys.modules or not hasattr(sys.modules["comfy"], "__file__")
    assert set(onestep_sr.NODE_CLASS_MAPPINGS) >= {"OneStepSR_Loader", "OneStepSR_Upscale"}


def test_sources_are_cp1252_safe():
    """Windows consoles: ComfyUI's test tooling rejects sources that cp1252 cannot encode."""
    for path in ROOT.rglob("*.py"):
        if any(part in {".venv", "build"} or part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        path.read_text(encoding="utf-8").encode("cp1252")


def test_root_init_imports_as_a_plain_file():
    """pytest imports the root __init__.py as a file without a package when the checkout's folder
    name is not an identifier (a plain `git clone` makes `onestep-sr`); that must not fail."""
    import runpy

    namespace = runpy.run_path(str(ROOT / "__init__.py"))  # no package: as pytest imports it there
    assert namespace["__version__"]
