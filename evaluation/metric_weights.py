"""Where metric weights live, checking they are there, and keeping pyiqa from downloading them.

pyiqa fetches weights on first use: its own files into `<torch hub dir>/pyiqa/`, torchvision
backbones (AlexNet for LPIPS, VGG16 for DISTS) into `<torch hub dir>/checkpoints/`, OpenAI CLIP into
`<torch hub dir>/clip/`, timm backbones from the Hugging Face hub. We keep that layout (so a folder
pyiqa filled on a machine with internet works as is) but resolve it under one folder, the
`--weights-dir` (default: torch's hub dir, i.e. pyiqa's own cache), and:

- every file a metric needs is listed (`required_files`, names taken from pyiqa's and
  torchvision's own URL tables, so they follow the installed versions) and checked before the metric
  is built: a missing one raises `MissingMetricWeights` naming the file, the folder to put it in and
  where to get it;
- while a metric is built, downloads are refused (`offline_weights`), so a file this table misses
  still gives our error, never a silent download; `allow_download=True` (the CLI's
  `--allow-download`) lets pyiqa fetch into the same folder instead;
- timm backbones whose weights the metric's own checkpoint replaces entirely (MANIQA's ViT) are
  built without ImageNet weights instead of fetched from the hub only to be overwritten;
- pickled files are first opened with `torch.load(weights_only=True)`: pyiqa itself unpickles with
  `weights_only=False`, so a file that is not plain tensors is refused before pyiqa sees it.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse


class MissingMetricWeights(FileNotFoundError):
    """A metric's weight file is not in the weights folder (and downloading was not allowed)."""


class UnsafeMetricWeights(ValueError):
    """A weight file holds more than tensors, so it is not unpickled."""


@dataclass(frozen=True)
class WeightFile:
    relative: str  # path under the weights folder, in pyiqa's / torch hub's layout
    url: str  # where pyiqa would have downloaded it from
    check: str = "tensors"  # "tensors": torch.load(weights_only=True) must read it; "archive": a zip; "none": .mat


def default_weights_dir() -> Path:
    """pyiqa's own cache root: torch's hub dir ($TORCH_HOME/hub, ~/.cache/torch/hub)."""
    import torch

    return Path(torch.hub.get_dir())


def _basename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _pyiqa_file(url: str) -> WeightFile:
    return WeightFile(f"pyiqa/{_basename(url)}", url, check="none" if url.endswith(".mat") else "tensors")


def _torchvision_file(weights_enum) -> WeightFile:
    return WeightFile(f"checkpoints/{_basename(weights_enum.url)}", weights_enum.url)


def required_files(pyiqa_name: str, options: dict) -> list[WeightFile]:
    """The files pyiqa opens to build `pyiqa_name` with `options`, in their cache layout."""
    if pyiqa_name in ("psnr", "ssim"):
        return []
    if pyiqa_name == "lpips":
        from pyiqa.archs import lpips_arch
        from torchvision.models import AlexNet_Weights

        return [_torchvision_file(AlexNet_Weights.IMAGENET1K_V1),
                _pyiqa_file(lpips_arch.default_model_urls["0.1_alex"])]
    if pyiqa_name == "dists":
        from pyiqa.archs import dists_arch
        from torchvision.models import VGG16_Weights

        return [_torchvision_file(VGG16_Weights.IMAGENET1K_V1), _pyiqa_file(dists_arch.default_model_urls["url"])]
    if pyiqa_name == "fid":
        from pyiqa.archs import inception

        return [_pyiqa_file(inception.FID_WEIGHTS_URL)]
    if pyiqa_name == "niqe":
        from pyiqa.archs import niqe_arch

        return [_pyiqa_file(niqe_arch.default_model_urls["url"])]
    if pyiqa_name == "musiq":
        from pyiqa.archs import musiq_arch

        return [_pyiqa_file(musiq_arch.default_model_urls["koniq10k"])]
    if pyiqa_name in ("maniqa", "maniqa-pipal"):
        from pyiqa.archs import maniqa_arch

        return [_pyiqa_file(maniqa_arch.default_model_urls["koniq" if pyiqa_name == "maniqa" else "pipal"])]
    if pyiqa_name == "clipiqa":
        from pyiqa.archs import clip_model

        return [WeightFile("clip/RN50.pt", clip_model._MODELS["RN50"], check="archive")]
    if pyiqa_name == "topiq_nr":
        from pyiqa.archs import topiq_arch

        return [_pyiqa_file(topiq_arch.default_model_urls["cfanet_nr_koniq_res50"])]
    raise ValueError(f"no weight table for pyiqa metric {pyiqa_name!r}")


def check_weight_files(files: list[WeightFile], weights_dir: Path, metric: str) -> None:
    """Raise `MissingMetricWeights` for the first absent file; refuse files that are not plain tensors."""
    for item in files:
        path = weights_dir / item.relative
        if not path.is_file():
            raise MissingMetricWeights(
                f"{metric}: weight file {path.name} not found in {path.parent} "
                f"(download it from {item.url} into that folder, or pass --allow-download)"
            )
        if item.check == "tensors":
            _check_plain_tensors(path, metric)
        elif item.check == "archive" and not zipfile.is_zipfile(path):
            raise UnsafeMetricWeights(f"{metric}: {path.name} in {path.parent} is not a TorchScript/torch archive")


def _check_plain_tensors(path: Path, metric: str) -> None:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means pyiqa must not unpickle it
        raise UnsafeMetricWeights(
            f"{metric}: {path.name} in {path.parent} could not be read as plain tensors "
            f"(corrupt, truncated or not a weights file: {type(error).__name__}); download it again"
        ) from None


def _refuse_download(url, dst, *args, **kwargs):
    raise MissingMetricWeights(
        f"weight file {Path(dst).name} not found in {Path(dst).parent} "
        f"(download it from {url} into that folder, or pass --allow-download)"
    )


def _timm_without_pretrained(create_model):
    def create(name, *args, **kwargs):
        kwargs["pretrained"] = False
        return create_model(name, *args, **kwargs)

    return create


@contextlib.contextmanager
def offline_weights(weights_dir: Path, allow_download: bool = False, skip_timm_pretrained: bool = False
                    ) -> Iterator[None]:
    """Point pyiqa and torch hub at `weights_dir` while a metric is built; refuse downloads unless allowed."""
    import timm
    import torch
    from pyiqa.utils import download_util

    previous_hub = torch.hub.get_dir()
    patches = [mock.patch.object(download_util, "DEFAULT_CACHE_DIR", str(weights_dir / "pyiqa"))]
    if not allow_download:
        patches += [mock.patch.object(download_util, "download_url_to_file", _refuse_download),
                    mock.patch.object(torch.hub, "download_url_to_file", _refuse_download)]
    if skip_timm_pretrained:
        patches.append(mock.patch.object(timm, "create_model", _timm_without_pretrained(timm.create_model)))
    torch.hub.set_dir(str(weights_dir))
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield
    finally:
        torch.hub.set_dir(previous_hub)
