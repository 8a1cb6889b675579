"""Training configuration: a YAML file checked against a schema before anything is built.

Every section is a dataclass; a key the schema does not know is an error that lists the known
ones (a typo must never silently train with a default), and numeric fields carry their allowed
range. `load_config` returns a `TrainConfig`; `config_differences` names the keys that differ
between two configs (used to refuse resuming a run with a different recipe).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("osediff", "s3diff", "hero_sr", "vpdsr_sd", "hf_diff", "vpdsr_sinsr")
DEGRADATION_PRESETS = ("osediff", "s3diff", "resshift")
PROMPT_SOURCES = ("empty", "caption", "clip_tags")
MIXED_PRECISION = ("no", "fp16", "bf16")
LOGGERS = ("csv", "tensorboard")

OSEDIFF_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
    "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
    "lowres, over-smooth"
)


class ConfigError(ValueError):
    """The training config is malformed: unknown key, wrong type or out-of-range value."""


def _range(low: float | None = None, high: float | None = None, *, choices: tuple | None = None) -> dict:
    return {"low": low, "high": high, "choices": choices}


def _f(default: Any, low: float | None = None, high: float | None = None, choices: tuple | None = None,
       doc: str = "") -> Any:
    meta = {**_range(low, high, choices=choices), "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    train: str = _f("", doc="folder of HR images, or a text file listing one image path per line")
    train_lr: str | None = _f(None, doc="paired LR folder (same file names); disables online degradation")
    validation: str | None = _f(None, doc="held-out folder of HR images (or LR with validation_lr)")
    validation_lr: str | None = _f(None, doc="paired LR folder for validation")
    crop: int = _f(512, 16, 4096, doc="random HR crop size (a multiple of 8 * scale)")
    scale: int = _f(4, 1, 8)
    flip: bool = _f(True)
    small_images: str = _f("pad", choices=("pad", "resize", "skip"),
                           doc="what to do with images smaller than the crop")
    workers: int = _f(4, 0, 64)
    pin_memory: bool = _f(True)
    cache_decoded: bool = _f(False, doc="keep decoded images in memory (small datasets)")
    prompts: str = _f("empty", choices=PROMPT_SOURCES,
                      doc="empty; caption (a .txt beside each image, e.g. written from `onestep-sr tags`); "
                          "clip_tags (the GT's tags from the pack's CLIP tagger, cached per image)")
    clip_tagger: str | None = _f(None, doc="clip_tags: a transformers CLIPModel folder (as `onestep-sr tags --clip`)")
    validation_count: int = _f(8, 0, 10000)


@dataclass
class DegradationConfig:
    preset: str = _f("osediff", choices=DEGRADATION_PRESETS, doc="METHODS.md section 7 parameter set")
    resize_back: str | None = _f(None, choices=("random", "bicubic", "none"),
                                 doc="LR back to GT size: random area/bilinear/bicubic (OSEDiff), bicubic (S3Diff); "
                                     "empty: the preset's")
    no_degradation_prob: float | None = _f(None, 0.0, 1.0, doc="probability that the input is the GT itself "
                                                                "(S3Diff 0.01); empty: the preset's")


@dataclass
class ModelConfig:
    base: str = _f("", doc="SD base: diffusers folder or single-file checkpoint")
    tokenizer: str | None = _f(None)
    lora_rank: int = _f(4, 1, 256, doc="OSEDiff generator LoRA rank (UNet and VAE encoder)")
    fake_lora_rank: int = _f(4, 1, 256, doc="OSEDiff VSD fake-score LoRA rank")
    rank_unet: int = _f(32, 1, 256, doc="S3Diff UNet rank")
    rank_vae: int = _f(16, 1, 256, doc="S3Diff VAE rank")
    de_net: str | None = _f(None, doc="S3Diff: de_net.pth")
    feature_networks: str = _f("models/onestep_sr/training",
                               doc="folder with vgg16 (+ lpips_vgg.pth) and dino feature weights")
    gradient_checkpointing: bool = _f(False)
    init_weights: str | None = _f(None, doc="start from a published checkpoint (fine-tuning)")


@dataclass
class LossConfig:
    mse: float = _f(1.0, 0.0, 1e4)
    lpips: float = _f(2.0, 0.0, 1e4)
    vsd: float = _f(1.0, 0.0, 1e4)
    gan: float = _f(0.0, 0.0, 1e4)
    vsd_guidance: float = _f(7.5, 0.0, 100.0)
    vsd_t_min: int = _f(20, 0, 999)
    vsd_t_max: int = _f(980, 1, 1000)
    negative_prompt: str = _f(OSEDIFF_NEGATIVE_PROMPT)
    negative_sample_prob: float = _f(0.0, 0.0, 1.0, doc="S3Diff: negative prompt + degraded input as target")
    positive_prompt: str = _f("", doc="S3Diff: the prompt of every other sample (empty: data.prompts' per-image prompt)")


@dataclass
class ResShiftTrainConfig:
    """The ResShift-family students (hf_diff, vpdsr_sinsr): files, SinSR distillation and the extra objectives.
    docs/training.md ("HF-Diff recipe", "VPD-SR on SinSR") gives each value's source or reason."""

    teacher: str = _f("", doc="ResShift teacher weights (resshift_realsrx4_s15_v1.pth)")
    autoencoder: str | None = _f(None, doc="autoencoder_vq_f4.pth (default: beside the teacher)")
    model_config: str | None = _f(None, doc="official-format YAML for other model sizes (default: SinSR's)")
    learn_xT: bool = _f(True, doc="SinSR inverse regularisation (mse_xT)")
    finetune_use_gt: float = _f(1.0, 0.0, 1e4, doc="SinSR consistency-preserving weight (mse_gt, and HF-Diff's hf)")
    distill: float = _f(1.0, 0.0, 1e4, doc="vanilla distillation weight (mse)")
    ema_rate: float = _f(0.0, 0.0, 0.99999, doc="EMA of the student, published and validated when > 0 (release: 0.999)")
    hf_inn: str | None = _f(None, doc="HF-Diff: INN checkpoint from `onestep-sr train-inn`")
    hf: float = _f(0.2, 0.0, 1e4, doc="HF-Diff: HF perceptual weight (the release's 0.2)")
    dino: str | None = _f(None, doc="HF-Diff: transformers Dinov2Model folder")
    js: float = _f(1.0, 0.0, 1e4, doc="HF-Diff: DINOv2 JS distribution-matching weight")
    js_temperature: float = _f(1.0, 1e-6, 1e4)
    js_tokens: str = _f("cls", choices=("cls", "mean"))
    feature_size: int = _f(224, 14, 1024, doc="DINOv2 input size (a multiple of 14)")
    vpd_target: str = _f("gt", choices=("gt", "teacher"),
                         doc="vpdsr_sinsr: what ESS and HFP compare the SR with (weights in the vpdsr section)")


