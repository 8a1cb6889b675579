"""Reading and writing method weight files safely.

Published files are torch pickles (`osediff.pkl`, `s3diff.pkl`, `hero_sr_model.pkl`); we read them
with `torch.load(weights_only=True)` only, never arbitrary unpickling. Our own export is a
safetensors file holding the same nested dict: tensors under '/'-joined paths, everything else
(ranks, module lists) as JSON in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

EXPORT_FORMAT = "onestep_sr.method_weights.v1"
_SEP = "/"


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable, corrupt or of the wrong kind."""


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Load a published .pkl/.pth or our .safetensors export into a plain nested dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path.name} (looked in {path.parent})")
    if path.suffix == ".safetensors":
        return _read_safetensors_export(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad pickles
        text = str(error)
        if "Weights only load failed" in text:
            reason = "it contains Python objects other than tensors, which we refuse to unpickle"
        else:
            reason = f"it is corrupt or truncated ({type(error).__name__}: {text.splitlines()[0][:160]})"
        raise WeightsFileError(f"could not read {path.name} in {path.parent}: {reason}. Download it again.") from error
    if not isinstance(data, Mapping):
        raise WeightsFileError(f"{path.name} does not hold a dict of weights (got {type(data).__name__})")
    return dict(data)


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().contiguous()
    elif isinstance(value, Mapping) and any(_contains_tensor(v) for v in value.values()):
        for key, item in value.items():
            if _SEP in str(key):
                raise WeightsFileError(f"key {key!r} contains {_SEP!r}")
            _flatten(item, f"{prefix}{_SEP}{key}" if prefix else str(key), tensors, meta)
    else:
        meta[prefix] = value


def _contains_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_contains_tensor(v) for v in value.values())
    return False


def write_safetensors_export(data: Mapping[str, Any], path: str | Path, method: str) -> None:
    """Write a method weights dict as safetensors (tensors + JSON metadata for the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for key, value in data.items():
        _flatten(value, str(key), tensors, meta)
    header = {"format": EXPORT_FORMAT, "method": method, "meta": json.dumps(meta)}
    save_file(tensors, str(path), metadata=header)


def _read_safetensors_export(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != EXPORT_FORMAT:
                raise WeightsFileError(
                    f"{path.name} is a safetensors file but not a OneStep SR method export; "
                    "convert the published .pkl with `onestep-sr convert`"
                )
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except WeightsFileError:
        raise
    except Exception as error:
        raise WeightsFileError(f"could not read {path.name} in {path.parent}: corrupt or truncated ({error})") from error
    data: dict[str, Any] = {}
    for key, value in {**json.loads(header["meta"]), **tensors}.items():
        node = data
        *parents, leaf = key.split(_SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data
