"""Configs of the ResShift family: shipped JSON copies of the official YAML sections, and a reader
for a user's own official-format YAML (`--model-config`).

Only `model.params`, `autoencoder.params` (with its `ddconfig`) and `diffusion.params` are read;
`${a.b.c}` references to other values (OmegaConf style) are resolved. PyYAML comes with
transformers, a runtime dependency already.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..weights_io import WeightsFileError
from .diffusion import DiffusionConfig
from .swin_unet import SwinUNetConfig
from .vq_autoencoder import VQConfig

CONFIG_DIR = Path(__file__).parent / "configs"
_REFERENCE = re.compile(r"^\$\{([^}]+)\}$")


class ConfigError(WeightsFileError):
    """A model config file is unreadable or describes something we cannot build."""


@dataclass(frozen=True)
class ResShiftConfig:
    unet: SwinUNetConfig
    vq: VQConfig
    diffusion: DiffusionConfig
    source: str = ""


def shipped_config(name: str) -> ResShiftConfig:
    path = CONFIG_DIR / f"{name}.json"
    return config_from_sections(json.loads(path.read_text(encoding="utf-8")), f"shipped config {name}")


def load_config_file(path: str | Path) -> ResShiftConfig:
    """An official-format YAML (or JSON) config: its model/autoencoder/diffusion sections."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config not found: {path.name} (looked in {path.parent})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as error:
        raise ConfigError(f"could not read {path.name} in {path.parent}: {error}") from error
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.name} is not a ResShift/SinSR config (no model/autoencoder/diffusion sections)")
    return config_from_sections(data, path.name)


def _resolve(value: Any, root: Mapping, where: str) -> Any:
    if isinstance(value, str) and (match := _REFERENCE.match(value.strip())):
        node: Any = root
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"{where}: cannot resolve {value}")
            node = node[part]
        return _resolve(node, root, where)
    if isinstance(value, Mapping):
        return {k: _resolve(v, root, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, where) for v in value]
    return value


def _params(data: Mapping, section: str, where: str) -> dict:
    node = data.get(section)
    if not isinstance(node, Mapping) or not isinstance(node.get("params"), Mapping):
        raise ConfigError(f"{where} has no {section}.params section (expected the official ResShift/SinSR YAML layout)")
    return dict(_resolve(node["params"], data, where))


def _build(cls, values: Mapping, where: str, **overrides):
    names = {f.name for f in fields(cls)} - {"extra"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    kwargs.update(overrides)
    try:
        return cls(**kwargs, extra={k: v for k, v in values.items() if k not in names})
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error


def config_from_sections(data: Mapping, where: str) -> ResShiftConfig:
    model = _params(data, "model", where)
    auto = _params(data, "autoencoder", where)
    diff = _params(data, "diffusion", where)
    in_channels = int(model.get("in_channels", 6))
    if model.get("cond_lq", True) is False:
        raise ConfigError(f"{where}: models without the LR condition (cond_lq: false) are not super-resolution models")
    if "lq_size" in model:  # ResShift's newer UNet adds the LR channels itself
        if int(model["lq_size"]) != int(model.get("image_size", 64)):
            raise ConfigError(f"{where}: lq_size != image_size needs ResShift's LR feature extractor, "
                              "which only its x2/inpainting models use; not supported")
        in_channels += 3
    unet = _build(SwinUNetConfig, model, where, in_channels=in_channels)
    if unet.in_channels != unet.out_channels + 3:
        raise ConfigError(f"{where}: in_channels {unet.in_channels} is not latent ({unet.out_channels}) + LR (3)")
    ddconfig = auto.get("ddconfig", {})
    vq = _build(VQConfig, {**ddconfig, **{k: v for k, v in auto.items() if k != "ddconfig"}}, where)
    if diff.get("schedule_name", "exponential") != "exponential" or diff.get("predict_type", "xstart") != "xstart":
        raise ConfigError(f"{where}: only the exponential schedule with x0 prediction (ResShift/SinSR) is supported")
    if not diff.get("latent_flag", True):
        raise ConfigError(f"{where}: only latent-space models (latent_flag: true) are supported")
    power = (diff.get("schedule_kwargs") or {}).get("power", 0.3)
    diffusion = _build(DiffusionConfig, {k: v for k, v in diff.items() if k != "schedule_kwargs"}, where,
                       power=float(power))
    if unet.out_channels != vq.embed_dim:
        raise ConfigError(f"{where}: the UNet outputs {unet.out_channels} channels but the latent has {vq.embed_dim}")
    return ResShiftConfig(unet=unet, vq=vq, diffusion=diffusion, source=where)