@dataclass
class OptimConfig:
    lr: float = _f(5e-5, 0.0, 1.0)
    lr_fake: float | None = _f(None, 0.0, 1.0, doc="fake-score / discriminator lr (default: lr)")
    betas: list = _f([0.9, 0.999])
    weight_decay: float = _f(1e-2, 0.0, 1.0)
    eps: float = _f(1e-8, 0.0, 1.0)
    grad_clip: float = _f(1.0, 0.0, 1e6)
    scheduler: str = _f("constant", choices=("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = _f(0, 0, 10**7)
    use_8bit_adam: bool = _f(False, doc="bitsandbytes AdamW8bit (needs a CUDA device)")


@dataclass
class TrainLoopConfig:
    batch_size: int = _f(4, 1, 4096, doc="per device")
    gradient_accumulation: int = _f(1, 1, 4096)
    max_steps: int = _f(100000, 1, 10**9)
    mixed_precision: str = _f("fp16", choices=MIXED_PRECISION)
    checkpoint_every: int = _f(500, 1, 10**9)
    keep_checkpoints: int = _f(3, 1, 1000)
    validate_every: int = _f(500, 1, 10**9)
    log_every: int = _f(10, 1, 10**9)
    logger: str = _f("csv", choices=LOGGERS)
    device: str = _f("auto", choices=("auto", "cpu", "cuda", "mps"))


@dataclass
class HeroSRConfig:
    """Hero-SR (method hero_sr): DTSM + OWMS; every open choice is explained in docs/training.md."""

    clip: str = _f("models/clip/clip-vit-large-patch14", doc="transformers CLIPModel folder (OWMS)")
    prompt: str = _f(" ", doc="the UNet's text condition; the release's inference prompt")
    text_weight: float = _f(0.5, 0.0, 1e4, doc="text-domain perceptual alignment loss")
    image_weight: float = _f(1.0, 0.0, 1e4, doc="image-domain semantic alignment loss")
    text_mode: str = _f("antonym", choices=("antonym", "cosine"))
    quality_pairs: list = _f([], doc="[[positive, negative], ...]; empty: CLIP-IQA's five antonym pairs")
    content_weight: float = _f(1.0, 0.0, 1e4, doc="1 - cos(SR, caption) when data.prompts is caption")
    clip_temperature: float = _f(0.0, 0.0, 100.0, doc="antonym softmax temperature; 0: CLIP's logit scale")
    gumbel_tau: float = _f(1.0, 1e-3, 100.0)
    alpha_gradient: bool = _f(True, doc="x0 formula's alpha-bar straight-through to the DTSM logits")
    train_dtsm: bool = _f(True)


@dataclass
class VPDSRConfig:
    """VPD-SR on the OSEDiff one-step student (method vpdsr_sd) and on the SinSR student (vpdsr_sinsr)
    (adversarial weight: loss.gan, DINO discriminator from model.feature_networks); see docs/training.md
    ("VPD-SR on the SD student", "VPD-SR on SinSR")."""

    clip: str = _f("models/clip/clip-vit-large-patch14", doc="transformers CLIPModel folder (ESS)")
    semantic: float = _f(1.0, 0.0, 1e4, doc="explicit semantic-aware supervision weight")
    semantic_layers: list = _f([-1], doc="CLIP vision layers compared token by token (1..L or -1..-L)")
    semantic_layer_weights: list = _f([], doc="one weight per layer; empty: 1 each")
    semantic_embed: float = _f(1.0, 0.0, 1e4, doc="weight of the CLIP embedding term inside ESS")
    semantic_distance: str = _f("cosine", choices=("cosine", "mse"))
    hfp: float = _f(1.0, 0.0, 1e4, doc="high-frequency perception weight")
    hfp_levels: int = _f(2, 1, 8)
    hfp_norm: str = _f("l1", choices=("l1", "mse"))


@dataclass
class TrainConfig:
    method: str = _f("osediff", choices=METHODS)
    output_dir: str = _f("runs/onestep")
    seed: int = _f(0, 0, 2**31 - 1)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    resshift: ResShiftTrainConfig = field(default_factory=ResShiftTrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    herosr: HeroSRConfig = field(default_factory=HeroSRConfig)
    vpdsr: VPDSRConfig = field(default_factory=VPDSRConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_SECTION_NAMES = {str(t): name for name, t in _SECTIONS.items()}


_OPTIONAL_NUMBERS = ("lr_fake", "no_degradation_prob")  # numbers whose default None means "derived"


def _check_value(where: str, spec: dataclasses.Field, value: Any) -> Any:
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    meta = spec.metadata
    if value is None:
        if default is None or spec.name in _OPTIONAL_NUMBERS:
            return None
        raise ConfigError(f"{where} must not be empty")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float) or spec.name in _OPTIONAL_NUMBERS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
    elif isinstance(default, str) or default is None:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and value < low or high is not None and value > high:
        raise ConfigError(f"{where} = {value} is out of range [{low}, {high}]")
    return value


def _build_section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
            f"known keys{' in ' + where if where else ''}: {', '.join(fields)}"
        )
    values = {}
    for name, value in data.items():
        spec = fields[name]
        path = f"{where}.{name}".lstrip(".")
        section_type = _SECTIONS.get(name) if cls is TrainConfig else None
        if section_type is not None and dataclasses.is_dataclass(_resolve(section_type)):
            values[name] = _build_section(_resolve(section_type), value, name)
        else:
            values[name] = _check_value(path, spec, value)
    return cls(**values)


def _resolve(type_name: Any) -> Any:
    """The section class of a TrainConfig field (annotations are strings under `from __future__`)."""
    if isinstance(type_name, str):
        return typing.get_type_hints(TrainConfig).get(_SECTION_NAMES.get(type_name, ""), type_name)
    return type_name


def _cross_checks(config: TrainConfig) -> None:
    if len(config.optim.betas) != 2 or not all(0 <= float(b) < 1 for b in config.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {config.optim.betas}")
    if config.loss.vsd_t_min >= config.loss.vsd_t_max:
        raise ConfigError("loss.vsd_t_min must be below loss.vsd_t_max")
    if config.data.crop % (8 * config.data.scale):
        raise ConfigError(f"data.crop = {config.data.crop} must be a multiple of 8 x scale = {8 * config.data.scale}")
    if config.method == "osediff" and config.loss.gan:
        raise ConfigError("loss.gan is S3Diff's loss; OSEDiff trains with mse, lpips and vsd")
    if config.resshift.feature_size % 14:
        raise ConfigError(f"resshift.feature_size = {config.resshift.feature_size} must be a multiple of 14 (DINOv2 patch)")
    if config.method == "s3diff" and config.loss.vsd:
        raise ConfigError("loss.vsd is OSEDiff's loss; set it to 0 for S3Diff")
    if config.data.prompts == "clip_tags" and not config.data.clip_tagger:
        raise ConfigError("data.prompts: clip_tags needs data.clip_tagger (a transformers CLIPModel folder)")
    if config.method == "s3diff" and not config.model.de_net:
        raise ConfigError("S3Diff training needs model.de_net (the degradation estimator de_net.pth)")
    if config.method == "hero_sr":
        _check_hero(config)
    if config.method in ("vpdsr_sd", "vpdsr_sinsr"):
        _check_vpd(config)
    if config.method == "hf_diff" and config.loss.gan:
        raise ConfigError("loss.gan is VPD-SR's adversarial weight; HF-Diff has no adversarial term (set it to 0)")


def _check_hero(config: TrainConfig) -> None:
    if config.loss.vsd or config.loss.gan:
        raise ConfigError("loss.vsd and loss.gan are not Hero-SR losses; set them to 0 (Hero-SR: mse, lpips, "
                          "herosr.text_weight, herosr.image_weight)")
    pairs = config.herosr.quality_pairs
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) and t for t in p) for p in pairs):
        raise ConfigError(f"herosr.quality_pairs must be a list of [positive, negative] text pairs, got {pairs!r}")


