"""Download published weight files into a folder, verified before they get their final name.

A file is streamed to `<name>.partial` while its hashes are computed, checked against the catalog, and only
then renamed: an interrupted or wrong download never leaves a file that looks complete, and an existing file
is never overwritten (it is verified instead). The transport is `open_url` (urllib), replaced in tests.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .catalog import PublishedFile

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download failed or did not match its published hash."""


@dataclass
class Hashes:
    size: int
    sha256: str
    git_blob_sha1: str


def open_url(url: str, timeout: float = 60) -> BinaryIO:
    request = urllib.request.Request(url, headers={"User-Agent": "onestep-sr fetch-weights"})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (https URLs from the catalog only)


def file_hashes(path: Path) -> Hashes:
    """sha256 and the git object id of a file (git's blob header needs the size first)."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    return Hashes(size=size, sha256=sha256.hexdigest(), git_blob_sha1=blob.hexdigest())


def mismatch(entry: PublishedFile, hashes: Hashes) -> str | None:
    """Why the content is not the published file, or None when it matches every known hash."""
    if entry.sha256 and hashes.sha256 != entry.sha256:
        return f"sha256 {hashes.sha256} != published {entry.sha256}"
    if entry.git_blob_sha1 and hashes.git_blob_sha1 != entry.git_blob_sha1:
        return f"git blob id {hashes.git_blob_sha1} != published {entry.git_blob_sha1}"
    return None


def fetch_file(entry: PublishedFile, folder: Path, allow_unverified: bool = False,
               report: Callable[[str], None] = print) -> Path:
    """Bring one file into `folder` (or verify the one already there)."""
    if not entry.direct:
        raise FetchError(f"{entry.name} has no direct download (its host needs a browser): get it from "
                         f"{entry.url} (named on {entry.page}) and put it in {folder}")
    if not entry.verified and not allow_unverified:
        raise FetchError(f"{entry.name}: no published hash could be verified for {entry.url}; download it by hand "
                         "or pass --allow-unverified (the measured sha256 is then printed)")
    target = folder / entry.name
    if target.exists():
        problem = mismatch(entry, file_hashes(target))
        if problem:
            raise FetchError(f"{target} exists but is not the published file ({problem}); it was left untouched: "
                             "move it away to download again")
        report(f"{entry.name}: already present in {folder}" + (" (verified)" if entry.verified else ""))
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (entry.name + ".partial")
    try:
        with open_url(entry.url) as response, open(partial, "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
        hashes = file_hashes(partial)
        problem = mismatch(entry, hashes)
        if problem:
            raise FetchError(f"{entry.name} from {entry.url} is not the published file ({problem}); nothing was "
                             "kept")
        os.replace(partial, target)
    except OSError as error:
        raise FetchError(f"downloading {entry.name} from {entry.url} failed: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    note = "verified" if entry.verified else f"UNVERIFIED, sha256 {hashes.sha256}"
    report(f"{entry.name}: {hashes.size} bytes -> {target} ({note})")
    return target
