"""Checkpoints: the published method file (osediff.pkl) + the pack's safetensors export, and the full
resume state (trainable weights, optimisers, schedulers, grad scaler, RNG, step, config).

A checkpoint folder is written under a temporary name and renamed when complete, so an interrupted
save never leaves a half-written checkpoint; an existing folder is never overwritten.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.weights_io import write_safetensors_export

STATE_FILE = "training_state.pt"
PREFIX = "step-"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"{PREFIX}{step:08d}"


def write_checkpoint(output_dir: Path, step: int, published_file: str, export_method: str,
                     published: dict[str, Any], state: dict[str, Any], keep: int,
                     extra_files: dict[str, Path] | None = None) -> Path:
    """`published_file` is the official name (osediff.pkl, s3diff.pkl, hero_sr_model.pkl, HF-Diff.pth);
    the safetensors export sits beside it under the same stem. `extra_files` (name -> source) are
    copied in too, e.g. S3Diff's de_net.pth, which the CLI and the nodes look for beside s3diff.pkl."""
    final = checkpoint_dir(output_dir, step)
    if final.exists():
        return final
    temporary = final.with_name(final.name + ".partial")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    torch.save(published, temporary / published_file)
    write_safetensors_export(published, temporary / f"{Path(published_file).stem}.safetensors", export_method)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, temporary / name)
    torch.save(state, temporary / STATE_FILE)
    os.replace(temporary, final)
    _prune(output_dir, keep)
    return final


def _prune(output_dir: Path, keep: int) -> None:
    found = list_checkpoints(output_dir)
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and not p.name.endswith(".partial") and (p / STATE_FILE).is_file())


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output folder (its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no training checkpoint in {path.resolve()} (expected {STATE_FILE} in it or in "
                            f"checkpoints/{PREFIX}*/)")


def read_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- recipe state beyond the trainable weights (resume) ----------------------------------------------
def buffers_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of a module's buffers (e.g. BatchNorm statistics, spectral norm's power-iteration
    vectors): state a resumed run needs that the loop's trainable parameters lack."""
    return {n: b.detach().cpu().clone() for n, b in module.named_buffers()}


def load_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Copy what `buffers_state` returned back into the module's buffers."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])


def discriminator_state(discriminator: nn.Module | None) -> dict[str, Any]:
    """The discriminator heads' buffers (spectral norm's power-iteration vectors change every training
    forward), or nothing when the run has no discriminator."""
    if discriminator is None:
        return {}
    return {"discriminator_buffers": buffers_state(discriminator.heads)}


def load_discriminator_state(discriminator: nn.Module | None, state: dict[str, Any]) -> None:
    """Restore what `discriminator_state` returned (a no-op without a discriminator or saved buffers)."""
    buffers = state.get("discriminator_buffers")
    if buffers and discriminator is not None:
        load_buffers(discriminator.heads, buffers)
