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
                                  ui_text=[], unloaded=[], free_memory_calls=[], free_memory_queries=[],
                                  soft_empty_cache=0, free_bytes=1 << 40, reserved_bytes=0)

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
    mm.should_use_bf16 = lambda device=None: False
    mm.InterruptProcessingException = InterruptProcessingException
    mm.current_loaded_models = []

    def soft_empty_cache(force=False):
        state.soft_empty_cache += 1

    def get_free_memory(dev=None, torch_free_too=False):
        state.free_memory_queries.append(dev)
        return (state.free_bytes, 0) if torch_free_too else state.free_bytes

    def free_memory(memory_required, device, keep_loaded=()):
        state.free_memory_calls.append((memory_required, device, [loaded.model for loaded in keep_loaded]))
        return []

    class LoadedModel:
        def __init__(self, patcher):
            self.model = patcher

        def model_unload(self, memory_to_free=None, unpatch_weights=True):
            self.model.detach(unpatch_weights)
            state.unloaded.append(self.model)
            return True

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        for patcher in models:
            if not any(loaded.model is patcher for loaded in mm.current_loaded_models):
                patcher.patch_model(patcher.load_device)
                mm.current_loaded_models.insert(0, LoadedModel(patcher))
            state.loaded.append((patcher, force_full_load))

    mm.soft_empty_cache = soft_empty_cache
    mm.get_free_memory = get_free_memory
    mm.extra_reserved_memory = lambda: state.reserved_bytes
    mm.free_memory = free_memory
    mm.LoadedModel = LoadedModel

    def throw_exception_if_processing_interrupted():
        if state.interrupted:
            state.interrupted = False
            raise InterruptProcessingException()

    mm.load_models_gpu = load_models_gpu
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    weight_adapter = types.ModuleType("comfy.weight_adapter")

    class LoRAAdapter:
        """As ComfyUI's: weights = (up, down, alpha, mid, dora_scale, reshape); update (alpha / rank) up @ down."""

        def __init__(self, loaded_keys, weights):
            self.loaded_keys, self.weights = loaded_keys, weights

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            up, down, alpha = (self.weights[0].to(weight.device, intermediate_dtype),
                               self.weights[1].to(weight.device, intermediate_dtype), self.weights[2])
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
            return weight + ((strength * scale) * diff).type(weight.dtype)

    weight_adapter.LoRAAdapter = LoRAAdapter

    def calculate_weight(entries, weight, key):
        """The part of comfy.lora.calculate_weight our patches use: adapters and ("diff", (tensor,))."""
        for strength, value, strength_model, offset, function in entries:
            assert offset is None and function is None
            weight = weight * strength_model if strength_model != 1.0 else weight
            if isinstance(value, LoRAAdapter):
                weight = value.calculate_weight(weight, key, strength, strength_model, offset, function)
            else:
                kind, (diff,) = value if len(value) == 2 else ("diff", value)
                assert kind == "diff"
                weight = weight + strength * diff.to(weight)
        return weight

    patcher_module = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        """What the real one does for fully loaded models: patches added by key, applied in float32 on the
        load device at load time (the original kept as a backup), restored and moved back on unpatch."""

        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.patches, self.backup = {}, {}
            if getattr(model, "device", None) is None:
                model.device = offload_device  # the real one assigns this too

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            names = self.model.state_dict()
            added = []
            for key, value in patches.items():
                if key in names:
                    self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
                    added.append(key)
            return added

        def _set(self, key, tensor):
            owner, _, attr = key.rpartition(".")
            setattr(self.model.get_submodule(owner), attr, torch.nn.Parameter(tensor, requires_grad=False))

        def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
            for key, entries in self.patches.items():
                weight = self.model.get_parameter(key)
                self.backup.setdefault(key, weight.to(self.offload_device))
                patched = calculate_weight(entries, weight.to(device_to, torch.float32, copy=True), key)
                self._set(key, patched.to(weight.dtype))
            self.model.to(device_to)
            self.model.device = device_to
            return self.model

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for key, weight in self.backup.items():
                    self._set(key, weight)
                self.backup.clear()
                if device_to is not None:
                    self.model.to(device_to)
                    self.model.device = device_to

        def detach(self, unpatch_all=True):
            if unpatch_all:
                self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
            return self.model

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
    comfy.weight_adapter = weight_adapter
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm,
                         "comfy.model_patcher": patcher_module, "comfy.utils": utils, "comfy.sd1_clip": sd1_clip,
                         "comfy.weight_adapter": weight_adapter, "server": server}.items():
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


def install_with_osediff(monkeypatch, root: Path, tiny_base_dir: Path, osediff_pkl: Path) -> types.SimpleNamespace:
    """The fake ComfyUI with the tiny base's tokenizer as its bundled one and osediff.pkl in models/onestep_sr/."""
    import shutil

    tokenizer = root / "comfy" / "sd1_tokenizer"
    shutil.copytree(tiny_base_dir / "tokenizer", tokenizer)
    state = install(monkeypatch, root, tokenizer)
    (state.models_dir / "onestep_sr").mkdir(parents=True)
    shutil.copy(osediff_pkl, state.models_dir / "onestep_sr" / "osediff.pkl")
    return state


def tiny_comfy_states(tiny_base) -> tuple[dict, dict, dict]:
    """Load Checkpoint's state dicts for the tiny base: LDM UNet/VAE, ComfyUI's SD-2 CLIP keys."""
    from onestep_sr.models import ldm_convert as lc

    from tinymodels import TINY_UNET_CONFIG, TINY_VAE_CONFIG

    unet = lc.diffusers_to_ldm_unet(tiny_base.unet.state_dict(), TINY_UNET_CONFIG)
    vae = lc.diffusers_to_ldm_vae(tiny_base.vae.state_dict(), TINY_VAE_CONFIG)
    clip = {f"clip_h.transformer.{k}": v for k, v in lc.canonical_clip_keys(tiny_base.text_encoder.state_dict()).items()}
    return unet, vae, clip