def _check_vpd(config: TrainConfig) -> None:
    v = config.vpdsr
    if not v.semantic_layers or not all(isinstance(i, int) and not isinstance(i, bool) and i for i in v.semantic_layers):
        raise ConfigError(f"vpdsr.semantic_layers must be non-zero layer numbers, got {v.semantic_layers!r}")
    weights = v.semantic_layer_weights
    if weights and (len(weights) != len(v.semantic_layers)
                    or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise ConfigError(f"vpdsr.semantic_layer_weights needs one number per layer of vpdsr.semantic_layers, "
                          f"got {weights!r}")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    config = _build_section(TrainConfig, data, "")
    _cross_checks(config)
    return config


def load_config(path: str | Path) -> TrainConfig:
    """Read and check a YAML training config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path.name} not found in {path.parent.resolve()}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    try:
        return config_from_dict(data or {})
    except ConfigError as error:
        raise ConfigError(f"{path.name}: {error}") from None


# Keys that may change between a run and its resumption without changing the recipe.
RESUMABLE_CHANGES = {"train.max_steps", "train.checkpoint_every", "train.validate_every", "train.log_every",
                     "train.logger", "train.keep_checkpoints", "data.workers", "data.pin_memory",
                     "data.validation", "data.validation_lr", "data.validation_count", "output_dir",
                     "model.feature_networks", "train.device", "model.base", "model.tokenizer", "model.de_net",
                     "data.train", "data.train_lr", "herosr.clip", "vpdsr.clip", "resshift.teacher",
                     "resshift.autoencoder", "resshift.hf_inn", "resshift.dino"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Recipe keys whose values differ (paths and bookkeeping intervals may change on resume). A key the
    saved config lacks (a section added by a later version) counts as its default."""
    a, b = {**_flatten(TrainConfig().to_dict()), **_flatten(saved)}, _flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
