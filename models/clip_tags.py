"""Zero-shot CLIP tagging: OSEDiff-style tag prompts without the RAM/DAPE tagger.

OSEDiff was trained (and is evaluated) with prompts produced by a RAM tagger fine-tuned as DAPE:
a comma-separated tag list followed by the user prompt (`format_prompt`). That tagger cannot ship
with the pack, so tags are chosen by zero-shot CLIP scoring of the image against the vocabulary in
`tag_vocabulary.txt` (written for this pack; `load_vocabulary`).

Scoring (`TagScorer`)
    Each tag's text embedding is an ensemble over `DEFAULT_TEMPLATES` ("a photo of {tag}." and the
    bare tag): every template's embedding is L2-normalised, the mean is normalised again (CLIP
    paper, sec. 3.1.4). The image embedding is normalised and compared by cosine similarity. Raw
    cosines are not comparable across models or images (the image-text "modality gap" shifts all
    of an image's cosines together, ViT-H values sit around 0.1-0.35), and a softmax over a
    2,600-tag vocabulary splits probability mass among every applicable tag and synonym, so neither
    gives a threshold that means the same thing everywhere. The score used for thresholds and
    ranking is therefore the cosine's z-score over the vocabulary for that image:
    `(cos - mean(cos)) / std(cos)`, i.e. how many standard deviations a tag stands above the
    image's typical tag. It is invariant to the logit scale and to per-image offsets; 3.0 means
    "clearly stands out" (about 0.1% of an unrelated, Gaussian-like vocabulary would pass by chance).
    Ranking is by score rounded to 1e-5, ties broken by vocabulary order, so results are
    deterministic and insensitive to last-bit differences between devices.

Text embeddings of the vocabulary are computed once per text encoder (in batches) and cached in a
module-level dict keyed by an identity of the encoder (an object whose lifetime bounds the weights,
plus an optional version tag such as a LoRA patch id) and a hash of vocabulary + templates.
Entries are evicted when that object is garbage-collected.

Encoders
    `transformers_clip_encoders(folder)`: a transformers `CLIPModel` folder (both towers).
    `sd2_openclip_encoders(text_state, vision, tokenizer)`: SD-2.x's own text encoder + the
    OpenCLIP ViT-H/14 image tower. SD-2.x conditions on OpenCLIP ViT-H/14 trained on LAION-2B
    (`laion2b_s32b_b79k`), frozen during SD training, so an original SD-2.x checkpoint carries
    that model's full text tower: all 24 resblocks, `ln_final`, `text_projection` (1024 x 1024)
    and `logit_scale`. `CLIP-ViT-H-14-laion2B-s32B-b79K` (ComfyUI models/clip_vision, the IP-Adapter
    image encoder) is the image tower of the very same OpenCLIP model, with `visual_projection`
    1280 -> 1024. Both projections end in the same 1024-d joint space, so they pair exactly as the
    OpenCLIP model itself does. The text embedding must be OpenCLIP's `encode_text`: the EOT
    token's state after ALL 24 layers and `ln_final`, times `text_projection`. SD's conditioning
    (penultimate layer, 23 layers; diffusers' `text_encoder/` keeps only those 23 and drops the
    projection) is a different, unprojected space and cannot be used. `ClipTextTower` computes
    `encode_text` from either state layout (OpenCLIP keys of a single-file checkpoint, or the
    transformers layout ComfyUI and HF CLIP models use).

Images are passed as (B, C, H, W) floats in 0..1. `clip_preprocess` is CLIPImageProcessor in torch
(shortest side to 224 bicubic with antialiasing, center crop, CLIP mean/std), so it runs on GPU
tensors. Everything here is pure torch (+ transformers for loading); ComfyUI is not imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

VOCABULARY_PATH = Path(__file__).with_name("tag_vocabulary.txt")
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "{}")
DEFAULT_TOP_K = 8
DEFAULT_THRESHOLD = 3.0
TEXT_BATCH = 256
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77
_RANK_DECIMALS = 5

ImageEncoder = Callable[[Tensor], Tensor]
TextEncoder = Callable[[Sequence[str]], Tensor]


class ClipTagsError(ValueError):
    """A vocabulary, model folder or encoder pair that cannot be used for tagging."""


# --------------------------------------------------------------------------------------------
# Vocabulary and prompt format
# --------------------------------------------------------------------------------------------


def load_vocabulary(path: str | Path = VOCABULARY_PATH) -> list[str]:
    """Tags in file order; '#' lines are comments. Duplicates are an error, not silently merged,
    because they would double a concept's weight in rankings."""
    path = Path(path)
    tags: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        tag = raw.strip()
        if not tag or tag.startswith("#"):
            continue
        if tag in seen:
            raise ClipTagsError(f"{path.name}: tag {tag!r} on line {number} duplicates line {seen[tag]}")
        seen[tag] = number
        tags.append(tag)
    if not tags:
        raise ClipTagsError(f"{path.name} holds no tags")
    return tags


