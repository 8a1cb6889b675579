"""The only module that talks to ComfyUI (`comfy.*`, `folder_paths`).

Everything is imported lazily inside functions so the pack's package imports without ComfyUI
(tests, CLI). Tests replace these functions' targets with small fakes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.device_memory import MemoryProvider

WEIGHTS_FOLDER = "onestep_sr"
WEIGHTS_EXTENSIONS = {".pkl", ".pth", ".pt", ".safetensors", ".yaml", ".yml"}  # YAML: ResShift-family configs
SAMPLE_INPUT = Path(__file__).resolve().parents[1] / "workflows" / "onestep_sr_sample.png"


def register_weights_folder() -> None:
    """Register models/onestep_sr (and keep any extra_model_paths.yaml entries for it)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, WEIGHTS_FOLDER)
    folder_paths.add_model_folder_path(WEIGHTS_FOLDER, default, is_default=True)
    paths, extensions = folder_paths.folder_names_and_paths[WEIGHTS_FOLDER]
    folder_paths.folder_names_and_paths[WEIGHTS_FOLDER] = (paths, set(extensions) | WEIGHTS_EXTENSIONS)


def register_if_hosted() -> None:
    """At import inside ComfyUI: make models/onestep_sr known before any node runs."""
    try:
        import folder_paths  # noqa: F401
    except ImportError:
        return
    register_weights_folder()
    install_sample_input()


def install_sample_input() -> None:
    """Copy the shipped workflows' small sample image into ComfyUI's input folder, so a template opened
    unchanged runs. Never overwrites: an existing file of that name is left as it is."""
    import folder_paths

    try:
        target = Path(folder_paths.get_input_directory()) / SAMPLE_INPUT.name
        if SAMPLE_INPUT.is_file() and target.parent.is_dir() and not target.exists():
            shutil.copyfile(SAMPLE_INPUT, target)
    except OSError as error:  # a read-only input folder must not stop the pack from loading
        logging.getLogger("onestep_sr").warning("could not copy %s to the input folder: %s", SAMPLE_INPUT.name, error)


def list_files(folder: str) -> list[str]:
    import folder_paths

    if folder == WEIGHTS_FOLDER:
        register_weights_folder()
    try:
        return sorted(folder_paths.get_filename_list(folder))
    except KeyError:
        return []


def folder_locations(folder: str) -> list[str]:
    import folder_paths

    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def full_path(folder: str, name: str) -> Path:
    """The file's path, or an error that names the file and where to put it."""
    import folder_paths

    if folder == WEIGHTS_FOLDER:
        register_weights_folder()
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        where = ", ".join(folder_locations(folder)) or f"models/{folder}"
        raise FileNotFoundError(f"{name} not found in the '{folder}' model folder; put it in {where}")
    return Path(path)


def find_file(folder: str, name: str) -> Path | None:
    """A file's path in a model folder, or None."""
    try:
        return full_path(folder, name)
    except FileNotFoundError:
        return None


def diffusers_folder(name: str) -> Path:
    """A folder directly or deeper inside a registered `diffusers` folder; names that would leave it
    (`..`, absolute paths) are refused, as ComfyUI's own `get_full_path` clean-up confines file names."""
    clean = os.path.relpath(os.path.join("/", name), "/")
    if not name or clean != os.path.normpath(name) or clean in (".", "..") or os.path.isabs(name):
        raise ValueError(f"diffusers folder name {name!r} must name a folder inside models/diffusers")
    for root in folder_locations("diffusers"):
        candidate = Path(root) / name
        if candidate.is_dir():
            return candidate
    where = ", ".join(folder_locations("diffusers")) or "models/diffusers"
    raise FileNotFoundError(f"diffusers folder {name} not found; put it in {where}")


def list_diffusers_folders() -> list[str]:
    names = set()
    for root in folder_locations("diffusers"):
        if os.path.isdir(root):
            names.update(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "unet")))
    return sorted(names)


def comfy_tokenizer_dir() -> Path:
    """ComfyUI's bundled CLIP BPE files (the SD-2 text encoder uses the same vocabulary)."""
    import comfy.sd1_clip

    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"


def cache_folder() -> Path | None:
    """Where the pack keeps computed caches (tag embeddings): a folder in ComfyUI's user directory."""
    import folder_paths

    get_user_directory = getattr(folder_paths, "get_user_directory", None)
    return Path(get_user_directory()) / "onestep_sr_cache" if get_user_directory else None


def torch_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def offload_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.unet_offload_device()


def intermediate_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.intermediate_device()


def default_dtype(device: torch.device) -> torch.dtype:
    import comfy.model_management

    if comfy.model_management.should_use_fp16(device):
        return torch.float16
    return torch.float32


