"""Memory inside ComfyUI, against the fakes of comfy.model_management / ModelPatcher (tests/fake_comfy.py):
one base shared with Load Checkpoint's tensors (the static LoRA is a load-time patch, not a merged copy),
the pipeline's free-memory / cache calls going through the adapter, and the text encoder on the device only
while it encodes, once per prompt."""

from __future__ import annotations

import copy

import pytest
import torch

from onestep_sr.models import device_memory
from onestep_sr.models.base_models import BaseModels
from onestep_sr.models.weights_io import read_weights_file
from onestep_sr.nodes import comfy_adapter
from onestep_sr.nodes.loader_node import FROM_INPUTS, OneStepSRLoader
from onestep_sr.nodes.upscale_node import METHOD_DEFAULT, OneStepSRUpscale
from onestep_sr.pipelines.model import apply_method_weights
from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings

import fake_comfy

UPSCALE = dict(prompt="a photo", scale=4.0, color_fix=METHOD_DEFAULT, latent_tile=96, latent_overlap=32,
               vae_encoder_tile=1024, vae_decoder_tile=224, latent="mean", seed=0)


@pytest.fixture
def comfy(monkeypatch, tmp_path, tiny_base_dir, osediff_pkl):
    return fake_comfy.install_with_osediff(monkeypatch, tmp_path, tiny_base_dir, osediff_pkl[0])




@pytest.fixture
def from_inputs(comfy, tiny_configs, tiny_base):
    states = fake_comfy.tiny_comfy_states(tiny_base)
    model, clip, vae = fake_comfy.checkpoint_outputs(*states)
    (handle,) = OneStepSRLoader().load("osediff.pkl", FROM_INPUTS, "fp32", model=model, clip=clip, vae=vae)
    host = {id(t): t for state in states for t in state.values()}
    return handle, host


def _not_shared(handle, host: dict) -> set[str]:
    """Our parameters whose storage is not one of Load Checkpoint's tensors."""
    ptrs = {t.data_ptr() for t in host.values()}
    parts = {"unet": handle.model.unet, "vae": handle.model.vae, "text_encoder": handle.model.text_encoder}
    return {f"{part}.{name}" for part, module in parts.items() for name, p in module.named_parameters()
            if p.data_ptr() not in ptrs}


def _image(h=24, w=28):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, h, w, 3, generator=generator)


def test_one_base_static_lora_is_a_load_time_patch(from_inputs, tiny_base, osediff_pkl):
    """Only the weights OSEDiff trains outright (conv_in) are our own tensors; the LoRA lives in the patcher,
    is applied at load (same image as merging it), and after an unload every weight is ComfyUI's again."""
    handle, host = from_inputs
    trained = {"unet.conv_in.weight", "unet.conv_in.bias"}
    assert _not_shared(handle, host) == trained
    lora_keys = [k for k in handle.patcher.patches if k.startswith("parts.unet.")]
    assert len(lora_keys) > 10 and handle.model.weight_patches == {}
    out, _mask = OneStepSRUpscale().upscale(handle, _image(), **UPSCALE)
    assert len(_not_shared(handle, host)) > len(trained)  # loaded: patched weights (on the device, in ComfyUI)

    base = BaseModels(copy.deepcopy(tiny_base.unet), copy.deepcopy(tiny_base.vae),
                      copy.deepcopy(tiny_base.text_encoder), handle.model.tokenizer)
    merged = apply_method_weights(base, read_weights_file(osediff_pkl[0]), "osediff", "osediff.pkl").to("cpu", torch.float32)
    settings = UpscaleSettings(scale=4.0, prompt="a photo", latent_tile=96, latent_overlap=32, vae_encoder_tile=1024,
                               vae_decoder_tile=224)
    expected = OneStepPipeline(merged, "cpu")(_image(), settings)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)

    comfy_adapter.unload(handle.patcher)
    assert _not_shared(handle, host) == trained


