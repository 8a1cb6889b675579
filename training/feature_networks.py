"""Frozen feature networks for the losses, read from local files only (nothing is downloaded).

LPIPS(VGG) needs two files in the feature-network folder (config `model.feature_networks`):
  vgg16-397923af.pth  torchvision's ImageNet VGG16 state dict (`features.N.weight/bias` keys)
  lpips_vgg.pth       the LPIPS v0.1 linear heads (the `lpips` package's weights/v0.1/vgg.pth:
                      `lin0.model.1.weight` ... `lin4.model.1.weight`)
A missing file is an error naming it and the folder it must go in.
"""

from __future__ import annotations

from pathlib import Path

import torch

VGG_FILES = ("vgg16-397923af.pth", "vgg16.pth")
LPIPS_FILES = ("lpips_vgg.pth", "vgg.pth")


class FeatureNetworkMissing(FileNotFoundError):
    """A loss needs a feature network file that is not in the folder."""


def find_file(folder: str | Path, names: tuple[str, ...], what: str) -> Path:
    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FeatureNetworkMissing(
        f"{what}: {names[0]} not found in {folder.resolve()} - put the file there (or set model.feature_networks "
        f"to the folder that holds it); nothing is downloaded automatically"
    )


def read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any read failure is reported the same way
        raise ValueError(f"cannot read {path.name} in {path.parent}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