def vae_dtype(device: torch.device, unet_dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision on auto: bf16 where ComfyUI would run its own VAE in bf16 (so the tensors can be
    shared with Load Checkpoint's VAE), else the UNet's (fp16 decodes that overflow are redone in fp32)."""
    import comfy.model_management as mm

    if unet_dtype != torch.float32 and getattr(mm, "should_use_bf16", None) and mm.should_use_bf16(device):
        return torch.bfloat16
    return unet_dtype


class ModuleBundle(nn.Module):
    """One nn.Module holding a method's modules so ComfyUI loads and offloads them together.

    ModelPatcher writes `model.device`; diffusers modules expose it as a read-only property, so they
    travel inside this plain container instead of being wrapped directly.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.device = None


BUNDLE_PREFIX = "parts."
_PATCHER_CLASSES: dict[type, type] = {}  # ComfyUI ModelPatcher -> our subclass of it


def reshare_weights(module: nn.Module, sources: dict[str, torch.Tensor]) -> int:
    """Point parameters back at the host's tensors they were built from; returns how many moved.

    Moving a module to the GPU and back (ComfyUI's unload) leaves each parameter holding a fresh host
    copy, i.e. a second base in RAM beside the checkpoint ComfyUI keeps loaded. A parameter is re-pointed
    only where device, dtype and shape equal the source's (a trained or re-cast weight is left alone)."""
    moved = 0
    for name, source in sources.items():
        owner_name, _, attr = name.rpartition(".")
        try:
            current = getattr(module.get_submodule(owner_name), attr)
        except AttributeError:
            continue
        if (current is None or current.data_ptr() == source.data_ptr() or current.device != source.device
                or current.dtype != source.dtype or current.shape != source.shape):
            continue
        current.data = source
        moved += 1
    return moved


def _patcher_class() -> type:
    """ComfyUI's ModelPatcher, re-sharing the base with ComfyUI's own tensors after every unpatch."""
    import comfy.model_patcher

    base = comfy.model_patcher.ModelPatcher
    if base not in _PATCHER_CLASSES:

        class SharedBasePatcher(base):
            shared_sources: dict[str, torch.Tensor] = {}

            def unpatch_model(self, device_to=None, unpatch_weights=True):
                result = super().unpatch_model(device_to, unpatch_weights)
                if unpatch_weights:
                    reshare_weights(self.model, self.shared_sources)
                return result

        _PATCHER_CLASSES[base] = SharedBasePatcher
    return _PATCHER_CLASSES[base]


def lora_patch(update: Any) -> Any:
    """A WeightPatch as ComfyUI's own LoRA patch: (up, down, alpha) with alpha / rank = our scale."""
    import comfy.weight_adapter

    rank = update.down.shape[0]
    return comfy.weight_adapter.LoRAAdapter(set(), (update.up, update.down, update.scale * rank, None, None, None))


def make_patcher(modules: dict[str, nn.Module], weight_patches: dict[str, list] | None = None,
                 host_patches: dict[str, list] | None = None, shared: dict[str, torch.Tensor] | None = None) -> Any:
    """A ModelPatcher over our modules. weight_patches (static LoRA, "unet.<module>.weight" -> updates)
    become ComfyUI LoRA patches, applied on the load device at load time; host_patches (same keys, ComfyUI
    patch entries taken from the MODEL/CLIP, e.g. LoraLoader's) are carried over as they are; `shared`
    maps parameter names to the host tensors they share (re-shared after each unload)."""
    import comfy.model_management

    bundle = ModuleBundle(modules)
    patcher = _patcher_class()(
        bundle,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    patcher.shared_sources = {BUNDLE_PREFIX + name: tensor for name, tensor in (shared or {}).items()}
    names = {name for name, _ in bundle.named_parameters()}
    for key, entries in (host_patches or {}).items():
        if BUNDLE_PREFIX + key not in names:
            raise ValueError(f"a MODEL/CLIP patch was mapped to {key}, which our modules do not have")
        patcher.patches.setdefault(BUNDLE_PREFIX + key, []).extend(entries)
    depth = max((len(updates) for updates in (weight_patches or {}).values()), default=0)
    for index in range(depth):  # add_patches takes one patch per key and call
        layer = {BUNDLE_PREFIX + key: lora_patch(updates[index])
                 for key, updates in weight_patches.items() if index < len(updates)}
        added = patcher.add_patches(layer)
        if len(added) != len(layer):
            raise ValueError(f"{len(layer) - len(added)} LoRA patches name weights our modules do not have")
    return patcher


def load_to_device(patcher: Any) -> torch.device:
    """Let ComfyUI make room and move the modules, applying the patches on the device. Fully: our layers
    are diffusers/torch layers, not comfy.ops ones, so ComfyUI cannot stream them (partial loading)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher.load_device


def unload(patcher: Any) -> None:
    """Take one model off its load device now (unpatched, back on the offload device) and release the
    cache, through ComfyUI's own bookkeeping; a no-op when it is not loaded."""
    import comfy.model_management as mm

    for index, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            mm.current_loaded_models.pop(index).model_unload()
            break
    mm.soft_empty_cache()


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16/bf16 where ComfyUI would use them on `device`, else fp32 (the CPU: fp16 math is slow there)."""
    import comfy.model_management as mm

    if torch.device(device).type == "cpu":
        return torch.float32
    if mm.should_use_fp16(device):
        return torch.float16
    if getattr(mm, "should_use_bf16", None) and mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def text_encoder_placement(patcher: Any, keep: tuple[Any, ...] = ()) -> Callable[[], Any]:
    """The text encoder's placement for OneStepModel: loaded (with its patches) onto ComfyUI's device for
    one encoding, in that device's compute precision, then unloaded at once (embeddings are cached).
    `keep`: patchers loaded in the same call, so making room for the text encoder cannot leave them
    unloaded (the UNet/VAE, loaded before the prompt is encoded)."""
    import comfy.model_management

    @contextmanager
    def placement() -> Iterator[torch.device]:
        comfy.model_management.load_models_gpu([patcher, *keep], force_full_load=True)
        device = patcher.load_device
        module = patcher.model
        stored = next(module.parameters()).dtype
        wanted = compute_dtype(device)
        try:
            if wanted != stored:
                module.to(wanted)
            yield device
        finally:
            unload(patcher)
            if wanted != stored:
                module.to(stored)
                reshare_weights(module, patcher.shared_sources)

    return placement


def progress_bar(total: int) -> Callable[[int, int], None]:
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)
    return lambda done, count: bar.update_absolute(done, count)


def check_interrupt() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class ComfyMemory(MemoryProvider):
    """Free memory, room-making and cache release through comfy.model_management: honours
    `--reserve-vram`, evicts other loaded models (never ours) and uses soft_empty_cache."""

    def __init__(self, keep: tuple[Any, ...] = ()):
        self.keep = keep

    def available(self, device: torch.device | str) -> int | None:
        import comfy.model_management as mm

        return max(0, int(mm.get_free_memory(torch.device(device))) - int(mm.extra_reserved_memory()))

    def make_room(self, device: torch.device | str, needed: int) -> None:
        import comfy.model_management as mm

        device = torch.device(device)
        if device.type == "cpu":  # as ComfyUI: models are never evicted for CPU memory
            return
        keep = [loaded for loaded in mm.current_loaded_models if any(loaded.model is p for p in self.keep)]
        mm.free_memory(needed + mm.extra_reserved_memory(), device, keep_loaded=keep)

    def free_cached(self, device: torch.device | str) -> None:
        import comfy.model_management as mm

        mm.soft_empty_cache()


def comfy_base_state(model: Any, clip: Any, vae: Any) -> dict[str, Any]:
    """LDM-layout UNet/VAE state dicts and the HF-layout CLIP dict of ComfyUI's loaded objects.

    The tensors are ComfyUI's own (no copy); our loader only ever replaces them, never mutates.
    """
    unet_state = model.model.diffusion_model.state_dict()
    vae_state = vae.first_stage_model.state_dict()
    clip_state = clip.cond_stage_model.state_dict()
    prefix = ""
    for key in clip_state:
        if ".transformer.text_model." in key:
            prefix = key.split("transformer.text_model.")[0] + "transformer."
            break
    return {"unet": unet_state, "vae": vae_state, "text": clip_state, "text_prefix": prefix}


PREDICTION_NAMES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


def model_prediction(model: Any) -> str:
    """'epsilon', 'v_prediction', another ModelType name in lower case (flow, edm...), or 'unknown'."""
    model_type = getattr(getattr(model, "model", None), "model_type", None)
    if model_type is None:
        return "unknown"
    name = str(getattr(model_type, "name", model_type)).upper()
    return PREDICTION_NAMES.get(name, name.lower())


def patches_of(patcher: Any) -> dict[str, list]:
    """The weight patches (LoraLoader and friends) on a MODEL or on a CLIP's patcher: key -> entries."""
    patches = getattr(patcher, "patches", None)
    if patches is None:
        patches = getattr(getattr(patcher, "patcher", None), "patches", None)
    return dict(patches or {})


def show_text(node_id: str | None, text: str) -> None:
    """Text under the node in the browser (ComfyUI's progress text); a no-op outside a server run."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, node_id)


class _NodeWarnings(logging.Handler):
    """Collects the pack's warnings during one node run and shows them all under that node."""

    def __init__(self, node_id: str | None):
        super().__init__(level=logging.WARNING)
        self.node_id = node_id
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append("Warning: " + record.getMessage())
        show_text(self.node_id, "\n".join(self.messages))


@contextmanager
def ui_warnings(node_id: str | None) -> Iterator[_NodeWarnings]:
    """Route the 'onestep_sr' logger's warnings to the node's UI text (they still reach the console)."""
    logger = logging.getLogger("onestep_sr")
    handler = _NodeWarnings(node_id)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
