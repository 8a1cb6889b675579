"""Random-init metric weights written in pyiqa's exact cache layout (nothing is downloaded).

Each file is the state dict of the very pyiqa / torchvision / CLIP module that will load it, built
with random initialisation and saved under the published file name, in the layout pyiqa's loader
expects for that file (raw dict, `params` wrapper, `.mat` arrays). Tensors above a size are saved as
one initialised row broadcast over the first dimension (a stride-0 view: torch.save stores the row
only), which keeps a VGG16 or a ViT-B file at a few MB; values stay finite and deterministic.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import numpy as np
import torch

_COMPACT_ABOVE = 1 << 16


def _compact(state: dict) -> dict:
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
        if tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() > _COMPACT_ABOVE:
            tensor = tensor[:1].clone().expand(tensor.shape)
        else:
            tensor = tensor.clone()
        out[key] = tensor
    return out


def _save(state, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@contextlib.contextmanager
def _hub(folder: Path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(folder))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def write_torchvision_backbones(folder: Path) -> None:
    from torchvision.models import AlexNet_Weights, VGG16_Weights, alexnet, vgg16

    torch.manual_seed(0)
    for build, weights in ((alexnet, AlexNet_Weights.IMAGENET1K_V1), (vgg16, VGG16_Weights.IMAGENET1K_V1)):
        _save(_compact(build().state_dict()), folder / "checkpoints" / Path(weights.url).name)


def _pyiqa(folder: Path, url: str) -> Path:
    return folder / "pyiqa" / Path(url).name


def write_metric_weights(folder: Path, metrics: tuple[str, ...]) -> Path:
    """Write what `metrics` (pyiqa names) need under `folder`; returns `folder`."""
    import pyiqa  # noqa: F401  (registers the archs)
    from pyiqa.archs import dists_arch, inception, lpips_arch, maniqa_arch, musiq_arch, niqe_arch, topiq_arch

    torch.manual_seed(0)
    if {"lpips", "dists"} & set(metrics):
        write_torchvision_backbones(folder)
    with _hub(folder):
        if "lpips" in metrics:
            net = lpips_arch.LPIPS(pretrained=False, net="alex", version="0.1")
            lins = {k: v for k, v in net.state_dict().items() if k.startswith("lin")}
            _save(_compact(lins), _pyiqa(folder, lpips_arch.default_model_urls["0.1_alex"]))
        if "dists" in metrics:
            net = dists_arch.DISTS(pretrained=False)
            _save({"alpha": net.alpha.detach().clone(), "beta": net.beta.detach().clone()},
                  _pyiqa(folder, dists_arch.default_model_urls["url"]))
        if "fid" in metrics:
            with mock.patch.object(inception, "load_pretrained_network"):
                net = inception.fid_inception_v3()
            _save(_compact(net.state_dict()), _pyiqa(folder, inception.FID_WEIGHTS_URL))
        if "niqe" in metrics:
            import scipy.io

            rng = np.random.default_rng(0)
            basis = rng.normal(size=(36, 36))
            scipy.io.savemat(_pyiqa(folder, niqe_arch.default_model_urls["url"]),
                             {"mu_prisparam": rng.normal(size=(1, 36)), "cov_prisparam": basis @ basis.T + 36 * np.eye(36)})
        if "musiq" in metrics:
            net = musiq_arch.MUSIQ(pretrained=False, num_class=1)
            _save(_compact(net.state_dict()), _pyiqa(folder, musiq_arch.default_model_urls["koniq10k"]))
        for name, key, scale in (("maniqa-pipal", "pipal", 0.13), ("maniqa", "koniq", 0.8)):
            if name in metrics:
                import timm

                from onestep_sr.evaluation.metric_weights import _timm_without_pretrained

                with mock.patch.object(timm, "create_model", _timm_without_pretrained(timm.create_model)):
                    net = maniqa_arch.MANIQA(pretrained=False, train_dataset=key, scale=scale)
                _save(_compact(net.state_dict()), _pyiqa(folder, maniqa_arch.default_model_urls[key]))
        if "topiq_nr" in metrics:
            net = topiq_arch.CFANet(semantic_model_name="resnet50", model_name="cfanet_nr_koniq_res50", use_ref=False,
                                    pretrained=False, backbone_pretrain=False)
            _save({"params": _compact(net.state_dict())},
                  _pyiqa(folder, topiq_arch.default_model_urls["cfanet_nr_koniq_res50"]))
        if "clipiqa" in metrics:
            from pyiqa.archs.clip_model import CLIP

            net = CLIP(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                       vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                       transformer_heads=8, transformer_layers=12).eval()  # OpenAI RN50's configuration
            for tensor in [*net.parameters(), *net.buffers()]:  # compact in place: the archive stores rows only
                if tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() > _COMPACT_ABOVE:
                    tensor.data = tensor.data[:1].clone().expand(tensor.shape)
            # pyiqa's CLIP loader reads OpenAI's TorchScript archives (a plain state dict fails in it)
            with torch.no_grad():
                traced = torch.jit.trace(net, (torch.rand(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                                         check_trace=False)
            (folder / "clip").mkdir(parents=True, exist_ok=True)
            traced.save(str(folder / "clip" / "RN50.pt"))
    return folder
