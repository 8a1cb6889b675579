"""Building the SD-2.x base (UNet, VAE, text encoder, tokenizer) offline.

Sources: a diffusers folder, a single-file LDM checkpoint (.safetensors, as in models/checkpoints)
or state dicts handed over by a host (ComfyUI's loaded MODEL/CLIP/VAE). Module configs ship with
the pack (models/configs), so nothing is fetched. Modules are created on the meta device and then
take the converted tensors by assignment: no random init, and no second copy of weights that are
not modified later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
BASE_KINDS = ("sd21_base", "sd_turbo")


class BaseModelError(ValueError):
    """The base model is missing, unreadable or not an SD-2.x model."""


@dataclass
class BaseModels:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any | None  # transformers CLIPTokenizer
    source: str = ""


def load_config(kind: str | Path, part: str) -> dict[str, Any]:
    """A shipped config (`kind` in BASE_KINDS) or one from a folder holding unet.json, vae.json, ..."""
    if isinstance(kind, Path) or kind not in BASE_KINDS:
        folder = Path(kind)
        if not folder.is_dir():
            raise ValueError(f"unknown base kind {kind!r}; known: {BASE_KINDS} or a config folder")
    else:
        folder = CONFIG_DIR / kind
    config = json.loads((folder / f"{part}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _build_on_meta(factory, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    with torch.device("meta"):
        module = factory()
    try:
        result = module.load_state_dict(dict(state), strict=False, assign=True)
    except RuntimeError:  # shape mismatches: one line instead of hundreds
        raise BaseModelError(_shape_mismatch(module, state, what)) from None
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise BaseModelError(f"the {what} weights do not match the SD-2.x {what} structure ({detail})")
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (CLIP position ids) are rebuilt
            owner = module.get_submodule(name.rpartition(".")[0])
            leaf = name.rpartition(".")[2]
            if leaf != "position_ids":
                raise BaseModelError(f"cannot materialise buffer {name} of the {what}")
            owner.register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return module.eval().requires_grad_(False)


def _shape_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> str:
    expected = module.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    example = ""
    if wrong:
        key = wrong[0]
        example = f"; e.g. {key} is {tuple(state[key].shape)}, SD-2.x has {tuple(expected[key].shape)}"
    return (f"the {what} weights have the layout of SD-2.x but not its sizes ({len(wrong)} tensors differ{example}); "
            "use SD-2.1-base (OSEDiff) or SD-Turbo (S3Diff, Hero-SR)")


def build_unet(state: Mapping[str, torch.Tensor], kind: str | Path = "sd21_base") -> nn.Module:
    from diffusers import UNet2DConditionModel

    config = load_config(kind, "unet")
    return _build_on_meta(lambda: UNet2DConditionModel(**config), state, "UNet")


def build_vae(state: Mapping[str, torch.Tensor], kind: str | Path = "sd21_base") -> nn.Module:
    from diffusers import AutoencoderKL

    config = load_config(kind, "vae")
    return _build_on_meta(lambda: AutoencoderKL(**config), state, "VAE")


def build_text_encoder(state: Mapping[str, torch.Tensor], kind: str | Path = "sd21_base") -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    from .ldm_convert import clip_keys_for

    config = CLIPTextConfig(**load_config(kind, "text_encoder"))

    def factory() -> nn.Module:
        return CLIPTextModel(config)

    with torch.device("meta"):
        module_keys = set(factory().state_dict())
    return _build_on_meta(factory, clip_keys_for(module_keys, state), "text encoder")


def load_tokenizer(folder: str | Path, pad_token: str | None = None) -> Any:
    """A CLIP tokenizer from a folder with vocab.json + merges.txt or tokenizer.json (diffusers `tokenizer/`, or
    ComfyUI's bundled one). SD-2 pads with '!' - the padded positions reach the UNet, so it matters."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise BaseModelError(f"tokenizer files (vocab.json + merges.txt, or tokenizer.json) not found in {folder}")
    kwargs = {"pad_token": pad_token} if pad_token else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
        tokenizer("a photo")  # a broken merges.txt only fails when used
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise BaseModelError(f"the tokenizer in {folder} could not be read ({reason}); use the tokenizer/ folder "
                             "of an SD-2.x diffusers download") from None
    return tokenizer


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    from .weights_io import WeightsFileError, check_weights_path, torch_load_error

    try:
        check_weights_path(path, "base checkpoint")
    except WeightsFileError as error:
        raise BaseModelError(str(error)) from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise BaseModelError(f"could not read base checkpoint {path.name} in {path.parent.resolve()}: it is "
                                 f"corrupt or truncated ({reason}); download it again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BaseModelError(f"could not read base checkpoint {path.name} in {path.parent.resolve()}: "
                             f"{torch_load_error(path, error)}") from None
    if not isinstance(state, Mapping):
        raise BaseModelError(f"base checkpoint {path.name} in {path.parent.resolve()} does not hold a dict of weights")
    return dict(state.get("state_dict", state))


# The published epsilon-prediction SD-2.x bases each method was trained on.
BASE_FILES = {
    "sd21_base": "SD-2.1-base (v2-1_512-ema-pruned.safetensors)",
    "sd_turbo": "SD-Turbo (sd_turbo.safetensors)",
}
FAMILY_NAMES = {"sd1": "an SD-1.x", "sdxl": "an SDXL", "unknown": "not a Stable Diffusion 2.x"}
# ComfyUI's SD-2 rule (supported_models.SD20.model_type): v-prediction training leaves this LayerNorm bias
# far from its zero init; epsilon models (512-base, Turbo) stay close to it.
V_PRED_PROBE_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PRED_PROBE_STD = 0.09
V_PRED_PROBE_WIDTH = 320  # SD-2's last output block (the full-size layout the rule was made for)


def needed_base(kind: str | None = None) -> str:
    """The base a method needs, named by its published file (all methods when `kind` is None)."""
    if kind in BASE_FILES:
        return BASE_FILES[kind]
    return f"{BASE_FILES['sd21_base']} for OSEDiff, {BASE_FILES['sd_turbo']} for S3Diff/Hero-SR"


def require_sd2_family(family: str, name: str) -> None:
    """One line instead of a wall of size mismatches when the base is SD-1.x, SDXL or another family."""
    if family == "sd2":
        return
    raise BaseModelError(
        f"{name} is {FAMILY_NAMES.get(family, family)} checkpoint; the one-step SR methods need an SD-2.x base "
        "(SD-2.1-base for OSEDiff, SD-Turbo for S3Diff/Hero-SR)"
    )


def require_epsilon(prediction: str, name: str, kind: str | None = None) -> None:
    """Refuse v-prediction (SD-2.x 768-v) and other non-epsilon bases: they run but give wrong colours."""
    if prediction in ("epsilon", "unknown"):
        return
    what = "a v-prediction" if prediction == "v_prediction" else f"a {prediction}"
    raise BaseModelError(
        f"{name} is {what} model (like SD-2.1 768-v); the one-step SR methods need an epsilon-prediction "
        f"base: {needed_base(kind)}"
    )


def prediction_from_state(state: Mapping[str, torch.Tensor]) -> str:
    """'v_prediction' or 'epsilon' for a single-file SD-2.x checkpoint or bare LDM UNet dict.

    An explicit `v_pred` marker key decides; otherwise ComfyUI's heuristic on one LayerNorm bias
    (SD-2 512-base and 768-v share the architecture, so only the trained values tell them apart)."""
    if "v_pred" in state:
        return "v_prediction"
    for prefix in ("model.diffusion_model.", ""):
        bias = state.get(prefix + V_PRED_PROBE_KEY)
        # only on the real SD-2 layout (width 1024), where the 0.09 threshold was calibrated
        if bias is not None and bias.numel() == V_PRED_PROBE_WIDTH:
            std = float(bias.float().std(unbiased=False))
            return "v_prediction" if std > V_PRED_PROBE_STD else "epsilon"
    return "epsilon"


def diffusers_family(unet_config: Mapping[str, Any]) -> tuple[str, str]:
    """(family, prediction) of a diffusers UNet config (+ its scheduler's prediction_type, if given)."""
    if unet_config.get("addition_embed_type") == "text_time":
        family = "sdxl"
    elif unet_config.get("cross_attention_dim") == 768:
        family = "sd1"
    else:
        family = "sd2"
    return family, str(unet_config.get("prediction_type", "epsilon"))


def _require_sd2(state: Mapping[str, torch.Tensor], name: str, kind: str | None = None) -> None:
    from . import ldm_convert

    require_sd2_family(ldm_convert.detect_base(state), name)
    require_epsilon(prediction_from_state(state), name, kind)


def base_from_ldm_state(
    unet_state: Mapping[str, torch.Tensor],
    vae_state: Mapping[str, torch.Tensor],
    text_state: Mapping[str, torch.Tensor],
    text_format: str,
    tokenizer: Any | None,
    kind: str | Path = "sd21_base",
    source: str = "",
    text_prefix: str = "",
) -> BaseModels:
    """Build the base from LDM-layout UNet/VAE dicts and an OpenCLIP or HF-layout text dict."""
    from . import ldm_convert

    unet_config = load_config(kind, "unet")
    vae_config = load_config(kind, "vae")
    text_config = load_config(kind, "text_encoder")
    unet = build_unet(ldm_convert.convert_ldm_unet(unet_state, unet_config), kind)
    vae = build_vae(ldm_convert.convert_ldm_vae(vae_state, vae_config), kind)
    if text_format == "open_clip":
        text = ldm_convert.convert_open_clip_text(text_state, text_config)
    else:
        text = ldm_convert.convert_hf_clip_text(text_state, text_config, text_prefix)
    return BaseModels(unet=unet, vae=vae, text_encoder=build_text_encoder(text, kind), tokenizer=tokenizer,
                      source=source)


def load_single_file_base(path: str | Path, tokenizer_dir: str | Path | None = None,
                          kind: str | Path = "sd21_base", needs: str | None = None) -> BaseModels:
    """An SD-2.x single-file checkpoint (LDM layout). The file carries no tokenizer, so one must
    come from `tokenizer_dir` (or the host); without it the base can only run with precomputed
    prompt embeddings. `needs` (a method's base kind) names the right file in a refusal."""
    from . import ldm_convert

    path = Path(path)
    state = _read_state_file(path)
    _require_sd2(state, path.name, needs)
    parts = ldm_convert.split_single_file(state)
    if not parts.text:
        raise BaseModelError(f"{path.name} holds no text encoder (cond_stage_model.*); use a full SD-2.x checkpoint")
    tokenizer = load_tokenizer(tokenizer_dir, pad_token="!") if tokenizer_dir else None
    return base_from_ldm_state(parts.unet, parts.vae, parts.text, parts.text_format, tokenizer, kind,
                               source=str(path))


def _diffusers_prediction(folder: Path) -> str:
    config = folder / "scheduler" / "scheduler_config.json"
    try:
        return str(json.loads(config.read_text()).get("prediction_type", "epsilon"))
    except (OSError, ValueError):
        return "epsilon"  # no readable scheduler config: the UNet alone cannot tell


def check_diffusers_base(folder: str | Path, needs: str | None = None) -> None:
    """Family and prediction type from the folder's configs, before any weights are read."""
    folder = Path(folder)
    try:
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return  # from_pretrained reports a missing or broken config with its own message
    family, _ = diffusers_family(unet_config)
    require_sd2_family(family, f"diffusers folder {folder.name}")
    require_epsilon(_diffusers_prediction(folder), f"diffusers folder {folder.name}", needs)


def load_diffusers_base(folder: str | Path, needs: str | None = None) -> BaseModels:
    """A diffusers folder (unet/, vae/, text_encoder/, tokenizer/), read locally only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not (folder / part).is_dir():
            raise BaseModelError(f"diffusers base folder {folder.name} has no {part}/ subfolder (looked in {folder})")
    check_diffusers_base(folder, needs)
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    except Exception as error:
        raise BaseModelError(f"could not load the diffusers base in {folder}: {error}") from error
    if getattr(unet.config, "cross_attention_dim", None) != text_encoder.config.hidden_size:
        raise BaseModelError(f"{folder.name}: the UNet's cross-attention width does not match its text encoder")
    tokenizer = load_tokenizer(folder / "tokenizer")
    modules = (unet.eval().requires_grad_(False), vae.eval().requires_grad_(False),
               text_encoder.eval().requires_grad_(False))
    return BaseModels(*modules, tokenizer=tokenizer, source=str(folder))


def load_base(path: str | Path, tokenizer_dir: str | Path | None = None) -> BaseModels:
    """A diffusers folder or a single-file checkpoint, whichever `path` is."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_base(path)
    if path.exists():
        try:
            return load_single_file_base(path, tokenizer_dir)
        except BaseModelError as error:
            if path.name in str(error):
                raise
            raise BaseModelError(f"base checkpoint {path.name} in {path.parent.resolve()}: {error}") from None
    raise BaseModelError(f"base model not found: {path.name} (looked in {path.parent.resolve()})")