def format_prompt(tags: Sequence[str], user_text: str = "", drop_empty: bool = False) -> str:
    """The prompt exactly as OSEDiff builds it: `f"{', '.join(tags)}, {user_text},"`.

    OSEDiff's tagger joins its tags with ", " and test_osediff.py then writes
    f"{captions[0]}, {args.prompt},". Both parts are used verbatim, so an empty user text gives
    "a, b, ," and no tags give ", {user_text},". `drop_empty` leaves out empty parts instead
    ("a, b,"), as the ComfyUI node does: no dangling commas in a prompt users read and edit.
    """
    if drop_empty:
        parts = [*tags, user_text.strip()] if user_text.strip() else list(tags)
        return f"{', '.join(parts)}," if parts else ""
    return f"{', '.join(tags)}, {user_text},"


def vocabulary_digest(tags: Sequence[str], templates: Sequence[str]) -> str:
    """Identifies vocabulary + templates in cache keys (order matters: it fixes tag indices)."""
    payload = json.dumps([list(tags), list(templates)], ensure_ascii=True)
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------
# Text-embedding cache shared by all TagScorer instances
# --------------------------------------------------------------------------------------------

_TEXT_CACHE: dict[tuple[int, Hashable, str], Tensor] = {}
_WATCHED: set[int] = set()
_PINNED: dict[int, object] = {}


def _evict(owner_id: int) -> None:
    for key in [k for k in _TEXT_CACHE if k[0] == owner_id]:
        del _TEXT_CACHE[key]
    _WATCHED.discard(owner_id)


def _watch(owner: object) -> None:
    """Drop an owner's entries when it dies, so a recycled id() can never hit stale embeddings."""
    owner_id = id(owner)
    if owner_id in _WATCHED:
        return
    try:
        weakref.finalize(owner, _evict, owner_id)
    except TypeError:  # not weak-referenceable: keep it alive instead, so its id stays unique
        _PINNED[owner_id] = owner
    _WATCHED.add(owner_id)


def clear_text_cache() -> None:
    """Forget every cached vocabulary embedding (tests, or to free memory)."""
    _TEXT_CACHE.clear()


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


class ScoredTag(NamedTuple):
    tag: str
    score: float  # z-score over the vocabulary (see module docstring)
    cosine: float


@dataclass
class TagScores:
    cosine: Tensor  # (B, N) cosine similarity image vs tag
    score: Tensor  # (B, N) z-score of the cosine over the vocabulary, per image


def _normalise(x: Tensor, what: str) -> Tensor:
    x = x.float()
    norms = x.norm(dim=-1, keepdim=True)
    if not torch.isfinite(x).all() or bool((norms < 1e-12).any()):
        raise ClipTagsError(
            f"the {what} encoder returned zero or non-finite embeddings (a missing or placeholder "
            "projection, or broken weights)"
        )
    return x / norms


