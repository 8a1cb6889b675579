"""Reading and writing method weight files safely.

Published files are torch pickles (`osediff.pkl`, `s3diff.pkl`, `hero_sr_model.pkl`); we read them
with `torch.load(weights_only=True)` only, never arbitrary unpickling. Our own export is a
safetensors file holding the same nested dict: tensors under '/'-joined paths, everything else
(ranks, module lists) as JSON in the metadata.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

EXPORT_FORMAT = "onestep_sr.method_weights.v1"
_SEP = "/"


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable, corrupt or of the wrong kind."""


def check_weights_path(path: Path, what: str = "weights file") -> None:
    """A readable, non-empty file, or a one-line error naming it and its folder."""
    if path.is_dir():
        raise WeightsFileError(f"{what} {path.name} in {path.parent.resolve()} is a folder; give the file itself")
    if not path.is_file():
        raise WeightsFileError(f"{what} not found: {path.name} (looked in {path.parent.resolve()})")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{what} {path.name} in {path.parent.resolve()} is empty (0 bytes): the download "
                               "did not complete; download it again")


def torch_load_error(path: Path, error: BaseException) -> str:
    """Why `torch.load(weights_only=True)` refused a file, as one sentence for the user.

    torch's own text suggests retrying with `weights_only=False`; for a file from the internet that
    is exactly the wrong advice (it would run whatever code the pickle carries), so it is not passed on.
    """
    text = str(error)
    with open(path, "rb") as stream:
        head = stream.read(4)
    is_zip = head.startswith(b"PK")
    refused = ("which are refused because unpickling them could run code; use the file from the method's "
               "official release, or its safetensors export")
    if "Weights only load failed" in text:
        blocked = re.search(r"GLOBAL ([\w.]+)", text)
        if blocked:
            return f"it holds Python objects other than tensors ({blocked.group(1)}), {refused}"
        if is_zip or head[:1] == b"\x80":
            return f"it holds Python objects other than tensors, {refused}"
        return "it is not a PyTorch weights file (unrecognised content); download it again"
    if is_zip:
        return "it is corrupt or truncated (its zip archive is incomplete); download it again"
    return "it is not a PyTorch weights file (unrecognised content); download it again"


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Load a published .pkl/.pth or our .safetensors export into a plain nested dict."""
    path = Path(path)
    check_weights_path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors_export(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; the error says it all
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad pickles
        raise WeightsFileError(f"could not read {path.name} in {path.parent.resolve()}: "
                               f"{torch_load_error(path, error)}") from None
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


def safetensors_export_bytes(data: Mapping[str, Any], method: str) -> bytes:
    """A method weights dict as safetensors bytes (tensors + JSON metadata for the rest)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for key, value in data.items():
        _flatten(value, str(key), tensors, meta)
    header = {"format": EXPORT_FORMAT, "method": method, "meta": json.dumps(meta)}
    return save(tensors, metadata=header)


def write_safetensors_export(data: Mapping[str, Any], path: str | Path, method: str) -> None:
    """Write a method weights dict as safetensors (tensors + JSON metadata for the rest)."""
    Path(path).write_bytes(safetensors_export_bytes(data, method))


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
        reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsFileError(f"could not read {path.name} in {path.parent.resolve()}: it is corrupt or truncated "
                               f"({reason}); download or export it again") from None
    try:
        meta = json.loads(header["meta"])
    except (KeyError, ValueError):
        raise WeightsFileError(f"{path.name} in {path.parent.resolve()} is an incomplete OneStep SR export (its "
                               "metadata lacks a readable 'meta' entry); export it again with `onestep-sr convert`"
                               ) from None
    data: dict[str, Any] = {}
    for key, value in {**meta, **tensors}.items():
        node = data
        *parents, leaf = key.split(_SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data