def test_reshare_points_copies_back_at_the_host_tensors():
    """After a GPU round trip each parameter holds a fresh host copy; re-sharing drops it, but leaves a weight
    of another dtype or shape (re-cast, trained) alone."""
    layer = torch.nn.Linear(4, 3)
    source = layer.weight.detach().clone()
    other = torch.zeros(3, 4, dtype=torch.float64)
    assert comfy_adapter.reshare_weights(layer, {"weight": source}) == 1
    assert layer.weight.data_ptr() == source.data_ptr()
    assert comfy_adapter.reshare_weights(layer, {"bias": other}) == 0


def test_memory_calls_go_through_the_adapter(from_inputs, comfy, monkeypatch):
    """Free memory comes from comfy.model_management (minus --reserve-vram), an out-of-memory retry releases
    the cache with soft_empty_cache, and the pack's own PyTorch memory functions are never called."""
    handle, _ = from_inputs

    def forbidden(*args, **kwargs):
        raise AssertionError("the pack's own PyTorch memory call was used inside ComfyUI")

    monkeypatch.setattr(device_memory, "available_memory", forbidden)
    monkeypatch.setattr(device_memory, "free_cached_memory", forbidden)
    restore = OneStepPipeline.restore
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(OneStepPipeline, "restore", fails_once)
    comfy.free_bytes, comfy.reserved_bytes = 10 << 30, 2 << 30
    OneStepSRUpscale().upscale(handle, _image(), **UPSCALE)
    assert len(calls) == 2 and comfy.soft_empty_cache >= 1
    assert comfy.free_memory_queries, "the tiled VAE's auto mode asked ComfyUI for free memory"

    memory = comfy_adapter.ComfyMemory((handle.patcher,))
    assert memory.available(torch.device("cpu")) == 8 << 30
    memory.make_room(torch.device("cuda", 0), 1000)  # evicts others, keeps ours, honours the reserve
    ((required, device, kept),) = comfy.free_memory_calls
    assert required == 1000 + (2 << 30) and device == torch.device("cuda", 0) and kept == [handle.patcher]
    memory.make_room(torch.device("cpu"), 1000)  # ComfyUI never evicts for CPU memory
    assert len(comfy.free_memory_calls) == 1


def test_text_encoder_leaves_the_device_and_runs_once_per_prompt(from_inputs, comfy):
    handle, host = from_inputs
    text_patcher = handle.text_patcher
    assert text_patcher is not None and text_patcher is not handle.patcher
    assert "text_encoder" not in handle.patcher.model.parts  # not loaded with the UNet/VAE

    def text_loads():
        return sum(1 for patcher, _ in comfy.loaded if patcher is text_patcher)

    def loaded_now():
        return [loaded.model for loaded in fake_comfy.sys.modules["comfy.model_management"].current_loaded_models]

    OneStepSRUpscale().upscale(handle, _image(), **UPSCALE)
    assert text_loads() == 1 and text_patcher in comfy.unloaded
    assert text_patcher not in loaded_now() and handle.patcher in loaded_now()
    assert all(p.device == text_patcher.offload_device for p in handle.model.text_encoder.parameters())
    assert not {n for n in _not_shared(handle, host) if n.startswith("text_encoder.")}  # ComfyUI's CLIP tensors
    OneStepSRUpscale().upscale(handle, _image(), **UPSCALE)  # same prompt: cached embeddings
    assert text_loads() == 1
    OneStepSRUpscale().upscale(handle, _image(), **{**UPSCALE, "prompt": "another prompt"})
    assert text_loads() == 2 and text_patcher not in loaded_now()


def test_text_encoder_precision_follows_the_device(comfy, monkeypatch):
    mm = fake_comfy.sys.modules["comfy.model_management"]
    assert comfy_adapter.compute_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(mm, "should_use_fp16", lambda device=None: True)
    assert comfy_adapter.compute_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(mm, "should_use_fp16", lambda device=None: False)
    monkeypatch.setattr(mm, "should_use_bf16", lambda device=None: True)
    assert comfy_adapter.compute_dtype(torch.device("cuda")) == torch.bfloat16