def zscores(cosine: Tensor) -> Tensor:
    """Standard deviations above each row's mean (population std, floored against flat rows)."""
    mean = cosine.mean(dim=-1, keepdim=True)
    std = cosine.std(dim=-1, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (cosine - mean) / std


def rank_tags(tags: Sequence[str], score: Tensor, cosine: Tensor, top_k: int, threshold: float) -> list[ScoredTag]:
    """Top-k tags with score >= threshold; best first, ties in vocabulary order."""
    values = score.detach().double().cpu().tolist()
    cosines = cosine.detach().double().cpu().tolist()
    keys = [round(v, _RANK_DECIMALS) for v in values]
    order = sorted((i for i, key in enumerate(keys) if key >= threshold), key=lambda i: (-keys[i], i))
    return [ScoredTag(tags[i], values[i], cosines[i]) for i in order[: max(int(top_k), 0)]]


class TagScorer:
    """Scores images against a tag vocabulary with a CLIP image/text encoder pair.

    `encode_images((B, 3, H, W) in 0..1) -> (B, D)` and `encode_texts(list[str]) -> (N, D)` must
    return embeddings of the same joint space (projected embeddings); `encode_images` may be None
    when image embeddings come from elsewhere (`score_embeddings`). The vocabulary's text
    embeddings are computed on first use and cached per text encoder (`cache_owner`, default the
    bound object of `encode_texts` or the callable itself; `cache_tag` distinguishes versions of
    the same owner, e.g. LoRA patches).
    """

    def __init__(
        self,
        encode_images: ImageEncoder | None,
        encode_texts: TextEncoder,
        vocabulary: Sequence[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        *,
        cache_owner: object | None = None,
        cache_tag: Hashable = None,
        text_batch: int = TEXT_BATCH,
        on_text_batch: Callable[[int, int], None] | None = None,
    ):
        self.encode_images = encode_images
        self.encode_texts = encode_texts
        self.vocabulary = list(load_vocabulary() if vocabulary is None else vocabulary)
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ClipTagsError("the vocabulary has duplicate tags")
        if not self.vocabulary:
            raise ClipTagsError("the vocabulary is empty")
        self.templates = tuple(templates)
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ClipTagsError("each template needs one '{}' where the tag goes")
        self.text_batch = max(int(text_batch), 1)
        self.on_text_batch = on_text_batch
        owner = cache_owner if cache_owner is not None else getattr(encode_texts, "__self__", encode_texts)
        self._owner = owner
        self._key = (id(owner), cache_tag, vocabulary_digest(self.vocabulary, self.templates))

    @property
    def vocabulary_key(self) -> str:
        """Identifies the vocabulary and templates (part of any on-disk cache key)."""
        return self._key[2]

    def has_text_embeddings(self) -> bool:
        return self._key in _TEXT_CACHE

    def set_text_embeddings(self, embeddings: Tensor) -> None:
        """Seed the cache (e.g. from disk); must be what text_embeddings() would compute."""
        if embeddings.ndim != 2 or embeddings.shape[0] != len(self.vocabulary):
            raise ClipTagsError(f"cached tag embeddings have shape {tuple(embeddings.shape)}, expected "
                                f"({len(self.vocabulary)}, D)")
        _watch(self._owner)
        _TEXT_CACHE[self._key] = embeddings.float().cpu()

    def text_embeddings(self) -> Tensor:
        """(N, D) normalised template-ensembled tag embeddings, float32 on the CPU (cached)."""
        cached = _TEXT_CACHE.get(self._key)
        if cached is not None:
            return cached
        texts = [template.format(tag) for template in self.templates for tag in self.vocabulary]
        chunks = []
        total = math.ceil(len(texts) / self.text_batch)
        with torch.inference_mode():
            for index, start in enumerate(range(0, len(texts), self.text_batch)):
                batch = texts[start:start + self.text_batch]
                embeds = self.encode_texts(batch)
                if embeds.ndim != 2 or embeds.shape[0] != len(batch):
                    raise ClipTagsError(f"the text encoder returned shape {tuple(embeds.shape)} for {len(batch)} texts")
                chunks.append(_normalise(embeds, "text").cpu())
                if self.on_text_batch is not None:
                    self.on_text_batch(index + 1, total)
            per_template = torch.cat(chunks).view(len(self.templates), len(self.vocabulary), -1)
            ensembled = _normalise(per_template.mean(dim=0), "text")
        ensembled = ensembled.clone()  # a normal tensor, usable outside inference mode too
        _watch(self._owner)
        _TEXT_CACHE[self._key] = ensembled
        return ensembled

    def scores(self, images: Tensor) -> TagScores:
        """Cosine and z-score of every (image, tag) pair; images (B, 3, H, W) in 0..1."""
        if self.encode_images is None:
            raise ClipTagsError("this scorer has no image encoder; use score_embeddings")
        with torch.inference_mode():
            embeds = self.encode_images(images)
        if embeds.ndim != 2 or embeds.shape[0] != images.shape[0]:
            raise ClipTagsError(f"the image encoder returned shape {tuple(embeds.shape)} for {images.shape[0]} images")
        return self.score_embeddings(embeds)

    def score_embeddings(self, image_embeds: Tensor) -> TagScores:
        """Like `scores`, from (B, D) projected image embeddings computed elsewhere."""
        text = self.text_embeddings()
        with torch.inference_mode():
            image = _normalise(image_embeds, "image")
            if image.shape[-1] != text.shape[1]:
                raise ClipTagsError(
                    f"image embeddings have {image.shape[-1]} dims but text embeddings {text.shape[1]}: "
                    "the image and text encoders are not one CLIP model"
                )
            cosine = (image @ text.to(image.device).T).cpu()
        return TagScores(cosine=cosine.clone(), score=zscores(cosine).clone())

    def rank_each(self, scores: TagScores, top_k: int = DEFAULT_TOP_K,
                  threshold: float = DEFAULT_THRESHOLD) -> list[list[ScoredTag]]:
        """Per image: the top-k tags scoring >= threshold, best first."""
        return [rank_tags(self.vocabulary, scores.score[i], scores.cosine[i], top_k, threshold)
                for i in range(scores.score.shape[0])]

    def rank_batch(self, scores: TagScores, top_k: int = DEFAULT_TOP_K,
                   threshold: float = DEFAULT_THRESHOLD) -> list[ScoredTag]:
        """One tag list for a whole batch: tags ranked by their mean score over the images (a
        batch of one gives exactly that image's tags)."""
        return rank_tags(self.vocabulary, scores.score.mean(dim=0), scores.cosine.mean(dim=0), top_k, threshold)

    def top_tags(self, images: Tensor, top_k: int = DEFAULT_TOP_K,
                 threshold: float = DEFAULT_THRESHOLD) -> list[list[ScoredTag]]:
        """Per image: the top-k tags scoring >= threshold, best first."""
        return self.rank_each(self.scores(images), top_k, threshold)

    def batch_tags(self, images: Tensor, top_k: int = DEFAULT_TOP_K,
                   threshold: float = DEFAULT_THRESHOLD) -> list[ScoredTag]:
        """One tag list for the whole batch (see `rank_batch`)."""
        return self.rank_batch(self.scores(images), top_k, threshold)


# --------------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------------


def to_rgb(images: Tensor) -> Tensor:
    """(B, C, H, W) with C in 1..4 -> RGB: gray is repeated, alpha dropped."""
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 4:
        return images[:, :3]
    if channels in (1, 2):
        return images[:, :1].expand(-1, 3, -1, -1)
    raise ClipTagsError(f"images need 1-4 channels, got {channels}")


def clip_preprocess(images: Tensor, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> Tensor:
    """CLIPImageProcessor in torch: shortest side -> `size` (bicubic, antialiased, as PIL resizing
    is), center crop `size` x `size`, normalise. Input (B, C, H, W) in 0..1, any device."""
    x = to_rgb(images).float().clamp(0, 1)
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        x = F.interpolate(x, size=new_size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# --------------------------------------------------------------------------------------------
# Text tower: OpenCLIP encode_text from a state dict (pure torch)
# --------------------------------------------------------------------------------------------

_OPEN_CLIP_MARK = "transformer.resblocks.0.attn.in_proj_weight"
_HF_MARK = "text_model.embeddings.token_embedding.weight"


def text_tower_prefixes(state: Mapping[str, Tensor]) -> list[str]:
    """Prefixes under which `state` holds a CLIP text tower WITH its projection, in either layout
    (ComfyUI SD-2: 'clip_h.transformer.'; SD-2 file: 'cond_stage_model.model.'; CLIPModel: '')."""
    found = set()
    for key in state:
        if key.endswith(_HF_MARK):
            prefix = key[: -len(_HF_MARK)]
            if prefix + "text_projection.weight" in state:
                found.add(prefix)
        elif key.endswith(_OPEN_CLIP_MARK):
            prefix = key[: -len(_OPEN_CLIP_MARK)]
            if prefix + "text_projection" in state and prefix + "token_embedding.weight" in state:
                found.add(prefix)
    return sorted(found)


@dataclass
class _Layer:
    ln1: tuple[Tensor, Tensor]
    q: tuple[Tensor, Tensor]
    k: tuple[Tensor, Tensor]
    v: tuple[Tensor, Tensor]
    out: tuple[Tensor, Tensor]
    ln2: tuple[Tensor, Tensor]
    fc1: tuple[Tensor, Tensor]
    fc2: tuple[Tensor, Tensor]


def _layer_count(keys: Sequence[str], head: str) -> int:
    count = 0
    while any(k.startswith(f"{head}{count}.") for k in keys):
        count += 1
    return count


def _text_weights(state: Mapping[str, Tensor], prefix: str) -> dict[str, Any]:
    """Canonical weights (views, no copies) of the text tower under `prefix`."""
    s = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    pair = lambda name: (s[f"{name}.weight"], s[f"{name}.bias"])  # noqa: E731
    if _OPEN_CLIP_MARK in s:
        if "text_projection" not in s:
            raise ClipTagsError("the OpenCLIP text tower has no text_projection")
        layers = []
        for i in range(_layer_count(list(s), "transformer.resblocks.")):
            head = f"transformer.resblocks.{i}."
            q_w, k_w, v_w = s[head + "attn.in_proj_weight"].chunk(3, dim=0)
            q_b, k_b, v_b = s[head + "attn.in_proj_bias"].chunk(3, dim=0)
            layers.append(_Layer(pair(head + "ln_1"), (q_w, q_b), (k_w, k_b), (v_w, v_b),
                                 pair(head + "attn.out_proj"), pair(head + "ln_2"),
                                 pair(head + "mlp.c_fc"), pair(head + "mlp.c_proj")))
        return {"token": s["token_embedding.weight"], "position": s["positional_embedding"], "layers": layers,
                "final": pair("ln_final"), "projection": s["text_projection"].T}
    if "text_projection.weight" not in s:
        raise ClipTagsError("the text encoder has no text_projection")
    projection = s["text_projection.weight"]
    s = {k.removeprefix("text_model."): v for k, v in s.items()}
    layers = []
    for i in range(_layer_count(list(s), "encoder.layers.")):
        head = f"encoder.layers.{i}."
        layers.append(_Layer(pair(head + "layer_norm1"), pair(head + "self_attn.q_proj"),
                             pair(head + "self_attn.k_proj"), pair(head + "self_attn.v_proj"),
                             pair(head + "self_attn.out_proj"), pair(head + "layer_norm2"),
                             pair(head + "mlp.fc1"), pair(head + "mlp.fc2")))
    return {"token": s["embeddings.token_embedding.weight"], "position": s["embeddings.position_embedding.weight"],
            "layers": layers, "final": pair("final_layer_norm"), "projection": projection}


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),
    "gelu_pytorch_tanh": lambda a: F.gelu(a, approximate="tanh"),
}


def load_tokenizer(tokenizer: Any) -> Any:
    """A CLIPTokenizer, or one loaded from a folder with vocab.json + merges.txt or tokenizer.json."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import CLIPTokenizer

    folder = Path(tokenizer)
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise ClipTagsError(f"CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json) not found in {folder}")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


class ClipTextTower:
    """OpenCLIP `encode_text` (= HF `get_text_features`) evaluated from a weight dict.

    The EOT token's state after every layer and the final layer norm, times the projection. The
    weights are referenced, not copied, and cast per layer to the compute dtype (float32 on the
    CPU, the weights' float dtype elsewhere), so fp16/fp8 host weights need no second copy. Texts
    run in length-sorted batches cut to their longest sequence: attention is causal, so tokens
    after EOT never influence it, and short tag prompts cost ~1/7 of a 77-token pass.
    """

    def __init__(self, state: Mapping[str, Tensor], tokenizer: Any, prefix: str | None = None,
                 num_heads: int | None = None, activation: str = "gelu", eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if prefix is None:
            prefixes = text_tower_prefixes(state)
            if len(prefixes) != 1:
                raise ClipTagsError(
                    "no CLIP text tower with a text projection found in the weights" if not prefixes
                    else f"several CLIP text towers found ({', '.join(repr(p) for p in prefixes)}); pass prefix="
                )
            prefix = prefixes[0]
        try:
            self.weights = _text_weights(state, prefix)
        except KeyError as error:
            raise ClipTagsError(f"incomplete CLIP text tower under {prefix!r}: missing {error}") from error
        if not self.weights["layers"]:
            raise ClipTagsError(f"no transformer layers under {prefix!r}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.hidden = int(self.weights["token"].shape[1])
        self.num_heads = int(num_heads or max(self.hidden // 64, 1))
        if self.hidden % self.num_heads:
            raise ClipTagsError(f"hidden size {self.hidden} is not divisible by {self.num_heads} heads")
        if activation not in _ACTIVATIONS:
            raise ClipTagsError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
        self.activation = _ACTIVATIONS[activation]
        self.eps = eps
        self.device = torch.device(device) if device is not None else self.weights["token"].device
        weight_dtype = self.weights["token"].dtype
        if dtype is None:
            if self.device.type == "cpu" or weight_dtype not in (torch.float16, torch.bfloat16, torch.float32):
                dtype = torch.float32 if self.device.type == "cpu" else torch.float16
            else:
                dtype = weight_dtype
        self.dtype = dtype
        self.context = int(self.weights["position"].shape[0])
        self._check_projection()

    @property
    def embed_dim(self) -> int:
        return int(self.weights["projection"].shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.weights["layers"])

    def _check_projection(self) -> None:
        projection = self.weights["projection"]
        if projection.shape[1] != self.hidden:
            raise ClipTagsError(f"text projection {tuple(projection.shape)} does not fit hidden size {self.hidden}")
        if projection.shape[0] == projection.shape[1] and torch.equal(
                projection.float().cpu(), torch.eye(projection.shape[0])):
            raise ClipTagsError(
                "the text projection is an identity placeholder (a checkpoint rebuilt from a diffusers text encoder, "
                "which lacks OpenCLIP's last layer and projection); use an original SD-2.x checkpoint or a CLIP model"
            )

    def _w(self, tensor: Tensor) -> Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    def _forward(self, ids: Tensor, eot: Tensor) -> Tensor:
        w = self.weights
        batch, length = ids.shape
        x = F.embedding(ids, self._w(w["token"])) + self._w(w["position"][:length])
        heads, head_dim = self.num_heads, self.hidden // self.num_heads

        def split(t: Tensor) -> Tensor:
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        for layer in w["layers"]:
            h = F.layer_norm(x, (self.hidden,), *map(self._w, layer.ln1), eps=self.eps)
            q, k, v = (split(F.linear(h, *map(self._w, p))) for p in (layer.q, layer.k, layer.v))
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + F.linear(attended.transpose(1, 2).reshape(batch, length, self.hidden), *map(self._w, layer.out))
            h = F.layer_norm(x, (self.hidden,), *map(self._w, layer.ln2), eps=self.eps)
            x = x + F.linear(self.activation(F.linear(h, *map(self._w, layer.fc1))), *map(self._w, layer.fc2))
        x = F.layer_norm(x, (self.hidden,), *map(self._w, w["final"]), eps=self.eps)
        pooled = x[torch.arange(batch, device=x.device), eot]
        return F.linear(pooled, self._w(w["projection"])).float()

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Start token, BPE, end token; truncated to the context (the end token is kept)."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.context)["input_ids"]
        return [list(ids) for ids in encoded]

    def __call__(self, texts: Sequence[str], batch_size: int = TEXT_BATCH) -> Tensor:
        """(N, D) projected text embeddings (not normalised), float32 on the tower's device."""
        all_ids = self.token_ids(texts)
        order = sorted(range(len(all_ids)), key=lambda i: (len(all_ids[i]), i))
        out = torch.empty(len(all_ids), self.embed_dim, device=self.device)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                length = max(len(all_ids[i]) for i in chunk)
                ids = torch.zeros(len(chunk), length, dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(all_ids[i])] = torch.tensor(all_ids[i])
                eot = torch.tensor([len(all_ids[i]) - 1 for i in chunk], device=self.device)
                out[torch.tensor(chunk, device=self.device)] = self._forward(ids.to(self.device), eot)
        return out.clone()


# --------------------------------------------------------------------------------------------
# Vision tower (transformers modules)
# --------------------------------------------------------------------------------------------


class VisionEncoder:
    """Projected CLIP image embeddings: vision_model(...).pooler_output -> visual_projection,
    which is OpenCLIP `encode_image` / HF `get_image_features`."""

    def __init__(self, vision_model: Any, visual_projection: Any, image_size: int,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.visual_projection = visual_projection.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def embed_dim(self) -> int:
        return int(self.visual_projection.weight.shape[0])

    def __call__(self, images: Tensor) -> Tensor:
        param = self.visual_projection.weight
        with torch.inference_mode():
            pixels = clip_preprocess(images.to(param.device), self.image_size, self.mean, self.std)
            pooled = self.vision_model(pixel_values=pixels.to(param.dtype)).pooler_output
            return self.visual_projection(pooled).float()


# ComfyUI's CLIP-vision configs (comfy/clip_vision_config_*.json) by (hidden size, layers): a single
# file carries no config, and heads / activation cannot be read off tensor shapes.
_KNOWN_VISION = {
    (1280, 32): {"num_attention_heads": 16, "hidden_act": "gelu"},  # OpenCLIP ViT-H/14
    (1664, 48): {"num_attention_heads": 16, "hidden_act": "gelu"},  # OpenCLIP ViT-bigG/14
    (1024, 24): {"num_attention_heads": 16, "hidden_act": "quick_gelu"},  # OpenAI ViT-L/14
}


def _vision_config_from_state(state: Mapping[str, Tensor], overrides: Mapping[str, Any]) -> Any:
    from transformers import CLIPVisionConfig

    try:
        hidden = int(state["vision_model.embeddings.class_embedding"].shape[0])
        patch = int(state["vision_model.embeddings.patch_embedding.weight"].shape[-1])
        positions = int(state["vision_model.embeddings.position_embedding.weight"].shape[0])
        intermediate = int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
        projection = int(state["visual_projection.weight"].shape[0])
    except KeyError as error:
        raise ClipTagsError(
            f"not a transformers-layout CLIP vision model with projection (missing {error})") from error
    layers = _layer_count(list(state), "vision_model.encoder.layers.")
    known = _KNOWN_VISION.get((hidden, layers), {"num_attention_heads": max(hidden // 64, 1), "hidden_act": "gelu"})
    config = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "patch_size": patch, "image_size": patch * math.isqrt(positions - 1), "projection_dim": projection,
              "layer_norm_eps": 1e-5, **known, **overrides}
    return CLIPVisionConfig(**config)


def load_clip_vision(path: str | Path, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, **config_overrides: Any) -> VisionEncoder:
    """A CLIP vision model with projection: a transformers folder (config.json; CLIPModel or
    CLIPVisionModelWithProjection) or a single .safetensors file in the transformers layout, as
    ComfyUI's models/clip_vision files are (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    path = Path(path)
    if path.is_dir():
        _require_model_files(path, tokenizer=False)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        loader = CLIPModel if model_type == "clip" else CLIPVisionModelWithProjection
        try:
            model = loader.from_pretrained(str(path), local_files_only=True)
        except Exception as error:
            raise ClipTagsError(f"could not load the CLIP vision model in {path}: {error}") from error
        size = model.config.vision_config.image_size if model_type == "clip" else model.config.image_size
        model = model.to(device=device, dtype=dtype)
        return VisionEncoder(model.vision_model, model.visual_projection, size)
    if not path.is_file():
        raise ClipTagsError(f"CLIP vision model not found: {path.name} (looked in {path.parent})")
    from safetensors.torch import load_file

    state = load_file(str(path))
    if not any(k.startswith("vision_model.") for k in state) and any(k.startswith("visual.") for k in state):
        raise ClipTagsError(f"{path.name} is in the OpenCLIP layout; convert it to the transformers layout")
    config = _vision_config_from_state(state, config_overrides)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    wanted = set(model.state_dict())
    result = model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ClipTagsError(f"{path.name}: incomplete CLIP vision weights (missing {missing[:3]})")
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent position ids
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(
                leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    model = model.to(device=device, dtype=dtype)
    return VisionEncoder(model.vision_model, model.visual_projection, config.image_size)


# --------------------------------------------------------------------------------------------
# Encoder pairs
# --------------------------------------------------------------------------------------------


@dataclass
class ClipEncoders:
    """An image/text encoder pair of one CLIP model, plus the identity its cache entries use."""

    encode_images: ImageEncoder
    encode_texts: TextEncoder
    cache_owner: object
    cache_tag: Hashable = None

    def scorer(self, vocabulary: Sequence[str] | None = None,
               templates: Sequence[str] = DEFAULT_TEMPLATES, **kwargs: Any) -> TagScorer:
        return TagScorer(self.encode_images, self.encode_texts, vocabulary, templates,
                         cache_owner=self.cache_owner, cache_tag=self.cache_tag, **kwargs)


def _require_model_files(folder: Path, tokenizer: bool) -> None:
    if not folder.is_dir():
        raise ClipTagsError(f"CLIP model folder not found: {folder}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any((folder / name).is_file() for name in weights):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if tokenizer and not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
                          or (folder / "tokenizer.json").is_file()):
        missing.append("tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    if missing:
        raise ClipTagsError(f"the CLIP model folder {folder} lacks {', '.join(missing)}")


def transformers_clip_encoders(folder: str | Path, device: torch.device | str | None = None,
                               dtype: torch.dtype | None = None) -> ClipEncoders:
    """Both towers of a transformers `CLIPModel` folder, read locally only (config.json, weights,
    tokenizer files), e.g. a copy of laion/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    from transformers import CLIPModel

    folder = Path(folder)
    _require_model_files(folder, tokenizer=True)
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        raise ClipTagsError(f"could not load the CLIP model in {folder}: {error}") from error
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    text_config = model.config.text_config
    tower = ClipTextTower(
        model.state_dict(), folder, prefix="", num_heads=text_config.num_attention_heads,
        activation=text_config.hidden_act, eps=text_config.layer_norm_eps,
    )
    vision = VisionEncoder(model.vision_model, model.visual_projection, model.config.vision_config.image_size)
    return ClipEncoders(vision, tower, cache_owner=model)


def sd2_openclip_encoders(text_state: Mapping[str, Tensor], vision: VisionEncoder | str | Path, tokenizer: Any,
                          prefix: str | None = None, num_heads: int | None = None,
                          device: torch.device | str | None = None) -> ClipEncoders:
    """SD-2.x's text encoder (state with all layers + text_projection: a single-file checkpoint,
    whole or as its `cond_stage_model.model.` part, or ComfyUI's `clip_h.transformer.` dict) with
    the OpenCLIP ViT-H/14 image tower (a `VisionEncoder` or a path for `load_clip_vision`).
    See the module docstring for why this pair shares one embedding space."""
    if isinstance(vision, (str, Path)):
        vision = load_clip_vision(vision, device=device)
    tower = ClipTextTower(text_state, tokenizer, prefix=prefix, num_heads=num_heads, device=device)
    if tower.embed_dim != vision.embed_dim:
        raise ClipTagsError(
            f"the text encoder projects to {tower.embed_dim} dims but the vision model to {vision.embed_dim}; "
            "SD-2.x pairs with CLIP-ViT-H-14-laion2B-s32B-b79K (both 1024)"
        )
    return ClipEncoders(vision, tower, cache_owner=tower)
