"""Lets a CUDA torchvision wheel import beside the CPU build of torch (CI and dev machines only).

PyPI's torchvision is built against CUDA torch; beside the local CPU torch its import fails with
"operator torchvision::nms does not exist" because its C++ ops do not register. Defining the two op
schemas before torchvision's first import is enough for everything the pack's extras use (models,
transforms, pyiqa, lpips). Installed by `.ci/run` as a `.pth` hook into the venv: the hook only
imports torch when something imports torchvision, so other start-ups pay nothing.
Not part of the package: real installs have a torchvision that matches their torch.
"""

from __future__ import annotations

import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules[__name__].__dict__["_lib"] = lib  # keep the definitions alive
        except RuntimeError:  # already defined: torchvision's own ops loaded or a second install
            pass
        return None


def install() -> None:
    if not any(isinstance(f, _DefineTorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _DefineTorchvisionOps())
