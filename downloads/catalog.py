"""The published files each method needs: official URL, ComfyUI model folder, and the facts that were
verified (a content hash, a size) with where they were verified.

Hashes: the official GitHub repositories store osediff.pkl and de_net.pth as plain git blobs, so their git
object ids (SHA-1 of "blob <size>\\0" + content) identify the content exactly; they were read from the
repositories' trees at the pinned commits below, and downloads use those pinned commits. For the Hugging
Face and Google Drive files no hash could be verified when this catalog was written (no access to those
hosts), so `sha256` stays None: fetch-weights refuses them unless the user passes --allow-unverified, and
then prints the sha256 it measured. Never fill in a hash that was not checked against the real file.
"""

from __future__ import annotations

from dataclasses import dataclass

OSEDIFF_COMMIT = "fcc4f09c7ed66a9bc0ba9433940d76b343142426"  # cswry/OSEDiff, 2024-12-13
S3DIFF_COMMIT = "6a2e0a47676f2f01fccdfd4e940077d3038d953e"  # ArcticHare105/S3Diff, 2024-11-09


@dataclass(frozen=True)
class PublishedFile:
    name: str  # the published file name, which the workflows use
    url: str  # a direct download URL, or the release page when there is none (direct=False)
    directory: str  # ComfyUI model folder
    page: str  # the official page that names the file
    git_blob_sha1: str | None = None  # verified content hash (git object id), see the module docstring
    sha256: str | None = None  # verified sha256, when one could be checked
    size_note: str = ""  # size as published, when known (not a verified byte count)
    direct: bool = True  # False: the host needs a browser (Google Drive); download by hand

    @property
    def verified(self) -> bool:
        return bool(self.git_blob_sha1 or self.sha256)

    def as_workflow_model(self) -> dict[str, str]:
        """The entry of a workflow's `models` list (what ComfyUI's frontend reads)."""
        return {"name": self.name, "url": self.url, "directory": self.directory}


SD21_BASE = PublishedFile(
    name="v2-1_512-ema-pruned.safetensors",
    url="https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors",
    directory="checkpoints", page="https://huggingface.co/stabilityai/stable-diffusion-2-1-base")
SD_TURBO = PublishedFile(
    name="sd_turbo.safetensors", url="https://huggingface.co/stabilityai/sd-turbo/resolve/main/sd_turbo.safetensors",
    directory="checkpoints", page="https://huggingface.co/stabilityai/sd-turbo")
OSEDIFF_PKL = PublishedFile(
    name="osediff.pkl",
    url=f"https://raw.githubusercontent.com/cswry/OSEDiff/{OSEDIFF_COMMIT}/preset/models/osediff.pkl",
    directory="onestep_sr", page="https://github.com/cswry/OSEDiff",
    git_blob_sha1="bc84dc9729aa6173e8b1087977025a4fc566a5db")
S3DIFF_PKL = PublishedFile(
    name="s3diff.pkl", url="https://huggingface.co/zhangap/S3Diff/resolve/main/s3diff.pkl",
    directory="onestep_sr", page="https://huggingface.co/zhangap/S3Diff", size_note="138 MB")
DE_NET = PublishedFile(
    name="de_net.pth",
    url=f"https://raw.githubusercontent.com/ArcticHare105/S3Diff/{S3DIFF_COMMIT}/assets/mm-realsr/de_net.pth",
    directory="onestep_sr", page="https://github.com/ArcticHare105/S3Diff",
    git_blob_sha1="28b4f4ac13ea0080906dfbc286b054f6dc4251a6", size_note="9.42 MB")
HERO_SR_PKL = PublishedFile(
    name="hero_sr_model.pkl",
    url="https://drive.google.com/file/d/1xxY2vYdn6-yjg7_7op5y4d1u2iOYRifs/view?usp=sharing",
    directory="onestep_sr", page="https://github.com/W-JG/Hero-SR", direct=False)
CLIP_VISION_H = PublishedFile(
    name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    url="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/model.safetensors",
    directory="clip_vision", page="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
AUTOENCODER_VQ_F4 = PublishedFile(  # URL as the official SinSR/ResShift code downloads it (release v2.0)
    name="autoencoder_vq_f4.pth",
    url="https://github.com/zsyOAOA/ResShift/releases/download/v2.0/autoencoder_vq_f4.pth",
    directory="onestep_sr", page="https://github.com/zsyOAOA/ResShift")
HF_DIFF_PTH = PublishedFile(  # the official README names weights/HF-Diff.pth but links no download
    name="HF-Diff.pth",
    url="https://github.com/shoaib-sami/Multi-Granular-High-Frequency-Perceptual-Loss-MGHF-",
    directory="onestep_sr", page="https://github.com/shoaib-sami/Multi-Granular-High-Frequency-Perceptual-Loss-MGHF-",
    direct=False)

# method -> (its own files, its base)
METHOD_FILES: dict[str, tuple[tuple[PublishedFile, ...], PublishedFile]] = {
    "osediff": ((OSEDIFF_PKL,), SD21_BASE),
    "s3diff": ((S3DIFF_PKL, DE_NET), SD_TURBO),
    "hero_sr": ((HERO_SR_PKL,), SD_TURBO),
}
ALL_FILES = (SD21_BASE, SD_TURBO, OSEDIFF_PKL, S3DIFF_PKL, DE_NET, HERO_SR_PKL, CLIP_VISION_H,
             AUTOENCODER_VQ_F4, HF_DIFF_PTH)
