"""Small fakes of the few `comfy.*` / `folder_paths` functions the nodes use.

ComfyUI is not installable from the package registries, so node tests run against these; the real
ComfyUI test (tests/test_real_comfyui.py) runs when COMFYUI_PATH is set.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch


class InterruptProcessingException(Exception):
    pass


def install(monkeypatch, root: Path, tokenizer_dir: Path) -> types.SimpleNamespace:
    """Install fake modules into sys.modules; returns a namespace recording what nodes did."""
    state = types.SimpleNamespace(loaded=[], progress=[], interrupted=False, models_dir=root / "models",
                                  ui_text=[])

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(state.models_dir)
    folder_paths.folder_names_and_paths = {
        "checkpoints": ([str(state.models_dir / "checkpoints")], {".safetensors", ".ckpt"}),
        "diffusers": ([str(state.models_dir / "diffusers")], ["folder"]),
    }

    def add_model_folder_path(name, path, is_default=False):
        paths, exts = folder_paths.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def get_folder_paths(name):
        return list(folder_paths.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, exts = folder_paths.folder_names_and_paths[name]
        found = []
        for folder in paths:
            if os.path.isdir(folder):
                found += [f for f in os.listdir(folder) if not exts or os.path.splitext(f)[1] in exts]
        return sorted(found)

    def get_full_path(name, filename):
        """As ComfyUI's: an unknown folder name gives None, and the file name is cleaned up so that
        '..' or an absolute path cannot leave the registered folders."""
        if name not in folder_paths.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in folder_paths.folder_names_and_paths[name][0]:
            candidate = os.path.join(folder, filename)
            if os.path.isfile(candidate):
                return candidate
        return None

    (root / "input").mkdir(exist_ok=True)
    folder_paths.get_input_directory = lambda: str(root / "input")
    folder_paths.get_user_directory = lambda: str(root / "user")
    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path

    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.should_use_fp16 = lambda device=None: False
    mm.soft_empty_cache = lambda force=False: None
    mm.InterruptProcessingException = InterruptProcessingException

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        for patcher in models:
            patcher.model.to(patcher.load_device)
            state.loaded.append((patcher, force_full_load))

    def throw_exception_if_processing_interrupted():
        if state.interrupted:
            state.interrupted = False
            raise InterruptProcessingException()

    mm.load_models_gpu = load_models_gpu
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    patcher_module = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            if getattr(model, "device", None) is None:
                model.device = offload_device  # the real one assigns this too

    patcher_module.ModelPatcher = ModelPatcher

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            self.total = total if total is not None else self.total
            self.current = min(value, self.total)
            state.progress.append((self.current, self.total))

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar

    sd1_clip = types.ModuleType("comfy.sd1_clip")
    sd1_clip.__file__ = str(tokenizer_dir.parent / "sd1_clip.py")
    (tokenizer_dir.parent / "sd1_tokenizer").mkdir(exist_ok=True) if tokenizer_dir.name != "sd1_tokenizer" else None

    server = types.ModuleType("server")

    class PromptServer:
        instance = None

        def send_progress_text(self, text, node_id, sid=None):
            state.ui_text.append((node_id, text))

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer

    comfy.model_management, comfy.model_patcher, comfy.utils, comfy.sd1_clip = mm, patcher_module, utils, sd1_clip
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm,
                         "comfy.model_patcher": patcher_module, "comfy.utils": utils, "comfy.sd1_clip": sd1_clip,
                         "server": server}.items():
        monkeypatch.setitem(sys.modules, name, module)
    state.folder_paths = folder_paths
    return state


class _Holder:
    def __init__(self, **parts):
        self.__dict__.update(parts)


class _StateModule(torch.nn.Module):
    """Stands in for a ComfyUI module: only state_dict() is used."""

    def __init__(self, state: dict):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):
        return dict(self._state)


def checkpoint_outputs(unet_state: dict, vae_state: dict, clip_state: dict, model_type: str = "EPS",
                       model_patches: dict | None = None, clip_patches: dict | None = None):
    """(MODEL, CLIP, VAE) shaped like CheckpointLoaderSimple's: ModelPatcher-like objects whose `.model`
    holds the LDM UNet and `model_type` (comfy.model_base.ModelType), and whose `patches` LoraLoader fills."""
    model = _Holder(model=_Holder(diffusion_model=_StateModule(unet_state), model_type=_Holder(name=model_type)),
                    patches=dict(model_patches or {}))
    clip = _Holder(cond_stage_model=_StateModule(clip_state), patcher=_Holder(patches=dict(clip_patches or {})))
    vae = _Holder(first_stage_model=_StateModule(vae_state))
    return model, clip, vae
